//! The infrastructure changes under the nodes: streams and consumers deleted by hand,
//! Postgres restarted, a worker cut off from Postgres and NATS. Every node stays up, every
//! instance completes, and no step is committed twice.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use drover_core::NodeId;
use drover_tests::{NodeProcess, PgServer, Proxy, Recorder, TestEnv, wait_until};
use serde_json::json;

use crate::support::{deploy, start};

/// Three loops of a short handler step and an assign: ten checkpoints per instance, mostly
/// continued on the node that ran the step before (no NATS round trip), some through jobs.
const LOOPS: &str = r#"
name: loops
vars: { i: 0 }
steps:
  - { id: work, kind: handler, handler: slow, input: { ms: "30" }, next: [{ to: count }] }
  - { id: count, kind: assign, set: { i: "vars.i + 1" }, next: [{ to: work, when: "vars.i < 3" }, { to: done }] }
  - { id: done, kind: end, status: completed }
"#;

/// Journal rows per `(step_id, outcome)`; `None` if the database does not answer (it may be
/// restarting).
async fn checkpoints(env: &TestEnv) -> Option<HashMap<(String, String), i64>> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT step_id, outcome, count(*) FROM journal GROUP BY step_id, outcome")
            .fetch_all(env.store.pool())
            .await
            .ok()?;
    Some(rows.into_iter().map(|(s, o, n)| ((s, o), n)).collect())
}

