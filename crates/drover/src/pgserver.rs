//! A private Postgres server in a directory of its own, on a free loopback port, with trust
//! authentication for `postgres`: what `drover dev` runs, and what the tests that stop and
//! restart Postgres run (the shared one must stay up for the other tests).
//!
//! `initdb` refuses to run as root: as root, the server's programs run as the `postgres` OS
//! user (through `runuser`), which is then given the directory.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};

/// What to install when the server programs are missing.
pub const INSTALL_POSTGRES: &str = "the Postgres server programs (initdb, pg_ctl; Postgres ≥ \
14) were not found in PG_BINDIR, on PATH, by `pg_config --bindir` or under \
/usr/lib/postgresql/*/bin: install them (Debian/Ubuntu `apt-get install postgresql`, macOS \
`brew install postgresql@16`) or name their directory in PG_BINDIR";

/// A running (or stopped) private Postgres server. It is not stopped when dropped: call
/// [`PgServer::stop`] or [`PgServer::stop_now`].
pub struct PgServer {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the server's programs as this OS user (when this process runs as root).
    run_as: Option<&'static str>,
}

impl PgServer {
    /// `initdb` a new cluster in `dir/pg` (creating `dir`) and start it. Fails naming what to
    /// install if the programs are missing.
    pub async fn start_in(dir: &Path) -> anyhow::Result<Self> {
        let bindir = find_bindir()?.context(INSTALL_POSTGRES)?;
        let run_as = is_root().then_some("postgres");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(user) = run_as {
            let status = std::process::Command::new("chown")
                .args([user, &dir.to_string_lossy()])
                .status()
                .context("running chown")?;
            if !status.success() {
                bail!(
                    "running as root, and initdb refuses root: cannot give {} to the `{user}` \
                     user (does it exist? create it, or run as another user)",
                    dir.display()
                );
            }
        }
        let server = Self {
            bindir,
            dir: dir.to_owned(),
            port: free_port()?,
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

    /// Stops the server at once (`-m immediate`), without waiting on the async runtime: for
    /// `Drop`. Failures are ignored (the server may be down already).
    pub fn stop_now(&self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
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
        self.dir.join("pg")
    }

    /// One of the server's programs, run as [`PgServer::run_as`] when set.
    fn command(&self, program: &str) -> std::process::Command {
        let binary = self.bindir.join(program);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&binary);
                c
            }
            None => std::process::Command::new(&binary),
        };
        command.current_dir(&self.dir).stdin(Stdio::null());
        command
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::from(self.command(program));
        let out = command
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {}", self.bindir.join(program).display()))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The directory of `initdb` and `pg_ctl`: `PG_BINDIR` (an error if it lacks them), PATH,
/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn find_bindir() -> anyhow::Result<Option<PathBuf>> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
        anyhow::ensure!(
            has_both(&dir),
            "PG_BINDIR={} has no initdb and pg_ctl",
            dir.display()
        );
        return Ok(Some(dir));
    }
    if let Some(dir) = on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
        && has_both(&dir)
    {
        return Ok(Some(dir));
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_both(&dir) {
            return Ok(Some(dir));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    versions.sort();
    Ok(versions.pop().map(|(_, dir)| dir))
}

/// `program` on PATH, if there.
pub(crate) fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// Whether this process runs as root (the owner of its own `/proc` entry).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// A loopback port free at the moment.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
