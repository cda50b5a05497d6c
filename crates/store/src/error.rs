use drover_core::{InstanceId, InstanceState, NodeId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unknown campaign {0:?}")]
    UnknownCampaign(String),
    #[error("unknown workflow {0:?}")]
    UnknownWorkflow(String),
    #[error("unknown instance {0}")]
    UnknownInstance(InstanceId),
    /// The instance has finished (`completed`, `failed` or `stopped`): it takes nothing more.
    #[error("instance {id} has finished ({state})")]
    InstanceFinished {
        id: InstanceId,
        state: InstanceState,
    },
    /// An event name that is not a slug (`[a-z0-9][a-z0-9_-]{0,62}`), so no step waits for it.
    #[error("event name {0:?} is not a slug ([a-z0-9][a-z0-9_-]{{0,62}})")]
    InvalidEventName(String),
    /// A campaign name that is not a slug (it appears in event subjects).
    #[error("campaign name {0:?} is not a slug ([a-z0-9][a-z0-9_-]{{0,62}})")]
    InvalidCampaignName(String),
    /// A campaign limit outside 1..=100000.
    #[error("campaign limit {0} is out of range (1 to 100000)")]
    InvalidLimit(i64),
    #[error("campaign {0:?} exists already")]
    CampaignExists(String),
    /// The campaign was created without a limit: its instances hold no permits, so one cannot
    /// be imposed later.
    #[error(
        "campaign {0:?} has no limit (it was created without one); create a limited campaign instead"
    )]
    UnlimitedCampaign(String),
    /// A token name that is not a slug, or the reserved `bootstrap`.
    #[error("token name {0:?} is not a slug ([a-z0-9][a-z0-9_-]{{0,62}}) or is reserved")]
    InvalidTokenName(String),
    /// A live (neither revoked nor expired) token has this name.
    #[error("token {0:?} exists already; revoke it first to reuse its name")]
    TokenExists(String),
    /// A schedule name that is not a slug.
    #[error("schedule name {0:?} is not a slug ([a-z0-9][a-z0-9_-]{{0,62}})")]
    InvalidScheduleName(String),
    /// A cron expression, time zone, interval, bound or backfill range that cannot be used.
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    #[error("schedule {0:?} exists already")]
    ScheduleExists(String),
    #[error("unknown schedule {0:?}")]
    UnknownSchedule(String),
    /// The workflow has no such version (or it was deleted).
    #[error("workflow {workflow:?} has no version {version}")]
    UnknownVersion { workflow: String, version: i32 },
    /// A workflow (version) to delete is used by live instances (anything not ended).
    #[error(
        "workflow {workflow:?} is used by {live} live instances (e.g. {}); stop them first, or \
         delete with --stop-instances to kill them", examples.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    WorkflowLive {
        workflow: String,
        live: i64,
        /// A few of them.
        examples: Vec<InstanceId>,
    },
    /// A workflow to delete (or its latest version) is what schedules start.
    #[error(
        "workflow {workflow:?} is started by schedules {}; delete them or point them at \
         another workflow first", schedules.join(", ")
    )]
    WorkflowScheduled {
        workflow: String,
        schedules: Vec<String>,
    },
    /// A campaign to delete has instances live or queued.
    #[error(
        "campaign {campaign:?} is not empty: {live} instances live, {queued} of them queued; \
         stop or finish them first"
    )]
    CampaignNotEmpty {
        campaign: String,
        live: i64,
        queued: i64,
    },
    /// A campaign to delete is where schedules start their instances.
    #[error(
        "campaign {campaign:?} is used by schedules {}; delete them or move them to another \
         campaign first", schedules.join(", ")
    )]
    CampaignScheduled {
        campaign: String,
        schedules: Vec<String>,
    },
    /// `default` is where instances started without a campaign go: it cannot be deleted.
    #[error(
        "campaign \"default\" cannot be deleted: instances started without --campaign go there"
    )]
    DefaultCampaign,
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// Another session holds the node's liveness lock.
    #[error("the liveness lock of node {0} is held by another session")]
    LivenessHeld(NodeId),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

impl Error {
    /// Would the same call likely succeed if tried again later?
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(err) => match err {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => {
                    let code = db.code();
                    let code = code.as_deref().unwrap_or_default();
                    // connection_exception (08…: the server went away mid-session),
                    // serialization_failure, deadlock_detected, admin/crash shutdown,
                    // cannot_connect_now (starting up or shutting down), too_many_connections
                    code.starts_with("08")
                        || matches!(
                            code,
                            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300"
                        )
                }
                _ => false,
            },
            _ => false,
        }
    }
}
