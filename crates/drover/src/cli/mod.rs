//! The operator commands (`drover workflow|start|instance|journal|resume|pause|unpause|stop|
//! kill|restart|why|campaign|nodes|leader`). They speak
//! only HTTP to the API, through [`ApiClient`](drover_api::ApiClient). With `--json` each prints exactly the API's
//! JSON (pretty); otherwise a table.
//!
//! - `args`: the command line (clap), parsed and checked before any request;
//! - `run`: each command's request to the API;
//! - `progress`: bulk commands in chunks, with a progress bar on a terminal;
//! - `follow`: `start --count N --wait`, following the instances to their end;
//! - `render`: the answers for people.

mod args;
mod follow;
mod progress;
mod render;
mod run;
mod schedule;

pub use args::{
    CampaignCommand, InstanceCommand, LifecycleArgs, OperatorCommand, TokenCommand, WorkflowCommand,
};
pub use run::{Api, run};
