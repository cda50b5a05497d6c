//! Retention cleanup and the paused-too-long check (the technical workflows' SQL).

use std::collections::HashSet;
use std::time::Duration;

use drover_core::{InstanceId, Severity};
use drover_store::{LifecycleAction, PausedAction, Restart, Store};
use serde_json::json;
use sqlx::PgPool;

use crate::support::{setup, start};

const DAY: Duration = Duration::from_secs(86_400);

async fn kill(store: &Store, ids: &[InstanceId]) {
    store
        .apply_lifecycle(LifecycleAction::Kill, ids, "ada")
        .await
        .expect("kill");
}

/// Moves `ids`' finish (and their pause) `days` into the past.
async fn age(pool: &PgPool, ids: &[InstanceId], days: i64) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    sqlx::query(
        "UPDATE instance SET finished_at = finished_at - $2 * interval '1 day',
                             paused_at = paused_at - $2 * interval '1 day'
         WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(days)
    .execute(pool)
    .await
    .expect("age");
}

async fn exists(pool: &PgPool, id: InstanceId) -> bool {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE id = $1")
        .bind(id.0)
        .fetch_one(pool)
        .await
        .expect("count");
    n == 1
}

async fn count(pool: &PgPool, sql: &str, ids: &[InstanceId]) -> i64 {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    let (n,): (i64,) = sqlx::query_as(sql)
        .bind(&ids)
        .fetch_one(pool)
        .await
        .expect("count");
    n
}

/// Runs batches of `limit` over the default campaign until it has no more; answers the
/// batches' deletions.
async fn sweep(store: &Store, retention: Duration, limit: i64) -> Vec<u64> {
    let campaign = store
        .campaign_retentions()
        .await
        .expect("campaigns")
        .into_iter()
        .find(|c| c.name == "default")
        .expect("the default campaign");
    let retention = campaign.retention.unwrap_or(retention);
    let mut cursor = None;
    let mut deleted = Vec::new();
    loop {
        let batch = store
            .delete_finished_batch(campaign.id, retention, cursor, limit)
            .await
            .expect("batch");
        assert!(batch.instances <= u64::try_from(limit).expect("a limit"));
        deleted.push(batch.instances);
        if batch.scanned < u64::try_from(limit).expect("a limit") {
            return deleted;
        }
        cursor = batch.cursor;
    }
}

#[sqlx::test]
async fn cleanup_deletes_only_finished_instances_past_retention_in_batches(pool: PgPool) {
    let (store, _node) = setup(pool.clone()).await;
    let mut old = Vec::new();
    for _ in 0..12 {
        old.push(start(&store, "parent").await);
    }
    let recent = start(&store, "parent").await;
    let live = start(&store, "parent").await;
    let in_error = start(&store, "parent").await;
    // A family: an old finished parent with a live child stays; one with an old finished
    // child goes with it.
    let (kept_parent, live_child) = (start(&store, "parent").await, start(&store, "child").await);
    let (gone_parent, gone_child) = (start(&store, "parent").await, start(&store, "child").await);
    for (parent, child) in [(kept_parent, live_child), (gone_parent, gone_child)] {
        sqlx::query("UPDATE instance SET parent_instance_id = $1 WHERE id = $2")
            .bind(parent.0)
            .bind(child.0)
            .execute(&pool)
            .await
            .expect("link");
    }
    let mut finished = old.clone();
    finished.extend([recent, kept_parent, gone_parent, gone_child]);
    kill(&store, &finished).await;
    let mut aged = old.clone();
    aged.extend([kept_parent, gone_parent, gone_child]);
    age(&pool, &aged, 40).await;
    // In error for 40 days, live for 40 days: never deleted.
    sqlx::query(
        "UPDATE instance SET state = 'in_error', updated_at = updated_at - interval '40 days',
                             finished_at = clock_timestamp() - interval '40 days'
         WHERE id = $1",
    )
    .bind(in_error.0)
    .execute(&pool)
    .await
    .expect("in_error");
    sqlx::query("UPDATE instance SET created_at = created_at - interval '40 days' WHERE id = $1")
        .bind(live.0)
        .execute(&pool)
        .await
        .expect("old live");
    // An old instance restarted (the restart is live): it stays while its restart does.
    let restarted = old.pop().expect("one");
    store
        .restart(
            &[Restart {
                from: restarted,
                id: InstanceId::new(),
                entry_step: "a".into(),
                allow_retry: true,
                timeout_ms: 30_000,
                route: Default::default(),
            }],
            "ada",
        )
        .await
        .expect("restart");
    sqlx::query("UPDATE event_fact SET relayed_at = clock_timestamp()")
        .execute(&pool)
        .await
        .expect("relayed");
    let mut doomed = old.clone();
    doomed.extend([gone_parent, gone_child]);
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM journal WHERE instance_id = ANY($1)",
            &doomed
        )
        .await
            > 0
    );

    // The campaign keeps its instances 50 days: nothing is old enough.
    store
        .set_campaign_retention("default", Some(50 * DAY), "ada")
        .await
        .expect("retention");
    assert_eq!(sweep(&store, 30 * DAY, 4).await.iter().sum::<u64>(), 0);
    for &id in &doomed {
        assert!(
            exists(&pool, id).await,
            "{id} is within the campaign's retention"
        );
    }

    // Back to the default of 30 days: batches of at most 4 delete the 13 old ones.
    store
        .set_campaign_retention("default", None, "ada")
        .await
        .expect("retention");
    let batches = sweep(&store, 30 * DAY, 4).await;
    assert_eq!(
        batches.iter().sum::<u64>(),
        doomed.len() as u64,
        "{batches:?}"
    );
    assert!(batches.len() >= 4, "in batches: {batches:?}");
    for &id in &doomed {
        assert!(!exists(&pool, id).await, "{id} is past retention");
    }
    for id in [recent, live, in_error, kept_parent, live_child, restarted] {
        assert!(exists(&pool, id).await, "{id} must stay");
    }
    for table in ["journal", "event_fact", "instance_signal"] {
        let sql = format!("SELECT count(*) FROM {table} WHERE instance_id = ANY($1)");
        assert_eq!(
            count(&pool, &sql, &doomed).await,
            0,
            "{table} rows of deleted instances"
        );
    }
    assert!(
        count(
            &pool,
            "SELECT count(*) FROM journal WHERE instance_id = ANY($1)",
            &[recent]
        )
        .await
            > 0
    );
    // Audited.
    let (audits,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit WHERE action = 'campaign.set_retention' AND target = 'default'",
    )
    .fetch_one(&pool)
    .await
    .expect("audit");
    assert_eq!(audits, 2);
    // Nothing left to do.
    assert_eq!(sweep(&store, 30 * DAY, 4).await.iter().sum::<u64>(), 0);
}

