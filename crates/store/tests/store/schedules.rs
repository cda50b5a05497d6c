//! Schedules: one instance per fire time, missed fires caught up inside the window and
//! recorded skipped beyond it, overlap policies, manual fires, and leader fencing.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use drover_core::schedule::{FireOutcome, OverlapPolicy};
use drover_core::{InstanceId, NodeId};
use drover_store::{
    COORDINATOR_LEASE, CadenceSpec, LeaderTerm, LifecycleAction, NewNode, NewSchedule, Store,
};
use serde_json::json;
use sqlx::PgPool;

async fn setup(pool: PgPool) -> (Store, NodeId, LeaderTerm) {
    let store = Store::from_pool(pool);
    let body = json!({ "name": "tick", "steps": [
        { "id": "a", "kind": "assign", "set": { "n": "1" }, "next": [{ "to": "done" }] },
        { "id": "done", "kind": "end", "status": "completed" },
    ]});
    store
        .deploy_definition("tick", &body, "tick")
        .await
        .expect("deploys");
    let leader = NodeId::new();
    store
        .register_node(&NewNode::new(
            leader,
            &["coordinator".to_owned()],
            "test",
            "0",
        ))
        .await
        .expect("registers");
    let term = store
        .acquire_lease(COORDINATOR_LEASE, leader, 30_000)
        .await
        .expect("acquires")
        .expect("the lease is free");
    (store, leader, term)
}

fn every_second(name: &str, overlap: OverlapPolicy, catchup: Duration) -> NewSchedule {
    NewSchedule {
        name: name.to_owned(),
        workflow: "tick".to_owned(),
        campaign: "default".to_owned(),
        vars: json!({ "from": "schedule" }),
        cadence: CadenceSpec::Every(Duration::from_secs(1)),
        overlap,
        catchup_window: catchup,
        jitter: Duration::ZERO,
        start_at: None,
        end_at: None,
    }
}

/// Makes schedule `name` owe its fires since `secs` seconds ago, as after a downtime.
async fn owe_since(store: &Store, name: &str, secs: i64) -> DateTime<Utc> {
    let (at,): (DateTime<Utc>,) = sqlx::query_as(
        "UPDATE schedule SET next_fire_at = date_trunc('second', clock_timestamp())
                                            - $2 * interval '1 second',
                             next_due_at = date_trunc('second', clock_timestamp())
                                           - $2 * interval '1 second'
         WHERE name = $1 RETURNING next_fire_at",
    )
    .bind(name)
    .bind(secs)
    .fetch_one(store.pool())
    .await
    .expect("updates");
    at
}

