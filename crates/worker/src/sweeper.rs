//! Re-dispatches READY instances whose job seems lost (a publish that failed after its commit,
//! a purged stream, a delayed retry whose node stopped). Safe on every node at once: the job's
//! `Nats-Msg-Id` deduplicates, and a duplicate delivery only fails its claim.

use std::time::Duration;

use drover_bus::{Bus, StepJob};
use drover_store::Store;
use tokio_util::sync::CancellationToken;

pub struct ReadySweeper {
    store: Store,
    bus: Bus,
    /// READY for longer than this counts as lost.
    pub stale_after: Duration,
    pub every: Duration,
}

impl ReadySweeper {
    pub fn new(store: Store, bus: Bus) -> Self {
        Self {
            store,
            bus,
            stale_after: Duration::from_secs(30),
            every: Duration::from_secs(5),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> crate::Result<()> {
        let stale_ms = i64::try_from(self.stale_after.as_millis()).unwrap_or(i64::MAX);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.every) => {}
            }
            match self.store.stale_ready(stale_ms, 5000).await {
                Ok(stale) if !stale.is_empty() => {
                    let jobs: Vec<StepJob> = stale
                        .iter()
                        .map(|r| StepJob::new(r.instance, r.step_seq, r.fence))
                        .collect();
                    tracing::info!(count = jobs.len(), "re-dispatching stale READY instances");
                    if let Err(err) = self.bus.publish_jobs(&jobs).await {
                        tracing::warn!(%err, "re-dispatch failed");
                    }
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, "stale READY scan failed"),
            }
        }
    }
}
