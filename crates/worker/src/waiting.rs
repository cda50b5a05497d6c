//! The waiting kinds: `sleep`, `wait_event` and `subworkflow`.
//!
//! Each runs at least twice. The first run parks the instance WAITING ([`Body::Wait`]: no
//! worker is held, the step is not finished); whatever wakes it (the leader's timer, a
//! delivered event, the child's end) makes it READY at the same step, and the re-run decides
//! from what the claim carries whether the wait is over:
//! - `wait_deadline`, set by the step's first wait and kept across its re-runs, compared with
//!   `claimed_at` (both by the database clock): a sleep is over, a wait_event has timed out;
//! - an unconsumed signal of the step's event name: consumed by the commit that completes the
//!   step, so only if that commit lands;
//! - `wait_child`, the child the step started: its end decides the step.
//!
//! A re-run that finds the wait not over (a spurious wake) waits again; the store keeps the
//! first deadline.

use chrono::{DateTime, SecondsFormat, Utc};
use drover_core::definition::{MAX_CALL_DEPTH, SleepUntil, StepKind};
use drover_core::expr::Scope;
use drover_core::{Definition, InstanceId, InstanceState, Step};
use drover_store::{Claimed, NewChild};
use serde_json::{Value, json};

use crate::commit::with_retries;
use crate::handler::StepError;
use drover_core::definition::millis;

use crate::body::{Body, Ran, StepContext, Wait, eval_entries};

/// Runs a waiting step's body.
pub(crate) async fn execute(
    ctx: &StepContext,
    step: &Step,
    claimed: &Claimed,
    scope: &Scope<'_>,
) -> Result<Body, StepError> {
    match &step.kind {
        StepKind::Sleep { until } => sleep(step, until, claimed, scope),
        StepKind::WaitEvent { name, timeout } => {
            wait_event(ctx, step, name, *timeout, claimed).await
        }
        StepKind::Subworkflow {
            workflow,
            version,
            input,
        } => subworkflow(ctx, step, (workflow, *version, input), claimed, scope).await,
        other => Err(StepError::Permanent(format!(
            "step {:?}: a {} step does not wait",
            step.id,
            other.name()
        ))),
    }
}

fn wait(wake_at_ms: Option<i64>, event: Option<&str>) -> Body {
    Body::Wait(Wait {
        wake_at_ms,
        event: event.map(str::to_owned),
        child: None,
    })
}

