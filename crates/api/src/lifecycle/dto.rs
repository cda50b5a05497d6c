//! The lifecycle commands' requests and answers.

use std::collections::BTreeMap;

use drover_core::{InstanceId, InstanceState};
use drover_store::LifecycleAction;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dto::{Instance, InstanceStateSchema};

/// The body of a command on one instance: an empty object, or no body at all. (The actor of
/// the journal and audit rows is the request's token.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleRequest {}

/// Which instances a command applies to. At least one of `campaign`, `workflow`
/// and `state` is required. Without `state`, the command applies to the instances it can act
/// on: those not finished (pause, stop, kill), paused or asked to pause (unpause), or finished
/// (restart).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleFilterRequest {
    /// Only instances of this campaign (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// Only instances of this workflow (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Only instances in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<InstanceStateSchema>)]
    pub state: Option<String>,
}

/// What a command did to one instance.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LifecycleResult {
    /// The instance the command was given.
    #[schema(value_type = String, format = Uuid)]
    pub id: InstanceId,
    /// `pause`, `unpause`, `stop`, `kill` or `restart`.
    pub action: String,
    /// What happened: `paused`, `pause_requested` (running: it pauses when its step
    /// finishes), `unpaused`, `pause_withdrawn`, `stop_requested`, `stopped`, `killed`,
    /// `restarted`; `unchanged` when it was so already.
    pub outcome: String,
    /// False for a no-op.
    pub changed: bool,
    /// The state the command left the instance in (for a restart: the new instance's). It
    /// may have moved on since (a worker claims an unpaused instance at once): `instance` is
    /// as read after the command.
    #[schema(value_type = InstanceStateSchema)]
    pub state: InstanceState,
    /// For a restart: the new instance (the one started now, or by an earlier restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub restarted_as: Option<InstanceId>,
    /// Other instances it changed: descendants stopped with it, a parent its stop woke.
    pub cascaded: Vec<Cascaded>,
    /// QUEUED instances of its campaign admitted with the permit it released.
    #[schema(value_type = Vec<String>)]
    pub admitted: Vec<InstanceId>,
    /// The instance afterwards (for a restart: the new one).
    pub instance: Instance,
}

/// An instance changed along with the one a command was given.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Cascaded {
    #[schema(value_type = String, format = Uuid)]
    pub id: InstanceId,
    /// `stopped`, `killed`, `stop_requested` or `woken`.
    pub outcome: String,
    #[schema(value_type = InstanceStateSchema)]
    pub state: InstanceState,
}

/// What a command did to the instances of a filter.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct LifecycleSummary {
    pub action: String,
    /// Instances the filter selected.
    pub matched: u64,
    /// Instances the command changed.
    pub changed: u64,
    /// Instances that were so already.
    pub unchanged: u64,
    /// Instances whose state does not allow the command.
    pub refused: u64,
    /// How many of each outcome (`paused`, `pause_requested`, …, `unchanged`, `refused`).
    pub outcomes: BTreeMap<String, u64>,
    /// Other instances changed along (descendants stopped, parents woken).
    pub cascaded: u64,
    /// QUEUED instances admitted with the permits the command released.
    pub admitted: u64,
    /// The first refusals, each with its reason.
    pub refusals: Vec<RefusalEntry>,
    /// For a restart: the new instances, in the order of the instances they restart.
    #[schema(value_type = Vec<String>)]
    pub started: Vec<InstanceId>,
}

/// One instance a filter command did not apply to.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RefusalEntry {
    #[schema(value_type = String, format = Uuid)]
    pub id: InstanceId,
    #[schema(value_type = InstanceStateSchema)]
    pub state: InstanceState,
    /// The error code a single-instance command would answer with.
    pub code: String,
    pub message: String,
}

/// A lifecycle command: the last segment of its route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleCommand {
    Pause,
    Unpause,
    Stop,
    Kill,
    Restart,
}

impl LifecycleCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Unpause => "unpause",
            Self::Stop => "stop",
            Self::Kill => "kill",
            Self::Restart => "restart",
        }
    }

    /// The store's action; `None` for a restart (which makes a new instance instead).
    pub(super) fn action(self) -> Option<LifecycleAction> {
        match self {
            Self::Pause => Some(LifecycleAction::Pause),
            Self::Unpause => Some(LifecycleAction::Unpause),
            Self::Stop => Some(LifecycleAction::Stop),
            Self::Kill => Some(LifecycleAction::Kill),
            Self::Restart => None,
        }
    }
}
