//! Lifecycle commands: `POST /v1/instances/{id}/{pause|unpause|stop|kill|restart}` for one
//! instance and `POST /v1/instances/{pause|unpause|stop|kill|restart}` with a filter body for
//! many.
//!
//! The store applies each command in one transaction per batch (see `drover_store`'s
//! lifecycle module for what each does in each state); the jobs of instances made READY
//! (unpaused, woken parents, queued instances admitted with a freed permit, restarts) are
//! published after the commit. A failed publish is logged: the sweeper re-dispatches READY
//! instances.
//!
//! A command that finds the instance where it leads already is a no-op success
//! (`changed: false`); one the instance's state does not allow is a 409 naming why and what to
//! do instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::{Extension, Json};
use drover_bus::Bus;
use drover_core::{Definition, InstanceId, InstanceState, StepJob};
use drover_store::{
    Acted, LifecycleAction, LifecycleBatch, LifecycleChange, LifecycleFilter, Refusal, Restart,
    Restarted,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::dto::{Instance, InstanceStateSchema};
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiPath, decode_optional_json};
use crate::operator::definition_of;
use crate::routes::{parse_id, unknown_instance};

/// Instances per transaction when a command applies to a filter.
pub const LIFECYCLE_BATCH: i64 = 200;
/// Refusals a filter command lists (it counts them all).
pub(crate) const MAX_LISTED_REFUSALS: usize = 100;

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
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
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
#[derive(Clone, Debug, Serialize, ToSchema)]
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
    fn action(self) -> Option<LifecycleAction> {
        match self {
            Self::Pause => Some(LifecycleAction::Pause),
            Self::Unpause => Some(LifecycleAction::Unpause),
            Self::Stop => Some(LifecycleAction::Stop),
            Self::Kill => Some(LifecycleAction::Kill),
            Self::Restart => None,
        }
    }
}

macro_rules! one_instance_route {
    ($name:ident, $command:expr, $path:literal, $summary:literal, $ok:literal, $conflict:literal) => {
        #[doc = $summary]
        #[utoipa::path(
            post,
            path = $path,
            tag = "instances",
            params(("id" = String, Path, format = Uuid, description = "The instance id")),
            request_body(content = Option<LifecycleRequest>, description = "Optional: an empty object"),
            responses(
                (status = 200, description = $ok, body = LifecycleResult),
                (status = 400, description = "Malformed id or JSON", body = ErrorBody),
                (status = 404, description = "Unknown instance", body = ErrorBody),
                (status = 409, description = $conflict, body = ErrorBody),
            )
        )]
        pub(crate) async fn $name(
            State(state): State<ApiState>,
            Extension(principal): Extension<Principal>,
            ApiPath(id): ApiPath<String>,
            body: Bytes,
        ) -> Result<Json<LifecycleResult>> {
            let LifecycleRequest {} = optional_json(&body)?;
            one(&state, $command, &id, &principal.name).await.map(Json)
        }
    };
}

macro_rules! filter_route {
    ($name:ident, $command:expr, $path:literal, $summary:literal) => {
        #[doc = $summary]
        #[utoipa::path(
            post,
            path = $path,
            tag = "instances",
            request_body = LifecycleFilterRequest,
            responses(
                (status = 200, description = "Applied to each matching instance, in \
                    transactions of 200; counts and the first refusals", body = LifecycleSummary),
                (status = 400, description = "Malformed JSON", body = ErrorBody),
                (status = 404, description = "Unknown campaign", body = ErrorBody),
                (status = 422, description = "No filter given, or an unknown state", body = ErrorBody),
            )
        )]
        pub(crate) async fn $name(
            State(state): State<ApiState>,
            Extension(principal): Extension<Principal>,
            body: Bytes,
        ) -> Result<Json<LifecycleSummary>> {
            let request: LifecycleFilterRequest = optional_json(&body)?;
            many(&state, $command, request, &principal.name).await.map(Json)
        }
    };
}

