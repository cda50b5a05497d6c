//! `drover node`: one process running the roles it is given, sharing one root shutdown token.
//! The first role to stop stops the node.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use drover_bus::{Bus, NatsRole};
use drover_coordinator::{Coordinator, CoordinatorConfig};
use drover_core::NodeId;
use drover_core::SubjectAllowList;
use drover_store::{Heartbeat, Store, StoreConfig};
use drover_worker::{
    DEFAULT_HTTP_DENY, EgressPolicy, EgressRule, EgressRules, Handlers, OutboxRelay, RelayConfig,
    Worker, WorkerConfig,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A role a node can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Worker,
    Api,
    Coordinator,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "worker" => Ok(Role::Worker),
            "api" => Ok(Role::Api),
            "coordinator" => Ok(Role::Coordinator),
            other => Err(format!(
                "unknown role {other:?} (known roles: worker, api, coordinator)"
            )),
        }
    }
}

impl Role {
    /// What the role does on NATS: picks the node's inbox and NATS user (one role: its own;
    /// several: `node`).
    pub fn nats_role(self) -> NatsRole {
        match self {
            Role::Worker => NatsRole::Worker,
            Role::Api => NatsRole::Api,
            Role::Coordinator => NatsRole::Coordinator,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Api => "api",
            Role::Coordinator => "coordinator",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Roles to run, comma-separated.
    #[arg(
        long,
        env = "DROVER_ROLES",
        value_delimiter = ',',
        default_value = "worker,api"
    )]
    pub roles: Vec<Role>,
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[command(flatten)]
    pub nats: crate::nats::NatsArgs,
    /// Subject prefix (and stream-name stem) of this cluster.
    #[arg(long, env = "DROVER_PREFIX", default_value = "drover")]
    pub prefix: String,
    /// Where the api role listens (port 0 picks a free one; the address is printed).
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Steps run at once by the worker role.
    #[arg(long, env = "DROVER_CONCURRENCY", default_value_t = 512)]
    pub concurrency: usize,
    /// Most jobs claimed and completions committed per statement.
    #[arg(long, env = "DROVER_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,
    /// Database pool size.
    #[arg(long, env = "DROVER_DB_POOL", default_value_t = 10)]
    pub db_pool: u32,
    /// READY this long (ms) counts as a lost job, re-dispatched by the leader coordinator.
    #[arg(long, env = "DROVER_STALE_READY_AFTER_MS", default_value_t = 10_000)]
    pub stale_ready_after_ms: u64,
    /// Serve Prometheus metrics (`drover_*`) on this address; off when unset.
    #[arg(long, env = "DROVER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Apply migrations before starting.
    #[arg(long, env = "DROVER_MIGRATE")]
    pub migrate: bool,
    /// API authentication: `on` (every request needs a bearer token) or `off` (anyone who
    /// reaches the API is an admin: for a laptop only; warned about at every start and in
    /// /readyz).
    #[arg(long, env = "DROVER_AUTH", default_value = "on", value_parser = ["on", "off"])]
    pub auth: String,
    /// The bootstrap admin token (at least 32 characters), accepted by the api role as an
    /// admin token named `bootstrap`. Prefer --admin-token-file; never pass it on a command
    /// line others can read.
    #[arg(long, env = "DROVER_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub admin_token: Option<drover_api::Secret>,
    /// A file holding the bootstrap admin token (surrounding whitespace is ignored).
    #[arg(long, env = "DROVER_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<std::path::PathBuf>,
    // Egress of workflow steps (publish subjects, http destinations).
    /// Subject patterns `publish` steps may use, comma-separated (`orders.>,crm.*`; `*` one
    /// token, `>` the rest); checked at deploy (api) and when the step runs (worker). Unset or
    /// empty: any subject outside `$…`, `_INBOX…` and the cluster's prefix.
    #[arg(long, env = "DROVER_PUBLISH_ALLOW")]
    pub publish_allow: Option<SubjectAllowList>,
    /// Destinations `http` steps may not reach, comma-separated: addresses, CIDR blocks, host
    /// names (`*.corp`: subdomains), each optionally `:port` (`[v6]:port`). Replaces the
    /// default; the api's own listen address (when this node serves it) is always added.
    #[arg(long, env = "DROVER_HTTP_DENY", default_value = DEFAULT_HTTP_DENY)]
    pub http_deny: EgressRules,
    /// When set and not empty, `http` steps may reach only these destinations (same forms as
    /// `--http-deny`, which still wins).
    #[arg(long, env = "DROVER_HTTP_ALLOW")]
    pub http_allow: Option<EgressRules>,
}

