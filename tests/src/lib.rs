//! The end-to-end harness: a [`TestEnv`] with its own database and subject prefix, nodes as
//! real OS processes (so they can be killed), a recording HTTP server, and `wait_until`.

mod events;
mod nats_cluster;
mod nats_server;
mod node_log;
mod pgserver;
mod proxy;
mod reaper;
mod recorder;

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use drover_bus::{Bus, BusConfig};
use drover_core::NodeId;
use drover_store::{Store, StoreConfig};
use rand::Rng;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use events::{
    CHECK_EVENTS_ENV, EventCheck, EventReader, ReceivedEvent, asyncapi_channel, check_event_log,
    kinds_and_subjects, read_all_events,
};
pub use nats_cluster::NatsCluster;
pub use nats_server::{NatsServer, ServerOptions, ServerTls, nats_server_bin};
pub use pgserver::PgServer;
pub use proxy::Proxy;
pub use recorder::{Recorded, Recorder};

const UNSET: &str = "the end-to-end tests need real services: set DATABASE_URL (e.g. \
postgres://postgres@127.0.0.1:5432/postgres, a role that may CREATE DATABASE) and NATS_URL \
(nats-server >= 2.11 with JetStream, e.g. nats://127.0.0.1:14222), or run with \
`--features testcontainers` and Docker";

/// One test's private world: its own database and its own NATS subject prefix and streams.
pub struct TestEnv {
    pub database_url: String,
    pub database: String,
    admin_url: String,
    pub nats_url: String,
    pub prefix: String,
    pub store: Store,
    pub bus: Bus,
    /// How `bus` connected: [`TestEnv::nats_client`] connects alike.
    pub bus_config: BusConfig,
    /// The nodes it spawned: stopped by [`TestEnv::cleanup`] before it deletes the streams.
    spawned: reaper::Spawned,
    /// When its EVENTS stream was created (ns since the epoch): a stream created later was
    /// deleted meanwhile, and the events it held are gone by design.
    pub(crate) events_stream_created: Option<i128>,
    #[cfg(feature = "testcontainers")]
    _containers: Option<containers::Containers>,
}

/// The EVENTS stream bound of the tests' clusters (and nodes): NATS reserves a stream's max
/// bytes of its storage, so the default 10 GiB would let only a few tests' streams exist on a
/// server at once.
pub const TEST_EVENTS_MAX_BYTES: i64 = 16 << 20;

/// The bootstrap admin token every node of this test process accepts (random per process);
/// the CLI and the API helpers send it.
pub fn admin_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| format!("drv_test_{}", random_hex(48)))
}

