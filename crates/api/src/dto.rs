//! The JSON the API speaks, with its OpenAPI schemas. Request types are shared with the typed
//! client ([`crate::ApiClient`]); responses are built from the store's rows.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use drover_core::{InstanceId, InstanceState, NodeId, StepSeq};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// What a deploy did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Deployment {
    pub name: String,
    pub version: i32,
    /// False when the definition equals the latest version: nothing was stored.
    pub created: bool,
}

impl From<drover_store::Deployed> for Deployment {
    fn from(d: drover_store::Deployed) -> Self {
        Self {
            name: d.name,
            version: d.version,
            created: d.created,
        }
    }
}

/// The pattern of every name: workflows, campaigns, events.
pub const SLUG_PATTERN: &str = "^[a-z0-9][a-z0-9_-]{0,62}$";

/// The latest version of a workflow.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WorkflowSummary {
    pub name: String,
    pub version: i32,
    /// Its first 200 characters (`GET /v1/workflows/{name}` shows the definition whole).
    pub description: Option<String>,
    /// How many steps the definition has.
    pub steps: i64,
    pub created_at: DateTime<Utc>,
}

impl From<drover_store::DefinitionSummary> for WorkflowSummary {
    fn from(d: drover_store::DefinitionSummary) -> Self {
        Self {
            name: d.name,
            version: d.version,
            description: d.description,
            steps: d.steps,
            created_at: d.created_at,
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    pub workflows: Vec<WorkflowSummary>,
}

/// One stored version of a workflow.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Workflow {
    pub name: String,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    /// The canonical JSON of the definition (defaults written out).
    #[schema(value_type = Object)]
    pub definition: Value,
    /// The source as deployed.
    pub source: String,
    /// When this version was deleted (`workflow delete`); absent while it is not. A deleted
    /// version starts nothing, but stays readable for the instances that ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
}

impl From<drover_store::StoredDefinition> for Workflow {
    fn from(d: drover_store::StoredDefinition) -> Self {
        Self {
            name: d.name,
            version: d.version,
            created_at: d.created_at,
            definition: d.body,
            source: d.source,
            deleted_at: d.deleted_at,
        }
    }
}

/// `?version=N` on `GET /v1/workflows/{name}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// A version number; the latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(nullable = false)]
    pub version: Option<i32>,
}

/// The schema of an instance state: its lowercase name.
pub struct InstanceStateSchema;

impl PartialSchema for InstanceStateSchema {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("Where an instance is in its life."))
            .enum_values(Some(InstanceState::ALL.iter().map(|state| state.as_str())))
            .into()
    }
}

impl ToSchema for InstanceStateSchema {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("InstanceState")
    }
}

/// A workflow instance.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Instance {
    #[schema(value_type = String, format = Uuid)]
    pub id: InstanceId,
    pub workflow: String,
    /// The definition version the instance is pinned to.
    pub version: i32,
    pub campaign: String,
    #[schema(value_type = InstanceStateSchema)]
    pub state: InstanceState,
    pub current_step: String,
    /// The checkpoint: +1 at every journaled transition; 0 at start.
    #[schema(value_type = i64)]
    pub step_seq: StepSeq,
    /// Attempt of the current step, from 1.
    pub step_attempt: i32,
    #[schema(value_type = Object)]
    pub vars: Value,
    pub error: Option<String>,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub parent_instance_id: Option<InstanceId>,
    pub call_depth: i32,
    /// The node running the current step, while `running`.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub owner_node: Option<NodeId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What a `waiting` instance waits for (the first to come wakes it); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingFor>,
    /// Whether it holds one of its campaign's permits (a limited campaign's running slots).
    pub holds_permit: bool,
    /// A `queued` instance's place in its campaign's queue, 1 = admitted next; absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i64>,
}

/// What wakes a `waiting` instance.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WaitingFor {
    /// Its timer: a `sleep`'s end, or a `wait_event`'s timeout.
    pub wake_at: Option<DateTime<Utc>>,
    /// The event (`POST /v1/instances/{id}/events/{name}`) of its `wait_event` step.
    pub event: Option<String>,
    /// The child instance of its `subworkflow` step.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub child: Option<InstanceId>,
}

