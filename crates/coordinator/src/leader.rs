//! The leader lease loop and the sweepers only the leader runs.

use std::time::{Duration, Instant};

use drover_bus::{Bus, RecoveryTask};
use drover_core::backoff::Backoff;
use drover_core::{NodeId, StepJob};
use drover_store::{Admitted, COORDINATOR_LEASE, LeaderTerm, Orphan, Store};
use tokio_util::sync::CancellationToken;

use drover_core::definition::millis;

use crate::{CoordinatorConfig, Result};

/// READY for this long when a node is declared dead: its job may be one the dead node held.
/// A node is declared dead at least `gone_after` (600 ms) after its last heartbeat, and a
/// frozen one's last pull request has expired by then (2 s, within the 3 s of silence), so
/// every job it could have held was sent to it — its instance READY — before this.
const HELD_JOB_AGE: Duration = Duration::from_millis(500);

/// At most this many READY instances published again when nodes die (the oldest first; the
/// stale-READY sweeper takes the rest).
const REDISPATCH_AT_DEATH: i64 = 5000;

/// Holds (or waits for) the leader lease and, while leading, does the leader's work.
pub struct LeaderLoop {
    node: NodeId,
    store: Store,
    bus: Bus,
    config: CoordinatorConfig,
    term: Option<LeaderTerm>,
    last_orphan_scan: Option<Instant>,
    last_stale_scan: Option<Instant>,
    last_reconcile: Option<Instant>,
    last_prune: Option<Instant>,
    last_sample: Option<Instant>,
    /// When the earliest schedule is due (checked between ticks too).
    schedule_due: Option<Instant>,
    /// No node is declared dead before this: after an outage of this loop's own (Postgres
    /// away, most likely for everyone), the others get `dead_after` to heartbeat again
    /// before their silence counts.
    declare_after: Option<Instant>,
}

impl LeaderLoop {
    pub fn new(node: NodeId, store: Store, bus: Bus, config: CoordinatorConfig) -> Self {
        Self {
            node,
            store,
            bus,
            config,
            term: None,
            last_orphan_scan: None,
            last_stale_scan: None,
            last_reconcile: None,
            last_prune: None,
            last_sample: None,
            schedule_due: None,
            declare_after: None,
        }
    }

