//! Operator lifecycle commands: pause, unpause, stop, kill and restart. They move permits, so
//! each runs in one transaction with the permit release or admission it causes.
//!
//! Every command locks its instances (`FOR UPDATE`, in id order) before anything else, decides
//! from what it reads under the lock, and writes in that transaction the instance's new state,
//! its journal row, an `audit` row naming the operator and the events. Campaign rows are
//! locked after the instance rows (the semaphore's lock order).
//!
//! Which command applies in which state, and what it does there, is decided by
//! [`drover_core::lifecycle::decide`] (its module docs have the table); this module carries the
//! decision out.
//!
//! A request on a RUNNING instance changes no checkpoint: the step's own commit honours it
//! (its journal row says where the instance went). So a request is audited and announced, not
//! journaled: a journal row needs a checkpoint, and taking one would fence off the running
//! step that the request lets finish. A pause request is honoured by a commit that would leave
//! the instance READY; one whose step parks it WAITING keeps the request pending, and a pause
//! or an unpause of that instance settles it.
//!
//! An instance made PAUSED, STOPPED, READY or WAITING here takes a new checkpoint
//! (`step_seq + 1`); PAUSED and STOPPED also take `fence + 1`, so a job already on the queue or
//! a worker already running the step finds its claim or commit rejected.
//!
//! # Waiting instances
//! A WAITING instance paused keeps its wait (`wake_at`, `wait_event`, `wait_child`): the clock
//! runs on while it is paused, but nothing wakes it. Its timer is not fired (the timer only looks
//! at WAITING rows), an event delivered meanwhile is stored (as for any instance not waiting for
//! it), and a child that ends meanwhile only decrements `pending_children`. Unpause looks at
//! what came: if its timer has passed, its event is stored or its child ended, it goes READY
//! and the step runs again and sees it (a wait_event past its timeout fails then); otherwise it
//! goes back to WAITING with the same timer.
//!
//! # Stopping
//! A stop or kill releases the instance's permit and admits the next QUEUED instance in the
//! same transaction; a stopped child wakes its WAITING parent like a child's terminal commit
//! does (READY at the same step, `pending_children - 1`); and the instance's live descendants
//! are stopped with it (killed by a kill; by a stop, STOPPED at once or, when running, asked to
//! stop), since they run under its permit.

use chrono::{DateTime, Utc};
use drover_core::event::EventKind;
use drover_core::lifecycle::{Cascade, Decision, Requests};
use drover_core::{Fence, InstanceId, InstanceState, Route, StepSeq};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::diagnosis::parse_state;
use crate::facts::{NewFact, insert_facts};
use crate::model::StepJob;
use crate::model::parse_route;
use crate::semaphore::{self, Admission, Admitted};
use crate::{Error, Result, Store};

pub use drover_core::lifecycle::{LifecycleAction, Refusal};

/// How many times a command's transaction is tried when Postgres breaks a deadlock (another
/// transaction locked the same instances or campaign in another order) or a serialization
/// failure.
const ATTEMPTS: u32 = 5;

/// How many live descendants a stop follows: far more than any real call chain has (a
/// `subworkflow` step runs one child at a time), and a bound should `parent_instance_id` ever
/// form a cycle.
const MAX_CALL_CHAIN: usize = 1_000;

/// What a lifecycle command did to one instance; its journal outcome when it took a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleOutcome {
    /// PAUSED now (from QUEUED, READY or WAITING).
    Paused,
    /// RUNNING: it pauses when its step's commit lands.
    PauseRequested,
    /// READY, QUEUED or WAITING again.
    Unpaused,
    /// RUNNING: a pending pause request was withdrawn.
    PauseWithdrawn,
    /// RUNNING: it stops when its step's commit lands.
    StopRequested,
    /// STOPPED now by a graceful stop (it was not running a step).
    Stopped,
    /// STOPPED now by a kill.
    Killed,
    /// A WAITING parent woken because its child was stopped.
    Woken,
    /// A finished instance restarted (the old one; it does not change).
    Restarted,
    /// The new instance a restart created (READY or QUEUED).
    Started,
}

impl LifecycleOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paused => "paused",
            Self::PauseRequested => "pause_requested",
            Self::Unpaused => "unpaused",
            Self::PauseWithdrawn => "pause_withdrawn",
            Self::StopRequested => "stop_requested",
            Self::Stopped => "stopped",
            Self::Killed => "killed",
            Self::Woken => "woken",
            Self::Restarted => "restarted",
            Self::Started => "started",
        }
    }
}

