//! Workers and coordinators die (`kill -9`), freeze (`SIGSTOP`) and lose their queue; every
//! instance still finishes, at its last checkpoint, and no late write lands.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_core::NodeId;
use drover_store::COORDINATOR_LEASE;
use drover_tests::{NodeProcess, Recorder, TestEnv, wait_until};
use serde_json::json;
use uuid::Uuid;

use crate::support::{deploy, start, wait_settled};

/// Four slow handler steps with an assign between: ~1.3 s per instance, mostly mid-step.
const STEADY: &str = r#"
name: steady
vars: { i: 0 }
steps:
  - { id: work, kind: handler, handler: slow, input: { ms: "250" }, next: [{ to: count }] }
  - { id: count, kind: assign, set: { i: "vars.i + 1" }, next: [{ to: work, when: "vars.i < 4" }, { to: done }] }
  - { id: done, kind: end, status: completed }
"#;

async fn running_on(env: &TestEnv, node: NodeId) -> anyhow::Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'running' AND owner_node = $1")
            .bind(node.0)
            .fetch_one(env.store.pool())
            .await?;
    Ok(n)
}

async fn wait_running_on(env: &TestEnv, node: NodeId, at_least: i64) -> anyhow::Result<()> {
    wait_until(
        "instances running on the node",
        Duration::from_secs(30),
        || async { Ok((running_on(env, node).await? >= at_least).then_some(())) },
    )
    .await
}

/// Kill to the moment none of `node`'s instances is RUNNING any more (all re-dispatched).
async fn time_to_redispatch(
    env: &TestEnv,
    node: NodeId,
    killed_at: Instant,
) -> anyhow::Result<Duration> {
    wait_until(
        "the dead node's instances to be requeued",
        Duration::from_secs(20),
        || async { Ok((running_on(env, node).await? == 0).then(|| killed_at.elapsed())) },
    )
    .await
}

