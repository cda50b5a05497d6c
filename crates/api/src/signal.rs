//! Delivering events to instances (`wait_event` steps): `POST /v1/instances/{id}/events/{name}`
//! and, on NATS, [`SignalListener`] on `<prefix>.signal.<instance>.<name>`. Both store the
//! signal first ([`Store::deliver_signal`]); an instance waiting for it is made READY and its
//! job published after the commit, any other keeps it until a step waits for it.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use drover_bus::Bus;
use drover_core::InstanceId;
use drover_core::ids::is_slug;
use drover_store::{Delivery, Store};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiPath, check_storable};
use crate::{ApiState, MAX_BODY_BYTES};

/// What became of a delivered event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Delivered {
    /// The instance was waiting for this event: it runs on.
    Woke,
    /// Stored until the instance waits for an event of this name (the oldest is taken first).
    Kept,
}

/// The answer to an event delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventDelivered {
    pub delivered: Delivered,
}

/// Delivers the event `name` with `payload` to `instance`, then publishes the job of an
/// instance it woke (a failed publish is logged: the stale-READY sweeper re-dispatches).
///
/// Errors: 400 `invalid_event_name` (not a slug), 422 `invalid_request` (a string in the
/// payload holds a NUL character, which Postgres cannot store; the field is named from
/// `payload`), 404 `not_found`, 409 `instance_finished`, store errors (503 when transient).
pub async fn deliver_event(
    store: &Store,
    bus: &Bus,
    instance: InstanceId,
    name: &str,
    payload: &Value,
) -> Result<Delivered> {
    if !is_slug(name) {
        return Err(invalid_name(name));
    }
    check_storable(payload, "payload")?;
    let delivery = store
        .deliver_signal(instance, name, payload)
        .await
        .map_err(|err| match err {
            drover_store::Error::UnknownInstance(id) => {
                ApiError::not_found("not_found", format!("unknown instance {id}"))
            }
            drover_store::Error::InstanceFinished { id, state } => ApiError::Conflict {
                code: "instance_finished",
                message: format!("instance {id} has finished ({state}); it takes no events"),
            },
            drover_store::Error::InvalidEventName(name) => invalid_name(&name),
            other => other.into(),
        })?;
    Ok(match delivery {
        Delivery::Woke(job) => {
            if let Err(err) = bus.publish_jobs(&[job]).await {
                tracing::warn!(instance.id = %instance, %err, "publishing the woken instance's job failed; the sweeper will re-dispatch it");
            }
            tracing::info!(instance.id = %instance, event = name, "event delivered; instance woken");
            Delivered::Woke
        }
        Delivery::Kept => {
            tracing::info!(instance.id = %instance, event = name, "event delivered; kept");
            Delivered::Kept
        }
    })
}

fn invalid_name(name: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_event_name",
        format!("event name {name:?} is not a slug ([a-z0-9][a-z0-9_-]{{0,62}})"),
    )
}

/// An event's payload: empty (or blank) is `null`, anything else must be JSON.
fn parse_payload(body: &[u8]) -> Result<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(
            "invalid_json",
            format!("the event payload is not JSON: {err}"),
        )
    })
}

/// Deliver an event to an instance.
///
/// For `wait_event` steps: an instance waiting for an event of this name runs on with the
/// payload as the step's output (`woke`); otherwise the event is stored until the instance
/// reaches such a step (`kept`), so an event that comes early is not lost.
#[utoipa::path(
    post,
    path = "/v1/instances/{id}/events/{name}",
    tag = "instances",
    params(
        ("id" = String, Path, format = Uuid, description = "The instance id"),
        ("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The event's name, a slug: what a `wait_event` step's `name` waits for"),
    ),
    request_body(
        description = "The event's payload, any JSON (the `wait_event` step's output), whatever \
            the content type. Optional: no body is `null`.",
        content = Option<serde_json::Value>,
        content_type = "application/json"
    ),
    responses(
        (status = 202, description = "Stored; `woke` if the instance was waiting for it", body = EventDelivered),
        (status = 400, description = "Malformed id, an event name that is not a slug (`invalid_event_name`) or a payload that is not JSON", body = ErrorBody),
        (status = 404, description = "Unknown instance", body = ErrorBody),
        (status = 409, description = "The instance has finished (`instance_finished`)", body = ErrorBody),
        (status = 413, description = "Payload over 1 MiB", body = ErrorBody),
    )
)]
pub(crate) async fn send_event(
    State(state): State<ApiState>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<EventDelivered>)> {
    let id: InstanceId = id.parse().map_err(|err| {
        ApiError::bad_request("invalid_id", format!("malformed instance id {id:?}: {err}"))
    })?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            }
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    })?;
    let payload = parse_payload(&body)?;
    let delivered = deliver_event(&state.store, &state.bus, id, &name, &payload).await?;
    Ok((StatusCode::ACCEPTED, Json(EventDelivered { delivered })))
}

