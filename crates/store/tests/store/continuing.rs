//! A node continuing an instance on its next step in the group commit itself
//! (`Store::commit_continuing`), and claiming instances as they are created
//! (`Store::create_instances_claiming`), on real Postgres.

use drover_core::{Fence, InstanceId, InstanceState, StepSeq};
use drover_store::{
    Commit, Completion, EndStep, LifecycleAction, LocalClaim, NewInstance, Transition,
};
use serde_json::json;
use sqlx::PgPool;

use crate::support::*;

fn next(step: &str) -> Transition {
    Transition::Next {
        route: Default::default(),
        step: step.to_owned(),
        allow_retry: false,
        timeout_ms: 1_000,
    }
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_continuing_commit_claims_the_next_step_for_its_node_as_a_claim_would(pool: PgPool) {
    let (store, node) = setup(pool.clone()).await;
    let id = start(&store, "parent").await;
    let first = claim(&store, node, job(id, 0, 0)).await;
    let mut done = completion(&first, "completed", next("b"));
    done.vars = Some(json!({ "x": 1 }));
    done.output = Some(json!({ "ok": true }));

    let commit = store
        .commit_continuing(node, &[done])
        .await
        .expect("commits");
    assert_eq!(commit.results, vec![Commit::Committed]);
    assert!(commit.ready.is_empty(), "{:?}", commit.ready);
    let [(0, second)] = commit.continued.as_slice() else {
        panic!("continued: {:?}", commit.continued);
    };
    assert_eq!(second.id, id);
    assert_eq!(second.current_step, "b");
    assert_eq!(second.step_seq, StepSeq(1));
    assert_eq!(second.step_entered_seq, StepSeq(1));
    assert_eq!(second.step_attempt, 1);
    assert_eq!(
        second.fence,
        Fence(first.fence.0 + 1),
        "the claim bumps the fence"
    );
    assert_eq!(
        second.step_claims, 1,
        "claimed once: a non-retryable step may run"
    );
    assert_eq!(second.campaign, first.campaign);
    assert_eq!(second.vars, json!({ "x": 1 }));
    assert_eq!(second.outputs, json!({ "a": { "ok": true } }));
    assert_eq!(
        state(&store, id).await,
        (InstanceState::Running, StepSeq(1))
    );
    let (owner, deadline_set): (Option<uuid::Uuid>, bool) =
        sqlx::query_as("SELECT owner_node, run_deadline > claimed_at FROM instance WHERE id = $1")
            .bind(id.0)
            .fetch_one(&pool)
            .await
            .expect("reads");
    assert_eq!(owner, Some(node.0));
    assert!(
        deadline_set,
        "recovery finds it overdue like any claimed step"
    );

    // The job a plain commit would have published is stale: nobody else claims the step.
    let other = another_worker(&store).await;
    for fence in [first.fence.0, second.fence.0] {
        let stolen = store
            .claim(other, &[job(id, 1, fence)])
            .await
            .expect("claim");
        assert!(stolen.is_empty(), "claimed by another node: {stolen:?}");
    }
    // Its commit is fenced like any claim's: the old fence no longer writes.
    let stale = completion(&first, "completed", next("b"));
    let results = store.commit(node, &[stale]).await.expect("commit");
    assert_ne!(results, vec![Commit::Committed]);
    let end = Transition::Stop {
        state: InstanceState::Completed,
    };
    let results = store
        .commit_continuing(node, &[completion(second, "completed", end)])
        .await
        .expect("commits");
    assert_eq!(results.results, vec![Commit::Committed]);
    assert!(results.continued.is_empty());
    assert_eq!(
        state(&store, id).await,
        (InstanceState::Completed, StepSeq(2))
    );
    assert_eq!(journal_row(&store, id, 1).await.1, "b");
    assert_eq!(journal_row(&store, id, 2).await.1, "completed");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn only_a_plain_next_step_on_a_live_node_without_requests_is_continued(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(start(&store, "parent").await);
    }
    let mut claimed = Vec::new();
    for &id in &ids {
        claimed.push(claim(&store, node, job(id, 0, 0)).await);
    }
    // An operator asks the third to pause once its step finishes.
    store
        .apply_lifecycle(LifecycleAction::Pause, &ids[2..3], "ada")
        .await
        .expect("asks");
    let completions = [
        completion(&claimed[0], "retry", Transition::Retry { delay_ms: 0 }),
        completion(&claimed[1], "waiting", wait(Some(60_000), None)),
        completion(&claimed[2], "completed", next("b")),
    ];
    let commit = store
        .commit_continuing(node, &completions)
        .await
        .expect("commits");
    assert_eq!(commit.results, vec![Commit::Committed; 3]);
    assert!(commit.continued.is_empty(), "{:?}", commit.continued);
    assert_eq!(state(&store, ids[0]).await.0, InstanceState::Ready);
    assert_eq!(state(&store, ids[1]).await.0, InstanceState::Waiting);
    assert_eq!(state(&store, ids[2]).await.0, InstanceState::Paused);

    // A draining node finishes its steps but claims nothing more.
    store
        .set_node_status(node, "draining")
        .await
        .expect("drains");
    let commit = store
        .commit_continuing(node, &[completion(&claimed[3], "completed", next("b"))])
        .await
        .expect("commits");
    assert_eq!(commit.results, vec![Commit::Committed]);
    assert!(commit.continued.is_empty(), "{:?}", commit.continued);
    assert_eq!(
        state(&store, ids[3]).await,
        (InstanceState::Ready, StepSeq(1))
    );
}

fn new_instance(campaign: drover_core::CampaignId, handler: Option<&str>) -> NewInstance {
    NewInstance {
        route: drover_core::Route {
            handler: handler.map(str::to_owned),
            ..Default::default()
        },
        id: InstanceId::new(),
        campaign,
        workflow: "parent".to_owned(),
        version: 1,
        entry_step: "a".to_owned(),
        allow_retry: false,
        timeout_ms: 1_000,
        vars: json!({ "n": 1 }),
        announce_end: false,
    }
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn instances_created_claiming_are_claimed_by_their_node_up_to_its_room(pool: PgPool) {
    let (store, node) = setup(pool.clone()).await;
    let default = store
        .campaign_by_name("default")
        .await
        .expect("reads")
        .expect("exists")
        .id;
    // Three plain ones and one for a handler the node lacks; room for two.
    let batch = vec![
        new_instance(default, None),
        new_instance(default, Some("missing")),
        new_instance(default, None),
        new_instance(default, None),
    ];
    let created = store
        .create_instances_claiming(&batch, "test", Some(LocalClaim { node, max: 2 }))
        .await
        .expect("creates");
    let claimed: Vec<InstanceId> = created.claimed.iter().map(|c| c.id).collect();
    assert_eq!(
        claimed,
        vec![batch[0].id],
        "the first ready ones up to the room, but never one for a handler the node lacks"
    );
    let first = &created.claimed[0];
    assert_eq!(first.current_step, "a");
    assert_eq!(first.step_seq, StepSeq(0));
    assert_eq!(first.fence, Fence(1), "fenced as a claim of the start job");
    assert_eq!(
        first.step_claims, 1,
        "claimed once: a non-retryable step may run"
    );
    assert_eq!(first.vars, json!({ "n": 1 }));
    assert_eq!(first.campaign, "default");
    let ready: Vec<InstanceId> = created.ready.iter().map(|j| j.instance).collect();
    assert_eq!(
        ready,
        vec![batch[1].id, batch[2].id, batch[3].id],
        "the rest are published as usual"
    );
    assert_eq!(
        state(&store, batch[0].id).await,
        (InstanceState::Running, StepSeq(0))
    );
    let (owner, deadline_set): (Option<uuid::Uuid>, bool) =
        sqlx::query_as("SELECT owner_node, run_deadline > claimed_at FROM instance WHERE id = $1")
            .bind(batch[0].id.0)
            .fetch_one(&pool)
            .await
            .expect("reads");
    assert_eq!(owner, Some(node.0));
    assert!(
        deadline_set,
        "recovery finds it overdue like any claimed step"
    );
    // Journal entry 0 and the `started` event read as for any start.
    let (outcome, transition, _) = journal_row(&store, batch[0].id, 0).await;
    assert_eq!(
        (outcome.as_str(), transition.as_str()),
        ("started", "ready")
    );
    assert_eq!(event_kinds(&store, batch[0].id).await, vec!["started"]);
    // Its start job, were one published, would be stale: nobody else claims it.
    let other = another_worker(&store).await;
    assert!(
        store
            .claim(other, &[job(batch[0].id, 0, 0)])
            .await
            .expect("claims")
            .is_empty()
    );
    // Its first step commits as any claimed step does.
    let commit = store
        .commit_continuing(node, &[completion(first, "completed", next("b"))])
        .await
        .expect("commits");
    assert_eq!(commit.results, vec![Commit::Committed]);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn no_instance_is_claimed_as_created_by_a_node_that_is_not_alive_or_over_a_limit(
    pool: PgPool,
) {
    let (store, node) = setup(pool).await;
    let default = store
        .campaign_by_name("default")
        .await
        .expect("reads")
        .expect("exists")
        .id;
    store
        .set_node_status(node, "draining")
        .await
        .expect("drains");
    let batch = vec![new_instance(default, None)];
    let created = store
        .create_instances_claiming(&batch, "test", Some(LocalClaim { node, max: 4 }))
        .await
        .expect("creates");
    assert!(created.claimed.is_empty(), "{:?}", created.claimed);
    assert_eq!(created.ready.len(), 1);
    assert_eq!(state(&store, batch[0].id).await.0, InstanceState::Ready);

    // In a limited campaign only the admitted are claimed; the queued wait their turn.
    let alive = another_worker(&store).await;
    let limited = store
        .create_campaign(&drover_store::NewCampaign {
            name: "small".to_owned(),
            max_running: Some(1),
            on_error_permit: drover_store::OnErrorPermit::Release,
            actor: "ada".to_owned(),
        })
        .await
        .expect("creates the campaign")
        .id;
    let batch = vec![new_instance(limited, None), new_instance(limited, None)];
    let created = store
        .create_instances_claiming(
            &batch,
            "test",
            Some(LocalClaim {
                node: alive,
                max: 2,
            }),
        )
        .await
        .expect("creates");
    let claimed: Vec<InstanceId> = created.claimed.iter().map(|c| c.id).collect();
    assert_eq!(claimed, vec![batch[0].id]);
    assert_eq!(created.queued, vec![batch[1].id]);
    assert!(created.ready.is_empty(), "{:?}", created.ready);
    let status = store
        .campaign_status("small")
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(
        (status.campaign.running, status.campaign.queued),
        (1, 1),
        "the permit is held"
    );
}

/// A second live worker node.
async fn another_worker(store: &drover_store::Store) -> drover_core::NodeId {
    let node = drover_core::NodeId::new();
    store
        .register_node(&drover_store::NewNode::new(
            node,
            &["worker".to_owned()],
            "test",
            "0",
        ))
        .await
        .expect("registers");
    node
}

/// A completion that also ran the `end` its step moved to.
fn ending(
    claimed: &drover_store::Claimed,
    state: InstanceState,
    reason: Option<&str>,
) -> Completion {
    let mut done = completion(claimed, "completed", Transition::Stop { state });
    done.output = Some(json!({ "n": 1 }));
    done.ends = Some(EndStep {
        step_id: "done".to_owned(),
        output: reason.map(|r| json!({ "reason": r })),
        error: reason
            .filter(|_| state == InstanceState::Failed)
            .map(str::to_owned),
        next: next("done"),
    });
    done
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_step_and_the_end_it_ran_at_once_commit_as_two_steps_together(pool: PgPool) {
    let (store, node) = setup(pool.clone()).await;
    let id = start(&store, "parent").await;
    let first = claim(&store, node, job(id, 0, 0)).await;

    let commit = store
        .commit_continuing(
            node,
            &[ending(&first, InstanceState::Failed, Some("no more"))],
        )
        .await
        .expect("commits");
    assert_eq!(commit.results, vec![Commit::Committed]);
    assert!(commit.continued.is_empty(), "{:?}", commit.continued);
    assert_eq!(state(&store, id).await, (InstanceState::Failed, StepSeq(2)));
    // Each step has its entry, as two commits would have written them.
    assert_eq!(
        journal_row(&store, id, 1).await,
        ("completed".to_owned(), "done".to_owned(), None)
    );
    assert_eq!(
        journal_row(&store, id, 2).await,
        ("completed".to_owned(), "failed".to_owned(), None)
    );
    let journal = store.journal(id).await.expect("journal").expect("exists");
    let end = journal
        .iter()
        .find(|e| e.step_seq == StepSeq(2))
        .expect("the end's entry");
    assert_eq!(end.step_id, "done");
    assert_eq!(end.error.as_deref(), Some("no more"));
    assert_eq!(end.output, Some(json!({ "reason": "no more" })));
    let instance = store.get_instance(id).await.expect("get").expect("exists");
    assert_eq!(instance.current_step, "done");
    assert_eq!(instance.error.as_deref(), Some("no more"));
    assert_eq!(
        instance.outputs,
        json!({ "a": { "n": 1 }, "done": { "reason": "no more" } })
    );
    assert_eq!(
        event_kinds(&store, id).await,
        ["started", "step_completed", "step_completed", "failed"]
    );
    // The end step's settings, as its own claim would have left them (the step had 30 s).
    let (retryable, timeout_ms): (bool, i64) =
        sqlx::query_as("SELECT step_retryable, step_timeout_ms FROM instance WHERE id = $1")
            .bind(id.0)
            .fetch_one(&pool)
            .await
            .expect("reads");
    assert_eq!((retryable, timeout_ms), (false, 1_000));
    // Committed once: the same completion again finds it done.
    let again = store
        .commit(
            node,
            &[ending(&first, InstanceState::Failed, Some("no more"))],
        )
        .await
        .expect("commits");
    assert_eq!(again, vec![Commit::AlreadyCommitted]);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn an_end_run_at_once_yields_to_an_operators_stop_or_pause_request(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let paused = start(&store, "parent").await;
    let stopped = start(&store, "parent").await;
    let to_pause = claim(&store, node, job(paused, 0, 0)).await;
    let to_stop = claim(&store, node, job(stopped, 0, 0)).await;
    store
        .apply_lifecycle(LifecycleAction::Pause, &[paused], "ada")
        .await
        .expect("asks");
    store
        .apply_lifecycle(LifecycleAction::Stop, &[stopped], "ada")
        .await
        .expect("asks");

    let commit = store
        .commit_continuing(
            node,
            &[
                ending(&to_pause, InstanceState::Completed, None),
                ending(&to_stop, InstanceState::Completed, None),
            ],
        )
        .await
        .expect("commits");
    assert_eq!(commit.results, vec![Commit::Committed; 2]);
    // As if the end had not run: the step moved to it, and the request was honoured there.
    assert_eq!(
        state(&store, paused).await,
        (InstanceState::Paused, StepSeq(1))
    );
    assert_eq!(
        state(&store, stopped).await,
        (InstanceState::Stopped, StepSeq(1))
    );
    for (id, transition) in [(paused, "paused"), (stopped, "stopped")] {
        let instance = store.get_instance(id).await.expect("get").expect("exists");
        assert_eq!(instance.current_step, "done");
        assert_eq!(journal_row(&store, id, 1).await.1, transition);
        let journal = store.journal(id).await.expect("journal").expect("exists");
        assert_eq!(journal.len(), 2, "no entry for the end: {journal:?}");
        let kinds = event_kinds(&store, id).await;
        assert_eq!(
            kinds.last().map(String::as_str),
            Some(transition),
            "{kinds:?}"
        );
        assert!(!kinds.iter().any(|k| k == "completed"), "{kinds:?}");
    }
}