/// One instance changed by a lifecycle command, as the event builder and the caller see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleChange {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub current_step: String,
    pub from: InstanceState,
    /// Its state afterwards (RUNNING for a request).
    pub to: InstanceState,
    pub outcome: LifecycleOutcome,
    /// The checkpoint afterwards (unchanged by a request).
    pub step_seq: StepSeq,
    /// The fence afterwards.
    pub fence: Fence,
    /// Who acted: the operator, or `child:<id>` for a parent woken by its stopped child.
    pub actor: String,
    /// The other instance involved: the ancestor whose stop or kill stopped this one, the
    /// stopped child that woke this parent, the instance a restart started (on the old one) or
    /// restarted (on the new one).
    pub related: Option<InstanceId>,
    /// Where its job goes.
    pub route: Route,
}

impl LifecycleChange {
    /// The job to publish once the transaction has committed, if it is READY now.
    pub fn job(&self) -> Option<StepJob> {
        let dispatched = matches!(
            self.outcome,
            LifecycleOutcome::Unpaused | LifecycleOutcome::Woken | LifecycleOutcome::Started
        );
        (dispatched && self.to == InstanceState::Ready).then(|| StepJob {
            instance: self.id,
            step_seq: self.step_seq,
            fence: self.fence,
            route: self.route.clone(),
        })
    }
}

/// What a restart did with one instance it was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restarted {
    /// The new instance (READY or QUEUED); `related` is the finished one.
    Started(LifecycleChange),
    /// It was restarted before, as `id`: nothing done.
    Already { id: InstanceId },
    Refused {
        state: InstanceState,
        refusal: Refusal,
    },
    /// No such instance.
    Unknown,
}

/// What a command did with one instance it was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acted {
    Changed(LifecycleChange),
    /// It is in the state the command leads to already (or a request is pending): nothing
    /// done, nothing written.
    Unchanged(InstanceState),
    Refused {
        state: InstanceState,
        refusal: Refusal,
    },
    /// No such instance.
    Unknown,
}

/// What one lifecycle transaction did.
#[derive(Clone, Debug, Default)]
pub struct LifecycleBatch {
    /// One per instance asked about, in the order asked.
    pub results: Vec<(InstanceId, Acted)>,
    /// Other instances the command changed: descendants stopped with their ancestor, parents
    /// woken by a stopped child.
    pub cascaded: Vec<LifecycleChange>,
    /// QUEUED instances admitted with the permits the command released.
    pub admitted: Vec<Admitted>,
}

impl LifecycleBatch {
    /// The jobs to publish now that the transaction has committed.
    pub fn jobs(&self) -> Vec<StepJob> {
        let changed = self.results.iter().filter_map(|(_, acted)| match acted {
            Acted::Changed(change) => Some(change),
            _ => None,
        });
        changed
            .chain(&self.cascaded)
            .filter_map(LifecycleChange::job)
            .chain(self.admitted.iter().map(Admitted::job))
            .collect()
    }
}

/// Which instances a command by filter applies to (see [`Store::lifecycle_targets`]).
#[derive(Clone, Debug, Default)]
pub struct LifecycleFilter {
    pub campaign: Option<String>,
    pub workflow: Option<String>,
    pub state: Option<InstanceState>,
}

/// A restart decided by the caller from the finished instance's definition version.
#[derive(Clone, Debug)]
pub struct Restart {
    /// The finished instance.
    pub from: InstanceId,
    /// The new instance's id.
    pub id: InstanceId,
    /// The definition's entry step, its `allow_retry`, its timeout and its route.
    pub entry_step: String,
    pub allow_retry: bool,
    pub timeout_ms: i64,
    pub route: Route,
}

/// The events of a [`LifecycleChange`].
fn change_facts(change: &LifecycleChange) -> Vec<NewFact> {
    use LifecycleOutcome as O;
    let common = || {
        json!({
            "step": change.current_step,
            "step_seq": change.step_seq,
            "from": change.from,
            "state": change.to,
            "outcome": change.outcome.as_str(),
            "actor": change.actor,
        })
    };
    let with = |kind, more: Value| {
        let mut data = common();
        if let (Some(data), Value::Object(more)) = (data.as_object_mut(), more) {
            data.extend(more);
        }
        NewFact::new(change.id, kind, data)
    };
    let fact = match change.outcome {
        O::Paused => with(EventKind::Paused, json!({})),
        O::PauseRequested => with(EventKind::PauseRequested, json!({})),
        O::Unpaused | O::PauseWithdrawn => with(EventKind::Unpaused, json!({})),
        O::StopRequested => with(EventKind::StopRequested, json!({})),
        O::Stopped | O::Killed => with(
            EventKind::Stopped,
            json!({
                "mode": if change.outcome == O::Killed { "kill" } else { "graceful" },
                "stopped_with": change.related,
            }),
        ),
        O::Restarted => with(
            EventKind::Restarted,
            json!({ "restarted_as": change.related }),
        ),
        O::Woken => NewFact::new(
            change.id,
            EventKind::Woken,
            json!({
                "state": change.to,
                "step": change.current_step,
                "step_seq": change.step_seq,
                "by": "child",
                "child": change.related,
                "child_state": InstanceState::Stopped,
                "actor": change.actor,
            }),
        ),
        O::Started => NewFact::new(
            change.id,
            EventKind::Started,
            json!({
                "state": change.to,
                "step": change.current_step,
                "restarted_from": change.related,
                "actor": change.actor,
            }),
        ),
    };
    vec![fact]
}