async fn completed_steps(env: &TestEnv) -> i64 {
    checkpoints(env)
        .await
        .map(|c| {
            c.iter()
                .filter(|((_, o), _)| o == "completed")
                .map(|(_, n)| n)
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until at least `n` steps have completed in all.
async fn wait_progress(env: &TestEnv, n: i64, timeout: Duration) -> anyhow::Result<()> {
    wait_until(&format!("{n} completed steps"), timeout, || async {
        Ok((completed_steps(env).await >= n).then_some(()))
    })
    .await
}

/// Waits until `expected` instances have completed (errors reading count as "not yet": the
/// database may be coming back).
async fn wait_all_completed(env: &TestEnv, expected: i64, timeout: Duration) -> anyhow::Result<()> {
    wait_until("every instance to complete", timeout, || async {
        let done: Option<(i64,)> =
            sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'completed'")
                .fetch_one(env.store.pool())
                .await
                .ok();
        Ok(done.is_some_and(|(n,)| n == expected).then_some(()))
    })
    .await?;
    let (other,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM instance WHERE state <> 'completed'")
            .fetch_one(env.store.pool())
            .await?;
    assert_eq!(other, 0, "every instance completed");
    Ok(())
}

/// Every instance of `loops` ran each step exactly once per loop.
async fn assert_each_step_committed_once(env: &TestEnv, instances: i64) -> anyhow::Result<()> {
    let counts = checkpoints(env).await.unwrap_or_default();
    let get = |s: &str| {
        counts
            .get(&(s.to_owned(), "completed".to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(get("work"), 3 * instances, "{counts:?}");
    assert_eq!(get("count"), 3 * instances, "{counts:?}");
    assert_eq!(get("done"), instances, "{counts:?}");
    let (wrong,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE vars->>'i' <> '3'")
        .fetch_one(env.store.pool())
        .await?;
    assert_eq!(wrong, 0, "every instance counted to 3 exactly");
    Ok(())
}

fn assert_all_running(nodes: &mut [&mut NodeProcess]) {
    for node in nodes.iter_mut() {
        assert!(
            node.is_running(),
            "node {} exited; log: {}",
            node.id,
            node.log.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_streams_and_the_worker_consumer_under_load_stops_no_node_and_loses_nothing()
-> anyhow::Result<()> {
    const N: i64 = 1000;
    let env = TestEnv::new().await?;
    let mut api = env.spawn_node("api").await?;
    let mut coordinator = env.spawn_node("coordinator").await?;
    // Few steps at once, so that jobs wait in the stream when it goes.
    let mut workers = [
        env.spawn_node_with("worker", &["--concurrency", "64"])
            .await?,
        env.spawn_node_with("worker", &["--concurrency", "64"])
            .await?,
    ];
    deploy(api.api(), LOOPS).await?;
    let js = env.bus.jetstream();
    let subjects = env.bus.subjects();

    start(api.api(), "loops", json!({}), N as u32).await?;
    wait_progress(&env, 200, Duration::from_secs(60)).await?;
    js.delete_stream(subjects.jobs_stream()).await?;

    wait_progress(&env, 3000, Duration::from_secs(60)).await?;
    js.delete_stream(subjects.events_stream()).await?;

    wait_progress(&env, 5000, Duration::from_secs(60)).await?;
    js.get_stream(subjects.jobs_stream())
        .await?
        .delete_consumer(&drover_bus::worker_consumer_name(&Default::default()))
        .await?;

    wait_all_completed(&env, N, Duration::from_secs(180)).await?;
    assert_each_step_committed_once(&env, N).await?;
    let [first, second] = &mut workers;
    assert_all_running(&mut [&mut api, &mut coordinator, first, second]);

    // Provisioned again, and the relay got every event out: the ones after the events
    // stream went are in the new one.
    env.bus.worker_consumer(&Default::default()).await?;
    let unrelayed = wait_until("the outbox to drain", Duration::from_secs(30), || async {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM event_fact WHERE relayed_at IS NULL")
                .fetch_one(env.store.pool())
                .await?;
        Ok((n == 0).then_some(n))
    })
    .await?;
    assert_eq!(unrelayed, 0);
    let mut events = js.get_stream(subjects.events_stream()).await?;
    let stored = events.info().await?.state.messages;
    assert!(
        stored > 0,
        "the events stream was provisioned again and holds the later events"
    );
    let provisioned: usize = workers
        .iter()
        .map(|w| w.log_lines("provisioned").len())
        .sum();
    assert!(
        provisioned > 0,
        "a worker provisioned the jobs stream again"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgres_under_load_stops_no_node_and_commits_nothing_twice()
-> anyhow::Result<()> {
    const N: i64 = 400;
    let pg = PgServer::start().await?;
    let env = TestEnv::new().await?.on_postgres(&pg).await?;
    let mut api = env.spawn_node("api").await?;
    let mut coordinator = env.spawn_node("coordinator").await?;
    let mut first = env.spawn_node("worker").await?;
    let mut second = env.spawn_node("worker").await?;
    deploy(api.api(), LOOPS).await?;
    start(api.api(), "loops", json!({}), N as u32).await?;
    wait_progress(&env, 500, Duration::from_secs(60)).await?;

    pg.stop().await?;
    let outage = tokio::time::Instant::now();
    readyz_becomes(api.api(), 503, "postgres").await?;
    // The outage: longer than the leader's lease and the dead-node deadline.
    tokio::time::sleep_until(outage + Duration::from_secs(7)).await;
    pg.start_again().await?;
    readyz_becomes(api.api(), 200, "postgres").await?;

    wait_all_completed(&env, N, Duration::from_secs(180)).await?;
    assert_each_step_committed_once(&env, N).await?;
    assert_all_running(&mut [&mut api, &mut coordinator, &mut first, &mut second]);
    env.cleanup().await;
    Ok(())
}

/// Waits until the api's `/readyz` answers `status`, its `checks.<check>` saying why.
async fn readyz_becomes(api: &str, status: u16, check: &str) -> anyhow::Result<()> {
    let url = format!("{api}/readyz");
    wait_until(
        &format!("/readyz to answer {status}"),
        Duration::from_secs(20),
        || async {
            let resp = reqwest::get(&url).await?;
            let got = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await?;
            let ok = body["checks"][check] == "ok";
            Ok((got == status && ok == (status == 200)).then_some(()))
        },
    )
    .await
}

/// Each record step sends the loop's value; the Recorder counts what arrives.
fn recorded_loops(url: &str) -> String {
    format!(
        r#"
name: recorded
vars: {{ i: 0 }}
steps:
  - {{ id: work, kind: handler, handler: slow, input: {{ ms: "200" }}, next: [{{ to: record }}] }}
  - id: record
    kind: http
    method: POST
    url: "{url}/ok/record"
    body: {{ i: "vars.i", id: "instance.id" }}
    next: [{{ to: count }}]
  - {{ id: count, kind: assign, set: {{ i: "vars.i + 1" }}, next: [{{ to: work, when: "vars.i < 3" }}, {{ to: done }}] }}
  - {{ id: done, kind: end, status: completed }}
"#
    )
}

async fn running_on(env: &TestEnv, node: NodeId) -> anyhow::Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'running' AND owner_node = $1")
            .bind(node.0)
            .fetch_one(env.store.pool())
            .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_postgres_and_nats_is_fenced_out_and_works_again_once_healed()
-> anyhow::Result<()> {
    const FIRST: i64 = 150;
    const LATER: i64 = 100;
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let url = recorder.start().await?;
    let (pg_proxy, pg_url) = Proxy::for_url(&env.database_url).await?;
    let (nats_proxy, nats_url) = Proxy::for_url(&env.nats_url).await?;
    let mut coordinator = env.spawn_node("coordinator,api").await?;
    let mut other = env.spawn_node("worker").await?;
    let mut victim = env
        .spawn_node_with(
            "worker",
            &["--database-url", &pg_url, "--nats-url", &nats_url],
        )
        .await?;
    let api = coordinator.api().to_owned();
    deploy(&api, &recorded_loops(&url)).await?;
    start(&api, "recorded", json!({}), FIRST as u32).await?;
    wait_until(
        "instances running on the victim",
        Duration::from_secs(30),
        || async { Ok((running_on(&env, victim.id).await? >= 5).then_some(())) },
    )
    .await?;

    pg_proxy.cut();
    nats_proxy.cut();
    let cut_at = tokio::time::Instant::now();
    let died_at = wait_until(
        "the cut-off worker to be declared dead",
        Duration::from_secs(10),
        || async {
            let nodes = env.store.list_nodes().await?;
            Ok(nodes
                .into_iter()
                .find(|n| n.id == victim.id && n.status == "dead")
                .and_then(|n| n.died_at))
        },
    )
    .await?;
    // Cut off for 10 s in all.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed())).await;
    pg_proxy.heal();
    nats_proxy.heal();

    // It finds itself declared dead and registers again under a new id, without exiting.
    let rejoined = wait_until(
        "the healed worker to register under a new id",
        Duration::from_secs(60),
        || async {
            let ids = victim.registrations();
            Ok(ids.last().copied().filter(|id| *id != victim.id))
        },
    )
    .await?;
    start(&api, "recorded", json!({}), LATER as u32).await?;
    wait_until(
        "the healed worker to commit steps again",
        Duration::from_secs(60),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM journal WHERE node_id = $1 AND outcome = 'completed'",
            )
            .bind(rejoined.0)
            .fetch_one(env.store.pool())
            .await?;
            Ok((n > 0).then_some(()))
        },
    )
    .await?;
    let total = FIRST + LATER;
    wait_all_completed(&env, total, Duration::from_secs(120)).await?;
    assert_each_step_committed_once_recorded(&env, total).await?;
    assert_all_running(&mut [&mut coordinator, &mut other, &mut victim]);

    // Its late writes were refused: commits that reached Postgres after the heal were fenced,
    // and nothing it checkpointed under its old id dates from after it was declared dead.
    let fenced = victim.log_lines("checkpoint not committed");
    assert!(
        fenced
            .iter()
            .any(|line| line.contains(&victim.id.to_string())),
        "the cut-off worker's late commits were fenced; log: {}",
        victim.log.display()
    );
    assert!(
        !victim
            .log_lines("heartbeat failed; claiming nothing until one succeeds")
            .is_empty(),
        "it stopped claiming while it could not heartbeat"
    );
    let (late,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM journal
         WHERE node_id = $1 AND finished_at > $2 AND outcome <> 'requeued'",
    )
    .bind(victim.id.0)
    .bind(died_at)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(
        late, 0,
        "no checkpoint of the old id after it was declared dead"
    );

    // Every loop's request went out under one idempotency key per (instance, loop), with
    // the same body however often it was sent: nothing lost, nothing run twice.
    let mut bodies: HashMap<String, HashSet<String>> = HashMap::new();
    for request in recorder.requests() {
        let key = request.idempotency_key.clone().unwrap_or_default();
        bodies
            .entry(key)
            .or_default()
            .insert(request.body.to_string());
    }
    assert_eq!(
        bodies.len() as i64,
        3 * total,
        "one key per instance and loop"
    );
    for (key, sent) in &bodies {
        assert_eq!(
            sent.len(),
            1,
            "key {key} was sent with different bodies: {sent:?}"
        );
    }
    env.cleanup().await;
    Ok(())
}

/// Every instance of `recorded` ran each step exactly once per loop.
async fn assert_each_step_committed_once_recorded(
    env: &TestEnv,
    instances: i64,
) -> anyhow::Result<()> {
    let counts = checkpoints(env).await.unwrap_or_default();
    let get = |s: &str| {
        counts
            .get(&(s.to_owned(), "completed".to_owned()))
            .copied()
            .unwrap_or(0)
    };
    for step in ["work", "record", "count"] {
        assert_eq!(get(step), 3 * instances, "{step}: {counts:?}");
    }
    assert_eq!(get("done"), instances, "{counts:?}");
    let (wrong,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE vars->>'i' <> '3'")
        .fetch_one(env.store.pool())
        .await?;
    assert_eq!(wrong, 0, "every instance counted to 3 exactly");
    Ok(())
}