/// Milliseconds from `now` to `deadline`, at least 0.
fn until(deadline: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (deadline - now).num_milliseconds().max(0)
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn sleep(
    step: &Step,
    sleep: &SleepUntil,
    claimed: &Claimed,
    scope: &Scope<'_>,
) -> Result<Body, StepError> {
    let woke = || Ran::output(json!({ "woke_at": rfc3339(claimed.claimed_at) }));
    if let Some(deadline) = claimed.wait_deadline {
        return Ok(if claimed.claimed_at >= deadline {
            woke()
        } else {
            wait(Some(until(deadline, claimed.claimed_at)), None)
        });
    }
    let delay_ms = match sleep {
        SleepUntil::For(duration) => millis(*duration),
        SleepUntil::Until(expr) => {
            let field = |message: String| {
                StepError::Permanent(format!("step {:?}, field \"until\": {message}", step.id))
            };
            let value = expr.eval(scope).map_err(|e| field(e.to_string()))?;
            let at = value
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .ok_or_else(|| {
                    field(format!(
                        "expression `{}` gave {value}, not an RFC 3339 timestamp",
                        expr.source()
                    ))
                })?;
            until(at.with_timezone(&Utc), claimed.claimed_at)
        }
    };
    // Already past (or `for: 0s`): nothing to wait for.
    Ok(if delay_ms == 0 {
        woke()
    } else {
        wait(Some(delay_ms), None)
    })
}

async fn wait_event(
    ctx: &StepContext,
    step: &Step,
    name: &str,
    timeout: Option<std::time::Duration>,
    claimed: &Claimed,
) -> Result<Body, StepError> {
    let signal = with_retries(|| ctx.store.pending_signal(claimed.id, name))
        .await
        .map_err(|e| StepError::Retryable(format!("looking for event {name:?}: {e}")))?;
    if let Some(signal) = signal {
        return Ok(Body::Ran(Ran {
            output: signal.payload,
            vars: None,
            consumes: Some(signal.id),
        }));
    }
    match claimed.wait_deadline {
        Some(deadline) if claimed.claimed_at >= deadline => {
            let waited = timeout.map_or_else(
                || "its timeout".to_owned(),
                |t| humantime::format_duration(t).to_string(),
            );
            Err(StepError::Permanent(format!(
                "step {:?}: no event {name:?} arrived within {waited} (timeout at {})",
                step.id,
                rfc3339(deadline)
            )))
        }
        Some(deadline) => Ok(wait(Some(until(deadline, claimed.claimed_at)), Some(name))),
        None => Ok(wait(timeout.map(millis), Some(name))),
    }
}

async fn subworkflow(
    ctx: &StepContext,
    step: &Step,
    (workflow, version, input): (&str, Option<i32>, &[(String, drover_core::expr::Expr)]),
    claimed: &Claimed,
    scope: &Scope<'_>,
) -> Result<Body, StepError> {
    if let Some(child) = claimed.wait_child {
        return child_ended(ctx, step, workflow, child).await;
    }
    if claimed.call_depth >= MAX_CALL_DEPTH {
        return Err(StepError::Permanent(format!(
            "step {:?}: cannot start {workflow:?}: instance {} is {} subworkflow calls deep, \
             the limit is {MAX_CALL_DEPTH}",
            step.id, claimed.id, claimed.call_depth
        )));
    }
    let input = eval_entries(step, "input", input, scope)?;
    let stored = with_retries(|| ctx.store.get_definition(workflow, version))
        .await
        .map_err(|e| StepError::Retryable(format!("loading workflow {workflow:?}: {e}")))?
        .ok_or_else(|| {
            StepError::Permanent(match version {
                Some(version) => format!(
                    "step {:?}, field \"version\": workflow {workflow:?} has no version {version}",
                    step.id
                ),
                None => format!(
                    "step {:?}, field \"workflow\": no workflow {workflow:?} is deployed",
                    step.id
                ),
            })
        })?;
    let definition = Definition::from_json(&stored.body).map_err(|e| {
        StepError::Permanent(format!(
            "stored definition {} v{} no longer validates: {e}",
            stored.name, stored.version
        ))
    })?;
    let mut vars = definition.vars.clone();
    vars.extend(input);
    let entry = definition.entry();
    let child = NewChild {
        id: InstanceId::new(),
        workflow: stored.name,
        version: stored.version,
        entry_step: entry.id.clone(),
        allow_retry: entry.allow_retry,
        timeout_ms: entry.timeout_ms(),
        route: definition.route(entry),
        vars: Value::Object(vars),
    };
    Ok(Body::Wait(Wait {
        wake_at_ms: None,
        event: None,
        child: Some(Box::new(child)),
    }))
}

/// The re-run of a `subworkflow` step whose child was started: the child's end decides it.
async fn child_ended(
    ctx: &StepContext,
    step: &Step,
    workflow: &str,
    child: InstanceId,
) -> Result<Body, StepError> {
    let instance = with_retries(|| ctx.store.get_instance(child))
        .await
        .map_err(|e| StepError::Retryable(format!("loading child instance {child}: {e}")))?
        .ok_or_else(|| {
            StepError::Permanent(format!(
                "step {:?}: child instance {child} no longer exists",
                step.id
            ))
        })?;
    match instance.state {
        InstanceState::Completed => Ok(Ran::output(json!({
            "status": instance.state,
            "vars": instance.vars,
            "instance": child,
        }))),
        // Retryable: another attempt (if the retry policy allows) starts a new child.
        InstanceState::Failed | InstanceState::Stopped => Err(StepError::Retryable(format!(
            "step {:?}: child instance {child} ({workflow}) {}{}",
            step.id,
            instance.state,
            instance.error.map(|e| format!(": {e}")).unwrap_or_default()
        ))),
        // Not over (woken for another reason): wait on.
        _ => Ok(wait(None, None)),
    }
}
