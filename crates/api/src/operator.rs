//! Operator actions and the coordinator's lease: `POST /v1/instances/{id}/resume` and
//! `GET /v1/leader`.
//!
//! Resume decides here, from one read of the instance and its definition, where the instance
//! goes on (its current step again, or the target of the current step's transitions); the
//! store then applies that in one transaction that re-checks the read (fence, checkpoint,
//! state, failed descendants) under a row lock. The step job is published after the commit; if
//! that publish fails the sweeper re-dispatches the READY instance.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use drover_core::definition::StepKind;
use drover_core::expr::Scope;
use drover_core::{Definition, InstanceId, InstanceState, NodeId, Step};
use drover_store::{Resume, Resumed};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::dto::Instance;
use crate::error::{ApiError, ErrorBody, Result, unknown_instance};
use crate::extract::{ApiJson, ApiPath};

/// How to resume an `in_error` instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResumeMode {
    /// Retry the current step: READY at the same step, attempt 1, a new checkpoint (so a new
    /// idempotency key).
    CurrentStep,
    /// Skip the current step: evaluate its `next` transitions (after `set` is applied, with
    /// `output` its latest recorded output or null) and go on at the one chosen.
    NextStep,
}

impl ResumeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CurrentStep => "current_step",
            Self::NextStep => "next_step",
        }
    }
}

/// Resume an `in_error` instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    pub mode: ResumeMode,
    /// Variables to correct first, key by key (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub set: Option<Value>,
}

/// The coordinator's leader lease.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Leader {
    /// The lease's name (`coordinator`).
    pub name: String,
    /// The node that holds (or last held) the lease; absent if none ever did.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub holder: Option<NodeId>,
    /// +1 at every change of holder.
    pub term: i64,
    /// When the lease lapses unless renewed (by the database clock).
    pub expires_at: DateTime<Utc>,
    /// Whether `expires_at` is still in the future: `holder` leads.
    pub live: bool,
}

impl From<drover_store::Lease> for Leader {
    fn from(lease: drover_store::Lease) -> Self {
        Self {
            name: lease.name,
            holder: lease.holder,
            term: lease.term,
            expires_at: lease.expires_at,
            live: lease.live,
        }
    }
}

/// Resume an `in_error` instance at its current step (retry) or its next step (skip).
///
/// Only the deepest `in_error` instance of a call chain can be resumed. The instance becomes
/// READY with a new checkpoint and fence; the journal gets an entry (outcome `resumed`, the
/// actor) and the audit trail a row. One that gave its campaign permit back when it failed
/// (`on_error_permit: release`) needs one again: it is QUEUED instead if its campaign is at its
/// limit or has a queue (`queue_position` says where), and starts when a permit frees.
#[utoipa::path(
    post,
    path = "/v1/instances/{id}/resume",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The instance id")),
    request_body = ResumeRequest,
    responses(
        (status = 200, description = "Resumed: READY, its job dispatched (or QUEUED behind its \
            campaign's limit)", body = Instance),
        (status = 400, description = "Malformed id or JSON (an unknown `mode`)", body = ErrorBody),
        (status = 404, description = "Unknown instance", body = ErrorBody),
        (status = 409, description = "`not_in_error`; `not_deepest` (a descendant is in_error: \
            resume it first); `end_step`, `no_transition` or `transition_error` (next_step \
            cannot choose a step); `conflict` (the instance moved on meanwhile)", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "`set` is not an object", body = ErrorBody),
    )
)]
pub(crate) async fn resume(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<ResumeRequest>,
) -> Result<Json<Instance>> {
    let id: InstanceId = id.parse().map_err(|err| {
        ApiError::bad_request("invalid_id", format!("malformed instance id {id:?}: {err}"))
    })?;
    let set = match request.set {
        None => Map::new(),
        Some(Value::Object(set)) => set,
        Some(other) => {
            return Err(ApiError::invalid(
                "invalid_request",
                format!("set must be a JSON object, not {}", json_kind(&other)),
            ));
        }
    };

    let instance = state
        .store
        .get_instance(id)
        .await?
        .ok_or_else(|| unknown_instance(id))?;
    if instance.state != InstanceState::InError {
        return Err(not_in_error(id, instance.state));
    }
    if let Some(child) = state.store.deepest_failed_descendant(id).await? {
        return Err(not_deepest(id, child));
    }

    let definition = definition_of(&state, &instance).await?;
    let current = definition.step(&instance.current_step).ok_or_else(|| {
        ApiError::Internal(format!(
            "instance {id} is at step {:?}, which {} v{} does not have",
            instance.current_step, instance.workflow, instance.version
        ))
    })?;
    let target = match request.mode {
        ResumeMode::CurrentStep => current,
        ResumeMode::NextStep => next_step(&definition, current, &instance, &set)?,
    };

    let resumed = state
        .store
        .resume(&Resume {
            instance: id,
            fence: instance.fence,
            step_seq: instance.step_seq,
            step: target.id.clone(),
            allow_retry: target.allow_retry,
            timeout_ms: target.timeout_ms(),
            route: definition.route(target),
            set,
            actor: actor.clone(),
            mode: request.mode.as_str().to_owned(),
        })
        .await?;
    let job = match resumed {
        Resumed::Resumed { job } => Some(job),
        Resumed::Queued { position } => {
            tracing::info!(
                instance.id = %id,
                step.id = %target.id,
                position,
                %actor,
                "instance resumed into its campaign's queue"
            );
            None
        }
        Resumed::Unknown => return Err(unknown_instance(id)),
        Resumed::NotInError(now) => return Err(not_in_error(id, now)),
        Resumed::NotDeepest(child) => return Err(not_deepest(id, child)),
        Resumed::Conflict => {
            return Err(ApiError::Conflict {
                code: "conflict",
                message: format!(
                    "instance {id} changed while it was being resumed; look at it again and retry"
                ),
            });
        }
    };
    if let Some(job) = job {
        tracing::info!(
            instance.id = %id,
            step.id = %target.id,
            step.seq = job.step_seq.0,
            mode = request.mode.as_str(),
            %actor,
            "instance resumed"
        );
        if let Err(err) = state.bus.publish_jobs(&[job]).await {
            tracing::warn!(
                instance.id = %id,
                %err,
                "publishing the resumed instance's job failed; the sweeper will re-dispatch it"
            );
        }
    }
    let instance = state
        .store
        .get_instance(id)
        .await?
        .ok_or_else(|| unknown_instance(id))?;
    Ok(Json(instance.into()))
}

