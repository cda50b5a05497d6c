//! The campaign semaphore at the storage level: admission at creation, release and hand-over at
//! commit, operator requests honoured at commit, in_error policies and resume, limit changes,
//! the reconciler, and the fast path that never touches a campaign row.

use std::time::Duration;

use chrono::Utc;
use drover_core::{CampaignId, Fence, InstanceId, InstanceState, NodeId, StepSeq};
use drover_store::{
    COORDINATOR_LEASE, Claimed, Commit, Completion, Created, DriftKind, Error, NewCampaign,
    NewChild, NewInstance, OnErrorPermit, Resume, Resumed, StepJob, Store, Transition,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

async fn setup(pool: PgPool) -> (Store, NodeId) {
    crate::support::setup_with(pool, &["job", "child"]).await
}

async fn campaign(
    store: &Store,
    name: &str,
    max: Option<i32>,
    policy: OnErrorPermit,
) -> CampaignId {
    store
        .create_campaign(&NewCampaign {
            name: name.to_owned(),
            max_running: max,
            on_error_permit: policy,
            actor: "ada".to_owned(),
        })
        .await
        .expect("creates the campaign")
        .id
}

fn new_instance(campaign: CampaignId) -> NewInstance {
    NewInstance {
        route: Default::default(),
        id: InstanceId::new(),
        campaign,
        workflow: "job".to_owned(),
        version: 1,
        entry_step: "a".to_owned(),
        allow_retry: true,
        timeout_ms: 30_000,
        vars: json!({}),
        announce_end: false,
    }
}

async fn start(store: &Store, campaign: CampaignId, n: usize) -> (Vec<InstanceId>, Created) {
    let batch: Vec<NewInstance> = (0..n).map(|_| new_instance(campaign)).collect();
    let created = store
        .create_instances(&batch, "test")
        .await
        .expect("creates");
    (batch.iter().map(|i| i.id).collect(), created)
}

async fn claim(store: &Store, node: NodeId, job: StepJob) -> Claimed {
    let mut claimed = store
        .claim(node, std::slice::from_ref(&job))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "{job:?} claims");
    claimed.remove(0)
}

/// Claims `id` at its current checkpoint.
async fn claim_now(store: &Store, node: NodeId, id: InstanceId) -> Claimed {
    let i = store.get_instance(id).await.expect("get").expect("exists");
    claim(
        store,
        node,
        StepJob {
            route: Default::default(),
            instance: id,
            step_seq: i.step_seq,
            fence: i.fence,
        },
    )
    .await
}

fn completion(claimed: &Claimed, transition: Transition) -> Completion {
    Completion::of(claimed, Utc::now(), "completed", transition)
}

fn stop(state: InstanceState) -> Transition {
    Transition::Stop { state }
}

fn next() -> Transition {
    Transition::Next {
        route: Default::default(),
        step: "b".to_owned(),
        allow_retry: true,
        timeout_ms: 30_000,
    }
}

async fn state(store: &Store, id: InstanceId) -> (InstanceState, bool, Option<i64>) {
    let i = store.get_instance(id).await.expect("get").expect("exists");
    (i.state, i.holds_permit, i.queue_position)
}

/// `(running, queued)` as the campaign row says, and as the rows say.
async fn counters(store: &Store, campaign: CampaignId) -> ((i32, i32), (i64, i64)) {
    let recorded: (i32, i32) = sqlx::query_as("SELECT running, queued FROM campaign WHERE id = $1")
        .bind(campaign.0)
        .fetch_one(store.pool())
        .await
        .expect("reads the campaign");
    let counted: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE holds_permit), count(*) FILTER (WHERE state = 'queued')
         FROM instance WHERE campaign_id = $1",
    )
    .bind(campaign.0)
    .fetch_one(store.pool())
    .await
    .expect("counts");
    (recorded, counted)
}

