//! N instances of a 3-step no-op workflow across W worker processes, beside the raw step-loop
//! ceiling measured in the same run.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::chart;
use crate::env::BenchEnv;
use crate::latency::{noop3, per_second, step_gaps, timeline_panels};
use crate::{Figure, Report, Unit, baseline};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Instances to run.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) instances: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
    #[command(flatten)]
    pub(crate) baseline: baseline::Options,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            instances: 10_000,
            workers: 2,
            baseline: baseline::Options::default(),
        }
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

/// One run of [`burst`].
pub(crate) struct Burst {
    /// Start of the bulk start → all instances completed.
    pub(crate) elapsed: Duration,
    /// … of which creating the instances and publishing their first jobs.
    pub(crate) created: Duration,
    /// (seconds since the start, instances completed), sampled every 100 ms.
    pub(crate) series: Vec<(f64, i64)>,
}

/// Starts `workers` worker processes, deploys the 3-step no-op workflow as `name`, starts `n`
/// instances of it at once as the API does, and waits until all have completed; the workers
/// are stopped before it answers.
pub(crate) async fn burst(
    env: &BenchEnv,
    name: &str,
    n: u32,
    workers: usize,
) -> anyhow::Result<Burst> {
    eprintln!("starting {workers} worker processes…");
    let nodes = env.spawn_nodes("worker", workers).await?;
    let workflow = env.deploy(&noop3(name)).await?;
    let campaign = env.default_campaign().await?;
    eprintln!("running {n} instances…");
    let started = Instant::now();
    let ids = env
        .start(&workflow, (campaign.0, &campaign.1), n, true)
        .await?
        .ids;
    let created = started.elapsed();
    let series = env.wait_completed(&ids, started).await?;
    let elapsed = started.elapsed();
    drop(nodes);
    Ok(Burst {
        elapsed,
        created,
        series,
    })
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    eprintln!("measuring the baseline…");
    let baseline = baseline::measure(env, &options.baseline).await?;

    let n = options.instances;
    let Burst {
        elapsed,
        created,
        series,
    } = burst(env, "noop3", n, options.workers).await?;

    let gaps = step_gaps(env, "noop3").await?;
    let (t0,): (f64,) = sqlx::query_as(
        "SELECT extract(epoch FROM min(created_at))::float8 FROM instance WHERE workflow = 'noop3'",
    )
    .fetch_one(env.store.pool())
    .await?;
    let seconds = per_second(&gaps, t0);
    let chart_path = crate::out_dir()?.join("throughput.svg");
    chart::write_svg(
        &chart_path,
        &format!(
            "throughput: {n} instances of a 3-step no-op workflow started at once, {} workers",
            options.workers
        ),
        &timeline_panels(&seconds, None),
    )?;

    let steps = u64::from(n) * 3;
    let steps_per_s = crate::rate(steps, elapsed);
    let instances_per_s = crate::rate(u64::from(n), elapsed);
    let best = baseline.best_step_loop();
    println!();
    baseline.print();
    println!();
    println!("{:<58} {:>12} {:>10}", "drover", "rate", "vs best raw loop");
    println!(
        "{:<58} {:>10.0}/s {:>9.2}x",
        format!(
            "3-step no-op workflow, {n} instances, {} workers: steps",
            options.workers
        ),
        steps_per_s,
        steps_per_s / best
    );
    println!("{:<58} {:>10.0}/s", "  … instances", instances_per_s);
    println!(
        "{:<58} {:>10.2}s",
        "  … of which creating and dispatching",
        created.as_secs_f64()
    );
    println!("chart: {}", chart_path.display());
    Ok(Report {
        figures: vec![Figure::new(
            format!(
                "no-op steps/s, {n} 3-step instances at once, {} workers",
                options.workers
            ),
            steps_per_s,
            Unit::PerSecond,
            "best raw step loop",
            best,
        )],
        json: json!({
            "baseline": baseline.to_json(),
            "instances": n,
            "workers": options.workers,
            "elapsed_s": elapsed.as_secs_f64(),
            "steps_per_s": steps_per_s,
            "instances_per_s": instances_per_s,
            "ratio_to_best_raw_loop": steps_per_s / best,
            "completed_over_time": series,
            "per_second": seconds.iter().map(|&(t, n, p50, p99)| json!([t, n, p50, p99])).collect::<Vec<Value>>(),
            "chart": chart_path,
        }),
    })
}
