//! Running one claimed step: built-in kinds and registered handlers, then deciding the
//! transition. The result is a [`Completion`]; only waiting steps read the database (see
//! [`crate::waiting`]), nothing here writes it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_core::definition::{EndStatus, StepKind};
use drover_core::expr::Scope;
use drover_core::{Definition, InstanceState, Step};
use drover_store::{Claimed, Completion, EndStep, Transition};
use serde_json::{Map, Value, json};

use crate::body::{Body, Ran, StepContext, Wait, eval_entries};
use crate::handler::{HandlerInput, StepError};

/// Largest HTTP response body a step records.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

fn as_map(value: &Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    }
}

fn instance_json(claimed: &Claimed) -> Value {
    json!({
        "id": claimed.id.to_string(),
        "workflow": claimed.workflow,
        "version": claimed.version,
        "campaign": claimed.campaign,
        "started_at": claimed.created_at.to_rfc3339(),
    })
}

/// The idempotency key of the claimed step: the same for every attempt and re-run of it.
pub(crate) fn idempotency_key(claimed: &Claimed) -> String {
    format!("{}:{}", claimed.id, claimed.step_entered_seq)
}

/// Runs the claimed instance's current step and decides where it goes next.
pub(crate) async fn run(
    ctx: Arc<StepContext>,
    definition: Arc<Definition>,
    claimed: &Claimed,
    started_at: DateTime<Utc>,
) -> Completion {
    run_step(&ctx, definition, claimed, started_at).await
}

async fn run_step(
    ctx: &StepContext,
    definition: Arc<Definition>,
    claimed: &Claimed,
    started_at: DateTime<Utc>,
) -> Completion {
    let Some(step) = definition.step(&claimed.current_step) else {
        let error = format!(
            "step {:?} does not exist in {} v{}",
            claimed.current_step, claimed.workflow, claimed.version
        );
        return stop_in_error(claimed, started_at, "error", error);
    };
    if !step.allow_retry && claimed.step_claims > 1 {
        return stop_in_error(
            claimed,
            started_at,
            "interrupted",
            format!(
                "step {:?} was interrupted; outcome unknown (allow_retry: false)",
                step.id
            ),
        );
    }
    if claimed.steps_run >= i32::try_from(definition.max_steps).unwrap_or(i32::MAX) {
        return stop_in_error(
            claimed,
            started_at,
            "budget_exceeded",
            format!("step budget of {} steps exhausted", definition.max_steps),
        );
    }

    let vars = as_map(&claimed.vars);
    let steps = as_map(&claimed.outputs);
    let instance = instance_json(claimed);
    let scope = Scope {
        vars: &vars,
        steps: &steps,
        instance: &instance,
        output: None,
    };

    let ran = match tokio::time::timeout(step.timeout, execute(ctx, step, claimed, &scope)).await {
        Ok(ran) => ran,
        Err(_) => Err(StepError::Retryable(format!(
            "step timed out after {}",
            humanize(step.timeout)
        ))),
    };
    match ran {
        Ok(Body::Ran(ran)) => advance(&definition, step, claimed, started_at, &scope, ran),
        Ok(Body::Wait(wait)) => park(claimed, started_at, wait),
        Err(StepError::Retryable(error)) => {
            let attempt = u32::try_from(claimed.step_attempt).unwrap_or(1);
            if attempt < step.retry.max_attempts {
                let delay = step.retry.delay_after(attempt);
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                completion(
                    claimed,
                    started_at,
                    "retry",
                    Transition::Retry { delay_ms },
                    (None, None, Some(error)),
                )
            } else {
                let error = format!("{error} (after {attempt} attempts)");
                stop_in_error(claimed, started_at, "failed", error)
            }
        }
        Err(StepError::Permanent(error)) => stop_in_error(claimed, started_at, "failed", error),
    }
}

/// Parks the instance WAITING at its current step.
fn park(claimed: &Claimed, started_at: DateTime<Utc>, wait: Wait) -> Completion {
    completion(
        claimed,
        started_at,
        "waiting",
        Transition::Wait {
            wake_at_ms: wait.wake_at_ms,
            event: wait.event,
            child: wait.child,
        },
        (None, None, None),
    )
}

