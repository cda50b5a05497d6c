//! The outbox relay: sends committed events to NATS, each instance's in sequence order,
//! without ever holding a transaction across a publish. It sends the events of the outbox
//! partitions it holds a lease on (a fair share of them; see `drover_store`'s facts module),
//! so no two relays send one instance's events at once. Postgres or NATS away, or the events
//! stream deleted, only delay events: the relay retries with capped back-off (provisioning
//! the stream again if it is gone) and logs the outage once.

use std::sync::Arc;
use std::time::Duration;

use drover_bus::Bus;
use drover_core::backoff::Backoff;
use drover_core::definition::millis;
use drover_store::Store;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Relay tuning.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Events sent per round.
    pub batch: i64,
    /// How often the relay renews its partition leases (and rebalances them as nodes come
    /// and go); well inside [`drover_store::RELAY_LEASE`].
    pub renew: Duration,
    /// Poll interval when nobody wakes the relay (a commit wakes its own node's relay, whose
    /// partitions may not hold its events).
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
            renew: Duration::from_secs(1),
            idle_poll: Duration::from_millis(50),
            linger: Duration::from_millis(10),
            replay_window: Duration::from_secs(3600),
            purge_batch: 5000,
        }
    }
}

/// How often the relay purges relayed events past the replay window (with no backlog).
const PURGE_EVERY: Duration = Duration::from_secs(60);

pub struct OutboxRelay {
    /// Whose leases these are.
    id: Uuid,
    store: Store,
    bus: Bus,
    config: RelayConfig,
    wakeup: Arc<Notify>,
}

impl OutboxRelay {
    pub fn new(store: Store, bus: Bus, config: RelayConfig, wakeup: Arc<Notify>) -> Self {
        Self {
            id: Uuid::now_v7(),
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
        let mut leases = Leases::default();
        loop {
            let sent = match self.round(&mut leases).await {
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
                        () = shutdown.cancelled() => return self.stop().await,
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
                    return self.stop().await;
                }
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    // One last round so events of the final commits go out.
                    let _ = self.round(&mut leases).await;
                    return self.stop().await;
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

    /// Gives the partitions back so other relays take them at once.
    async fn stop(&self) -> crate::Result<()> {
        if let Err(err) = self.store.release_relay_parts(self.id).await {
            tracing::debug!(%err, "relay partitions not given back; their leases lapse");
        }
        Ok(())
    }

    /// Relays one batch of the partitions it holds; returns how many were sent, or why not
    /// all could be.
    async fn round(&self, leases: &mut Leases) -> crate::Result<usize> {
        if leases
            .renewed
            .is_none_or(|at| at.elapsed() >= self.config.renew)
        {
            leases.parts = self.store.lease_relay_parts(self.id).await?;
            leases.renewed = Some(Instant::now());
        }
        let facts = self
            .store
            .unrelayed_facts(&leases.parts, self.config.batch)
            .await?;
        if facts.is_empty() {
            return Ok(0);
        }
        let relayed = self.bus.relay(&facts).await;
        self.store.mark_relayed(&relayed.ids).await?;
        match relayed.failure {
            Some(err) => Err(err.into()),
            None => Ok(relayed.ids.len()),
        }
    }
}

/// The partitions a relay holds, and when it last renewed them.
#[derive(Default)]
struct Leases {
    parts: Vec<i16>,
    renewed: Option<Instant>,
}
