//! The operator commands' answers for people: the API's JSON as tables and sentences.

use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::Value;

/// How to show an answer to a person.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum View {
    Deployed,
    Workflows,
    Workflow,
    Started,
    StartedIds,
    Instances,
    Instance,
    Journal,
    Campaigns,
    Campaign,
    LimitChanged,
    Retention,
    CampaignPaused,
    CampaignDeleted,
    WorkflowDeleted,
    Nodes,
    Resumed,
    Leader,
    EventSent,
    Lifecycle,
    LifecycleSummary,
    Diagnosis,
    TokenCreated,
    Tokens,
    TokenRevoked,
}

pub(super) fn render(view: View, answer: &Value) -> String {
    render_at(view, answer, Utc::now())
}

/// As [`render`], with heartbeat ages measured to `now`.
fn render_at(view: View, answer: &Value, now: DateTime<Utc>) -> String {
    match view {
        View::Deployed => format!(
            "{} v{} ({})\n",
            text(&answer["name"]),
            text(&answer["version"]),
            if answer["created"] == Value::Bool(true) {
                "new version"
            } else {
                "unchanged"
            }
        ),
        View::Workflows => list(
            &answer["workflows"],
            "no workflows deployed",
            &["NAME", "VERSION", "STEPS", "DESCRIPTION", "DEPLOYED"],
            |w| {
                vec![
                    text(&w["name"]),
                    text(&w["version"]),
                    text(&w["steps"]),
                    text(&w["description"]),
                    time(&w["created_at"]),
                ]
            },
        ),
        View::Workflow => {
            let mut out = key_values(&[
                ("name", text(&answer["name"])),
                ("version", text(&answer["version"])),
                ("deployed", time(&answer["created_at"])),
            ]);
            out.push('\n');
            let source = answer["source"].as_str().unwrap_or_default();
            out.push_str(source);
            if !source.ends_with('\n') {
                out.push('\n');
            }
            out
        }
        View::Started if answer["result"].is_object() => {
            let instance = &answer["result"]["instance"];
            let mut out = format!("{}\t{}\n", text(&instance["id"]), text(&instance["state"]));
            out.push_str(&format!("vars: {}\n", instance["vars"]));
            if let Some(error) = instance["error"].as_str() {
                out.push_str(&format!("error: {error}\n"));
            }
            out
        }
        View::Started => render_started(answer),
        View::StartedIds => answer["ids"]
            .as_array()
            .map(|ids| ids.iter().map(|id| format!("{}\n", text(id))).collect())
            .unwrap_or_default(),
        View::Instances => {
            let mut out = list(
                &answer["instances"],
                "no instances",
                &[
                    "ID", "WORKFLOW", "VERSION", "CAMPAIGN", "STATE", "STEP", "SEQ", "CREATED",
                ],
                |i| {
                    vec![
                        text(&i["id"]),
                        text(&i["workflow"]),
                        text(&i["version"]),
                        text(&i["campaign"]),
                        text(&i["state"]),
                        text(&i["current_step"]),
                        text(&i["step_seq"]),
                        time(&i["created_at"]),
                    ]
                },
            );
            if let Some(next) = answer["next"].as_str() {
                out.push_str(&format!("(more: add --before {next})\n"));
            }
            out
        }
        View::Instance => match answer.as_object() {
            Some(fields) => {
                let rows: Vec<(&str, String)> = fields
                    .iter()
                    .map(|(key, value)| {
                        let shown = if key.ends_with("_at") {
                            time(value)
                        } else {
                            text(value)
                        };
                        (key.as_str(), shown)
                    })
                    .collect();
                key_values(&rows)
            }
            None => format!("{}\n", text(answer)),
        },
        View::Journal => list(
            &answer["entries"],
            "no journal entries",
            &[
                "SEQ",
                "STEP",
                "OUTCOME",
                "TRANSITION",
                "ATTEMPT",
                "BY",
                "FINISHED",
                "OUTPUT",
                "ERROR",
            ],
            |e| {
                let by = if e["node_id"].is_null() {
                    text(&e["actor"])
                } else {
                    text(&e["node_id"])
                };
                vec![
                    text(&e["step_seq"]),
                    text(&e["step_id"]),
                    text(&e["outcome"]),
                    text(&e["transition"]),
                    text(&e["attempt"]),
                    by,
                    time(&e["finished_at"]),
                    truncate(&text(&e["output"]), 60),
                    truncate(&text(&e["error"]), 80),
                ]
            },
        ),
        View::Campaigns => render_campaigns(answer),
        View::Campaign => render_campaign(answer),
        View::LimitChanged => render_limit_changed(answer),
        View::Retention => format!(
            "campaign {}: finished instances kept {}\n",
            text(&answer["campaign"]),
            match answer["retention"].as_str() {
                Some(retention) => retention.to_owned(),
                None => "for the cluster default (system-cleanup's `retention`)".to_owned(),
            }
        ),
        View::CampaignPaused => render_campaign_paused(answer),
        View::CampaignDeleted => format!("deleted campaign {}\n", text(&answer["deleted"])),
        View::WorkflowDeleted => {
            let versions = answer["versions"]
                .as_array()
                .map(|v| v.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let stopped = answer["stopped"].as_array().map_or(0, Vec::len);
            format!(
                "deleted workflow {} (versions {versions}; {stopped} live instances killed)\n",
                text(&answer["workflow"])
            )
        }
        View::Nodes => list(
            &answer["nodes"],
            "no nodes",
            &[
                "ID",
                "ROLES",
                "QUEUES",
                "HANDLERS",
                "HOST",
                "VERSION",
                "STATUS",
                "LAST HEARTBEAT",
                "IN FLIGHT",
                "MEMORY",
            ],
            |n| {
                let joined = |key: &str| match n[key].as_array() {
                    Some(items) if items.is_empty() => "-".to_owned(),
                    Some(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
                    None => text(&n[key]),
                };
                vec![
                    text(&n["id"]),
                    joined("roles"),
                    joined("queues"),
                    joined("handlers"),
                    text(&n["host"]),
                    text(&n["version"]),
                    text(&n["status"]),
                    age(&n["heartbeat_at"], now),
                    text(&n["in_flight"]),
                    bytes(&n["rss_bytes"]),
                ]
            },
        ),
        View::Resumed => format!(
            "resumed {}: {} at step {} (checkpoint {})\n",
            text(&answer["id"]),
            text(&answer["state"]),
            text(&answer["current_step"]),
            text(&answer["step_seq"]),
        ),
        View::Leader => {
            if answer["live"] == Value::Bool(true) && !answer["holder"].is_null() {
                format!(
                    "leader: {} (term {}, lease expires {})\n",
                    text(&answer["holder"]),
                    text(&answer["term"]),
                    time(&answer["expires_at"]),
                )
            } else {
                format!(
                    "no coordinator holds the lease (last term {})\n",
                    text(&answer["term"])
                )
            }
        }
        View::Lifecycle => render_lifecycle_result(answer),
        View::LifecycleSummary => render_lifecycle_summary(answer),
        View::Diagnosis => render_diagnosis(answer),
        View::TokenCreated => render_token_created(answer),
        View::Tokens => render_tokens(answer),
        View::TokenRevoked => render_token_revoked(answer),
        View::EventSent => match answer["delivered"].as_str() {
            Some("woke") => "delivered: the instance was waiting for it and runs on\n".to_owned(),
            Some("kept") => "delivered: kept until the instance waits for it\n".to_owned(),
            _ => format!("delivered: {}\n", text(&answer["delivered"])),
        },
    }
}

/// `unlimited`, or the limit.
fn limit(campaign: &Value) -> String {
    if campaign["max_running"].is_null() {
        "unlimited".to_owned()
    } else {
        text(&campaign["max_running"])
    }
}

/// A queue's age in seconds (`12.3s`), `-` when nothing queues.
fn queue_age(campaign: &Value) -> String {
    match campaign["oldest_queued_age_ms"].as_i64() {
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".to_owned(),
    }
}

/// The campaigns table.
fn render_campaigns(answer: &Value) -> String {
    list(
        &answer["campaigns"],
        "no campaigns",
        &[
            "NAME",
            "MAX RUNNING",
            "RUNNING",
            "QUEUED",
            "OLDEST QUEUED",
            "ON ERROR",
        ],
        |c| {
            vec![
                text(&c["name"]),
                limit(c),
                text(&c["running"]),
                text(&c["queued"]),
                queue_age(c),
                text(&c["on_error_permit"]),
            ]
        },
    )
}

/// One campaign.
fn render_campaign(campaign: &Value) -> String {
    key_values(&[
        ("name", text(&campaign["name"])),
        ("max running", limit(campaign)),
        ("running", text(&campaign["running"])),
        ("queued", text(&campaign["queued"])),
        (
            "oldest queued",
            match campaign["oldest_queued_at"].as_str() {
                Some(_) => format!(
                    "{} ({} ago)",
                    time(&campaign["oldest_queued_at"]),
                    queue_age(campaign)
                ),
                None => "-".to_owned(),
            },
        ),
        ("on error", text(&campaign["on_error_permit"])),
        (
            "paused",
            match campaign["paused_at"].as_str() {
                Some(_) => format!(
                    "since {} by {}",
                    time(&campaign["paused_at"]),
                    text(&campaign["paused_by"])
                ),
                None => "no".to_owned(),
            },
        ),
    ])
}

/// What a campaign pause or unpause did.
fn render_campaign_paused(answer: &Value) -> String {
    let campaign = &answer["campaign"];
    let admitted = answer["admitted"].as_array().map_or(0, Vec::len);
    let paused = campaign["paused_at"].is_string();
    let state = match (paused, answer["changed"] == Value::Bool(true)) {
        (true, true) => "paused".to_owned(),
        (true, false) => "paused already".to_owned(),
        (false, true) => format!("unpaused; {admitted} admitted now"),
        (false, false) => "not paused".to_owned(),
    };
    format!(
        "campaign {}: {state} ({} running, {} queued, limit {})\n",
        text(&campaign["name"]),
        text(&campaign["running"]),
        text(&campaign["queued"]),
        limit(campaign),
    )
}

/// What a limit change did.
fn render_limit_changed(answer: &Value) -> String {
    let campaign = &answer["campaign"];
    let admitted = answer["admitted"].as_array().map_or(0, Vec::len);
    format!(
        "campaign {}: limit {} -> {} ({} running, {} queued; {admitted} admitted now)\n",
        text(&campaign["name"]),
        text(&answer["previous"]),
        limit(campaign),
        text(&campaign["running"]),
        text(&campaign["queued"]),
    )
}

/// What a command did to one instance, for people.
fn render_lifecycle_result(answer: &Value) -> String {
    let id = text(&answer["id"]);
    let state = text(&answer["state"]);
    let mut out = match answer["outcome"].as_str().unwrap_or_default() {
        "paused" => format!("paused {id}\n"),
        "pause_requested" => {
            format!("pause requested: {id} pauses when its running step finishes\n")
        }
        "unpaused" => format!("unpaused {id}: {state}\n"),
        "pause_withdrawn" => format!("pause request withdrawn: {id} runs on\n"),
        "stop_requested" => format!("stop requested: {id} stops when its running step finishes\n"),
        "stopped" => format!("stopped {id}\n"),
        "killed" => format!("killed {id}\n"),
        "restarted" => format!(
            "restarted {id} as {}: {state}\n",
            text(&answer["restarted_as"])
        ),
        "unchanged" if !answer["restarted_as"].is_null() => format!(
            "{id} was restarted before, as {} (nothing done)\n",
            text(&answer["restarted_as"])
        ),
        "unchanged" => format!("{id} is {state} already (nothing done)\n"),
        other => format!("{} {id}: {other}, {state}\n", text(&answer["action"])),
    };
    for also in answer["cascaded"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  and {} {} ({})\n",
            text(&also["outcome"]),
            text(&also["id"]),
            text(&also["state"])
        ));
    }
    for admitted in answer["admitted"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  its permit admitted {} from the queue\n",
            text(admitted)
        ));
    }
    out
}