one_instance_route!(
    pause,
    LifecycleCommand::Pause,
    "/v1/instances/{id}/pause",
    "Pause an instance: QUEUED, READY or WAITING ones at once (keeping their permit), a \
     RUNNING one once its step finishes.",
    "Paused, or a pause requested (`pause_requested`), or paused already",
    "`finished`, `in_error`, or `stopping` (a stop is pending: kill it instead)"
);
one_instance_route!(
    unpause,
    LifecycleCommand::Unpause,
    "/v1/instances/{id}/unpause",
    "Unpause an instance: READY (its job dispatched), QUEUED when it has no permit and its \
     campaign is full, or WAITING if it was waiting and nothing has woken it; a pending pause \
     request of a RUNNING instance is withdrawn.",
    "Unpaused (or not paused: nothing to do)",
    "`finished`, `in_error`, or `running` (running, no pause requested)"
);
one_instance_route!(
    stop,
    LifecycleCommand::Stop,
    "/v1/instances/{id}/stop",
    "Stop an instance gracefully: a RUNNING one once its step finishes, any other at once \
     (its permit released, its live descendants stopped).",
    "Stopped, a stop requested (`stop_requested`), or stopped already",
    "`finished` (completed or failed)"
);
one_instance_route!(
    kill,
    LifecycleCommand::Kill,
    "/v1/instances/{id}/kill",
    "Stop an instance at once, whatever its node is doing: fenced (a running step's commit is \
     rejected), STOPPED, its permit released, its live descendants killed.",
    "Killed, or stopped already",
    "`finished` (completed or failed)"
);
one_instance_route!(
    restart,
    LifecycleCommand::Restart,
    "/v1/instances/{id}/restart",
    "Restart a finished instance: a new instance of the same definition version and initial \
     variables in the same campaign, admitted like any start. Once per instance: again \
     answers the first restart.",
    "Restarted (`instance` is the new one), or restarted before (`changed: false`)",
    "`not_finished` (stop or kill it first) or `child_instance` (restart its parent)"
);

filter_route!(
    pause_many,
    LifecycleCommand::Pause,
    "/v1/instances/pause",
    "Pause the instances of a filter."
);
filter_route!(
    unpause_many,
    LifecycleCommand::Unpause,
    "/v1/instances/unpause",
    "Unpause the instances of a filter."
);
filter_route!(
    stop_many,
    LifecycleCommand::Stop,
    "/v1/instances/stop",
    "Stop the instances of a filter gracefully."
);
filter_route!(
    kill_many,
    LifecycleCommand::Kill,
    "/v1/instances/kill",
    "Kill the instances of a filter."
);
filter_route!(
    restart_many,
    LifecycleCommand::Restart,
    "/v1/instances/restart",
    "Restart the finished instances of a filter."
);

/// A JSON body that may be empty or `null` (then `T::default()`), checked as every body is
/// ([`decode_optional_json`]).
fn optional_json<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T> {
    decode_optional_json(body)
}

async fn one(
    state: &ApiState,
    command: LifecycleCommand,
    id: &str,
    actor: &str,
) -> Result<LifecycleResult> {
    let id = parse_id(id)?;
    let Some(action) = command.action() else {
        return restart_one(state, id, actor).await;
    };
    let batch = apply(state, action, &[id], actor).await?;
    let (outcome, changed, left_in) = match batch.results.first().map(|(_, acted)| acted) {
        None | Some(Acted::Unknown) => return Err(unknown_instance(id)),
        Some(Acted::Refused { state, refusal }) => {
            return Err(refused(command, id, *state, refusal));
        }
        Some(Acted::Unchanged(state)) => ("unchanged".to_owned(), false, *state),
        Some(Acted::Changed(change)) => (change.outcome.as_str().to_owned(), true, change.to),
    };
    if changed {
        tracing::info!(
            instance.id = %id,
            action = action.as_str(),
            %outcome,
            %actor,
            cascaded = batch.cascaded.len(),
            admitted = batch.admitted.len(),
            "lifecycle command applied"
        );
    }
    let instance = state
        .store
        .get_instance(id)
        .await?
        .ok_or_else(|| unknown_instance(id))?;
    Ok(LifecycleResult {
        id,
        action: action.as_str().to_owned(),
        outcome,
        changed,
        state: left_in,
        restarted_as: None,
        cascaded: batch.cascaded.iter().map(cascaded).collect(),
        admitted: batch.admitted.iter().map(|a| a.id).collect(),
        instance: instance.into(),
    })
}

async fn restart_one(state: &ApiState, id: InstanceId, actor: &str) -> Result<LifecycleResult> {
    let mut definitions = HashMap::new();
    let Some(plan) = plan_restart(state, id, &mut definitions).await? else {
        return Err(unknown_instance(id));
    };
    let restarted = restart_all(state, &[plan], actor)
        .await?
        .into_iter()
        .next()
        .map(|(_, restarted)| restarted)
        .unwrap_or(Restarted::Unknown);
    let (new, changed) = match restarted {
        Restarted::Unknown => return Err(unknown_instance(id)),
        Restarted::Refused { state, refusal } => {
            return Err(refused(LifecycleCommand::Restart, id, state, &refusal));
        }
        Restarted::Already { id: new } => (new, false),
        Restarted::Started(change) => {
            tracing::info!(instance.id = %id, restarted_as = %change.id, %actor, "instance restarted");
            (change.id, true)
        }
    };
    let instance = state
        .store
        .get_instance(new)
        .await?
        .ok_or_else(|| unknown_instance(new))?;
    Ok(LifecycleResult {
        id,
        action: "restart".to_owned(),
        outcome: if changed { "restarted" } else { "unchanged" }.to_owned(),
        changed,
        state: instance.state,
        restarted_as: Some(new),
        cascaded: Vec::new(),
        admitted: Vec::new(),
        instance: instance.into(),
    })
}

