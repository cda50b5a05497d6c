//! The outbox relay: sends committed events to NATS, oldest first, without ever holding a
//! transaction across a publish. Postgres or NATS away, or the events stream deleted, only
//! delay events: the relay retries with capped back-off (provisioning the stream again if it
//! is gone) and logs the outage once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use drover_bus::Bus;
use drover_core::backoff::Backoff;
use drover_core::definition::millis;
use drover_store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Relay tuning.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Events claimed per round.
    pub batch: i64,
    /// How long a claim lasts before another relay may resend the events. A relay killed
    /// between claim and send delays its batch by this much; a resend after a slow round is
    /// harmless (JetStream drops it by message id), so it is short.
    pub claim: Duration,
    /// Poll interval when nobody wakes the relay.
    pub idle_poll: Duration,
    /// How long a woken relay waits for more commits before it sends: one round then carries
    /// the events of many commits (two statements per round, not per commit).
    pub linger: Duration,
    /// How long relayed events stay in the outbox (for replay by hand) before they are
    /// purged (`drover node --outbox-replay-window`).
    pub replay_window: Duration,
    /// Most relayed events deleted per statement. The relay purges one batch between its
    /// rounds, every minute or, while old events remain, every round: a backlog never
    /// holds up relaying.
    pub purge_batch: i64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch: 1000,
            claim: Duration::from_secs(5),
            idle_poll: Duration::from_millis(200),
            linger: Duration::from_millis(10),
            replay_window: Duration::from_secs(3600),
            purge_batch: 5000,
        }
    }
}

/// How often the relay purges relayed events past the replay window (with no backlog).
const PURGE_EVERY: Duration = Duration::from_secs(60);

pub struct OutboxRelay {
    store: Store,
    bus: Bus,
    config: RelayConfig,
    wakeup: Arc<Notify>,
}

impl OutboxRelay {
    pub fn new(store: Store, bus: Bus, config: RelayConfig, wakeup: Arc<Notify>) -> Self {
        Self {
            store,
            bus,
            config,
            wakeup,
        }
    }

    /// Relays until `shutdown`. Never fails: trouble is waited out.
    pub async fn run(self, shutdown: CancellationToken) -> crate::Result<()> {
        let mut next_purge = tokio::time::Instant::now() + PURGE_EVERY;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let sent = match self.round().await {
                Ok(sent) => {
                    if let Some(recovered) = backoff.succeeded() {
                        tracing::info!(after = ?recovered.after, failures = recovered.failures, "outbox relay sending again");
                    }
                    sent
                }
                Err(err) => {
                    let failure = backoff.failed();
                    if failure.first {
                        tracing::warn!(%err, "outbox relay cannot send; retrying with back-off");
                    } else {
                        tracing::debug!(%err, "outbox relay round failed again");
                    }
                    if let crate::Error::Bus(err) = &err
                        && err.needs_provisioning()
                    {
                        match self.bus.provision().await {
                            Ok(()) => {
                                tracing::warn!("the events stream was gone: provisioned it again")
                            }
                            Err(err) => tracing::debug!(%err, "provisioning again failed"),
                        }
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(failure.delay) => {}
                    }
                    continue;
                }
            };
            if tokio::time::Instant::now() >= next_purge {
                next_purge = tokio::time::Instant::now() + PURGE_EVERY;
                match self
                    .store
                    .purge_relayed(millis(self.config.replay_window), self.config.purge_batch)
                    .await
                {
                    // A full batch: more are due, purged next round.
                    Ok(purged) if purged as i64 >= self.config.purge_batch => {
                        next_purge = tokio::time::Instant::now();
                    }
                    Ok(_) => {}
                    // Tried again in a minute.
                    Err(err) => tracing::warn!(%err, "outbox purge failed"),
                }
            }
            if sent as i64 >= self.config.batch {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    // One last round so events of the final commits go out.
                    let _ = self.round().await;
                    return Ok(());
                }
                () = self.wakeup.notified() => {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(self.config.linger) => {}
                    }
                }
                () = tokio::time::sleep(self.config.idle_poll) => {}
            }
        }
    }

    /// Relays one batch; returns how many were sent, or why not all could be.
    async fn round(&self) -> crate::Result<usize> {
        let pending = self
            .store
            .claim_events(self.config.batch, millis(self.config.claim))
            .await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let events: Vec<_> = pending.into_iter().map(|p| p.event).collect();
        let relayed = self.bus.relay(&events).await;
        self.store.mark_relayed(&relayed.ids).await?;
        if relayed.ids.len() < events.len() {
            let sent: HashSet<_> = relayed.ids.iter().collect();
            let failed: Vec<_> = events
                .iter()
                .map(|e| e.id)
                .filter(|id| !sent.contains(id))
                .collect();
            self.store.release_events(&failed).await?;
        }
        match relayed.failure {
            Some(err) => Err(err.into()),
            None => Ok(relayed.ids.len()),
        }
    }
}