/// What a command did to the instances of a filter, for people.
fn render_lifecycle_summary(answer: &Value) -> String {
    let mut out = format!(
        "{}: {} matched, {} changed, {} unchanged, {} refused\n",
        text(&answer["action"]),
        text(&answer["matched"]),
        text(&answer["changed"]),
        text(&answer["unchanged"]),
        text(&answer["refused"]),
    );
    if let Some(outcomes) = answer["outcomes"].as_object() {
        for (outcome, n) in outcomes {
            out.push_str(&format!("  {outcome}: {}\n", text(n)));
        }
    }
    for (key, what) in [
        ("cascaded", "other instances changed along"),
        ("admitted", "admitted from the queue"),
    ] {
        if answer[key].as_u64().is_some_and(|n| n > 0) {
            out.push_str(&format!("  {what}: {}\n", text(&answer[key])));
        }
    }
    for started in answer["started"].as_array().into_iter().flatten() {
        out.push_str(&format!("  started {}\n", text(started)));
    }
    for refusal in answer["refusals"].as_array().into_iter().flatten() {
        out.push_str(&format!("  refused: {}\n", text(&refusal["message"])));
    }
    out
}

/// `drover start`: one line, e.g. `started 5,000 instances of welcome v3 in campaign default
/// (4,981 running, 19 queued)`; one instance is named by its id.
fn render_started(answer: &Value) -> String {
    let ids = answer["ids"].as_array().map_or(0, Vec::len) as u64;
    let queued = answer["queued"].as_u64().unwrap_or(0).min(ids);
    let what = format!(
        "of {} v{} in campaign {}",
        text(&answer["workflow"]),
        text(&answer["version"]),
        text(&answer["campaign"])
    );
    if ids == 1 {
        let state = if queued == 1 { "queued" } else { "running" };
        let id = text(&answer["ids"][0]);
        return format!("started instance {id} {what} ({state})\n");
    }
    format!(
        "started {} instances {what} ({} running, {} queued)\n",
        thousands(ids),
        thousands(ids - queued),
        thousands(queued)
    )
}

