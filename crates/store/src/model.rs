//! Rows and requests the store reads and writes.

use chrono::{DateTime, Utc};
use drover_core::definition::{DEFAULT_TIMEOUT, millis};
use drover_core::{
    CampaignId, Definition, Fence, InstanceId, InstanceState, NodeId, Queue, Route, SignalId, Step,
    StepSeq,
};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{Error, Result};

/// A stored workflow definition version.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct StoredDefinition {
    pub name: String,
    pub version: i32,
    /// The canonical JSON of the definition.
    pub body: Value,
    /// What the operator deployed, as written.
    pub source: String,
    pub created_at: DateTime<Utc>,
    /// When the version was deleted (`workflow delete`): it starts no instance any more, but
    /// the instances that ran it keep reading it.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// How much of a definition's `description` a listing shows.
pub const SUMMARY_DESCRIPTION_CHARS: i32 = 200;

/// The latest version of a workflow, for listings.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct DefinitionSummary {
    pub name: String,
    pub version: i32,
    /// Its first [`SUMMARY_DESCRIPTION_CHARS`] characters.
    pub description: Option<String>,
    pub steps: i64,
    pub created_at: DateTime<Utc>,
}

/// What a deploy did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deployed {
    pub name: String,
    pub version: i32,
    /// False when the content equals the latest version (the deploy was a no-op).
    pub created: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Campaign {
    pub id: CampaignId,
    pub name: String,
    pub max_running: Option<i32>,
    pub running: i32,
    pub queued: i32,
    pub on_error_permit: String,
    pub created_at: DateTime<Utc>,
    /// When an operator paused it (`campaign pause`): it admits nothing until unpaused.
    pub paused_at: Option<DateTime<Utc>>,
    /// Who paused it.
    pub paused_by: Option<String>,
}

/// One instance to create.
#[derive(Clone, Debug)]
pub struct NewInstance {
    pub id: InstanceId,
    pub campaign: CampaignId,
    pub workflow: String,
    pub version: i32,
    pub entry_step: String,
    /// The entry step's `allow_retry`.
    pub allow_retry: bool,
    /// The entry step's timeout.
    pub timeout_ms: i64,
    /// The entry step's route.
    pub route: Route,
    pub vars: Value,
    /// Announce its end (`Store::listen_instance_ends`): someone waits for it.
    pub announce_end: bool,
}

/// An instance as operators see it.
#[derive(Clone, Debug, Serialize)]
pub struct Instance {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub state: InstanceState,
    pub current_step: String,
    pub step_seq: StepSeq,
    pub step_attempt: i32,
    pub fence: Fence,
    pub owner_node: Option<NodeId>,
    pub vars: Value,
    pub outputs: Value,
    pub error: Option<String>,
    pub parent_instance_id: Option<InstanceId>,
    pub call_depth: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When the timer wakes it (a WAITING instance's sleep or event timeout).
    pub wake_at: Option<DateTime<Utc>>,
    /// The event a WAITING instance waits for.
    pub wait_event: Option<String>,
    /// The child its current `subworkflow` step started.
    pub wait_child: Option<InstanceId>,
    /// Whether it holds one of its campaign's permits.
    pub holds_permit: bool,
    /// A QUEUED instance's place in its campaign's queue (1 = admitted next).
    pub queue_position: Option<i64>,
}

/// What [`Store::create_instances`](crate::Store::create_instances) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Created {
    /// The instances created READY (with a permit, or in an unlimited campaign): publish
    /// their jobs.
    pub ready: Vec<StepJob>,
    /// The instances created QUEUED behind their campaign's limit, in queue order: a freed
    /// permit admits them.
    pub queued: Vec<InstanceId>,
    /// The instances claimed at once by the node that asked
    /// ([`Store::create_instances_claiming`](crate::Store::create_instances_claiming)): it
    /// runs their first step; nobody else is sent their job.
    pub claimed: Vec<Claimed>,
}

/// Instances a node claims as they are created, to run their first step itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalClaim {
    pub node: NodeId,
    /// At most this many (the node's free capacity).
    pub max: usize,
}

/// Which instances to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct InstanceFilter {
    pub state: Option<InstanceState>,
    pub campaign: Option<String>,
    pub workflow: Option<String>,
    /// Only the children of this instance (the sub-workflow instances it started).
    pub parent: Option<InstanceId>,
    /// Only instances created before this one (keyset pagination).
    pub before: Option<InstanceId>,
    pub limit: i64,
    /// List each instance's `vars` too, stopping before the vars listed exceed this many
    /// bytes of JSON (the first instance is listed whatever its size); `None` lists no vars,
    /// and reads none.
    pub vars_budget: Option<usize>,
}

