//! Operations' records: progress and cancel through the table, `interrupted` once the owning
//! node is gone, and finished ones pruned when a new one is created.

use drover_core::NodeId;
use drover_store::{NewNode, NewOperation, OperationEnd, Store};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const HOUR_MS: i64 = 3_600_000;

async fn node(store: &Store) -> NodeId {
    let id = NodeId::new();
    store
        .register_node(&NewNode::new(id, &["api".to_owned()], "test", "0"))
        .await
        .expect("registers");
    id
}

fn operation(owner: Option<NodeId>) -> NewOperation {
    NewOperation {
        id: Uuid::now_v7(),
        command: "pause".to_owned(),
        filter: json!({"campaign": "default"}),
        actor: "ada".to_owned(),
        progress: json!({"matched": 0}),
        owner,
    }
}

async fn state(store: &Store, id: Uuid) -> String {
    store
        .operation(id)
        .await
        .expect("reads")
        .expect("exists")
        .state
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn progress_cancel_and_end_go_through_the_record(pool: PgPool) {
    let store = Store::from_pool(pool);
    let owner = node(&store).await;
    let new = operation(Some(owner));
    assert_eq!(
        store
            .create_operation(&new, HOUR_MS)
            .await
            .expect("creates"),
        0
    );
    let read = store
        .operation(new.id)
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(
        (read.state.as_str(), read.owner, read.cancel_requested),
        ("running", Some(owner), false)
    );
    assert_eq!(read.filter, json!({"campaign": "default"}));
    assert!(
        store
            .operation(Uuid::now_v7())
            .await
            .expect("reads")
            .is_none()
    );

    // A progress write answers whether a cancel was asked for (by any node: the table).
    let again = node(&store).await;
    assert_eq!(
        store
            .operation_progress(new.id, &json!({"matched": 200}), Some(again))
            .await
            .expect("writes"),
        Some(false)
    );
    let read = store
        .operation(new.id)
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(read.progress, json!({"matched": 200}));
    assert_eq!(read.owner, Some(again), "moves to the node's new id");
    let cancelling = store
        .request_operation_cancel(new.id)
        .await
        .expect("cancels")
        .expect("exists");
    assert!(cancelling.cancel_requested);
    assert_eq!(
        store
            .operation_progress(new.id, &json!({"matched": 400}), None)
            .await
            .expect("writes"),
        Some(true)
    );
    store
        .finish_operation(new.id, OperationEnd::Cancelled, None, None)
        .await
        .expect("finishes");
    let read = store
        .operation(new.id)
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(read.state, "cancelled");
    assert_eq!(
        read.progress,
        json!({"matched": 400}),
        "keeps the last progress"
    );
    assert!(read.finished_at.is_some());
    assert_eq!(
        store
            .operation_progress(new.id, &json!({"matched": 600}), None)
            .await
            .expect("writes"),
        None,
        "an ended operation takes no more progress"
    );
    assert!(
        store
            .request_operation_cancel(Uuid::now_v7())
            .await
            .expect("reads")
            .is_none()
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_running_operation_whose_node_is_gone_reads_as_interrupted(pool: PgPool) {
    let store = Store::from_pool(pool);
    let (dies, leaves, drains) = (node(&store).await, node(&store).await, node(&store).await);
    let mut ids = Vec::new();
    for owner in [Some(dies), Some(leaves), Some(drains), None] {
        let new = operation(owner);
        store
            .create_operation(&new, HOUR_MS)
            .await
            .expect("creates");
        ids.push(new.id);
    }
    store.set_node_status(dies, "dead").await.expect("dies");
    store.set_node_status(leaves, "left").await.expect("leaves");
    store
        .set_node_status(drains, "draining")
        .await
        .expect("drains");
    assert_eq!(state(&store, ids[0]).await, "interrupted");
    assert_eq!(state(&store, ids[1]).await, "interrupted");
    assert_eq!(
        state(&store, ids[2]).await,
        "running",
        "a draining node still runs it"
    );
    assert_eq!(
        state(&store, ids[3]).await,
        "running",
        "no owner: not judged"
    );

    // A node pruned from the table is gone too.
    sqlx::query("DELETE FROM node WHERE id = $1")
        .bind(drains.0)
        .execute(store.pool())
        .await
        .expect("deletes the node row");
    assert_eq!(state(&store, ids[2]).await, "interrupted");

    // An ended one stays as it ended, whatever its node.
    store
        .finish_operation(
            ids[0],
            OperationEnd::Completed,
            Some(&json!({"matched": 3})),
            None,
        )
        .await
        .expect("finishes");
    assert_eq!(state(&store, ids[0]).await, "completed");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn creating_an_operation_prunes_those_ended_long_ago(pool: PgPool) {
    let store = Store::from_pool(pool);
    let live = node(&store).await;
    let dead = node(&store).await;
    let old_finished = operation(Some(live));
    let new_finished = operation(Some(live));
    let old_interrupted = operation(Some(dead));
    let old_running = operation(Some(live));
    for new in [&old_finished, &new_finished, &old_interrupted, &old_running] {
        store.create_operation(new, HOUR_MS).await.expect("creates");
    }
    for finished in [&old_finished, &new_finished] {
        store
            .finish_operation(finished.id, OperationEnd::Completed, None, None)
            .await
            .expect("finishes");
    }
    store.set_node_status(dead, "dead").await.expect("dies");
    sqlx::query(
        "UPDATE operation SET finished_at = finished_at - interval '2 hours' WHERE id = $1",
    )
    .bind(old_finished.id)
    .execute(store.pool())
    .await
    .expect("backdates");
    sqlx::query(
        "UPDATE operation SET updated_at = updated_at - interval '2 hours' WHERE id = ANY ($1)",
    )
    .bind(vec![old_interrupted.id, old_running.id])
    .execute(store.pool())
    .await
    .expect("backdates");

    let pruned = store
        .create_operation(&operation(Some(live)), HOUR_MS)
        .await
        .expect("creates");
    assert_eq!(
        pruned, 2,
        "the old finished one and the old interrupted one"
    );
    assert!(
        store
            .operation(old_finished.id)
            .await
            .expect("reads")
            .is_none()
    );
    assert!(
        store
            .operation(old_interrupted.id)
            .await
            .expect("reads")
            .is_none()
    );
    assert!(
        store
            .operation(new_finished.id)
            .await
            .expect("reads")
            .is_some()
    );
    assert!(
        store
            .operation(old_running.id)
            .await
            .expect("reads")
            .is_some(),
        "a slow operation of a live node is kept"
    );
    assert_eq!(store.prune_operations(HOUR_MS).await.expect("prunes"), 0);
}
