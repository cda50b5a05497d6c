//! The liveness lock: a node whose process is gone is declared dead once its heartbeat is a
//! little late; one that holds its lock, or never took one, only after the full silence.

use drover_core::NodeId;
use drover_store::{COORDINATOR_LEASE, NewNode, Store};
use sqlx::PgPool;

async fn node(store: &Store) -> NodeId {
    let id = NodeId::new();
    store
        .register_node(&NewNode::new(id, &["worker".to_owned()], "test", "0"))
        .await
        .expect("registers");
    id
}

/// Makes `node`'s last heartbeat `ms` old.
async fn heartbeat_ago(store: &Store, node: NodeId, ms: i64) {
    sqlx::query(
        "UPDATE node SET heartbeat_at = clock_timestamp() - $2 * interval '1 millisecond'
         WHERE id = $1",
    )
    .bind(node.0)
    .bind(ms)
    .execute(store.pool())
    .await
    .expect("backdates");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_node_whose_liveness_lock_is_released_is_declared_dead_before_its_silence_lapses(
    pool: PgPool,
) {
    let store = Store::from_pool(pool);
    let leader = node(&store).await;
    let term = store
        .acquire_lease(COORDINATOR_LEASE, leader, 10_000)
        .await
        .expect("acquires")
        .expect("the lease is free");
    let (silence, gone) = (60_000, 500);

    let killed = node(&store).await;
    let frozen = node(&store).await;
    let busy = node(&store).await;
    let old_version = node(&store).await;
    let killed_lock = store.hold_liveness(killed).await.expect("locks");
    let _frozen_lock = store.hold_liveness(frozen).await.expect("locks");
    let busy_lock = store.hold_liveness(busy).await.expect("locks");
    assert!(
        matches!(
            store.hold_liveness(killed).await,
            Err(drover_store::Error::LivenessHeld(id)) if id == killed
        ),
        "a lock is held by one session only"
    );
    for late in [killed, frozen, old_version] {
        heartbeat_ago(&store, late, 2_000).await;
    }
    let declared = store
        .declare_dead_nodes(leader, term, silence, gone)
        .await
        .expect("declares");
    assert!(declared.is_empty(), "every lock is held: {declared:?}");

    // The killed process's session ends; the busy one loses its lock connection but keeps
    // heartbeating.
    killed_lock.release().await;
    busy_lock.release().await;
    heartbeat_ago(&store, busy, 0).await;
    let declared = store
        .declare_dead_nodes(leader, term, silence, gone)
        .await
        .expect("declares");
    assert_eq!(declared, vec![killed]);

    // The rest go only once their silence lapses.
    for node in [frozen, busy, old_version] {
        heartbeat_ago(&store, node, silence + 1).await;
    }
    let mut declared = store
        .declare_dead_nodes(leader, term, silence, gone)
        .await
        .expect("declares");
    declared.sort();
    let mut expected = vec![frozen, busy, old_version];
    expected.sort();
    assert_eq!(declared, expected);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_node_that_left_is_gone_at_once_its_instances_are_taken_back_and_its_row_pruned_later(
    pool: PgPool,
) {
    let (store, node) = crate::support::setup(pool).await;
    let leader = self::node(&store).await;
    let term = store
        .acquire_lease(COORDINATOR_LEASE, leader, 10_000)
        .await
        .expect("acquires")
        .expect("the lease is free");
    let id = crate::support::start(&store, "parent").await;
    let claimed = crate::support::claim(&store, node, crate::support::job(id, 0, 0)).await;

    store.set_node_status(node, "left").await.expect("leaves");
    assert_eq!(
        store.heartbeat(node, 0, 0).await.expect("beats"),
        drover_store::Heartbeat::Dead,
        "a node that left takes no more work"
    );
    assert!(
        store
            .declare_dead_nodes(leader, term, 60_000, 0)
            .await
            .expect("declares")
            .iter()
            .all(|n| *n != node),
        "a node that left is not declared dead"
    );
    // Its late commit is refused, and what it still ran is taken back.
    let late = store
        .commit(
            node,
            &[crate::support::completion(
                &claimed,
                "completed",
                crate::support::wait(None, Some("never")),
            )],
        )
        .await
        .expect("answers");
    assert!(late == vec![drover_store::Commit::Fenced], "{late:?}");
    assert_eq!(
        store.dead_nodes_with_orphans().await.expect("reads"),
        vec![node]
    );
    let requeued = store
        .requeue_orphans(node, leader, 10)
        .await
        .expect("requeues");
    assert_eq!(
        requeued.orphans.iter().map(|o| o.id).collect::<Vec<_>>(),
        vec![id]
    );

    // Pruned once past the retention, not before; live nodes never.
    assert_eq!(store.prune_nodes(60_000, 100).await.expect("prunes"), 0);
    assert_eq!(store.prune_nodes(0, 100).await.expect("prunes"), 1);
    let left: Vec<NodeId> = store
        .list_nodes()
        .await
        .expect("lists")
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert!(!left.contains(&node) && left.contains(&leader), "{left:?}");
}
