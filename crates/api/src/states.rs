//! `POST /v1/instances/states`: where a set of instances stands, in one request, so a client
//! following thousands of them (`drover start --count N --wait`) asks once per look instead of
//! once per instance. A read: the viewer scope may ask.

use std::collections::{BTreeMap, HashSet};

use axum::Json;
use axum::extract::State;
use drover_core::{InstanceId, InstanceState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::dto::InstanceStateSchema;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::ApiJson;
use crate::wait::has_ended;

/// The most ids one request may ask about.
pub const MAX_STATE_IDS: usize = 10_000;

/// The instances to look at.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatesRequest {
    /// Instance ids, at most 10000 (a repeated id counts once).
    pub ids: Vec<String>,
}

/// Where the asked instances stand.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceStates {
    /// Distinct ids asked.
    pub total: u64,
    /// How many of them are in each state (states with none are left out).
    pub counts: BTreeMap<String, u64>,
    /// How many have ended: finished (`completed`, `failed`, `stopped`, `killed`) or
    /// `in_error` (which waits for an operator).
    pub ended: u64,
    /// Those that ended, each with its state: a follower drops them from its next request.
    pub ended_instances: Vec<InstanceAt>,
    /// Ids no instance has (never started, or deleted by retention).
    pub unknown: u64,
    pub unknown_ids: Vec<String>,
}

/// One instance and its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceAt {
    #[schema(value_type = String, format = Uuid)]
    pub id: InstanceId,
    #[schema(value_type = InstanceStateSchema)]
    pub state: InstanceState,
}

/// The states of a set of instances: counts per state, and which ended.
#[utoipa::path(
    post,
    path = "/v1/instances/states",
    tag = "instances",
    request_body = StatesRequest,
    responses(
        (status = 200, body = InstanceStates),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 422, description = "No ids, more than 10000, or one that is not an instance id (`details` names it)", body = ErrorBody),
    )
)]
pub(crate) async fn states(
    State(state): State<ApiState>,
    ApiJson(request): ApiJson<StatesRequest>,
) -> Result<Json<InstanceStates>> {
    if request.ids.is_empty() {
        return Err(ApiError::invalid_field(
            "invalid_request",
            "ids",
            "give at least one instance id",
        ));
    }
    if request.ids.len() > MAX_STATE_IDS {
        return Err(ApiError::invalid_field(
            "invalid_request",
            "ids",
            &format!(
                "{} ids: at most {MAX_STATE_IDS} per request (send the rest in another)",
                request.ids.len()
            ),
        ));
    }
    let mut seen = HashSet::with_capacity(request.ids.len());
    let mut ids = Vec::with_capacity(request.ids.len());
    for (i, id) in request.ids.iter().enumerate() {
        let parsed: InstanceId = id.parse().map_err(|_| {
            ApiError::invalid_field(
                "invalid_request",
                &format!("ids[{i}]"),
                &format!("{:?} is not an instance id", truncated(id)),
            )
        })?;
        if seen.insert(parsed) {
            ids.push(parsed);
        }
    }
    let found = state.store.instance_states(&ids).await?;
    let mut answer = InstanceStates {
        total: ids.len() as u64,
        ..Default::default()
    };
    let mut known = HashSet::with_capacity(found.len());
    for (id, instance_state) in found {
        known.insert(id);
        *answer
            .counts
            .entry(instance_state.as_str().to_owned())
            .or_default() += 1;
        if has_ended(instance_state) {
            answer.ended += 1;
            answer.ended_instances.push(InstanceAt {
                id,
                state: instance_state,
            });
        }
    }
    answer.unknown_ids = ids
        .iter()
        .filter(|id| !known.contains(id))
        .map(ToString::to_string)
        .collect();
    answer.unknown = answer.unknown_ids.len() as u64;
    Ok(Json(answer))
}

/// At most 40 characters of `id`, for an error message.
fn truncated(id: &str) -> String {
    id.chars().take(40).collect()
}