/// `4981` as `4,981`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// `drover why`: the one sentence.
fn render_diagnosis(answer: &Value) -> String {
    format!("{}\n", text(&answer["summary"]))
}

/// The token alone on standard output (so `TOKEN=$(drover token create …)` works); what it
/// is goes to standard error.
fn render_token_created(answer: &Value) -> String {
    let expires = match answer["expires_at"].as_str() {
        Some(_) => format!("expires {}", time(&answer["expires_at"])),
        None => "never expires".to_owned(),
    };
    eprintln!(
        "token {} ({}, {expires}); it is shown once:",
        text(&answer["name"]),
        text(&answer["scope"]),
    );
    format!("{}\n", text(&answer["token"]))
}

fn render_tokens(answer: &Value) -> String {
    list(
        &answer["tokens"],
        "no tokens (the nodes' bootstrap admin token is not listed)",
        &["NAME", "SCOPE", "STATUS", "CREATED", "BY", "EXPIRES"],
        |t| {
            vec![
                text(&t["name"]),
                text(&t["scope"]),
                text(&t["status"]),
                time(&t["created_at"]),
                text(&t["created_by"]),
                if t["expires_at"].is_null() {
                    "never".to_owned()
                } else {
                    time(&t["expires_at"])
                },
            ]
        },
    )
}