fn humanize(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// After a successful step body: evaluate the transitions (or the `end`).
fn advance(
    definition: &Definition,
    step: &Step,
    claimed: &Claimed,
    started_at: DateTime<Utc>,
    scope: &Scope<'_>,
    ran: Ran,
) -> Completion {
    let vars_after = ran.vars.clone().unwrap_or_else(|| scope.vars.clone());
    let output = ran.output;
    let new_vars = ran.vars.map(Value::Object);
    let consumes = ran.consumes;
    if let StepKind::End { status, reason } = &step.kind {
        let (state, output, error) = end(status, reason.as_ref(), scope);
        return completion(
            claimed,
            started_at,
            "completed",
            Transition::Stop { state },
            (new_vars, output, error),
        );
    }
    let next_scope = Scope {
        vars: &vars_after,
        steps: scope.steps,
        instance: scope.instance,
        output: Some(&output),
    };
    match step.choose_next(&next_scope) {
        Ok(Some(to)) => {
            let moved = Completion {
                consumes,
                ..completion(
                    claimed,
                    started_at,
                    "completed",
                    Transition::next(definition, to),
                    (new_vars, Some(output.clone()), None),
                )
            };
            end_at_once(definition, claimed, moved, &next_scope)
        }
        Ok(None) => stop_in_error(
            claimed,
            started_at,
            "failed",
            format!("step {:?}: no transition matched", step.id),
        ),
        Err(err) => stop_in_error(
            claimed,
            started_at,
            "failed",
            format!("step {:?}, field \"next\": {err}", step.id),
        ),
    }
}

/// An `end` step's outcome: the instance's final state, the journal output
/// (`{"reason": …}`) and error (a `failed` end's reason).
fn end(
    status: &EndStatus,
    reason: Option<&drover_core::expr::Expr>,
    scope: &Scope<'_>,
) -> (InstanceState, Option<Value>, Option<String>) {
    let reason = reason.map(|expr| match expr.eval(scope) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(err) => format!("reason: {err}"),
    });
    let state = match status {
        EndStatus::Completed => InstanceState::Completed,
        EndStatus::Failed => InstanceState::Failed,
    };
    let error = reason.clone().filter(|_| state == InstanceState::Failed);
    (state, reason.map(|r| json!({ "reason": r })), error)
}

/// A step that moves on to an `end` step runs that end at once: it runs no code, and its
/// status and reason follow from what the step left (`after`: its variables and output, the
/// outputs before it). Both are committed together ([`Completion::ends`]), which saves the
/// end its own claim and commit. Not when the end is routed to another queue, nor when it
/// would exceed the step budget (its own claim refuses it then).
fn end_at_once(
    definition: &Definition,
    claimed: &Claimed,
    moved: Completion,
    after: &Scope<'_>,
) -> Completion {
    let Transition::Next {
        step: to, route, ..
    } = &moved.transition
    else {
        return moved;
    };
    let Some(end_step) = definition.step(to) else {
        return moved;
    };
    let StepKind::End { status, reason } = &end_step.kind else {
        return moved;
    };
    // An end routed to another queue is left to the workers of that queue.
    if route.queue != claimed.route.queue {
        return moved;
    }
    if i64::from(claimed.steps_run) + 1 >= i64::from(definition.max_steps) {
        return moved;
    }
    // The end sees the outputs with this step's: as the commit records them.
    let mut steps = after.steps.clone();
    if let Some(output) = after.output.filter(|o| !o.is_null()) {
        steps.insert(moved.step_id.clone(), output.clone());
    }
    let scope = Scope {
        vars: after.vars,
        steps: &steps,
        instance: after.instance,
        output: None,
    };
    let (state, output, error) = end(status, reason.as_ref(), &scope);
    Completion {
        transition: Transition::Stop { state },
        ends: Some(EndStep {
            step_id: to.clone(),
            output,
            error,
            next: moved.transition.clone(),
        }),
        ..moved
    }
}

pub(crate) fn stop_in_error(
    claimed: &Claimed,
    started_at: DateTime<Utc>,
    outcome: &str,
    error: String,
) -> Completion {
    completion(
        claimed,
        started_at,
        outcome,
        Transition::Stop {
            state: InstanceState::InError,
        },
        (None, None, Some(error)),
    )
}

/// The completion of `claimed`'s step (its events are the store's to write).
fn completion(
    claimed: &Claimed,
    started_at: DateTime<Utc>,
    outcome: &str,
    transition: Transition,
    (vars, output, error): (Option<Value>, Option<Value>, Option<String>),
) -> Completion {
    Completion {
        vars,
        output,
        error,
        ..Completion::of(claimed, started_at, outcome, transition)
    }
}

