//! The campaign semaphore: bulk-start admission into a limited campaign beside the same start
//! into the unlimited `default` campaign (which takes no campaign lock), and, with workers
//! running, the time from a freed permit to the next queued instance running.

use std::time::{Duration, Instant};

use drover_core::CampaignId;
use drover_store::{NewCampaign, OnErrorPermit};
use serde_json::json;

use crate::env::{BenchEnv, Deployed};
use crate::{Figure, Quantiles, Report, Unit, baseline};

/// One handler step holding its permit for `vars.ms`.
const HOLD: &str = r#"
name: hold
vars: { ms: 20 }
steps:
  - { id: work, kind: handler, handler: sleep, input: { ms: "vars.ms" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Instances of the bulk start.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) bulk: u32,
    /// Instances run through a limited campaign for the latency figures.
    #[arg(long, default_value_t = 2_000)]
    pub(crate) instances: u32,
    /// The limited campaign's limit.
    #[arg(long, default_value_t = 20)]
    pub(crate) limit: i32,
    /// How long each instance holds its permit (its one step), in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub(crate) hold_ms: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bulk: 10_000,
            instances: 2_000,
            limit: 20,
            hold_ms: 20,
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

/// Starts `n` instances of `workflow` in `campaign`: how long it took and how many queued.
async fn bulk_start(
    env: &BenchEnv,
    workflow: &Deployed,
    campaign: (CampaignId, &str),
    n: u32,
    dispatch: bool,
) -> anyhow::Result<(Duration, usize)> {
    let started = Instant::now();
    let queued = env.start(workflow, campaign, n, dispatch).await?.queued;
    Ok((started.elapsed(), queued))
}

async fn campaign(env: &BenchEnv, name: &str, limit: i32) -> anyhow::Result<CampaignId> {
    Ok(env
        .store
        .create_campaign(&NewCampaign {
            name: name.to_owned(),
            max_running: Some(limit),
            on_error_permit: OnErrorPermit::Release,
            actor: "bench".to_owned(),
        })
        .await?
        .id)
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    eprintln!("measuring the raw one-step latency…");
    let raw = baseline::step_latency(env, 1000).await?;
    let workflow = env.deploy(HOLD).await?;
    let default = env.default_campaign().await?;

    // 1. Bulk start, no workers: unlimited beside limited (10 permits, the rest queued).
    let n = options.bulk;
    eprintln!("bulk-starting {n} instances, unlimited then limited…");
    let (unlimited, _) = bulk_start(env, &workflow, (default.0, &default.1), n, false).await?;
    let bulk = campaign(env, "bulk", 10).await?;
    let (limited, queued) = bulk_start(env, &workflow, (bulk, "bulk"), n, false).await?;
    anyhow::ensure!(
        queued == n as usize - 10,
        "{queued} of {n} queued behind 10 permits"
    );
    sqlx::query("DELETE FROM event_fact")
        .execute(env.store.pool())
        .await?;
    sqlx::query("DELETE FROM instance")
        .execute(env.store.pool())
        .await?;

    // 2. Permit hand-over with workers running.
    eprintln!("starting {} worker processes…", options.workers);
    let mut nodes = env.spawn_nodes("coordinator", 1).await?;
    nodes.extend(env.spawn_nodes("worker", options.workers).await?);
    let flow = campaign(env, "flow", options.limit).await?;
    let hold = env
        .deploy(&HOLD.replace("ms: 20", &format!("ms: {}", options.hold_ms)))
        .await?;
    let m = options.instances;
    eprintln!(
        "running {m} instances through a limit of {} ({} ms each)…",
        options.limit, options.hold_ms
    );
    let started = Instant::now();
    let ids = env.start(&hold, (flow, "flow"), m, true).await?.ids;
    env.wait_completed(&ids, started).await?;
    let elapsed = started.elapsed();
    drop(nodes);
    let rows: Vec<(Option<f64>,)> = sqlx::query_as(
        "SELECT (extract(epoch FROM (SELECT n.started_at FROM journal n
                                     WHERE n.instance_id = a.instance_id
                                       AND n.step_seq = a.step_seq + 1)
                               - a.finished_at) * 1000)::float8
         FROM journal a WHERE a.outcome = 'admitted'",
    )
    .fetch_all(env.store.pool())
    .await?;
    let handover: Vec<f64> = rows.into_iter().filter_map(|(ms,)| ms).collect();
    let (max_holders,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE holds_permit")
        .fetch_one(env.store.pool())
        .await?;
    anyhow::ensure!(
        max_holders == 0,
        "{max_holders} permits still held after the run"
    );

    let unlimited_rate = crate::rate(u64::from(n), unlimited);
    let limited_rate = crate::rate(u64::from(n), limited);
    let flow_rate = crate::rate(u64::from(m), elapsed);
    println!();
    println!("{:<62} {:>12}", "semaphore", "figure");
    println!(
        "{:<62} {:>10.0}/s",
        format!("bulk start, {n} instances, default campaign (no lock)"),
        unlimited_rate
    );
    println!(
        "{:<62} {:>10.0}/s {:>6.2}x",
        format!("bulk start, {n} instances, limit 10 (admitted under lock)"),
        limited_rate,
        limited_rate / unlimited_rate
    );
    let q = Quantiles::of(&handover);
    println!(
        "{:<62} {:>9.1} ms {:>6.2}x raw one-step p50 ({:.1} ms)",
        format!(
            "permit freed -> next queued running, p50 ({} hand-overs)",
            handover.len()
        ),
        q.p50,
        q.p50 / raw.p50,
        raw.p50
    );
    println!(
        "{:<62} {:>9.1} ms {:>6.2}x raw one-step p99 ({:.1} ms)",
        "  … p99",
        q.p99,
        q.p99 / raw.p99,
        raw.p99
    );
    // The limit's ceiling: `limit` permits, each held `hold_ms` per instance.
    let ceiling = f64::from(options.limit) * 1000.0 / options.hold_ms.max(1) as f64;
    let through = format!(
        "{m} instances through limit {} ({} ms steps), {} workers",
        options.limit, options.hold_ms, options.workers
    );
    println!(
        "{through:<62} {flow_rate:>10.0}/s {:>6.2}x the limit's ceiling ({ceiling:.0}/s)",
        flow_rate / ceiling
    );
    let figures = vec![
        Figure::new(
            format!("bulk start into a limit-10 campaign, {n} instances"),
            limited_rate,
            Unit::PerSecond,
            "same start, unlimited campaign",
            unlimited_rate,
        ),
        Figure::new(
            "permit freed → next queued instance running, p50",
            q.p50,
            Unit::Millis,
            "raw one-step p50",
            raw.p50,
        ),
        Figure::new(
            "permit freed → next queued instance running, p99",
            q.p99,
            Unit::Millis,
            "raw one-step p99",
            raw.p99,
        ),
        Figure::new(
            format!(
                "instances/s through limit {} ({} ms steps)",
                options.limit, options.hold_ms
            ),
            flow_rate,
            Unit::PerSecond,
            "limit × 1/step time",
            ceiling,
        ),
    ];
    Ok(Report {
        figures,
        json: json!({
        "raw_step_latency": raw.to_json(),
        "bulk": n,
        "bulk_unlimited_per_s": unlimited_rate,
        "bulk_limited_per_s": limited_rate,
        "handover_ms_p50": q.p50,
        "handover_ms_p99": q.p99,
        "handovers": handover.len(),
        "limit": options.limit,
        "hold_ms": options.hold_ms,
        "instances": m,
        "workers": options.workers,
        "instances_per_s": flow_rate,
        "limit_ceiling_per_s": ceiling,
        }),
    })
}
