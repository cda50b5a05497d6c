//! `drover node`: one process running the roles it is given, sharing one root shutdown token.
//! The first role to stop stops the node; infrastructure trouble does not (see [`run`]).

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use drover_bus::{Bus, NatsRole};
use drover_coordinator::{Coordinator, CoordinatorConfig};
use drover_core::SubjectAllowList;
use drover_core::backoff::Backoff;
use drover_core::{NodeId, Queue};
use drover_store::{Heartbeat, Liveness, NewNode, Store, StoreConfig};
use drover_worker::{
    ClaimGate, DEFAULT_HTTP_DENY, EgressPolicy, EgressRule, EgressRules, Handlers, LocalStarts,
    OutboxRelay, RelayConfig, Reservation, Worker, WorkerConfig,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

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
    /// Roles to run, comma-separated: `worker` (runs steps), `api` (the HTTP API and
    /// console), `coordinator` (leader election, recovery, timers, schedules). All three by
    /// default, so a single node is a complete cluster; a cluster needs at least one of each.
    #[arg(
        long,
        env = "DROVER_ROLES",
        value_delimiter = ',',
        default_value = "worker,api,coordinator"
    )]
    pub roles: Vec<Role>,
    /// The Postgres database, e.g. `postgres://user@host:5432/drover`.
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
    /// Worker queues the worker role serves, comma-separated (`default,gpu`): it runs the
    /// steps of these queues only (a workflow's `queue`, or a step's own). Its NATS user must
    /// be allowed them (`drover nats-config --queues`).
    #[arg(
        long,
        env = "DROVER_QUEUES",
        value_delimiter = ',',
        default_value = Queue::DEFAULT
    )]
    pub queues: Vec<Queue>,
    /// Steps run at once by the worker role.
    #[arg(long, env = "DROVER_CONCURRENCY", default_value_t = 512)]
    pub concurrency: usize,
    /// Most jobs claimed and completions committed per statement.
    #[arg(long, env = "DROVER_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,
    /// Group commits on their way to Postgres at once, per worker node.
    #[arg(long, env = "DROVER_COMMITS_IN_FLIGHT", default_value_t = 2)]
    pub commits_in_flight: usize,
    /// Database pool size.
    #[arg(long, env = "DROVER_DB_POOL", default_value_t = 10)]
    pub db_pool: u32,
    /// READY this long (ms) counts as a lost job, re-dispatched by the leader coordinator.
    #[arg(long, env = "DROVER_STALE_READY_AFTER_MS", default_value_t = 10_000)]
    pub stale_ready_after_ms: u64,
    /// Heartbeat silence (ms) after which the leader coordinator declares a node dead. A node
    /// whose process is gone (crashed, killed) is declared dead sooner, within about a second.
    #[arg(long, env = "DROVER_DEAD_AFTER_MS", default_value_t = 3_000)]
    pub dead_after_ms: u64,
    /// How long dead and departed nodes stay listed (`drover nodes`) before the leader
    /// coordinator prunes their rows (`12h`, `7d`).
    #[arg(long, env = "DROVER_NODE_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub node_retention: Duration,
    /// Serve Prometheus metrics (`drover_*`) on this address; off when unset.
    #[arg(long, env = "DROVER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The admin port: `/healthz` (alive), `/readyz` (ready to take work; JSON saying why
    /// not) and `/metrics`, on every role (`0.0.0.0:9090` in a container); off when unset.
    #[arg(long, env = "DROVER_ADMIN_LISTEN")]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// How long relayed events stay in the Postgres outbox before they are purged (`30m`,
    /// `1h`): events a crashed NATS server lost can be sent again from there meanwhile. The
    /// events stream keeps them far longer (--events-max-age). If unsure: the default.
    #[arg(
        long,
        env = "DROVER_OUTBOX_REPLAY_WINDOW",
        default_value = "1h",
        value_parser = humantime::parse_duration
    )]
    pub outbox_replay_window: Duration,
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
    /// default; the api's own listen address and the admin port (when this node serves
    /// them) are always added.
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