/// An instance as listings show it: no `outputs`, `vars` only when asked for, `error` cut to
/// [`SUMMARY_ERROR_CHARS`].
#[derive(Clone, Debug, Serialize)]
pub struct InstanceSummary {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub state: InstanceState,
    pub current_step: String,
    pub step_seq: StepSeq,
    pub step_attempt: i32,
    pub owner_node: Option<NodeId>,
    /// Present when the filter has a `vars_budget`.
    pub vars: Option<Value>,
    /// Its first [`SUMMARY_ERROR_CHARS`] characters.
    pub error: Option<String>,
    pub parent_instance_id: Option<InstanceId>,
    pub call_depth: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub wake_at: Option<DateTime<Utc>>,
    pub wait_event: Option<String>,
    pub wait_child: Option<InstanceId>,
    pub holds_permit: bool,
    pub queue_position: Option<i64>,
}

/// How much of an instance's `error` a listing shows.
pub const SUMMARY_ERROR_CHARS: i32 = 1_000;

/// A page of a listing, newest first.
#[derive(Clone, Debug, Default)]
pub struct InstancePage {
    pub instances: Vec<InstanceSummary>,
    /// Whether more instances match past the last one listed (it was cut by `limit` or by
    /// `vars_budget`).
    pub more: bool,
}

/// A page of a journal, in checkpoint order.
#[derive(Clone, Debug, Default)]
pub struct JournalPage {
    pub entries: Vec<JournalEntry>,
    /// Whether entries follow the last one given (it was cut by the limit or the byte budget).
    pub more: bool,
}

/// One journaled transition.
#[derive(Clone, Debug, Serialize)]
pub struct JournalEntry {
    pub step_seq: StepSeq,
    pub step_id: String,
    pub outcome: String,
    pub transition: Option<String>,
    pub fence: Fence,
    pub attempt: i32,
    pub node_id: Option<NodeId>,
    pub actor: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// A job ([`StepJob`]): what a claim asks for, and what the store hands out for the
/// instances it makes READY.
pub use drover_core::StepJob;

/// A claimed instance: everything a worker needs to run its current step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub current_step: String,
    pub step_seq: StepSeq,
    /// The step_seq at which the current step was entered (stable across retries).
    pub step_entered_seq: StepSeq,
    pub step_attempt: i32,
    /// The fence after the claim: the commit must present it.
    pub fence: Fence,
    /// How many times the current step has been claimed without a commit (1 = first).
    pub step_claims: i32,
    pub steps_run: i32,
    pub vars: Value,
    pub outputs: Value,
    pub created_at: DateTime<Utc>,
    /// When the claim happened, by the database clock: what waiting steps compare their
    /// deadline with.
    pub claimed_at: DateTime<Utc>,
    /// When the current step's wait ends (a sleep's wake time, a wait_event's timeout): set
    /// when the step first waits, `None` before that.
    pub wait_deadline: Option<DateTime<Utc>>,
    /// The child instance the current `subworkflow` step started, if it started one.
    pub wait_child: Option<InstanceId>,
    /// The instance whose `subworkflow` step started this one.
    pub parent: Option<InstanceId>,
    /// How many `subworkflow` calls deep this instance is (0 for a top-level one).
    pub call_depth: i32,
    /// The current step's route: where a retry of it is published.
    pub route: Route,
    /// Whether it held a campaign permit when claimed.
    pub holds_permit: bool,
}

/// A child instance a `subworkflow` step starts, in the commit that parks its parent.
#[derive(Clone, Debug, PartialEq)]
pub struct NewChild {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub entry_step: String,
    /// The entry step's `allow_retry`.
    pub allow_retry: bool,
    /// The entry step's timeout.
    pub timeout_ms: i64,
    /// The entry step's route.
    pub route: Route,
    pub vars: Value,
}

