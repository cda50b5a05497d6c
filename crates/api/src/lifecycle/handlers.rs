//! The lifecycle routes: one instance by id, or the instances of a filter.

use axum::body::Bytes;
use axum::extract::State;
use axum::{Extension, Json};
use serde::de::DeserializeOwned;

use super::apply::{many, one};
use super::dto::{
    LifecycleCommand, LifecycleFilterRequest, LifecycleRequest, LifecycleResult, LifecycleSummary,
};
use crate::ApiState;
use crate::auth::Principal;
use crate::error::{ErrorBody, Result};
use crate::extract::{ApiPath, decode_optional_json};

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