/// Delivers events sent on NATS: subscribes to `<prefix>.signal.<instance>.<name>` (in a
/// queue group: one node handles each), payload the event's JSON (empty: `null`). A request
/// is answered with `{"delivered": "woke"|"kept"}` or the API's error JSON; garbage (a subject
/// that names no instance or no slug, a payload that is not JSON) is logged and dropped.
///
/// Signals are handled one at a time, in arrival order, so two events sent in order to one
/// instance are stored in that order.
pub struct SignalListener {
    store: Store,
    bus: Bus,
}

impl SignalListener {
    /// No I/O.
    pub fn new(store: Store, bus: Bus) -> Self {
        Self { store, bus }
    }

    /// Delivers signals until `shutdown`; a failed delivery is answered and logged. Never
    /// fails: a subscription that cannot be made or that ends is made again with capped
    /// back-off (logged once), and the NATS client itself re-subscribes after a reconnect.
    pub async fn run(
        self,
        shutdown: CancellationToken,
    ) -> std::result::Result<(), drover_bus::Error> {
        let mut backoff = drover_core::backoff::Backoff::new(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(5),
        );
        let mut signals = loop {
            match self.bus.subscribe_signals().await {
                Ok(signals) => break signals,
                Err(err) => {
                    let failure = backoff.failed();
                    if failure.first {
                        tracing::warn!(%err, "cannot subscribe to signals; retrying with back-off");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(failure.delay) => {}
                    }
                }
            }
        };
        if let Some(recovered) = backoff.succeeded() {
            tracing::info!(after = ?recovered.after, "subscribed to signals");
        }
        tracing::info!(subject = %self.bus.subjects().signal_filter(), "listening for signals");
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => break,
                message = signals.next() => message,
            };
            let Some(message) = message else {
                let failure = backoff.failed();
                if failure.first {
                    tracing::warn!("the signal subscription ended; subscribing again");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(failure.delay) => {}
                }
                match self.bus.subscribe_signals().await {
                    Ok(again) => {
                        signals = again;
                        if let Some(recovered) = backoff.succeeded() {
                            tracing::info!(after = ?recovered.after, "subscribed to signals again");
                        }
                    }
                    Err(err) => tracing::debug!(%err, "subscribing to signals failed again"),
                }
                continue;
            };
            let answer = match self.handle(&message.subject, &message.payload).await {
                Ok(delivered) => json!(EventDelivered { delivered }),
                Err(err) => {
                    if err.status().is_server_error() {
                        tracing::error!(subject = %message.subject, %err, "signal not delivered");
                    } else {
                        tracing::warn!(subject = %message.subject, code = err.code(), %err, "signal dropped");
                    }
                    json!(err.body())
                }
            };
            if let Some(reply) = message.reply {
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                if let Err(err) = self.bus.client().publish(reply, bytes.into()).await {
                    tracing::warn!(%err, "answering a signal failed");
                }
            }
        }
        if let Err(err) = signals.unsubscribe().await {
            tracing::debug!(%err, "unsubscribing from signals failed");
        }
        Ok(())
    }

    async fn handle(&self, subject: &str, payload: &[u8]) -> Result<Delivered> {
        let Some((instance, name)) = self.bus.subjects().parse_signal(subject) else {
            return Err(ApiError::bad_request(
                "invalid_subject",
                format!(
                    "{subject:?} is not a signal subject: send to {}",
                    self.bus.subjects().signal("<instance id>", "<event name>")
                ),
            ));
        };
        if payload.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge {
                limit: MAX_BODY_BYTES,
            });
        }
        let payload = parse_payload(payload)?;
        deliver_event(&self.store, &self.bus, instance, &name, &payload).await
    }
}