fn render_token_revoked(answer: &Value) -> String {
    format!(
        "token {} revoked at {}\n",
        text(&answer["name"]),
        time(&answer["revoked_at"])
    )
}

/// A table of `rows` (an array of objects), or `empty` when there are none.
pub(super) fn list(
    rows: &Value,
    empty: &str,
    header: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> String {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut table = table();
    table.set_header(header.to_vec());
    for item in rows {
        table.add_row(row(item));
    }
    finish(&table)
}

pub(super) fn key_values(rows: &[(&str, String)]) -> String {
    let mut table = table();
    for (key, value) in rows {
        table.add_row(vec![format!("{key}:"), value.clone()]);
    }
    finish(&table)
}

fn table() -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    table
}

/// The table's lines without the preset's edge padding.
fn finish(table: &Table) -> String {
    table
        .lines()
        .map(|line| {
            format!(
                "{}\n",
                line.trim_end().strip_prefix(' ').unwrap_or(line.trim_end())
            )
        })
        .collect()
}

/// A JSON value as a cell: strings bare, null as `-`, the rest as compact JSON.
pub(super) fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 timestamp to the second, in UTC; anything else as [`text`].
pub(super) fn time(value: &Value) -> String {
    value
        .as_str()
        .and_then(|s| s.parse::<DateTime<Utc>>().ok())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| text(value))
}

/// How long before `now` an RFC 3339 timestamp was, in whole seconds (`3s ago`).
fn age(value: &Value, now: DateTime<Utc>) -> String {
    match value.as_str().and_then(|s| s.parse::<DateTime<Utc>>().ok()) {
        Some(at) => format!("{}s ago", (now - at).num_seconds().max(0)),
        None => text(value),
    }
}