async fn execute(
    ctx: &StepContext,
    step: &Step,
    claimed: &Claimed,
    scope: &Scope<'_>,
) -> Result<Body, StepError> {
    match &step.kind {
        StepKind::Assign { set } => {
            let assigned = eval_entries(step, "set", set, scope)?;
            let mut vars = scope.vars.clone();
            for (k, v) in &assigned {
                vars.insert(k.clone(), v.clone());
            }
            Ok(Body::Ran(Ran {
                output: Value::Object(assigned),
                vars: Some(vars),
                consumes: None,
            }))
        }
        StepKind::Http {
            method,
            url,
            headers,
            body,
        } => {
            let body = match body {
                Some(entries) => Some(eval_entries(step, "body", entries, scope)?),
                None => None,
            };
            let output = http_call(ctx, step, claimed, method.as_str(), url, headers, body).await?;
            Ok(Ran::output(output))
        }
        StepKind::Publish { subject, payload } => {
            if let Err(problem) = ctx.publish.check(subject) {
                return Err(StepError::Permanent(format!(
                    "step {:?}, field \"subject\": {problem}",
                    step.id
                )));
            }
            let payload = eval_entries(step, "payload", payload, scope)?;
            let output = publish(ctx, claimed, subject, payload).await?;
            Ok(Ran::output(output))
        }
        StepKind::Handler { handler, input } => {
            let input = eval_entries(step, "input", input, scope)?;
            let Some(f) = ctx.handlers.get(handler) else {
                return Err(StepError::Permanent(format!(
                    "no handler named {handler:?} is registered in this worker"
                )));
            };
            let output = f(HandlerInput {
                instance: claimed.id,
                workflow: claimed.workflow.clone(),
                step_id: step.id.clone(),
                attempt: u32::try_from(claimed.step_attempt).unwrap_or(1),
                idempotency_key: idempotency_key(claimed),
                input: Value::Object(input),
                vars: Value::Object(scope.vars.clone()),
            })
            .await?;
            Ok(Ran::output(output))
        }
        StepKind::Sleep { .. } | StepKind::WaitEvent { .. } | StepKind::Subworkflow { .. } => {
            crate::waiting::execute(ctx, step, claimed, scope).await
        }
        StepKind::End { .. } => Ok(Ran::output(Value::Null)),
    }
}

/// Redirects an `http` step follows before it fails.
const MAX_REDIRECTS: usize = 10;