/// How long one heartbeat may take before it counts as failed (a Postgres that does not
/// answer, say behind a partition, would otherwise hold it for minutes). Under the leader's
/// `dead_after`, so a node stops claiming before it can be declared dead.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the roles of one registration get to drain before the node moves on.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// Runs the node until SIGTERM/SIGINT or a role fails for good.
///
/// Infrastructure trouble never stops it: Postgres or NATS away at start is waited for; while
/// running, each role waits out outages itself. A node declared dead (it could not heartbeat
/// in time: a partition, a long pause) re-registers under a new id once Postgres answers
/// again and restarts its worker, relay and coordinator roles (the api keeps serving; it holds
/// nothing of the old id). While it cannot heartbeat, its worker claims nothing.
pub(crate) async fn run(args: NodeArgs, mut handlers: Handlers) -> anyhow::Result<()> {
    let auth = if args.roles.contains(&Role::Api) {
        Some(args.auth_mode()?)
    } else {
        None
    };
    let mut queues = args.queues.clone();
    queues.sort();
    queues.dedup();
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    // The readiness state; `/readyz` reads `health.readiness()`.
    let health = Health::default();
    let metrics = install_metrics(&args)?;
    // Serves from now until the node has drained: a probe sees it wait for its dependencies.
    let (admin, admin_addr) = match args.admin_listen {
        Some(addr) => {
            let (addr, serve) = crate::admin::bind(addr, health.clone(), metrics).await?;
            // Scripts and tests read this line to find the admin port.
            println!("drover admin listening on http://{addr}");
            tracing::info!(%addr, "admin port listening");
            let serving = tokio::spawn(async move {
                if let Err(err) = serve.await {
                    tracing::error!(%err, "the admin port stopped");
                }
            });
            (Some(serving), Some(addr))
        }
        None => (None, None),
    };

    let Some(store) = wait_for("Postgres", &shutdown, || async {
        Store::connect(&StoreConfig {
            url: args.database_url.clone(),
            max_connections: args.db_pool,
        })
        .await
        .map_err(|err| (err.is_transient(), anyhow::Error::new(err)))
    })
    .await
    .context("connecting to Postgres")?
    else {
        return Ok(());
    };
    health.set_store(&store);
    if args.migrate {
        store.migrate().await.context("applying migrations")?;
        crate::install_technical_workflows(&store).await?;
    }
    let Some(bus) = wait_for("NATS", &shutdown, || async {
        let bus_roles = args.roles.iter().map(|r| r.nats_role()).collect();
        let config = drover_bus::BusConfig {
            worker_queues: queues.clone(),
            ..args.nats.bus_config(&args.prefix, bus_roles)
        };
        Bus::connect(config)
            .await
            // A node may start before NATS: connecting and provisioning are waited for.
            .map_err(|err| {
                (
                    !matches!(
                        err,
                        drover_bus::Error::Config(_) | drover_bus::Error::Refused(_)
                    ),
                    anyhow::Error::new(err),
                )
            })
    })
    .await
    .context("connecting to NATS")?
    else {
        return Ok(());
    };
    health.set_bus(&bus);
    // Every worker runs the technical workflows' steps.
    handlers.add_maintenance(store.clone(), bus.clone());

    // The worker of each registration offers itself here to the api's small starts.
    let local = LocalStarts::new();
    // The api serves for the life of the process, whatever id the node runs under.
    let mut serving: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    // Bound before the worker starts: its http steps must not reach this address.
    let mut egress = egress_policy(&args, None)?;
    // The api's operations are owned by the node's current id, once it has one.
    let mut operations = None;
    if let Some(auth) = auth {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding the api to {}", args.listen))?;
        egress = egress_policy(&args, Some(&listener))?;
        let addr = listener.local_addr().context("reading the api address")?;
        // Scripts and tests read this line to find the api.
        println!("drover api listening on http://{addr}");
        tracing::info!(%addr, "api listening");
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
        let mut state = drover_api::ApiState::new(store.clone(), bus.clone())
            .with_auth(auth)
            .with_publish_allow(args.publish_allow.clone());
        if args.roles.contains(&Role::Worker) {
            state = state.with_local_worker(Arc::new(LocalWorker(local.clone())));
        }
        operations = Some(state.operations.clone());
        let token = shutdown.clone();
        let tracked = health.clone();
        serving.spawn(async move {
            let result = tracked
                .track("api", drover_api::serve(listener, state, token.clone()))
                .await;
            // The first role to stop stops the node.
            token.cancel();
            ("api", result.map_err(Into::into))
        });
        let signals = drover_api::SignalListener::new(store.clone(), bus.clone());
        let token = shutdown.clone();
        let tracked = health.clone();
        serving.spawn(async move {
            let result = tracked.track("signals", signals.run(token.clone())).await;
            token.cancel();
            ("signals", result.map_err(Into::into))
        });
    }

    if let Some(addr) = admin_addr {
        // Nor the admin port.
        egress
            .deny
            .push(EgressRule::listener(addr, "the node's admin port"));
    }

    let roles: Vec<String> = args.roles.iter().map(|r| r.as_str().to_owned()).collect();
    let host = hostname();
    // What the node advertises its worker serves: the claim of a `handler` step and the
    // stale-READY sweeper go by it.
    let (served, mut handler_names) = if args.roles.contains(&Role::Worker) {
        let names: Vec<String> = handlers.names().map(str::to_owned).collect();
        (queues.clone(), names)
    } else {
        (Vec::new(), Vec::new())
    };
    handler_names.sort();
    let mut result = Ok(());
    loop {
        let node = NodeId::new();
        let registered = wait_for("Postgres", &shutdown, || async {
            store
                .register_node(&NewNode {
                    queues: served.clone(),
                    handlers: handler_names.clone(),
                    ..NewNode::new(node, &roles, &host, env!("CARGO_PKG_VERSION"))
                })
                .await
                .map_err(|err| (err.is_transient(), anyhow::Error::new(err)))
        })
        .await;
        match registered {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err(err) => {
                result = Err(err.context("registering the node"));
                shutdown.cancel();
                break;
            }
        }
        health.registered(node);
        if let Some(operations) = &operations {
            operations.set_node(node);
        }
        tracing::info!(node.id = %node, roles = ?roles, queues = ?served.iter().map(Queue::as_str).collect::<Vec<_>>(), handlers = ?handler_names, %host, "node started");
        // Scripts and tests read this line to learn the node's id (again after a re-registration).
        println!("drover node {node} started");

        let life = Life {
            node,
            args: &args,
            handlers: &handlers,
            store: &store,
            bus: &bus,
            health: &health,
            egress: &egress,
            local: &local,
        };
        match life.run(&shutdown).await {
            LifeEnd::DeclaredDead => {
                tracing::warn!(node.id = %node, "node was declared dead: its instances went to others; registering again under a new id");
                continue;
            }
            LifeEnd::Stopped => {}
            LifeEnd::Failed(err) => {
                result = Err(err);
                shutdown.cancel();
            }
        }
        leave(&store, &bus, node).await;
        tracing::info!(node.id = %node, "node stopped");
        break;
    }

    health.set_draining();
    shutdown.cancel();
    let drain = async {
        while let Some(joined) = serving.join_next().await {
            if let Err(err) = finished(joined)
                && result.is_ok()
            {
                result = Err(err);
            }
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("the api did not stop in time");
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    result
}

/// Installs the Prometheus recorder when something serves it (the metrics listener, the
/// admin port's `/metrics`, or both), and returns its handle for the admin port.
fn install_metrics(
    args: &NodeArgs,
) -> anyhow::Result<Option<metrics_exporter_prometheus::PrometheusHandle>> {
    // Durations as histograms with buckets (they add up across nodes); sizes likewise.
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )
        .context("histogram buckets")?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_size".to_owned()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )
        .context("histogram buckets")?;
    let recorder = match (args.metrics_listen, args.admin_listen) {
        (Some(addr), _) => {
            // Spawns its own upkeep.
            let (recorder, exporter) = builder
                .with_http_listener(addr)
                .build()
                .with_context(|| format!("serving metrics on {addr}"))?;
            tokio::spawn(async move {
                if let Err(err) = exporter.await {
                    tracing::error!(?err, "the metrics listener stopped");
                }
            });
            tracing::info!(%addr, "metrics served");
            recorder
        }
        (None, Some(_)) => {
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Histograms drain into their summaries here (what `build` spawns for a listener).
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(5));
                loop {
                    ticker.tick().await;
                    handle.run_upkeep();
                }
            });
            recorder
        }
        (None, None) => return Ok(None),
    };
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
    if args.roles.contains(&Role::Worker) {
        drover_worker::describe_metrics();
    }
    if args.roles.contains(&Role::Coordinator) {
        drover_coordinator::describe_metrics();
    }
    Ok(Some(handle))
}