/// Where a completed step leaves its instance.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// Go on with `step` (a new step: attempt 1), whose `allow_retry` and timeout recovery
    /// needs to know, and whose route says where its job goes. The committing node continues
    /// it only if it serves the route (see [`Store::commit_continuing`](crate::Store::commit_continuing)).
    Next {
        step: String,
        allow_retry: bool,
        timeout_ms: i64,
        route: Route,
    },
    /// Run the same step again after `delay_ms` (attempt + 1, same idempotency key).
    Retry { delay_ms: u64 },
    /// Stop in a state that needs no worker: `completed`, `failed` or `in_error`.
    Stop { state: InstanceState },
    /// Park the instance WAITING at the same step (no worker held, the step not finished)
    /// until the first of: the timer, the event, the child. A re-run of the step decides
    /// whether the wait is over.
    Wait {
        /// Wake after this many milliseconds from the commit, by the database clock. Only the
        /// step's first wait sets its deadline; a later wait of the same step keeps it.
        wake_at_ms: Option<i64>,
        /// Wake when an event of this name is delivered.
        event: Option<String>,
        /// Start this child in the same transaction; wake when it finishes.
        child: Option<Box<NewChild>>,
    },
}

impl Transition {
    /// Go on with step `to` of `definition`, carrying what recovery needs to know of it (a
    /// step the definition lacks gets the defaults; validation rules that out).
    pub fn next(definition: &Definition, to: &str) -> Self {
        let step = definition.step(to);
        Self::Next {
            step: to.to_owned(),
            allow_retry: step.is_none_or(|s| s.allow_retry),
            timeout_ms: step.map_or(millis(DEFAULT_TIMEOUT), Step::timeout_ms),
            route: step.map(|s| definition.route(s)).unwrap_or_default(),
        }
    }
}

/// The result of running one claimed step, to be group-committed.
#[derive(Clone, Debug)]
pub struct Completion {
    pub instance: InstanceId,
    pub fence: Fence,
    /// The step_seq the step ran at (the journal entry gets `step_seq + 1`).
    pub step_seq: StepSeq,
    pub step_id: String,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    /// `completed`, `retry`, `failed`, `error`, …: what happened to the step.
    pub outcome: String,
    pub transition: Transition,
    /// The instance's variables after the step, if it changed them.
    pub vars: Option<Value>,
    /// The step's output, recorded as `steps.<step_id>`.
    pub output: Option<Value>,
    pub error: Option<String>,
    /// The signal a `wait_event` step consumed: marked consumed only if this commit lands.
    pub consumes: Option<SignalId>,
    /// Whether the instance held a campaign permit when its step was claimed. A hint only: a
    /// completion that ends such an instance goes straight to the transaction that releases
    /// permits; the instance row decides either way.
    pub holds_permit: bool,
    /// The step moved on to an `end` step, which the worker ran at once (it runs no code:
    /// its status and reason follow from the instance's variables and outputs): both steps
    /// are committed together, each with its journal row and events. `transition` is then
    /// the end's `Stop`. A commit that must honour an operator's stop or pause request
    /// commits [`EndStep::next`] instead, as if the end had not run.
    pub ends: Option<EndStep>,
}

/// The `end` step a [`Completion`] ran at once after its own step.
#[derive(Clone, Debug, PartialEq)]
pub struct EndStep {
    pub step_id: String,
    /// The end's journal output (`{"reason": …}`), if any.
    pub output: Option<Value>,
    /// The end's error (a `failed` end's reason).
    pub error: Option<String>,
    /// The move to the end step, committed alone when the end may not run now.
    pub next: Transition,
}

impl Completion {
    /// Does it end an instance that held a permit when its step was claimed (by the
    /// [`Completion::holds_permit`] hint)? Such a commit releases the permit under the campaign
    /// lock, in a transaction of its own.
    pub fn releases_permit(&self) -> bool {
        self.holds_permit && matches!(self.transition, Transition::Stop { .. })
    }

    /// Commits the move to the end step alone (see [`Completion::ends`]).
    pub(crate) fn unfolded(&self) -> Option<Completion> {
        let end = self.ends.as_ref()?;
        Some(Completion {
            transition: end.next.clone(),
            ends: None,
            ..self.clone()
        })
    }

    /// The completion of `claimed`'s current step, started at `started_at`, that ended with
    /// `outcome` and moves on by `transition`; nothing else recorded (no vars, output or
    /// error): set the fields that apply.
    pub fn of(
        claimed: &Claimed,
        started_at: DateTime<Utc>,
        outcome: &str,
        transition: Transition,
    ) -> Self {
        Self {
            instance: claimed.id,
            fence: claimed.fence,
            step_seq: claimed.step_seq,
            step_id: claimed.current_step.clone(),
            attempt: claimed.step_attempt,
            started_at,
            outcome: outcome.to_owned(),
            transition,
            vars: None,
            output: None,
            error: None,
            consumes: None,
            holds_permit: claimed.holds_permit,
            ends: None,
        }
    }
}

