//! Every coordinator consumes recovery tasks: requeue a dead node's instances in batches.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use drover_bus::{Bus, RecoveryTask, StepJob};
use drover_core::InstanceState;
use drover_core::backoff::{Backoff, SharedOutage};
use drover_store::Store;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

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
            let opened = match self.bus.ensure_recovery_consumer().await {
                Ok((consumer, provisioned)) => consumer
                    .stream()
                    .max_messages_per_batch(1)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map(|messages| (messages, provisioned))
                    .map_err(|err| format!("pulling recovery tasks: {err}")),
                Err(err) => Err(format!("opening the recovery consumer: {err}")),
            };
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
                .for_each_concurrent(CONCURRENT_TASKS, |msg| async move {
                    this.handle(msg).await;
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

    async fn handle(&self, msg: Message) {
        let task = match RecoveryTask::decode(&msg.payload) {
            Ok(task) => task,
            Err(err) => {
                tracing::warn!(%err, "terminating undecodable recovery task");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        match self.requeue_all(&task, &msg).await {
            Ok(count) => {
                if let Some(recovered) = self.failing.succeeded() {
                    tracing::info!(after = ?recovered.after, failures = recovered.failures, "recovery tasks succeed again");
                }
                if count > 0 {
                    tracing::info!(node.id = %task.node, count, "recovered the instances of a dead node");
                }
                let _ = msg.ack().await;
            }
            Err(err) => {
                if self.failing.failed() || !err.is_transient() {
                    tracing::warn!(node.id = %task.node, %err, "recovery task failed; it will be redelivered");
                } else {
                    tracing::debug!(node.id = %task.node, %err, "recovery task failed again");
                }
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                    .await;
            }
        }
    }

    /// Requeues batch after batch until the node owns nothing; returns how many. Then
    /// re-dispatches the READY instances the node checkpointed last: it may have died between
    /// a commit and the publish of the next job.
    async fn requeue_all(&self, task: &RecoveryTask, msg: &Message) -> Result<usize> {
        let total = self.requeue_running(task, msg).await?;
        let ready = self.store.ready_after_dead_node(task.node).await?;
        if !ready.is_empty() {
            let jobs: Vec<StepJob> = ready
                .iter()
                .map(|r| StepJob::new(r.instance, r.step_seq, r.fence, r.route.clone()))
                .collect();
            self.bus
                .redispatch_jobs(&jobs, &format!("dead-{}", task.node))
                .await?;
        }
        Ok(total + ready.len())
    }

    async fn requeue_running(&self, task: &RecoveryTask, msg: &Message) -> Result<usize> {
        let mut total = 0;
        loop {
            let requeued = self
                .store
                .requeue_orphans(task.node, self.node, self.config.requeue_batch)
                .await?;
            let orphans = requeued.orphans;
            if orphans.is_empty() {
                return Ok(total);
            }
            total += orphans.len();
            let jobs: Vec<StepJob> = orphans
                .iter()
                .filter(|o| o.state == InstanceState::Ready)
                .map(|o| StepJob::new(o.id, o.step_seq, o.fence, o.route.clone()))
                .chain(requeued.admitted.iter().map(|a| {
                    let job = a.job();
                    StepJob::new(job.instance, job.step_seq, job.fence, job.route)
                }))
                .collect();
            // The rows are READY already: if this publish fails, the stale-READY sweeper
            // re-dispatches them.
            if let Err(err) = self.bus.publish_jobs(&jobs).await {
                tracing::warn!(%err, "publishing requeued jobs failed; the sweeper will re-dispatch");
            }
            let _ = msg.ack_with(AckKind::Progress).await;
        }
    }
}
