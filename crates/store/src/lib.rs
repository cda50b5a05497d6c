//! All of Drover's SQL: the schema (embedded migrations), definitions, campaigns and their
//! semaphore (`semaphore`: permits, the queue, the reconciler), instances, the journal, the
//! event outbox and nodes.
//!
//! # Fencing
//! Every worker write is a compare-and-set on the instance row: a claim needs the `(step_seq,
//! fence)` of the job and state `ready`, and bumps `fence`; a commit needs the claimed `fence`,
//! the same `step_seq`, state `running` and the committing node as owner. A paused, partitioned
//! or duplicate worker that wakes up finds 0 rows and its write does nothing. The journal's
//! primary key `(instance_id, step_seq)` makes a double commit impossible even if the CAS were
//! wrong. Events are written to `event_fact` in the transaction of the transition they describe
//! (see the `facts` module).

mod audit;
mod campaigns;
mod claim;
mod commit;
mod definitions;
mod deletes;
mod diagnosis;
mod error;
mod facts;
mod instances;
mod lease;
mod lifecycle;
mod liveness;
mod maintenance;
mod model;
mod nodes;
mod operations;
mod operator;
mod recovery;
mod schedules;
mod semaphore;
mod tokens;
mod waiting;

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use deletes::{CampaignPauseChange, WorkflowDelete, WorkflowDeleted};
pub use diagnosis::{
    ChildFacts, DiagnosedInstance, DiagnosisFacts, MAX_LISTED_HOLDERS, PermitHolder,
};
pub use error::{Error, Result};
pub use facts::{RELAY_LEASE, RELAY_PARTS};
pub use instances::EndListener;
pub use lease::{COORDINATOR_LEASE, LeaderTerm};
pub use lifecycle::{
    Acted, LifecycleAction, LifecycleBatch, LifecycleChange, LifecycleFilter, LifecycleOutcome,
    Refusal, Restart, Restarted,
};
pub use liveness::Liveness;
pub use maintenance::{
    CampaignRetention, CleanupBatch, FinishedCursor, PausedAction, PausedInstance,
};
pub use model::*;
pub use nodes::{Heartbeat, NewNode};
pub use operations::{NewOperation, OperationEnd, OperationRecord};
pub use operator::{Resume, Resumed};
pub use recovery::Requeued;
pub use schedules::{
    CadenceSpec, DEFAULT_CATCHUP_WINDOW, MAX_BACKFILL, ManualFire, ManualFires, NewSchedule,
    Schedule, ScheduleFire, SchedulerPass,
};
pub use semaphore::{
    Admitted, CampaignStatus, Drift, DriftKind, LIMIT_RANGE, LimitSet, NewCampaign, OnErrorPermit,
    Reconciled, SEMAPHORE_ACTOR,
};
pub use tokens::{ApiToken, BOOTSTRAP_TOKEN, NewToken};

/// The embedded schema migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// How to reach Postgres.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub url: String,
    /// Pool size. Group commit needs few connections: a handful per role is plenty.
    pub max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/drover".to_owned(),
            max_connections: 10,
        }
    }
}

/// A handle on Drover's database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Campaigns known to have no limit. A limit is set at creation or never (and ids are
    /// never reused), so one found unlimited stays so: a start into it need not ask again.
    unlimited: Arc<RwLock<HashSet<i64>>>,
}

/// Unlimited campaigns remembered at most; past this the memory starts over.
const UNLIMITED_REMEMBERED: usize = 10_000;

impl Store {
    /// Connects a pool (no migrations: run [`Store::migrate`] or `drover migrate`).
    pub async fn connect(config: &StoreConfig) -> Result<Self> {
        let options: PgConnectOptions = config.url.parse()?;
        let options = options
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1))
            .application_name("drover");
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self::from_pool(pool))
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            unlimited: Arc::default(),
        }
    }

    /// Are all of `campaigns` known to be unlimited (see [`Store::remember_unlimited`])?
    pub(crate) fn known_unlimited(&self, campaigns: &[i64]) -> bool {
        let known = self
            .unlimited
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        campaigns.iter().all(|id| known.contains(id))
    }

    /// Remembers `campaigns`, read without a limit.
    pub(crate) fn remember_unlimited(&self, campaigns: &[i64]) {
        let mut known = self
            .unlimited
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if known.len() + campaigns.len() > UNLIMITED_REMEMBERED {
            known.clear();
        }
        known.extend(campaigns);
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// One round trip to the database (for readiness checks).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies pending migrations; safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
}