/// Calls `connect` until it succeeds, fails for good (`(false, err)`), or `shutdown` (`None`);
/// a transient failure (`(true, err)`) is retried with capped back-off and logged once.
async fn wait_for<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut connect: F,
) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, (bool, anyhow::Error)>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match connect().await {
            Ok(value) => {
                if let Some(recovered) = backoff.succeeded() {
                    tracing::info!(after = ?recovered.after, "{what} available");
                }
                return Ok(Some(value));
            }
            Err((true, err)) => {
                let failure = backoff.failed();
                if failure.first {
                    tracing::warn!(
                        err = format!("{err:#}"),
                        "{what} unavailable; waiting for it"
                    );
                } else {
                    tracing::debug!(err = format!("{err:#}"), "{what} still unavailable");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(failure.delay) => {}
                }
            }
            Err((false, err)) => return Err(err),
        }
    }
}

/// How one registration of the node ended.
enum LifeEnd {
    /// Shutdown was asked for.
    Stopped,
    /// Its heartbeat found it declared dead: register again under a new id.
    DeclaredDead,
    /// A role failed for good: the node stops.
    Failed(anyhow::Error),
}

/// The roles that run under one node id: worker (with the outbox relay), or the relay alone,
/// coordinator, and the heartbeat that watches over them.
struct Life<'a> {
    node: NodeId,
    args: &'a NodeArgs,
    handlers: &'a Handlers,
    store: &'a Store,
    bus: &'a Bus,
    health: &'a Health,
    /// Where the worker's http steps may not go.
    egress: &'a EgressPolicy,
    /// Where the worker offers itself to the api of the process.
    local: &'a LocalStarts,
}