    /// Leads (or waits to) until `shutdown`. Never fails: a tick that fails (Postgres or
    /// NATS away, a stream gone) is tried again with capped back-off — short of the lease TTL,
    /// so a leader keeps its lease through a NATS outage — and the outage is logged once.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let cap = (self.config.lease_ttl / 4).max(self.config.tick);
        let mut backoff = Backoff::new(self.config.tick, cap);
        let mut delay = Duration::ZERO;
        // Whether the last tick succeeded.
        let mut healthy = true;
        loop {
            // Between ticks, while leading, look for nodes whose process is gone.
            let next_tick = Instant::now() + delay;
            loop {
                let now = Instant::now();
                if now >= next_tick {
                    break;
                }
                let nap = (next_tick - now).min(self.config.liveness_every);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(nap) => {}
                }
                if shutdown.is_cancelled() {
                    break;
                }
                // Not while the leader's own ticks fail: after an outage (a Postgres restart
                // ends every session, so every liveness lock) nodes need a moment to lock and
                // heartbeat again, which the tick's grace (`declare_after`) gives them.
                if let Some(term) = self.term
                    && healthy
                    && Instant::now() < next_tick
                    && let Err(err) = self.declare_dead(term).await
                {
                    tracing::debug!(%err, leader.term = %term, "looking for gone nodes failed");
                }
                if let Some(term) = self.term
                    && self.schedule_due.is_some_and(|at| Instant::now() >= at)
                {
                    match crate::scheduler::fire_due(&self.store, &self.bus, self.node, term).await
                    {
                        Ok(due) => self.schedule_due = due,
                        Err(err) => {
                            tracing::debug!(%err, leader.term = %term, "firing schedules failed")
                        }
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            delay = self.config.tick;
            let ticked = self.tick().await;
            healthy = ticked.is_ok();
            match ticked {
                Ok(()) => {
                    if let Some(recovered) = backoff.succeeded() {
                        tracing::info!(after = ?recovered.after, failures = recovered.failures, leader.term = ?self.term, "coordinator working again");
                        self.declare_after = Some(Instant::now() + self.config.dead_after);
                    }
                }
                Err(err) => {
                    let failure = backoff.failed();
                    if failure.first {
                        tracing::warn!(%err, leader.term = ?self.term, "coordinator tick failed; retrying with back-off");
                    } else {
                        tracing::debug!(%err, leader.term = ?self.term, "coordinator tick failed again");
                    }
                    if let crate::Error::Bus(err) = &err
                        && err.needs_provisioning()
                        && let Err(err) = self.bus.provision().await
                    {
                        tracing::debug!(%err, "provisioning again failed");
                    }
                    delay = failure.delay.max(self.config.tick);
                }
            }
        }
        if let Some(term) = self.term.take() {
            // Hand over at once instead of making the others wait out the TTL.
            let _ = self
                .store
                .release_lease(COORDINATOR_LEASE, self.node, term)
                .await;
            tracing::info!(leader.term = %term, "leader lease released");
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        let ttl = millis(self.config.lease_ttl);
        match self.term {
            Some(term) => {
                if !self
                    .store
                    .renew_lease(COORDINATOR_LEASE, self.node, term, ttl)
                    .await?
                {
                    tracing::warn!(leader.term = %term, "leader lease lost");
                    self.term = None;
                    return Ok(());
                }
            }
            None => {
                let Some(term) = self
                    .store
                    .acquire_lease(COORDINATOR_LEASE, self.node, ttl)
                    .await?
                else {
                    return Ok(());
                };
                tracing::info!(leader.term = %term, node.id = %self.node, "became leader");
                self.term = Some(term);
                self.last_orphan_scan = None;
            }
        }
        metrics::gauge!("drover_leader_is_leader").set(if self.term.is_some() { 1.0 } else { 0.0 });
        let Some(term) = self.term else { return Ok(()) };
        self.declare_dead(term).await?;
        self.rescan_orphans(term).await?;
        self.requeue_overdue(term).await?;
        self.wake_due(term).await?;
        self.schedule_due =
            crate::scheduler::fire_due(&self.store, &self.bus, self.node, term).await?;
        self.redispatch_stale_ready().await?;
        self.reconcile_permits(term).await?;
        self.prune_nodes().await?;
        self.sample_gauges(term).await?;
        Ok(())
    }

    /// The cluster gauges ([`crate::gauges`]), every 5 s.
    async fn sample_gauges(&mut self, term: LeaderTerm) -> Result<()> {
        if self
            .last_sample
            .is_some_and(|at| at.elapsed() < Duration::from_secs(5))
        {
            return Ok(());
        }
        self.last_sample = Some(Instant::now());
        // Metrics never stop the leader's work.
        if let Err(err) = crate::gauges::sample(&self.store, &self.bus, term).await {
            tracing::debug!(%err, "sampling the cluster gauges failed");
        }
        Ok(())
    }

    /// Rows of nodes dead or left for longer than the retention go, once a minute.
    async fn prune_nodes(&mut self) -> Result<()> {
        if self
            .last_prune
            .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
        {
            return Ok(());
        }
        self.last_prune = Some(Instant::now());
        let pruned = self
            .store
            .prune_nodes(millis(self.config.node_retention), 1000)
            .await?;
        if pruned > 0 {
            tracing::info!(pruned, "pruned the rows of long-gone nodes");
        }
        Ok(())
    }

    /// Nodes silent past the deadline, or gone (see [`CoordinatorConfig::gone_after`]), become
    /// DEAD; each gets a recovery task.
    async fn declare_dead(&self, term: LeaderTerm) -> Result<()> {
        if self.declare_after.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        let dead = self
            .store
            .declare_dead_nodes(
                self.node,
                term,
                millis(self.config.dead_after),
                millis(self.config.gone_after),
            )
            .await?;
        for node in &dead {
            tracing::warn!(node.id = %node, leader.term = %term, "node declared dead");
            self.bus
                .publish_recovery(&RecoveryTask::new(*node, term.0), &format!("t{term}"))
                .await?;
        }
        if let Some(first) = dead.first() {
            self.redispatch_held_jobs(*first).await?;
        }
        Ok(())
    }

    /// A dead node may have held jobs it was sent but never started (prefetched, unacked):
    /// the server hands them out again only after the ack wait, and the stale-READY sweeper
    /// only after `stale_ready_after`. So when nodes are declared dead, the READY instances
    /// waiting for longer than a pull request lives are published again at once, under a
    /// message id of their own. A job is only a hint: where the first copy also arrives,
    /// one claim wins and the other finds the instance moved on.
    async fn redispatch_held_jobs(&self, dead: NodeId) -> Result<()> {
        let tag = format!("d{}", dead.0.simple());
        let count = self
            .redispatch_ready(HELD_JOB_AGE, REDISPATCH_AT_DEATH, &tag)
            .await?;
        if count > 0 {
            tracing::info!(
                count,
                node.id = %dead,
                "re-dispatched READY instances whose jobs the dead node may have held"
            );
        }
        Ok(())
    }

    /// Publishes again the jobs of up to `limit` READY instances waiting for longer than
    /// `age` (oldest first, on queues a live worker serves), under message ids tagged `tag`;
    /// how many.
    async fn redispatch_ready(&self, age: Duration, limit: i64, tag: &str) -> Result<usize> {
        let ready = self.store.stale_ready(millis(age), limit).await?;
        if !ready.is_empty() {
            self.bus.redispatch_jobs(&ready, tag).await?;
        }
        Ok(ready.len())
    }

    /// Dead nodes still owning RUNNING instances get their task again (one may have been
    /// lost, or its consumer died mid-way): every few seconds, and on becoming leader.
    async fn rescan_orphans(&mut self, term: LeaderTerm) -> Result<()> {
        if self
            .last_orphan_scan
            .is_some_and(|at| at.elapsed() < Duration::from_secs(5))
        {
            return Ok(());
        }
        self.last_orphan_scan = Some(Instant::now());
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 10)
            .unwrap_or(0);
        for node in self.store.dead_nodes_with_orphans().await? {
            self.bus
                .publish_recovery(&RecoveryTask::new(node, term.0), &format!("e{epoch}"))
                .await?;
        }
        Ok(())
    }

    /// RUNNING past the step deadline on a live node: a stuck worker. Take them back.
    async fn requeue_overdue(&self, term: LeaderTerm) -> Result<()> {
        let requeued = self
            .store
            .requeue_overdue(self.node, term, self.config.requeue_batch)
            .await?;
        let orphans = requeued.orphans;
        let jobs: Vec<StepJob> = orphans
            .iter()
            .filter(|o| o.state == drover_core::InstanceState::Ready)
            .map(Orphan::job)
            .chain(requeued.admitted.iter().map(Admitted::job))
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "requeued instances that overran their step timeout"
            );
        }
        if !jobs.is_empty() {
            self.bus.publish_jobs(&jobs).await?;
        }
        Ok(())
    }

    /// Timers that have come (sleeps, wait_event timeouts): WAITING → READY, then dispatch.
    async fn wake_due(&self, term: LeaderTerm) -> Result<()> {
        loop {
            let woken = self
                .store
                .wake_due(self.node, term, self.config.requeue_batch)
                .await?;
            if !woken.is_empty() {
                self.bus.publish_jobs(&woken).await?;
            }
            if (woken.len() as i64) < self.config.requeue_batch {
                return Ok(());
            }
        }
    }

    /// The campaign semaphore's invariants (I1–I5), every `reconcile_every`: counter drift is
    /// repaired (and a stalled queue admitted) by the store; every finding is logged at error
    /// and announced as a `permit_drift` campaign event (written with the repair).
    async fn reconcile_permits(&mut self, term: LeaderTerm) -> Result<()> {
        if self
            .last_reconcile
            .is_some_and(|at| at.elapsed() < self.config.reconcile_every)
        {
            return Ok(());
        }
        self.last_reconcile = Some(Instant::now());
        let reconciled = self.store.reconcile_permits(self.node, term).await?;
        for drift in &reconciled.drift {
            metrics::counter!(
                "drover_semaphore_drift_total",
                "campaign" => drift.campaign.clone(),
                "kind" => drift.kind.as_str()
            )
            .increment(1);
            tracing::error!(
                campaign = %drift.campaign,
                kind = drift.kind.as_str(),
                repaired = drift.repaired,
                leader.term = %term,
                "campaign permit drift: {}",
                drift.detail
            );
        }
        let jobs: Vec<StepJob> = reconciled.admitted.iter().map(Admitted::job).collect();
        if !jobs.is_empty() {
            self.bus.publish_jobs(&jobs).await?;
        }
        Ok(())
    }

    /// READY for long means the job was lost (failed publish, purged stream, a delayed retry
    /// whose node stopped): publish it again. The msg id deduplicates a job still queued.
    async fn redispatch_stale_ready(&mut self) -> Result<()> {
        if self
            .last_stale_scan
            .is_some_and(|at| at.elapsed() < Duration::from_secs(2))
        {
            return Ok(());
        }
        self.last_stale_scan = Some(Instant::now());
        // A fresh message id per 10 s window: the first publish may still be in the duplicate
        // window, unacknowledged with a worker that died, and must not swallow this one.
        let window = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() / 10)
            .unwrap_or(0);
        let count = self
            .redispatch_ready(self.config.stale_ready_after, 5000, &format!("s{window}"))
            .await?;
        if count > 0 {
            tracing::info!(count, "re-dispatched stale READY instances");
        }
        Ok(())
    }
}
