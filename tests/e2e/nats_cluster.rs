//! Drover on a replicated NATS cluster: three servers, every stream with three copies, the
//! jobs stream's leader killed mid-run and started again.

use std::time::Duration;

use drover_tests::{EventReader, NatsCluster, NodeProcess, TestEnv, wait_until};
use serde_json::json;

use crate::support::{deploy, start, wait_settled};

/// Four rounds of a 50 ms handler step and a count.
const ROUNDS: &str = r#"
name: rounds
vars: { i: 0 }
steps:
  - { id: work, kind: handler, handler: slow, input: { ms: "50" }, next: [{ to: count }] }
  - { id: count, kind: assign, set: { i: "vars.i + 1" }, next: [{ to: work, when: "vars.i < 4" }, { to: done }] }
  - { id: done, kind: end, status: completed }
"#;

async fn completed_steps(env: &TestEnv) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM journal WHERE outcome = 'completed'")
        .fetch_one(env.store.pool())
        .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_of_three_killed_and_restarted_mid_run_loses_no_instance()
-> anyhow::Result<()> {
    const INSTANCES: i64 = 300;
    let mut cluster = NatsCluster::start(3).await?;
    let env = TestEnv::on_cluster(&cluster, 3).await?;
    let info = env
        .bus
        .jetstream()
        .get_stream(&env.bus.subjects().jobs_stream())
        .await?
        .info()
        .await?
        .clone();
    assert_eq!(
        info.config.num_replicas, 3,
        "the jobs stream keeps three copies"
    );
    // The server leading the jobs stream is the one to kill: the hardest case.
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .and_then(|name| name.strip_prefix('n')?.parse::<usize>().ok())
        .unwrap_or(1);

    let coordinator = env.spawn_node("coordinator,api").await?;
    let mut nodes: Vec<NodeProcess> = vec![
        env.spawn_node("worker").await?,
        env.spawn_node("worker").await?,
    ];
    let api = coordinator.api().to_owned();
    deploy(&api, ROUNDS).await?;
    start(&api, "rounds", json!({}), INSTANCES as u32).await?;
    // Each instance commits 9 steps; kill a server a third of the way in.
    let total = 9 * INSTANCES;
    wait_until("a third of the steps", Duration::from_secs(60), || async {
        Ok((completed_steps(&env).await? >= total / 3).then_some(()))
    })
    .await?;
    cluster.kill(leader).await?;
    let killed_at = completed_steps(&env).await?;
    wait_until(
        "steps to go on while a server is down",
        Duration::from_secs(30),
        || async { Ok((completed_steps(&env).await? >= killed_at + 300).then_some(())) },
    )
    .await
    .map_err(|err| anyhow::anyhow!("{err}\n{}", cluster.logs()))?;
    cluster.restart(leader).await?;

    let states = wait_settled(&env, INSTANCES, Duration::from_secs(120)).await?;
    assert_eq!(states, vec![("completed".to_owned(), INSTANCES)]);
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT step_id, count(*) FROM journal WHERE outcome = 'completed'
         GROUP BY step_id ORDER BY 1",
    )
    .fetch_all(env.store.pool())
    .await?;
    assert_eq!(
        rows,
        vec![
            ("count".to_owned(), 4 * INSTANCES),
            ("done".to_owned(), INSTANCES),
            ("work".to_owned(), 4 * INSTANCES),
        ],
        "every step committed once per round"
    );
    // The restarted server catches up; the events stream can be read from its start again
    // (as the harness does at cleanup: its info may answer before a consumer can be made)
    // before the harness reads it back.
    wait_until(
        "the events stream to be readable after the restart",
        Duration::from_secs(60),
        || async { Ok(EventReader::open(&env.bus).await.ok().map(|_| ())) },
    )
    .await?;
    nodes.push(coordinator);
    for node in &mut nodes {
        assert!(
            node.is_running(),
            "node {} exited; log: {}",
            node.id,
            node.log.display()
        );
    }
    env.cleanup().await;
    Ok(())
}