impl From<drover_store::Instance> for Instance {
    fn from(i: drover_store::Instance) -> Self {
        let waiting_for = (i.state == InstanceState::Waiting).then(|| WaitingFor {
            wake_at: i.wake_at,
            event: i.wait_event.clone(),
            child: i.wait_child,
        });
        Self {
            id: i.id,
            workflow: i.workflow,
            version: i.version,
            campaign: i.campaign,
            state: i.state,
            current_step: i.current_step,
            step_seq: i.step_seq,
            step_attempt: i.step_attempt,
            vars: i.vars,
            error: i.error,
            parent_instance_id: i.parent_instance_id,
            call_depth: i.call_depth,
            owner_node: i.owner_node,
            created_at: i.created_at,
            updated_at: i.updated_at,
            finished_at: i.finished_at,
            waiting_for,
            holds_permit: i.holds_permit,
            queue_position: i.queue_position,
        }
    }
}

/// A workflow instance as listings show it: no `vars` unless asked for (`include=vars`),
/// `error` cut to its first 1000 characters.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct InstanceSummary {
    #[schema(value_type = String, format = Uuid)]
    pub id: InstanceId,
    pub workflow: String,
    /// The definition version the instance is pinned to.
    pub version: i32,
    pub campaign: String,
    #[schema(value_type = InstanceStateSchema)]
    pub state: InstanceState,
    pub current_step: String,
    /// The checkpoint: +1 at every journaled transition; 0 at start.
    #[schema(value_type = i64)]
    pub step_seq: StepSeq,
    /// Attempt of the current step, from 1.
    pub step_attempt: i32,
    /// Only with `include=vars`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub vars: Option<Value>,
    /// The first 1000 characters of the error (`GET /v1/instances/{id}` shows it whole).
    pub error: Option<String>,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub parent_instance_id: Option<InstanceId>,
    pub call_depth: i32,
    /// The node running the current step, while `running`.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub owner_node: Option<NodeId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// What a `waiting` instance waits for; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub waiting_for: Option<WaitingFor>,
    /// Whether it holds one of its campaign's permits.
    pub holds_permit: bool,
    /// A `queued` instance's place in its campaign's queue, 1 = admitted next; absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub queue_position: Option<i64>,
}

impl From<drover_store::InstanceSummary> for InstanceSummary {
    fn from(i: drover_store::InstanceSummary) -> Self {
        let waiting_for = (i.state == InstanceState::Waiting).then(|| WaitingFor {
            wake_at: i.wake_at,
            event: i.wait_event.clone(),
            child: i.wait_child,
        });
        Self {
            id: i.id,
            workflow: i.workflow,
            version: i.version,
            campaign: i.campaign,
            state: i.state,
            current_step: i.current_step,
            step_seq: i.step_seq,
            step_attempt: i.step_attempt,
            vars: i.vars,
            error: i.error,
            parent_instance_id: i.parent_instance_id,
            call_depth: i.call_depth,
            owner_node: i.owner_node,
            created_at: i.created_at,
            updated_at: i.updated_at,
            finished_at: i.finished_at,
            waiting_for,
            holds_permit: i.holds_permit,
            queue_position: i.queue_position,
        }
    }
}

/// A page of instances.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct InstanceList {
    /// Newest first.
    pub instances: Vec<InstanceSummary>,
    /// Present when more instances match: pass it as `before` for the next page. A page ends
    /// at `limit` instances or, with `include=vars`, once their vars reach 4 MiB of JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid, nullable = false)]
    pub next: Option<InstanceId>,
}

/// What `GET /v1/instances` adds to each instance's summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListInclude {
    /// Each instance's variables.
    Vars,
}

