//! Deliveries: what a pull consumer hands out — a message, decoded, and the means to settle
//! it. Callers decide a delivery's [`Fate`]; only this module speaks JetStream acks.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{AckKind, Message};
use futures::Stream;

use crate::job::DecodeError;
use crate::{Error, Result};

/// What becomes of a delivered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Done with: never delivered again.
    Ack,
    /// Given back: delivered again (to any consumer's client) after the delay.
    Nak(Duration),
    /// Garbage: never delivered again, and not counted as done.
    Term,
    /// Still being worked on: the ack wait starts over. The message stays unsettled.
    Progress,
}

/// One message a pull consumer delivered, decoded as `T` (or why it could not be), not yet
/// settled. Unsettled, it is delivered again after the consumer's ack wait.
pub struct Delivery<T> {
    decoded: Result<T, DecodeError>,
    message: Message,
}

impl<T> std::fmt::Debug for Delivery<T>
where
    T: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject())
            .field("decoded", &self.decoded)
            .finish()
    }
}

impl<T> Delivery<T> {
    /// What the message says, or why it could not be read (then it is garbage: terminate it).
    pub fn decoded(&self) -> Result<&T, &DecodeError> {
        self.decoded.as_ref()
    }

    /// The subject it was published to.
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    /// How many times the message has been delivered, this time included (1 the first time).
    pub fn delivered(&self) -> i64 {
        self.message.info().map_or(1, |info| info.delivered.max(1))
    }

    /// The trace context its publisher sent (`traceparent`), if any and well-formed.
    pub fn trace_context(&self) -> Option<opentelemetry::trace::SpanContext> {
        let traceparent = self.message.headers.as_ref()?.get("traceparent")?;
        crate::trace::parse_traceparent(traceparent.as_str())
    }

    /// Settles the message as `fate` says. Fire and forget (the server does not confirm): a
    /// settle that fails, or is lost, means a redelivery after the ack wait.
    pub async fn settle(&self, fate: Fate) -> Result<()> {
        let kind = match fate {
            Fate::Ack => AckKind::Ack,
            Fate::Nak(delay) if delay.is_zero() => AckKind::Nak(None),
            Fate::Nak(delay) => AckKind::Nak(Some(delay)),
            Fate::Term => AckKind::Term,
            Fate::Progress => AckKind::Progress,
        };
        self.message
            .ack_with(kind)
            .await
            .map_err(|err| Error::Ack(err.to_string()))
    }

    /// [`Fate::Ack`].
    pub async fn ack(&self) -> Result<()> {
        self.settle(Fate::Ack).await
    }

    /// [`Fate::Nak`].
    pub async fn nak(&self, delay: Duration) -> Result<()> {
        self.settle(Fate::Nak(delay)).await
    }

    /// [`Fate::Term`].
    pub async fn term(&self) -> Result<()> {
        self.settle(Fate::Term).await
    }

    /// [`Fate::Progress`].
    pub async fn progress(&self) -> Result<()> {
        self.settle(Fate::Progress).await
    }
}

/// The deliveries of one pull consumer, decoded as they come. The stream fails (an item
/// `Err`) or ends when the consumer, its stream or the connection does: open it again.
pub struct Deliveries<T> {
    messages: pull::Stream,
    decode: fn(&[u8], usize) -> Result<T, DecodeError>,
    /// Messages larger than this are garbage, never decoded.
    limit: usize,
}

impl<T> std::fmt::Debug for Deliveries<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<T> Deliveries<T> {
    pub(crate) fn new(
        messages: pull::Stream,
        decode: fn(&[u8], usize) -> Result<T, DecodeError>,
        limit: usize,
    ) -> Self {
        Self {
            messages,
            decode,
            limit,
        }
    }
}

impl<T> Stream for Deliveries<T> {
    type Item = Result<Delivery<T>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        Pin::new(&mut this.messages).poll_next(cx).map(|next| {
            next.map(|message| match message {
                Ok(message) => Ok(Delivery {
                    decoded: (this.decode)(&message.payload, this.limit),
                    message,
                }),
                Err(err) => Err(Error::Subscribe(err.to_string())),
            })
        })
    }
}
