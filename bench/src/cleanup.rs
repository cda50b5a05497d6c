//! Retention cleanup must not stall the hot path: no-op steps/s through the workers while the
//! `system-cleanup` technical workflow (run by those same workers, as in production) deletes
//! many finished instances past retention, beside the same load measured just before without
//! it.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::env::BenchEnv;
use crate::latency::noop3;
use crate::{Figure, Report, Unit};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Finished instances past retention (each with a 4-row journal) for the cleanup to
    /// delete. The figure is 1000000 (about 3 minutes to fill here).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) rows: u64,
    /// Instances of a 3-step no-op workflow per round of hot-path load.
    #[arg(long, default_value_t = 2000)]
    pub(crate) instances: u32,
    /// Rounds measured without the cleanup (the baseline).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rows: 100_000,
            instances: 2000,
            rounds: 3,
            workers: 2,
        }
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    eprintln!("starting {} worker processes…", options.workers);
    let workers = env.spawn_nodes("worker", options.workers).await?;
    let history = env.deploy(&noop3("history")).await?;
    let hot = env.deploy(&noop3("hot")).await?;
    let campaign = env.default_campaign().await?;
    drover_worker::maintenance::install_technical_workflows(&env.store)
        .await
        .map_err(anyhow::Error::msg)?;
    eprintln!("filling {} finished instances…", options.rows);
    let t = Instant::now();
    crate::scale::fill(env, campaign.0, history.version, options.rows).await?;
    eprintln!("  filled in {:.1} s", t.elapsed().as_secs_f64());
    // Everything the fill made is older than a day, bar a few (created within the last day).
    env.store
        .set_campaign_retention(&campaign.1, Some(Duration::from_secs(86_400)), "bench")
        .await?;
    let (eligible,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM instance WHERE workflow = 'history'
           AND finished_at < clock_timestamp() - interval '1 day'",
    )
    .fetch_one(env.store.pool())
    .await?;
    sqlx::query("VACUUM (ANALYZE) instance, journal, event_fact")
        .execute(env.store.pool())
        .await?;
    sqlx::query("CHECKPOINT").execute(env.store.pool()).await?;

    let (hot, campaign) = (&hot, &campaign);
    let round = |n: u32| async move {
        let started = Instant::now();
        let ids = env
            .start(hot, (campaign.0, &campaign.1), n, true)
            .await?
            .ids;
        env.wait_completed(&ids, started).await?;
        anyhow::Ok((u64::from(n) * 3, started.elapsed()))
    };

    eprintln!(
        "baseline: {} rounds of {} instances…",
        options.rounds, options.instances
    );
    let (mut steps, mut took) = (0, Duration::ZERO);
    for _ in 0..options.rounds {
        let (s, t) = round(options.instances).await?;
        steps += s;
        took += t;
    }
    let without = crate::rate(steps, took);
    eprintln!("  {without:.0} steps/s");

    eprintln!("cleanup of {eligible} finished instances past retention, with the same load…");
    let fired = env
        .store
        .trigger_schedule("system-cleanup")
        .await?
        .ok_or_else(|| anyhow::anyhow!("system-cleanup is not installed"))?;
    env.bus.publish_jobs(&fired.ready).await?;
    let cleanup = fired
        .fires
        .first()
        .and_then(|f| f.instance)
        .ok_or_else(|| anyhow::anyhow!("the trigger started no instance"))?;
    let cleanup_started = Instant::now();
    let (mut steps, mut took, mut rounds) = (0, Duration::ZERO, 0);
    let (deleted, cleanup_took) = loop {
        let (s, t) = round(options.instances).await?;
        let row: Option<(String, serde_json::Value)> =
            sqlx::query_as("SELECT state, vars FROM instance WHERE id = $1")
                .bind(cleanup.0)
                .fetch_optional(env.store.pool())
                .await?;
        let done = match &row {
            Some((state, vars)) if state == "completed" => {
                Some((vars["deleted"].clone(), cleanup_started.elapsed()))
            }
            Some((state, _)) if state != "running" && state != "ready" => {
                anyhow::bail!("the cleanup instance {cleanup} ended {state}")
            }
            _ => None,
        };
        // Only rounds that ran wholly while it ran count (the first always does).
        if rounds == 0 || done.is_none() {
            steps += s;
            took += t;
            rounds += 1;
        }
        if let Some(done) = done {
            break done;
        }
        anyhow::ensure!(
            cleanup_started.elapsed() < Duration::from_secs(1800),
            "the cleanup took over 30 minutes"
        );
    };
    let with = crate::rate(steps, took);
    let instances_deleted = deleted["instances"].as_u64().unwrap_or(0);
    let deleted_per_s = crate::rate(instances_deleted, cleanup_took);
    eprintln!(
        "  {with:.0} steps/s over {rounds} rounds; cleanup deleted {instances_deleted} instances \
         in {:.1} s ({deleted_per_s:.0}/s): {deleted}",
        cleanup_took.as_secs_f64()
    );
    let (sweeps,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM journal WHERE instance_id = $1 AND step_id = 'sweep' AND output IS NOT NULL",
    )
    .bind(cleanup.0)
    .fetch_one(env.store.pool())
    .await?;
    drop(workers);

    Ok(Report {
        figures: vec![Figure::new(
            format!(
                "no-op steps/s while system-cleanup deletes {instances_deleted} finished instances"
            ),
            with,
            Unit::PerSecond,
            "same load without cleanup",
            without,
        )],
        json: json!({
            "workers": options.workers,
            "instances_per_round": options.instances,
            "eligible": eligible,
            "steps_per_s_without": without,
            "steps_per_s_with": with,
            "rounds_with": rounds,
            "deleted": deleted,
            "cleanup_seconds": cleanup_took.as_secs_f64(),
            "deleted_per_s": deleted_per_s,
            "sweep_steps": sweeps,
        }),
    })
}
