//! Pausing a limited campaign on a live cluster: starts and freed permits queue, `why` says
//! the campaign is paused, and unpausing runs the queue in FIFO order within the limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use drover_tests::{TestEnv, wait_until};
use serde_json::{Value, json};

use crate::support::{deploy, post_json};

/// One handler step holding its permit for about `vars.ms`.
const SLOW: &str = r#"
name: slow
vars: { ms: 40 }
steps:
  - { id: work, kind: handler, handler: slow, input: { ms: "vars.ms" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

async fn start_in(
    api: &str,
    campaign: &str,
    vars: Value,
    count: u32,
) -> anyhow::Result<Vec<String>> {
    let (status, body) = post_json(
        &format!("{api}/v1/instances"),
        &json!({ "workflow": "slow", "campaign": campaign, "vars": vars, "count": count }),
    )
    .await?;
    if status != 201 {
        bail!("start answered {status}: {body}");
    }
    Ok(body["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect())
}

/// `(state, count)` of a campaign's instances.
async fn states(env: &TestEnv, campaign: &str) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT i.state, count(*) FROM instance i JOIN campaign c ON c.id = i.campaign_id
         WHERE c.name = $1 GROUP BY i.state ORDER BY i.state",
    )
    .bind(campaign)
    .fetch_all(env.store.pool())
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_campaign_queues_its_starts_and_unpausing_runs_them_within_the_limit()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let control = env.spawn_node("coordinator,api").await?;
    let _workers = [
        env.spawn_node("worker").await?,
        env.spawn_node("worker").await?,
    ];
    let api = control.api();
    deploy(api, SLOW).await?;
    let created = env
        .cli(api, &["campaign", "create", "spring", "--max-running", "3"])
        .await?;
    anyhow::ensure!(created.contains("spring"), "{created}");

    // Holders never exceed the limit, sampled every few milliseconds throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, max, pool) = (stop.clone(), max.clone(), env.store.pool().clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (holders,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM instance i JOIN campaign c ON c.id = i.campaign_id
                     WHERE c.name = 'spring' AND i.holds_permit",
                )
                .fetch_one(&pool)
                .await?;
                max.fetch_max(holders, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        })
    };

    // One runs for a while; then the campaign is paused.
    let first = start_in(api, "spring", json!({ "ms": 1500 }), 1).await?;
    wait_until("the first to run", Duration::from_secs(20), || async {
        Ok((states(&env, "spring").await? == [("running".to_owned(), 1)]).then_some(()))
    })
    .await?;
    let paused = env.cli(api, &["campaign", "pause", "spring"]).await?;
    anyhow::ensure!(paused.contains("spring: paused"), "{paused}");

    // Two permits are free, yet every start queues; the running one finishes and its permit
    // is not passed on.
    let queued = start_in(api, "spring", json!({ "ms": 200 }), 6).await?;
    wait_until("the first to complete", Duration::from_secs(20), || async {
        let body = crate::support::get(&format!("{api}/v1/instances/{}", first[0]))
            .await?
            .1;
        Ok((body["state"] == "completed").then_some(()))
    })
    .await?;
    assert_eq!(
        states(&env, "spring").await?,
        [("completed".to_owned(), 1), ("queued".to_owned(), 6)]
    );
    let why = env.cli(api, &["why", &queued[0]]).await?;
    assert!(
        why.contains("position 1 of 6") && why.contains("\"spring\" is paused"),
        "{why}"
    );
    let shown = env.cli(api, &["campaign", "show", "spring"]).await?;
    assert!(shown.contains("since"), "{shown}");

    let unpaused = env.cli(api, &["campaign", "unpause", "spring"]).await?;
    anyhow::ensure!(unpaused.contains("3 admitted now"), "{unpaused}");
    wait_until("all to complete", Duration::from_secs(60), || async {
        Ok((states(&env, "spring").await? == [("completed".to_owned(), 7)]).then_some(()))
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    sampler.await.context("the sampler panicked")??;
    assert_eq!(
        max.load(Ordering::Relaxed),
        3,
        "the limit was reached, never passed"
    );

    // Admitted in queue order: the unpause took the head three in one statement, then each
    // freed permit the next. And the counters agree with the rows.
    let admitted: Vec<(i64, String)> = sqlx::query_as(
        "SELECT i.queue_seq, j.output->>'by' FROM journal j JOIN instance i ON i.id = j.instance_id
         WHERE j.outcome = 'admitted' ORDER BY j.started_at, j.instance_id",
    )
    .fetch_all(env.store.pool())
    .await?;
    assert_eq!(admitted.len(), 6);
    let mut seqs: Vec<i64> = admitted.iter().map(|(seq, _)| *seq).collect();
    assert!(
        admitted[..3]
            .iter()
            .all(|(_, by)| by.starts_with("unpause:")),
        "{admitted:?}"
    );
    seqs[..3].sort_unstable();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "FIFO: {admitted:?}");
    let (running, queued_count): (i32, i32) =
        sqlx::query_as("SELECT running, queued FROM campaign WHERE name = 'spring'")
            .fetch_one(env.store.pool())
            .await?;
    assert_eq!((running, queued_count), (0, 0));

    // Empty now, it can be deleted.
    let deleted = env.cli(api, &["campaign", "delete", "spring"]).await?;
    assert!(deleted.contains("deleted campaign spring"), "{deleted}");
    env.cleanup().await;
    Ok(())
}
