//! Waiting steps end to end: a durable `sleep` survives its nodes, `wait_event` takes events
//! from the API, the CLI and NATS (and keeps early ones), `subworkflow` runs a child and hands
//! its end to the parent. Timers are the coordinator leader's (`Store::wake_due`), so the
//! scenarios that need one run a node with the coordinator role.

use std::time::Duration;

use anyhow::Context;
use drover_core::{Definition, InstanceId};
use drover_tests::{TestEnv, wait_until};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{deploy, get, post_json, post_text, start};

async fn instance(api: &str, id: &str) -> anyhow::Result<Value> {
    let (status, body) = get(&format!("{api}/v1/instances/{id}")).await?;
    anyhow::ensure!(status == 200, "GET instance {id} answered {status}: {body}");
    Ok(body)
}

/// Waits until instance `id` is in `state`; returns it.
async fn wait_state(api: &str, id: &str, state: &str, timeout: Duration) -> anyhow::Result<Value> {
    wait_until(&format!("instance {id} to be {state}"), timeout, || async {
        let body = instance(api, id).await?;
        Ok((body["state"] == state).then_some(body))
    })
    .await
}

async fn journal(api: &str, id: &str) -> anyhow::Result<Vec<Value>> {
    let (_, body) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    Ok(body["entries"].as_array().cloned().unwrap_or_default())
}