impl Life<'_> {
    async fn run(self, shutdown: &CancellationToken) -> LifeEnd {
        let Life {
            node,
            args,
            handlers,
            store,
            bus,
            health,
            egress,
            local,
        } = self;
        let life = shutdown.child_token();
        let gate = ClaimGate::default();
        let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
        let mut in_flight = None;
        let relay_wakeup = if args.roles.contains(&Role::Worker) {
            let worker = Worker::builder()
                .handlers(handlers.clone())
                .config(WorkerConfig {
                    concurrency: args.concurrency,
                    batch_size: args.batch_size,
                    commits_in_flight: args.commits_in_flight,
                    egress: egress.clone(),
                    publish_allow: args.publish_allow.clone(),
                    ..Default::default()
                })
                .claim_gate(gate.clone())
                .local_starts(local.clone())
                .build(node, store.clone(), bus.clone());
            in_flight = Some(worker.stats());
            let wakeup = worker.relay_wakeup();
            let token = life.clone();
            let tracked = health.clone();
            tasks.spawn(async move {
                let result = tracked.track("worker", Box::pin(worker.run(token))).await;
                ("worker", result.map_err(Into::into))
            });
            wakeup
        } else {
            Arc::new(tokio::sync::Notify::new())
        };
        let relay = OutboxRelay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                replay_window: args.outbox_replay_window,
                ..Default::default()
            },
            relay_wakeup,
        );
        let token = life.clone();
        let tracked = health.clone();
        tasks.spawn(async move {
            let result = tracked.track("relay", Box::pin(relay.run(token))).await;
            ("relay", result.map_err(Into::into))
        });
        if args.roles.contains(&Role::Coordinator) {
            let coordinator = Coordinator {
                node,
                store: store.clone(),
                bus: bus.clone(),
                config: CoordinatorConfig {
                    stale_ready_after: Duration::from_millis(args.stale_ready_after_ms),
                    dead_after: Duration::from_millis(args.dead_after_ms),
                    node_retention: args.node_retention,
                    ..Default::default()
                },
            };
            let token = life.clone();
            let tracked = health.clone();
            tasks.spawn(async move {
                let result = tracked
                    .track("coordinator", Box::pin(coordinator.run(token)))
                    .await;
                ("coordinator", result.map_err(Into::into))
            });
        }
        health.set_roles_running(true);

        // Held until this registration has drained: released, it tells the leader the process
        // is gone.
        let liveness = tokio::spawn(keep_liveness(store.clone(), node));
        let beat = heartbeat(store, node, in_flight, &gate, health, &life);
        let end = tokio::select! {
            beat = beat => match beat {
                Beat::DeclaredDead => LifeEnd::DeclaredDead,
                Beat::Stopped => LifeEnd::Stopped,
            },
            Some(joined) = tasks.join_next() => match finished(joined) {
                Ok(()) if shutdown.is_cancelled() => LifeEnd::Stopped,
                Ok(()) => LifeEnd::Failed(anyhow::anyhow!("a role stopped on its own")),
                Err(err) => LifeEnd::Failed(err),
            },
        };

        // The first role to stop stops the rest; they drain.
        if shutdown.is_cancelled() {
            health.set_draining();
        }
        health.set_roles_running(false);
        life.cancel();
        let end_is_dead = matches!(end, LifeEnd::DeclaredDead);
        let mut end = end;
        let drain = async {
            while let Some(joined) = tasks.join_next().await {
                if let Err(err) = finished(joined)
                    && !matches!(end, LifeEnd::Failed(_))
                {
                    end = LifeEnd::Failed(err);
                }
            }
        };
        // The node keeps heartbeating while its roles drain: a drain longer than the dead-node
        // silence must not get it declared dead (it leaves, below, once drained).
        let drained = CancellationToken::new();
        let beats = async {
            if !end_is_dead {
                heartbeat(store, node, None, &gate, health, &drained).await;
            }
        };
        let drain = async {
            let timed_out = tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err();
            drained.cancel();
            timed_out
        };
        let (timed_out, ()) = tokio::join!(drain, beats);
        if timed_out {
            tracing::warn!(node.id = %node, "roles did not drain in time");
        }
        liveness.abort();
        end
    }
}

