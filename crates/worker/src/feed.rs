//! The worker's job deliveries, kept flowing whatever happens to the consumer: a message
//! stream that fails or ends (the consumer or its stream deleted, NATS restarted, heartbeats
//! missed) is opened again with back-off, provisioning the streams again first if they are
//! gone.

use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::pull;
use drover_bus::{Bus, StepJob};
use drover_core::backoff::Backoff;
use drover_store::Store;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::commit::with_retries;

/// READY instances re-dispatched at once after the jobs stream was found gone (the rest, if
/// any, by the leader's stale-READY sweeper).
const REDISPATCH_LIMIT: i64 = 5000;

pub(crate) struct JobFeed {
    bus: Bus,
    store: Store,
    batch_size: usize,
    messages: Option<pull::Stream>,
    backoff: Backoff,
    /// Why deliveries stopped, while they are stopped: logged once when they stop, and once
    /// when they flow again.
    lost: Option<String>,
}

impl JobFeed {
    pub(crate) fn new(bus: Bus, store: Store, batch_size: usize) -> Self {
        Self {
            bus,
            store,
            batch_size,
            messages: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            lost: None,
        }
    }

    /// The next delivery; `None` once `shutdown` is cancelled.
    pub(crate) async fn next(&mut self, shutdown: &CancellationToken) -> Option<Message> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let Some(messages) = self.messages.as_mut() else {
                self.open(shutdown).await;
                continue;
            };
            let next = tokio::select! {
                () = shutdown.cancelled() => return None,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    self.backoff.succeeded();
                    return Some(msg);
                }
                Some(Err(err)) => self.lose(err.to_string()),
                None => self.lose("the message stream ended".to_owned()),
            }
        }
    }

    /// A delivery already here, if any (no waiting).
    pub(crate) fn next_now(&mut self) -> Option<Message> {
        match self.messages.as_mut()?.next().now_or_never()? {
            Some(Ok(msg)) => Some(msg),
            Some(Err(err)) => {
                self.lose(err.to_string());
                None
            }
            None => {
                self.lose("the message stream ended".to_owned());
                None
            }
        }
    }

    /// Drops the message stream (its prefetched, unacknowledged messages are redelivered
    /// after the ack wait, or re-dispatched from Postgres); the next call opens another.
    fn lose(&mut self, why: String) {
        self.messages = None;
        if self.lost.is_none() {
            tracing::warn!(reason = %why, "job deliveries stopped; reopening the consumer (provisioning it again if it is gone)");
            self.lost = Some(why);
        } else {
            tracing::debug!(reason = %why, "job deliveries stopped again");
        }
    }

    /// Opens the consumer's message stream, provisioning again if the consumer or its stream
    /// is gone; waits (with back-off) until that works or `shutdown`.
    async fn open(&mut self, shutdown: &CancellationToken) {
        if self.lost.is_some() || self.backoff.is_down() {
            let delay = self.backoff.failed().delay;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
        let (consumer, provisioned) = match self.bus.ensure_worker_consumer().await {
            Ok(opened) => opened,
            Err(err) => {
                self.lose(format!("opening the job consumer: {err}"));
                return;
            }
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        match messages {
            Ok(messages) => self.messages = Some(messages),
            Err(err) => {
                self.lose(format!("pulling from the job consumer: {err}"));
                return;
            }
        }
        match self.lost.take() {
            Some(why) => tracing::info!(reason = %why, provisioned, "job deliveries flowing again"),
            None => tracing::info!(provisioned, "pulling jobs"),
        }
        if provisioned {
            self.redispatch_ready().await;
        }
    }

    /// The jobs stream (or its consumer) was gone and is back, empty: the jobs it held are
    /// lost, so the READY instances are dispatched again now instead of when the leader's
    /// stale-READY sweeper gets to them. Safe: a job is only a hint (a duplicate fails its
    /// claim), and every node doing this within the same 10 s publishes under the same
    /// message ids, which JetStream deduplicates.
    async fn redispatch_ready(&self) {
        let ready = match with_retries(|| self.store.stale_ready(0, REDISPATCH_LIMIT)).await {
            Ok(ready) => ready,
            Err(err) => {
                tracing::warn!(%err, "cannot list READY instances to re-dispatch; the sweeper will");
                return;
            }
        };
        if ready.is_empty() {
            return;
        }
        let jobs: Vec<StepJob> = ready
            .iter()
            .map(|r| StepJob::new(r.instance, r.step_seq, r.fence))
            .collect();
        let window = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 10)
            .unwrap_or(0);
        match self.bus.redispatch_jobs(&jobs, &format!("p{window}")).await {
            Ok(()) => tracing::info!(
                count = jobs.len(),
                "re-dispatched READY instances after the jobs stream was provisioned again"
            ),
            Err(err) => {
                tracing::warn!(%err, "re-dispatching READY instances failed; the sweeper will")
            }
        }
    }
}