/// Decides a restart of `id` from its definition version's entry step; `None` for an unknown
/// instance. Whether it may be restarted is the store's to decide, under the row lock.
async fn plan_restart(
    state: &ApiState,
    id: InstanceId,
    definitions: &mut HashMap<(String, i32), Arc<Definition>>,
) -> Result<Option<Restart>> {
    let Some(instance) = state.store.get_instance(id).await? else {
        return Ok(None);
    };
    let key = (instance.workflow.clone(), instance.version);
    let definition = match definitions.get(&key) {
        Some(definition) => Arc::clone(definition),
        None => {
            let definition = Arc::new(definition_of(state, &instance).await?);
            definitions.insert(key, Arc::clone(&definition));
            definition
        }
    };
    let entry = definition.entry();
    Ok(Some(Restart {
        from: id,
        id: InstanceId::new(),
        entry_step: entry.id.clone(),
        allow_retry: entry.allow_retry,
        timeout_ms: entry.timeout_ms(),
        route: definition.route(entry),
    }))
}

async fn many(
    state: &ApiState,
    command: LifecycleCommand,
    request: LifecycleFilterRequest,
    actor: &str,
) -> Result<LifecycleSummary> {
    if request.campaign.is_none() && request.workflow.is_none() && request.state.is_none() {
        return Err(ApiError::invalid(
            "invalid_request",
            format!(
                "give at least one of campaign, workflow and state: {} applies to every \
                 instance they select",
                command.as_str()
            ),
        ));
    }
    let instance_state = request
        .state
        .as_deref()
        .map(str::parse::<InstanceState>)
        .transpose()
        .map_err(|err| ApiError::invalid("invalid_request", err.to_string()))?;
    if let Some(campaign) = &request.campaign
        && state.store.campaign_by_name(campaign).await?.is_none()
    {
        return Err(ApiError::not_found(
            "unknown_campaign",
            format!("unknown campaign {campaign:?}"),
        ));
    }
    let filter = LifecycleFilter {
        campaign: request.campaign,
        workflow: request.workflow,
        state: instance_state,
    };

    let mut summary = LifecycleSummary {
        action: command.as_str().to_owned(),
        ..Default::default()
    };
    let mut definitions = HashMap::new();
    let mut after = None;
    loop {
        let ids = state
            .store
            .lifecycle_targets(&filter, command.action(), after, LIFECYCLE_BATCH)
            .await?;
        let Some(last) = ids.last().copied() else {
            break;
        };
        after = Some(last);
        summary.matched += ids.len() as u64;
        match command.action() {
            Some(action) => {
                let batch = apply(state, action, &ids, actor).await?;
                summary.cascaded += batch.cascaded.len() as u64;
                summary.admitted += batch.admitted.len() as u64;
                for (id, acted) in &batch.results {
                    tally(&mut summary, command, *id, acted.into());
                }
            }
            None => {
                let mut restarts = Vec::with_capacity(ids.len());
                for id in &ids {
                    if let Some(restart) = plan_restart(state, *id, &mut definitions).await? {
                        restarts.push(restart);
                    }
                }
                for (id, restarted) in &restart_all(state, &restarts, actor).await? {
                    if let Restarted::Started(change) = restarted {
                        summary.started.push(change.id);
                    }
                    tally(&mut summary, command, *id, restarted.into());
                }
            }
        }
        if (ids.len() as i64) < LIFECYCLE_BATCH {
            break;
        }
    }
    tracing::info!(
        action = command.as_str(),
        matched = summary.matched,
        changed = summary.changed,
        unchanged = summary.unchanged,
        refused = summary.refused,
        admitted = summary.admitted,
        %actor,
        "lifecycle command applied by filter"
    );
    Ok(summary)
}

/// What a command did to one instance of a filter, for the counts.
enum Tally<'a> {
    Changed(&'a str),
    Unchanged,
    Refused(InstanceState, &'a Refusal),
    /// Deleted between the listing and the command: not there to act on.
    Gone,
}

impl<'a> From<&'a Acted> for Tally<'a> {
    fn from(acted: &'a Acted) -> Self {
        match acted {
            Acted::Changed(change) => Tally::Changed(change.outcome.as_str()),
            Acted::Unchanged(_) => Tally::Unchanged,
            Acted::Refused { state, refusal } => Tally::Refused(*state, refusal),
            Acted::Unknown => Tally::Gone,
        }
    }
}

