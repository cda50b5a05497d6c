//! The `drover` binary with the handlers the end-to-end tests use registered: what a user's
//! own worker binary looks like.
//!
//! `DROVER_TEST_HANDLERS` (comma-separated names, possibly none) registers only those of them:
//! a worker that lacks a handler, for the worker-queue tests. Unset: all of them.

use drover::{HandlerInput, Handlers, StepError};
use serde_json::json;

fn main() -> std::process::ExitCode {
    let only = std::env::var("DROVER_TEST_HANDLERS").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|only| only.split(',').any(|n| n.trim() == name))
    };
    let mut handlers = Handlers::default();
    if wanted("echo") {
        handlers.insert("echo", |input: HandlerInput| async move {
            Ok::<_, StepError>(json!({ "echo": input.input, "attempt": input.attempt }))
        });
    }
    if wanted("double") {
        handlers.insert("double", |input: HandlerInput| async move {
            let n = input.input["n"].as_i64().ok_or_else(|| {
                StepError::Permanent(format!("n is not an integer: {}", input.input["n"]))
            })?;
            Ok(json!({ "n": n * 2 }))
        });
    }
    if wanted("slow") {
        handlers.insert("slow", |input: HandlerInput| async move {
            let ms = input.input["ms"].as_u64().unwrap_or(200);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            Ok::<_, StepError>(json!({ "slept_ms": ms }))
        });
    }
    drover::main(handlers)
}