async fn events_of(store: &Store, kind: &str) -> Vec<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT kind FROM event_fact WHERE kind = $1 ORDER BY pos")
            .bind(kind)
            .fetch_all(store.pool())
            .await
            .expect("reads the outbox");
    rows.into_iter().map(|(s,)| s).collect()
}

async fn outcomes(store: &Store, id: InstanceId) -> Vec<(String, Option<String>)> {
    store
        .journal(id)
        .await
        .expect("journal")
        .expect("exists")
        .into_iter()
        .map(|e| (e.outcome, e.actor))
        .collect()
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_batch_start_admits_up_to_the_limit_and_queues_the_rest_in_order(pool: PgPool) {
    let (store, _) = setup(pool).await;
    let c = campaign(&store, "spring", Some(3), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 5).await;
    assert_eq!(
        created.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
        ids[..3],
        "the first three in input order get the permits"
    );
    assert_eq!(created.queued, ids[3..]);
    for id in &ids[..3] {
        assert_eq!(state(&store, *id).await, (InstanceState::Ready, true, None));
    }
    assert_eq!(
        state(&store, ids[3]).await,
        (InstanceState::Queued, false, Some(1))
    );
    assert_eq!(
        state(&store, ids[4]).await,
        (InstanceState::Queued, false, Some(2))
    );
    assert_eq!(counters(&store, c).await, ((3, 2), (3, 2)));
    assert_eq!(events_of(&store, "queued").await.len(), 2);

    // Someone queues: a later start queues too, even with nobody running any more.
    let (later, created) = start(&store, c, 1).await;
    assert_eq!(created.queued, later);
    assert_eq!(
        state(&store, later[0]).await,
        (InstanceState::Queued, false, Some(3))
    );
    let status = store
        .campaign_status("spring")
        .await
        .expect("reads")
        .expect("exists");
    assert!(status.oldest_queued_at.is_some() && status.oldest_queued_age_ms.is_some());
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_finished_holder_hands_its_permit_to_the_oldest_queued_instance(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 5).await;
    let a = claim(&store, node, created.ready[0].clone()).await;
    let b = claim(&store, node, created.ready[1].clone()).await;
    let done = store
        .commit_waking(
            node,
            &[
                completion(&a, stop(InstanceState::Completed)),
                completion(&b, stop(InstanceState::Failed)),
            ],
        )
        .await
        .expect("commits");
    assert_eq!(done.results, [Commit::Committed, Commit::Committed]);
    let admitted: Vec<InstanceId> = done.ready.iter().map(|r| r.instance).collect();
    assert_eq!(admitted, ids[2..4], "FIFO: the two oldest queued");
    for job in &done.ready {
        assert_eq!(
            job.step_seq,
            StepSeq(1),
            "admission is a journaled transition"
        );
        assert_eq!(
            outcomes(&store, job.instance).await[1],
            ("admitted".to_owned(), Some("semaphore".to_owned()))
        );
        claim(&store, node, job.clone()).await;
    }
    assert!(
        !state(&store, ids[0]).await.1,
        "a finished instance holds nothing"
    );
    assert_eq!(
        state(&store, ids[4]).await,
        (InstanceState::Queued, false, Some(1))
    );
    assert_eq!(counters(&store, c).await, ((2, 1), (2, 1)));
    assert_eq!(events_of(&store, "permit_released").await.len(), 2);
    assert_eq!(events_of(&store, "admitted").await.len(), 2);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn steps_that_keep_their_permit_and_unlimited_starts_never_touch_a_campaign_row(
    pool: PgPool,
) {
    let (store, node) = setup(pool.clone()).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (_, created) = start(&store, c, 3).await;
    let running = claim(&store, node, created.ready[0].clone()).await;
    let default = store
        .campaign_by_name("default")
        .await
        .expect("reads")
        .expect("exists");
    let (_, unlimited) = start(&store, default.id, 1).await;
    let free = claim(&store, node, unlimited.ready[0].clone()).await;

    // Someone holds both campaign rows as admission does: whatever needs them would wait.
    let mut blocker = pool.begin().await.expect("begins");
    sqlx::query("SELECT 1 FROM campaign FOR NO KEY UPDATE")
        .execute(&mut *blocker)
        .await
        .expect("locks");
    let fast = async {
        let done = store
            .commit_waking(
                node,
                &[
                    completion(&running, next()),
                    completion(&free, stop(InstanceState::Completed)),
                ],
            )
            .await
            .expect("commits");
        assert_eq!(done.results, [Commit::Committed, Commit::Committed]);
        start(&store, default.id, 10).await;
    };
    tokio::time::timeout(Duration::from_secs(5), fast)
        .await
        .expect("neither waited for a campaign lock");
    blocker.rollback().await.expect("rolls back");
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn in_error_releases_or_keeps_the_permit_per_policy_and_resume_requeues(pool: PgPool) {
    let (store, node) = setup(pool).await;
    for (name, policy) in [
        ("rel", OnErrorPermit::Release),
        ("hold", OnErrorPermit::Hold),
    ] {
        let c = campaign(&store, name, Some(1), policy).await;
        let (ids, created) = start(&store, c, 2).await;
        let (a, b) = (ids[0], ids[1]);
        let run = claim(&store, node, created.ready[0].clone()).await;
        let done = store
            .commit_waking(node, &[completion(&run, stop(InstanceState::InError))])
            .await
            .expect("commits");
        let resume = |i: &drover_store::Instance| Resume {
            route: Default::default(),
            instance: i.id,
            fence: i.fence,
            step_seq: i.step_seq,
            step: "a".to_owned(),
            allow_retry: true,
            timeout_ms: 30_000,
            set: serde_json::Map::new(),
            actor: "ada".to_owned(),
            mode: "current_step".to_owned(),
        };
        match policy {
            OnErrorPermit::Release => {
                assert_eq!(
                    done.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
                    [b],
                    "the failed instance's permit goes to the queue"
                );
                assert_eq!(
                    state(&store, a).await,
                    (InstanceState::InError, false, None)
                );
                // The permit is taken: the resumed instance queues behind the limit.
                let i = store.get_instance(a).await.expect("get").expect("exists");
                let resumed = store.resume(&resume(&i)).await.expect("resumes");
                assert_eq!(resumed, Resumed::Queued { position: 1 });
                assert_eq!(
                    state(&store, a).await,
                    (InstanceState::Queued, false, Some(1))
                );
                // b finishes: a is admitted again.
                let run = claim_now(&store, node, b).await;
                let done = store
                    .commit_waking(node, &[completion(&run, stop(InstanceState::Completed))])
                    .await
                    .expect("commits");
                assert_eq!(
                    done.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
                    [a]
                );
                assert_eq!(state(&store, a).await, (InstanceState::Ready, true, None));
            }
            OnErrorPermit::Hold => {
                assert!(
                    done.ready.is_empty(),
                    "the permit is held: nobody is admitted"
                );
                assert_eq!(state(&store, a).await, (InstanceState::InError, true, None));
                assert_eq!(state(&store, b).await.0, InstanceState::Queued);
                let i = store.get_instance(a).await.expect("get").expect("exists");
                let resumed = store.resume(&resume(&i)).await.expect("resumes");
                assert!(matches!(resumed, Resumed::Resumed { .. }), "{resumed:?}");
                assert_eq!(state(&store, a).await, (InstanceState::Ready, true, None));
            }
        }
        let (recorded, counted) = counters(&store, c).await;
        assert_eq!((i64::from(recorded.0), i64::from(recorded.1)), counted);
        assert_eq!(recorded.0, 1, "{name}");
    }
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn raising_the_limit_admits_at_once_and_lowering_it_admits_nothing_until_below(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 6).await;

    let raised = store
        .set_campaign_limit("spring", 4, "ada")
        .await
        .expect("raises");
    assert_eq!(raised.previous, 2);
    assert_eq!(
        raised.admitted.iter().map(|a| a.id).collect::<Vec<_>>(),
        ids[2..4]
    );
    assert_eq!(counters(&store, c).await, ((4, 2), (4, 2)));

    let lowered = store
        .set_campaign_limit("spring", 1, "ada")
        .await
        .expect("lowers");
    assert!(lowered.admitted.is_empty());
    // Three of the four holders finish: still at the (new) limit, nobody is admitted.
    for job in created.ready.iter().take(2) {
        let run = claim(&store, node, job.clone()).await;
        let done = store
            .commit_waking(node, &[completion(&run, stop(InstanceState::Completed))])
            .await
            .expect("commits");
        assert!(done.ready.is_empty());
    }
    let run = claim_now(&store, node, ids[2]).await;
    let done = store
        .commit_waking(node, &[completion(&run, stop(InstanceState::Completed))])
        .await
        .expect("commits");
    assert!(done.ready.is_empty(), "one holder left: at the limit of 1");
    let run = claim_now(&store, node, ids[3]).await;
    let done = store
        .commit_waking(node, &[completion(&run, stop(InstanceState::Completed))])
        .await
        .expect("commits");
    assert_eq!(
        done.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
        [ids[4]],
        "below the limit: the next one goes"
    );

    assert!(matches!(
        store.set_campaign_limit("default", 3, "ada").await,
        Err(Error::UnlimitedCampaign(_))
    ));
    assert!(matches!(
        store.set_campaign_limit("nope", 3, "ada").await,
        Err(Error::UnknownCampaign(_))
    ));
    assert!(matches!(
        store.set_campaign_limit("spring", 0, "ada").await,
        Err(Error::InvalidLimit(0))
    ));
    let audited: (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit WHERE action = 'campaign.set_limit'")
            .fetch_one(store.pool())
            .await
            .expect("counts");
    assert_eq!(audited.0, 2);
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn campaigns_are_validated_and_unique(pool: PgPool) {
    let (store, _) = setup(pool).await;
    campaign(&store, "spring", Some(3), OnErrorPermit::Hold).await;
    let new = |name: &str, max| NewCampaign {
        name: name.to_owned(),
        max_running: max,
        on_error_permit: OnErrorPermit::Release,
        actor: "ada".to_owned(),
    };
    assert!(matches!(
        store.create_campaign(&new("spring", Some(3))).await,
        Err(Error::CampaignExists(_))
    ));
    assert!(matches!(
        store.create_campaign(&new("Spring.*", Some(3))).await,
        Err(Error::InvalidCampaignName(_))
    ));
    assert!(matches!(
        store.create_campaign(&new("big", Some(100_001))).await,
        Err(Error::InvalidLimit(100_001))
    ));
    let listed = store.campaign_statuses().await.expect("lists");
    assert_eq!(
        listed
            .iter()
            .map(|c| c.campaign.name.as_str())
            .collect::<Vec<_>>(),
        ["default", "spring"]
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_requested_stop_or_pause_is_honoured_by_the_next_commit(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 3).await;
    let stopping = claim(&store, node, created.ready[0].clone()).await;
    let pausing = claim(&store, node, created.ready[1].clone()).await;
    sqlx::query("UPDATE instance SET stop_requested_by = 'ada' WHERE id = $1")
        .bind(ids[0].0)
        .execute(store.pool())
        .await
        .expect("requests a stop");
    sqlx::query("UPDATE instance SET pause_requested_by = 'bob' WHERE id = $1")
        .bind(ids[1].0)
        .execute(store.pool())
        .await
        .expect("requests a pause");
    let done = store
        .commit_waking(
            node,
            &[completion(&stopping, next()), completion(&pausing, next())],
        )
        .await
        .expect("commits");
    assert_eq!(done.results, [Commit::Committed, Commit::Committed]);
    assert_eq!(
        done.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
        [ids[2]],
        "the stopped instance's permit goes on; the paused one keeps its own"
    );
    assert_eq!(
        state(&store, ids[0]).await,
        (InstanceState::Stopped, false, None)
    );
    assert_eq!(
        state(&store, ids[1]).await,
        (InstanceState::Paused, true, None)
    );
    let stopped = store
        .journal(ids[0])
        .await
        .expect("journal")
        .expect("exists");
    let last = stopped.last().expect("a row");
    assert_eq!(
        (
            last.outcome.as_str(),
            last.transition.as_deref(),
            last.actor.as_deref()
        ),
        ("stopped", Some("stopped"), Some("ada"))
    );
    let paused: (Option<String>, Option<String>, String) = sqlx::query_as(
        "SELECT pause_requested_by, paused_by, current_step FROM instance WHERE id = $1",
    )
    .bind(ids[1].0)
    .fetch_one(store.pool())
    .await
    .expect("reads");
    assert_eq!(paused, (None, Some("bob".to_owned()), "b".to_owned()));
    assert_eq!(events_of(&store, "stopped").await.len(), 1);
    assert_eq!(events_of(&store, "paused").await.len(), 1);
    assert_eq!(counters(&store, c).await, ((2, 0), (2, 0)));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn children_run_under_their_parents_permit(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(1), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 2).await;
    let parent = claim(&store, node, created.ready[0].clone()).await;
    let child_id = InstanceId::new();
    let park = Transition::Wait {
        wake_at_ms: None,
        event: None,
        child: Some(Box::new(NewChild {
            route: Default::default(),
            id: child_id,
            workflow: "child".to_owned(),
            version: 1,
            entry_step: "a".to_owned(),
            allow_retry: true,
            timeout_ms: 30_000,
            vars: json!({}),
        })),
    };
    let done = store
        .commit_waking(node, &[completion(&parent, park)])
        .await
        .expect("commits");
    assert_eq!(done.ready.len(), 1, "the child starts at once");
    assert_eq!(
        state(&store, child_id).await,
        (InstanceState::Ready, false, None)
    );
    assert_eq!(
        state(&store, ids[0]).await,
        (InstanceState::Waiting, true, None)
    );
    let child = claim(&store, node, done.ready[0].clone()).await;
    let done = store
        .commit_waking(node, &[completion(&child, stop(InstanceState::Completed))])
        .await
        .expect("commits");
    assert_eq!(
        done.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
        [ids[0]],
        "the child's end wakes its parent and releases nothing"
    );
    assert_eq!(state(&store, ids[1]).await.0, InstanceState::Queued);
    assert_eq!(counters(&store, c).await, ((1, 1), (1, 1)));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn recovery_keeps_permits_but_an_interrupted_step_gives_its_permit_back(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 3).await;
    claim(&store, node, created.ready[0].clone()).await;
    claim(&store, node, created.ready[1].clone()).await;
    sqlx::query("UPDATE instance SET step_retryable = false WHERE id = $1")
        .bind(ids[1].0)
        .execute(store.pool())
        .await
        .expect("marks the step non-retryable");
    sqlx::query("UPDATE node SET status = 'dead' WHERE id = $1")
        .bind(node.0)
        .execute(store.pool())
        .await
        .expect("kills the node");
    let requeued = store
        .requeue_orphans(node, NodeId::new(), 100)
        .await
        .expect("requeues");
    assert_eq!(requeued.orphans.len(), 2);
    assert_eq!(
        state(&store, ids[0]).await,
        (InstanceState::Ready, true, None)
    );
    assert_eq!(
        state(&store, ids[1]).await,
        (InstanceState::InError, false, None)
    );
    assert_eq!(
        requeued.admitted.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[2]]
    );
    assert_eq!(counters(&store, c).await, ((2, 0), (2, 0)));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn the_reconciler_repairs_counter_drift_and_a_stalled_queue_under_the_lease(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (ids, _) = start(&store, c, 4).await;
    let term = store
        .acquire_lease(COORDINATOR_LEASE, node, 10_000)
        .await
        .expect("acquires")
        .expect("the lease was free");

    let clean = store
        .reconcile_permits(node, term)
        .await
        .expect("reconciles");
    assert!(clean.drift.is_empty(), "{:?}", clean.drift);

    // A holder vanishes behind the counters' back, and the counters lie.
    sqlx::query("UPDATE instance SET holds_permit = false, state = 'completed' WHERE id = $1;")
        .bind(ids[0].0)
        .execute(store.pool())
        .await
        .expect("breaks a row");
    sqlx::query("UPDATE campaign SET queued = 7 WHERE id = $1")
        .bind(c.0)
        .execute(store.pool())
        .await
        .expect("breaks a counter");
    let repaired = store
        .reconcile_permits(node, term)
        .await
        .expect("reconciles");
    let kinds: Vec<DriftKind> = repaired.drift.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        [
            DriftKind::RunningCount,
            DriftKind::QueuedCount,
            DriftKind::StalledQueue
        ]
    );
    assert_eq!(
        repaired.admitted.iter().map(|a| a.id).collect::<Vec<_>>(),
        [ids[2]]
    );
    assert_eq!(counters(&store, c).await, ((2, 1), (2, 1)));
    assert_eq!(events_of(&store, "permit_drift").await.len(), 3);

    // A leader that lost its lease does nothing.
    sqlx::query("UPDATE campaign SET running = 0 WHERE id = $1")
        .bind(c.0)
        .execute(store.pool())
        .await
        .expect("breaks a counter");
    let stale = store
        .reconcile_permits(node, drover_store::LeaderTerm(term.0 + 1))
        .await
        .expect("answers");
    assert!(stale.drift.is_empty());
    assert_eq!(counters(&store, c).await.0, (0, 1));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn concurrent_starters_and_finishers_never_overshoot_and_counters_match(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(3), OnErrorPermit::Release).await;
    let stop_sampling = tokio_util_like::Flag::default();
    let sampler = {
        let store = store.clone();
        let done = stop_sampling.clone();
        tokio::spawn(async move {
            let mut max = 0;
            while !done.is_set() {
                let (holders, last_admitted, head): (i64, Option<i64>, Option<i64>) =
                    sqlx::query_as(
                        "SELECT count(*) FILTER (WHERE holds_permit),
                                max(queue_seq) FILTER (WHERE holds_permit),
                                min(queue_seq) FILTER (WHERE state = 'queued')
                         FROM instance WHERE campaign_id = $1",
                    )
                    .bind(c.0)
                    .fetch_one(store.pool())
                    .await
                    .expect("samples");
                max = max.max(holders);
                if let (Some(last), Some(head)) = (last_admitted, head) {
                    assert!(
                        last < head,
                        "place {last} holds a permit while {head} queues"
                    );
                }
            }
            max
        })
    };
    let mut starters = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        starters.push(tokio::spawn(async move {
            for _ in 0..10 {
                start(&store, c, 2).await;
            }
        }));
    }
    // A finisher: completes whatever is READY, until all 80 are done.
    let finisher = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                let ready: Vec<(Uuid, i64, i64)> = sqlx::query_as(
                    "SELECT id, step_seq, fence FROM instance WHERE state = 'ready' LIMIT 5",
                )
                .fetch_all(store.pool())
                .await
                .expect("reads");
                let jobs: Vec<StepJob> = ready
                    .into_iter()
                    .map(|(id, seq, fence)| StepJob {
                        route: Default::default(),
                        instance: InstanceId(id),
                        step_seq: StepSeq(seq),
                        fence: Fence(fence),
                    })
                    .collect();
                let claimed = store.claim(node, &jobs).await.expect("claims");
                let done: Vec<Completion> = claimed
                    .iter()
                    .map(|cl| completion(cl, stop(InstanceState::Completed)))
                    .collect();
                store.commit_waking(node, &done).await.expect("commits");
                let (finished,): (i64,) =
                    sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'completed'")
                        .fetch_one(store.pool())
                        .await
                        .expect("counts");
                if finished == 80 {
                    return;
                }
            }
        })
    };
    for starter in starters {
        starter.await.expect("starts");
    }
    tokio::time::timeout(Duration::from_secs(60), finisher)
        .await
        .expect("every instance finishes")
        .expect("finishes");
    stop_sampling.set();
    let max = sampler.await.expect("samples");
    assert!(max <= 3, "at most 3 permit holders at once, saw {max}");
    assert_eq!(counters(&store, c).await, ((0, 0), (0, 0)));
    // FIFO: admissions from the queue happened in queue order. Each admitting transaction holds
    // the campaign lock, so admissions are ordered by transaction; a transaction is placed by
    // its first journal clock reading (rows of one statement read the clock in any order).
    let admitted: Vec<(i64, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT (output->>'queue_seq')::bigint,
                min(finished_at) OVER (PARTITION BY xmin::text)
         FROM journal WHERE outcome = 'admitted' ORDER BY 1",
    )
    .fetch_all(store.pool())
    .await
    .expect("reads");
    assert!(!admitted.is_empty(), "some were queued");
    assert_fifo(&admitted);
}

