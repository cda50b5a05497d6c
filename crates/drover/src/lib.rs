//! Drover as a library: build your own worker binary with your handlers registered, and run
//! the same `drover` command line with it.
//!
//! ```no_run
//! use drover::{Handlers, StepError};
//!
//! fn main() -> std::process::ExitCode {
//!     let mut handlers = Handlers::default();
//!     handlers.insert("greet", |input: drover::HandlerInput| async move {
//!         Ok::<_, StepError>(serde_json::json!({ "hello": input.input["name"] }))
//!     });
//!     drover::main(handlers)
//! }
//! ```

mod admin;
pub mod cli;
mod dev;
mod health;
mod nats;
mod node;
pub mod pgserver;
mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use dev::find_nats;
pub use drover_worker::{HandlerInput, Handlers, StepError, WorkerConfig};
pub use health::{Health, Readiness};
pub use nats::{NatsArgs, NatsConfigArgs};
pub use node::{NodeArgs, Role};

/// Drover: durable workflows on Postgres and NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "drover", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// The API the operator commands talk to.
    #[arg(
        long,
        global = true,
        env = "DROVER_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// The API token the operator commands send (`drover token create` makes one; the
    /// nodes' DROVER_ADMIN_TOKEN is one too).
    #[arg(
        long,
        global = true,
        env = "DROVER_TOKEN",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub token: Option<drover_api::Secret>,
    /// Print the API's JSON instead of tables; errors too (the API's error JSON, on stdout).
    #[arg(long, global = true)]
    pub json: bool,
    /// How long one request to the API may take before the command gives up (`10s`, `2m`).
    #[arg(
        long,
        global = true,
        env = "DROVER_TIMEOUT",
        default_value = "60s",
        value_parser = humantime::parse_duration
    )]
    pub timeout: std::time::Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: the worker, api and coordinator roles (all by default; `--roles` picks).
    Node(Box<NodeArgs>),
    /// Apply the database migrations and exit.
    Migrate {
        /// The Postgres database, e.g. `postgres://user@host:5432/drover`.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Start a throwaway local cluster (no Docker): Postgres and nats-server in a temporary
    /// directory on free ports, every role in this process, the examples deployed; prints the
    /// console URL and an admin token. Ctrl-C stops it and deletes the directory.
    Dev(dev::DevArgs),
    /// Print a shell completion script: `drover completions bash > /etc/bash_completion.d/drover`,
    /// `drover completions zsh > "${fpath[1]}/_drover"`, `drover completions fish >
    /// ~/.config/fish/completions/drover.fish`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the nats-server users of a cluster: one per role, least privilege.
    NatsConfig(NatsConfigArgs),
    #[command(flatten)]
    Operator(cli::OperatorCommand),
}

/// Installs the technical workflows and their schedules (an existing schedule is left as
/// the operator set it), printing what it did.
pub(crate) async fn install_technical_workflows(store: &drover_store::Store) -> anyhow::Result<()> {
    let installed = drover_worker::maintenance::install_technical_workflows(store)
        .await
        .map_err(|e| anyhow::anyhow!("installing the technical workflows: {e}"))?;
    for w in installed {
        let deployed = if w.deployed { "deployed" } else { "up to date" };
        let scheduled = if w.scheduled {
            "schedule created"
        } else {
            "schedule kept as it is"
        };
        println!(
            "technical workflow {} v{}: {deployed}, {scheduled}",
            w.name, w.version
        );
    }
    Ok(())
}

fn parse_secret(token: &str) -> Result<drover_api::Secret, String> {
    Ok(drover_api::Secret::new(token.trim()))
}

/// What `drover --help` says about exit codes; [`exit_code`] is the mapping.
const EXIT_CODES: &str = "Exit codes: 0 ok, 1 failure, 2 usage (a bad command line or argument), \
3 not found (the API answered 404), 4 conflict (the API answered 409: the instance's state \
does not allow it).";

/// A command line that parses but makes no sense (bad JSON in `--vars`): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A failure the command's output already describes (`start --count N --wait` printed its
/// summary, with `--json` as JSON): exit code 1, and with `--json` no error document after it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Reported(pub String);

/// The exit code of a failed command: 2 usage, 3 not found, 4 conflict, else 1.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        return 2;
    }
    let status = err
        .chain()
        .find_map(|cause| cause.downcast_ref::<drover_api::ClientError>())
        .and_then(drover_api::ClientError::status);
    match status {
        Some(404) => 3,
        Some(409) => 4,
        _ => 1,
    }
}