impl Store {
    /// Applies `action` to `ids` as `actor` in one transaction (see the module docs for what it
    /// does in each state), and returns what became of each. Publish [`LifecycleBatch::jobs`]
    /// afterwards. Retried a few times if Postgres breaks a deadlock.
    pub async fn apply_lifecycle(
        &self,
        action: LifecycleAction,
        ids: &[InstanceId],
        actor: &str,
    ) -> Result<LifecycleBatch> {
        self.apply_lifecycle_for(action, ids, actor, None).await
    }

    /// [`Store::apply_lifecycle`], with `reason` recorded in each audit row (`details.reason`):
    /// why the operator's command acted, when it is part of a larger one (e.g. the instances a
    /// `workflow delete --stop-instances` kills).
    pub async fn apply_lifecycle_for(
        &self,
        action: LifecycleAction,
        ids: &[InstanceId],
        actor: &str,
        reason: Option<&str>,
    ) -> Result<LifecycleBatch> {
        let mut attempt = 1;
        loop {
            match self.try_apply_lifecycle(action, ids, actor, reason).await {
                Err(err) if attempt < ATTEMPTS && is_lock_conflict(&err) => {
                    tracing::debug!(%err, attempt, action = action.as_str(), "retrying");
                    attempt += 1;
                }
                done => return done,
            }
        }
    }

    async fn try_apply_lifecycle(
        &self,
        action: LifecycleAction,
        ids: &[InstanceId],
        actor: &str,
        reason: Option<&str>,
    ) -> Result<LifecycleBatch> {
        let mut tx = self.pool.begin().await?;
        lock_in_id_order(&mut tx, ids, Some(action)).await?;
        let mut run = Run {
            action,
            actor,
            reason,
            batch: LifecycleBatch::default(),
            released: Vec::new(),
            dequeued: Vec::new(),
        };
        for &id in ids {
            let acted = run.act(&mut tx, id).await?;
            run.batch.results.push((id, acted));
        }
        let mut admitted =
            crate::semaphore::release_permits(&mut tx, &run.released, &run.dequeued, actor).await?;
        admitted.sort_by_key(|a| a.id);
        run.batch.admitted = admitted;
        tx.commit().await?;
        Ok(run.batch)
    }

    /// Up to `limit` instances matching `filter` with ids after `after`, in id order (page on
    /// with the last one). Without `filter.state`, those `action` can act on: not finished
    /// (pause, stop, kill), paused or asked to pause (unpause), finished (`None`: restart).
    pub async fn lifecycle_targets(
        &self,
        filter: &LifecycleFilter,
        action: Option<LifecycleAction>,
        after: Option<InstanceId>,
        limit: i64,
    ) -> Result<Vec<InstanceId>> {
        let default = match action {
            None => "i.state IN ('completed', 'failed', 'stopped')",
            Some(LifecycleAction::Unpause) => {
                "(i.state = 'paused' OR (i.pause_requested_by IS NOT NULL
                                        AND i.state NOT IN ('completed', 'failed', 'stopped')))"
            }
            Some(_) => "i.state NOT IN ('completed', 'failed', 'stopped')",
        };
        let rows: Vec<(Uuid,)> = sqlx::query_as(&format!(
            "SELECT i.id FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE ($1::text IS NULL OR c.name = $1)
               AND ($2::text IS NULL OR i.workflow = $2)
               AND CASE WHEN $3::text IS NOT NULL THEN i.state = $3 ELSE {default} END
               AND ($4::uuid IS NULL OR i.id > $4)
             ORDER BY i.id LIMIT $5"
        ))
        .bind(filter.campaign.as_deref())
        .bind(filter.workflow.as_deref())
        .bind(filter.state.map(InstanceState::as_str))
        .bind(after.map(|id| id.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| InstanceId(id)).collect())
    }

    /// Restarts finished top-level instances in one transaction: each gets a new instance of
    /// the same definition version with its initial variables, in the same campaign, admitted
    /// like any start (READY with a permit, or QUEUED), journal row 0 `started` by `actor`,
    /// linked by `restarted_from`. An instance is restarted at most once: asking again answers
    /// the first restart, unchanged. Audited on the old instance (`restart`).
    pub async fn restart(
        &self,
        restarts: &[Restart],
        actor: &str,
    ) -> Result<Vec<(InstanceId, Restarted)>> {
        let mut attempt = 1;
        loop {
            match self.try_restart(restarts, actor).await {
                Err(err) if attempt < ATTEMPTS && is_lock_conflict(&err) => attempt += 1,
                done => return done,
            }
        }
    }

    async fn try_restart(
        &self,
        restarts: &[Restart],
        actor: &str,
    ) -> Result<Vec<(InstanceId, Restarted)>> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<InstanceId> = restarts.iter().map(|r| r.from).collect();
        lock_in_id_order(&mut tx, &ids, None).await?;
        let mut results = Vec::with_capacity(restarts.len());
        for restart in restarts {
            let acted = restart_one(&mut tx, restart, actor).await?;
            results.push((restart.from, acted));
        }
        tx.commit().await?;
        Ok(results)
    }
}