/// What a group commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupCommit {
    /// One per completion, in order.
    pub results: Vec<Commit>,
    /// Other instances the commit made READY, whose jobs the caller publishes: children
    /// started, parents woken by a finished child, and waits that found their event had
    /// arrived already.
    pub ready: Vec<StepJob>,
    /// Instances the committing node claimed again for their next step
    /// ([`Store::commit_continuing`](crate::Store::commit_continuing)), each with the index
    /// of its completion.
    pub continued: Vec<(usize, Claimed)>,
    /// Queued instances this commit admitted with the permits it released, claimed for the
    /// committing node ([`Store::commit_continuing`](crate::Store::commit_continuing)): at most
    /// one per released permit, as the steps that released them leave their worker slots free.
    /// The node runs them; nobody else is sent their job.
    pub handed: Vec<Claimed>,
}

/// What became of one completion in a group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    Committed,
    /// The checkpoint exists already (a duplicate run).
    AlreadyCommitted,
    /// The instance has moved on: fence, state or owner no longer match.
    Fenced,
}

/// A node row.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub id: NodeId,
    pub roles: Vec<String>,
    /// The queues its worker serves (none for a node without the worker role).
    pub queues: Vec<Queue>,
    /// The handlers its worker registered.
    pub handlers: Vec<String>,
    pub host: String,
    pub version: String,
    pub status: String,
    pub heartbeat_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub died_at: Option<DateTime<Utc>>,
    pub in_flight: i32,
    /// Resident memory of the node process at its last heartbeat.
    pub rss_bytes: i64,
}

/// The lease a coordinator holds while it leads.
#[derive(Clone, Debug, Serialize)]
pub struct Lease {
    pub name: String,
    pub holder: Option<NodeId>,
    pub term: i64,
    pub expires_at: DateTime<Utc>,
    pub acquired_at: Option<DateTime<Utc>>,
    /// Whether `expires_at` is still in the future (by the database clock).
    pub live: bool,
}

/// An instance taken back from a dead node, as recovery decided.
#[derive(Clone, Debug)]
pub struct Orphan {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub current_step: String,
    /// The checkpoint after the requeue (a journaled transition).
    pub step_seq: StepSeq,
    /// The fence after the requeue.
    pub fence: Fence,
    /// `ready` (re-dispatch) or `in_error` (a non-retryable step was interrupted).
    pub state: InstanceState,
    /// Where its job goes.
    pub route: Route,
}

impl Orphan {
    /// The job to publish for it (if it is READY).
    pub fn job(&self) -> StepJob {
        StepJob {
            instance: self.id,
            step_seq: self.step_seq,
            fence: self.fence,
            route: self.route.clone(),
        }
    }
}

/// A WAITING instance made READY again (by the timer or a signal), as the store decided.
#[derive(Clone, Debug)]
pub struct Woken {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub current_step: String,
    /// The checkpoint after the wake (a journaled transition).
    pub step_seq: StepSeq,
    /// Unchanged by a wake: no worker holds a WAITING instance.
    pub fence: Fence,
    /// Where its job goes.
    pub route: Route,
}

impl Woken {
    /// The job to publish for it.
    pub fn job(&self) -> StepJob {
        StepJob {
            instance: self.id,
            step_seq: self.step_seq,
            fence: self.fence,
            route: self.route.clone(),
        }
    }
}

/// What a signal delivery did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The instance was waiting for it and is READY now: publish the job.
    Woke(StepJob),
    /// Stored until the instance waits for it (a step consumes it then).
    Kept,
}

/// An unconsumed signal, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingSignal {
    pub id: SignalId,
    pub payload: Value,
    pub received_at: DateTime<Utc>,
}

/// A READY instance's job from its row: `(id, step_seq, fence, step_queue, step_handler)`.
pub(crate) type JobRow = (Uuid, i64, i64, String, Option<String>);

pub(crate) fn job_row((id, seq, fence, queue, handler): JobRow) -> Result<StepJob> {
    Ok(StepJob {
        instance: InstanceId(id),
        step_seq: StepSeq(seq),
        fence: Fence(fence),
        route: parse_route(queue, handler)?,
    })
}

/// The route of a step as its instance row keeps it (`step_queue`, `step_handler`).
pub(crate) fn parse_route(queue: String, handler: Option<String>) -> Result<Route> {
    let queue = Queue::try_from(queue).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(Route { queue, handler })
}