/// Which instances `GET /v1/instances` lists, newest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only instances in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<InstanceStateSchema>, nullable = false)]
    pub state: Option<String>,
    /// Only instances of this campaign (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", nullable = false)]
    pub campaign: Option<String>,
    /// Only instances of this workflow (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", nullable = false)]
    pub workflow: Option<String>,
    /// Only the children of this instance (the sub-workflow instances it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(format = Uuid, nullable = false)]
    pub parent: Option<String>,
    /// At most this many: 100 when absent; a larger value than 1000 lists 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, nullable = false)]
    pub limit: Option<i64>,
    /// Only instances created before this one: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(format = Uuid, nullable = false)]
    pub before: Option<String>,
    /// `vars`: list each instance's variables too (a page then stops at 4 MiB of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(nullable = false)]
    pub include: Option<ListInclude>,
}

/// Which entries `GET /v1/instances/{id}/journal` gives, in checkpoint order.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JournalQuery {
    /// At most this many: 100 when absent; a larger value than 1000 gives 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, nullable = false)]
    pub limit: Option<i64>,
    /// Only entries after this checkpoint: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(minimum = 0, nullable = false)]
    pub after: Option<i64>,
}

/// One journaled transition of an instance.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct JournalEntry {
    #[schema(value_type = i64)]
    pub step_seq: StepSeq,
    pub step_id: String,
    /// What happened to the step: `started`, `completed`, `retry`, `failed`, `error`, …
    pub outcome: String,
    /// Where it left the instance: the next step, or a state.
    pub transition: Option<String>,
    pub attempt: i32,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub node_id: Option<NodeId>,
    /// Who made the transition when it was not a worker (`api`, an operator, …).
    pub actor: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Any JSON: what the step returned (an event's payload, a handler's result, …).
    #[schema(value_type = Option<serde_json::Value>)]
    pub output: Option<Value>,
    pub error: Option<String>,
}

impl From<drover_store::JournalEntry> for JournalEntry {
    fn from(e: drover_store::JournalEntry) -> Self {
        Self {
            step_seq: e.step_seq,
            step_id: e.step_id,
            outcome: e.outcome,
            transition: e.transition,
            attempt: e.attempt,
            node_id: e.node_id,
            actor: e.actor,
            started_at: e.started_at,
            finished_at: e.finished_at,
            output: e.output,
            error: e.error,
        }
    }
}

/// A page of an instance's journal.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Journal {
    #[schema(value_type = String, format = Uuid)]
    pub instance: InstanceId,
    /// In checkpoint order, entry 0 (`started`) first.
    pub entries: Vec<JournalEntry>,
    /// Present when more entries follow: pass it as `after` for the next page. A page ends
    /// at `limit` entries or once their outputs and errors reach 4 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>, nullable = false)]
    pub next: Option<StepSeq>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Campaign {
    pub name: String,
    /// How many instances may run at once; unlimited when absent.
    pub max_running: Option<i32>,
    /// Permits in use (instances admitted and not finished); for an unlimited campaign (in
    /// `GET /v1/campaigns` and `GET /v1/campaigns/{name}`), its ready, running and waiting
    /// instances.
    pub running: i32,
    pub queued: i32,
    /// Whether an `in_error` instance keeps its permit (`hold`) or gives it back (`release`).
    pub on_error_permit: String,
    /// When the head of its queue was queued; absent when nothing queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_at: Option<DateTime<Utc>>,
    /// How long the head of its queue has waited, in milliseconds; absent when nothing queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_age_ms: Option<i64>,
    /// When it was paused (`campaign pause`: it admits nothing until unpaused); absent while
    /// it is not paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<DateTime<Utc>>,
    /// Who paused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_by: Option<String>,
}

impl From<drover_store::Campaign> for Campaign {
    fn from(c: drover_store::Campaign) -> Self {
        Self {
            name: c.name,
            max_running: c.max_running,
            running: c.running,
            queued: c.queued,
            on_error_permit: c.on_error_permit,
            oldest_queued_at: None,
            oldest_queued_age_ms: None,
            paused_at: c.paused_at,
            paused_by: c.paused_by,
        }
    }
}

