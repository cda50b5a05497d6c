//! `GET /v1/instances/{id}/diagnosis` (`drover why ID`): why an instance is not running, in
//! one sentence, with the facts behind it.
//!
//! The store gathers the facts in one snapshot; [`diagnose`] (pure) picks the cause that
//! explains the instance best. Causes that would explain *any* instance in its state come before
//! the state itself: a READY instance with no live worker is explained by the missing workers,
//! not by "ready", and one whose step no live worker can run (none serves its queue, or none
//! that does has its handler) by the missing capable worker; a timer that is due while no
//! coordinator leads is explained by the missing leader.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, SecondsFormat, Utc};
use drover_core::{InstanceId, InstanceState};
use drover_store::DiagnosisFacts;
use serde::Serialize;
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::ApiState;
use crate::error::{ErrorBody, Result, unknown_instance};
use crate::extract::{ApiPath, parse_id};

/// A worker node counts as live if it heartbeat this recently (nodes heartbeat every second;
/// the leader declares a node dead after 3 s of silence).
pub const LIVE_WITHIN_MS: i64 = 3_000;
/// How long a READY instance, a due timer or a silent node is given before the missing
/// coordinator is blamed (the leader ticks every few hundred milliseconds).
const GRACE_MS: i64 = 2_000;

/// Why an instance is where it is.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Diagnosis {
    /// One sentence.
    pub summary: String,
    /// The cause, for scripts: `finished`, `in_error`, `failed_descendant`, `paused`,
    /// `queued`, `campaign_paused`, `waiting_timer`, `timer_due`, `waiting_event`, `waiting_child`, `retry_delay`,
    /// `no_live_worker`, `no_capable_worker`, `no_leader`, `ready`, `running`, `node_dead`,
    /// `node_silent`.
    pub cause: String,
    /// The facts behind it: always `state`, `step`, `queue`, `handler` (of the current step;
    /// null for all but `handler` steps), `campaign`, `workers` and `leader`; more
    /// per cause (`queue_position` and `permit_holders`, `wake_at`, `event`, `child`,
    /// `paused_by`, `error` and `resume_commands`, `node`, …).
    #[schema(value_type = Object)]
    pub details: Value,
}

