//! An event written to the outbox in the transaction of the transition it describes.

use uuid::Uuid;

/// A CloudEvent ready to relay: the bus crate builds it, the store crate writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    /// The CloudEvent id, also the `Nats-Msg-Id` (so a re-relay is deduplicated).
    pub id: Uuid,
    pub subject: String,
    /// The structured-mode CloudEvent JSON.
    pub payload: serde_json::Value,
}
