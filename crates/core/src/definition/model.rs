//! The validated definition types and what the runtime asks of them.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::expr::{Expr, ExprError, Scope};
use crate::route::{Queue, Route};

/// The step budget of an instance when `max_steps` is not given.
pub const DEFAULT_MAX_STEPS: u32 = 10_000;
/// The per-attempt timeout of a step when `timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The deepest chain of `subworkflow` calls: an instance at this `call_depth` cannot start a
/// child (a top-level instance is at depth 0). Ends runaway recursion with a clear error.
pub const MAX_CALL_DEPTH: i32 = 32;

/// A validated workflow definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub name: String,
    pub description: Option<String>,
    /// The queue of its steps' jobs (only workers serving it run them); `None`: the
    /// [`Queue::DEFAULT`] queue.
    pub queue: Option<Queue>,
    /// How the paused-too-long technical workflow treats its paused instances.
    pub severity: Severity,
    pub vars: Map<String, Value>,
    /// The step budget of one instance; past it the instance goes to `in_error`.
    pub max_steps: u32,
    /// `steps[0]` is the entry point.
    pub steps: Vec<Step>,
}

/// A definition's `severity`: how the `system-paused-instances` technical workflow treats its
/// instances paused too long. `normal` ones are stopped past the stop threshold; `production`
/// and `critical` ones are only warned about (critical ones logged as errors).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Normal,
    Production,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Normal, Severity::Production, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Normal => "normal",
            Severity::Production => "production",
            Severity::Critical => "critical",
        }
    }

    /// Are its instances stopped once paused past the stop threshold? (Else only warned.)
    pub fn stopped_when_paused_too_long(self) -> bool {
        self == Severity::Normal
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|severity| severity.as_str() == s)
            .ok_or_else(|| {
                format!("unknown severity {s:?}; expected one of: normal, production, critical")
            })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    /// Overrides the workflow's queue for this step.
    pub queue: Option<Queue>,
    /// False: never re-run this step automatically after an interruption.
    pub allow_retry: bool,
    /// Per attempt.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Ordered; the first whose `when` is true wins. Empty for `end`.
    pub next: Vec<Transition>,
    pub kind: StepKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub to: String,
    /// `None`: always taken.
    pub when: Option<Expr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at least 1.
    pub max_attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndStatus {
    Completed,
    Failed,
}

/// What a step does; the map-shaped fields keep the order they were written in.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Assign {
        set: Vec<(String, Expr)>,
    },
    Http {
        method: HttpMethod,
        url: String,
        headers: Vec<(String, String)>,
        /// `None`: no body at all, which differs from an empty JSON object.
        body: Option<Vec<(String, Expr)>>,
    },
    Publish {
        subject: String,
        payload: Vec<(String, Expr)>,
    },
    Handler {
        handler: String,
        input: Vec<(String, Expr)>,
    },
    /// Durable: the instance waits in the database, no worker is held.
    Sleep {
        until: SleepUntil,
    },
    /// Waits for an event delivered to this instance (API, CLI or NATS); events that arrive
    /// before the instance reaches the step are kept for it.
    WaitEvent {
        /// A slug.
        name: String,
        /// How long to wait before the step fails; `None`: for ever.
        timeout: Option<Duration>,
    },
    /// Starts a child instance and waits for it to finish.
    Subworkflow {
        /// The child's workflow (a slug).
        workflow: String,
        /// A version; the latest at the time the child starts when `None`.
        version: Option<i32>,
        /// Overrides the child's `vars`, key by key.
        input: Vec<(String, Expr)>,
    },
    End {
        status: EndStatus,
        reason: Option<Expr>,
    },
}

/// How long a `sleep` step sleeps.
#[derive(Debug, Clone, PartialEq)]
pub enum SleepUntil {
    /// `for: 30s`: a duration from the time the step first runs.
    For(Duration),
    /// `until: expr`: an expression giving an RFC 3339 timestamp, evaluated when the step
    /// first runs.
    Until(Expr),
}

/// One problem in a definition. `step` is the step's id when it has one; a step without a
/// usable id is named by position in `field` instead (`steps[3].kind`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DefinitionError {
    pub step: Option<String>,
    pub field: String,
    pub message: String,
}

/// Every problem found in a definition, in source order; displayed one per line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, thiserror::Error)]
#[serde(transparent)]
#[error("{}", lines(.0))]
pub struct DefinitionErrors(pub Vec<DefinitionError>);
impl Definition {
    /// The entry point, `steps[0]`.
    pub fn entry(&self) -> &Step {
        self.steps
            .first()
            .expect("invariant: a validated definition has at least one step")
    }

    /// The `subworkflow` steps: `(step id, workflow, version)` each, in order.
    pub fn subworkflows(&self) -> impl Iterator<Item = (&str, &str, Option<i32>)> {
        self.steps.iter().filter_map(|step| match &step.kind {
            StepKind::Subworkflow {
                workflow, version, ..
            } => Some((step.id.as_str(), workflow.as_str(), *version)),
            _ => None,
        })
    }

    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|step| step.id == id)
    }

    /// Where `step`'s jobs go: its own queue, else the workflow's, else the default one; and
    /// the handler a `handler` step needs.
    pub fn route(&self, step: &Step) -> Route {
        Route {
            queue: step
                .queue
                .as_ref()
                .or(self.queue.as_ref())
                .cloned()
                .unwrap_or_default(),
            handler: match &step.kind {
                StepKind::Handler { handler, .. } => Some(handler.clone()),
                _ => None,
            },
        }
    }
}

