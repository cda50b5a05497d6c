//! Lifecycle commands at the storage level, racing workers: whatever operators pause, unpause,
//! stop and kill while steps commit, a campaign never has more permit holders than its limit,
//! its counters match its rows, and every permit comes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use drover_core::{InstanceId, InstanceState, NodeId};
use drover_store::{
    Acted, Completion, LifecycleAction, NewCampaign, NewInstance, OnErrorPermit, StepJob, Store,
    Transition,
};
use serde_json::json;
use sqlx::PgPool;

const LIMIT: i64 = 3;

/// READY instances' jobs, as the stale-READY sweeper would find them.
async fn ready_jobs(store: &Store) -> Vec<StepJob> {
    store
        .stale_ready(-1_000_000, 100)
        .await
        .expect("lists READY")
}

/// A worker: claims whatever is READY and completes it (`a` → `b` → completed).
async fn work(store: Store, node: NodeId, done: Arc<AtomicBool>) {
    while !done.load(Ordering::Relaxed) {
        let jobs = ready_jobs(&store).await;
        // Two workers claiming the same jobs may deadlock; a real one retries, as here.
        let claimed = match store.claim(node, &jobs).await {
            Err(err) if err.is_transient() => continue,
            claimed => claimed.expect("claims"),
        };
        for c in claimed {
            let transition = if c.current_step == "a" {
                Transition::Next {
                    route: Default::default(),
                    step: "b".to_owned(),
                    allow_retry: true,
                    timeout_ms: 30_000,
                }
            } else {
                Transition::Stop {
                    state: InstanceState::Completed,
                }
            };
            let completion = Completion::of(&c, Utc::now(), "completed", transition);
            // A deadlock with an operator's transaction is retried, as a real worker does.
            loop {
                match store.commit(node, std::slice::from_ref(&completion)).await {
                    Err(err) if err.is_transient() => continue,
                    done => {
                        done.expect("commits");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `(holders, running, queued rows, queued counter)` of the campaign.
async fn census(pool: &PgPool) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM instance WHERE campaign_id = c.id AND holds_permit),
                c.running::bigint,
                (SELECT count(*) FROM instance WHERE campaign_id = c.id AND state = 'queued'),
                c.queued::bigint
         FROM campaign c WHERE c.name = 'race'",
    )
    .fetch_one(pool)
    .await
    .expect("counts")
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn operators_racing_workers_never_overshoot_a_limit_nor_leak_a_permit(pool: PgPool) {
    let store = Store::from_pool(pool.clone());
    store
        .deploy_definition("job", &json!({ "name": "job" }), "job")
        .await
        .expect("deploys");
    let campaign = store
        .create_campaign(&NewCampaign {
            name: "race".to_owned(),
            max_running: Some(i32::try_from(LIMIT).expect("small")),
            on_error_permit: OnErrorPermit::Release,
            actor: "test".to_owned(),
        })
        .await
        .expect("creates the campaign");
    let batch: Vec<NewInstance> = (0..40)
        .map(|_| NewInstance {
            route: Default::default(),
            id: InstanceId::new(),
            campaign: campaign.id,
            workflow: "job".to_owned(),
            version: 1,
            entry_step: "a".to_owned(),
            allow_retry: true,
            timeout_ms: 30_000,
            vars: json!({}),
            announce_end: false,
        })
        .collect();
    store
        .create_instances(&batch, "test")
        .await
        .expect("creates");
    let ids: Vec<InstanceId> = batch.iter().map(|i| i.id).collect();

    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let node = NodeId::new();
        store
            .register_node(&drover_store::NewNode::new(
                node,
                &["worker".to_owned()],
                "test",
                "0",
            ))
            .await
            .expect("registers");
        tasks.spawn(work(store.clone(), node, Arc::clone(&done)));
    }
    let sampler = {
        let pool = pool.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(census(&pool).await.0);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            most
        })
    };

    // Operators: every fifth is killed, the others paused and unpaused, singly and in batches.
    let mut killed = Vec::new();
    for (round, chunk) in ids.chunks(4).enumerate() {
        for (i, id) in chunk.iter().enumerate() {
            let action = if (round * 4 + i) % 5 == 0 {
                LifecycleAction::Kill
            } else {
                LifecycleAction::Pause
            };
            let batch = store
                .apply_lifecycle(action, &[*id], "ada")
                .await
                .expect("applies");
            if action == LifecycleAction::Kill
                && matches!(batch.results.as_slice(), [(_, Acted::Changed(_))])
            {
                killed.push(id.0);
            }
        }
        store
            .apply_lifecycle(LifecycleAction::Stop, &chunk[..1], "ada")
            .await
            .expect("stops");
        let batch = store
            .apply_lifecycle(LifecycleAction::Unpause, chunk, "ada")
            .await
            .expect("unpauses");
        assert_eq!(batch.results.len(), chunk.len());
        assert!(
            batch
                .results
                .iter()
                .all(|(_, acted)| !matches!(acted, Acted::Unknown)),
            "{:?}",
            batch.results
        );
    }

    // Whatever is still paused or asked to pause is let go; then everything settles.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        store
            .apply_lifecycle(LifecycleAction::Unpause, &ids, "ada")
            .await
            .expect("unpauses");
        let (live,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM instance WHERE state NOT IN ('completed', 'stopped')",
        )
        .fetch_one(&pool)
        .await
        .expect("counts");
        if live == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{live} instances never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let most = sampler.await.expect("the sampler ran");
    assert!(
        most <= LIMIT,
        "{most} permit holders at once (limit {LIMIT})"
    );
    assert_eq!(census(&pool).await, (0, 0, 0, 0), "every permit came back");
    // How many kills find their instance still live depends on the race; each that did
    // stopped it for good.
    assert!(!killed.is_empty(), "no kill found a live instance");
    let (stopped,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM instance WHERE id = ANY($1) AND state = 'stopped'")
            .bind(&killed)
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!(
        stopped,
        killed.len() as i64,
        "every kill that acted stopped its instance"
    );
}