impl From<drover_store::CampaignStatus> for Campaign {
    fn from(s: drover_store::CampaignStatus) -> Self {
        Self {
            oldest_queued_at: s.oldest_queued_at,
            oldest_queued_age_ms: s.oldest_queued_age_ms,
            ..s.campaign.into()
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CampaignList {
    pub campaigns: Vec<Campaign>,
}

/// What an instance that goes `in_error` does with its campaign permit.
#[derive(Clone, Copy, Debug, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the wire form is a string, parsed by the store
pub(crate) enum OnErrorPermitName {
    /// Give it back: the next queued instance starts; the instance re-queues when resumed.
    Release,
    /// Keep it while `in_error`.
    Hold,
}

/// The status of a node.
#[derive(Clone, Copy, Debug, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documentation only: the wire form is the store's string
pub(crate) enum NodeStatusName {
    Alive,
    Draining,
    Dead,
}

/// A node process of the cluster.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Node {
    #[schema(value_type = String, format = Uuid)]
    pub id: NodeId,
    pub roles: Vec<String>,
    /// The worker queues it serves (none without the worker role).
    pub queues: Vec<String>,
    /// The handlers its worker registered.
    pub handlers: Vec<String>,
    pub host: String,
    pub version: String,
    /// `alive`, `draining`, `dead` (declared dead by the leader) or `left` (stopped gracefully).
    #[schema(value_type = NodeStatusName)]
    pub status: String,
    pub heartbeat_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub died_at: Option<DateTime<Utc>>,
    /// Steps it was running at its last heartbeat.
    pub in_flight: i32,
    /// Resident memory of the node process at its last heartbeat, in bytes.
    pub rss_bytes: i64,
}

impl From<drover_store::Node> for Node {
    fn from(n: drover_store::Node) -> Self {
        Self {
            id: n.id,
            roles: n.roles,
            queues: n.queues.into_iter().map(String::from).collect(),
            handlers: n.handlers,
            host: n.host,
            version: n.version,
            status: n.status,
            heartbeat_at: n.heartbeat_at,
            started_at: n.started_at,
            died_at: n.died_at,
            in_flight: n.in_flight,
            rss_bytes: n.rss_bytes,
        }
    }
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<Node>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Stats {
    /// Instances per state, every state present (zeros included), in life-cycle order.
    #[schema(value_type = std::collections::BTreeMap<String, i64>)]
    pub instances: StateCounts,
}

/// Counts per state; serialized as a JSON object in the order given.
#[derive(Clone, Debug, Default)]
pub struct StateCounts(pub Vec<(InstanceState, i64)>);

impl Serialize for StateCounts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (state, count) in &self.0 {
            map.serialize_entry(state.as_str(), count)?;
        }
        map.end()
    }
}

/// What `/readyz` found.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub checks: ReadinessChecks,
    /// `on`, or `off` when the node runs with `--auth off`.
    pub auth: String,
    /// E.g. that authentication is off.
    pub warnings: Vec<String>,
}

/// Each dependency: `ok`, or why not.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadinessChecks {
    pub postgres: String,
    pub nats: String,
}

/// For `#[serde(deserialize_with)]`: an integer JSON may write as `3` or `3.0` (JSON Schema's
/// `integer` takes both); `3.5` and values out of `T`'s range are refused.
pub(crate) fn integral<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    let number = serde_json::Number::deserialize(deserializer)?;
    integer_of(&number)
}

/// [`integral`] for an optional field (use with `#[serde(default)]`).
pub(crate) fn optional_integral<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(number) => integer_of(&number).map(Some),
    }
}

fn integer_of<E: serde::de::Error, T: TryFrom<i64>>(number: &serde_json::Number) -> Result<T, E> {
    let integer = match number.as_i64() {
        Some(integer) => Some(integer),
        None => number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (i64::MIN as f64..i64::MAX as f64).contains(f))
            // Exact: the value is integral and within range.
            .map(|f| f as i64),
    };
    let Some(integer) = integer else {
        return Err(E::custom(format!("expected an integer, not {number}")));
    };
    T::try_from(integer).map_err(|_| E::custom(format!("{integer} is out of range")))
}