/// Why an instance is not running (or where it runs).
#[utoipa::path(
    get,
    path = "/v1/instances/{id}/diagnosis",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The instance id")),
    responses(
        (status = 200, body = Diagnosis),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown instance", body = ErrorBody),
    )
)]
pub(crate) async fn diagnosis(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Diagnosis>> {
    let id = parse_id(&id)?;
    match state.store.diagnosis_facts(id, LIVE_WITHIN_MS).await? {
        Some(facts) => Ok(Json(diagnose(&facts))),
        None => Err(unknown_instance(id)),
    }
}

/// Picks the cause that best explains `facts` and words it.
pub fn diagnose(facts: &DiagnosisFacts) -> Diagnosis {
    let i = &facts.instance;
    let id = i.id;
    let now = facts.now;
    let mut details = base_details(facts);
    let mut put = |key: &str, value: Value| {
        details.insert(key.to_owned(), value);
    };
    let leader_gone = !facts.lease.as_ref().is_some_and(|lease| lease.live);
    let no_leader_clause = || match &facts.lease {
        Some(lease) if lease.holder.is_some() => format!(
            "no coordinator holds the leader lease (the last leader's term {} lapsed at {})",
            lease.term,
            at(lease.expires_at)
        ),
        _ => "no coordinator holds the leader lease (none has ever run)".to_owned(),
    };

    let (cause, summary) = match i.state {
        InstanceState::Completed | InstanceState::Failed | InstanceState::Stopped => {
            put("finished_at", json!(i.finished_at));
            put("restarted_as", json!(facts.restarted_as));
            let when = i
                .finished_at
                .map(|t| format!(" at {}", at(t)))
                .unwrap_or_default();
            let error = match (i.state, &i.error) {
                (InstanceState::Failed, Some(error)) => format!(" ({error})"),
                _ => String::new(),
            };
            let next = match facts.restarted_as {
                Some(new) => format!("; it was restarted as {new}"),
                None => format!("; `drover restart {id}` starts it again"),
            };
            (
                "finished",
                format!(
                    "Instance {id} is not running because it has finished: {}{when}{error}{next}.",
                    i.state
                ),
            )
        }
        InstanceState::InError => {
            put("error", json!(i.error));
            let target = facts.failed_descendant.unwrap_or(id);
            let commands = resume_commands(target);
            put("resume_commands", json!(commands));
            match facts.failed_descendant {
                Some(child) => {
                    put("failed_descendant", json!(child));
                    (
                        "failed_descendant",
                        format!(
                            "Instance {id} is in_error because a descendant failed: resume \
                             the deepest failed one first, with `{}` (retry its step) or `{}` \
                             (skip it).",
                            commands[0], commands[1]
                        ),
                    )
                }
                None => (
                    "in_error",
                    format!(
                        "Instance {id} is in_error at step {:?}: {}; resume it with `{}` \
                         (retry the step) or `{}` (skip it), or end it with `drover kill {id}`.",
                        i.current_step,
                        i.error.as_deref().unwrap_or("no error recorded"),
                        commands[0],
                        commands[1]
                    ),
                ),
            }
        }
        InstanceState::Paused => {
            put("paused_by", json!(i.paused_by));
            put("paused_at", json!(i.paused_at));
            put("paused_from", json!(i.paused_from));
            let by = i.paused_by.as_deref().unwrap_or("an operator");
            let since = i
                .paused_at
                .map(|t| format!(" since {} ({} ago)", at(t), ago(now, t)))
                .unwrap_or_default();
            let permit = if i.holds_permit {
                " and keeps its permit"
            } else {
                ""
            };
            let was = match i.paused_from {
                Some(InstanceState::Waiting) => {
                    " It was waiting; a timer, event or child that \
                     comes meanwhile is kept for when it is unpaused."
                }
                Some(InstanceState::Queued) => {
                    " It was queued; unpausing queues it again unless a permit is free."
                }
                _ => "",
            };
            (
                "paused",
                format!(
                    "Instance {id} is paused by {by}{since}{permit}; `drover unpause {id}` \
                     lets it go on.{was}"
                ),
            )
        }
        InstanceState::Queued => {
            let c = &facts.campaign;
            put("queue_position", json!(facts.queue_position));
            put("permit_holders", json!(facts.permit_holders));
            put("permit_holder_count", json!(facts.permit_holder_count));
            let position = facts
                .queue_position
                .map_or_else(|| "?".to_owned(), |p| p.to_string());
            let limit = c
                .max_running
                .map_or_else(|| "no limit".to_owned(), |m| m.to_string());
            let mut holders: Vec<String> = facts
                .permit_holders
                .iter()
                .map(|h| format!("{} ({})", h.id, h.state))
                .collect();
            if facts.permit_holder_count > facts.permit_holders.len() as i64 {
                holders.push(format!(
                    "and {} more",
                    facts.permit_holder_count - facts.permit_holders.len() as i64
                ));
            }
            let holders = if holders.is_empty() {
                String::new()
            } else {
                format!(": {}", holders.join(", "))
            };
            if let Some(paused_at) = c.paused_at {
                put("campaign_paused_at", json!(paused_at));
                put("campaign_paused_by", json!(c.paused_by));
                let by = c.paused_by.as_deref().unwrap_or("an operator");
                return Diagnosis {
                    summary: format!(
                        "Instance {id} is queued at position {position} of {} because campaign \
                         {:?} is paused (by {by} since {}): it admits nothing until \
                         `drover campaign unpause {}` ({}/{limit} running{holders}).",
                        c.queued,
                        c.name,
                        at(paused_at),
                        c.name,
                        c.running
                    ),
                    cause: "campaign_paused".to_owned(),
                    details: Value::Object(details),
                };
            }
            (
                "queued",
                format!(
                    "Instance {id} is queued at position {position} of {} behind campaign \
                     {:?}'s limit ({}/{limit} running{holders}).",
                    c.queued, c.name, c.running
                ),
            )
        }
        InstanceState::Waiting => waiting(facts, &mut put, leader_gone, &no_leader_clause),
        InstanceState::Ready => {
            put("ready_at", json!(i.ready_at));
            let ready_at = i.ready_at.unwrap_or(i.updated_at);
            if ready_at > now {
                (
                    "retry_delay",
                    format!(
                        "Instance {id} retries step {:?} (attempt {}) at {} (in {}).",
                        i.current_step,
                        i.step_attempt,
                        at(ready_at),
                        ago(ready_at, now)
                    ),
                )
            } else if facts.live_workers == 0 {
                let silence = match facts.last_worker_heartbeat {
                    Some(last) => format!(
                        "has reported for {} seconds (the last heartbeat was at {})",
                        (now - last).num_seconds().max(0),
                        at(last)
                    ),
                    None => "has ever registered".to_owned(),
                };
                (
                    "no_live_worker",
                    format!(
                        "Instance {id} is ready at step {:?} but no live worker {silence}: \
                         start a node with the worker role.",
                        i.current_step
                    ),
                )
            } else if facts.capable_workers == 0 {
                let route = &i.route;
                let start = match &route.handler {
                    Some(handler) => format!(
                        "start a worker serving it (`--queues {}`) in a binary that registers \
                         handler {handler:?}",
                        route.queue
                    ),
                    None => format!("start a worker serving it (`--queues {}`)", route.queue),
                };
                (
                    "no_capable_worker",
                    format!(
                        "Instance {id} is ready at step {:?}, waiting for a worker serving \
                         {route} (none alive): {start}.",
                        i.current_step
                    ),
                )
            } else if leader_gone && (now - ready_at).num_milliseconds() > GRACE_MS {
                (
                    "no_leader",
                    format!(
                        "Instance {id} has been ready for {} and {}, so a lost job is not \
                         re-dispatched: start a node with the coordinator role.",
                        ago(now, ready_at),
                        no_leader_clause()
                    ),
                )
            } else {
                (
                    "ready",
                    format!(
                        "Instance {id} is ready at step {:?} since {} ({} ago), waiting for \
                         one of {} live workers serving {} to claim it.",
                        i.current_step,
                        at(ready_at),
                        ago(now, ready_at),
                        facts.capable_workers,
                        i.route
                    ),
                )
            }
        }
        InstanceState::Running => {
            let since = i.claimed_at.unwrap_or(i.updated_at);
            let requested = match (&i.stop_requested_by, &i.pause_requested_by) {
                (Some(by), _) => {
                    format!("; {by} asked it to stop, which it does when the step finishes")
                }
                (None, Some(by)) => {
                    format!("; {by} asked it to pause, which it does when the step finishes")
                }
                (None, None) => String::new(),
            };
            put("claimed_at", json!(i.claimed_at));
            let node = i
                .owner_node
                .map_or_else(|| "an unknown node".to_owned(), |n| n.to_string());
            match &facts.owner {
                Some(owner) if matches!(owner.status.as_str(), "dead" | "left") => {
                    let gone = if owner.status == "left" {
                        "which left the cluster"
                    } else {
                        "which was declared dead"
                    };
                    put("node", json!(owner));
                    let recovery = if leader_gone {
                        format!("; {}, so nobody requeues it", no_leader_clause())
                    } else {
                        "; recovery requeues it within seconds".to_owned()
                    };
                    (
                        "node_dead",
                        format!(
                            "Instance {id} was running step {:?} on node {node}, {gone}{}\
                             {recovery}.",
                            i.current_step,
                            owner
                                .died_at
                                .map(|t| format!(" at {}", at(t)))
                                .unwrap_or_default()
                        ),
                    )
                }
                Some(owner) if (now - owner.heartbeat_at).num_milliseconds() > LIVE_WITHIN_MS => {
                    put("node", json!(owner));
                    let then = if leader_gone {
                        format!("; {}, so nobody declares it dead", no_leader_clause())
                    } else {
                        "; the leader declares it dead and requeues the step soon".to_owned()
                    };
                    (
                        "node_silent",
                        format!(
                            "Instance {id} is running step {:?} on node {node} since {}, but \
                             that node has not reported for {}{then}.",
                            i.current_step,
                            at(since),
                            ago(now, owner.heartbeat_at)
                        ),
                    )
                }
                owner => {
                    put("node", json!(owner));
                    (
                        "running",
                        format!(
                            "Instance {id} is running step {:?} (attempt {}) on node {node} \
                             since {} ({} ago){}{requested}.",
                            i.current_step,
                            i.step_attempt,
                            at(since),
                            ago(now, since),
                            if owner.is_some() {
                                ", which is alive"
                            } else {
                                ""
                            }
                        ),
                    )
                }
            }
        }
    };
    Diagnosis {
        summary,
        cause: cause.to_owned(),
        details: Value::Object(details),
    }
}

/// A WAITING instance: what it waits for, unless a missing coordinator keeps its due timer
/// from firing.
fn waiting(
    facts: &DiagnosisFacts,
    put: &mut impl FnMut(&str, Value),
    leader_gone: bool,
    no_leader_clause: &dyn Fn() -> String,
) -> (&'static str, String) {
    let i = &facts.instance;
    let id = i.id;
    let now = facts.now;
    put("wake_at", json!(i.wake_at));
    put("wait_deadline", json!(i.wait_deadline));
    put("waiting_since", json!(i.updated_at));
    if let Some(wake_at) = i.wake_at
        && wake_at <= now
    {
        if leader_gone && (now - wake_at).num_milliseconds() > GRACE_MS {
            return (
                "no_leader",
                format!(
                    "Instance {id}'s timer was due at {} ({} ago) but {}, so nothing fires \
                     it: start a node with the coordinator role.",
                    at(wake_at),
                    ago(now, wake_at),
                    no_leader_clause()
                ),
            );
        }
        return (
            "timer_due",
            format!(
                "Instance {id}'s timer came at {}; the coordinator wakes it at its next tick.",
                at(wake_at)
            ),
        );
    }
    if let Some(child) = &facts.child
        && i.pending_children > 0
    {
        put("child", json!(child));
        let error = child
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let hint = match child.state {
            InstanceState::InError => format!(
                "; resume it with `drover resume {} --current-step` or `--next-step`",
                child.id
            ),
            _ => String::new(),
        };
        return (
            "waiting_child",
            format!(
                "Instance {id} is waiting for its child {} ({}), which is {} at step {:?}{error}{hint}.",
                child.id, child.workflow, child.state, child.current_step
            ),
        );
    }
    if let Some(event) = &i.wait_event {
        put("event", json!(event));
        put("event_stored", json!(facts.event_stored));
        let timeout = i
            .wake_at
            .map(|t| format!(", until {} (in {}), when it times out", at(t), ago(t, now)))
            .unwrap_or_else(|| " with no timeout".to_owned());
        return (
            "waiting_event",
            format!(
                "Instance {id} is waiting for event {event:?} since {}{timeout}; deliver it with \
                 `drover send-event {id} {event}`.",
                at(i.updated_at)
            ),
        );
    }
    match i.wake_at {
        Some(wake_at) => (
            "waiting_timer",
            format!(
                "Instance {id} is waiting for a timer at step {:?} until {} (in {}).",
                i.current_step,
                at(wake_at),
                ago(wake_at, now)
            ),
        ),
        None => (
            "waiting_child",
            format!(
                "Instance {id} is waiting at step {:?} for its child to finish.",
                i.current_step
            ),
        ),
    }
}

/// The facts every diagnosis carries.
fn base_details(facts: &DiagnosisFacts) -> Map<String, Value> {
    let i = &facts.instance;
    let c = &facts.campaign;
    let mut details = Map::new();
    details.insert("state".to_owned(), json!(i.state));
    details.insert("step".to_owned(), json!(i.current_step));
    details.insert("queue".to_owned(), json!(i.route.queue));
    details.insert("handler".to_owned(), json!(i.route.handler));
    details.insert("step_seq".to_owned(), json!(i.step_seq));
    details.insert("holds_permit".to_owned(), json!(i.holds_permit));
    // A pending request (a pause asked while a step ran that ended in a wait) is worth seeing
    // in any state.
    for (key, by) in [
        ("pause_requested_by", &i.pause_requested_by),
        ("stop_requested_by", &i.stop_requested_by),
    ] {
        if by.is_some() {
            details.insert(key.to_owned(), json!(by));
        }
    }
    details.insert(
        "campaign".to_owned(),
        json!({
            "name": c.name,
            "max_running": c.max_running,
            "running": c.running,
            "queued": c.queued,
            "paused_at": c.paused_at,
        }),
    );
    details.insert(
        "workers".to_owned(),
        json!({
            "live": facts.live_workers,
            "capable": facts.capable_workers,
            "last_heartbeat_at": facts.last_worker_heartbeat,
            "silent_for_s": facts
                .last_worker_heartbeat
                .map(|last| (facts.now - last).num_seconds().max(0)),
        }),
    );
    details.insert(
        "leader".to_owned(),
        match &facts.lease {
            Some(lease) => json!({
                "holder": lease.holder,
                "term": lease.term,
                "expires_at": lease.expires_at,
                "live": lease.live,
            }),
            None => Value::Null,
        },
    );
    details
}

fn resume_commands(id: InstanceId) -> [String; 2] {
    [
        format!("drover resume {id} --current-step"),
        format!("drover resume {id} --next-step"),
    ]
}

/// A timestamp for people: RFC 3339 to the second, UTC.
fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// How long from `earlier` to `later`, for people (`42s`, `3m 5s`, `2h 1m`).
fn ago(later: DateTime<Utc>, earlier: DateTime<Utc>) -> String {
    let s = (later - earlier).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}
