//! The outbox purge: relayed events past the replay window go, in bounded batches; events
//! not relayed yet and recent ones stay.

use drover_store::Store;
use serde_json::json;
use sqlx::PgPool;

/// Adds `n` events relayed `ago` ago (`None`: not relayed).
async fn events(pool: &PgPool, n: i64, relayed_ago: Option<&str>) {
    sqlx::query(
        "INSERT INTO event_fact (id, campaign, seq, kind, data, relayed_at)
         SELECT gen_random_uuid(), 'test', s, 'permit_drift', $2,
                clock_timestamp() - $3::interval
         FROM generate_series(1, $1) AS s",
    )
    .bind(n)
    .bind(json!({}))
    .bind(relayed_ago)
    .execute(pool)
    .await
    .expect("events added");
}

async fn count(pool: &PgPool, filter: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM event_fact WHERE {filter}"))
        .fetch_one(pool)
        .await
        .expect("counted");
    n
}

#[sqlx::test]
async fn relayed_events_past_the_window_are_purged_in_bounded_batches(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    events(&pool, 25, Some("2 hours")).await;
    events(&pool, 4, Some("1 minute")).await;
    events(&pool, 3, None).await;
    let hour_ms = 3_600_000;

    assert_eq!(store.purge_relayed(hour_ms, 10).await.expect("purged"), 10);
    assert_eq!(store.purge_relayed(hour_ms, 10).await.expect("purged"), 10);
    assert_eq!(store.purge_relayed(hour_ms, 10).await.expect("purged"), 5);
    assert_eq!(store.purge_relayed(hour_ms, 10).await.expect("purged"), 0);

    assert_eq!(
        count(&pool, "relayed_at IS NOT NULL").await,
        4,
        "recent ones stay"
    );
    assert_eq!(
        count(&pool, "relayed_at IS NULL").await,
        3,
        "unrelayed ones stay"
    );
    assert_eq!(store.pending_events().await.expect("counted"), 3);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn an_instances_events_are_numbered_from_one_in_commit_order(pool: PgPool) {
    use crate::support::*;
    use drover_core::{Fence, StepSeq};
    use drover_store::{StepJob, Transition};

    let (store, node) = setup(pool).await;
    let id = start(&store, "parent").await;
    let job = |seq, fence| StepJob {
        instance: id,
        step_seq: StepSeq(seq),
        fence: Fence(fence),
        route: Default::default(),
    };
    let first = claim(&store, node, job(0, 0)).await;
    let next = Transition::Next {
        step: "b".into(),
        allow_retry: true,
        timeout_ms: 30_000,
        route: Default::default(),
    };
    store
        .commit(
            node,
            &[completion(
                &first,
                "retry",
                Transition::Retry { delay_ms: 0 },
            )],
        )
        .await
        .expect("commit");
    let second = claim(&store, node, job(1, 1)).await;
    store
        .commit(node, &[completion(&second, "completed", next)])
        .await
        .expect("commit");
    let third = claim(&store, node, job(2, 2)).await;
    let end = Transition::Stop {
        state: drover_core::InstanceState::Completed,
    };
    store
        .commit(node, &[completion(&third, "completed", end)])
        .await
        .expect("commit");
    assert_eq!(
        event_kinds(&store, id).await,
        [
            "started",
            "step_retry",
            "step_completed",
            "step_completed",
            "completed"
        ]
    );
    let facts = store.instance_facts(id).await.expect("facts");
    assert_eq!(facts[2].data["step"], "a");
    assert_eq!(facts[2].data["next_step"], "b");
    assert_eq!(facts[4].data["state"], "completed");
    assert!(facts.windows(2).all(|w| w[0].time <= w[1].time));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn the_relay_partitions_are_shared_fairly_among_the_alive_nodes(pool: PgPool) {
    let store = Store::from_pool(pool);
    for _ in 0..3 {
        store
            .register_node(&drover_store::NewNode::new(
                drover_core::NodeId::new(),
                &["worker".to_owned()],
                "test",
                "0",
            ))
            .await
            .expect("register");
    }
    let relays: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    let mut held = Vec::new();
    // Two rounds: the first comers take a share, the last takes what is left.
    for _ in 0..2 {
        held.clear();
        for &relay in &relays {
            held.push(store.lease_relay_parts(relay).await.expect("leases"));
        }
    }
    let mut all: Vec<i16> = held.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..16).collect::<Vec<i16>>(),
        "each partition held once: {held:?}"
    );
    assert!(held.iter().all(|parts| parts.len() <= 6), "{held:?}");

    // A relay that stops gives its partitions back; the others take them up (past their
    // share only once nobody has held them for two leases).
    store
        .release_relay_parts(relays[0])
        .await
        .expect("released");
    let after = store.lease_relay_parts(relays[1]).await.expect("leases");
    assert!(after.len() >= held[1].len(), "{after:?}");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn the_commit_that_ends_an_instance_announces_it_only_if_someone_waits(pool: PgPool) {
    use crate::support::*;
    use drover_core::{Fence, InstanceState, StepSeq};
    use drover_store::{LifecycleAction, NewInstance, StepJob, Transition};

    let (store, node) = setup(pool).await;
    let mut listener = store.listen_instance_ends().await.expect("listens");
    let campaign = store
        .campaign_by_name("default")
        .await
        .expect("campaign")
        .expect("default");
    let new = |announce_end| NewInstance {
        id: drover_core::InstanceId::new(),
        campaign: campaign.id,
        workflow: "parent".into(),
        version: 1,
        entry_step: "a".into(),
        allow_retry: true,
        timeout_ms: 30_000,
        vars: json!({}),
        route: Default::default(),
        announce_end,
    };
    let (quiet, waited, killed) = (new(false), new(true), new(true));
    store
        .create_instances(&[quiet.clone(), waited.clone(), killed.clone()], "test")
        .await
        .expect("created");
    let end = Transition::Stop {
        state: InstanceState::Completed,
    };
    for instance in [&quiet, &waited] {
        let claimed = claim(
            &store,
            node,
            StepJob {
                instance: instance.id,
                step_seq: StepSeq(0),
                fence: Fence(0),
                route: Default::default(),
            },
        )
        .await;
        store
            .commit(node, &[completion(&claimed, "completed", end.clone())])
            .await
            .expect("commit");
    }
    store
        .apply_lifecycle(LifecycleAction::Kill, &[killed.id], "ada")
        .await
        .expect("killed");
    let first = listener.next().await.expect("announced");
    let second = listener.next().await.expect("announced");
    assert_eq!(
        [first, second],
        [Some(waited.id), Some(killed.id)],
        "announced in commit order, the unwaited one not at all"
    );
}
