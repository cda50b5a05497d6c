//! The public handler-registration API: Rust functions that `handler` steps call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use drover_core::InstanceId;
use futures::future::BoxFuture;
use serde_json::Value;

/// How a step failed, which decides what happens next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth another attempt (per the step's retry policy): timeouts, 5xx, unavailable peers.
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way again: the instance goes to `in_error` for an operator.
    #[error("{0}")]
    Permanent(String),
}

/// What a handler is given.
#[derive(Clone, Debug)]
pub struct HandlerInput {
    pub instance: InstanceId,
    pub workflow: String,
    pub step_id: String,
    /// 1 on the first attempt of this step.
    pub attempt: u32,
    /// Stable across retries and re-runs of this step: use it to make side effects idempotent.
    pub idempotency_key: String,
    /// The step's `input`, evaluated.
    pub input: Value,
    /// The instance variables (read-only; a handler's output is recorded as `steps.<id>`).
    pub vars: Value,
}

pub(crate) type HandlerFn =
    Arc<dyn Fn(HandlerInput) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync>;

/// Handlers by name.
#[derive(Clone, Default)]
pub struct Handlers {
    by_name: HashMap<String, HandlerFn>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_name.keys()).finish()
    }
}

impl Handlers {
    /// Registers `f` under `name` (a later registration of the same name replaces it).
    pub fn insert<F, Fut>(&mut self, name: impl Into<String>, f: F)
    where
        F: Fn(HandlerInput) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.by_name.insert(
            name.into(),
            Arc::new(move |input| {
                let f = Arc::clone(&f);
                Box::pin(async move { f(input).await })
            }),
        );
    }

    pub(crate) fn get(&self, name: &str) -> Option<&HandlerFn> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}