fn parse_secret(token: &str) -> Result<drover_api::Secret, String> {
    Ok(drover_api::Secret::new(token.trim()))
}

impl NodeArgs {
    /// The api role's authentication, from --auth and the bootstrap token.
    fn auth_mode(&self) -> anyhow::Result<drover_api::AuthMode> {
        if self.auth == "off" {
            return Ok(drover_api::AuthMode::Off);
        }
        let bootstrap = match (&self.admin_token, &self.admin_token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the admin token file {}", path.display()))?;
                Some(drover_api::Secret::new(text.trim()))
            }
            (None, None) => None,
        };
        drover_api::AuthMode::on(bootstrap).map_err(anyhow::Error::msg)
    }
}

/// The `http` steps' egress policy: the configured lists, plus the api's own address.
fn egress_policy(
    args: &NodeArgs,
    api: Option<&tokio::net::TcpListener>,
) -> anyhow::Result<EgressPolicy> {
    let mut deny = args.http_deny.0.clone();
    if let Some(api) = api {
        let addr = api.local_addr().context("reading the api address")?;
        deny.push(EgressRule::listener(addr, "the api's own address"));
    }
    Ok(EgressPolicy {
        deny,
        allow: args.http_allow.clone().map(|allow| allow.0),
    })
}

/// How long a node may fail to heartbeat before it stops itself (it may have been declared dead).
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) async fn run(args: NodeArgs, handlers: Handlers) -> anyhow::Result<()> {
    let auth = if args.roles.contains(&Role::Api) {
        Some(args.auth_mode()?)
    } else {
        None
    };
    let store = Store::connect(&StoreConfig {
        url: args.database_url.clone(),
        max_connections: args.db_pool,
    })
    .await
    .context("connecting to Postgres")?;
    if args.migrate {
        store.migrate().await.context("applying migrations")?;
    }
    let bus_roles = args.roles.iter().map(|r| r.nats_role()).collect();
    let bus = Bus::connect(args.nats.bus_config(&args.prefix, bus_roles))
        .await
        .context("connecting to NATS")?;

    if let Some(addr) = args.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "metrics served");
    }
    let node = NodeId::new();
    let roles: Vec<String> = args.roles.iter().map(|r| r.as_str().to_owned()).collect();
    let host = hostname();
    store
        .register_node(node, &roles, &host, env!("CARGO_PKG_VERSION"))
        .await
        .context("registering the node")?;
    tracing::info!(node.id = %node, roles = ?roles, %host, "node started");
    // Scripts and tests read this line to learn the node's id.
    println!("drover node {node} started");

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();

    // Bound before the worker starts: its http steps must not reach this address.
    let api_listener = if args.roles.contains(&Role::Api) {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding the api to {}", args.listen))?;
        Some(listener)
    } else {
        None
    };
    let relay_wakeup = Arc::new(tokio::sync::Notify::new());
    let mut in_flight = None;
    if args.roles.contains(&Role::Worker) {
        let worker = Worker::builder()
            .handlers(handlers)
            .config(WorkerConfig {
                concurrency: args.concurrency,
                batch_size: args.batch_size,
                egress: egress_policy(&args, api_listener.as_ref())?,
                publish_allow: args.publish_allow.clone(),
                ..Default::default()
            })
            .build(node, store.clone(), bus.clone());
        in_flight = Some(worker.stats());
        let wakeup = worker.relay_wakeup();
        let relay = OutboxRelay::new(store.clone(), bus.clone(), RelayConfig::default(), wakeup);
        let token = shutdown.clone();
        tasks.spawn(async move { ("relay", relay.run(token).await.map_err(Into::into)) });
        let token = shutdown.clone();
        tasks.spawn(async move { ("worker", worker.run(token).await.map_err(Into::into)) });
    } else {
        let relay = OutboxRelay::new(
            store.clone(),
            bus.clone(),
            RelayConfig::default(),
            relay_wakeup,
        );
        let token = shutdown.clone();
        tasks.spawn(async move { ("relay", relay.run(token).await.map_err(Into::into)) });
    }
    if args.roles.contains(&Role::Coordinator) {
        let coordinator = Coordinator {
            node,
            store: store.clone(),
            bus: bus.clone(),
            config: CoordinatorConfig {
                stale_ready_after: Duration::from_millis(args.stale_ready_after_ms),
                ..Default::default()
            },
        };
        let token = shutdown.clone();
        tasks.spawn(async move {
            (
                "coordinator",
                coordinator.run(token).await.map_err(Into::into),
            )
        });
    }
    if let Some(listener) = api_listener {
        let addr = listener.local_addr().context("reading the api address")?;
        // Scripts and tests read this line to find the api.
        println!("drover api listening on http://{addr}");
        tracing::info!(%addr, "api listening");
        let auth = auth.context("invariant: the api role has an auth mode")?;
        match &auth {
            drover_api::AuthMode::Off => tracing::warn!(
                "API authentication is OFF (--auth off): anyone who reaches {addr} is an admin; \
                 use this on a laptop only"
            ),
            drover_api::AuthMode::On { bootstrap: None } => tracing::warn!(
                "no bootstrap admin token (DROVER_ADMIN_TOKEN or --admin-token-file): only \
                 tokens already stored are accepted"
            ),
            drover_api::AuthMode::On { bootstrap: Some(_) } => {}
        }
        let state = drover_api::ApiState::new(store.clone(), bus.clone())
            .with_auth(auth)
            .with_publish_allow(args.publish_allow.clone());
        let token = shutdown.clone();
        tasks.spawn(async move {
            (
                "api",
                drover_api::serve(listener, state, token)
                    .await
                    .map_err(Into::into),
            )
        });
        let signals = drover_api::SignalListener::new(store.clone(), bus.clone());
        let token = shutdown.clone();
        tasks.spawn(async move { ("signals", signals.run(token).await.map_err(Into::into)) });
    }
    {
        let store = store.clone();
        let token = shutdown.clone();
        tasks.spawn(async move { ("heartbeat", heartbeat(store, node, in_flight, token).await) });
    }

    // The first role to stop stops the node; the rest drain.
    let mut result = Ok(());
    if let Some(joined) = tasks.join_next().await {
        result = finished(joined);
        shutdown.cancel();
    }
    let drain = async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(err) = finished(joined)
                && result.is_ok()
            {
                result = Err(err);
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(25), drain)
        .await
        .is_err()
    {
        tracing::warn!("roles did not drain in time");
    }
    if let Err(err) = store.set_node_status(node, "dead").await {
        tracing::warn!(%err, "could not mark the node gone");
    }
    tracing::info!(node.id = %node, "node stopped");
    result
}

