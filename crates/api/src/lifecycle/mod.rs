//! Lifecycle commands: `POST /v1/instances/{id}/{pause|unpause|stop|kill|restart}` for one
//! instance and `POST /v1/instances/{pause|unpause|stop|kill|restart}` with a filter body for
//! many.
//!
//! The store applies each command in one transaction per batch (see `drover_store`'s
//! lifecycle module for what each does in each state); the jobs of instances made READY
//! (unpaused, woken parents, queued instances admitted with a freed permit, restarts) are
//! published after the commit. A failed publish is logged: the sweeper re-dispatches READY
//! instances.
//!
//! A command that finds the instance where it leads already is a no-op success
//! (`changed: false`); one the instance's state does not allow is a 409 naming why and what to
//! do instead.
//!
//! - `dto`: the requests and answers, and [`LifecycleCommand`];
//! - `handlers`: the routes;
//! - `apply`: a command carried out, by id or by filter, and its jobs published;
//! - `refusal`: the 409 of a command the instance's state does not allow.

pub(crate) mod apply;
mod dto;
pub(crate) mod handlers;
mod refusal;

pub use apply::LIFECYCLE_BATCH;
pub use dto::{
    Cascaded, LifecycleCommand, LifecycleFilterRequest, LifecycleRequest, LifecycleResult,
    LifecycleSummary, RefusalEntry,
};
