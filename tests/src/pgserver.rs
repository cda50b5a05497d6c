//! A private Postgres server for a test that stops and restarts it (the shared one must stay
//! up for the other tests): `drover dev`'s [`drover::pgserver::PgServer`] in a temporary
//! directory of its own.

use std::ops::Deref;
use std::path::PathBuf;

use anyhow::Context;

use crate::TestEnv;

/// A private server, stopped (`-m immediate`) and its directory removed when dropped.
pub struct PgServer {
    server: drover::pgserver::PgServer,
    dir: PathBuf,
}

impl PgServer {
    /// `initdb` and start a new server. Fails naming what to install if the programs are
    /// missing.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("drover-pg-{}", crate::random_hex(10)));
        let server = drover::pgserver::PgServer::start_in(&dir).await;
        match server {
            Ok(server) => Ok(Self { server, dir }),
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(err)
            }
        }
    }
}

impl Deref for PgServer {
    type Target = drover::pgserver::PgServer;

    fn deref(&self) -> &Self::Target {
        &self.server
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.server.stop_now();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestEnv {
    /// Moves this test's database to `server` (a fresh database there, migrated; the one on
    /// the shared server is dropped). The nodes it spawns afterwards use it.
    pub async fn on_postgres(mut self, server: &PgServer) -> anyhow::Result<Self> {
        let admin_url = server.url();
        let (database_url, store) = crate::create_database(&admin_url, &self.database)
            .await
            .context("on the private Postgres")?;
        // Drop the database on the shared server.
        self.store.pool().close().await;
        if let Ok(shared) = sqlx::PgPool::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&shared)
            .await;
        }
        self.admin_url = admin_url;
        self.database_url = database_url;
        self.store = store;
        Ok(self)
    }
}
