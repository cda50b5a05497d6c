//! The event contract, served: each event type's JSON Schema (an event's `dataschema`) and the
//! AsyncAPI document of the cluster's subjects. Public, like `/v1/openapi.json`: they
//! describe the wire format, not the cluster's data.

use axum::Json;
use axum::extract::State;
use drover_bus::contract;
use serde_json::Value;

use crate::ApiState;
use crate::error::{ApiError, Result};
use crate::extract::ApiPath;

/// The JSON Schema (draft 2020-12) of the events of one type.
///
/// `type` is the kind: the last token of the event's subject and of its CloudEvent `type`
/// (`started`, `step_completed`, `permit_drift`, …). The schema describes the whole
/// CloudEvent (envelope and `data`); new optional `data` fields may be added at any time.
#[utoipa::path(
    get,
    path = "/v1/schemas/events/{type}",
    tag = "cluster",
    security(()),
    params(("type" = String, Path, description = "The event type's kind, e.g. `step_completed`")),
    responses(
        (status = 200, description = "The event type's JSON Schema", content_type = "application/json"),
        (status = 400, description = "A path holding a NUL character (`invalid_path`)", body = crate::ErrorBody),
        (status = 404, description = "No event type of that name (`not_found`)", body = crate::ErrorBody),
    )
)]
pub(crate) async fn event_schema(ApiPath(kind): ApiPath<String>) -> Result<Json<Value>> {
    contract::schema(&kind).map(Json).ok_or_else(|| {
        let known: Vec<&str> = contract::EVENT_TYPES.iter().map(|t| t.kind).collect();
        ApiError::not_found(
            "not_found",
            format!(
                "unknown event type {kind:?}; the types are {}",
                known.join(", ")
            ),
        )
    })
}

/// The AsyncAPI 3.0 document of this cluster's events and signals.
///
/// The subjects (with this cluster's prefix) and their parameters, the EVENTS stream, every
/// event type's message with its payload schema and headers, and the signal subject the api
/// role serves.
#[utoipa::path(
    get,
    path = "/v1/asyncapi.json",
    tag = "cluster",
    security(()),
    responses((status = 200, description = "The AsyncAPI 3.0 document", content_type = "application/json"))
)]
pub(crate) async fn asyncapi(State(state): State<ApiState>) -> Json<Value> {
    Json(contract::asyncapi(state.bus.subjects()))
}
