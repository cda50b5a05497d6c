//! NATS from the command line: the connection flags every node takes (servers, credentials,
//! TLS), and `drover nats-config`, which prints the least-privilege users of a cluster.

use std::path::PathBuf;
use std::time::Duration;

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
    /// How long the EVENTS stream keeps events (`36h`, `7d`). If unsure: the default, time
    /// for an events reader to come back from a long outage.
    #[arg(long, env = "DROVER_EVENTS_MAX_AGE", default_value = "7d", value_parser = parse_max_age)]
    pub events_max_age: Duration,
    /// The most the EVENTS stream keeps (`512MiB`, `10GiB`, `1TB`; plain bytes too); past it
    /// the oldest events go first. NATS sets this much of its storage aside for the stream.
    /// If unsure: the default, and at least a day of events (about 1 KiB each).
    #[arg(long, env = "DROVER_EVENTS_MAX_BYTES", default_value = "10GiB", value_parser = parse_bytes)]
    pub events_max_bytes: i64,
    /// Copies of each stream (jobs, events, recovery) a NATS cluster keeps, 1 to 5. If unsure:
    /// 1 on a single server, 3 on a cluster of three or more. Every node should be given the
    /// same value: each applies its own at start, to existing streams too.
    #[arg(
        long,
        env = "DROVER_STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=drover_bus::MAX_STREAM_REPLICAS as i64)
    )]
    pub stream_replicas: u8,
}

/// A positive humantime duration (`7d`, `36h`).
pub(crate) fn parse_max_age(text: &str) -> Result<Duration, String> {
    let age = humantime::parse_duration(text).map_err(|err| format!("{err} (e.g. `7d`, `36h`)"))?;
    if age.is_zero() {
        return Err("must be more than 0".to_owned());
    }
    Ok(age)
}

/// A positive size: bytes, or a number with a unit, binary (`KiB`, `MiB`, `GiB`, `TiB`) or
/// decimal (`KB`, `MB`, `GB`, `TB`), case-insensitive, optionally spaced (`10 GiB`).
pub(crate) fn parse_bytes(text: &str) -> Result<i64, String> {
    const UNITS: [(&str, i64); 9] = [
        ("kib", 1 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
        ("tib", 1 << 40),
        ("kb", 1_000),
        ("mb", 1_000_000),
        ("gb", 1_000_000_000),
        ("tb", 1_000_000_000_000),
        ("b", 1),
    ];
    let lower = text.trim().to_ascii_lowercase();
    let (number, scale) = UNITS
        .iter()
        .find_map(|(unit, scale)| lower.strip_suffix(unit).map(|n| (n.trim_end(), *scale)))
        .unwrap_or((lower.as_str(), 1));
    let bad = || format!("{text:?} is not a size (e.g. `10GiB`, `512MiB`, `1000000`)");
    let number: i64 = number.parse().map_err(|_| bad())?;
    let bytes = number.checked_mul(scale).ok_or_else(bad)?;
    if bytes < 1 {
        return Err("must be more than 0 bytes".to_owned());
    }
    Ok(bytes)
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
            events_max_age: self.events_max_age,
            events_max_bytes: self.events_max_bytes,
            stream_replicas: usize::from(self.stream_replicas),
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
    /// The worker queues the worker (and node) user may serve, comma-separated: it may pull
    /// from their consumers only. Give every queue a `drover node --queues` names.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = drover_core::Queue::DEFAULT,
        value_name = "QUEUES"
    )]
    pub queues: Vec<drover_core::Queue>,
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
        worker_queues: args.queues.clone(),
    };
    let users = permissions::cluster_users(&config).context("generating the NATS users")?;
    let prefix = &config.prefix;
    let mut command = format!("drover nats-config --prefix {prefix}");
    if let Some(allow) = &config.publish_allow {
        command.push_str(&format!(" --publish-allow '{}'", allow.join(",")));
    }
    if config.worker_queues != [drover_core::Queue::default()] {
        let queues: Vec<&str> = config.worker_queues.iter().map(|q| q.as_str()).collect();
        command.push_str(&format!(" --queues {}", queues.join(",")));
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
            queues: vec![drover_core::Queue::default()],
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
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("10GiB"), Ok(10 << 30));
        assert_eq!(parse_bytes("512 mib"), Ok(512 << 20));
        assert_eq!(parse_bytes("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_bytes("2kb"), Ok(2_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("4096B"), Ok(4096));
        for bad in [
            "",
            "GiB",
            "1.5GiB",
            "-1GiB",
            "0",
            "ten",
            "10PiB",
            "9999999999TiB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn max_ages_parse_as_humantime_and_are_positive() {
        assert_eq!(parse_max_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_max_age("36h"), Ok(Duration::from_secs(36 * 3_600)));
        assert!(parse_max_age("0s").is_err());
        assert!(parse_max_age("a week").is_err());
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    #[test]
    fn retention_flags_reach_the_bus_config_with_week_and_ten_gib_defaults() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["drover"]).expect("defaults parse");
        let config = cli.nats.bus_config("drover", NatsRole::NODE.to_vec());
        let defaults = BusConfig::default();
        assert_eq!(config.events_max_age, defaults.events_max_age);
        assert_eq!(config.events_max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(config.events_max_bytes, 10 << 30);
        assert_eq!(config.stream_replicas, 1);

        let cli = Cli::try_parse_from([
            "drover",
            "--events-max-age",
            "2d",
            "--events-max-bytes",
            "1GiB",
            "--stream-replicas",
            "3",
        ])
        .expect("flags parse");
        let config = cli.nats.bus_config("drover", NatsRole::NODE.to_vec());
        assert_eq!(config.events_max_age, Duration::from_secs(2 * 86_400));
        assert_eq!(config.events_max_bytes, 1 << 30);
        assert_eq!(config.stream_replicas, 3);

        for replicas in ["0", "6"] {
            let err = Cli::try_parse_from(["drover", "--stream-replicas", replicas])
                .expect_err("out of range");
            assert!(err.to_string().contains("--stream-replicas"), "{err}");
        }
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
