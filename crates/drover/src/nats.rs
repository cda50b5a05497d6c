//! NATS from the command line: the connection flags every node takes (servers, credentials,
//! TLS), and `drover nats-config`, which prints the least-privilege users of a cluster.

use std::path::PathBuf;

use anyhow::Context;
use drover_bus::permissions::{self, AuthorizationConfig, NODE_USER, NatsRole};
use drover_bus::{BusConfig, NatsAuth, Secret, TlsConfig};
use rand::Rng;

/// How a node reaches NATS. One credential at a time: a user and password, a token, an NKey
/// seed file or a `.creds` file (none: anonymous).
#[derive(clap::Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("nats_credentials")
        .multiple(false)
        .args(["nats_user", "nats_token", "nats_nkey_seed_file", "nats_creds"])
))]
pub struct NatsArgs {
    /// NATS server URL, or several separated by commas (`nats://a:4222,nats://b:4222`): the
    /// node connects to one and fails over to the others.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// NATS user, e.g. `drover-worker` (see `drover nats-config`); needs --nats-password.
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// Password of --nats-user.
    #[arg(
        long,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<Secret>,
    /// NATS token (a server with `authorization { token: … }`).
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<Secret>,
    /// File holding the NKey seed (`SU…`) of the node's NATS user.
    #[arg(long, env = "NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// NATS `.creds` file (JWT + NKey seed, decentralized auth).
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS server's certificate.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for NATS servers that verify clients; needs --nats-tls-key.
    #[arg(long, env = "NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse a NATS server that does not offer TLS.
    #[arg(long, env = "NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
}

impl NatsArgs {
    /// The bus configuration of a connection serving `roles` in the cluster `prefix`.
    pub fn bus_config(&self, prefix: &str, roles: Vec<NatsRole>) -> BusConfig {
        let auth = if let Some(user) = &self.nats_user {
            NatsAuth::UserPassword {
                user: user.clone(),
                password: self.nats_password.clone().unwrap_or_default(),
            }
        } else if let Some(token) = &self.nats_token {
            NatsAuth::Token(token.clone())
        } else if let Some(path) = &self.nats_nkey_seed_file {
            NatsAuth::NKeySeedFile(path.clone())
        } else if let Some(path) = &self.nats_creds {
            NatsAuth::CredsFile(path.clone())
        } else {
            NatsAuth::None
        };
        BusConfig {
            url: self.nats_url.clone(),
            prefix: prefix.to_owned(),
            roles,
            auth,
            tls: TlsConfig {
                ca_file: self.nats_tls_ca.clone(),
                cert_file: self.nats_tls_cert.clone(),
                key_file: self.nats_tls_key.clone(),
                required: self.nats_tls_required,
            },
            ..Default::default()
        }
    }
}

/// `drover nats-config`.
#[derive(clap::Args, Debug)]
#[command(after_long_help = NATS_CONFIG_HELP)]
pub struct NatsConfigArgs {
    /// Subject prefix of the cluster (as its nodes' --prefix).
    #[arg(long, env = "DROVER_PREFIX", default_value = "drover")]
    pub prefix: String,
    /// The only subjects the worker's `publish` steps may reach, comma-separated patterns
    /// (`orders.>,audit.*`). Without it: any subject but `$…`, `_INBOX.…` and the cluster's
    /// own, which NATS can only express as "all but a deny-list" (other clusters' JetStream
    /// API stays reachable); give a list for least privilege.
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub publish_allow: Option<Vec<String>>,
    /// The durable consumers (names) the events-reader may create and read on the EVENTS
    /// stream, comma-separated.
    #[arg(
        long = "events-consumer",
        value_delimiter = ',',
        default_value = "reader",
        value_name = "NAMES"
    )]
    pub events_consumers: Vec<String>,
    /// Also make a random password (40 letters and digits) for each user and print them to
    /// standard error, once, as `VAR=password` lines: the environment of nats-server and,
    /// under the nodes' NATS_PASSWORD, of the nodes. The configuration still reads them from
    /// the environment.
    #[arg(long)]
    pub generate_passwords: bool,
}

const NATS_CONFIG_HELP: &str = "\
Prints, on standard output, a nats-server `authorization { users: [...] }` block for the
cluster: one user per role (`<prefix>-worker`, `-coordinator`, `-api`, `-node` for a node
running several roles, `-events-reader`, `-signaler` for programs delivering events), each
allowed exactly the subjects its role uses and never to delete or purge a stream or delete a
consumer. Include it from the server's configuration (`include drover-auth.conf`).

