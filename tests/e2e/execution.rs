//! Workflows run to completion across worker processes, with a checkpoint per step and an
//! event per transition.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use drover_tests::{Recorder, TestEnv, wait_until};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{deploy, get, start, wait_settled};

fn branching_workflow(recorder: &str, subject: &str) -> String {
    format!(
        r#"
name: branching
description: assign, http, publish, a handler, then a branch
vars: {{ n: 0, tier: basic }}
steps:
  - id: start
    kind: assign
    set: {{ n: "vars.n + 1" }}
    next: [{{ to: record }}]
  - id: record
    kind: http
    method: POST
    url: "{recorder}/ok/record"
    body: {{ n: "vars.n", id: "instance.id" }}
    next: [{{ to: announce }}]
  - id: announce
    kind: publish
    subject: "{subject}"
    payload: {{ id: "instance.id", n: "vars.n" }}
    next: [{{ to: compute }}]
  - id: compute
    kind: handler
    handler: double
    input: {{ n: "vars.n" }}
    next:
      - to: gold
        when: 'vars.tier == "gold"'
      - to: done
  - id: gold
    kind: assign
    set: {{ bonus: "steps.compute.n * 10" }}
    next: [{{ to: done }}]
  - id: done
    kind: end
    status: completed
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branching_workflow_completes_on_two_workers_with_a_checkpoint_and_event_per_step()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let subject = format!("ext{}.announce", env.prefix);
    let client = env.nats_client().await?;
    let mut announced = client.subscribe(subject.clone()).await?;
    let mut events = client.subscribe(format!("{}.evt.>", env.prefix)).await?;

    let api_node = env.spawn_node("worker,api").await?;
    let _second = env.spawn_node("worker").await?;
    let api = api_node.api();
    let deployed = deploy(api, &branching_workflow(&recorder_url, &subject)).await?;
    assert_eq!(deployed["version"], 1);

    let mut ids = start(api, "branching", json!({ "tier": "basic" }), 50).await?;
    let gold = start(api, "branching", json!({ "tier": "gold" }), 50).await?;
    ids.extend(gold.iter().cloned());
    let states = wait_settled(&env, 100, Duration::from_secs(60)).await?;
    assert_eq!(
        states,
        vec![("completed".to_owned(), 100)],
        "every instance completes"
    );

    // One journal row per step, in order, after the `started` row 0.
    let mut nodes = std::collections::HashSet::new();
    for id in &ids {
        let (status, journal) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
        assert_eq!(status, 200);
        let entries = journal["entries"].as_array().cloned().unwrap_or_default();
        let steps: Vec<&str> = entries
            .iter()
            .filter_map(|e| e["step_id"].as_str())
            .collect();
        let expected: &[&str] = if gold.contains(id) {
            &[
                "start", "start", "record", "announce", "compute", "gold", "done",
            ]
        } else {
            &["start", "start", "record", "announce", "compute", "done"]
        };
        assert_eq!(steps, expected, "journal of {id}");
        let seqs: Vec<i64> = entries
            .iter()
            .filter_map(|e| e["step_seq"].as_i64())
            .collect();
        assert_eq!(seqs, (0..expected.len() as i64).collect::<Vec<_>>());
        assert_eq!(entries[0]["outcome"], "started");
        assert_eq!(
            entries.last().map(|e| e["transition"].clone()),
            Some(json!("completed"))
        );
        for e in &entries[1..] {
            nodes.insert(e["node_id"].as_str().unwrap_or_default().to_owned());
        }
        let (_, instance) = get(&format!("{api}/v1/instances/{id}")).await?;
        assert_eq!(instance["state"], "completed");
        assert_eq!(instance["vars"]["n"], 1);
        if gold.contains(id) {
            assert_eq!(
                instance["vars"]["bonus"], 20,
                "gold reads the handler's output"
            );
        }
    }
    assert_eq!(nodes.len(), 2, "both worker processes ran steps: {nodes:?}");

    // The http step sent each instance's id with a stable idempotency key and trace context.
    let requests = recorder.requests();
    assert_eq!(requests.len(), 100);
    for r in &requests {
        let id = r.body["id"].as_str().unwrap_or_default();
        assert!(ids.iter().any(|i| i == id));
        assert_eq!(
            r.idempotency_key.as_deref(),
            Some(format!("{id}:1").as_str())
        );
        let tp = r.traceparent.clone().unwrap_or_default();
        assert!(
            tp.starts_with(&format!("00-{}-", id.replace('-', ""))),
            "traceparent {tp}"
        );
    }

    // The publish step reached a plain subscriber once per instance.
    let mut published = 0;
    while published < 100 {
        let msg = tokio::time::timeout(Duration::from_secs(10), announced.next()).await?;
        let Some(msg) = msg else { break };
        let payload: Value = serde_json::from_slice(&msg.payload)?;
        assert_eq!(payload["n"], 1);
        published += 1;
    }
    assert_eq!(published, 100);

    // Every journaled transition has its event: started, one step_completed per step, the end.
    let mut seen: HashMap<String, BTreeMap<String, Vec<i64>>> = HashMap::new();
    let expected_events: usize = ids
        .iter()
        .map(|id| if gold.contains(id) { 8 } else { 7 })
        .sum();
    let mut received = 0;
    while received < expected_events {
        let msg = tokio::time::timeout(Duration::from_secs(10), events.next()).await?;
        let Some(msg) = msg else { break };
        let event: Value = serde_json::from_slice(&msg.payload)?;
        assert_eq!(event["specversion"], "1.0");
        let kind = msg
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let instance = event["data"]["instance"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            msg.subject
                .starts_with(&format!("{}.evt.default.branching.{instance}.", env.prefix))
        );
        let seq = event["data"]["step_seq"].as_i64().unwrap_or(0);
        seen.entry(instance)
            .or_default()
            .entry(kind)
            .or_default()
            .push(seq);
        received += 1;
    }
    for id in &ids {
        let kinds = seen.get(id).cloned().unwrap_or_default();
        let steps = if gold.contains(id) { 6 } else { 5 };
        assert_eq!(
            kinds.get("started").map(Vec::len),
            Some(1),
            "{id}: {kinds:?}"
        );
        let mut completed = kinds.get("step_completed").cloned().unwrap_or_default();
        completed.sort_unstable();
        assert_eq!(
            completed,
            (1..=steps).collect::<Vec<_>>(),
            "{id}: {kinds:?}"
        );
        assert_eq!(
            kinds.get("completed").map(Vec::len),
            Some(1),
            "{id}: {kinds:?}"
        );
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_instances_started_at_once_all_complete_without_journal_gaps()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api_node = env.spawn_node("worker,api").await?;
    let _second = env.spawn_node("worker").await?;
    let api = api_node.api();
    deploy(
        api,
        r#"
name: noop3
steps:
  - { id: a, kind: assign, set: { x: "1" }, next: [{ to: b }] }
  - { id: b, kind: assign, set: { y: "vars.x + 1" }, next: [{ to: c }] }
  - { id: c, kind: end, status: completed }
"#,
    )
    .await?;
    let ids = start(api, "noop3", json!({}), 2000).await?;
    assert_eq!(ids.len(), 2000);
    let states = wait_settled(&env, 2000, Duration::from_secs(180)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 2000)]);

    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT (instance_id, step_seq)) FROM journal")
            .fetch_one(env.store.pool())
            .await?;
    assert_eq!(
        (rows, distinct),
        (8000, 8000),
        "4 checkpoints per instance, none twice"
    );
    let gaps: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT instance_id FROM journal GROUP BY instance_id
         HAVING count(*) <> 4 OR max(step_seq) <> 3 OR min(step_seq) <> 0",
    )
    .fetch_all(env.store.pool())
    .await?;
    assert!(gaps.is_empty(), "instances with journal gaps: {gaps:?}");
    let (y_ok,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE vars->>'y' = '2'")
        .fetch_one(env.store.pool())
        .await?;
    assert_eq!(y_ok, 2000);
    // Each instance went on to its next steps on the node that ran its first one (claimed in
    // the commit), and the starts spread over both workers.
    let (moved, nodes): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE n > 1), (SELECT count(DISTINCT node_id) FROM journal)
         FROM (SELECT count(DISTINCT node_id) AS n FROM journal WHERE step_seq > 0
               GROUP BY instance_id) per_instance",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(
        (moved, nodes),
        (0, 2),
        "instances that changed node; nodes that ran steps"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_http_step_retries_with_backoff_then_ends_in_error() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let url = recorder.start().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(
        api,
        &format!(
            r#"
name: flaky
steps:
  - id: call
    kind: http
    method: POST
    url: "{url}/fail/always"
    timeout: 2s
    retry: {{ max_attempts: 3, backoff: 150ms, max_backoff: 1s }}
    next: [{{ to: done }}]
  - {{ id: done, kind: end, status: completed }}
"#
        ),
    )
    .await?;
    let id = start(api, "flaky", json!({}), 1).await?.remove(0);
    let instance = wait_until(
        "the instance to end in_error",
        Duration::from_secs(30),
        || async {
            let (_, instance) = get(&format!("{api}/v1/instances/{id}")).await?;
            Ok((instance["state"] == "in_error").then_some(instance))
        },
    )
    .await?;
    let error = instance["error"].as_str().unwrap_or_default();
    assert!(error.contains("status 500"), "error recorded: {error}");
    assert!(
        error.contains("after 3 attempts"),
        "error recorded: {error}"
    );

    let requests = recorder.requests();
    assert_eq!(requests.len(), 3, "three attempts");
    let keys: std::collections::HashSet<_> =
        requests.iter().map(|r| r.idempotency_key.clone()).collect();
    assert_eq!(
        keys.len(),
        1,
        "one idempotency key across retries: {keys:?}"
    );
    let gap1 = requests[1].at - requests[0].at;
    let gap2 = requests[2].at - requests[1].at;
    assert!(
        gap1 >= Duration::from_millis(150),
        "first back-off {gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(300),
        "second back-off doubles: {gap2:?}"
    );

    let (_, journal) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    let outcomes: Vec<(String, i64)> = journal["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str().unwrap_or_default().to_owned(),
                e["attempt"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("started".to_owned(), 1),
            ("retry".to_owned(), 1),
            ("retry".to_owned(), 2),
            ("failed".to_owned(), 3)
        ]
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_loop_ends_in_error_when_its_step_budget_is_spent() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(
        api,
        r#"
name: forever
max_steps: 25
vars: { n: 0 }
steps:
  - { id: spin, kind: assign, set: { n: "vars.n + 1" }, next: [{ to: spin, when: "true" }, { to: done }] }
  - { id: done, kind: end, status: completed }
"#,
    )
    .await?;
    let id = start(api, "forever", json!({}), 1).await?.remove(0);
    let instance = wait_until(
        "the budget to end the loop",
        Duration::from_secs(30),
        || async {
            let (_, i) = get(&format!("{api}/v1/instances/{id}")).await?;
            Ok((i["state"] == "in_error").then_some(i))
        },
    )
    .await?;
    assert_eq!(instance["vars"]["n"], 25, "exactly the budget of steps ran");
    assert!(
        instance["error"]
            .as_str()
            .unwrap_or_default()
            .contains("budget"),
        "{instance}"
    );
    env.cleanup().await;
    Ok(())
}

