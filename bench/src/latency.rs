//! Latency under a steady offered load: instances of a 3-step no-op workflow started at a
//! fixed rate (fractions of the maximum throughput measured in the same run), step-to-step
//! and start-to-complete latency from the journal's commit times, beside the raw one-step
//! latency measured in the same run.

use std::time::{Duration, Instant};

use drover_core::InstanceId;
use serde_json::{Value, json};

use crate::chart::{self, Panel};
use crate::env::{BenchEnv, Deployed};
use crate::{Figure, Quantiles, Report, Unit, baseline};

/// A 3-step no-op workflow named `name`.
pub(crate) fn noop3(name: &str) -> String {
    format!(
        r#"
name: {name}
steps:
  - {{ id: a, kind: assign, set: {{ x: "1" }}, next: [{{ to: b }}] }}
  - {{ id: b, kind: assign, set: {{ y: "2" }}, next: [{{ to: c }}] }}
  - {{ id: c, kind: end, status: completed }}
"#
    )
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Offered loads, as fractions of the maximum throughput.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.8")]
    pub(crate) loads: Vec<f64>,
    /// Seconds of offered load at each level.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
    /// The maximum throughput in instances/s; measured first with a burst when not given.
    #[arg(long)]
    pub(crate) max_rate: Option<f64>,
    /// Instances of the burst that measures the maximum throughput.
    #[arg(long, default_value_t = 5000)]
    pub(crate) burst: u32,
    /// Steps of the raw one-step chain (the latency baseline).
    #[arg(long, default_value_t = 1000)]
    pub(crate) chain: u32,
    /// Seconds of load at the first level before measuring: freshly started workers open
    /// their Postgres connections, and each plans the group-commit statement on first use.
    /// Reported apart from the levels.
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            loads: vec![0.1, 0.5, 0.8],
            seconds: 10,
            workers: 2,
            max_rate: None,
            burst: 5000,
            chain: 1000,
            warmup: 3,
        }
    }
}

/// Committed steps of a workflow's instances: (commit time in epoch seconds, milliseconds
/// since the instance's previous checkpoint), by commit time.
pub(crate) async fn step_gaps(env: &BenchEnv, workflow: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    Ok(step_parts(env, workflow)
        .await?
        .into_iter()
        .map(|(at, gap, _)| (at, gap))
        .collect())
}

/// [`step_gaps`], with the part of each gap before the step started running (dispatch:
/// publish, delivery, claim).
async fn step_parts(env: &BenchEnv, workflow: &str) -> anyhow::Result<Vec<(f64, f64, f64)>> {
    Ok(sqlx::query_as(
        "SELECT extract(epoch FROM j.finished_at)::float8,
                (extract(epoch FROM j.finished_at - p.finished_at) * 1000)::float8,
                (extract(epoch FROM j.started_at - p.finished_at) * 1000)::float8
         FROM instance i
         JOIN journal j ON j.instance_id = i.id AND j.step_seq > 0
         JOIN journal p ON p.instance_id = j.instance_id AND p.step_seq = j.step_seq - 1
         WHERE i.workflow = $1
         ORDER BY 1",
    )
    .bind(workflow)
    .fetch_all(env.store.pool())
    .await?)
}

/// Per second since `t0`: (second, steps committed, p50 ms, p99 ms) of `gaps` (by time).
pub(crate) fn per_second(gaps: &[(f64, f64)], t0: f64) -> Vec<(f64, f64, f64, f64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < gaps.len() {
        let second = (gaps[i].0 - t0).floor();
        let mut window = Vec::new();
        while i < gaps.len() && (gaps[i].0 - t0).floor() == second {
            window.push(gaps[i].1);
            i += 1;
        }
        let q = Quantiles::of(&window);
        out.push((second, window.len() as f64, q.p50, q.p99));
    }
    out
}

