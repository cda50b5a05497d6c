//! What a step's body produces, and the shared things a body may use: the vocabulary of
//! [`crate::step`] and [`crate::waiting`], kept apart so that neither imports the other's.

use drover_bus::Bus;
use drover_core::SignalId;
use drover_core::Step;
use drover_core::expr::{Scope, eval_map};
use drover_store::{NewChild, Store};
use serde_json::{Map, Value};

use crate::handler::{Handlers, StepError};

/// What a step's body produced.
pub(crate) enum Body {
    /// It finished: go on along its transitions.
    Ran(Ran),
    /// It waits (durably, holding no worker) and runs again when woken.
    Wait(Wait),
}

/// A finished step body.
pub(crate) struct Ran {
    pub(crate) output: Value,
    pub(crate) vars: Option<Map<String, Value>>,
    /// The signal a `wait_event` step consumed, marked consumed by the commit.
    pub(crate) consumes: Option<SignalId>,
}

impl Ran {
    pub(crate) fn output(output: Value) -> Body {
        Body::Ran(Ran {
            output,
            vars: None,
            consumes: None,
        })
    }
}

/// What a waiting step waits for (see [`Transition::Wait`]).
pub(crate) struct Wait {
    pub(crate) wake_at_ms: Option<i64>,
    pub(crate) event: Option<String>,
    pub(crate) child: Option<Box<NewChild>>,
}

/// The shared things a step may use.
pub(crate) struct StepContext {
    pub(crate) bus: Bus,
    /// For waiting steps: signals, child definitions and instances.
    pub(crate) store: Store,
    /// Where `http` steps may connect, and their clients.
    pub(crate) egress: crate::egress::Egress,
    /// Where `publish` steps may publish.
    pub(crate) publish: drover_core::PublishPolicy,
    pub(crate) handlers: Handlers,
    /// Whether a stream stores a subject, and when that was asked.
    pub(crate) streams_by_subject:
        std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>,
}

/// Evaluates a step's `field` entries (`set`, `input`, …) in `scope`; an error names the key.
pub(crate) fn eval_entries(
    step: &Step,
    field: &str,
    entries: &[(String, drover_core::expr::Expr)],
    scope: &Scope<'_>,
) -> Result<Map<String, Value>, StepError> {
    eval_map(entries, scope).map_err(|(key, err)| {
        StepError::Permanent(format!(
            "step {:?}, field \"{field}.{key}\": {err}",
            step.id
        ))
    })
}