async fn outputs(env: &TestEnv, id: &str) -> anyhow::Result<Value> {
    let (outputs,): (Value,) = sqlx::query_as("SELECT outputs FROM instance WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(env.store.pool())
        .await?;
    Ok(outputs)
}

const NAP: &str = r#"
name: nap
vars: { x: 0 }
steps:
  - { id: before, kind: assign, set: { x: "1" }, next: [{ to: nap }] }
  - { id: nap, kind: sleep, for: 2s, next: [{ to: after }] }
  - { id: after, kind: assign, set: { x: "vars.x + 1" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_survives_every_node_being_killed_while_it_waits() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let client = env.nats_client().await?;
    let mut events = client.subscribe(format!("{}.evt.>", env.prefix)).await?;
    let mut first = env.spawn_node("worker,api,coordinator").await?;
    let mut second = env.spawn_node("worker,coordinator").await?;
    deploy(first.api(), NAP).await?;
    let id = start(first.api(), "nap", json!({}), 1).await?.remove(0);
    wait_state(first.api(), &id, "waiting", Duration::from_secs(20)).await?;

    // Nothing holds the sleeping instance: kill every node (the leader too), start a new one.
    first.kill().await?;
    second.kill().await?;
    let node = env.spawn_node("worker,api,coordinator").await?;
    let api = node.api();
    let waiting = instance(api, &id).await?;
    assert_eq!(waiting["state"], "waiting");
    assert_eq!(waiting["current_step"], "nap");
    assert_eq!(waiting["owner_node"], Value::Null);
    assert!(waiting["waiting_for"]["wake_at"].is_string(), "{waiting}");
    // The dead leader's lease lapses (5 s) before the new node leads and wakes it.
    let done = wait_state(api, &id, "completed", Duration::from_secs(30)).await?;
    assert_eq!(done["vars"]["x"], 2, "each assign ran once");

    let entries = journal(api, &id).await?;
    let at = |i: usize| -> (String, String) {
        (
            entries[i]["step_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            entries[i]["outcome"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let steps: Vec<(String, String)> = (0..entries.len()).map(at).collect();
    let expected = [
        ("before", "started"),
        ("before", "completed"),
        ("nap", "waiting"),
        ("nap", "woken"),
        ("nap", "completed"),
        ("after", "completed"),
        ("done", "completed"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(s, o)| ((*s).to_owned(), (*o).to_owned()))
        .collect();
    assert_eq!(steps, expected);
    assert_eq!(entries[3]["actor"], "timer");
    // It slept its two seconds, by the database clock, and says when it woke.
    let parked = entries[2]["finished_at"].as_str().context("parked at")?;
    let parked: chrono::DateTime<chrono::Utc> = parked.parse()?;
    let woke_at = outputs(&env, &id).await?["nap"]["woke_at"].clone();
    let woke_at: chrono::DateTime<chrono::Utc> = woke_at
        .as_str()
        .context("woke_at is a timestamp")?
        .parse()?;
    assert!(
        woke_at - parked >= chrono::TimeDelta::milliseconds(1_990),
        "{parked} → {woke_at}"
    );

    // The wait and the wake were announced.
    let mut kinds = Vec::new();
    while !(kinds.contains(&"waiting".to_owned()) && kinds.contains(&"woken".to_owned())) {
        let message = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .context("waiting and woken events")?
            .context("event subscription")?;
        if message.subject.contains(&id) {
            kinds.push(
                message
                    .subject
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    env.cleanup().await;
    Ok(())
}

const UNTIL: &str = r#"
name: until
steps:
  - { id: past, kind: sleep, until: "instance.started_at", next: [{ to: soon }] }
  - id: soon
    kind: sleep
    until: "timestamp(instance.started_at) + duration('1500ms')"
    next: [{ to: done }]
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_until_a_timestamp_waits_only_for_one_in_the_future() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api,coordinator").await?;
    let api = node.api();
    deploy(api, UNTIL).await?;
    let id = start(api, "until", json!({}), 1).await?.remove(0);
    let done = wait_state(api, &id, "completed", Duration::from_secs(30)).await?;
    let started: chrono::DateTime<chrono::Utc> =
        done["created_at"].as_str().context("created_at")?.parse()?;
    let outcomes: Vec<(String, String)> = journal(api, &id)
        .await?
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("step_id"), s("outcome"))
        })
        .collect();
    let expected = [
        ("past", "started"),
        ("past", "completed"),
        ("soon", "waiting"),
        ("soon", "woken"),
        ("soon", "completed"),
        ("done", "completed"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(s, o)| ((*s).to_owned(), (*o).to_owned()))
        .collect();
    assert_eq!(outcomes, expected, "a time already past is no wait");
    let woke_at = outputs(&env, &id).await?["soon"]["woke_at"].clone();
    let woke_at: chrono::DateTime<chrono::Utc> = woke_at.as_str().context("woke_at")?.parse()?;
    assert!(
        woke_at - started >= chrono::TimeDelta::milliseconds(1_500),
        "{started} → {woke_at}"
    );
    env.cleanup().await;
    Ok(())
}

const APPROVE: &str = r#"
name: approve
vars: { by: null }
steps:
  - { id: wait, kind: wait_event, name: approved, next: [{ to: record }] }
  - { id: record, kind: assign, set: { by: "steps.wait.by" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_event_takes_its_event_from_the_api_the_cli_and_nats() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, APPROVE).await?;
    let ids = start(api, "approve", json!({}), 3).await?;
    for id in &ids {
        let waiting = wait_state(api, id, "waiting", Duration::from_secs(20)).await?;
        let expected = json!({ "wake_at": null, "event": "approved", "child": null });
        assert_eq!(waiting["waiting_for"], expected);
    }

    let (status, body) = post_json(
        &format!("{api}/v1/instances/{}/events/approved", ids[0]),
        &json!({ "by": "api" }),
    )
    .await?;
    assert_eq!((status, body), (202, json!({ "delivered": "woke" })));

    let said = env
        .cli(
            api,
            &[
                "send-event",
                &ids[1],
                "approved",
                "--payload",
                r#"{"by":"cli"}"#,
            ],
        )
        .await?;
    assert!(said.contains("runs on"), "{said}");

    let nats = env.bus.client();
    let subject = env.bus.subjects().signal(&ids[2], "approved");
    let reply = nats.request(subject, r#"{"by":"nats"}"#.into()).await?;
    let reply: Value = serde_json::from_slice(&reply.payload)?;
    assert_eq!(reply, json!({ "delivered": "woke" }));

    for (id, by) in ids.iter().zip(["api", "cli", "nats"]) {
        let done = wait_state(api, id, "completed", Duration::from_secs(20)).await?;
        assert_eq!(done["vars"]["by"], by);
        let entries = journal(api, id).await?;
        let signalled = entries.iter().find(|e| e["outcome"] == "signalled");
        let signalled = signalled.context("a signalled journal row")?;
        assert_eq!(signalled["actor"], "signal:approved");
    }

    // A finished instance takes no events; unknown instances, bad names and bad JSON are
    // refused; garbage on NATS is answered and dropped, and the listener carries on.
    let events_of = |id: &str| format!("{api}/v1/instances/{id}/events/approved");
    let (status, body) = post_json(&events_of(&ids[0]), &json!(1)).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("instance_finished"))
    );
    let unknown = InstanceId::new().to_string();
    let (status, _) = post_json(&events_of(&unknown), &json!(1)).await?;
    assert_eq!(status, 404);
    let bad_name = format!("{api}/v1/instances/{}/events/Not.A.Slug", ids[0]);
    let (status, body) = post_json(&bad_name, &json!(1)).await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_event_name"))
    );
    let (status, body) = post_text(&events_of(&ids[0]), "{not json").await?;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("invalid_json"))
    );

    let prefix = &env.prefix;
    for (subject, payload, code) in [
        (
            format!("{prefix}.signal.not-an-id.approved"),
            "1",
            "invalid_subject",
        ),
        (
            format!("{prefix}.signal.{}.Approved", ids[0]),
            "1",
            "invalid_subject",
        ),
        (
            env.bus.subjects().signal(&ids[0], "approved"),
            "{garbage",
            "invalid_json",
        ),
        (
            env.bus.subjects().signal(&unknown, "approved"),
            "1",
            "not_found",
        ),
        (
            env.bus.subjects().signal(&ids[0], "approved"),
            "1",
            "instance_finished",
        ),
    ] {
        let reply = nats
            .request(subject.clone(), payload.to_owned().into())
            .await?;
        let reply: Value = serde_json::from_slice(&reply.payload)?;
        assert_eq!(reply["error"]["code"], code, "{subject}: {reply}");
    }
    nats.publish(format!("{prefix}.signal.x.y"), "no reply wanted".into())
        .await?;
    let late = start(api, "approve", json!({}), 1).await?.remove(0);
    wait_state(api, &late, "waiting", Duration::from_secs(20)).await?;
    let subject = env.bus.subjects().signal(&late, "approved");
    let reply = nats.request(subject, Default::default()).await?;
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload)?,
        json!({ "delivered": "woke" })
    );
    let done = wait_state(api, &late, "in_error", Duration::from_secs(20)).await?;
    // An empty payload is `null`, and `steps.wait.by` of null is an expression error.
    assert!(
        done["error"]
            .as_str()
            .unwrap_or_default()
            .contains("set.by"),
        "{done}"
    );
    env.cleanup().await;
    Ok(())
}