/// Calls `url`, following redirects itself so that every hop passes the egress policy
/// (see [`crate::egress`]) as the first did. A refused destination fails the step for good.
async fn http_call(
    ctx: &StepContext,
    step: &Step,
    claimed: &Claimed,
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<Map<String, Value>>,
) -> Result<Value, StepError> {
    use reqwest::{Method, StatusCode, header};

    let mut method = Method::from_bytes(method.as_bytes())
        .map_err(|e| StepError::Permanent(format!("method: {e}")))?;
    let mut url: reqwest::Url = url
        .parse()
        .map_err(|e| StepError::Permanent(format!("http {url}: {e}")))?;
    let mut headers = headers.to_vec();
    let mut body = match body {
        Some(body) => Some(
            serde_json::to_vec(&body).map_err(|e| StepError::Permanent(format!("body: {e}")))?,
        ),
        None => None,
    };
    let refused = |refusal: &crate::egress::Refusal| {
        StepError::Permanent(format!("http step {:?}: {refusal}", step.id))
    };
    let mut redirects = 0;
    let response = loop {
        let client = ctx.egress.client_for(&url).map_err(|e| match e {
            crate::egress::EgressError::Refused(refusal) => refused(&refusal),
            crate::egress::EgressError::Url(e) => StepError::Permanent(format!("http {e}")),
            e @ crate::egress::EgressError::Client(_) => {
                StepError::Retryable(format!("http {url}: {e}"))
            }
        })?;
        let mut request = client
            .request(method.clone(), url.clone())
            .timeout(step.timeout)
            .header("Idempotency-Key", idempotency_key(claimed))
            .header("traceparent", traceparent(claimed));
        for (name, value) in &headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &body {
            if !headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            request = request.body(body.clone());
        }
        let response = request.send().await.map_err(|e| {
            if let Some(refusal) = crate::egress::refusal_in(&e) {
                return refused(refusal);
            }
            // reqwest's own text is "error sending request"; the cause says why (connection
            // refused, a DNS failure, a timeout).
            let e = e.without_url();
            StepError::Retryable(format!("http {url}: {}", drover_core::error_chain(&e)))
        })?;
        let status = response.status();
        let next = status
            .is_redirection()
            .then(|| response.headers().get(header::LOCATION))
            .flatten()
            .and_then(|location| location.to_str().ok())
            .and_then(|location| url.join(location).ok())
            .filter(|next| matches!(next.scheme(), "http" | "https"));
        let Some(next) = next.filter(|_| status != StatusCode::NOT_MODIFIED) else {
            break response;
        };
        if redirects == MAX_REDIRECTS {
            return Err(StepError::Permanent(format!(
                "http {url}: more than {MAX_REDIRECTS} redirects"
            )));
        }
        redirects += 1;
        // As browsers and reqwest do: 303 becomes a GET, and so do 301/302 after a POST.
        if (status == StatusCode::SEE_OTHER && method != Method::HEAD)
            || (matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND)
                && method == Method::POST)
        {
            method = Method::GET;
            body = None;
        }
        // Credentials stay with the origin they were written for.
        if next.origin() != url.origin() {
            headers.retain(|(name, _)| {
                !["authorization", "cookie", "proxy-authorization"]
                    .iter()
                    .any(|sensitive| name.eq_ignore_ascii_case(sensitive))
            });
        }
        url = next;
    };
    let status = response.status();
    let class = match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("drover_http_step_responses_total", "class" => class).increment(1);
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(StepError::Permanent(format!(
            "http {url}: response body over {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    let is_json = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.contains("json"));
    let bytes = response.bytes().await.map_err(|e| {
        let e = e.without_url();
        StepError::Retryable(format!(
            "http {url}: reading body: {}",
            drover_core::error_chain(&e)
        ))
    })?;
    if bytes.len() > MAX_RESPONSE_BYTES {
        return Err(StepError::Permanent(format!(
            "http {url}: response body over {MAX_RESPONSE_BYTES} bytes"
        )));
    }
    let body = if is_json {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    } else {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    };
    let code = status.as_u16();
    if status.is_success() {
        Ok(json!({ "status": code, "body": body }))
    } else if status.is_server_error() || code == 408 || code == 429 {
        Err(StepError::Retryable(format!(
            "http {url}: status {code}: {}",
            short(&body)
        )))
    } else {
        Err(StepError::Permanent(format!(
            "http {url}: status {code}: {}",
            short(&body)
        )))
    }
}

fn short(body: &Value) -> String {
    let mut s = match body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// W3C trace context: the step span's when spans are exported; otherwise one made up from the
/// instance id (the trace id) and the step attempt, so a receiver still correlates the calls.
fn traceparent(claimed: &Claimed) -> String {
    if let Some(traceparent) = drover_bus::trace::current_traceparent() {
        return traceparent;
    }
    let span: u64 = rand_span(claimed);
    format!("00-{}-{span:016x}-01", claimed.id.0.simple())
}

fn rand_span(claimed: &Claimed) -> u64 {
    // Unique per step attempt and non-zero, as the spec requires.
    let seq = u64::try_from(claimed.step_seq.0).unwrap_or(0);
    let fence = u64::try_from(claimed.fence.0).unwrap_or(0);
    (seq << 32 | (fence & 0xffff_ffff)).max(1)
}

async fn publish(
    ctx: &StepContext,
    claimed: &Claimed,
    subject: &str,
    payload: Map<String, Value>,
) -> Result<Value, StepError> {
    let bytes =
        serde_json::to_vec(&payload).map_err(|e| StepError::Permanent(format!("payload: {e}")))?;
    let msg_id = format!("p:{}", idempotency_key(claimed));
    let headers = [("Nats-Msg-Id", msg_id.as_str())];
    if !ctx.stored_subject(subject).await {
        // No stream stores this subject: a plain publish reaches its live subscribers.
        ctx.bus
            .publish_plain(subject, &headers, bytes.into())
            .await
            .map_err(|e| StepError::Retryable(format!("publish {subject}: {e}")))?;
        return Ok(json!({ "subject": subject, "seq": null }));
    }
    match ctx
        .bus
        .publish_stored(subject, &headers, bytes.into())
        .await
    {
        Ok(seq) => Ok(json!({ "subject": subject, "seq": seq })),
        Err(err) => Err(StepError::Retryable(format!("publish {subject}: {err}"))),
    }
}

impl StepContext {
    /// Does a JetStream stream store `subject`? Asked of the server at most every 30 s per
    /// subject: a JetStream publish to a subject no stream stores would wait for an ack that
    /// never comes.
    async fn stored_subject(&self, subject: &str) -> bool {
        const FRESH: Duration = Duration::from_secs(30);
        if let Ok(cache) = self.streams_by_subject.lock()
            && let Some((stored, at)) = cache.get(subject)
            && at.elapsed() < FRESH
        {
            return *stored;
        }
        let stored = self.bus.stream_stores(subject).await;
        if let Ok(mut cache) = self.streams_by_subject.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (stored, std::time::Instant::now()));
        }
        stored
    }
}

#[cfg(test)]
mod tests {
    use drover_core::{Fence, InstanceId, StepSeq};

    use super::*;

    fn claimed(steps_run: i32) -> Claimed {
        Claimed {
            id: InstanceId::new(),
            workflow: "w".to_owned(),
            version: 1,
            campaign: "default".to_owned(),
            current_step: "a".to_owned(),
            step_seq: StepSeq(1),
            step_entered_seq: StepSeq(1),
            step_attempt: 1,
            fence: Fence(1),
            step_claims: 1,
            steps_run,
            vars: json!({ "n": 1 }),
            outputs: json!({ "before": { "k": "v" } }),
            created_at: Utc::now(),
            claimed_at: Utc::now(),
            wait_deadline: None,
            wait_child: None,
            parent: None,
            call_depth: 0,
            route: Default::default(),
            holds_permit: false,
        }
    }

    /// Runs step `a` of `yaml` (an `assign`) the way [`run_step`] finishes it.
    fn finish_a(yaml: &str, claimed: &Claimed) -> Completion {
        let definition = Definition::parse(yaml).expect("parses");
        let step = definition.step("a").expect("step a").clone();
        let vars = as_map(&claimed.vars);
        let steps = as_map(&claimed.outputs);
        let instance = instance_json(claimed);
        let scope = Scope {
            vars: &vars,
            steps: &steps,
            instance: &instance,
            output: None,
        };
        let StepKind::Assign { set } = &step.kind else {
            panic!("a is an assign")
        };
        let assigned = eval_entries(&step, "set", set, &scope).expect("evaluates");
        let mut after = vars.clone();
        after.extend(assigned.clone());
        let ran = Ran {
            output: Value::Object(assigned),
            vars: Some(after),
            consumes: None,
        };
        advance(&definition, &step, claimed, Utc::now(), &scope, ran)
    }

    const FAILS: &str = r#"
name: w
steps:
  - { id: a, kind: assign, set: { n: "vars.n + 1" }, next: [{ to: done }] }
  - id: done
    kind: end
    status: failed
    reason: "steps.before.k + (vars.n == 2 ? ' two' : ' other') + (steps.a.n == 2 ? ' seen' : ' unseen')"
"#;

    #[test]
    fn a_step_moving_to_an_end_runs_it_at_once_with_what_the_step_left() {
        let done = finish_a(FAILS, &claimed(0));
        assert_eq!(
            done.transition,
            Transition::Stop {
                state: InstanceState::Failed
            }
        );
        assert_eq!(done.outcome, "completed");
        assert_eq!(done.output, Some(json!({ "n": 2 })));
        let end = done.ends.expect("the end ran at once");
        assert_eq!(end.step_id, "done");
        assert_eq!(end.error.as_deref(), Some("v two seen"));
        assert_eq!(end.output, Some(json!({ "reason": "v two seen" })));
        assert!(
            matches!(&end.next, Transition::Next { step, .. } if step == "done"),
            "{:?}",
            end.next
        );
    }

    #[test]
    fn an_end_past_the_step_budget_or_on_another_queue_is_left_to_its_own_claim() {
        let budget = FAILS.replace("name: w", "name: w\nmax_steps: 2");
        assert!(finish_a(&budget, &claimed(0)).ends.is_some());
        let done = finish_a(&budget, &claimed(1));
        assert!(done.ends.is_none(), "{done:?}");
        assert!(
            matches!(&done.transition, Transition::Next { step, .. } if step == "done"),
            "{:?}",
            done.transition
        );

        let elsewhere = FAILS.replace("kind: end", "kind: end\n    queue: other");
        let done = finish_a(&elsewhere, &claimed(0));
        assert!(done.ends.is_none(), "{done:?}");
    }
}
