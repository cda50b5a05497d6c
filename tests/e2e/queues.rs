//! Worker queues: a job goes only to workers serving its queue, and a `handler` step only to a
//! worker that registered its handler; without one it waits (never `in_error`), and `drover
//! why` says what it waits for.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use drover_bus::NatsRole;
use drover_bus::permissions::AuthorizationConfig;
use drover_core::{NodeId, Queue};
use drover_tests::{NatsServer, TestEnv, wait_until};
use serde_json::{Value, json};

use crate::support::{deploy, get, start, wait_settled};

/// `count` (any worker) then `compute` (the `double` handler) then `done`.
const DOUBLER: &str = r#"
name: doubler
vars: { n: 0 }
steps:
  - id: count
    kind: assign
    set: { n: "vars.n + 1" }
    next: [{ to: compute }]
  - id: compute
    kind: handler
    handler: double
    input: { n: "vars.n" }
    next: [{ to: done }]
  - id: done
    kind: end
    status: completed
"#;

/// On the `gpu` queue, but for its first step.
const CRUNCHER: &str = r#"
name: cruncher
queue: gpu
vars: { n: 0 }
steps:
  - id: prep
    kind: assign
    queue: default
    set: { n: "vars.n + 1" }
    next: [{ to: crunch }]
  - id: crunch
    kind: assign
    set: { n: "vars.n * 10" }
    next: [{ to: done }]
  - id: done
    kind: end
    status: completed
"#;

/// The journal entries of instance `id`, as the API lists them.
async fn journal(api: &str, id: &str) -> anyhow::Result<Vec<Value>> {
    let (status, body) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    anyhow::ensure!(status == 200, "journal of {id}: {status} {body}");
    Ok(body["entries"].as_array().cloned().unwrap_or_default())
}

/// The node that committed each step of instance `id`, by step id.
async fn nodes_by_step(api: &str, id: &str) -> anyhow::Result<HashMap<String, String>> {
    Ok(journal(api, id)
        .await?
        .iter()
        .skip(1)
        .map(|e| {
            let step = e["step_id"].as_str().unwrap_or_default().to_owned();
            (step, e["node_id"].as_str().unwrap_or_default().to_owned())
        })
        .collect())
}

