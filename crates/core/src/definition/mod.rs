//! Workflow definitions: the format of `DEFINITIONS.md`, parsed and validated at deploy time.
//!
//! The source is read into a `serde_json::Value` first and checked by hand rather than through
//! `serde` derives, so that *every* problem is reported at once and each names its step and
//! field: an operator fixing a definition should not have to deploy it once per typo.
//!
//! - `model`: the validated types and what the runtime asks of them (routes, retry delays,
//!   transitions);
//! - `validation`: reading a source or a stored JSON into the model, every rule checked;
//! - `writer`: the canonical JSON a definition is stored and compared as.

mod model;
mod validation;
mod writer;

#[cfg(test)]
mod fixtures;

pub use model::{
    DEFAULT_MAX_STEPS, DEFAULT_TIMEOUT, Definition, DefinitionError, DefinitionErrors, EndStatus,
    HttpMethod, MAX_CALL_DEPTH, RetryPolicy, Severity, SleepUntil, Step, StepKind, Transition,
    millis,
};
pub use validation::{MAX_DURATION, MAX_SOURCE_BYTES, MAX_STEP_COUNT};
