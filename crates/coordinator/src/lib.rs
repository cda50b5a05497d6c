//! The coordinator role. Any number of replicas run; one holds the leader lease.
//!
//! - The **leader** ([`LeaderLoop`]) renews its lease every `tick`, declares nodes dead after
//!   `dead_after` of silence — or, every `liveness_every`, once their process is gone (their
//!   liveness lock released) and their heartbeat `gone_after` late — and publishes one recovery
//!   task per dead node, and runs the
//!   sweepers: stale READY rows re-dispatched, RUNNING rows past their deadline taken back;
//!   and fires the due schedules (see `scheduler`).
//!   Every leader write checks the lease term in its own statement, so a leader that was
//!   paused past its lease writes nothing.
//! - **Every replica** ([`RecoveryConsumer`]) consumes recovery tasks from a work queue, so
//!   requeue work spreads across replicas and a dying replica's task is redelivered. A requeue
//!   moves a dead node's RUNNING instances to READY with `fence + 1` in batches and publishes
//!   their jobs; normal execution never waits for it.

mod gauges;
mod leader;
mod recovery;
mod scheduler;

use std::time::Duration;

use drover_bus::Bus;
use drover_core::NodeId;
use drover_store::Store;
use tokio_util::sync::CancellationToken;

pub use leader::LeaderLoop;
pub use recovery::RecoveryConsumer;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] drover_store::Error),
    #[error(transparent)]
    Bus(#[from] drover_bus::Error),
}

impl Error {
    /// Would the same call likely succeed later (Postgres or NATS away, a stream gone)?
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(err) => err.is_transient(),
            Error::Bus(err) => err.is_transient(),
        }
    }
}

/// Coordinator timing. If unsure, keep the defaults: they give orphan-to-redispatch well
/// under 5 s after a `kill -9`.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How often the leader renews and sweeps (and a follower tries to acquire).
    pub tick: Duration,
    /// The lease's time to live: a dead leader is replaced within about this long.
    pub lease_ttl: Duration,
    /// Silence after which a node is declared dead (nodes heartbeat every 250 ms).
    pub dead_after: Duration,
    /// A node whose process is gone (its liveness lock released: it crashed or was killed)
    /// is declared dead once its heartbeat is this late, well before `dead_after`.
    pub gone_after: Duration,
    /// How often the leader looks for nodes whose process is gone, between its ticks.
    pub liveness_every: Duration,
    /// READY for longer than this means the job was probably lost: re-dispatch it.
    pub stale_ready_after: Duration,
    /// Instances requeued per transaction.
    pub requeue_batch: i64,
    /// How long rows of dead and departed nodes stay in the node table (`drover nodes`) before
    /// the leader prunes them.
    pub node_retention: Duration,
    /// How often the leader checks the campaign semaphore's invariants (and repairs counter
    /// drift). Cheap: one short transaction per limited campaign.
    pub reconcile_every: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(5),
            dead_after: Duration::from_secs(3),
            gone_after: Duration::from_millis(600),
            liveness_every: Duration::from_millis(100),
            stale_ready_after: Duration::from_secs(10),
            requeue_batch: 500,
            reconcile_every: Duration::from_secs(10),
            node_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// The coordinator role of one node: the leader loop and the recovery consumer.
pub struct Coordinator {
    pub node: NodeId,
    pub store: Store,
    pub bus: Bus,
    pub config: CoordinatorConfig,
}

impl Coordinator {
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let leader = LeaderLoop::new(
            self.node,
            self.store.clone(),
            self.bus.clone(),
            self.config.clone(),
        );
        let recovery = RecoveryConsumer::new(self.node, self.store, self.bus, self.config);
        let (a, b) = tokio::join!(leader.run(shutdown.clone()), async {
            let result = recovery.run(shutdown.clone()).await;
            // Either half failing stops the role (and so the node).
            shutdown.cancel();
            result
        });
        a.and(b)
    }
}

/// Describes the coordinator's metrics (their `# HELP`) and registers those a quiet cluster has
/// not recorded yet, so that dashboards and alerts find every series from the start.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "drover_instances",
        "Instances per state (sampled by the leader)."
    );
    describe_gauge!(
        "drover_campaign_permits_in_use",
        "Permits held in a limited campaign (sampled by the leader)."
    );
    describe_gauge!(
        "drover_campaign_permits_limit",
        "A limited campaign's limit (sampled by the leader)."
    );
    describe_gauge!(
        "drover_campaign_queued_instances",
        "Instances queued for a limited campaign's permits (sampled by the leader)."
    );
    describe_gauge!(
        "drover_outbox_backlog_events",
        "Events written and not yet published (sampled by the leader)."
    );
    describe_gauge!(
        "drover_outbox_relay_lag_seconds",
        Unit::Seconds,
        "Age of the oldest event not yet published (sampled by the leader)."
    );
    describe_gauge!(
        "drover_jobs_pending",
        "Jobs of a worker queue not yet delivered (sampled by the leader)."
    );
    describe_gauge!(
        "drover_jobs_unsettled",
        "Jobs of a worker queue delivered and not yet settled (sampled by the leader)."
    );
    describe_gauge!(
        "drover_leader_term",
        "The leader's lease term (set by the leader)."
    );
    describe_gauge!(
        "drover_leader_is_leader",
        "1 on the coordinator that leads, else 0."
    );
    describe_counter!(
        "drover_semaphore_drift_total",
        "Campaign permit counters found wrong (and repaired) by the leader."
    );
    describe_counter!(
        "drover_recovery_instances_requeued_total",
        "Instances of dead or departed nodes taken back."
    );
    describe_histogram!(
        "drover_recovery_redispatch_seconds",
        Unit::Seconds,
        "From a dead node's last heartbeat to its instances re-dispatched."
    );
    metrics::counter!("drover_recovery_instances_requeued_total").increment(0);
    metrics::counter!("drover_semaphore_drift_total").increment(0);
    metrics::gauge!("drover_leader_is_leader").set(0.0);
    let _ = metrics::histogram!("drover_recovery_redispatch_seconds");
}
