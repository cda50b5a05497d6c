//! Fixtures the storage tests share: a store with a worker node, instances in the unlimited
//! `default` campaign, claims and completions.

use chrono::Utc;
use drover_core::{Fence, InstanceId, InstanceState, NodeId, StepSeq};
use drover_store::{Claimed, Completion, NewInstance, StepJob, Store, Transition};
use serde_json::json;
use sqlx::PgPool;

/// A store with workflows `parent` and `child` deployed and a live worker node.
pub(crate) async fn setup(pool: PgPool) -> (Store, NodeId) {
    setup_with(pool, &["parent", "child"]).await
}

/// A store with `workflows` deployed and a live worker node.
pub(crate) async fn setup_with(pool: PgPool, workflows: &[&str]) -> (Store, NodeId) {
    let store = Store::from_pool(pool);
    for &name in workflows {
        store
            .deploy_definition(name, &json!({ "name": name }), name)
            .await
            .expect("deploy");
    }
    let node = NodeId::new();
    store
        .register_node(&drover_store::NewNode::new(
            node,
            &["worker".to_owned()],
            "test",
            "0",
        ))
        .await
        .expect("register");
    (store, node)
}

pub(crate) async fn start(store: &Store, workflow: &str) -> InstanceId {
    let campaign = store
        .campaign_by_name("default")
        .await
        .expect("campaign")
        .expect("the default campaign exists");
    let id = InstanceId::new();
    store
        .create_instances(
            &[NewInstance {
                route: Default::default(),
                id,
                campaign: campaign.id,
                workflow: workflow.to_owned(),
                version: 1,
                entry_step: "a".to_owned(),
                allow_retry: true,
                timeout_ms: 30_000,
                vars: json!({}),
                announce_end: false,
            }],
            "test",
        )
        .await
        .expect("create");
    id
}

pub(crate) async fn claim(store: &Store, node: NodeId, job: StepJob) -> Claimed {
    let mut claimed = store
        .claim(node, std::slice::from_ref(&job))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "{job:?} claims");
    claimed.remove(0)
}

/// The kinds of the events written about `id`, in sequence order; panics unless they are
/// numbered 1, 2, 3, … without a gap.
pub(crate) async fn event_kinds(store: &Store, id: InstanceId) -> Vec<String> {
    let facts = store.instance_facts(id).await.expect("facts");
    let seqs: Vec<i64> = facts.iter().map(|f| f.seq).collect();
    let expected: Vec<i64> = (1..=facts.len() as i64).collect();
    assert_eq!(seqs, expected, "{id}'s events are numbered without gaps");
    facts.iter().map(|f| f.kind.as_str().to_owned()).collect()
}

pub(crate) fn completion(claimed: &Claimed, outcome: &str, transition: Transition) -> Completion {
    Completion::of(claimed, Utc::now(), outcome, transition)
}

pub(crate) fn wait(wake_at_ms: Option<i64>, event: Option<&str>) -> Transition {
    Transition::Wait {
        wake_at_ms,
        event: event.map(str::to_owned),
        child: None,
    }
}

pub(crate) async fn state(store: &Store, id: InstanceId) -> (InstanceState, StepSeq) {
    let instance = store
        .get_instance(id)
        .await
        .expect("get")
        .expect("the instance exists");
    (instance.state, instance.step_seq)
}

pub(crate) async fn journal_row(
    store: &Store,
    id: InstanceId,
    seq: i64,
) -> (String, String, Option<String>) {
    let journal = store.journal(id).await.expect("journal").expect("exists");
    let entry = journal
        .into_iter()
        .find(|e| e.step_seq == StepSeq(seq))
        .expect("the journal row exists");
    (
        entry.outcome,
        entry.transition.unwrap_or_default(),
        entry.actor,
    )
}

pub(crate) fn job(id: InstanceId, seq: i64, fence: i64) -> StepJob {
    StepJob {
        route: Default::default(),
        instance: id,
        step_seq: StepSeq(seq),
        fence: Fence(fence),
    }
}
