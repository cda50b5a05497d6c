//! A private Postgres server for a test that stops and restarts it (the shared one must stay
//! up for the other tests).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::TestEnv;

const INSTALL: &str = "the Postgres server binaries (initdb, pg_ctl) are needed: install them \
(Debian/Ubuntu: `apt-get install postgresql`; they land in /usr/lib/postgresql/<version>/bin) \
or name their directory in PG_BINDIR";

/// A Postgres server of its own in a temporary directory, on a free loopback port, with trust
/// authentication for `postgres`. Stopped and removed when dropped.
///
/// `initdb` refuses to run as root: as root, the server's programs run as the `postgres` OS
/// user (via `runuser`), which then owns the directory.
pub struct PgServer {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the server's programs as this OS user (when the test runs as root).
    run_as: Option<&'static str>,
}

impl PgServer {
    /// `initdb` and start a new server. Fails naming what to install if the binaries are
    /// missing.
    pub async fn start() -> anyhow::Result<Self> {
        let bindir = bindir().context(INSTALL)?;
        let run_as = if is_root().await {
            Some("postgres")
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!("drover-pg-{}", crate::random_hex(10)));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(user) = run_as {
            let status = std::process::Command::new("chown")
                .args([user, &dir.to_string_lossy()])
                .status()
                .context("chown")?;
            anyhow::ensure!(
                status.success(),
                "cannot give {} to the {user} user (does it exist?)",
                dir.display()
            );
        }
        let port = free_port()?;
        let server = Self {
            bindir,
            dir,
            port,
            run_as,
        };
        let data = server.data_dir();
        server
            .run(
                "initdb",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            )
            .await?;
        server.start_again().await?;
        Ok(server)
    }

    /// The admin URL (`postgres` database, user `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, as in a restart or a
    /// failover) and waits until it is down.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "fast", "-w", "stop"],
        )
        .await
    }

    /// Starts the (stopped) server again on the same port and data, and waits until it
    /// accepts connections.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.join("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )
        .await
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let binary = self.bindir.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", binary.display()))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data_dir();
        let binary = self.bindir.join("pg_ctl");
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&binary);
                c
            }
            None => std::process::Command::new(&binary),
        };
        let _ = command
            .args([
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
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

/// Where `initdb` and `pg_ctl` are: `PG_BINDIR`, else `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn bindir() -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            has_server(&dir),
            "PG_BINDIR={} has no initdb and pg_ctl",
            dir.display()
        );
        return Ok(dir);
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let dir = entry.path().join("bin");
            has_server(&dir).then_some((version, dir))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).context(
        "no initdb and pg_ctl found (PG_BINDIR, pg_config --bindir, /usr/lib/postgresql/*/bin)",
    )
}

async fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .await
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