/// The step `current`'s transitions choose, evaluated against the instance's variables with
/// `set` applied, its steps' outputs, and `output` = `current`'s latest output (or null).
fn next_step<'d>(
    definition: &'d Definition,
    current: &Step,
    instance: &drover_store::Instance,
    set: &Map<String, Value>,
) -> Result<&'d Step> {
    let id = instance.id;
    if matches!(current.kind, StepKind::End { .. }) {
        return Err(ApiError::Conflict {
            code: "end_step",
            message: format!(
                "instance {id} is at step {:?}, an end step: it has no next step \
                 (resume the current step instead)",
                current.id
            ),
        });
    }
    let mut vars = match &instance.vars {
        Value::Object(vars) => vars.clone(),
        _ => Map::new(),
    };
    vars.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    let steps = match &instance.outputs {
        Value::Object(outputs) => outputs.clone(),
        _ => Map::new(),
    };
    let output = steps.get(&current.id).cloned().unwrap_or(Value::Null);
    let scope_instance = json!({
        "id": id.to_string(),
        "workflow": instance.workflow,
        "version": instance.version,
        "campaign": instance.campaign,
        "started_at": instance.created_at.to_rfc3339(),
    });
    let scope = Scope {
        vars: &vars,
        steps: &steps,
        instance: &scope_instance,
        output: Some(&output),
    };
    let to = match current.choose_next(&scope) {
        Ok(Some(to)) => to,
        Ok(None) => {
            return Err(ApiError::Conflict {
                code: "no_transition",
                message: format!(
                    "instance {id}: no transition of step {:?} matched; correct the variables \
                     with `set`, or resume the current step",
                    current.id
                ),
            });
        }
        Err(err) => {
            return Err(ApiError::Conflict {
                code: "transition_error",
                message: format!(
                    "instance {id}: step {:?}, field \"next\": {err}",
                    current.id
                ),
            });
        }
    };
    definition.step(to).ok_or_else(|| {
        ApiError::Internal(format!(
            "step {:?} of {} v{} moves to {to:?}, which does not exist",
            current.id, instance.workflow, instance.version
        ))
    })
}

pub(crate) async fn definition_of(
    state: &ApiState,
    instance: &drover_store::Instance,
) -> Result<Definition> {
    let stored = state
        .store
        .get_definition(&instance.workflow, Some(instance.version))
        .await?
        .ok_or_else(|| {
            ApiError::Internal(format!(
                "instance {} is pinned to {} v{}, which is not stored",
                instance.id, instance.workflow, instance.version
            ))
        })?;
    Definition::from_json(&stored.body).map_err(|errors| {
        ApiError::Internal(format!(
            "stored definition {} v{} no longer validates: {errors}",
            stored.name, stored.version
        ))
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn not_in_error(id: InstanceId, state: InstanceState) -> ApiError {
    ApiError::Conflict {
        code: "not_in_error",
        message: format!("instance {id} is {state}, not in_error: only in_error instances resume"),
    }
}

fn not_deepest(id: InstanceId, child: InstanceId) -> ApiError {
    ApiError::Conflict {
        code: "not_deepest",
        message: format!(
            "instance {id} has a failed descendant deeper in its call chain: resume child {child} \
             first (only the deepest in_error instance of a chain can be resumed)"
        ),
    }
}

/// The coordinator's leader lease: who leads, under which term, until when.
#[utoipa::path(
    get,
    path = "/v1/leader",
    tag = "cluster",
    responses(
        (status = 200, body = Leader),
        (status = 404, description = "The lease row is missing (migrations not applied?)", body = ErrorBody),
    )
)]
pub(crate) async fn leader(State(state): State<ApiState>) -> Result<Json<Leader>> {
    match state.store.lease(drover_store::COORDINATOR_LEASE).await? {
        Some(lease) => Ok(Json(lease.into())),
        None => Err(ApiError::not_found(
            "not_found",
            format!("no lease named {:?}", drover_store::COORDINATOR_LEASE),
        )),
    }
}