impl<'a> From<&'a Restarted> for Tally<'a> {
    fn from(restarted: &'a Restarted) -> Self {
        match restarted {
            Restarted::Started(_) => Tally::Changed("restarted"),
            Restarted::Already { .. } => Tally::Unchanged,
            Restarted::Refused { state, refusal } => Tally::Refused(*state, refusal),
            Restarted::Unknown => Tally::Gone,
        }
    }
}

fn tally(
    summary: &mut LifecycleSummary,
    command: LifecycleCommand,
    id: InstanceId,
    done: Tally<'_>,
) {
    let outcome = match done {
        Tally::Changed(outcome) => {
            summary.changed += 1;
            outcome
        }
        Tally::Unchanged => {
            summary.unchanged += 1;
            "unchanged"
        }
        Tally::Refused(state, refusal) => {
            summary.refused += 1;
            if summary.refusals.len() < MAX_LISTED_REFUSALS {
                let err = refused(command, id, state, refusal);
                let code = match &err {
                    ApiError::Conflict { code, .. } => (*code).to_owned(),
                    _ => "refused".to_owned(),
                };
                summary.refusals.push(RefusalEntry {
                    id,
                    state,
                    code,
                    message: err.to_string(),
                });
            }
            "refused"
        }
        Tally::Gone => {
            summary.matched = summary.matched.saturating_sub(1);
            return;
        }
    };
    *summary.outcomes.entry(outcome.to_owned()).or_default() += 1;
}

/// Restarts as `restarts` plan and publishes the new READY instances' jobs.
async fn restart_all(
    state: &ApiState,
    restarts: &[Restart],
    actor: &str,
) -> Result<Vec<(InstanceId, Restarted)>> {
    let results = state.store.restart(restarts, actor).await?;
    let jobs = results
        .iter()
        .filter_map(|(_, restarted)| match restarted {
            Restarted::Started(change) => change.job(),
            _ => None,
        })
        .collect();
    publish(&state.bus, jobs).await;
    Ok(results)
}

/// Applies `action` to `ids` and publishes the jobs it made.
async fn apply(
    state: &ApiState,
    action: LifecycleAction,
    ids: &[InstanceId],
    actor: &str,
) -> Result<LifecycleBatch> {
    let batch = state.store.apply_lifecycle(action, ids, actor).await?;
    publish(&state.bus, batch.jobs()).await;
    Ok(batch)
}

async fn publish(bus: &Bus, jobs: Vec<StepJob>) {
    if jobs.is_empty() {
        return;
    }
    if let Err(err) = bus.publish_jobs(&jobs).await {
        tracing::warn!(
            jobs = jobs.len(),
            %err,
            "publishing the jobs of a lifecycle command failed; the sweeper will re-dispatch"
        );
    }
}

fn cascaded(change: &LifecycleChange) -> Cascaded {
    Cascaded {
        id: change.id,
        outcome: change.outcome.as_str().to_owned(),
        state: change.to,
    }
}

/// The 409 of a command the instance's state does not allow.
fn refused(
    command: LifecycleCommand,
    id: InstanceId,
    state: InstanceState,
    refusal: &Refusal,
) -> ApiError {
    let action = command.as_str();
    let (code, message) = match refusal {
        Refusal::Finished => (
            "finished",
            format!(
                "cannot {action} instance {id}: it has finished ({state}); only restart applies \
                 to a finished instance (`drover restart {id}`)"
            ),
        ),
        Refusal::InError => (
            "in_error",
            format!(
                "cannot {action} instance {id}: it is in_error and waits for an operator \
                 already; resume it (`drover resume {id} --current-step` or `--next-step`), or \
                 end it (`drover kill {id}`)"
            ),
        ),
        Refusal::Running => (
            "running",
            format!(
                "cannot unpause instance {id}: it is running and no pause is requested \
                 (only a paused instance, or a running one asked to pause, is unpaused)"
            ),
        ),
        Refusal::Stopping { by } => (
            "stopping",
            format!(
                "cannot {action} instance {id}: {by} asked it to stop, which it does when its \
                 step finishes; `drover kill {id}` stops it now"
            ),
        ),
        Refusal::NotFinished => (
            "not_finished",
            format!(
                "cannot restart instance {id}: it is {state}, and only a finished instance is \
                 restarted; stop it first (`drover stop {id}` or `drover kill {id}`)"
            ),
        ),
        Refusal::Child { parent } => (
            "child_instance",
            format!(
                "cannot restart instance {id}: it is a child of instance {parent}, whose \
                 subworkflow step decides about it; restart or resume the parent instead"
            ),
        ),
    };
    ApiError::Conflict { code, message }
}
