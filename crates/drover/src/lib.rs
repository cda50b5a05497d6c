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
mod health;
mod nats;
mod node;
mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use drover_worker::{HandlerInput, Handlers, StepError, WorkerConfig};
pub use health::{Health, Readiness};
pub use nats::{NatsArgs, NatsConfigArgs};
pub use node::{NodeArgs, Role};

/// Drover: durable workflows on Postgres and NATS JetStream.
#[derive(Parser, Debug)]
#[command(name = "drover", version, about)]
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
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node with the given roles (worker, api).
    Node(Box<NodeArgs>),
    /// Apply the database migrations and exit.
    Migrate {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
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

/// Parses the command line and runs it with `handlers` registered in the worker role.
pub fn main(handlers: Handlers) -> ExitCode {
    let cli = Cli::parse();
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
            Command::Operator(command) => {
                cli::run(command, &cli.api_url, cli.token, cli.json).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
