//! A private database and subject prefix for one benchmark run, its worker processes, and
//! starting instances as the API does.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_bus::{Bus, BusConfig};
use drover_core::{CampaignId, Definition, InstanceId, NodeId};
use drover_store::{NewInstance, StepJob, Store, StoreConfig};
use rand::Rng;
use serde_json::Value;
use tokio::process::{Child, Command};

pub(crate) struct BenchEnv {
    pub(crate) database_url: String,
    admin_url: String,
    database: String,
    pub(crate) nats_url: String,
    pub(crate) prefix: String,
    pub(crate) store: Store,
    pub(crate) bus: Bus,
}

/// Instances [`BenchEnv::start`] created.
pub(crate) struct Started {
    pub(crate) ids: Vec<InstanceId>,
    /// The READY ones' claims (their jobs published if dispatched).
    pub(crate) ready: Vec<StepJob>,
    pub(crate) queued: usize,
}

/// A deployed workflow, ready to start.
pub(crate) struct Deployed {
    pub(crate) def: Definition,
    pub(crate) version: i32,
}

fn suffix() -> String {
    let mut rng = rand::rng();
    (0..10)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

/// Polls `check` every 10 ms until it holds, or fails after `limit`.
pub(crate) async fn poll<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A client of the api node listening on `listen`, with `token`, once the api answers.
pub(crate) async fn api_client(
    listen: &str,
    token: drover_api::Secret,
) -> anyhow::Result<drover_api::ApiClient> {
    let client = drover_api::ApiClient::new(&format!("http://{listen}"))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_token(token);
    poll("the api to answer", Duration::from_secs(30), || async {
        Ok(client.workflows().await.is_ok())
    })
    .await?;
    Ok(client)
}

impl BenchEnv {
    pub(crate) async fn new() -> anyhow::Result<Self> {
        let admin_url = std::env::var("DATABASE_URL")
            .context("set DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/postgres)")?;
        let nats_url = std::env::var("NATS_URL")
            .context("set NATS_URL (nats-server >= 2.11 with JetStream)")?;
        let database = format!("drover_bench_{}", suffix());
        let admin = sqlx::PgPool::connect(&admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let database_url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{database}"),
            None => anyhow::bail!("DATABASE_URL has no database part"),
        };
        let store = Store::connect(&StoreConfig {
            url: database_url.clone(),
            max_connections: 16,
        })
        .await?;
        store.migrate().await?;
        let prefix = format!("b{}", suffix());
        let bus = Bus::connect(BusConfig {
            url: nats_url.clone(),
            prefix: prefix.clone(),
            ..Default::default()
        })
        .await?;
        Ok(Self {
            database_url,
            admin_url,
            database,
            nats_url,
            prefix,
            store,
            bus,
        })
    }

    /// Starts a node process with `roles` (this binary, re-executed).
    pub(crate) fn spawn_node(&self, roles: &str) -> anyhow::Result<Child> {
        Command::new(std::env::current_exe()?)
            .args(["node", "--roles", roles, "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", &self.nats_url)
            .env("DROVER_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning a worker node")
    }

    /// Starts a node with the api and worker roles, serving the API on `listen` with the
    /// bootstrap admin token `token`.
    pub(crate) fn spawn_api_node(&self, listen: &str, token: &str) -> anyhow::Result<Child> {
        Command::new(std::env::current_exe()?)
            .args(["node", "--roles", "api,worker", "--listen", listen])
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", &self.nats_url)
            .env("DROVER_PREFIX", &self.prefix)
            .env("DROVER_ADMIN_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning an api node")
    }

    /// Spawns a node with `spawn` and returns it with its id, once it has registered (within
    /// 30 s).
    pub(crate) async fn spawn_registered(
        &self,
        spawn: impl FnOnce() -> anyhow::Result<Child>,
    ) -> anyhow::Result<(Child, NodeId)> {
        let known: Vec<NodeId> = self
            .store
            .list_nodes()
            .await?
            .iter()
            .map(|n| n.id)
            .collect();
        let child = spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = self.store.list_nodes().await?;
            if let Some(id) = nodes
                .iter()
                .find(|n| !known.contains(&n.id) && n.status == "alive")
                .map(|n| n.id)
            {
                return Ok((child, id));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the node did not register within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a node process with `roles` serving on `listen`, with `envs` set besides the
    /// run's database, NATS and prefix (`DROVER_CONCURRENCY`, `DROVER_ADMIN_TOKEN`, …).
    pub(crate) fn spawn_node_with(
        &self,
        roles: &str,
        listen: &str,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Child> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["node", "--roles", roles, "--listen", listen])
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", &self.nats_url)
            .env("DROVER_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn");
        for (name, value) in envs {
            command.env(name, value);
        }
        command
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning a {roles} node"))
    }

    /// Starts `n` node processes with `roles` and waits until they have registered.
    pub(crate) async fn spawn_nodes(&self, roles: &str, n: usize) -> anyhow::Result<Vec<Child>> {
        let before = self.alive_nodes().await?;
        let mut nodes = Vec::with_capacity(n);
        for _ in 0..n {
            nodes.push(self.spawn_node(roles)?);
        }
        poll("the nodes to register", Duration::from_secs(30), || async {
            Ok(self.alive_nodes().await? >= before + n)
        })
        .await?;
        Ok(nodes)
    }

    async fn alive_nodes(&self) -> anyhow::Result<usize> {
        Ok(self
            .store
            .list_nodes()
            .await?
            .iter()
            .filter(|n| n.status == "alive")
            .count())
    }

    /// Deploys `source` (YAML).
    pub(crate) async fn deploy(&self, source: &str) -> anyhow::Result<Deployed> {
        let def = Definition::parse(source).map_err(|e| anyhow::anyhow!("{e}"))?;
        let version = self
            .store
            .deploy_definition(&def.name, &def.to_json(), source)
            .await?
            .version;
        Ok(Deployed { def, version })
    }

    /// The `default` campaign (no limit).
    pub(crate) async fn default_campaign(&self) -> anyhow::Result<(CampaignId, String)> {
        let c = self
            .store
            .campaign_by_name("default")
            .await?
            .context("default campaign")?;
        Ok((c.id, c.name))
    }

    /// Creates `n` instances of `workflow` in `campaign` as the API does (1000 per
    /// transaction, a `started` event each) and, when `dispatch`, publishes the READY ones'
    /// jobs.
    pub(crate) async fn start(
        &self,
        workflow: &Deployed,
        campaign: (CampaignId, &str),
        n: u32,
        dispatch: bool,
    ) -> anyhow::Result<Started> {
        let def = &workflow.def;
        let version = workflow.version;
        let ids: Vec<InstanceId> = (0..n).map(|_| InstanceId::new()).collect();
        let mut queued = 0;
        let mut ready = Vec::new();
        for chunk in ids.chunks(1000) {
            let rows: Vec<NewInstance> = chunk
                .iter()
                .map(|id| NewInstance {
                    id: *id,
                    campaign: campaign.0,
                    workflow: def.name.clone(),
                    version,
                    entry_step: def.entry().id.clone(),
                    allow_retry: def.entry().allow_retry,
                    timeout_ms: def.entry().timeout_ms(),
                    route: def.route(def.entry()),
                    vars: Value::Object(def.vars.clone()),
                    announce_end: false,
                })
                .collect();
            let created = self.store.create_instances(&rows, "bench").await?;
            queued += created.queued.len();
            if dispatch {
                self.bus.publish_jobs(&created.ready).await?;
            }
            ready.extend(created.ready);
        }
        Ok(Started { ids, ready, queued })
    }

    /// Waits until all of `ids` have completed: answers the completed count over time
    /// (seconds since `since`, completed), in 100 ms steps, from the instances' `finished_at`.
    ///
    /// The wait must not load the box it measures: each poll looks up only the newest 64
    /// still pending (the last to finish when they start together) by primary key, and only
    /// once those are done all still pending, which shrinks the set to the stragglers. A
    /// count of all `ids` per poll cost a core's tenth at 10,000 instances.
    pub(crate) async fn wait_completed(
        &self,
        ids: &[InstanceId],
        since: Instant,
    ) -> anyhow::Result<Vec<(f64, i64)>> {
        const PROBE: usize = 64;
        let limit = Duration::from_secs(600);
        let (db_now,): (chrono::DateTime<chrono::Utc>,) =
            sqlx::query_as("SELECT clock_timestamp()")
                .fetch_one(self.store.pool())
                .await?;
        let db_since = db_now - chrono::Duration::from_std(since.elapsed())?;
        let all: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        let mut pending = all.clone();
        pending.sort_unstable();
        let still = |probe: Vec<uuid::Uuid>| async move {
            let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(
                "SELECT id FROM instance WHERE id = ANY($1) AND state <> 'completed'",
            )
            .bind(&probe)
            .fetch_all(self.store.pool())
            .await?;
            let mut left: Vec<uuid::Uuid> = rows.into_iter().map(|(id,)| id).collect();
            left.sort_unstable();
            anyhow::Ok(left)
        };
        while !pending.is_empty() {
            let tail = pending[pending.len().saturating_sub(PROBE)..].to_vec();
            if still(tail).await?.is_empty() {
                pending = still(pending).await?;
                if pending.is_empty() {
                    break;
                }
            }
            anyhow::ensure!(
                since.elapsed() < limit,
                "only {}/{} instances completed in {limit:?}",
                all.len() - pending.len(),
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (offsets,): (Vec<f64>,) = sqlx::query_as(
            "SELECT coalesce(array_agg(extract(epoch FROM finished_at - $2)::float8
                                       ORDER BY finished_at), '{}')
             FROM instance WHERE id = ANY($1)",
        )
        .bind(&all)
        .bind(db_since)
        .fetch_one(self.store.pool())
        .await?;
        Ok(completed_over_time(&offsets))
    }

    /// Removes the run's streams and database, unless `DROVER_BENCH_KEEP` is set (to look
    /// at a run's rows afterwards).
    pub(crate) async fn cleanup(self) {
        if std::env::var_os("DROVER_BENCH_KEEP").is_some() {
            eprintln!("kept database {} and prefix {}", self.database, self.prefix);
            return;
        }
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
    }
}

/// Completion offsets (seconds, sorted) as a cumulative count every 100 ms, ending with the
/// last.
fn completed_over_time(offsets: &[f64]) -> Vec<(f64, i64)> {
    let mut series = Vec::new();
    let Some(&last) = offsets.last() else {
        return series;
    };
    let mut done = 0usize;
    let mut t = 0.1;
    while t < last {
        while offsets.get(done).is_some_and(|&o| o <= t) {
            done += 1;
        }
        series.push((t, i64::try_from(done).unwrap_or(i64::MAX)));
        t += 0.1;
    }
    series.push((last, i64::try_from(offsets.len()).unwrap_or(i64::MAX)));
    series
}
