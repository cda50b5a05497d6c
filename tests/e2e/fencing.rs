//! Duplicate deliveries and stale fences commit nothing.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use drover_core::{Definition, Fence, InstanceId, InstanceState, NodeId, StepSeq};
use drover_store::{Commit, Completion, NewInstance, StepJob, Transition};
use drover_tests::{TestEnv, wait_until};
use serde_json::json;

use crate::support::{deploy, get, start, wait_jobs_drained};

const TWO_STEPS: &str = r#"
name: two
steps:
  - { id: a, kind: assign, set: { x: "vars.x + 1" }, next: [{ to: b }] }
  - { id: b, kind: end, status: completed }
vars: { x: 0 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_republished_under_new_ids_commit_nothing_twice() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, TWO_STEPS).await?;
    let id = start(api, "two", json!({}), 1).await?.remove(0);
    wait_until("completion", Duration::from_secs(20), || async {
        let (_, i) = get(&format!("{api}/v1/instances/{id}")).await?;
        Ok((i["state"] == "completed").then_some(()))
    })
    .await?;
    let (_, before) = get(&format!("{api}/v1/instances/{id}/journal")).await?;

    // Re-deliver both jobs the instance ever had, under fresh message ids (so JetStream does
    // not deduplicate them): the claims fail their compare-and-set and nothing is committed.
    let instance: InstanceId = id.parse()?;
    for (seq, fence) in [(0, 0), (1, 1), (0, 0)] {
        let job = StepJob::new(instance, StepSeq(seq), Fence(fence), Default::default());
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(drover_bus::encode_job(&job))
            .message_id(format!("dup-{}", uuid::Uuid::now_v7()));
        env.bus
            .jetstream()
            .send_publish(env.bus.subjects().job(&Default::default()), publish)
            .await?
            .await?;
    }
    wait_jobs_drained(&env).await?;
    let (_, after) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    assert_eq!(before, after, "the journal is unchanged");
    let (_, inst) = get(&format!("{api}/v1/instances/{id}")).await?;
    assert_eq!(inst["vars"]["x"], 1, "the assign ran once");
    assert_eq!(inst["step_seq"], 2);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_with_a_stale_fence_affects_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = &env.store;
    let def = Definition::parse(TWO_STEPS).map_err(|e| anyhow::anyhow!("{e}"))?;
    store
        .deploy_definition(&def.name, &def.to_json(), TWO_STEPS)
        .await?;
    let campaign = store
        .campaign_by_name("default")
        .await?
        .context("default campaign")?;
    let id = InstanceId::new();
    store
        .create_instances(
            &[NewInstance {
                route: Default::default(),
                id,
                campaign: campaign.id,
                workflow: "two".into(),
                version: 1,
                entry_step: "a".into(),
                allow_retry: true,
                timeout_ms: 30_000,
                vars: json!({ "x": 0 }),
                announce_end: false,
            }],
            "test",
        )
        .await?;
    let node = NodeId::new();
    store
        .register_node(&drover_store::NewNode::new(
            node,
            &["worker".into()],
            "test",
            "0",
        ))
        .await?;

    let job = StepJob {
        route: Default::default(),
        instance: id,
        step_seq: StepSeq(0),
        fence: Fence(0),
    };
    let claimed = store.claim(node, std::slice::from_ref(&job)).await?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].fence, Fence(1), "a claim bumps the fence");
    assert!(
        store.claim(node, &[job]).await?.is_empty(),
        "a second claim of the same job fails"
    );

    let completion = |fence: Fence| Completion {
        instance: id,
        fence,
        step_seq: StepSeq(0),
        step_id: "a".into(),
        attempt: 1,
        started_at: Utc::now(),
        outcome: "completed".into(),
        transition: Transition::Next {
            route: Default::default(),
            step: "b".into(),
            allow_retry: true,
            timeout_ms: 30_000,
        },
        vars: Some(json!({ "x": 1 })),
        output: Some(json!({ "x": 1 })),
        error: None,
        consumes: None,
        holds_permit: false,
        ends: None,
    };
    let other = NodeId::new();
    store
        .register_node(&drover_store::NewNode::new(
            other,
            &["worker".into()],
            "test",
            "0",
        ))
        .await?;
    assert_eq!(
        store.commit(node, &[completion(Fence(0))]).await?,
        vec![Commit::Fenced]
    );
    assert_eq!(
        store.commit(other, &[completion(Fence(1))]).await?,
        vec![Commit::Fenced],
        "only the owner commits"
    );
    let journal = store.journal(id).await?.context("journal")?;
    assert_eq!(journal.len(), 1, "stale commits journal nothing");
    let row = store.get_instance(id).await?.context("instance")?;
    assert_eq!(
        (row.state, row.step_seq, row.vars.clone()),
        (InstanceState::Running, StepSeq(0), json!({ "x": 0 }))
    );

    assert_eq!(
        store.commit(node, &[completion(Fence(1))]).await?,
        vec![Commit::Committed]
    );
    assert_eq!(
        store.commit(node, &[completion(Fence(1))]).await?,
        vec![Commit::AlreadyCommitted]
    );
    let journal = store.journal(id).await?.context("journal")?;
    assert_eq!(
        journal.iter().map(|e| e.step_seq.0).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let row = store.get_instance(id).await?.context("instance")?;
    assert_eq!(
        (row.state, row.step_seq, row.current_step.as_str()),
        (InstanceState::Ready, StepSeq(1), "b")
    );
    env.cleanup().await;
    Ok(())
}