/// A deadlock broken or a serialization failure: the whole transaction may be tried again.
fn is_lock_conflict(err: &Error) -> bool {
    match err {
        Error::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// Locks the rows of `ids` in id order, so two commands over overlapping sets cannot deadlock
/// each other. An unpause leaves QUEUED rows it would not change unlocked: the semaphore's
/// admission skips locked QUEUED rows, and a no-op must not make it admit out of order.
async fn lock_in_id_order(
    tx: &mut sqlx::PgConnection,
    ids: &[InstanceId],
    action: Option<LifecycleAction>,
) -> Result<()> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    sqlx::query(
        "SELECT 1 FROM instance
         WHERE id = ANY($1)
           AND NOT ($2 AND state = 'queued' AND pause_requested_by IS NULL)
         ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .bind(action == Some(LifecycleAction::Unpause))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// An instance row as a command reads it, under its lock.
#[derive(sqlx::FromRow)]
struct Locked {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign_id: i64,
    campaign: String,
    limited: bool,
    state: String,
    current_step: String,
    step_seq: i64,
    fence: i64,
    holds_permit: bool,
    owner_node: Option<Uuid>,
    parent_instance_id: Option<Uuid>,
    pause_requested_by: Option<String>,
    stop_requested_by: Option<String>,
    wait_child: Option<Uuid>,
    /// Paused from WAITING, and nothing that would have woken it has come.
    still_waiting: bool,
    step_queue: String,
    step_handler: Option<String>,
    /// Read from `step_queue` and `step_handler` by [`lock`].
    #[sqlx(skip)]
    route: Route,
}

async fn lock(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<Option<(Locked, InstanceState)>> {
    let row: Option<Locked> = sqlx::query_as(
        "SELECT i.id, i.workflow, i.version, i.campaign_id, c.name AS campaign,
                c.max_running IS NOT NULL AS limited, i.state, i.current_step, i.step_seq,
                i.fence, i.holds_permit, i.owner_node, i.parent_instance_id,
                i.pause_requested_by, i.stop_requested_by, i.wait_child,
                (i.paused_from IS NOT DISTINCT FROM 'waiting'
                 AND (i.wake_at IS NOT NULL OR i.wait_event IS NOT NULL OR i.wait_child IS NOT NULL)
                 AND (i.wake_at IS NULL OR i.wake_at > clock_timestamp())
                 AND NOT (i.wait_child IS NOT NULL AND i.pending_children = 0)
                 AND NOT EXISTS (SELECT 1 FROM instance_signal s
                                 WHERE s.instance_id = i.id AND s.name = i.wait_event
                                   AND s.consumed_at IS NULL)) AS still_waiting,
                i.step_queue, i.step_handler
         FROM instance i JOIN campaign c ON c.id = i.campaign_id
         WHERE i.id = $1
         FOR UPDATE OF i",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|mut row| {
        let state = parse_state(&row.state)?;
        row.route = parse_route(row.step_queue.clone(), row.step_handler.clone())?;
        Ok((row, state))
    })
    .transpose()
}

/// One lifecycle transaction in progress.
struct Run<'a> {
    action: LifecycleAction,
    actor: &'a str,
    /// Recorded in the audit rows, when the command is part of a larger one.
    reason: Option<&'a str>,
    batch: LifecycleBatch,
    /// Instances whose permit this transaction took back.
    released: Vec<InstanceId>,
    /// Instances this transaction took out of QUEUED.
    dequeued: Vec<InstanceId>,
}

impl Run<'_> {
    async fn act(&mut self, tx: &mut sqlx::PgConnection, id: InstanceId) -> Result<Acted> {
        if self.action == LifecycleAction::Unpause {
            // Not locked (see `lock_in_id_order`): an unpause changes no QUEUED instance that
            // has no pause pending, whatever happens to it meanwhile.
            let queued: Option<(bool,)> = sqlx::query_as(
                "SELECT state = 'queued' AND pause_requested_by IS NULL FROM instance
                 WHERE id = $1",
            )
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((true,)) = queued {
                return Ok(Acted::Unchanged(InstanceState::Queued));
            }
        }
        let Some((row, state)) = lock(tx, id.0).await? else {
            return Ok(Acted::Unknown);
        };
        let requests = Requests {
            pause: row.pause_requested_by.as_deref(),
            stop: row.stop_requested_by.as_deref(),
        };
        let change = match drover_core::lifecycle::decide(self.action, state, requests) {
            Decision::Unchanged => return Ok(Acted::Unchanged(state)),
            Decision::Refused(refusal) => return Ok(Acted::Refused { state, refusal }),
            Decision::RequestPause => {
                self.request(tx, &row, state, LifecycleOutcome::PauseRequested, None)
                    .await?
            }
            Decision::WithdrawPause => {
                self.request(tx, &row, state, LifecycleOutcome::PauseWithdrawn, None)
                    .await?
            }
            Decision::RequestStop => {
                self.request(tx, &row, state, LifecycleOutcome::StopRequested, None)
                    .await?
            }
            Decision::Pause => self.pause(tx, &row, state).await?,
            Decision::Unpause => self.unpause(tx, &row).await?,
            Decision::Stop => self.stop_tree(tx, row, state).await?,
        };
        Ok(Acted::Changed(change))
    }

    /// Records a request on a RUNNING instance (or withdraws a pause request): audited and
    /// announced, no checkpoint.
    async fn request(
        &mut self,
        tx: &mut sqlx::PgConnection,
        row: &Locked,
        state: InstanceState,
        outcome: LifecycleOutcome,
        related: Option<InstanceId>,
    ) -> Result<LifecycleChange> {
        let sql = match outcome {
            LifecycleOutcome::PauseRequested => {
                "UPDATE instance SET pause_requested_by = $2, updated_at = clock_timestamp()
                 WHERE id = $1"
            }
            LifecycleOutcome::PauseWithdrawn => {
                "UPDATE instance SET pause_requested_by = NULL, updated_at = clock_timestamp()
                 WHERE id = $1"
            }
            // A stop supersedes a pending pause.
            _ => {
                "UPDATE instance SET stop_requested_by = $2, pause_requested_by = NULL,
                                     updated_at = clock_timestamp()
                 WHERE id = $1"
            }
        };
        sqlx::query(sql)
            .bind(row.id)
            .bind(self.actor)
            .execute(&mut *tx)
            .await?;
        let change = change_of(
            row,
            state,
            state,
            outcome,
            (row.step_seq, row.fence),
            self.actor,
            related,
        );
        self.record(tx, change, None).await
    }

    async fn pause(
        &mut self,
        tx: &mut sqlx::PgConnection,
        row: &Locked,
        from: InstanceState,
    ) -> Result<LifecycleChange> {
        let (step_seq, fence): (i64, i64) = sqlx::query_as(
            "UPDATE instance SET
                state = 'paused', paused_from = $2, paused_at = clock_timestamp(),
                paused_by = $3, pause_requested_by = NULL,
                fence = fence + 1, step_seq = step_seq + 1, ready_at = NULL,
                updated_at = clock_timestamp()
             WHERE id = $1
             RETURNING step_seq, fence",
        )
        .bind(row.id)
        .bind(from.as_str())
        .bind(self.actor)
        .fetch_one(&mut *tx)
        .await?;
        if from == InstanceState::Queued {
            self.dequeued.push(InstanceId(row.id));
        }
        let change = change_of(
            row,
            from,
            InstanceState::Paused,
            LifecycleOutcome::Paused,
            (step_seq, fence),
            self.actor,
            None,
        );
        self.record(tx, change, None).await
    }

    /// PAUSED → WAITING (its wait still pending), READY, or through admission when it holds
    /// no permit of a limited campaign (READY with one, or QUEUED).
    async fn unpause(
        &mut self,
        tx: &mut sqlx::PgConnection,
        row: &Locked,
    ) -> Result<LifecycleChange> {
        let needs_permit = row.limited && !row.holds_permit && row.parent_instance_id.is_none();
        let to = if row.still_waiting {
            InstanceState::Waiting
        } else if needs_permit {
            // Every instance of this transaction is locked already: the campaign lock comes
            // after them, as the semaphore's lock order wants.
            admit_unpaused(tx, row).await?
        } else {
            InstanceState::Ready
        };
        let (step_seq, fence): (i64, i64) = sqlx::query_as(
            "UPDATE instance SET
                state = $2, paused_from = NULL, paused_at = NULL, paused_by = NULL,
                pause_requested_by = NULL, step_seq = step_seq + 1,
                ready_at = CASE WHEN $2 = 'ready' THEN clock_timestamp() END,
                wake_at = CASE WHEN $2 = 'waiting' THEN wake_at END,
                wait_event = CASE WHEN $2 = 'waiting' THEN wait_event END,
                updated_at = clock_timestamp()
             WHERE id = $1
             RETURNING step_seq, fence",
        )
        .bind(row.id)
        .bind(to.as_str())
        .fetch_one(&mut *tx)
        .await?;
        let change = change_of(
            row,
            InstanceState::Paused,
            to,
            LifecycleOutcome::Unpaused,
            (step_seq, fence),
            self.actor,
            None,
        );
        self.record(tx, change, None).await
    }

    /// Stops `row` at once (or, for a running descendant under a graceful stop, asks it to
    /// stop), then its live descendants, top down; wakes a WAITING parent of each stopped one.
    async fn stop_tree(
        &mut self,
        tx: &mut sqlx::PgConnection,
        row: Locked,
        state: InstanceState,
    ) -> Result<LifecycleChange> {
        let root = self.stop_now(tx, &row, state, None).await?;
        let mut work: Vec<(Uuid, InstanceId)> = live_children(tx, row.id)
            .await?
            .into_iter()
            .map(|child| (child, root.id))
            .collect();
        let mut seen = 0;
        while let Some((id, cause)) = work.pop() {
            seen += 1;
            if seen > MAX_CALL_CHAIN {
                return Err(Error::Corrupt(format!(
                    "instance {} has more than {MAX_CALL_CHAIN} live descendants (a parent cycle?)",
                    root.id
                )));
            }
            let Some((child, child_state)) = lock(tx, id).await? else {
                continue;
            };
            let stop_requested = child.stop_requested_by.is_some();
            let change = match drover_core::lifecycle::decide_descendant(
                self.action,
                child_state,
                stop_requested,
            ) {
                Cascade::Skip => continue,
                Cascade::RequestStop => {
                    let outcome = LifecycleOutcome::StopRequested;
                    self.request(tx, &child, child_state, outcome, Some(cause))
                        .await?
                }
                Cascade::Stop => self.stop_now(tx, &child, child_state, Some(cause)).await?,
            };
            work.extend(
                live_children(tx, child.id)
                    .await?
                    .into_iter()
                    .map(|grandchild| (grandchild, change.id)),
            );
            self.batch.cascaded.push(change);
        }
        Ok(root)
    }

    /// STOPPED now: fenced (`fence + 1`, no owner), permit and queue place given back, a
    /// WAITING parent woken.
    async fn stop_now(
        &mut self,
        tx: &mut sqlx::PgConnection,
        row: &Locked,
        from: InstanceState,
        cause: Option<InstanceId>,
    ) -> Result<LifecycleChange> {
        let outcome = match self.action {
            LifecycleAction::Kill => LifecycleOutcome::Killed,
            _ => LifecycleOutcome::Stopped,
        };
        let (step_seq, fence): (i64, i64) = sqlx::query_as(
            "UPDATE instance SET
                state = 'stopped', owner_node = NULL, claimed_at = NULL, run_deadline = NULL,
                fence = fence + 1, step_seq = step_seq + 1, holds_permit = false,
                finished_at = clock_timestamp(), ready_at = NULL, wake_at = NULL,
                pause_requested_by = NULL, stop_requested_by = NULL,
                paused_from = NULL, paused_at = NULL, paused_by = NULL,
                updated_at = clock_timestamp()
             WHERE id = $1
             RETURNING step_seq, fence",
        )
        .bind(row.id)
        .fetch_one(&mut *tx)
        .await?;
        if row.holds_permit {
            self.released.push(InstanceId(row.id));
        }
        if from == InstanceState::Queued {
            self.dequeued.push(InstanceId(row.id));
        }
        let change = change_of(
            row,
            from,
            InstanceState::Stopped,
            outcome,
            (step_seq, fence),
            self.actor,
            cause,
        );
        let change = self.record(tx, change, row.owner_node).await?;
        if let Some(parent) = row.parent_instance_id {
            self.wake_parent(tx, parent, InstanceId(row.id)).await?;
        }
        Ok(change)
    }

    /// What a child's terminal commit does to its parent: `pending_children - 1`, and a parent
    /// WAITING for this child goes READY at the same step (journal `woken` by `child:<id>`).
    async fn wake_parent(
        &mut self,
        tx: &mut sqlx::PgConnection,
        parent: Uuid,
        child: InstanceId,
    ) -> Result<()> {
        let Some((row, state)) = lock(tx, parent).await? else {
            return Ok(());
        };
        if row.wait_child != Some(child.0) {
            return Ok(());
        }
        if state != InstanceState::Waiting {
            sqlx::query(
                "UPDATE instance SET pending_children = greatest(pending_children - 1, 0),
                                     updated_at = clock_timestamp()
                 WHERE id = $1",
            )
            .bind(parent)
            .execute(&mut *tx)
            .await?;
            return Ok(());
        }
        let (step_seq, fence): (i64, i64) = sqlx::query_as(
            "UPDATE instance SET
                state = 'ready', step_seq = step_seq + 1,
                pending_children = greatest(pending_children - 1, 0),
                wake_at = NULL, wait_event = NULL, ready_at = clock_timestamp(),
                updated_at = clock_timestamp()
             WHERE id = $1
             RETURNING step_seq, fence",
        )
        .bind(parent)
        .fetch_one(&mut *tx)
        .await?;
        let change = change_of(
            &row,
            InstanceState::Waiting,
            InstanceState::Ready,
            LifecycleOutcome::Woken,
            (step_seq, fence),
            &format!("child:{child}"),
            Some(child),
        );
        let change = self.record(tx, change, None).await?;
        self.batch.cascaded.push(change);
        Ok(())
    }

    /// Writes the change's journal row (when it took a checkpoint), its audit row (when an
    /// operator made it) and its events.
    async fn record(
        &self,
        tx: &mut sqlx::PgConnection,
        change: LifecycleChange,
        node: Option<Uuid>,
    ) -> Result<LifecycleChange> {
        write_change(tx, self.action.as_str(), &change, node, self.reason).await?;
        Ok(change)
    }
}

/// Journal row (unless the change is a request), audit row (unless a parent's wake) and events.
async fn write_change(
    tx: &mut sqlx::PgConnection,
    action: &str,
    change: &LifecycleChange,
    node: Option<Uuid>,
    reason: Option<&str>,
) -> Result<()> {
    use LifecycleOutcome as O;
    let journaled = !matches!(
        change.outcome,
        O::PauseRequested | O::PauseWithdrawn | O::StopRequested | O::Restarted
    );
    let audited = change.outcome != O::Woken;
    let details = json!({
        "outcome": change.outcome.as_str(),
        "from": change.from,
        "to": change.to,
        "step_id": change.current_step,
        "step_seq": change.step_seq,
        "fence": change.fence,
        "related": change.related,
    });
    let details = match (details, reason) {
        (Value::Object(mut map), Some(reason)) => {
            map.insert("reason".to_owned(), json!(reason));
            Value::Object(map)
        }
        (details, _) => details,
    };
    sqlx::query(
        "WITH j AS (
            INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                 attempt, node_id, actor, started_at, finished_at, output)
            SELECT $1, $2, current_step, $3, $4, $5, step_attempt, $6, $7,
                   clock_timestamp(), clock_timestamp(), $8
            FROM instance WHERE id = $1 AND $9
         )
         INSERT INTO audit (actor, action, target, details)
         SELECT $7, $10, $1::text, $8 WHERE $11",
    )
    .bind(change.id.0)
    .bind(change.step_seq.0)
    .bind(change.outcome.as_str())
    .bind(change.to.as_str())
    .bind(change.fence.0)
    .bind(node)
    .bind(&change.actor)
    .bind(details)
    .bind(journaled)
    .bind(action)
    .bind(audited)
    .execute(&mut *tx)
    .await?;
    insert_facts(tx, &change_facts(change)).await
}