#[sqlx::test]
async fn paused_instances_are_found_with_their_severity_and_warned_once_per_check(pool: PgPool) {
    let (store, _node) = setup(pool.clone()).await;
    store
        .deploy_definition(
            "vital",
            &json!({ "name": "vital", "severity": "critical" }),
            "vital",
        )
        .await
        .expect("deploy");
    let normal = start(&store, "parent").await;
    let critical = start(&store, "vital").await;
    let fresh = start(&store, "parent").await;
    store
        .apply_lifecycle(LifecycleAction::Pause, &[normal, critical, fresh], "ada")
        .await
        .expect("pause");
    age(&pool, &[normal, critical], 40).await;

    let found = store
        .paused_longer_than(7 * DAY, None, 100)
        .await
        .expect("paused");
    let ids: HashSet<InstanceId> = found.iter().map(|p| p.id).collect();
    assert_eq!(ids, HashSet::from([normal, critical]));
    let severity = |id| found.iter().find(|p| p.id == id).map(|p| p.severity);
    assert_eq!(severity(normal), Some(Severity::Normal));
    assert_eq!(severity(critical), Some(Severity::Critical));
    assert!(found.iter().all(|p| p.paused_for >= 39 * DAY));

    let actions: Vec<_> = found
        .into_iter()
        .map(|p| {
            let action = if p.severity == Severity::Normal {
                PausedAction::Stop
            } else {
                PausedAction::Warn
            };
            (p, action)
        })
        .collect();
    let written = store
        .record_paused_too_long(
            &actions,
            "paused longer than 30d",
            "system-paused-instances",
        )
        .await
        .expect("record");
    assert_eq!(written.len(), 2);
    for id in [normal, critical] {
        let kinds = crate::support::event_kinds(&store, id).await;
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("paused_too_long"),
            "{kinds:?}"
        );
    }
    let facts = store.instance_facts(normal).await.expect("facts");
    let last = facts.last().expect("a fact");
    assert_eq!(last.data["action"], "stop");
    assert_eq!(last.data["severity"], "normal");
    let (audits,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit WHERE action = 'instance.paused_too_long'")
            .fetch_one(&pool)
            .await
            .expect("audit");
    assert_eq!(audits, 2);
    // An instance unpaused since it was read is left alone.
    store
        .apply_lifecycle(LifecycleAction::Unpause, &[critical], "ada")
        .await
        .expect("unpause");
    let written = store
        .record_paused_too_long(
            &actions,
            "paused longer than 30d",
            "system-paused-instances",
        )
        .await
        .expect("record");
    assert_eq!(written, vec![normal]);
}
