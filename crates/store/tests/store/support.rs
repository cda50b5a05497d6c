//! Fixtures the storage tests share: a store with a worker node, instances in the unlimited
//! `default` campaign, claims and completions.

use chrono::Utc;
use drover_core::{Fence, InstanceId, InstanceState, NodeId, OutboxEvent, StepSeq};
use drover_store::{
    ClaimRequest, Claimed, Completion, NewInstance, PermitEvent, Store, Transition,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

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
            }],
            "test",
            &[],
            &permits,
        )
        .await
        .expect("create");
    id
}

pub(crate) async fn claim(store: &Store, node: NodeId, job: ClaimRequest) -> Claimed {
    let mut claimed = store
        .claim(node, std::slice::from_ref(&job))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "{job:?} claims");
    claimed.remove(0)
}

/// The events of permit changes (none happen in the unlimited `default` campaign).
pub(crate) fn permits(e: &PermitEvent<'_>) -> OutboxEvent {
    event(&format!("permit.{:?}", e.kind))
}

pub(crate) fn event(tag: &str) -> OutboxEvent {
    OutboxEvent {
        id: Uuid::now_v7(),
        subject: format!("test.{tag}"),
        payload: json!({ "tag": tag }),
    }
}

pub(crate) fn completion(claimed: &Claimed, outcome: &str, transition: Transition) -> Completion {
    Completion {
        events: vec![event(outcome)],
        ..Completion::of(claimed, Utc::now(), outcome, transition)
    }
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

pub(crate) fn job(id: InstanceId, seq: i64, fence: i64) -> ClaimRequest {
    ClaimRequest {
        route: Default::default(),
        instance: id,
        step_seq: StepSeq(seq),
        fence: Fence(fence),
    }
}