async fn fires(store: &Store, name: &str) -> Vec<drover_store::ScheduleFire> {
    let mut fires = store.schedule_fires(name, 1_000).await.expect("fires");
    fires.reverse();
    fires
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn missed_fires_inside_the_window_run_once_each_and_older_ones_are_skipped(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    store
        .create_schedule(
            &every_second("s", OverlapPolicy::AllowAll, Duration::from_secs(4)),
            "op",
        )
        .await
        .expect("creates");
    let first = owe_since(&store, "s", 10).await;

    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert!(pass.skipped >= 5, "{pass:?}");
    assert!(pass.fired >= 4, "{pass:?}");
    assert_eq!(pass.ready.len(), pass.fired);

    let fires = fires(&store, "s").await;
    for (i, fire) in fires.iter().enumerate() {
        assert_eq!(
            fire.fire_at,
            first + TimeDelta::seconds(i as i64),
            "unbroken"
        );
    }
    let newest = fires.last().expect("fires").fire_at;
    let mut instances = std::collections::BTreeSet::new();
    for fire in &fires {
        let age = newest - fire.fire_at;
        match fire.outcome {
            FireOutcome::Skipped => {
                assert_eq!(fire.reason, "missed");
                assert!(
                    age >= TimeDelta::seconds(3),
                    "{fire:?} was inside the window"
                );
            }
            FireOutcome::Fired => {
                assert!(
                    age <= TimeDelta::seconds(5),
                    "{fire:?} was beyond the window"
                );
                let id = fire.instance.expect("a fired fire has its instance");
                assert!(instances.insert(id), "one instance per fire");
                let kinds: Vec<String> = store
                    .instance_facts(id)
                    .await
                    .expect("facts")
                    .iter()
                    .map(|f| f.kind.to_string())
                    .collect();
                assert_eq!(kinds, ["started", "schedule_fired"]);
                let instance = store
                    .get_instance(id)
                    .await
                    .expect("reads")
                    .expect("exists");
                assert_eq!(instance.vars["from"], "schedule");
            }
            FireOutcome::Buffered => panic!("allow_all never buffers"),
        }
    }

    // A second pass (another coordinator, or a restart) fires nothing again.
    let again = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert!(again.fired <= 1 && again.skipped == 0, "{again:?}");
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT instance_id) FROM schedule_fire WHERE outcome = 'fired'",
    )
    .fetch_one(store.pool())
    .await
    .expect("counts");
    assert_eq!(rows, distinct);
    let (instances,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance")
        .fetch_one(store.pool())
        .await
        .expect("counts");
    assert_eq!(
        instances, rows,
        "every instance belongs to exactly one fire"
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn concurrent_passes_never_fire_a_time_twice(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    for name in ["a", "b", "c"] {
        store
            .create_schedule(
                &every_second(name, OverlapPolicy::AllowAll, Duration::from_secs(60)),
                "op",
            )
            .await
            .expect("creates");
        owe_since(&store, name, 20).await;
    }
    let pass = || store.fire_due_schedules(leader, term, 1_000);
    let (p1, p2, p3, p4) = tokio::join!(pass(), pass(), pass(), pass());
    let fired: usize = [p1, p2, p3, p4]
        .into_iter()
        .map(|p| p.expect("fires").fired)
        .sum();
    let (rows, distinct, instances): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM schedule_fire), \
                (SELECT count(DISTINCT (schedule_id, fire_at)) FROM schedule_fire), \
                (SELECT count(*) FROM instance)",
    )
    .fetch_one(store.pool())
    .await
    .expect("counts");
    assert_eq!(rows, distinct);
    assert_eq!(instances as usize, fired);
    assert!(instances >= 60, "{instances}");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_stale_term_fires_nothing(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    store
        .create_schedule(
            &every_second("s", OverlapPolicy::AllowAll, Duration::from_secs(60)),
            "op",
        )
        .await
        .expect("creates");
    owe_since(&store, "s", 3).await;
    let stale = LeaderTerm(term.0 - 1);
    let pass = store
        .fire_due_schedules(leader, stale, 100)
        .await
        .expect("runs");
    assert_eq!(pass.fired + pass.skipped, 0);
    assert!(fires(&store, "s").await.is_empty());
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_paused_schedule_does_not_fire_and_unpausing_resumes_from_now(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    store
        .create_schedule(
            &every_second("s", OverlapPolicy::AllowAll, Duration::from_secs(60)),
            "op",
        )
        .await
        .expect("creates");
    let paused = store
        .set_schedule_paused("s", true, Some("maintenance"), "op")
        .await
        .expect("pauses")
        .expect("exists");
    assert!(paused.paused);
    assert_eq!(paused.note.as_deref(), Some("maintenance"));
    let owed = owe_since(&store, "s", 5).await;
    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("runs");
    assert_eq!(pass.fired + pass.skipped, 0);
    let unpaused = store
        .set_schedule_paused("s", false, None, "op")
        .await
        .expect("unpauses")
        .expect("exists");
    assert!(unpaused.next_fire_at.expect("fires again") > owed + TimeDelta::seconds(4));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn skip_records_fires_while_a_run_is_live(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    store
        .create_schedule(
            &every_second("s", OverlapPolicy::Skip, Duration::from_secs(60)),
            "op",
        )
        .await
        .expect("creates");
    owe_since(&store, "s", 3).await;
    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert_eq!(pass.fired, 1, "{pass:?}");
    let fires = fires(&store, "s").await;
    assert_eq!(fires[0].outcome, FireOutcome::Fired);
    for fire in &fires[1..] {
        assert_eq!(
            (fire.outcome, fire.reason.as_str()),
            (FireOutcome::Skipped, "overlap")
        );
    }
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn buffer_one_starts_one_waiting_fire_when_the_live_run_ends(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    store
        .create_schedule(
            &every_second("s", OverlapPolicy::BufferOne, Duration::from_secs(60)),
            "op",
        )
        .await
        .expect("creates");
    owe_since(&store, "s", 3).await;
    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert_eq!((pass.fired, pass.buffered), (1, 1), "{pass:?}");
    let fires_now = fires(&store, "s").await;
    assert_eq!(fires_now[1].outcome, FireOutcome::Buffered);
    assert!(
        fires_now[2..]
            .iter()
            .all(|f| f.outcome == FireOutcome::Skipped)
    );
    let live = fires_now[0].instance.expect("fired");

    // Still live: the buffered fire waits.
    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert_eq!(pass.fired, 0, "{pass:?}");
    store
        .apply_lifecycle(LifecycleAction::Kill, &[live], "ada")
        .await
        .expect("kills");
    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert!(pass.fired >= 1, "{pass:?}");
    let buffered = fires(&store, "s").await.remove(1);
    assert_eq!(
        (buffered.outcome, buffered.reason.as_str()),
        (FireOutcome::Fired, "buffered")
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn cancel_and_terminate_other_name_the_live_runs(pool: PgPool) {
    let (store, leader, term) = setup(pool).await;
    for (name, policy) in [
        ("c", OverlapPolicy::CancelOther),
        ("t", OverlapPolicy::TerminateOther),
    ] {
        store
            .create_schedule(&every_second(name, policy, Duration::from_secs(60)), "op")
            .await
            .expect("creates");
        owe_since(&store, name, 1).await;
    }
    let pass = store
        .fire_due_schedules(leader, term, 100)
        .await
        .expect("fires");
    assert!(pass.fired >= 4, "{pass:?}");
    let c: InstanceId = fires(&store, "c").await[0].instance.expect("fired");
    let t: InstanceId = fires(&store, "t").await[0].instance.expect("fired");
    assert!(pass.to_stop.contains(&c), "{pass:?}");
    assert!(pass.to_kill.contains(&t), "{pass:?}");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn trigger_and_backfill_start_one_instance_per_fire_time(pool: PgPool) {
    let (store, _, _) = setup(pool).await;
    let mut new = every_second("s", OverlapPolicy::Skip, Duration::from_secs(60));
    new.cadence = CadenceSpec::Cron {
        expr: "0 * * * *".to_owned(),
        timezone: "Europe/Paris".to_owned(),
    };
    store.create_schedule(&new, "op").await.expect("creates");
    let triggered = store
        .trigger_schedule("s")
        .await
        .expect("triggers")
        .expect("exists");
    assert_eq!(triggered.fires.len(), 1);
    assert_eq!(triggered.ready.len(), 1);

    let from: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().expect("time");
    let to: DateTime<Utc> = "2026-01-01T05:30:00Z".parse().expect("time");
    let done = store
        .backfill_schedule("s", from, to)
        .await
        .expect("backfills")
        .expect("exists");
    assert_eq!(done.fires.len(), 6);
    assert!(done.fires.iter().all(|f| f.instance.is_some()));
    let again = store
        .backfill_schedule("s", from, to)
        .await
        .expect("backfills")
        .expect("exists");
    assert!(
        again.fires.iter().all(|f| f.instance.is_none()),
        "once per fire time"
    );
    assert!(
        store
            .trigger_schedule("nope")
            .await
            .expect("runs")
            .is_none()
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn bad_schedules_are_refused(pool: PgPool) {
    let (store, _, _) = setup(pool).await;
    let mut new = every_second("s", OverlapPolicy::Skip, Duration::from_secs(60));
    new.cadence = CadenceSpec::Cron {
        expr: "nope".to_owned(),
        timezone: "UTC".to_owned(),
    };
    assert!(matches!(
        store.create_schedule(&new, "op").await,
        Err(drover_store::Error::InvalidSchedule(_))
    ));
    let mut new = every_second("s", OverlapPolicy::Skip, Duration::from_secs(60));
    new.workflow = "missing".to_owned();
    assert!(matches!(
        store.create_schedule(&new, "op").await,
        Err(drover_store::Error::UnknownWorkflow(_))
    ));
    let new = every_second("s", OverlapPolicy::Skip, Duration::from_secs(60));
    store.create_schedule(&new, "op").await.expect("creates");
    assert!(matches!(
        store.create_schedule(&new, "op").await,
        Err(drover_store::Error::ScheduleExists(_))
    ));
    assert!(store.delete_schedule("s", "op").await.expect("deletes"));
    assert!(!store.delete_schedule("s", "op").await.expect("deletes"));
}