pub(crate) fn random_hex(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// Creates `database` on the server of `admin_url` and migrates it; answers its URL and a
/// store on it.
pub(crate) async fn create_database(
    admin_url: &str,
    database: &str,
) -> anyhow::Result<(String, Store)> {
    let admin = sqlx::PgPool::connect(admin_url)
        .await
        .context("connecting to Postgres")?;
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .context("creating the test database")?;
    admin.close().await;
    let database_url = with_database(admin_url, database)?;
    let store = Store::connect(&StoreConfig {
        url: database_url.clone(),
        max_connections: 5,
    })
    .await?;
    store.migrate().await?;
    Ok((database_url, store))
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let scheme_end = url.find("://").context("DATABASE_URL has no scheme")? + 3;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    Ok(format!("{}/{database}{query}", &base[..host_end]))
}

impl TestEnv {
    pub async fn new() -> anyhow::Result<Self> {
        #[cfg(feature = "testcontainers")]
        let mut containers = None;
        let (admin_url, nats_url) = match (std::env::var("DATABASE_URL"), std::env::var("NATS_URL"))
        {
            (Ok(db), Ok(nats)) => (db, nats),
            #[cfg(feature = "testcontainers")]
            _ => {
                let c = containers::Containers::start().await?;
                let urls = (c.database_url.clone(), c.nats_url.clone());
                containers = Some(c);
                urls
            }
            #[cfg(not(feature = "testcontainers"))]
            _ => bail!(UNSET),
        };
        let database = format!("drover_t_{}", random_hex(12));
        let (database_url, store) = create_database(&admin_url, &database)
            .await
            .with_context(|| format!("on DATABASE_URL ({UNSET})"))?;
        let prefix = format!("t{}", random_hex(10));
        let bus_config = BusConfig {
            url: nats_url.clone(),
            prefix: prefix.clone(),
            events_max_bytes: TEST_EVENTS_MAX_BYTES,
            ..Default::default()
        };
        let bus = Bus::connect(bus_config.clone())
            .await
            .with_context(|| format!("connecting to NATS_URL ({UNSET})"))?;
        let events_stream_created = events::events_stream_created(&bus).await;
        Ok(Self {
            database_url,
            database,
            admin_url,
            nats_url,
            prefix,
            store,
            bus,
            bus_config,
            spawned: reaper::Spawned::default(),
            events_stream_created,
            #[cfg(feature = "testcontainers")]
            _containers: containers,
        })
    }

    /// A world on the private server `nats` (its cluster prefix, its administrator for the
    /// harness's own bus) and its own database on `DATABASE_URL`.
    pub async fn with_nats(nats: &NatsServer) -> anyhow::Result<Self> {
        let admin_url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!(UNSET))?;
        let database = format!("drover_t_{}", random_hex(12));
        let (database_url, store) = create_database(&admin_url, &database)
            .await
            .with_context(|| format!("on DATABASE_URL ({UNSET})"))?;
        let bus_config = nats.admin_bus_config()?;
        let bus = Bus::connect(bus_config.clone())
            .await
            .context("connecting to the test's nats-server as its administrator")?;
        let events_stream_created = events::events_stream_created(&bus).await;
        Ok(Self {
            database_url,
            database,
            admin_url,
            nats_url: nats.url.clone(),
            prefix: nats.prefix.clone(),
            store,
            bus,
            bus_config,
            spawned: reaper::Spawned::default(),
            events_stream_created,
            #[cfg(feature = "testcontainers")]
            _containers: None,
        })
    }

    /// A world on the private NATS cluster `cluster` (streams with `replicas` copies; nodes
    /// spawned by it get every server's URL and the same replicas) and its own database on
    /// `DATABASE_URL`. Provisioning waits for the cluster to elect its JetStream leader.
    pub async fn on_cluster(cluster: &NatsCluster, replicas: usize) -> anyhow::Result<Self> {
        let admin_url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!(UNSET))?;
        let database = format!("drover_t_{}", random_hex(12));
        let (database_url, store) = create_database(&admin_url, &database)
            .await
            .with_context(|| format!("on DATABASE_URL ({UNSET})"))?;
        let prefix = format!("t{}", random_hex(10));
        let bus_config = BusConfig {
            url: cluster.urls(),
            prefix: prefix.clone(),
            events_max_bytes: TEST_EVENTS_MAX_BYTES,
            stream_replicas: replicas,
            ..Default::default()
        };
        let bus = wait_until(
            "the NATS cluster to take R3 streams",
            Duration::from_secs(30),
            || async { Ok(Bus::connect(bus_config.clone()).await.ok()) },
        )
        .await
        .with_context(|| cluster.logs())?;
        let events_stream_created = events::events_stream_created(&bus).await;
        Ok(Self {
            database_url,
            database,
            admin_url,
            nats_url: cluster.urls(),
            prefix,
            store,
            bus,
            bus_config,
            spawned: reaper::Spawned::default(),
            events_stream_created,
            #[cfg(feature = "testcontainers")]
            _containers: None,
        })
    }

    /// A plain NATS client connected as the harness's own bus is.
    pub async fn nats_client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(self.bus_config.connect_client().await?)
    }

    /// Starts a node process with `roles` (e.g. "worker,api").
    pub async fn spawn_node(&self, roles: &str) -> anyhow::Result<NodeProcess> {
        self.spawn_node_with(roles, &[]).await
    }

    /// Starts a node process with `roles` and extra `drover node` arguments.
    pub async fn spawn_node_with(&self, roles: &str, args: &[&str]) -> anyhow::Result<NodeProcess> {
        self.spawn_node_env(roles, args, &[]).await
    }

    /// Starts a node process with `roles`, extra `drover node` arguments and extra (or
    /// overriding) environment variables, e.g. its NATS credentials.
    pub async fn spawn_node_env(
        &self,
        roles: &str,
        args: &[&str],
        envs: &[(String, String)],
    ) -> anyhow::Result<NodeProcess> {
        let (mut command, log) = self.node_command(roles, args, envs)?;
        let mut child = command.spawn().context("spawning drover-test-node")?;
        if let Some(pid) = child.id() {
            self.spawned.add(pid);
        }
        let stdout = child.stdout.take().context("node stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let wants_api = roles.split(',').any(|r| r == "api");
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            let (mut id, mut api) = (None, None);
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("drover node ") {
                    id = rest
                        .split_whitespace()
                        .next()
                        .and_then(|s| s.parse::<NodeId>().ok());
                }
                if let Some(url) = line.strip_prefix("drover api listening on ") {
                    api = Some(url.trim().to_owned());
                }
                if id.is_some() && (api.is_some() || !wants_api) {
                    return Ok::<_, std::io::Error>(id.map(|id| (id, api)));
                }
            }
            Ok(None)
        })
        .await;
        let Ok(Ok(Some((id, api_url)))) = found else {
            bail!(
                "node did not report its id and address; log: {}",
                log.display()
            );
        };
        // Keep reading so the node never writes to a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(NodeProcess {
            child,
            id,
            api_url,
            log,
        })
    }

    /// Runs a node that must not start (`drover node` with `roles`, `envs` as in
    /// [`TestEnv::spawn_node_env`]): fails unless it exits within `timeout` without having
    /// started; returns its exit status and its log.
    pub async fn node_refused(
        &self,
        roles: &str,
        envs: &[(String, String)],
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let (mut command, log) = self.node_command(roles, &[], envs)?;
        // Standard error stays the log (`output()` would capture it).
        let child = command.spawn().context("spawning drover-test-node")?;
        let output = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .with_context(|| {
                format!(
                    "the node was still running after {timeout:?}; log: {}",
                    log.display()
                )
            })?
            .context("running drover-test-node")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if stdout.contains("drover node ") {
            bail!("the node started: {stdout}; log: {}", log.display());
        }
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        Ok((output.status, text))
    }

    /// The command of a node process with `roles` in this world, and the log its standard
    /// error goes to.
    fn node_command(
        &self,
        roles: &str,
        args: &[&str],
        envs: &[(String, String)],
    ) -> anyhow::Result<(Command, PathBuf)> {
        let log = log_dir().join(format!("{}-{}.log", self.prefix, random_hex(6)));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(node_bin());
        command
            .args(["node", "--roles", roles, "--listen", "127.0.0.1:0"])
            .args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", &self.nats_url)
            .env("DROVER_PREFIX", &self.prefix)
            .env("DROVER_DB_POOL", "4")
            .env("DROVER_EVENTS_MAX_BYTES", TEST_EVENTS_MAX_BYTES.to_string())
            .env("DROVER_STALE_READY_AFTER_MS", "3000")
            .env("DROVER_ADMIN_TOKEN", admin_token())
            .env(
                "DROVER_STREAM_REPLICAS",
                self.bus_config.stream_replicas.to_string(),
            )
            .env(
                "RUST_LOG",
                std::env::var("DROVER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true);
        Ok((command, log))
    }

    /// Runs the CLI (`drover …`) against `api_url`; returns stdout, failing on a non-zero exit.
    pub async fn cli(&self, api_url: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli_raw(api_url, args).await?;
        if !out.status.success() {
            bail!(
                "drover {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub async fn cli_raw(
        &self,
        api_url: &str,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(node_bin())
            .args(args)
            .env("DROVER_API_URL", api_url)
            .env("DROVER_TOKEN", admin_token())
            .output()
            .await?)
    }

    /// Stops the nodes it spawned, then drops the database and the streams (best effort).
    /// Unless `DROVER_TEST_CHECK_EVENTS=0`, it first checks every event the cluster kept against
    /// the event contract ([`TestEnv::check_events`]) and, having cleaned up, panics if one
    /// broke it.
    pub async fn cleanup(self) {
        self.spawned.kill_all(&self.prefix).await;
        let events = if Self::checks_events_at_cleanup() {
            Some(self.check_events().await)
        } else {
            None
        };
        self.bus.delete_streams().await;
        self.store.pool().close().await;
        if let Ok(admin) = sqlx::PgPool::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&admin)
            .await;
        }
        if let Some(Err(err)) = events {
            panic!(
                "the events of this test ({}) broke the event contract: {err:#}",
                self.prefix
            );
        }
    }
}