/// Admissions `(queue_seq, admitting transaction's time)` happened in queue order: no queue
/// place was admitted by a later transaction than a place behind it.
fn assert_fifo(admitted: &[(i64, chrono::DateTime<Utc>)]) {
    for (i, (seq, at)) in admitted.iter().enumerate() {
        for (later_seq, later_at) in &admitted[i + 1..] {
            assert!(
                at <= later_at,
                "queue place {seq} was admitted at {at}, after place {later_seq} at {later_at}"
            );
        }
    }
}

/// A stop flag for the sampler (the store crate has no tokio-util).
mod tokio_util_like {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub(crate) struct Flag(Arc<AtomicBool>);

    impl Flag {
        pub(crate) fn set(&self) {
            self.0.store(true, Ordering::Relaxed);
        }

        pub(crate) fn is_set(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_continuing_commit_claims_the_instances_its_released_permits_admit(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let c = campaign(&store, "spring", Some(2), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 6).await;
    let a = claim(&store, node, created.ready[0].clone()).await;
    let b = claim(&store, node, created.ready[1].clone()).await;
    let done = store
        .commit_continuing(
            node,
            &[
                completion(&a, stop(InstanceState::Completed)),
                completion(&b, stop(InstanceState::Completed)),
            ],
        )
        .await
        .expect("commits");
    assert_eq!(done.results, [Commit::Committed, Commit::Committed]);
    assert!(
        done.ready.is_empty(),
        "nothing to publish: {:?}",
        done.ready
    );
    let handed: Vec<InstanceId> = done.handed.iter().map(|h| h.id).collect();
    assert_eq!(handed, ids[2..4], "FIFO: the two oldest queued");
    for h in &done.handed {
        assert_eq!(
            h.step_seq,
            StepSeq(1),
            "admission is a journaled transition"
        );
        assert_eq!(h.fence, Fence(1), "claimed as a claim would: fence + 1");
        assert_eq!(h.step_claims, 1);
        assert_eq!(h.campaign, "spring");
        assert_eq!(h.current_step, "a");
        assert_eq!(
            state(&store, h.id).await,
            (InstanceState::Running, true, None)
        );
        assert_eq!(
            outcomes(&store, h.id).await[1],
            ("admitted".to_owned(), Some("semaphore".to_owned()))
        );
        let (owner, deadline_set, ready_at): (Option<Uuid>, bool, Option<chrono::DateTime<Utc>>) =
            sqlx::query_as(
                "SELECT owner_node, run_deadline > claimed_at, ready_at FROM instance
                 WHERE id = $1",
            )
            .bind(h.id.0)
            .fetch_one(store.pool())
            .await
            .expect("reads");
        assert_eq!(owner, Some(node.0));
        assert!(
            deadline_set,
            "recovery finds it overdue like any claimed step"
        );
        assert_eq!(ready_at, None, "not READY: the sweeper leaves it alone");
        // The job an admission would have published is stale: nobody else claims it.
        let stale = store
            .claim(
                node,
                &[StepJob {
                    route: Default::default(),
                    instance: h.id,
                    step_seq: StepSeq(1),
                    fence: Fence(0),
                }],
            )
            .await
            .expect("claims");
        assert!(stale.is_empty(), "{stale:?}");
    }
    assert_eq!(counters(&store, c).await, ((2, 2), (2, 2)));
    assert_eq!(events_of(&store, "permit_released").await.len(), 2);
    assert_eq!(events_of(&store, "admitted").await.len(), 2);

    // The handed instances run and commit like any claimed step, and hand on in turn.
    let first = done.handed[0].clone();
    let again = store
        .commit_continuing(node, &[completion(&first, stop(InstanceState::Completed))])
        .await
        .expect("commits");
    assert_eq!(again.results, [Commit::Committed]);
    assert_eq!(
        again.handed.iter().map(|h| h.id).collect::<Vec<_>>(),
        ids[4..5]
    );
    assert_eq!(counters(&store, c).await, ((2, 1), (2, 1)));

    // A plain commit claims nothing: the admitted instance's job is published.
    let second = done.handed[1].clone();
    let plain = store
        .commit_waking(node, &[completion(&second, stop(InstanceState::Completed))])
        .await
        .expect("commits");
    assert!(plain.handed.is_empty());
    assert_eq!(
        plain.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
        ids[5..6]
    );
    assert_eq!(
        state(&store, ids[5]).await,
        (InstanceState::Ready, true, None)
    );
    assert_eq!(counters(&store, c).await, ((2, 0), (2, 0)));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_release_waiting_for_the_campaign_lock_admits_instances_queued_meanwhile(pool: PgPool) {
    let (store, node) = setup(pool.clone()).await;
    let c = campaign(&store, "spring", Some(1), OnErrorPermit::Release).await;
    let (ids, created) = start(&store, c, 1).await;
    let a = claim(&store, node, created.ready[0].clone()).await;

    // Another transaction holds the campaign lock while the release starts, and queues an
    // instance before it lets go: the release's statement began before that was committed.
    let mut other = pool.begin().await.expect("begins");
    sqlx::query("SELECT 1 FROM campaign WHERE id = $1 FOR NO KEY UPDATE")
        .bind(c.0)
        .execute(&mut *other)
        .await
        .expect("locks the campaign");
    let release = {
        let store = store.clone();
        let done = completion(&a, stop(InstanceState::Completed));
        tokio::spawn(async move { store.commit_waking(node, &[done]).await })
    };
    // Until the release waits for the lock.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .expect("reads");
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the release never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let late = InstanceId::new();
    sqlx::query(
        "INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                               step_retryable, step_timeout_ms, vars, initial_vars, queue_seq,
                               queued_at, event_seq)
         VALUES ($1, $2, 'job', 1, 'queued', 'a', true, 30000, '{}', '{}',
                 nextval('instance_queue_seq'), clock_timestamp(), 0)",
    )
    .bind(late.0)
    .bind(c.0)
    .execute(&mut *other)
    .await
    .expect("queues one");
    sqlx::query("UPDATE campaign SET queued = queued + 1 WHERE id = $1")
        .bind(c.0)
        .execute(&mut *other)
        .await
        .expect("counts it");
    other.commit().await.expect("commits");

    let done = release.await.expect("joins").expect("commits");
    assert_eq!(done.results, [Commit::Committed]);
    assert_eq!(
        done.ready.iter().map(|r| r.instance).collect::<Vec<_>>(),
        [late],
        "the permit is not left free while an instance queues (I3)"
    );
    assert_eq!(state(&store, ids[0]).await.0, InstanceState::Completed);
    assert_eq!(
        state(&store, late).await,
        (InstanceState::Ready, true, None)
    );
    assert_eq!(counters(&store, c).await, ((1, 0), (1, 0)));
}
