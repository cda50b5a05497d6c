//! The outbox purge: relayed events past the replay window go, in bounded batches; events
//! not relayed yet and recent ones stay.

use drover_store::Store;
use serde_json::json;
use sqlx::PgPool;

/// Adds `n` events relayed `ago` ago (`None`: not relayed).
async fn events(pool: &PgPool, n: i64, relayed_ago: Option<&str>) {
    sqlx::query(
        "INSERT INTO event_outbox (id, subject, payload, relayed_at)
         SELECT gen_random_uuid(), 'test.evt', $2, clock_timestamp() - $3::interval
         FROM generate_series(1, $1)",
    )
    .bind(n)
    .bind(json!({}))
    .bind(relayed_ago)
    .execute(pool)
    .await
    .expect("events added");
}

async fn count(pool: &PgPool, filter: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM event_outbox WHERE {filter}"))
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