const GATED: &str = r#"
name: gated
vars: {}
steps:
  - { id: gate, kind: wait_event, name: go, next: [{ to: early }] }
  - { id: early, kind: wait_event, name: early-bird, timeout: 1h, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_event_is_kept_and_consumed_when_the_instance_reaches_its_step()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, GATED).await?;
    let id = start(api, "gated", json!({}), 1).await?.remove(0);
    wait_state(api, &id, "waiting", Duration::from_secs(20)).await?;

    let send = |name: &str, payload: Value| {
        let url = format!("{api}/v1/instances/{id}/events/{name}");
        async move { post_json(&url, &payload).await }
    };
    let (status, body) = send("early-bird", json!({ "seq": 1 })).await?;
    assert_eq!((status, body), (202, json!({ "delivered": "kept" })));
    let (_, body) = send("early-bird", json!({ "seq": 2 })).await?;
    assert_eq!(body, json!({ "delivered": "kept" }));
    assert_eq!(instance(api, &id).await?["current_step"], "gate");

    let (_, body) = send("go", json!(null)).await?;
    assert_eq!(body, json!({ "delivered": "woke" }));
    wait_state(api, &id, "completed", Duration::from_secs(20)).await?;
    let outputs = outputs(&env, &id).await?;
    assert_eq!(
        outputs["early"],
        json!({ "seq": 1 }),
        "the oldest kept event"
    );
    let entries = journal(api, &id).await?;
    let early: Vec<&str> = entries
        .iter()
        .filter(|e| e["step_id"] == "early")
        .filter_map(|e| e["outcome"].as_str())
        .collect();
    assert_eq!(early, ["completed"], "it never had to wait");
    let (unconsumed,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM instance_signal WHERE instance_id = $1::uuid AND consumed_at IS NULL",
    )
    .bind(&id)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(unconsumed, 1, "the second early event is still kept");
    env.cleanup().await;
    Ok(())
}