fn change_of(
    row: &Locked,
    from: InstanceState,
    to: InstanceState,
    outcome: LifecycleOutcome,
    (step_seq, fence): (i64, i64),
    actor: &str,
    related: Option<InstanceId>,
) -> LifecycleChange {
    LifecycleChange {
        id: InstanceId(row.id),
        workflow: row.workflow.clone(),
        version: row.version,
        campaign: row.campaign.clone(),
        current_step: row.current_step.clone(),
        from,
        to,
        outcome,
        step_seq: StepSeq(step_seq),
        fence: Fence(fence),
        actor: actor.to_owned(),
        related,
        route: row.route.clone(),
    }
}

async fn live_children(tx: &mut sqlx::PgConnection, parent: Uuid) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM instance
         WHERE parent_instance_id = $1 AND state NOT IN ('completed', 'failed', 'stopped')
         ORDER BY id",
    )
    .bind(parent)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Admits one instance re-entering (or entering) `campaign`, with the semaphore's own
/// admission under the campaign's lock: a permit if one is free and nobody queues, else the
/// back of the queue; nothing for an unlimited campaign. The counters are written here; the
/// caller moves the instance row.
async fn admission(tx: &mut sqlx::PgConnection, campaign: i64) -> Result<Admission> {
    let mut locked = semaphore::lock_limited_campaigns(tx, &[campaign]).await?;
    let Some(locked_campaign) = locked.first_mut() else {
        return Ok(Admission::Free);
    };
    let admission = semaphore::admit_one(tx, locked_campaign).await?;
    semaphore::save_counters(tx, &locked).await?;
    Ok(admission)
}

