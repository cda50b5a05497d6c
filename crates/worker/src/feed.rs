//! The worker's job deliveries from the consumer of each worker queue it serves, merged,
//! kept flowing whatever happens to a consumer: a message stream that fails or ends (the
//! consumer or its stream deleted, NATS restarted, heartbeats missed) is opened again with
//! back-off, provisioning the streams again first if they are gone.

use std::time::Duration;

use drover_bus::{Bus, Deliveries};
use drover_core::backoff::Backoff;
use drover_core::{Queue, StepJob};
use drover_store::Store;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::JobDelivery;
use crate::commit::with_retries;

/// READY instances re-dispatched at once after the jobs stream was found gone (the rest, if
/// any, by the leader's stale-READY sweeper).
const REDISPATCH_LIMIT: i64 = 5000;

pub(crate) struct JobFeed {
    bus: Bus,
    store: Store,
    batch_size: usize,
    /// One per queue served.
    queues: Vec<QueueFeed>,
    /// The queue looked at first: the one after the last that delivered, so that a busy queue
    /// does not starve the others.
    turn: usize,
}

/// The deliveries of one queue's consumer.
struct QueueFeed {
    queue: Queue,
    messages: Option<Deliveries<StepJob>>,
    backoff: Backoff,
    /// When to open the consumer again after its deliveries stopped.
    retry_at: Option<Instant>,
    /// Why deliveries stopped, while they are stopped: logged once when they stop, and once
    /// when they flow again.
    lost: Option<String>,
}

impl JobFeed {
    /// The deliveries of the consumers of `queues` (the bus's `worker_queues`).
    pub(crate) fn new(bus: Bus, store: Store, batch_size: usize, queues: &[Queue]) -> Self {
        let queues = queues
            .iter()
            .map(|queue| QueueFeed {
                queue: queue.clone(),
                messages: None,
                backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
                retry_at: None,
                lost: None,
            })
            .collect();
        Self {
            bus,
            store,
            batch_size,
            queues,
            turn: 0,
        }
    }

    /// The next delivery of any queue; `None` once `shutdown` is cancelled.
    pub(crate) async fn next(&mut self, shutdown: &CancellationToken) -> Option<JobDelivery> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let now = Instant::now();
            for i in 0..self.queues.len() {
                let feed = &self.queues[i];
                if feed.messages.is_none() && feed.retry_at.is_none_or(|at| at <= now) {
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = self.open(i) => {}
                    }
                }
            }
            // The next time a closed consumer is to be opened again, if any is closed.
            let reopen_at = self
                .queues
                .iter()
                .filter(|feed| feed.messages.is_none())
                .filter_map(|feed| feed.retry_at)
                .min();
            let count = self.queues.len();
            let turn = self.turn;
            let mut open: Vec<_> = self
                .queues
                .iter_mut()
                .enumerate()
                .filter_map(|(i, feed)| {
                    Some((
                        (i + count - turn) % count.max(1),
                        i,
                        feed.messages.as_mut()?,
                    ))
                })
                .collect();
            open.sort_by_key(|(order, ..)| *order);
            let nexts: Vec<_> = open
                .into_iter()
                .map(|(_, i, messages)| messages.next().map(move |next| (i, next)))
                .collect();
            let next_of_any = async move {
                if nexts.is_empty() {
                    std::future::pending().await
                } else {
                    futures::future::select_all(nexts).await.0
                }
            };
            let delivered = tokio::select! {
                () = shutdown.cancelled() => return None,
                () = sleep_until(reopen_at) => None,
                delivered = next_of_any => Some(delivered),
            };
            let Some((i, next)) = delivered else {
                continue;
            };
            let feed = &mut self.queues[i];
            match next {
                Some(Ok(msg)) => {
                    feed.backoff.succeeded();
                    self.turn = (i + 1) % count;
                    return Some(msg);
                }
                Some(Err(err)) => feed.lose(err.to_string()),
                None => feed.lose("the message stream ended".to_owned()),
            }
        }
    }

    /// A delivery already here, of any queue, if any (no waiting).
    pub(crate) fn next_now(&mut self) -> Option<JobDelivery> {
        let count = self.queues.len();
        for k in 0..count {
            let i = (self.turn + k) % count;
            let feed = &mut self.queues[i];
            let Some(messages) = feed.messages.as_mut() else {
                continue;
            };
            match messages.next().now_or_never() {
                None => {}
                Some(Some(Ok(msg))) => {
                    self.turn = (i + 1) % count;
                    return Some(msg);
                }
                Some(Some(Err(err))) => feed.lose(err.to_string()),
                Some(None) => feed.lose("the message stream ended".to_owned()),
            }
        }
        None
    }

    /// Opens the message stream of queue `i`'s consumer, provisioning again if the consumer or
    /// its stream is gone; on failure it is tried again after a back-off.
    async fn open(&mut self, i: usize) {
        let queue = self.queues[i].queue.clone();
        let opened = self
            .bus
            .pull_jobs(&queue, self.batch_size)
            .await
            .map_err(|err| format!("opening the job consumer: {err}"));
        let feed = &mut self.queues[i];
        let provisioned = match opened {
            Ok((messages, provisioned)) => {
                feed.messages = Some(messages);
                feed.retry_at = None;
                match feed.lost.take() {
                    Some(why) => {
                        tracing::info!(%queue, reason = %why, provisioned, "job deliveries flowing again")
                    }
                    None => tracing::info!(%queue, provisioned, "pulling jobs"),
                }
                provisioned
            }
            Err(why) => {
                feed.lose(why);
                false
            }
        };
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
        let jobs = match with_retries(|| self.store.stale_ready(0, REDISPATCH_LIMIT)).await {
            Ok(jobs) => jobs,
            Err(err) => {
                tracing::warn!(%err, "cannot list READY instances to re-dispatch; the sweeper will");
                return;
            }
        };
        if jobs.is_empty() {
            return;
        }
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

impl QueueFeed {
    /// Drops the message stream (its prefetched, unacknowledged messages are redelivered
    /// after the ack wait, or re-dispatched from Postgres); it is opened again after a
    /// back-off.
    fn lose(&mut self, why: String) {
        self.messages = None;
        self.retry_at = Some(Instant::now() + self.backoff.failed().delay);
        if self.lost.is_none() {
            tracing::warn!(queue = %self.queue, reason = %why, "job deliveries stopped; reopening the consumer (provisioning it again if it is gone)");
            self.lost = Some(why);
        } else {
            tracing::debug!(queue = %self.queue, reason = %why, "job deliveries stopped again");
        }
    }
}

/// Sleeps until `at`; for ever without it.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