const IMPATIENT: &str = r#"
name: impatient
steps:
  - { id: wait, kind: wait_event, name: reply, timeout: 1s, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_event_that_times_out_ends_in_error_naming_the_event() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api,coordinator").await?;
    let api = node.api();
    deploy(api, IMPATIENT).await?;
    let id = start(api, "impatient", json!({}), 1).await?.remove(0);
    wait_state(api, &id, "waiting", Duration::from_secs(20)).await?;
    let failed = wait_state(api, &id, "in_error", Duration::from_secs(20)).await?;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("\"reply\"") && error.contains("1s"),
        "{error}"
    );
    let outcomes: Vec<String> = journal(api, &id)
        .await?
        .iter()
        .filter_map(|e| e["outcome"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(outcomes, ["started", "waiting", "woken", "failed"]);
    env.cleanup().await;
    Ok(())
}

const DOUBLE: &str = r#"
name: double-it
vars: { n: 0, unused: true }
steps:
  - { id: double, kind: assign, set: { n: "vars.n * 2" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

const CALLER: &str = r#"
name: caller
vars: { n: 0 }
steps:
  - id: call
    kind: subworkflow
    workflow: double-it
    input: { n: "vars.n" }
    next: [{ to: record }]
  - { id: record, kind: assign, set: { result: "steps.call.vars.n", status: "steps.call.status" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_completes_with_its_childs_vars_in_the_step_output() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, DOUBLE).await?;
    deploy(api, CALLER).await?;
    let id = start(api, "caller", json!({ "n": 21 }), 1).await?.remove(0);
    let done = wait_state(api, &id, "completed", Duration::from_secs(30)).await?;
    assert_eq!(done["vars"]["result"], 42);
    assert_eq!(done["vars"]["status"], "completed");
    let output = outputs(&env, &id).await?["call"].clone();
    assert_eq!(
        output["vars"],
        json!({ "n": 42, "unused": true }),
        "child defaults, overridden"
    );

    let child = output["instance"]
        .as_str()
        .context("the child's id")?
        .to_owned();
    let child_row = instance(api, &child).await?;
    assert_eq!(child_row["state"], "completed");
    assert_eq!(child_row["parent_instance_id"], json!(id));
    assert_eq!(child_row["call_depth"], 1);
    let child_journal = journal(api, &child).await?;
    assert_eq!(child_journal[0]["actor"], json!(format!("parent:{id}")));
    let parent_outcomes: Vec<(String, String)> = journal(api, &id)
        .await?
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("outcome"), s("actor"))
        })
        .collect();
    assert_eq!(parent_outcomes[1].0, "waiting");
    assert_eq!(
        parent_outcomes[2],
        ("woken".into(), format!("child:{child}"))
    );
    env.cleanup().await;
    Ok(())
}

const FAILING_CHILD: &str = r#"
name: fail-it
steps:
  - { id: done, kind: end, status: failed, reason: "'nope'" }
"#;

const RETRYING_CALLER: &str = r#"
name: retrying-caller
steps:
  - id: call
    kind: subworkflow
    workflow: fail-it
    retry: { max_attempts: 2, backoff: 100ms }
    next: [{ to: done }]
  - { id: done, kind: end, status: completed }
"#;

const LOST_CALLER: &str = r#"
name: lost-caller
steps:
  - { id: call, kind: subworkflow, workflow: nowhere, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

const RECURSE: &str = r#"
name: recurse
steps:
  - { id: call, kind: subworkflow, workflow: recurse, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_child_fails_the_parents_step_after_its_retries() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    for source in [FAILING_CHILD, RETRYING_CALLER, RECURSE] {
        deploy(api, source).await?;
    }
    // The API refuses a call to a workflow that is not deployed; one stored before that check
    // existed still fails at run time, below.
    let (status, body) = post_text(&format!("{api}/v1/workflows"), LOST_CALLER).await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["step"], "call", "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "workflow", "{body}");
    let lost = Definition::parse(LOST_CALLER).map_err(|e| anyhow::anyhow!("{e}"))?;
    env.store
        .deploy_definition(&lost.name, &lost.to_json(), LOST_CALLER)
        .await?;
    let id = start(api, "retrying-caller", json!({}), 1).await?.remove(0);
    let failed = wait_state(api, &id, "in_error", Duration::from_secs(30)).await?;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("fail-it") && error.contains("failed: nope") && error.contains("2 attempts"),
        "{error}"
    );
    // Each attempt started a child of its own.
    let (children,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM instance WHERE parent_instance_id = $1::uuid AND state = 'failed'",
    )
    .bind(&id)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(children, 2);

    // A child workflow that is not deployed fails the step at once, saying so.
    let id = start(api, "lost-caller", json!({}), 1).await?.remove(0);
    let failed = wait_state(api, &id, "in_error", Duration::from_secs(20)).await?;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no workflow \"nowhere\" is deployed"),
        "{error}"
    );

    // Runaway recursion stops at the call depth limit, in the deepest instance.
    start(api, "recurse", json!({}), 1).await?;
    let deepest = wait_until("the deepest call to fail", Duration::from_secs(60), || async {
        let row: Option<(i32, Option<String>)> = sqlx::query_as(
            "SELECT call_depth, error FROM instance WHERE workflow = 'recurse' AND state = 'in_error'",
        )
        .fetch_optional(env.store.pool())
        .await?;
        Ok(row)
    })
    .await?;
    assert_eq!(deepest.0, 32);
    assert!(deepest.1.unwrap_or_default().contains("the limit is 32"));
    let (waiting,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM instance WHERE workflow = 'recurse' AND state = 'waiting'",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(
        waiting, 32,
        "every caller above it waits (its child is in_error)"
    );
    env.cleanup().await;
    Ok(())
}