/// Admits a paused instance being unpaused: gives it a permit (it will be READY) or a queue
/// place (QUEUED), with the permit event. Returns the state it goes to.
async fn admit_unpaused(tx: &mut sqlx::PgConnection, row: &Locked) -> Result<InstanceState> {
    let (state, kind, data) = match admission(tx, row.campaign_id).await? {
        Admission::Free => return Ok(InstanceState::Ready),
        Admission::Permit => {
            sqlx::query("UPDATE instance SET holds_permit = true WHERE id = $1")
                .bind(row.id)
                .execute(&mut *tx)
                .await?;
            (
                InstanceState::Ready,
                EventKind::Admitted,
                json!({ "state": "ready", "step": row.current_step, "step_seq": row.step_seq + 1 }),
            )
        }
        Admission::Queued(seq) => {
            sqlx::query(
                "UPDATE instance SET queue_seq = $2, queued_at = clock_timestamp() WHERE id = $1",
            )
            .bind(row.id)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            (
                InstanceState::Queued,
                EventKind::Queued,
                json!({ "state": "queued", "step": row.current_step, "queue_seq": seq }),
            )
        }
    };
    insert_facts(tx, &[NewFact::new(InstanceId(row.id), kind, data)]).await?;
    Ok(state)
}

/// Restarts one finished instance (see [`Store::restart`]), its row locked by the caller.
async fn restart_one(
    tx: &mut sqlx::PgConnection,
    restart: &Restart,
    actor: &str,
) -> Result<Restarted> {
    let Some((row, state)) = lock(tx, restart.from.0).await? else {
        return Ok(Restarted::Unknown);
    };
    let parent = row.parent_instance_id.map(InstanceId);
    if let Some(refusal) = drover_core::lifecycle::restart_refusal(state, parent) {
        return Ok(Restarted::Refused { state, refusal });
    }
    let earlier: Option<(Uuid,)> =
        sqlx::query_as("SELECT id FROM instance WHERE restarted_from = $1")
            .bind(row.id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((id,)) = earlier {
        return Ok(Restarted::Already { id: InstanceId(id) });
    }

    let (new_state, holds_permit, queue_seq) = match admission(tx, row.campaign_id).await? {
        Admission::Free => (InstanceState::Ready, false, None),
        Admission::Permit => (InstanceState::Ready, true, None),
        Admission::Queued(seq) => (InstanceState::Queued, false, Some(seq)),
    };
    let (created_at,): (DateTime<Utc>,) = sqlx::query_as(
        "INSERT INTO instance (id, campaign_id, workflow, version, state, holds_permit,
                               queue_seq, current_step, step_retryable, step_timeout_ms,
                               step_queue, step_handler, ready_at, queued_at, vars,
                               initial_vars, restarted_from)
         SELECT $1, campaign_id, workflow, version, $2, $3, $4, $5, $6, $7, $9, $10,
                CASE WHEN $2 = 'ready' THEN clock_timestamp() END,
                CASE WHEN $2 = 'queued' THEN clock_timestamp() END,
                initial_vars, initial_vars, id
         FROM instance WHERE id = $8
         RETURNING created_at",
    )
    .bind(restart.id.0)
    .bind(new_state.as_str())
    .bind(holds_permit)
    .bind(queue_seq)
    .bind(&restart.entry_step)
    .bind(restart.allow_retry)
    .bind(restart.timeout_ms)
    .bind(row.id)
    .bind(restart.route.queue.as_str())
    .bind(restart.route.handler.as_deref())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                             attempt, actor, started_at, finished_at, output)
         VALUES ($1, 0, $2, 'started', $3, 0, 1, $4, $5, $5, $6)",
    )
    .bind(restart.id.0)
    .bind(&restart.entry_step)
    .bind(new_state.as_str())
    .bind(actor)
    .bind(created_at)
    .bind(json!({ "restarted_from": restart.from }))
    .execute(&mut *tx)
    .await?;
    let started = LifecycleChange {
        id: restart.id,
        workflow: row.workflow.clone(),
        version: row.version,
        campaign: row.campaign.clone(),
        current_step: restart.entry_step.clone(),
        from: new_state,
        to: new_state,
        outcome: LifecycleOutcome::Started,
        step_seq: StepSeq(0),
        fence: Fence(0),
        actor: actor.to_owned(),
        related: Some(restart.from),
        route: restart.route.clone(),
    };
    let mut facts = change_facts(&started);
    if let Some(seq) = queue_seq {
        facts.push(NewFact::new(
            restart.id,
            EventKind::Queued,
            json!({ "state": "queued", "step": restart.entry_step, "queue_seq": seq }),
        ));
    }
    insert_facts(tx, &facts).await?;
    let restarted = change_of(
        &row,
        state,
        state,
        LifecycleOutcome::Restarted,
        (row.step_seq, row.fence),
        actor,
        Some(restart.id),
    );
    write_change(tx, "restart", &restarted, None, None).await?;
    Ok(Restarted::Started(started))
}