No password is written in it: each user's is read from the server's environment
(`password: $DROVER_NATS_WORKER_PASSWORD`; nats-server refuses to start while one is unset;
use letters and digits only). Run each node with NATS_USER and NATS_PASSWORD of its user.

Each user subscribes only to its own inbox, `_INBOX.<prefix>.<user>`: nodes use it by
themselves; an events reader or signaler written with another client sets it as its inbox
prefix (nats CLI: --inbox-prefix _INBOX.drover.events-reader).

Example:
  drover nats-config --prefix drover --publish-allow 'orders.>' --generate-passwords \\
      > drover-auth.conf 2> drover-passwords.env";

/// Prints the authorization block (and, asked to, fresh passwords on stderr).
pub(crate) fn print_config(args: NatsConfigArgs) -> anyhow::Result<()> {
    let (text, password_vars) = render(&args)?;
    print!("{text}");
    if args.generate_passwords {
        let mut rng = rand::rng();
        for var in password_vars {
            eprintln!("{var}={}", random_password(&mut rng));
        }
    }
    Ok(())
}

/// The configuration text, and the environment variables its passwords are read from.
fn render(args: &NatsConfigArgs) -> anyhow::Result<(String, Vec<String>)> {
    let config = AuthorizationConfig {
        prefix: args.prefix.clone(),
        publish_allow: args.publish_allow.clone(),
        events_consumers: args.events_consumers.clone(),
    };
    let users = permissions::cluster_users(&config).context("generating the NATS users")?;
    let prefix = &config.prefix;
    let mut command = format!("drover nats-config --prefix {prefix}");
    if let Some(allow) = &config.publish_allow {
        command.push_str(&format!(" --publish-allow '{}'", allow.join(",")));
    }
    if config.events_consumers != ["reader"] {
        command.push_str(&format!(
            " --events-consumer {}",
            config.events_consumers.join(",")
        ));
    }
    let mut out = format!(
        "# nats-server users of the Drover cluster {prefix:?}, one per role, each allowed exactly\n\
         # what its role does. Generated by `{command}`;\n\
         # regenerate after upgrading Drover. Nodes log in with NATS_USER / NATS_PASSWORD:\n"
    );
    for role in NatsRole::NODE {
        out.push_str(&format!(
            "#   --roles {:<12} NATS_USER={}\n",
            role.as_str(),
            permissions::user_name(prefix, role.as_str())
        ));
    }
    out.push_str(&format!(
        "#   several roles        NATS_USER={}\n",
        permissions::user_name(prefix, NODE_USER)
    ));
    out.push_str(&permissions::render_authorization(&users));
    let vars = users
        .iter()
        .filter_map(|user| match &user.password {
            permissions::Password::Env(var) => Some(var.clone()),
            permissions::Password::Literal(_) => None,
        })
        .collect();
    Ok((out, vars))
}

/// 40 letters and digits, starting with a letter (nats-server parses an environment
/// variable's value like a configuration value: a leading digit would make it a number).
fn random_password(rng: &mut impl Rng) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let first = char::from(LETTERS[rng.random_range(0..LETTERS.len())]);
    std::iter::once(first)
        .chain(
            rng.sample_iter(rand::distr::Alphanumeric)
                .take(39)
                .map(char::from),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docker compose up` runs nats-server with this file: it must be what the generator
    /// says today.
    #[test]
    fn the_compose_nats_users_are_what_nats_config_generates() {
        let args = NatsConfigArgs {
            prefix: "drover".to_owned(),
            publish_allow: Some(vec!["demo.>".to_owned()]),
            events_consumers: vec!["reader".to_owned()],
            generate_passwords: false,
        };
        let (text, vars) = render(&args).expect("a valid configuration");
        let committed = include_str!("../../../deploy/nats/drover-auth.conf");
        assert!(
            text == committed,
            "deploy/nats/drover-auth.conf is stale: regenerate it with \
             `drover nats-config --prefix drover --publish-allow 'demo.>' > deploy/nats/drover-auth.conf`"
        );
        assert!(vars.contains(&"DROVER_NATS_WORKER_PASSWORD".to_owned()));
    }

    #[test]
    fn generated_passwords_are_long_plain_words() {
        let mut rng = rand::rng();
        let a = random_password(&mut rng);
        let b = random_password(&mut rng);
        assert_ne!(a, b);
        for p in [a, b] {
            assert_eq!(p.len(), 40);
            assert!(p.chars().all(|c| c.is_ascii_alphanumeric()), "{p}");
            assert!(p.starts_with(|c: char| c.is_ascii_alphabetic()), "{p}");
        }
    }
}