/// Parses the command line and runs it with `handlers` registered in the worker role.
pub fn main(handlers: Handlers) -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Node(args) => {
                let telemetry = telemetry::init();
                let ran = node::run(*args, handlers).await;
                telemetry.shutdown().await;
                ran
            }
            Command::Migrate { database_url } => {
                let _logs = telemetry::init();
                let store = drover_store::Store::connect(&drover_store::StoreConfig {
                    url: database_url,
                    max_connections: 2,
                })
                .await?;
                store.migrate().await?;
                println!("migrations applied");
                install_technical_workflows(&store).await?;
                Ok(())
            }
            Command::NatsConfig(args) => nats::print_config(args),
            Command::Dev(args) => {
                let telemetry = telemetry::init();
                let ran = Box::pin(dev::run(args, handlers)).await;
                telemetry.shutdown().await;
                ran
            }
            Command::Completions { shell } => {
                let mut command = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut command, "drover", &mut std::io::stdout());
                Ok(())
            }
            Command::Operator(command) => {
                let api = cli::Api {
                    url: cli.api_url,
                    token: cli.token,
                    timeout: cli.timeout,
                };
                cli::run(command, &api, cli.json).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&err, json);
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Prints a failed command's error once, its causes after it (each only if it adds to the
/// one before): with `--json`, as the API's error JSON on stdout.
fn report(err: &anyhow::Error, json: bool) {
    if json && err.chain().any(|cause| cause.is::<Reported>()) {
        return;
    }
    if json {
        let body = match err
            .chain()
            .find_map(|cause| cause.downcast_ref::<drover_api::ClientError>())
        {
            Some(client) => client.to_json(),
            None => {
                let code = if exit_code(err) == 2 {
                    "usage"
                } else {
                    "failure"
                };
                serde_json::json!({ "error": { "code": code, "message": chain(err) } })
            }
        };
        println!("{body:#}");
        return;
    }
    eprintln!("error: {}", chain(err));
}

/// An error and its causes, `: `-separated, each cause left out when the text before already
/// says it (libraries often repeat their source in their own message).
pub(crate) fn chain(err: &anyhow::Error) -> String {
    drover_core::error_chain(err.as_ref())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every flag and argument of every command, with the path of commands leading to it.
    fn undocumented(command: &clap::Command, path: &str, found: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || matches!(id, "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                found.push(format!("{path} {id}"));
            }
        }
        for sub in command.get_subcommands() {
            undocumented(sub, &format!("{path} {}", sub.get_name()), found);
        }
    }

    #[test]
    fn every_flag_and_argument_has_help_text() {
        let mut found = Vec::new();
        undocumented(&Cli::command(), "drover", &mut found);
        assert!(found.is_empty(), "no help text: {found:#?}");
    }

    #[test]
    fn help_documents_the_exit_codes_and_the_node_roles() {
        let help = Cli::command().render_long_help().to_string();
        for needle in ["0 ok", "2 usage", "3 not found", "4 conflict"] {
            assert!(help.contains(needle), "{needle} missing from {help}");
        }
        let Command::Node(args) = Cli::try_parse_from(["drover", "node"])
            .expect("parses")
            .command
        else {
            panic!("not a node");
        };
        assert_eq!(args.roles, [Role::Worker, Role::Api, Role::Coordinator]);
    }

    #[test]
    fn completions_are_generated_for_bash_zsh_and_fish() {
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["drover", "completions", shell]).expect("parses");
            let Command::Completions { shell } = cli.command else {
                panic!("not completions");
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "drover", &mut script);
            let script = String::from_utf8(script).expect("a script is text");
            assert!(
                script.contains("campaign") && script.contains("set-limit"),
                "{shell}"
            );
        }
        assert!(Cli::try_parse_from(["drover", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn not_found_and_conflict_answers_have_their_own_exit_codes() {
        let api = |status: u16| {
            anyhow::Error::new(drover_api::ClientError::Api {
                status,
                code: "x".into(),
                message: "m".into(),
                details: None,
            })
            .context("showing the instance")
        };
        assert_eq!(exit_code(&api(404)), 3);
        assert_eq!(exit_code(&api(409)), 4);
        assert_eq!(exit_code(&api(422)), 1);
        assert_eq!(exit_code(&anyhow::Error::new(UsageError("bad".into()))), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("boom")), 1);
    }
}
