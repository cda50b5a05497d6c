//! Every coordinator consumes recovery tasks: requeue a dead node's instances in batches.

use std::time::Duration;

use drover_bus::{Bus, Delivery, Fate, RecoveryTask};
use drover_core::backoff::{Backoff, SharedOutage};
use drover_store::Store;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{CoordinatorConfig, Result};

/// Recovery tasks stopped flowing: log it once per outage.
fn lose(lost: &mut Option<String>, why: String) {
    if lost.is_none() {
        tracing::warn!(reason = %why, "recovery tasks stopped; reopening the consumer (provisioning it again if it is gone)");
        *lost = Some(why);
    } else {
        tracing::debug!(reason = %why, "recovery tasks stopped again");
    }
}

/// A message stream that lasted this long before failing resets the back-off.
const HEALTHY_FOR: Duration = Duration::from_secs(30);

/// How long a failed recovery task waits before it is delivered again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Tasks handled at once by one replica. Small, so that with several replicas each pulls
/// its share of the tasks rather than one replica taking them all.
const CONCURRENT_TASKS: usize = 2;

pub struct RecoveryConsumer {
    node: drover_core::NodeId,
    store: Store,
    bus: Bus,
    config: CoordinatorConfig,
    /// Failing tasks (Postgres or NATS away) are logged once per outage.
    failing: SharedOutage,
}

impl RecoveryConsumer {
    pub fn new(
        node: drover_core::NodeId,
        store: Store,
        bus: Bus,
        config: CoordinatorConfig,
    ) -> Self {
        Self {
            node,
            store,
            bus,
            config,
            failing: SharedOutage::default(),
        }
    }

    /// Consumes recovery tasks until `shutdown`. Never fails: a message stream that fails
    /// or ends (the consumer or its stream deleted, NATS away) is opened again with back-off,
    /// provisioning the streams again if they are gone; the trouble is logged once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut lost: Option<String> = None;
        while !shutdown.is_cancelled() {
            if lost.is_some() {
                let delay = backoff.failed().delay;
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            let opened = self
                .bus
                .pull_recovery_tasks()
                .await
                .map_err(|err| format!("opening the recovery consumer: {err}"));
            let (messages, provisioned) = match opened {
                Ok(opened) => opened,
                Err(why) => {
                    lose(&mut lost, why);
                    continue;
                }
            };
            match lost.take() {
                Some(why) => {
                    tracing::info!(reason = %why, provisioned, "recovery tasks flowing again")
                }
                None if provisioned => tracing::info!("recovery stream provisioned again"),
                None => {}
            }
            // Runs until the stream fails or ends (or shutdown); then it is opened again.
            let opened_at = tokio::time::Instant::now();
            let mut ended = None;
            let this = &self;
            messages
                .take_until(shutdown.cancelled())
                .take_while(|msg| {
                    let go_on = match msg {
                        Ok(_) => true,
                        Err(err) => {
                            ended = Some(err.to_string());
                            false
                        }
                    };
                    std::future::ready(go_on)
                })
                .filter_map(|msg| std::future::ready(msg.ok()))
                .for_each_concurrent(CONCURRENT_TASKS, |delivery| async move {
                    this.handle(delivery).await;
                })
                .await;
            if !shutdown.is_cancelled() {
                if opened_at.elapsed() > HEALTHY_FOR {
                    // It worked for a while: a fresh failure, not more of the same.
                    backoff.succeeded();
                }
                lose(
                    &mut lost,
                    ended.unwrap_or_else(|| "the message stream ended".to_owned()),
                );
            }
        }
        Ok(())
    }

    /// Handles one recovery task and settles its message: the one place that decides a
    /// recovery task's fate (besides the progress acks of a long requeue).
    async fn handle(&self, delivery: Delivery<RecoveryTask>) {
        let fate = match delivery.decoded() {
            Ok(task) => {
                let span = tracing::info_span!(
                    "recovery_task",
                    node.id = %task.node,
                    leader.term = task.term,
                );
                self.run_task(*task, &delivery).instrument(span).await
            }
            Err(err) => {
                tracing::warn!(subject = delivery.subject(), %err, "terminating undecodable recovery task");
                Fate::Term
            }
        };
        // A settle that fails means a redelivery; requeueing again is safe.
        let _ = delivery.settle(fate).await;
    }

    /// Requeues the dead node's instances: done with the task once it owns nothing, or
    /// handed back to be tried again shortly.
    async fn run_task(&self, task: RecoveryTask, delivery: &Delivery<RecoveryTask>) -> Fate {
        match self.requeue_all(&task, delivery).await {
            Ok(count) => {
                if let Some(recovered) = self.failing.succeeded() {
                    tracing::info!(after = ?recovered.after, failures = recovered.failures, "recovery tasks succeed again");
                }
                if count > 0 {
                    tracing::info!(node.id = %task.node, count, "recovered the instances of a dead node");
                }
                Fate::Ack
            }
            Err(err) => {
                if self.failing.failed() || !err.is_transient() {
                    tracing::warn!(node.id = %task.node, %err, "recovery task failed; it will be redelivered");
                } else {
                    tracing::debug!(node.id = %task.node, %err, "recovery task failed again");
                }
                Fate::Nak(RETRY_AFTER)
            }
        }
    }

    /// Requeues batch after batch until the node owns nothing; returns how many. Then
    /// re-dispatches the READY instances the node checkpointed last: it may have died between
    /// a commit and the publish of the next job.
    async fn requeue_all(
        &self,
        task: &RecoveryTask,
        delivery: &Delivery<RecoveryTask>,
    ) -> Result<usize> {
        let total = self.requeue_running(task, delivery).await?;
        if total > 0 {
            metrics::counter!("drover_recovery_instances_requeued_total").increment(total as u64);
            // From the node's last sign of life to its instances re-dispatched.
            if let Some(seen) = self.store.last_heartbeat(task.node).await? {
                let since = (chrono::Utc::now() - seen).to_std().unwrap_or_default();
                metrics::histogram!("drover_recovery_redispatch_seconds")
                    .record(since.as_secs_f64());
            }
        }
        let ready = self.store.ready_after_dead_node(task.node).await?;
        if !ready.is_empty() {
            self.bus
                .redispatch_jobs(&ready, &format!("dead-{}", task.node))
                .await?;
        }
        Ok(total + ready.len())
    }

    async fn requeue_running(
        &self,
        task: &RecoveryTask,
        delivery: &Delivery<RecoveryTask>,
    ) -> Result<usize> {
        let mut total = 0;
        loop {
            let requeued = self
                .store
                .requeue_orphans(task.node, self.node, self.config.requeue_batch)
                .await?;
            if requeued.orphans.is_empty() {
                return Ok(total);
            }
            total += requeued.orphans.len();
            let jobs = requeued.jobs();
            // The rows are READY already: if this publish fails, the stale-READY sweeper
            // re-dispatches them.
            if let Err(err) = self.bus.publish_jobs(&jobs).await {
                tracing::warn!(%err, "publishing requeued jobs failed; the sweeper will re-dispatch");
            }
            // Still at it: the message is not redelivered to another replica meanwhile.
            let _ = delivery.settle(Fate::Progress).await;
        }
    }
}