fn finished(
    joined: Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok((role, Ok(()))) => {
            tracing::info!(role, "role stopped");
            Ok(())
        }
        Ok((role, Err(err))) => {
            tracing::error!(role, err = format!("{err:#}"), "role failed");
            Err(err.context(format!("role {role} failed")))
        }
        Err(err) => Err(anyhow::anyhow!("role task panicked: {err}")),
    }
}

/// Renews the node row every second. A node that finds itself declared dead, or that cannot
/// heartbeat for longer than its deadline, stops: its instances are someone else's now.
async fn heartbeat(
    store: Store,
    node: NodeId,
    stats: Option<Arc<drover_worker::WorkerStats>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut last_ok = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let in_flight = stats
            .as_ref()
            .map(|s| i32::try_from(s.in_flight.load(Ordering::Relaxed)).unwrap_or(i32::MAX))
            .unwrap_or(0);
        match store.heartbeat(node, in_flight, rss_bytes()).await {
            Ok(Heartbeat::Alive) => last_ok = tokio::time::Instant::now(),
            Ok(Heartbeat::Dead) => anyhow::bail!("node {node} was declared dead; stopping"),
            Err(err) => {
                tracing::warn!(%err, "heartbeat failed");
                if last_ok.elapsed() > HEARTBEAT_DEADLINE {
                    anyhow::bail!("no heartbeat for {HEARTBEAT_DEADLINE:?}; stopping");
                }
            }
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            () = term => {}
        }
        tracing::info!("signal received; draining");
        shutdown.cancel();
    });
}

/// Resident memory of this process (Linux; 0 elsewhere).
fn rss_bytes() -> i64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