/// A byte count for people (`512 B`, `12.3 MiB`); `-` when unknown (0 or not a number).
fn bytes(value: &Value) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let Some(n) = value.as_u64().filter(|n| *n > 0) else {
        return "-".to_owned();
    };
    let mut size = n as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn answers_render_for_people() {
        let deployed = render(
            View::Deployed,
            &json!({"name": "welcome-series", "version": 2, "created": true}),
        );
        assert_eq!(deployed, "welcome-series v2 (new version)\n");
        let same = render(
            View::Deployed,
            &json!({"name": "welcome-series", "version": 2, "created": false}),
        );
        assert_eq!(same, "welcome-series v2 (unchanged)\n");
        let answer = json!({"ids": ["a", "b"], "queued": 1, "workflow": "w", "version": 1, "campaign": "default"});
        assert_eq!(render(View::StartedIds, &answer), "a\nb\n");
        assert_eq!(
            render(View::Started, &answer),
            "started 2 instances of w v1 in campaign default (1 running, 1 queued)\n"
        );
        let one =
            json!({"ids": ["a"], "queued": 0, "workflow": "w", "version": 1, "campaign": "c"});
        assert_eq!(
            render(View::Started, &one),
            "started instance a of w v1 in campaign c (running)\n"
        );
        assert_eq!(thousands(4981), "4,981");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(999), "999");

        let instance = json!({
            "id": "0190", "workflow": "w", "state": "ready", "error": null,
            "vars": {"n": 1}, "created_at": "2025-01-02T03:04:05.678Z"
        });
        let shown = render(View::Instance, &instance);
        assert!(
            shown.contains("state:") && shown.contains("ready"),
            "{shown}"
        );
        assert!(shown.contains(r#"{"n":1}"#), "{shown}");
        assert!(shown.contains("2025-01-02 03:04:05"), "{shown}");
        let listed = render(View::Instances, &json!({"instances": [instance]}));
        assert!(
            listed.lines().next().is_some_and(|h| h.starts_with("ID")),
            "{listed}"
        );
        assert_eq!(listed.lines().count(), 2, "{listed}");
        assert_eq!(
            render(View::Instances, &json!({"instances": []})),
            "no instances\n"
        );

        // Unexpected shapes never panic.
        for view in [
            View::Workflows,
            View::Workflow,
            View::Journal,
            View::Campaigns,
            View::Nodes,
            View::Instance,
        ] {
            let _ = render(view, &json!(null));
            let _ = render(
                view,
                &json!({"workflows": [1], "entries": [null], "campaigns": "x", "nodes": [{}]}),
            );
        }
    }
    #[test]
    fn nodes_leader_and_resume_render_for_people() {
        let now: DateTime<Utc> = "2025-01-02T03:04:10Z".parse().expect("a timestamp");
        let nodes = json!({"nodes": [{
            "id": "n1", "roles": ["worker", "api"], "queues": ["default", "gpu"],
            "handlers": [], "host": "box", "version": "0.1.0",
            "status": "alive", "heartbeat_at": "2025-01-02T03:04:07.500Z", "in_flight": 4,
            "rss_bytes": 12_900_000
        }]});
        let shown = render_at(View::Nodes, &nodes, now);
        let header = shown.lines().next().unwrap_or_default();
        assert!(
            header.contains("LAST HEARTBEAT") && header.contains("MEMORY"),
            "{shown}"
        );
        let row = shown.lines().nth(1).unwrap_or_default();
        for cell in [
            "n1",
            "worker,api",
            "default,gpu",
            "box",
            "0.1.0",
            "alive",
            "2s ago",
            "4",
            "12.3 MiB",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert_eq!(bytes(&json!(512)), "512 B");
        assert_eq!(bytes(&json!(0)), "-");
        assert_eq!(bytes(&json!(3 * 1024 * 1024 * 1024_u64)), "3.0 GiB");

        let leader = json!({"name": "coordinator", "holder": "n1", "term": 7,
                            "expires_at": "2025-01-02T03:04:12Z", "live": true});
        let shown = render(View::Leader, &leader);
        assert!(shown.contains("n1") && shown.contains("term 7"), "{shown}");
        let lapsed = json!({"name": "coordinator", "holder": "n1", "term": 7, "live": false});
        assert!(
            render(View::Leader, &lapsed).starts_with("no coordinator holds the lease"),
            "a lapsed lease has no leader"
        );
        let resumed = render(
            View::Resumed,
            &json!({"id": "i1", "state": "ready", "current_step": "call", "step_seq": 4}),
        );
        assert_eq!(resumed, "resumed i1: ready at step call (checkpoint 4)\n");
        for view in [View::Leader, View::Resumed, View::Nodes] {
            let _ = render(view, &json!(null));
            let _ = render(
                view,
                &json!({"nodes": [{"heartbeat_at": 3, "rss_bytes": -1}]}),
            );
        }
    }

    #[test]
    fn what_became_of_a_sent_event_renders_for_people() {
        assert!(render(View::EventSent, &json!({"delivered": "woke"})).contains("runs on"));
        assert!(render(View::EventSent, &json!({"delivered": "kept"})).contains("kept"));
        let _ = render(View::EventSent, &json!(null));
    }

    #[test]
    fn what_a_command_did_renders_for_people() {
        let paused = json!({"id": "i1", "action": "pause", "outcome": "pause_requested",
                            "changed": true, "state": "running", "cascaded": [], "admitted": []});
        assert_eq!(
            render_lifecycle_result(&paused),
            "pause requested: i1 pauses when its running step finishes\n"
        );
        let killed = json!({"id": "i1", "action": "kill", "outcome": "killed", "state": "stopped",
                            "cascaded": [{"id": "c1", "outcome": "killed", "state": "stopped"}],
                            "admitted": ["q1"]});
        assert_eq!(
            render_lifecycle_result(&killed),
            "killed i1\n  and killed c1 (stopped)\n  its permit admitted q1 from the queue\n"
        );
        let again = json!({"id": "i1", "outcome": "unchanged", "state": "paused"});
        assert_eq!(
            render_lifecycle_result(&again),
            "i1 is paused already (nothing done)\n"
        );
        let restarted = json!({"id": "i1", "outcome": "restarted", "state": "queued",
                               "restarted_as": "i2"});
        assert_eq!(
            render_lifecycle_result(&restarted),
            "restarted i1 as i2: queued\n"
        );

        let summary = json!({"action": "kill", "matched": 3, "changed": 2, "unchanged": 0,
                             "refused": 1, "outcomes": {"killed": 2, "refused": 1},
                             "admitted": 2, "cascaded": 0, "started": [],
                             "refusals": [{"message": "cannot kill i3: it has finished"}]});
        let shown = render_lifecycle_summary(&summary);
        assert!(
            shown.starts_with("kill: 3 matched, 2 changed, 0 unchanged, 1 refused\n"),
            "{shown}"
        );
        assert!(shown.contains("  killed: 2\n"), "{shown}");
        assert!(shown.contains("admitted from the queue: 2"), "{shown}");
        assert!(shown.contains("refused: cannot kill i3"), "{shown}");
        assert!(!shown.contains("other instances changed"), "{shown}");

        let why = json!({"summary": "Instance i1 is queued.", "details": {}});
        assert_eq!(render_diagnosis(&why), "Instance i1 is queued.\n");
        for garbage in [
            json!(null),
            json!([1]),
            json!({"cascaded": "x", "outcomes": 3}),
        ] {
            let _ = render_lifecycle_result(&garbage);
            let _ = render_lifecycle_summary(&garbage);
            let _ = render_diagnosis(&garbage);
        }
    }

    #[test]
    fn campaigns_render_for_people() {
        let campaign = json!({
            "name": "spring", "max_running": 3, "running": 3, "queued": 7,
            "on_error_permit": "release", "oldest_queued_at": "2025-01-02T03:04:05Z",
            "oldest_queued_age_ms": 12_345
        });
        let shown = render_campaign(&campaign);
        assert!(
            shown.contains("spring") && shown.contains("12.3s ago"),
            "{shown}"
        );
        let listed = render_campaigns(&json!({"campaigns": [campaign, {"name": "default",
            "max_running": null, "running": 0, "queued": 0, "on_error_permit": "release"}]}));
        assert!(
            listed.contains("OLDEST QUEUED") && listed.contains("unlimited"),
            "{listed}"
        );
        let changed = render_limit_changed(&json!({
            "campaign": {"name": "spring", "max_running": 5, "running": 5, "queued": 5},
            "previous": 3, "admitted": ["a", "b"]
        }));
        assert_eq!(
            changed,
            "campaign spring: limit 3 -> 5 (5 running, 5 queued; 2 admitted now)\n"
        );
        for bad in [
            json!(null),
            json!({"campaign": 1}),
            json!({"campaigns": "x"}),
        ] {
            let _ = render_campaign(&bad);
            let _ = render_campaigns(&bad);
            let _ = render_limit_changed(&bad);
        }
    }
}
