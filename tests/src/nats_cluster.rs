//! A private cluster of nats-servers (JetStream on each, routes between them, loopback ports)
//! for a test that kills and restarts one of them. No authentication: what it tests is
//! replication and fail-over, not permissions.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::nats_server::wait_listening;
use crate::{nats_server_bin, random_hex};

/// The servers of one cluster; killed, and their storage removed, when dropped.
pub struct NatsCluster {
    dir: PathBuf,
    servers: Vec<Member>,
}

struct Member {
    name: String,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsCluster {
    /// Starts `n` servers routed to each other and waits until each listens.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("drover-natsc-{}", random_hex(12)));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let mut servers = Vec::with_capacity(n);
        for (i, (port, route)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.join(&name);
            let conf = dir.join(format!("{name}.conf"));
            let text = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ store_dir: {store:?}, max_file_store: 1GB, max_memory_store: 64MB }}\n\
                 cluster {{\n  name: drover-test\n  listen: \"127.0.0.1:{route}\"\n  \
                 routes: [{}]\n}}\n",
                routes.join(", ")
            );
            std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
            servers.push(Member {
                log: dir.join(format!("{name}.log")),
                name,
                port: *port,
                conf,
                child: None,
            });
        }
        let mut cluster = Self { dir, servers };
        for i in 0..n {
            cluster.start_member(i).await?;
        }
        Ok(cluster)
    }

    /// Every server's URL, comma-separated (what `NATS_URL` takes for a cluster).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|m| format!("nats://127.0.0.1:{}", m.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `kill -9`s server `i`.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &mut self.servers[i];
        if let Some(mut child) = member.child.take() {
            child.kill().await.context("killing a nats-server")?;
        }
        Ok(())
    }

    /// Starts server `i` again on its port and storage.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.start_member(i).await
    }

    /// The servers' logs, for a failure message.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {}:\n{}", m.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = nats_server_bin()?;
        let member = &mut self.servers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .with_context(|| format!("opening {}", member.log.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&member.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        member.child = Some(child);
        let addr = format!("127.0.0.1:{}", member.port);
        let log = member.log.clone();
        let child = member.child.as_mut().context("just started")?;
        wait_listening(child, &addr, &log).await
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for member in &mut self.servers {
            if let Some(child) = member.child.as_mut() {
                let _ = child.start_kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