/// The panels of a run over time: steps/s, and step-to-step p50/p99.
pub(crate) fn timeline_panels(
    seconds: &[(f64, f64, f64, f64)],
    offered: Option<Vec<(f64, f64)>>,
) -> Vec<Panel> {
    let mut rate = Panel::new("steps committed per second", "seconds", "steps/s").series(
        "committed",
        seconds.iter().map(|&(t, n, _, _)| (t, n)).collect(),
    );
    if let Some(offered) = offered {
        rate = rate.series("offered", offered);
    }
    let latency = Panel::new(
        "step-to-step latency (previous checkpoint → this one)",
        "seconds",
        "ms",
    )
    .series("p50", seconds.iter().map(|&(t, _, p, _)| (t, p)).collect())
    .series("p99", seconds.iter().map(|&(t, _, _, p)| (t, p)).collect());
    vec![rate, latency]
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

struct Level {
    load: f64,
    offered: f64,
    achieved: f64,
    steps: Quantiles,
    /// The part of `steps` before the step started: publish, delivery, claim.
    dispatch: Quantiles,
    complete: Quantiles,
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    eprintln!("measuring the raw one-step latency…");
    let raw = baseline::step_latency(env, options.chain).await?;
    eprintln!("starting {} worker processes…", options.workers);
    let workers = env.spawn_nodes("worker", options.workers).await?;
    let campaign = env.default_campaign().await?;
    let max_rate = match options.max_rate {
        Some(rate) => rate,
        None => {
            let burst = env.deploy(&noop3("burst")).await?;
            let n = options.burst;
            eprintln!("measuring the maximum with a burst of {n} instances…");
            let started = Instant::now();
            let burst = env
                .start(&burst, (campaign.0, &campaign.1), n, true)
                .await?;
            env.wait_completed(&burst.ids, started).await?;
            crate::rate(u64::from(n), started.elapsed())
        }
    };

    let warmup = if options.warmup > 0 {
        let workflow = env.deploy(&noop3("warmup")).await?;
        let rate = (options.loads.first().copied().unwrap_or(0.1) * max_rate).max(1.0);
        eprintln!(
            "warming up at {rate:.0} instances/s for {} s…",
            options.warmup
        );
        let (ids, _) = offer(
            env,
            &workflow,
            (campaign.0, &campaign.1),
            rate,
            options.warmup,
        )
        .await?;
        env.wait_completed(&ids, Instant::now()).await?;
        let ms: Vec<f64> = step_gaps(env, "warmup")
            .await?
            .into_iter()
            .map(|g| g.1)
            .collect();
        Some(Quantiles::of(&ms))
    } else {
        None
    };

    let mut levels = Vec::new();
    let mut offered_series = Vec::new();
    let mut gaps_all = Vec::new();
    for (i, &load) in options.loads.iter().enumerate() {
        let name = format!("load{i}");
        let workflow = env.deploy(&noop3(&name)).await?;
        let rate = (load * max_rate).max(1.0);
        eprintln!(
            "offering {rate:.0} instances/s ({:.0}% of {max_rate:.0}/s) for {} s…",
            load * 100.0,
            options.seconds
        );
        let (ids, elapsed) = offer(
            env,
            &workflow,
            (campaign.0, &campaign.1),
            rate,
            options.seconds,
        )
        .await?;
        env.wait_completed(&ids, Instant::now()).await?;
        let started = ids.len() as f64;
        let parts = step_parts(env, &name).await?;
        let ms: Vec<f64> = parts.iter().map(|g| g.1).collect();
        let dispatch: Vec<f64> = parts.iter().map(|g| g.2).collect();
        let gaps: Vec<(f64, f64)> = parts.iter().map(|g| (g.0, g.1)).collect();
        let complete: Vec<(f64, f64, f64)> = sqlx::query_as(
            "SELECT extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8,
                    (extract(epoch FROM finished_at - created_at) * 1000)::float8
             FROM instance WHERE workflow = $1",
        )
        .bind(&name)
        .fetch_all(env.store.pool())
        .await?;
        let first = complete.iter().map(|c| c.0).fold(f64::INFINITY, f64::min);
        let last = complete
            .iter()
            .map(|c| c.1)
            .fold(f64::NEG_INFINITY, f64::max);
        offered_series.push((first, last, 3.0 * started / elapsed.as_secs_f64()));
        gaps_all.extend(gaps);
        levels.push(Level {
            load,
            offered: started / elapsed.as_secs_f64(),
            achieved: started / (last - first).max(1e-9),
            steps: Quantiles::of(&ms),
            dispatch: Quantiles::of(&dispatch),
            complete: Quantiles::of(&complete.iter().map(|c| c.2).collect::<Vec<_>>()),
        });
    }
    drop(workers);

    // The chart: every level, one after another.
    gaps_all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let t0 = gaps_all.first().map_or(0.0, |g| g.0).min(
        offered_series
            .iter()
            .map(|o| o.0)
            .fold(f64::INFINITY, f64::min),
    );
    let seconds = per_second(&gaps_all, t0);
    let offered: Vec<(f64, f64)> = offered_series
        .iter()
        .flat_map(|&(a, b, r)| [(a - t0, r), (b - t0, r), (b - t0, 0.0)])
        .collect();
    let chart_path = crate::out_dir()?.join("latency.svg");
    chart::write_svg(
        &chart_path,
        &format!(
            "latency: 3-step no-op workflow at {} of {max_rate:.0} instances/s, {} workers",
            options
                .loads
                .iter()
                .map(|l| format!("{:.0}%", l * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            options.workers
        ),
        &timeline_panels(&seconds, Some(offered)),
    )?;

    println!();
    baseline::print_latency(&raw);
    println!(
        "{:<26} {:>9} {:>9}   {:>33}   {:>21}",
        format!("load (max {max_rate:.0}/s)"),
        "offered",
        "done",
        "step-to-step p50 / p90 / p99 / max",
        "start→complete p50 / p99",
    );
    for l in &levels {
        println!(
            "{:<26} {:>7.0}/s {:>7.0}/s   {:>6.1} / {:>6.1} / {:>6.1} / {:>6.1} ms   {:>7.1} / {:>7.1} ms",
            format!("{:.0}% of max", l.load * 100.0),
            l.offered,
            l.achieved,
            l.steps.p50,
            l.steps.p90,
            l.steps.p99,
            l.steps.max,
            l.complete.p50,
            l.complete.p99
        );
        println!(
            "{:<26} {:>21}   {:>6.1} / {:>6.1} / {:>6.1} / {:>6.1} ms   (of which before the step started)",
            "", "", l.dispatch.p50, l.dispatch.p90, l.dispatch.p99, l.dispatch.max,
        );
    }
    if let Some(w) = &warmup {
        println!(
            "{:<26} {:>21}   {:>6.1} / {:>6.1} / {:>6.1} / {:>6.1} ms   (first {} s after the workers started; not in the levels)",
            "warm-up", "", w.p50, w.p90, w.p99, w.max, options.warmup,
        );
    }
    println!("chart: {}", chart_path.display());

    // Headlines: the lowest level, and the level nearest 50%.
    let mut figures = Vec::new();
    let lowest = levels.iter().min_by(|a, b| a.load.total_cmp(&b.load));
    if let Some(l) = lowest.filter(|l| (l.load - 0.5).abs() > 0.2) {
        let at = format!(
            "at {:.0}% of max ({:.0} instances/s)",
            l.load * 100.0,
            l.offered
        );
        figures.push(Figure::new(
            format!("step-to-step latency p50 {at}"),
            l.steps.p50,
            Unit::Millis,
            "raw one-step p50",
            raw.p50,
        ));
        figures.push(Figure::new(
            format!("step-to-step latency p99 {at}"),
            l.steps.p99,
            Unit::Millis,
            "raw one-step p99",
            raw.p99,
        ));
    }
    if let Some(l) = levels
        .iter()
        .min_by(|a, b| (a.load - 0.5).abs().total_cmp(&(b.load - 0.5).abs()))
    {
        let at = format!(
            "at {:.0}% of max ({:.0} instances/s)",
            l.load * 100.0,
            l.offered
        );
        figures.push(Figure::new(
            format!("step-to-step latency p50 {at}"),
            l.steps.p50,
            Unit::Millis,
            "raw one-step p50",
            raw.p50,
        ));
        figures.push(Figure::new(
            format!("step-to-step latency p99 {at}"),
            l.steps.p99,
            Unit::Millis,
            "raw one-step p99",
            raw.p99,
        ));
        figures.push(Figure::new(
            format!("start-to-complete p50, 3 steps, {at}"),
            l.complete.p50,
            Unit::Millis,
            "3 × raw one-step p50",
            3.0 * raw.p50,
        ));
    }
    Ok(Report {
        figures,
        json: json!({
            "raw_step_latency": raw.to_json(),
            "max_instances_per_s": max_rate,
            "warmup": warmup.map(|w| w.to_json()),
            "workers": options.workers,
            "levels": levels.iter().map(|l| json!({
                "load": l.load,
                "offered_instances_per_s": l.offered,
                "achieved_instances_per_s": l.achieved,
                "step_to_step": l.steps.to_json(),
                "dispatch": l.dispatch.to_json(),
                "start_to_complete": l.complete.to_json(),
            })).collect::<Vec<Value>>(),
            "per_second": seconds.iter().map(|&(t, n, p50, p99)| json!([t, n, p50, p99])).collect::<Vec<Value>>(),
            "chart": chart_path,
        }),
    })
}

/// Starts instances of `workflow` at `rate` per second for `seconds`, every 10 ms as many as
/// are due. Answers the instances it started and over how long.
async fn offer(
    env: &BenchEnv,
    workflow: &Deployed,
    campaign: (drover_core::CampaignId, &str),
    rate: f64,
    seconds: u64,
) -> anyhow::Result<(Vec<InstanceId>, Duration)> {
    let total = (rate * seconds as f64).round() as u32;
    let started_at = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut started = 0u32;
    let mut ids = Vec::with_capacity(total as usize);
    while started < total {
        tick.tick().await;
        let due = ((started_at.elapsed().as_secs_f64() * rate) as u32).min(total);
        if due > started {
            ids.extend(
                env.start(workflow, campaign, due - started, true)
                    .await?
                    .ids,
            );
            started = due;
        }
    }
    Ok((ids, started_at.elapsed()))
}
