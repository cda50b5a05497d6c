//! A private database and subject prefix for one benchmark run, and worker processes.

use std::process::Stdio;

use anyhow::Context;
use drover_bus::{Bus, BusConfig};
use drover_store::{Store, StoreConfig};
use rand::Rng;
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

fn suffix() -> String {
    let mut rng = rand::rng();
    (0..10)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
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

    /// Starts a worker node process (this binary, re-executed).
    pub(crate) fn spawn_worker(&self) -> anyhow::Result<Child> {
        self.spawn_node("worker")
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

    pub(crate) async fn cleanup(self) {
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