/// The `drover-test-node` binary: cargo builds it beside the test binary's `deps/` folder.
pub fn node_bin() -> PathBuf {
    if let Ok(path) = std::env::var("DROVER_TEST_NODE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    profile_dir.join(format!("drover-test-node{}", std::env::consts::EXE_SUFFIX))
}

fn log_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("drover-test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A node running as a child process; killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    /// The node's id (fresh per process start).
    pub id: NodeId,
    pub api_url: Option<String>,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn api(&self) -> &str {
        self.api_url.as_deref().unwrap_or("http://127.0.0.1:0")
    }

    /// SIGKILL: no drain, no goodbye.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGSTOP: the process freezes mid-whatever (a GC pause, a suspended VM).
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT: it wakes up as if nothing happened.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }
}

/// Polls `check` every 50 ms until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "testcontainers")]
mod containers {
    use anyhow::Context;
    use testcontainers_modules::nats::{Nats, NatsServerCmd};
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

    pub(crate) struct Containers {
        _pg: ContainerAsync<Postgres>,
        _nats: ContainerAsync<Nats>,
        pub(crate) database_url: String,
        pub(crate) nats_url: String,
    }

    impl Containers {
        pub(crate) async fn start() -> anyhow::Result<Self> {
            let pg = Postgres::default()
                .start()
                .await
                .context("starting Postgres in Docker")?;
            let pg_port = pg.get_host_port_ipv4(5432).await?;
            let cmd = NatsServerCmd::default().with_jetstream();
            let nats = Nats::default()
                .with_cmd(&cmd)
                .with_tag("2.11")
                .start()
                .await
                .context("starting nats-server in Docker")?;
            let nats_port = nats.get_host_port_ipv4(4222).await?;
            Ok(Self {
                _pg: pg,
                _nats: nats,
                database_url: format!("postgres://postgres:postgres@127.0.0.1:{pg_port}/postgres"),
                nats_url: format!("nats://127.0.0.1:{nats_port}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x")
                .ok()
                .as_deref(),
            Some("postgres://u@h:5432/x")
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "x")
                .ok()
                .as_deref(),
            Some("postgres://u@h/x?sslmode=disable")
        );
        assert_eq!(
            with_database("postgres://h", "x").ok().as_deref(),
            Some("postgres://h/x")
        );
    }
}
