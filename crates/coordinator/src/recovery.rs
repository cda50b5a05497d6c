//! Every coordinator consumes recovery tasks: requeue a dead node's instances in batches.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use drover_bus::{Bus, RecoveryTask, StepJob};
use drover_core::InstanceState;
use drover_store::Store;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{CoordinatorConfig, Error, Result, orphan_events};

/// Tasks handled at once by one replica. Small, so that with several replicas each pulls
/// its share of the tasks rather than one replica taking them all.
const CONCURRENT_TASKS: usize = 2;

pub struct RecoveryConsumer {
    node: drover_core::NodeId,
    store: Store,
    bus: Bus,
    config: CoordinatorConfig,
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
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let consumer = self.bus.recovery_consumer().await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(1)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let this = &self;
        messages
            .take_until(shutdown.cancelled())
            .for_each_concurrent(CONCURRENT_TASKS, |msg| async move {
                match msg {
                    Ok(msg) => this.handle(msg).await,
                    Err(err) => tracing::warn!(%err, "recovery stream error"),
                }
            })
            .await;
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
            Ok(0) => {
                let _ = msg.ack().await;
            }
            Ok(count) => {
                tracing::info!(node.id = %task.node, count, "recovered the instances of a dead node");
                let _ = msg.ack().await;
            }
            Err(err) => {
                tracing::warn!(node.id = %task.node, %err, "recovery task failed; it will be redelivered");
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
                .map(|r| StepJob::new(r.instance, r.step_seq, r.fence))
                .collect();
            self.bus
                .redispatch_jobs(&jobs, &format!("dead-{}", task.node))
                .await?;
        }
        Ok(total + ready.len())
    }

    async fn requeue_running(&self, task: &RecoveryTask, msg: &Message) -> Result<usize> {
        let bus = &self.bus;
        let mut total = 0;
        loop {
            let requeued = self
                .store
                .requeue_orphans(
                    task.node,
                    self.node,
                    self.config.requeue_batch,
                    |o| orphan_events(bus, o),
                    bus,
                )
                .await?;
            let orphans = requeued.orphans;
            if orphans.is_empty() {
                return Ok(total);
            }
            total += orphans.len();
            let jobs: Vec<StepJob> = orphans
                .iter()
                .filter(|o| o.state == InstanceState::Ready)
                .map(|o| StepJob::new(o.id, o.step_seq, o.fence))
                .chain(requeued.admitted.iter().map(|a| {
                    let job = a.job();
                    StepJob::new(job.instance, job.step_seq, job.fence)
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