/// The worker of this process as the api's starts see it.
#[derive(Debug)]
struct LocalWorker(LocalStarts);

impl drover_api::LocalWorker for LocalWorker {
    fn reserve(&self, max: usize) -> Option<Box<dyn drover_api::LocalRoom>> {
        let room: Box<dyn drover_api::LocalRoom> = Box::new(LocalRoom(self.0.reserve(max)?));
        Some(room)
    }
}

struct LocalRoom(Reservation);

impl drover_api::LocalRoom for LocalRoom {
    fn node(&self) -> NodeId {
        self.0.node()
    }

    fn room(&self) -> usize {
        self.0.len()
    }

    fn start(self: Box<Self>, claimed: Vec<drover_store::Claimed>) {
        self.0.start(claimed);
    }
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

/// How a heartbeat loop ended.
enum Beat {
    /// Its registration was cancelled (shutdown, or a role failed).
    Stopped,
    /// The node row says dead (or is gone): its instances are someone else's now.
    DeclaredDead,
}

/// How often a node renews its row. Frequent, so that the leader can tell a dead process
/// (its liveness lock released) by a heartbeat only [`HEARTBEAT_EVERY`] late.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// Renews the node row every [`HEARTBEAT_EVERY`]. A heartbeat that fails (or hangs past [`HEARTBEAT_TIMEOUT`])
/// closes the claim gate until one succeeds again: a node that cannot heartbeat may be declared
/// dead meanwhile, and must not take more work. Returns once the node finds itself declared
/// dead, or `life` is cancelled.
async fn heartbeat(
    store: &Store,
    node: NodeId,
    stats: Option<Arc<drover_worker::WorkerStats>>,
    gate: &ClaimGate,
    health: &Health,
    life: &CancellationToken,
) -> Beat {
    let mut ticker = tokio::time::interval(HEARTBEAT_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outage = Backoff::default();
    loop {
        tokio::select! {
            () = life.cancelled() => return Beat::Stopped,
            _ = ticker.tick() => {}
        }
        let in_flight = stats
            .as_ref()
            .map(|s| i32::try_from(s.in_flight.load(Ordering::Relaxed)).unwrap_or(i32::MAX))
            .unwrap_or(0);
        let beat = tokio::time::timeout(
            HEARTBEAT_TIMEOUT,
            store.heartbeat(node, in_flight, rss_bytes()),
        )
        .await;
        let err = match beat {
            Ok(Ok(Heartbeat::Alive)) => {
                health.set_postgres(true);
                gate.open();
                if let Some(recovered) = outage.succeeded() {
                    tracing::info!(node.id = %node, after = ?recovered.after, "heartbeating again");
                }
                continue;
            }
            Ok(Ok(Heartbeat::Dead)) => {
                health.set_postgres(true);
                gate.close();
                return Beat::DeclaredDead;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {HEARTBEAT_TIMEOUT:?}"),
        };
        health.set_postgres(false);
        gate.close();
        if outage.failed().first {
            tracing::warn!(node.id = %node, %err, "heartbeat failed; claiming nothing until one succeeds");
        } else {
            tracing::debug!(node.id = %node, %err, "heartbeat failed again");
        }
    }
}

/// Marks the drained node `left` (it takes no more work; nobody waits for its silence) and
/// takes back what it still ran — steps that did not finish within the drain — publishing
/// their jobs so that other workers go on with them at once.
async fn leave(store: &Store, bus: &Bus, node: NodeId) {
    if let Err(err) = store.set_node_status(node, "left").await {
        tracing::warn!(node.id = %node, %err, "could not mark the node left; it will be declared dead");
        return;
    }
    let mut taken_back = 0;
    loop {
        let requeued = match store.requeue_orphans(node, node, 500).await {
            Ok(requeued) => requeued,
            Err(err) => {
                tracing::warn!(node.id = %node, %err, "could not take back unfinished steps; recovery will");
                return;
            }
        };
        if requeued.orphans.is_empty() {
            break;
        }
        taken_back += requeued.orphans.len();
        if let Err(err) = bus.publish_jobs(&requeued.jobs()).await {
            tracing::warn!(node.id = %node, %err, "publishing the jobs of unfinished steps failed; the sweeper re-dispatches them");
        }
    }
    if taken_back > 0 {
        tracing::info!(node.id = %node, instances = taken_back, "left: unfinished steps go on elsewhere");
    }
}

/// Holds node `node`'s liveness lock for as long as it runs (aborting it releases the lock),
/// checking its session every second and taking the lock again if the session broke. Its own
/// task, so that a slow check never delays a heartbeat, and a slow session is never given up
/// (that would release the lock of a live node).
async fn keep_liveness(store: Store, node: NodeId) {
    let mut held: Option<Liveness> = None;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Some(lock) = held.as_mut() {
            match lock.check().await {
                Ok(()) => continue,
                Err(err) => {
                    tracing::info!(node.id = %node, %err, "liveness lock lost; taking it again");
                    held = None;
                }
            }
        }
        match store.hold_liveness(node).await {
            Ok(lock) => held = Some(lock),
            Err(err) => tracing::debug!(node.id = %node, %err, "taking the liveness lock failed"),
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