/// A duration in whole milliseconds, saturating: the unit durations are stored in.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Step {
    /// The per-attempt timeout in whole milliseconds, as the store records it.
    pub fn timeout_ms(&self) -> i64 {
        millis(self.timeout)
    }

    /// The first transition whose `when` is true (no `when` is always true). `Ok(None)` only if
    /// none matched, which validation rules out for a non-`end` step.
    pub fn choose_next(&self, scope: &Scope<'_>) -> Result<Option<&str>, ExprError> {
        for transition in &self.next {
            let taken = match &transition.when {
                None => true,
                Some(when) => when.eval_bool(scope)?,
            };
            if taken {
                return Ok(Some(&transition.to));
            }
        }
        Ok(None)
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempt + 1` after attempt `attempt` (1-based) failed:
    /// `backoff * 2^(attempt - 1)`, capped at `max_backoff`; saturates instead of overflowing.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1);
        2u32.checked_pow(doublings)
            .and_then(|factor| self.backoff.checked_mul(factor))
            .map_or(self.max_backoff, |delay| delay.min(self.max_backoff))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl HttpMethod {
    pub const ALL: [HttpMethod; 5] = [
        HttpMethod::Get,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Patch,
        HttpMethod::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
        }
    }
}

impl fmt::Display for HttpMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EndStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EndStatus::Completed => "completed",
            EndStatus::Failed => "failed",
        }
    }
}

impl StepKind {
    /// The kinds this version understands, as written in `kind:`.
    pub const NAMES: [&'static str; 8] = [
        "assign",
        "http",
        "publish",
        "handler",
        "sleep",
        "wait_event",
        "subworkflow",
        "end",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Assign { .. } => "assign",
            StepKind::Http { .. } => "http",
            StepKind::Publish { .. } => "publish",
            StepKind::Handler { .. } => "handler",
            StepKind::Sleep { .. } => "sleep",
            StepKind::WaitEvent { .. } => "wait_event",
            StepKind::Subworkflow { .. } => "subworkflow",
            StepKind::End { .. } => "end",
        }
    }

    /// Does this kind park its instance in `waiting` (no worker held) before it completes?
    pub fn waits(&self) -> bool {
        matches!(
            self,
            StepKind::Sleep { .. } | StepKind::WaitEvent { .. } | StepKind::Subworkflow { .. }
        )
    }
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(step) = &self.step {
            write!(f, "step {step:?}, ")?;
        }
        write!(f, "field {:?}: {}", self.field, self.message)
    }
}

fn lines(errors: &[DefinitionError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::fixtures::with_first_step;

    #[test]
    fn a_step_goes_to_its_own_queue_else_the_workflows_else_the_default() {
        let source = "name: w\nqueue: gpu\nsteps:\n  - id: a\n    kind: handler\n    \
                      handler: greet\n    input: {}\n    next: [{to: b}]\n  - id: b\n    \
                      kind: assign\n    queue: default\n    set: {}\n    next: [{to: c}]\n  \
                      - id: c\n    kind: end\n    status: completed\n";
        let definition = Definition::parse(source).expect("valid");
        let route = |id: &str| definition.route(definition.step(id).expect("a step"));
        let gpu: Queue = "gpu".parse().expect("a slug");
        assert_eq!(
            route("a"),
            Route {
                queue: gpu.clone(),
                handler: Some("greet".into())
            }
        );
        assert_eq!(route("b"), Route::default());
        assert_eq!(route("c").queue, gpu);
        // Written as given, and read back the same.
        let json = definition.to_json();
        assert_eq!(json["queue"], "gpu");
        assert_eq!(json["steps"][1]["queue"], "default");
        assert_eq!(json["steps"][0].get("queue"), None);
        assert_eq!(Definition::from_json(&json).as_ref(), Ok(&definition));

        // Without the field: the default queue, and the canonical JSON has no `queue` (so a
        // definition stored before queues existed compares equal, and still loads).
        let plain = Definition::parse(&with_first_step(
            "    kind: handler\n    handler: h\n    input: {}\n    next: [{to: b}]",
        ))
        .expect("valid");
        assert_eq!(plain.queue, None);
        assert_eq!(plain.route(plain.entry()).queue, Queue::default());
        assert_eq!(plain.to_json().get("queue"), None);
        assert_eq!(plain.to_json()["steps"][0].get("queue"), None);
    }

    #[test]
    fn severity_defaults_to_normal_and_an_unknown_one_is_refused() {
        let plain = Definition::parse(&with_first_step(
            "    kind: assign\n    set: {}\n    next: [{to: b}]",
        ))
        .expect("valid");
        assert_eq!(plain.severity, Severity::Normal);
        assert_eq!(plain.to_json().get("severity"), None);

        let source = "name: w\nseverity: critical\nsteps:\n  - id: a\n    kind: end\n    \
                      status: completed\n";
        let critical = Definition::parse(source).expect("valid");
        assert_eq!(critical.severity, Severity::Critical);
        assert_eq!(critical.to_json()["severity"], "critical");
        assert_eq!(
            Definition::from_json(&critical.to_json()).as_ref(),
            Ok(&critical)
        );
        assert!(!critical.severity.stopped_when_paused_too_long());
        assert!(Severity::Normal.stopped_when_paused_too_long());

        let errors = Definition::parse(&source.replace("critical", "urgent"))
            .expect_err("an unknown severity");
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].field, "severity");
        assert!(
            errors.0[0].message.contains("normal, production, critical"),
            "{}",
            errors.0[0].message
        );
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap_without_overflow() {
        let policy = RetryPolicy {
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=5).map(|a| policy.delay_after(a).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        assert_eq!(policy.delay_after(0), Duration::from_millis(200));
        let huge = RetryPolicy {
            backoff: Duration::MAX,
            max_backoff: Duration::MAX,
            ..policy
        };
        assert_eq!(huge.delay_after(u32::MAX), Duration::MAX);
        assert_eq!(huge.delay_after(2), Duration::MAX);
    }
}
