//! Waiting steps at the storage level: timers, signals and child instances, on real Postgres
//! (`#[sqlx::test]`: a fresh database per test; set `DATABASE_URL`).

use chrono::Utc;
use drover_core::{Fence, InstanceId, InstanceState, NodeId, StepSeq};
use drover_store::{COORDINATOR_LEASE, Commit, Completion, Delivery, Error, NewChild, Transition};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_due_wait_is_woken_by_the_leader_only_and_its_rerun_sees_the_deadline_passed(
    pool: PgPool,
) {
    let (store, node) = setup(pool).await;
    let id = start(&store, "parent").await;
    let later = start(&store, "parent").await;
    for (instance, ms) in [(id, 0), (later, 60_000)] {
        let claimed = claim(&store, node, job(instance, 0, 0)).await;
        assert_eq!(claimed.wait_deadline, None);
        let done = store
            .commit_waking(
                node,
                &[completion(&claimed, "waiting", wait(Some(ms), None))],
            )
            .await
            .expect("commit");
        assert_eq!(done.results, [Commit::Committed]);
        assert!(done.ready.is_empty(), "a timer wait makes nothing READY");
        assert_eq!(
            state(&store, instance).await,
            (InstanceState::Waiting, StepSeq(1))
        );
    }
    assert_eq!(
        journal_row(&store, id, 1).await,
        ("waiting".into(), "waiting".into(), None)
    );

    // Not the leader: nothing happens.
    let leader = NodeId::new();
    let stale = drover_store::LeaderTerm(7);
    let woken = store.wake_due(leader, stale, 100).await;
    assert_eq!(woken.expect("wake_due"), []);
    assert_eq!(state(&store, id).await.0, InstanceState::Waiting);

    let term = store
        .acquire_lease(COORDINATOR_LEASE, leader, 5_000)
        .await
        .expect("lease")
        .expect("the lease is free");
    let woken = store.wake_due(leader, term, 100).await.expect("wake_due");
    assert_eq!(woken, [job(id, 2, 1)], "only the due one wakes");
    assert_eq!(state(&store, id).await, (InstanceState::Ready, StepSeq(2)));
    assert_eq!(state(&store, later).await.0, InstanceState::Waiting);
    assert_eq!(
        journal_row(&store, id, 2).await,
        ("woken".into(), "ready".into(), Some("timer".into()))
    );
    let again = store.wake_due(leader, term, 100).await;
    assert_eq!(again.expect("wake_due"), []);

    let rerun = claim(&store, node, woken[0].clone()).await;
    let deadline = rerun
        .wait_deadline
        .expect("the first wait set the deadline");
    assert!(rerun.claimed_at >= deadline);
    let done = store
        .commit_waking(
            node,
            &[completion(
                &rerun,
                "completed",
                Transition::Stop {
                    state: InstanceState::Completed,
                },
            )],
        )
        .await
        .expect("commit");
    assert_eq!(done.results, [Commit::Committed]);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn an_early_signal_is_kept_and_consumed_only_by_a_commit_that_lands(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let id = start(&store, "parent").await;
    let kept = store
        .deliver_signal(id, "approved", &json!({ "by": "ada" }))
        .await
        .expect("deliver");
    assert_eq!(kept, Delivery::Kept);
    let signal = store
        .pending_signal(id, "approved")
        .await
        .expect("pending")
        .expect("kept");
    assert_eq!(signal.payload, json!({ "by": "ada" }));
    assert_eq!(
        store.pending_signal(id, "other").await.expect("pending"),
        None
    );

    let claimed = claim(&store, node, job(id, 0, 0)).await;
    let mut done = completion(
        &claimed,
        "completed",
        Transition::Next {
            route: Default::default(),
            step: "b".into(),
            allow_retry: true,
            timeout_ms: 30_000,
        },
    );
    done.output = Some(signal.payload.clone());
    done.consumes = Some(signal.id);
    // A stale fence commits nothing and consumes nothing.
    let mut stale = done.clone();
    stale.fence = Fence(0);
    let result = store.commit_waking(node, &[stale]).await.expect("commit");
    assert_eq!(result.results, [Commit::Fenced]);
    assert!(
        store
            .pending_signal(id, "approved")
            .await
            .expect("pending")
            .is_some()
    );

    let result = store.commit_waking(node, &[done]).await.expect("commit");
    assert_eq!(result.results, [Commit::Committed]);
    assert_eq!(
        store.pending_signal(id, "approved").await.expect("pending"),
        None
    );
    let (consumed_seq,): (Option<i64>,) =
        sqlx::query_as("SELECT consumed_seq FROM instance_signal WHERE id = $1")
            .bind(signal.id.0)
            .fetch_one(store.pool())
            .await
            .expect("signal row");
    assert_eq!(consumed_seq, Some(1));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_signal_wakes_an_instance_waiting_for_it_and_its_rerun_keeps_the_deadline(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let id = start(&store, "parent").await;
    let claimed = claim(&store, node, job(id, 0, 0)).await;
    let parked = completion(&claimed, "waiting", wait(Some(60_000), Some("approved")));
    store.commit_waking(node, &[parked]).await.expect("commit");
    let before = store.get_instance(id).await.expect("get").expect("exists");

    // Another name is kept, the right one wakes it.
    let other = store
        .deliver_signal(id, "rejected", &Value::Null)
        .await
        .expect("deliver");
    assert_eq!(other, Delivery::Kept);
    assert_eq!(state(&store, id).await.0, InstanceState::Waiting);
    let woke = store
        .deliver_signal(id, "approved", &json!(1))
        .await
        .expect("deliver");
    assert_eq!(woke, Delivery::Woke(job(id, 2, 1)));
    assert_eq!(
        journal_row(&store, id, 2).await,
        (
            "signalled".into(),
            "ready".into(),
            Some("signal:approved".into())
        )
    );
    assert_eq!(before.step_seq, StepSeq(1));

    // Waiting again in the same step keeps the first wait's deadline.
    let rerun = claim(&store, node, job(id, 2, 1)).await;
    let deadline = rerun.wait_deadline.expect("set by the first wait");
    assert!(rerun.claimed_at < deadline);
    let parked = completion(&rerun, "waiting", wait(Some(1), Some("approved")));
    store.commit_waking(node, &[parked]).await.expect("commit");
    let (wake_at,): (Option<chrono::DateTime<Utc>>,) =
        sqlx::query_as("SELECT wake_at FROM instance WHERE id = $1")
            .bind(id.0)
            .fetch_one(store.pool())
            .await
            .expect("row");
    assert_eq!(wake_at, Some(deadline));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_signal_delivered_while_the_step_runs_turns_its_wait_into_a_rerun(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let id = start(&store, "parent").await;
    let claimed = claim(&store, node, job(id, 0, 0)).await;
    // The step looked and found nothing; the event arrives before it commits its wait.
    let kept = store
        .deliver_signal(id, "approved", &json!("yes"))
        .await
        .expect("deliver");
    assert_eq!(kept, Delivery::Kept);
    let parked = completion(&claimed, "waiting", wait(None, Some("approved")));
    let done = store.commit_waking(node, &[parked]).await.expect("commit");
    assert_eq!(done.results, [Commit::Committed]);
    assert_eq!(done.ready, [job(id, 1, 1)], "READY at once, to run again");
    assert_eq!(state(&store, id).await, (InstanceState::Ready, StepSeq(1)));
    assert_eq!(journal_row(&store, id, 1).await.1, "ready");
    // The re-run is claimed with the flag cleared, and finds the signal.
    let rerun = claim(&store, node, job(id, 1, 1)).await;
    assert!(
        store
            .pending_signal(rerun.id, "approved")
            .await
            .expect("pending")
            .is_some()
    );
    let parked = completion(&rerun, "waiting", wait(None, Some("other")));
    let done = store.commit_waking(node, &[parked]).await.expect("commit");
    assert!(done.ready.is_empty());
    assert_eq!(state(&store, id).await.0, InstanceState::Waiting);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn signals_to_unknown_or_finished_instances_are_errors(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let unknown = InstanceId::new();
    let err = store.deliver_signal(unknown, "x", &Value::Null).await.err();
    assert!(
        matches!(err, Some(Error::UnknownInstance(id)) if id == unknown),
        "{err:?}"
    );

    let id = start(&store, "parent").await;
    let err = store
        .deliver_signal(id, "Not A Slug", &Value::Null)
        .await
        .err();
    assert!(matches!(err, Some(Error::InvalidEventName(_))), "{err:?}");
    let claimed = claim(&store, node, job(id, 0, 0)).await;
    let stop = Transition::Stop {
        state: InstanceState::Completed,
    };
    store
        .commit_waking(node, &[completion(&claimed, "completed", stop)])
        .await
        .expect("commit");
    let err = store.deliver_signal(id, "x", &Value::Null).await.err();
    assert!(
        matches!(
            err,
            Some(Error::InstanceFinished {
                state: InstanceState::Completed,
                ..
            })
        ),
        "{err:?}"
    );
}

fn child_of(vars: Value) -> (InstanceId, Transition) {
    let id = InstanceId::new();
    let transition = Transition::Wait {
        wake_at_ms: None,
        event: None,
        child: Some(Box::new(NewChild {
            route: Default::default(),
            id,
            workflow: "child".into(),
            version: 1,
            entry_step: "c".into(),
            allow_retry: true,
            timeout_ms: 30_000,
            vars,
        })),
    };
    (id, transition)
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_child_starts_with_its_parents_wait_and_its_end_wakes_the_parent(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let parent = start(&store, "parent").await;
    let claimed = claim(&store, node, job(parent, 0, 0)).await;
    let (child, transition) = child_of(json!({ "n": 2 }));
    let parked = completion(&claimed, "waiting", transition);
    let done = store.commit_waking(node, &[parked]).await.expect("commit");
    assert_eq!(done.results, [Commit::Committed]);
    assert_eq!(done.ready, [job(child, 0, 0)], "the child's first job");

    let row = store
        .get_instance(child)
        .await
        .expect("get")
        .expect("child");
    assert_eq!(row.state, InstanceState::Ready);
    assert_eq!(row.parent_instance_id, Some(parent));
    assert_eq!(row.call_depth, 1);
    assert_eq!(row.vars, json!({ "n": 2 }));
    assert_eq!(row.current_step, "c");
    let parent_actor = format!("parent:{parent}");
    assert_eq!(
        journal_row(&store, child, 0).await,
        ("started".into(), "ready".into(), Some(parent_actor))
    );
    assert_eq!(state(&store, parent).await.0, InstanceState::Waiting);

    // The child's in_error leaves the parent waiting; a new attempt finishes it.
    let run = claim(&store, node, job(child, 0, 0)).await;
    assert_eq!(run.parent, Some(parent));
    assert_eq!(run.call_depth, 1);
    let mut finished = completion(
        &run,
        "completed",
        Transition::Stop {
            state: InstanceState::Completed,
        },
    );
    finished.vars = Some(json!({ "n": 3 }));
    let done = store
        .commit_waking(node, &[finished])
        .await
        .expect("commit");
    assert_eq!(done.results, [Commit::Committed]);
    assert_eq!(done.ready, [job(parent, 2, 1)], "the parent's job");
    assert_eq!(
        state(&store, parent).await,
        (InstanceState::Ready, StepSeq(2))
    );
    let child_actor = format!("child:{child}");
    assert_eq!(
        journal_row(&store, parent, 2).await,
        ("woken".into(), "ready".into(), Some(child_actor))
    );
    assert_eq!(
        event_kinds(&store, parent).await,
        ["started", "waiting", "woken"],
        "the parent's wake is announced, once"
    );
    assert_eq!(
        event_kinds(&store, child).await,
        ["started", "step_completed", "completed"]
    );

    let rerun = claim(&store, node, job(parent, 2, 1)).await;
    assert_eq!(rerun.wait_child, Some(child));
    // Waiting again for a child that has finished goes READY at once.
    let again = completion(&rerun, "waiting", wait(None, None));
    let again = Completion {
        transition: Transition::Wait {
            wake_at_ms: None,
            event: None,
            child: None,
        },
        ..again
    };
    let done = store.commit_waking(node, &[again]).await.expect("commit");
    assert_eq!(done.ready, [job(parent, 3, 2)]);
    // Moving on clears the step's wait.
    let rerun = claim(&store, node, job(parent, 3, 2)).await;
    let next = Transition::Next {
        route: Default::default(),
        step: "b".into(),
        allow_retry: true,
        timeout_ms: 30_000,
    };
    store
        .commit_waking(node, &[completion(&rerun, "completed", next)])
        .await
        .expect("commit");
    let (wait_child, pending): (Option<Uuid>, i32) =
        sqlx::query_as("SELECT wait_child, pending_children FROM instance WHERE id = $1")
            .bind(parent.0)
            .fetch_one(store.pool())
            .await
            .expect("row");
    assert_eq!((wait_child, pending), (None, 0));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_child_in_error_leaves_its_parent_waiting(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let parent = start(&store, "parent").await;
    let claimed = claim(&store, node, job(parent, 0, 0)).await;
    let (child, transition) = child_of(json!({}));
    store
        .commit_waking(node, &[completion(&claimed, "waiting", transition)])
        .await
        .expect("commit");
    let run = claim(&store, node, job(child, 0, 0)).await;
    let in_error = Transition::Stop {
        state: InstanceState::InError,
    };
    let done = store
        .commit_waking(node, &[completion(&run, "failed", in_error)])
        .await
        .expect("commit");
    assert!(done.ready.is_empty());
    assert_eq!(state(&store, parent).await.0, InstanceState::Waiting);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_child_that_ends_while_its_parent_runs_makes_the_parents_next_wait_end_at_once(
    pool: PgPool,
) {
    let (store, node) = setup(pool).await;
    let parent = start(&store, "parent").await;
    let claimed = claim(&store, node, job(parent, 0, 0)).await;
    let (child, transition) = child_of(json!({}));
    store
        .commit_waking(node, &[completion(&claimed, "waiting", transition)])
        .await
        .expect("commit");
    // Something (an operator, say) makes the waiting parent run its step again.
    sqlx::query("UPDATE instance SET state = 'ready' WHERE id = $1")
        .bind(parent.0)
        .execute(store.pool())
        .await
        .expect("nudge");
    let rerun = claim(&store, node, job(parent, 1, 1)).await;
    // The child ends while the parent runs: nothing to wake, but the parent is told.
    let run = claim(&store, node, job(child, 0, 0)).await;
    let failed = Transition::Stop {
        state: InstanceState::Failed,
    };
    let done = store
        .commit_waking(node, &[completion(&run, "completed", failed)])
        .await
        .expect("commit");
    assert!(done.ready.is_empty());
    assert_eq!(state(&store, parent).await.0, InstanceState::Running);
    // The parent's step saw the child still running and waits on: it goes READY instead.
    let done = store
        .commit_waking(node, &[completion(&rerun, "waiting", wait(None, None))])
        .await
        .expect("commit");
    assert_eq!(done.ready, [job(parent, 2, 2)]);
    assert_eq!(state(&store, parent).await.0, InstanceState::Ready);
}