const COUNTER: &str = r#"
name: counter
vars: { n: 0 }
steps:
  - id: one
    kind: assign
    set: { n: "vars.n + 1" }
    next: [{ to: two }]
  - id: two
    kind: assign
    set: { n: "vars.n + 1" }
    next:
      - to: nap
        when: "vars.n > 10"
      - to: done
  - id: nap
    kind: sleep
    for: 1h
    next: [{ to: done }]
  - id: done
    kind: end
    status: completed
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_wait_answers_with_the_final_vars_once_the_instance_ends() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("api,worker,coordinator").await?;
    let api = node.api();
    deploy(api, COUNTER).await?;

    // The CLI waits and prints the end state and the vars.
    let out = env
        .cli(
            api,
            &["start", "counter", "--vars", r#"{"n":5}"#, "--wait", "30s"],
        )
        .await?;
    assert!(out.contains("\tcompleted"), "{out}");
    assert!(out.contains(r#"vars: {"n":7}"#), "{out}");

    // The API answers with the instance as it ended.
    let (status, body) = crate::support::post_json(
        &format!("{api}/v1/instances?wait=30s"),
        &json!({ "workflow": "counter" }),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["result"]["ended"], true, "{body}");
    assert_eq!(body["result"]["instance"]["state"], "completed", "{body}");
    assert_eq!(body["result"]["instance"]["vars"]["n"], 2, "{body}");
    assert_eq!(body["result"]["instance"]["id"], body["ids"][0], "{body}");

    // A wait that lapses answers the instance as it stands, and the CLI fails.
    let (status, body) = crate::support::post_json(
        &format!("{api}/v1/instances?wait=1s"),
        &json!({ "workflow": "counter", "vars": { "n": 20 } }),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["result"]["ended"], false, "{body}");
    assert_eq!(body["result"]["instance"]["state"], "waiting", "{body}");
    let out = env
        .cli_raw(
            api,
            &["start", "counter", "--vars", r#"{"n":20}"#, "--wait", "1s"],
        )
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("still waiting"), "{stderr}");

    // Waiting is for one instance, and not forever.
    let (status, body) = crate::support::post_json(
        &format!("{api}/v1/instances?wait=30s"),
        &json!({ "workflow": "counter", "count": 2 }),
    )
    .await?;
    assert_eq!(status, 422, "{body}");
    let (status, body) = crate::support::post_json(
        &format!("{api}/v1/instances?wait=1h"),
        &json!({ "workflow": "counter" }),
    )
    .await?;
    assert_eq!(status, 400, "{body}");
    env.cleanup().await;
    Ok(())
}