/// The `queues` and `handlers` a node row advertises.
async fn advertised(env: &TestEnv, node: NodeId) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    Ok(
        sqlx::query_as("SELECT queues, handlers FROM node WHERE id = $1")
            .bind(node.0)
            .fetch_one(env.store.pool())
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_step_waits_for_a_worker_with_its_handler_and_runs_once_one_starts()
-> anyhow::Result<()> {
    const N: usize = 3;
    let env = TestEnv::new().await?;
    let api_node = env.spawn_node("api,coordinator").await?;
    let without = [("DROVER_TEST_HANDLERS".to_owned(), String::new())];
    let lacking = env.spawn_node_env("worker", &[], &without).await?;
    // Only the built-in maintenance handlers every worker has.
    assert_eq!(
        advertised(&env, lacking.id).await?,
        (
            vec!["default".to_owned()],
            vec![
                "system.cleanup".to_owned(),
                "system.paused-instances".to_owned()
            ]
        )
    );
    let api = api_node.api();
    deploy(api, DOUBLER).await?;
    let ids = start(api, "doubler", json!({}), N as u32).await?;

    // The worker runs `count`, then receives `compute`'s jobs and leaves them: each is
    // delivered again (to it: it is the only one) without being claimed.
    wait_until(
        "the worker to leave every compute job at least once",
        Duration::from_secs(30),
        || async {
            let mut consumer = env.bus.worker_consumer(&Queue::default()).await?;
            let info = consumer.info().await?;
            Ok((info.num_redelivered >= N).then_some(()))
        },
    )
    .await?;
    for id in &ids {
        let (_, instance) = get(&format!("{api}/v1/instances/{id}")).await?;
        assert_eq!(
            (&instance["state"], &instance["current_step"]),
            (&json!("ready"), &json!("compute")),
            "{id} waits at its handler step: {instance}"
        );
        let steps: Vec<Value> = journal(api, id)
            .await?
            .iter()
            .map(|e| e["step_id"].clone())
            .collect();
        assert_eq!(steps, [json!("count"), json!("count")], "only count ran");

        let (status, why) = get(&format!("{api}/v1/instances/{id}/diagnosis")).await?;
        assert_eq!(status, 200, "{why}");
        assert_eq!(why["cause"], "no_capable_worker", "{why}");
        let summary = why["summary"].as_str().unwrap_or_default();
        assert!(
            summary.contains(
                "waiting for a worker serving queue default with handler double (none alive)"
            ),
            "{summary}"
        );
    }
    let out = env.cli(api, &["why", &ids[0]]).await?;
    assert!(out.contains("handler double (none alive)"), "{out}");

    // A worker with the handler, started later, runs them all.
    let capable = env.spawn_node("worker").await?;
    assert!(
        advertised(&env, capable.id)
            .await?
            .1
            .contains(&"double".to_owned())
    );
    let states = wait_settled(&env, N as i64, Duration::from_secs(90)).await?;
    assert_eq!(states, vec![("completed".to_owned(), N as i64)]);
    for id in &ids {
        let nodes = nodes_by_step(api, id).await?;
        assert_eq!(
            nodes.get("compute"),
            Some(&capable.id.to_string()),
            "{id}: the handler ran on the worker that has it"
        );
        let computed = journal(api, id).await?;
        let computed = computed
            .iter()
            .find(|e| e["step_id"] == "compute")
            .context("compute is journaled")?;
        assert_eq!(computed["output"], json!({ "n": 2 }), "{id}: {computed}");
        assert_eq!(computed["outcome"], "completed", "{id}: {computed}");
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_queues_jobs_never_reach_a_default_only_worker() -> anyhow::Result<()> {
    const N: usize = 20;
    let env = TestEnv::new().await?;
    let api_node = env.spawn_node("api,coordinator").await?;
    let default_worker = env.spawn_node("worker").await?;
    let gpu_worker = env.spawn_node_with("worker", &["--queues", "gpu"]).await?;
    let both = env
        .spawn_node_env(
            "worker",
            &[],
            &[("DROVER_QUEUES".to_owned(), "default,gpu".to_owned())],
        )
        .await?;
    assert_eq!(advertised(&env, default_worker.id).await?.0, ["default"]);
    assert_eq!(advertised(&env, gpu_worker.id).await?.0, ["gpu"]);
    assert_eq!(advertised(&env, both.id).await?.0, ["default", "gpu"]);

    let api = api_node.api();
    deploy(api, CRUNCHER).await?;
    let ids = start(api, "cruncher", json!({}), N as u32).await?;
    let states = wait_settled(&env, N as i64, Duration::from_secs(60)).await?;
    assert_eq!(states, vec![("completed".to_owned(), N as i64)]);

    let gpu_nodes = [gpu_worker.id.to_string(), both.id.to_string()];
    for id in &ids {
        let nodes = nodes_by_step(api, id).await?;
        for step in ["crunch", "done"] {
            let node = nodes
                .get(step)
                .with_context(|| format!("{id}: {step} ran"))?;
            assert!(
                gpu_nodes.contains(node),
                "{id}: gpu step {step} ran on {node}, which does not serve gpu"
            );
        }
        let prep = nodes.get("prep").context("prep ran")?;
        assert_ne!(prep, &gpu_worker.id.to_string(), "{id}: prep is not gpu's");
        let (_, instance) = get(&format!("{api}/v1/instances/{id}")).await?;
        assert_eq!(instance["vars"]["n"], 10);
    }
    // Nothing of the gpu queue was ever handed to the default-only worker: its consumer is
    // the default queue's, and the gpu consumer's deliveries all went to gpu workers.
    let journal_nodes: Vec<(String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT step_id, node_id FROM journal WHERE node_id = $1 AND step_id <> 'prep'",
    )
    .bind(default_worker.id.0)
    .fetch_all(env.store.pool())
    .await?;
    assert!(journal_nodes.is_empty(), "{journal_nodes:?}");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_nats_user_serves_the_queues_nats_config_allows_it() -> anyhow::Result<()> {
    let gpu: Queue = "gpu".parse()?;
    let server = NatsServer::start(&AuthorizationConfig {
        prefix: format!("t{}", uuid::Uuid::now_v7().simple()),
        worker_queues: vec![Queue::default(), gpu],
        ..Default::default()
    })
    .await?;
    let env = TestEnv::with_nats(&server).await?;
    let api_node = env
        .spawn_node_env("api", &[], &server.node_env("api")?)
        .await?;
    let _coordinator = env
        .spawn_node_env("coordinator", &[], &server.node_env("coordinator")?)
        .await?;
    let _worker = env
        .spawn_node_env(
            "worker",
            &["--queues", "default,gpu"],
            &server.node_env(NatsRole::Worker.as_str())?,
        )
        .await?;
    let api = api_node.api();
    deploy(api, CRUNCHER).await?;
    let ids = start(api, "cruncher", json!({}), 5).await?;
    let states = wait_settled(&env, ids.len() as i64, Duration::from_secs(60)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 5)]);
    env.cleanup().await;
    Ok(())
}

/// A `handler` step and its end.
const GREETER: &str = r#"
name: greeter
steps:
  - { id: hi, kind: handler, handler: greet, input: {}, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_left_job_is_published_again_before_nats_gives_up_and_dropped_once_stale()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = &env.store;
    let definition = drover_core::Definition::parse(GREETER)?;
    store
        .deploy_definition("greeter", &definition.to_json(), GREETER)
        .await?;
    // An in-process worker without the handler, whose consumer gives up after 2 deliveries.
    let node = NodeId::new();
    store
        .register_node(&drover_store::NewNode::new(
            node,
            &["worker".to_owned()],
            "test",
            "0",
        ))
        .await?;
    let bus = drover_bus::Bus::connect(drover_bus::BusConfig {
        max_deliver: 2,
        ..env.bus_config.clone()
    })
    .await?;
    let campaign = store
        .campaign_by_name("default")
        .await?
        .context("the default campaign")?;
    let id = drover_core::InstanceId::new();
    let created = store
        .create_instances(
            &[drover_store::NewInstance {
                id,
                campaign: campaign.id,
                workflow: "greeter".to_owned(),
                version: 1,
                entry_step: "hi".to_owned(),
                allow_retry: true,
                timeout_ms: 30_000,
                route: definition.route(definition.entry()),
                vars: json!({}),
                announce_end: false,
            }],
            "test",
        )
        .await?;
    bus.publish_jobs(&created.ready).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = drover_worker::Worker::builder().build(node, store.clone(), bus.clone());
    let stats = worker.stats();
    let running = tokio::spawn(worker.run(shutdown.clone()));

    // Each time NATS would give up on it, it is published afresh: 1 message, new sequences.
    let stream = env.bus.subjects().jobs_stream();
    let state = || async {
        let mut jobs = env.bus.jetstream().get_stream(&stream).await?;
        let state = jobs.info().await?.state.clone();
        anyhow::Ok((state.messages, state.last_sequence))
    };
    wait_until(
        "the left job to be published again twice",
        Duration::from_secs(30),
        || async { Ok((state().await?.1 >= 3).then_some(())) },
    )
    .await?;
    assert_eq!(state().await?.0, 1, "one copy of the job, never more");
    // Two deliveries per copy, a second apart: no hot loop.
    let left = stats.left.load(std::sync::atomic::Ordering::Relaxed);
    assert!((4..=8).contains(&left), "{left} deliveries left");
    let instance = store.get_instance(id).await?.context("exists")?;
    assert_eq!(instance.state, drover_core::InstanceState::Ready);
    assert_eq!(instance.step_seq, drover_core::StepSeq(0), "nothing ran");

    // Once the instance has moved past the job, the next time it is not published again.
    sqlx::query("UPDATE instance SET step_seq = step_seq + 1 WHERE id = $1")
        .bind(id.0)
        .execute(store.pool())
        .await?;
    wait_until(
        "the stale job to be dropped",
        Duration::from_secs(30),
        || async { Ok((state().await?.0 == 0).then_some(())) },
    )
    .await?;
    shutdown.cancel();
    running.await??;
    env.cleanup().await;
    Ok(())
}