/// Every instance of `steady` did each step exactly once per loop.
async fn assert_steady_checkpoints(env: &TestEnv, instances: i64) -> anyhow::Result<()> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT step_id, outcome, count(*) FROM journal GROUP BY step_id, outcome ORDER BY 1, 2",
    )
    .fetch_all(env.store.pool())
    .await?;
    let counts: HashMap<(String, String), i64> =
        rows.into_iter().map(|(s, o, n)| ((s, o), n)).collect();
    let get = |s: &str, o: &str| {
        counts
            .get(&(s.to_owned(), o.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(get("work", "completed"), 4 * instances, "{counts:?}");
    assert_eq!(get("count", "completed"), 4 * instances, "{counts:?}");
    assert_eq!(get("done", "completed"), instances, "{counts:?}");
    let (wrong,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE vars->>'i' <> '4'")
        .fetch_one(env.store.pool())
        .await?;
    assert_eq!(wrong, 0, "every instance counted to 4 exactly");
    Ok(())
}

async fn leader(env: &TestEnv) -> anyhow::Result<(Option<NodeId>, i64, bool)> {
    let lease = env
        .store
        .lease(COORDINATOR_LEASE)
        .await?
        .context("lease row")?;
    Ok((lease.holder, lease.term, lease.live))
}

async fn wait_leader(env: &TestEnv, node: &NodeProcess) -> anyhow::Result<i64> {
    wait_until(
        "the coordinator to lead",
        Duration::from_secs(20),
        || async {
            let (holder, term, live) = leader(env).await?;
            Ok((live && holder == Some(node.id)).then_some(term))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_instances_resume_at_their_last_checkpoint_long_before_its_silence_lapses()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // A heartbeat silence of 30 s: only the killed process's released liveness lock can get it
    // declared dead in time.
    let coordinator = env
        .spawn_node_with("coordinator,api", &["--dead-after-ms", "30000"])
        .await?;
    let mut victim = env.spawn_node("worker").await?;
    let _survivor = env.spawn_node("worker").await?;
    let api = coordinator.api();
    deploy(api, STEADY).await?;
    start(api, "steady", json!({}), 100).await?;
    wait_running_on(&env, victim.id, 5).await?;

    victim.kill().await?;
    let killed_at = Instant::now();
    let redispatch = time_to_redispatch(&env, victim.id, killed_at).await?;
    println!("kill -9 to re-dispatch: {} ms", redispatch.as_millis());
    assert!(
        redispatch < Duration::from_secs(5),
        "re-dispatched after {redispatch:?}"
    );

    let states = wait_settled(&env, 100, Duration::from_secs(90)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 100)]);
    assert_steady_checkpoints(&env, 100).await?;
    let (requeued,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM journal WHERE outcome = 'requeued' AND node_id = $1")
            .bind(victim.id.0)
            .fetch_one(env.store.pool())
            .await?;
    assert!(
        requeued >= 5,
        "the dead node's instances were journaled as requeued: {requeued}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_under_load_finishes_its_steps_hands_the_rest_over_and_leaves()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let coordinator = env.spawn_node("coordinator,api").await?;
    let mut leaving = env.spawn_node("worker").await?;
    let _staying = env.spawn_node("worker").await?;
    let api = coordinator.api();
    deploy(api, STEADY).await?;
    start(api, "steady", json!({}), 200).await?;
    wait_running_on(&env, leaving.id, 20).await?;

    let status = leaving.stop().await?;
    assert!(status.success(), "SIGTERM exits 0, not {status}");
    let node = env
        .store
        .list_nodes()
        .await?
        .into_iter()
        .find(|n| n.id == leaving.id)
        .context("the node row stays")?;
    assert_eq!(node.status, "left");
    let left_at = node.died_at.context("left at")?;

    let states = wait_settled(&env, 200, Duration::from_secs(90)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 200)]);
    // Every step it started, it finished: nothing was taken back, every step ran once.
    assert_steady_checkpoints(&env, 200).await?;
    let (requeued,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM journal WHERE outcome = 'requeued'")
            .fetch_one(env.store.pool())
            .await?;
    assert_eq!(requeued, 0, "no step was interrupted");
    // The instances it last moved on went on elsewhere at once: long before the stale-READY
    // sweep (3 s here) or a redelivery (30 s) would have rescued them.
    let (handed_over, slowest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), max(extract(epoch FROM n.started_at - $2) * 1000)::float8
         FROM journal j
         JOIN journal n ON n.instance_id = j.instance_id AND n.step_seq = j.step_seq + 1
         WHERE j.node_id = $1
           AND j.step_seq = (SELECT max(step_seq) FROM journal WHERE instance_id = j.instance_id
                                                                 AND node_id = $1)",
    )
    .bind(leaving.id.0)
    .bind(left_at)
    .fetch_one(env.store.pool())
    .await?;
    println!(
        "{handed_over} instances handed over; the slowest went on {slowest:?} ms after it left"
    );
    assert!(handed_over > 0, "it had instances to hand over");
    assert!(
        slowest.unwrap_or(0.0) < 2500.0,
        "an instance waited {slowest:?} ms after the node left"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_is_fenced_out_and_rejoins_under_a_new_id_when_it_wakes()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let coordinator = env.spawn_node("coordinator,api").await?;
    let mut sleeper = env.spawn_node("worker").await?;
    let _survivor = env.spawn_node("worker").await?;
    let api = coordinator.api();
    deploy(api, STEADY).await?;
    start(api, "steady", json!({}), 60).await?;
    wait_running_on(&env, sleeper.id, 3).await?;

    sleeper.pause()?;
    let died_at = wait_until(
        "the paused node to be declared dead",
        Duration::from_secs(20),
        || async {
            let nodes = env.store.list_nodes().await?;
            Ok(nodes
                .into_iter()
                .find(|n| n.id == sleeper.id && n.status == "dead")
                .and_then(|n| n.died_at))
        },
    )
    .await?;
    let states = wait_settled(&env, 60, Duration::from_secs(90)).await?;
    assert_eq!(
        states,
        vec![("completed".to_owned(), 60)],
        "finished elsewhere"
    );
    let before: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT instance_id, step_seq FROM journal ORDER BY 1, 2")
            .fetch_all(env.store.pool())
            .await?;

    sleeper.resume()?;
    // It finds itself declared dead, drops what it held and registers again under a new id,
    // without exiting.
    let rejoined = wait_until(
        "the woken node to register under a new id",
        Duration::from_secs(30),
        || async {
            let ids = sleeper.registrations();
            let Some(new) = ids.last().copied().filter(|id| *id != sleeper.id) else {
                return Ok(None);
            };
            let nodes = env.store.list_nodes().await?;
            Ok(nodes
                .into_iter()
                .any(|n| n.id == new && n.status == "alive")
                .then_some(new))
        },
    )
    .await?;
    assert_eq!(
        sleeper.registrations(),
        vec![sleeper.id, rejoined],
        "one re-registration"
    );
    assert!(sleeper.is_running(), "a node declared dead does not exit");
    let after: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT instance_id, step_seq FROM journal ORDER BY 1, 2")
            .fetch_all(env.store.pool())
            .await?;
    assert_eq!(before, after, "none of the woken node's writes landed");
    let (late,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM journal WHERE node_id = $1 AND finished_at > $2 AND outcome <> 'requeued'",
    )
    .bind(sleeper.id.0)
    .bind(died_at)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(
        late, 0,
        "no checkpoint from the node after it was declared dead"
    );
    assert_steady_checkpoints(&env, 60).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_another_coordinator_takes_over_and_finishes_recovery()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut first = env.spawn_node("coordinator,api").await?;
    let term0 = wait_leader(&env, &first).await?;
    let second = env.spawn_node("coordinator").await?;
    let mut victim = env.spawn_node("worker").await?;
    let _survivor = env.spawn_node("worker").await?;
    let api = first.api().to_owned();
    deploy(&api, STEADY).await?;
    start(&api, "steady", json!({}), 60).await?;
    wait_running_on(&env, victim.id, 3).await?;

    victim.kill().await?;
    first.kill().await?;
    let killed_at = Instant::now();
    let term1 = wait_leader(&env, &second).await?;
    let failover = killed_at.elapsed();
    println!(
        "leader failover: {} ms (lease TTL 5 s)",
        failover.as_millis()
    );
    assert!(term1 > term0, "terms only increase: {term0} -> {term1}");
    assert!(
        failover < Duration::from_secs(6),
        "took over after {failover:?}"
    );

    let redispatch = time_to_redispatch(&env, victim.id, killed_at).await?;
    println!(
        "kill -9 (worker and leader) to re-dispatch: {} ms",
        redispatch.as_millis()
    );
    let states = wait_settled(&env, 60, Duration::from_secs(90)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 60)]);
    assert_steady_checkpoints(&env, 60).await?;
    let (_, term_now, _) = leader(&env).await?;
    assert_eq!(term_now, term1, "the new leader kept its term");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_the_recovery_of_several_dead_nodes() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let first = env.spawn_node("coordinator,api").await?;
    let second = env.spawn_node("coordinator").await?;
    let mut victims = Vec::new();
    for _ in 0..4 {
        victims.push(env.spawn_node("worker").await?);
    }
    let api = first.api();
    deploy(api, STEADY).await?;
    start(api, "steady", json!({}), 200).await?;
    for victim in &victims {
        wait_running_on(&env, victim.id, 2).await?;
    }
    for victim in &mut victims {
        victim.kill().await?;
    }
    let _survivor = env.spawn_node("worker").await?;
    let states = wait_settled(&env, 200, Duration::from_secs(120)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 200)]);
    assert_steady_checkpoints(&env, 200).await?;

    let actors: Vec<(String, i64)> = sqlx::query_as(
        "SELECT actor, count(*) FROM journal WHERE outcome = 'requeued' GROUP BY actor ORDER BY actor",
    )
    .fetch_all(env.store.pool())
    .await?;
    let expected: HashSet<String> = [first.id, second.id]
        .iter()
        .map(|id| format!("recovery:{id}"))
        .collect();
    let seen: HashSet<String> = actors.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(
        seen, expected,
        "both coordinators requeued instances: {actors:?}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_the_job_stream_mid_run_loses_no_instance() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let coordinator = env.spawn_node("coordinator,api").await?;
    let _worker = env.spawn_node("worker").await?;
    let api = coordinator.api();
    deploy(api, STEADY).await?;
    start(api, "steady", json!({}), 150).await?;
    let stream = env
        .bus
        .jetstream()
        .get_stream(env.bus.subjects().jobs_stream())
        .await?;
    stream.purge().await?;
    let states = wait_settled(&env, 150, Duration::from_secs(120)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 150)]);
    assert_steady_checkpoints(&env, 150).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_non_retryable_step_is_not_run_again_and_waits_in_error()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let url = recorder.start().await?;
    let coordinator = env.spawn_node("coordinator,api").await?;
    let mut victim = env.spawn_node("worker").await?;
    let api = coordinator.api();
    deploy(
        api,
        &format!(
            r#"
name: charge
steps:
  - id: charge
    kind: http
    method: POST
    url: "{url}/slow/charge"
    allow_retry: false
    body: {{ id: "instance.id" }}
    next: [{{ to: done }}]
  - {{ id: done, kind: end, status: completed }}
"#
        ),
    )
    .await?;
    let id = start(api, "charge", json!({}), 1).await?.remove(0);
    wait_until(
        "the charge request to arrive",
        Duration::from_secs(20),
        || async { Ok((!recorder.requests().is_empty()).then_some(())) },
    )
    .await?;
    victim.kill().await?;
    let mut other = env.spawn_node("worker").await?;
    let instance = wait_until(
        "the instance to wait in_error",
        Duration::from_secs(20),
        || async {
            let i = env
                .store
                .get_instance(id.parse()?)
                .await?
                .context("instance")?;
            Ok((i.state == drover_core::InstanceState::InError).then_some(i))
        },
    )
    .await?;
    let error = instance.error.unwrap_or_default();
    assert!(
        error.contains("interrupted") && error.contains("outcome is unknown"),
        "{error}"
    );
    assert_eq!(recorder.requests().len(), 1, "the step was not run again");
    let journal = env.store.journal(id.parse()?).await?.context("journal")?;
    let outcomes: Vec<&str> = journal.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes, vec!["started", "interrupted"]);

    // The operator knows the charge went through: skip it. The step is not run again.
    // Alice has her own operator token: the journal names her.
    let alice = env
        .cli(api, &["token", "create", "alice", "--scope", "operator"])
        .await?;
    env.cli(
        api,
        &["--token", alice.trim(), "resume", &id, "--next-step"],
    )
    .await?;
    let done = wait_until(
        "the skipped instance to complete",
        Duration::from_secs(20),
        || async {
            let i = env
                .store
                .get_instance(id.parse()?)
                .await?
                .context("instance")?;
            Ok(i.state.is_terminal().then_some(i))
        },
    )
    .await?;
    assert_eq!(done.state, drover_core::InstanceState::Completed);
    assert_eq!(
        recorder.requests().len(),
        1,
        "skipping does not charge again"
    );
    let journal = env.store.journal(id.parse()?).await?.context("journal")?;
    assert_eq!(journal[2].outcome, "resumed");
    assert_eq!(journal[2].actor.as_deref(), Some("alice"));

    // Another one, interrupted the same way, that the operator retries: it runs once more.
    let second = start(api, "charge", json!({}), 1).await?.remove(0);
    wait_until(
        "the second charge to arrive",
        Duration::from_secs(20),
        || async { Ok((recorder.requests().len() == 2).then_some(())) },
    )
    .await?;
    let running = env
        .store
        .get_instance(second.parse()?)
        .await?
        .and_then(|i| i.owner_node);
    assert_eq!(running, Some(other.id));
    other.kill().await?;
    let _third = env.spawn_node("worker").await?;
    wait_until(
        "the second instance to wait in_error",
        Duration::from_secs(20),
        || async {
            let i = env
                .store
                .get_instance(second.parse()?)
                .await?
                .context("instance")?;
            Ok((i.state == drover_core::InstanceState::InError).then_some(()))
        },
    )
    .await?;
    let out = env
        .cli_raw(api, &["resume", &second, "--current-step", "--next-step"])
        .await?;
    assert!(!out.status.success(), "exactly one mode");
    env.cli(api, &["resume", &second, "--current-step"]).await?;
    wait_until(
        "the retried instance to complete",
        Duration::from_secs(20),
        || async {
            let i = env
                .store
                .get_instance(second.parse()?)
                .await?
                .context("instance")?;
            Ok((i.state == drover_core::InstanceState::Completed).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        recorder.requests().len(),
        3,
        "the retry charged again, once"
    );
    let out = env
        .cli_raw(api, &["resume", &second, "--current-step"])
        .await?;
    assert!(
        !out.status.success(),
        "a completed instance cannot be resumed"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in_error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_event_survives_every_node_restarting_and_takes_the_event_afterwards()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut first = env.spawn_node("worker,api,coordinator").await?;
    deploy(
        first.api(),
        r#"
name: approval
steps:
  - { id: ask, kind: wait_event, name: approved, timeout: 10m, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#,
    )
    .await?;
    let id = start(first.api(), "approval", json!({}), 1)
        .await?
        .remove(0);
    wait_until("the instance to wait", Duration::from_secs(20), || async {
        let i = env
            .store
            .get_instance(id.parse()?)
            .await?
            .context("instance")?;
        Ok((i.state == drover_core::InstanceState::Waiting).then_some(()))
    })
    .await?;
    first.kill().await?;
    let second = env.spawn_node("worker,api,coordinator").await?;
    let api = second.api();
    env.cli(
        api,
        &[
            "send-event",
            &id,
            "approved",
            "--payload",
            r#"{"by":"bob"}"#,
        ],
    )
    .await?;
    let done = wait_until(
        "the approval to complete",
        Duration::from_secs(30),
        || async {
            let i = env
                .store
                .get_instance(id.parse()?)
                .await?
                .context("instance")?;
            Ok(i.state.is_terminal().then_some(i))
        },
    )
    .await?;
    assert_eq!(done.state, drover_core::InstanceState::Completed);
    assert_eq!(done.outputs["ask"]["by"], "bob");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counting_loop_survives_repeated_worker_kills_with_every_value_recorded_once_per_key()
-> anyhow::Result<()> {
    const N: i64 = 3000;
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let url = recorder.start().await?;
    let coordinator = env.spawn_node("coordinator,api").await?;
    let mut workers = [
        env.spawn_node("worker").await?,
        env.spawn_node("worker").await?,
    ];
    let api = coordinator.api();
    deploy(
        api,
        &format!(
            r#"
name: siebel
vars: {{ n: 0 }}
steps:
  - {{ id: inc, kind: assign, set: {{ n: "vars.n + 1" }}, next: [{{ to: record }}] }}
  - id: record
    kind: http
    method: POST
    url: "{url}/ok/siebel"
    body: {{ n: "vars.n" }}
    next: [{{ to: inc, when: "vars.n < {N}" }}, {{ to: done }}]
  - {{ id: done, kind: end, status: completed }}
"#
        ),
    )
    .await?;
    let id: drover_core::InstanceId = start(api, "siebel", json!({}), 1)
        .await?
        .remove(0)
        .parse()?;

    // Kill the worker running the loop, several times, at different points of the count.
    let mut kills = 0;
    for threshold in [300, 1000, 1700, 2400] {
        wait_until("the loop to progress", Duration::from_secs(60), || async {
            Ok((recorder.requests().len() >= threshold).then_some(()))
        })
        .await?;
        let owner = env.store.get_instance(id).await?.and_then(|i| i.owner_node);
        let index = workers
            .iter()
            .position(|w| Some(w.id) == owner)
            .unwrap_or(kills % 2);
        workers[index].kill().await?;
        kills += 1;
        workers[index] = env.spawn_node("worker").await?;
    }
    assert_eq!(kills, 4);
    let instance = wait_until("the loop to finish", Duration::from_secs(180), || async {
        let i = env.store.get_instance(id).await?.context("instance")?;
        Ok(i.state.is_terminal().then_some(i))
    })
    .await?;
    assert_eq!(instance.state, drover_core::InstanceState::Completed);
    assert_eq!(instance.vars["n"], N);

    let mut keys_by_value: BTreeMap<i64, HashSet<String>> = BTreeMap::new();
    for r in recorder.requests() {
        let n = r.body["n"].as_i64().context("n")?;
        keys_by_value
            .entry(n)
            .or_default()
            .insert(r.idempotency_key.clone().unwrap_or_default());
    }
    assert_eq!(
        keys_by_value.keys().copied().collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>()
    );
    let repeated = recorder.requests().len() as i64 - N;
    for (n, keys) in &keys_by_value {
        assert_eq!(
            keys.len(),
            1,
            "value {n} was sent under several idempotency keys: {keys:?}"
        );
    }
    println!("{N} values recorded; {repeated} re-sent after kills, each under its original key");
    env.cleanup().await;
    Ok(())
}
