//! An event written to the outbox in the transaction of the transition it describes, and the
//! permit changes the store decides, which the bus crate turns into such events.

use serde_json::Value;
use uuid::Uuid;

use crate::InstanceId;

/// A CloudEvent ready to relay: the bus crate builds it, the store crate writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    /// The CloudEvent id, also the `Nats-Msg-Id` (so a re-relay is deduplicated).
    pub id: Uuid,
    pub subject: String,
    /// The structured-mode CloudEvent JSON.
    pub payload: serde_json::Value,
}

/// What happened to an instance's permit (or, for `Stopped`/`Paused`, what a step commit did
/// because an operator asked), for its event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermitEventKind {
    /// Started (or resumed) while its campaign was at its limit: QUEUED.
    Queued,
    /// Given a permit: READY (from QUEUED, or on resume).
    Admitted,
    /// Gave its permit back (terminal, or `in_error` under `on_error_permit: release`).
    PermitReleased,
    /// A step commit honoured `stop_requested_by`: STOPPED.
    Stopped,
    /// A step commit honoured `pause_requested_by`: PAUSED (keeping its permit).
    Paused,
}

/// An instance whose permit changed, as the store tells the event builder.
#[derive(Clone, Debug)]
pub struct PermitEvent<'a> {
    pub kind: PermitEventKind,
    pub instance: InstanceId,
    pub workflow: &'a str,
    pub version: i32,
    pub campaign: &'a str,
    /// Event data (an object): `state` always, and e.g. `queue_seq`, `step_id`, `step_seq`,
    /// `actor`.
    pub data: Value,
}

/// Builds the outbox event for a [`PermitEvent`] (the bus crate knows subjects; the store
/// does not). Any `Fn(&PermitEvent) -> OutboxEvent + Send + Sync` is one.
pub trait PermitEvents: Send + Sync {
    fn build(&self, event: &PermitEvent<'_>) -> OutboxEvent;
}

impl<F> PermitEvents for F
where
    F: Fn(&PermitEvent<'_>) -> OutboxEvent + Send + Sync,
{
    fn build(&self, event: &PermitEvent<'_>) -> OutboxEvent {
        self(event)
    }
}
