//! Memory: the resident set (RSS, `VmRSS` of `/proc/<pid>/status`) of a worker node holding
//! 10,000 steps in flight and of an api node under listing load, beside the same processes'
//! idle RSS after start-up; and whether either grows over a long run.
//!
//! Both loads at once: a worker-only node (its concurrency raised above the in-flight target)
//! runs 10,000 instances that loop over a long `sleep` step (each step in flight on it for
//! `--hold-ms`, then an assign, then the next sleep), plus a steady stream of fresh 3-step
//! no-op instances started through the api node with `?wait=30s`; an api-only node serves
//! them and `--listers` clients listing `GET /v1/instances` with filters and paging, without
//! pause. The loads run for `--duration` from when all the held steps are in flight (the ramp
//! before is sampled too). RSS of both processes and the worker's in-flight steps are sampled
//! every few seconds; growth is the RSS at the end against the RSS at the end of the
//! window's first minute.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_api::{ApiClient, ListInclude, ListQuery, Secret, StartRequest};
use drover_core::NodeId;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::chart::{self, Panel};
use crate::env::{BenchEnv, api_client};
use crate::latency::noop3;
use crate::{Figure, Report, Unit};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// How long both loads run once all the held steps are in flight (`10m`, `90s`).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Steps held in flight on the worker node at once.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) in_flight: u32,
    /// How long each held step sleeps (ms) before its instance loops to the next.
    #[arg(long, default_value_t = 60_000)]
    pub(crate) hold_ms: u64,
    /// Fresh 3-step no-op instances started per second through the api (`?wait=30s`).
    #[arg(long, default_value_t = 20.0)]
    pub(crate) churn_rate: f64,
    /// Clients listing instances through the api, each without pause.
    #[arg(long, default_value_t = 4)]
    pub(crate) listers: usize,
    /// How often RSS is sampled.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub(crate) sample_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            in_flight: 10_000,
            hold_ms: 60_000,
            churn_rate: 20.0,
            listers: 4,
            sample_every: Duration::from_secs(2),
        }
    }
}

/// Loops over a long handler step for ever: each instance keeps one step in flight. The
/// step's timeout is well above its sleep (the default, 30 s, would cut it short).
fn hold(ms: u64) -> String {
    let timeout = ms.div_ceil(1000) * 2 + 60;
    format!(
        r#"
name: hold
vars: {{ i: 0 }}
steps:
  - {{ id: work, kind: handler, handler: sleep, input: {{ ms: "{ms}" }}, timeout: {timeout}s, next: [{{ to: count }}] }}
  - {{ id: count, kind: assign, set: {{ i: "vars.i + 1" }}, next: [{{ to: work, when: "vars.i < 1000000" }}, {{ to: done }}] }}
  - {{ id: done, kind: end, status: completed }}
"#
    )
}

/// The resident set of process `pid` in bytes (`VmRSS`).
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (the process has exited?)"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

const MIB: f64 = 1024.0 * 1024.0;

/// The nodes' log filter: a node's default (`info`), so that its spans (one per step in
/// flight, one per request) take the memory they take in a deployment; but not a line per
/// started instance.
const NODE_LOG: &str = "info,drover_api::start=warn";

/// The longest the held steps may take to be all in flight on the worker.
const RAMP_LIMIT: Duration = Duration::from_secs(300);

/// One sample: seconds since the nodes were spawned, both RSS, the worker's in-flight steps,
/// listings and churned instances so far.
#[derive(Clone, Copy, Debug)]
struct Sample {
    t: f64,
    worker: u64,
    api: u64,
    in_flight: i64,
    listings: u64,
    churned: u64,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

/// The held steps in flight on `node` (running instances of `hold` it owns).
async fn in_flight(env: &BenchEnv, node: NodeId) -> anyhow::Result<i64> {
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'running' AND owner_node = $1 AND workflow = 'hold'")
            .bind(node.0)
            .fetch_one(env.store.pool())
            .await?;
    Ok(n)
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.duration >= Duration::from_secs(20),
        "--duration must be at least 20s"
    );
    let every = options.sample_every.max(Duration::from_millis(200));
    // Room for the churn besides the held steps.
    let concurrency = (options.in_flight + 2000).to_string();
    let token = Secret::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen = crate::single::free_local_port()?;

    eprintln!("starting a worker node (concurrency {concurrency}) and an api node…");
    let spawned = Instant::now();
    let (worker, worker_id) = env
        .spawn_registered(|| {
            env.spawn_node_with(
                "worker",
                "127.0.0.1:0",
                &[
                    ("DROVER_CONCURRENCY", concurrency.as_str()),
                    ("RUST_LOG", NODE_LOG),
                ],
            )
        })
        .await?;
    let (api, _) = env
        .spawn_registered(|| {
            env.spawn_node_with(
                "api",
                &listen,
                &[
                    ("DROVER_ADMIN_TOKEN", token.expose()),
                    ("RUST_LOG", NODE_LOG),
                ],
            )
        })
        .await?;
    let worker_pid = worker.id().context("the worker node exited")?;
    let api_pid = api.id().context("the api node exited")?;
    let client = api_client(&listen, token).await?;
    let held = env.deploy(&hold(options.hold_ms)).await?;
    env.deploy(&noop3("churn")).await?;
    let campaign = env.default_campaign().await?;

    let listings = Arc::new(AtomicU64::new(0));
    let list_errors = Arc::new(AtomicU64::new(0));
    let churned = Arc::new(AtomicU64::new(0));
    let churn_errors = Arc::new(AtomicU64::new(0));
    let churn_skipped = Arc::new(AtomicU64::new(0));
    let mut samples: Vec<Sample> = Vec::new();
    let sample = |samples: &mut Vec<Sample>, in_flight: i64| -> anyhow::Result<()> {
        samples.push(Sample {
            t: spawned.elapsed().as_secs_f64(),
            worker: rss_bytes(worker_pid).context("the worker node")?,
            api: rss_bytes(api_pid).context("the api node")?,
            in_flight,
            listings: listings.load(Ordering::Relaxed),
            churned: churned.load(Ordering::Relaxed),
        });
        Ok(())
    };

    // Idle: both registered and answering, nothing to do.
    eprintln!("sampling idle RSS…");
    for _ in 0..3 {
        tokio::time::sleep(every).await;
        sample(&mut samples, 0)?;
    }
    let idle = *samples.last().context("no idle sample")?;

    let loads = CancellationToken::new();
    let load_started = Instant::now();
    let load_t0 = spawned.elapsed().as_secs_f64();
    eprintln!(
        "holding {} steps in flight ({} ms each), starting {}/s fresh instances and listing with {} clients, for {:?} once all are in flight…",
        options.in_flight, options.hold_ms, options.churn_rate, options.listers, options.duration
    );
    // The held instances, ramped over ~10 s so their loops do not all wake at once.
    let chunks = options.in_flight.div_ceil(1000).max(1);
    let chunk = options.in_flight.div_ceil(chunks);
    let mut remaining = options.in_flight;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..options.listers {
        tasks.spawn(lister(
            i,
            client.clone(),
            loads.clone(),
            Arc::clone(&listings),
            Arc::clone(&list_errors),
        ));
    }
    tasks.spawn(churn(
        client.clone(),
        options.churn_rate,
        loads.clone(),
        Arc::clone(&churned),
        Arc::clone(&churn_errors),
        Arc::clone(&churn_skipped),
    ));

    let mut next_chunk = Instant::now();
    let mut next_sample = Instant::now() + every;
    // When all the held steps were first in flight (seconds since the load started): the
    // window of `--duration` starts then.
    let mut reached: Option<f64> = None;
    let duration = options.duration.as_secs_f64();
    let result = async {
        loop {
            match reached {
                Some(at) if load_started.elapsed().as_secs_f64() - at >= duration => break,
                Some(_) => {}
                None => anyhow::ensure!(
                    load_started.elapsed() < RAMP_LIMIT,
                    "only {} of {} held steps in flight on the worker after {RAMP_LIMIT:?}",
                    samples.last().map_or(0, |s| s.in_flight),
                    options.in_flight
                ),
            }
            if remaining > 0 && Instant::now() >= next_chunk {
                let n = remaining.min(chunk);
                env.start(&held, (campaign.0, &campaign.1), n, true).await?;
                remaining -= n;
                next_chunk += Duration::from_secs(1);
            }
            if Instant::now() >= next_sample {
                let n = in_flight(env, worker_id).await?;
                if reached.is_none() && n >= i64::from(options.in_flight) {
                    reached = Some(load_started.elapsed().as_secs_f64());
                    eprintln!(
                        "  {n} steps in flight on the worker after {:.1} s",
                        load_started.elapsed().as_secs_f64()
                    );
                }
                sample(&mut samples, n)?;
                next_sample += every;
                let s = samples.last().context("a sample")?;
                if samples.len().is_multiple_of(15) {
                    eprintln!(
                        "  {:>4.0} s: worker {:.1} MiB ({} in flight), api {:.1} MiB, {} listings, {} churned",
                        s.t - load_t0,
                        s.worker as f64 / MIB,
                        s.in_flight,
                        s.api as f64 / MIB,
                        s.listings,
                        s.churned
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    }
    .await;
    loads.cancel();
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    result?;
    drop(worker);
    drop(api);

    let load: Vec<Sample> = samples.iter().copied().filter(|s| s.t >= load_t0).collect();
    let last = *load.last().context("no sample under load")?;
    // Growth: the window's end against the end of its first minute (of its first half, if
    // shorter than two minutes).
    let reached = reached.context("the held steps were never all in flight")?;
    let settle = (duration / 2.0).min(60.0);
    let first = *load
        .iter()
        .find(|s| s.t - load_t0 >= reached + settle)
        .context("no sample after the window's first minute")?;
    // And over its second half alone: an allocator warming up over the first few held
    // cycles levels off; a leak keeps its slope.
    let half = *load
        .iter()
        .find(|s| s.t - load_t0 >= reached + duration / 2.0)
        .context("no sample after the window's first half")?;
    let peak_worker = load.iter().map(|s| s.worker).max().unwrap_or(0);
    let peak_api = load.iter().map(|s| s.api).max().unwrap_or(0);
    let peak_in_flight = load.iter().map(|s| s.in_flight).max().unwrap_or(0);
    // The fewest in flight once all were: held steps lost to timeouts or stalls show here.
    let least_in_flight = load
        .iter()
        .filter(|s| s.t - load_t0 >= reached)
        .map(|s| s.in_flight)
        .min()
        .unwrap_or(0);
    let seconds = load_started.elapsed().as_secs_f64();
    let listed = listings.load(Ordering::Relaxed);
    let list_failed = list_errors.load(Ordering::Relaxed);
    let started = churned.load(Ordering::Relaxed);
    let churn_failed = churn_errors.load(Ordering::Relaxed);
    let churn_skipped = churn_skipped.load(Ordering::Relaxed);
    anyhow::ensure!(
        peak_in_flight >= i64::from(options.in_flight),
        "the worker held at most {peak_in_flight} steps in flight, not {}",
        options.in_flight
    );
    anyhow::ensure!(listed > 0, "no listing succeeded");
    let per_step = (peak_worker.saturating_sub(idle.worker)) as f64 / f64::from(options.in_flight);

    let chart_path = crate::out_dir()?.join("memory.svg");
    let rel = |s: &Sample| s.t - load_t0;
    chart::write_svg(
        &chart_path,
        &format!(
            "memory: a worker node with {} steps in flight, an api node under listing load ({} clients), {:.0} s",
            options.in_flight, options.listers, seconds
        ),
        &[
            Panel::new("resident set (VmRSS); load starts at 0", "seconds", "MiB")
                .series(
                    "worker node",
                    samples
                        .iter()
                        .map(|s| (rel(s), s.worker as f64 / MIB))
                        .collect(),
                )
                .series(
                    "api node",
                    samples
                        .iter()
                        .map(|s| (rel(s), s.api as f64 / MIB))
                        .collect(),
                ),
            Panel::new("steps in flight on the worker node", "seconds", "steps").series(
                "running on the worker",
                samples
                    .iter()
                    .map(|s| (rel(s), s.in_flight as f64))
                    .collect(),
            ),
        ],
    )?;

    let mib = |b: u64| b as f64 / MIB;
    let minute = if (settle - 60.0).abs() < 0.5 {
        "1 min".to_owned()
    } else {
        format!("{settle:.0} s")
    };
    let end = format!("{:.0} s", last.t - load_t0 - reached);
    println!();
    println!(
        "{:<58} {:>10.1} MiB   (idle {:.1} MiB, {:.2}x; {:.1} KiB per step in flight)",
        format!("worker RSS, {} steps in flight (peak)", options.in_flight),
        mib(peak_worker),
        mib(idle.worker),
        mib(peak_worker) / mib(idle.worker).max(1e-9),
        per_step / 1024.0
    );
    println!(
        "{:<58} {:>10.1} MiB   (idle {:.1} MiB, {:.2}x; {} listings, {:.0}/s, {} failed)",
        format!(
            "api RSS under listing load, {} clients (peak)",
            options.listers
        ),
        mib(peak_api),
        mib(idle.api),
        mib(peak_api) / mib(idle.api).max(1e-9),
        listed,
        listed as f64 / seconds,
        list_failed
    );
    println!(
        "{:<58} {:>10.1} MiB   (after {minute} {:.1} MiB, {:.2}x)",
        format!("worker RSS after {end}"),
        mib(last.worker),
        mib(first.worker),
        mib(last.worker) / mib(first.worker).max(1e-9)
    );
    println!(
        "{:<58} {:>10.1} MiB   (after {minute} {:.1} MiB, {:.2}x)",
        format!("api RSS after {end}"),
        mib(last.api),
        mib(first.api),
        mib(last.api) / mib(first.api).max(1e-9)
    );
    println!(
        "{:<58} worker {:.2}x, api {:.2}x",
        "  … over the window's second half",
        mib(last.worker) / mib(half.worker).max(1e-9),
        mib(last.api) / mib(half.api).max(1e-9)
    );
    println!(
        "fresh instances started through the api and ended within the wait: {started} ({churn_failed} not ended within 30 s or failed, {churn_skipped} skipped: {MAX_CHURNING} waiting); in flight reached {} after {:.1} s, fewest since {least_in_flight}",
        options.in_flight, reached
    );
    println!("chart: {}", chart_path.display());

    Ok(Report {
        figures: vec![
            Figure::new(
                format!(
                    "worker node RSS, {} steps in flight (peak; {:.1} KiB per step)",
                    options.in_flight,
                    per_step / 1024.0
                ),
                mib(peak_worker),
                Unit::MiB,
                "same node idle",
                mib(idle.worker),
            ),
            Figure::new(
                format!(
                    "api node RSS, {} clients listing instances (peak)",
                    options.listers
                ),
                mib(peak_api),
                Unit::MiB,
                "same node idle",
                mib(idle.api),
            ),
            Figure::new(
                format!("worker node RSS after {end} with them all in flight"),
                mib(last.worker),
                Unit::MiB,
                format!("same after {minute}"),
                mib(first.worker),
            ),
            Figure::new(
                format!("api node RSS after {end} of listing load"),
                mib(last.api),
                Unit::MiB,
                format!("same after {minute}"),
                mib(first.api),
            ),
        ],
        json: json!({
            "duration_s": seconds,
            "in_flight_target": options.in_flight,
            "in_flight_peak": peak_in_flight,
            "in_flight_least_in_window": least_in_flight,
            "in_flight_reached_after_s": reached,
            "hold_ms": options.hold_ms,
            "worker_concurrency": concurrency,
            "listers": options.listers,
            "listings": listed,
            "listing_errors": list_failed,
            "churn_rate": options.churn_rate,
            "churned": started,
            "churn_errors": churn_failed,
            "churn_skipped": churn_skipped,
            "idle": { "worker_bytes": idle.worker, "api_bytes": idle.api },
            "peak": { "worker_bytes": peak_worker, "api_bytes": peak_api },
            "worker_bytes_per_step_in_flight": per_step,
            "at_half": { "seconds_into_window": duration / 2.0, "worker_bytes": half.worker, "api_bytes": half.api },
            "after_first": { "seconds_into_window": settle, "worker_bytes": first.worker, "api_bytes": first.api },
            "at_end": { "seconds_into_window": last.t - load_t0 - reached, "worker_bytes": last.worker, "api_bytes": last.api },
            "samples": samples.iter().map(|s| json!([
                s.t - load_t0, s.worker, s.api, s.in_flight, s.listings, s.churned
            ])).collect::<Vec<Value>>(),
            "sample_columns": ["seconds_since_load", "worker_rss_bytes", "api_rss_bytes", "worker_in_flight", "listings", "churned"],
            "chart": chart_path,
        }),
    })
}

/// Lists instances without pause until `stop`: each round a filtered first page and the two
/// pages after it.
async fn lister(
    i: usize,
    client: ApiClient,
    stop: CancellationToken,
    listings: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let queries = [
        ListQuery {
            limit: Some(100),
            ..ListQuery::default()
        },
        ListQuery {
            state: Some("running".into()),
            limit: Some(100),
            ..ListQuery::default()
        },
        ListQuery {
            workflow: Some("churn".into()),
            state: Some("completed".into()),
            limit: Some(200),
            ..ListQuery::default()
        },
        ListQuery {
            workflow: Some("hold".into()),
            limit: Some(50),
            include: Some(ListInclude::Vars),
            ..ListQuery::default()
        },
    ];
    let mut round = i;
    while !stop.is_cancelled() {
        let mut query = queries[round % queries.len()].clone();
        round += 1;
        for _ in 0..3 {
            let page = tokio::select! {
                () = stop.cancelled() => return,
                page = client.instances(&query) => page,
            };
            match page {
                Ok(page) => {
                    listings.fetch_add(1, Ordering::Relaxed);
                    match page["next"].as_str() {
                        Some(next) => query.before = Some(next.to_owned()),
                        None => break,
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// The most start requests [`churn`] has waiting at once: a box too busy to keep up gets
/// fewer starts (counted as skipped), not an ever longer queue of requests.
const MAX_CHURNING: usize = 100;

/// Starts fresh 3-step no-op instances through the api at `rate` per second, each request
/// waiting for its instance's end (`?wait=30s`), until `stop`; a start due while
/// [`MAX_CHURNING`] are waiting is skipped.
async fn churn(
    client: ApiClient,
    rate: f64,
    stop: CancellationToken,
    churned: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    skipped: Arc<AtomicU64>,
) {
    if rate <= 0.0 {
        return;
    }
    let request = StartRequest {
        workflow: "churn".into(),
        ..StartRequest::default()
    };
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut waiting = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        while waiting.try_join_next().is_some() {}
        let due = (began.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            if waiting.len() >= MAX_CHURNING {
                skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (client, request) = (client.clone(), request.clone());
            let (churned, errors) = (Arc::clone(&churned), Arc::clone(&errors));
            waiting.spawn(async move {
                let ended = client
                    .start(&request, Some("30s"))
                    .await
                    .is_ok_and(|a| a["result"]["instance"]["state"].as_str() == Some("completed"));
                let counter = if ended { churned } else { errors };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
    }
    // Those still waiting are neither counted nor failed.
    waiting.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tdrover\nVmPeak:\t  300000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn the_held_step_outlasts_its_sleep() {
        let def = drover_core::Definition::parse(&hold(60_000)).expect("a valid workflow");
        let work = def.step("work").expect("the held step");
        assert!(work.timeout_ms() > 60_000, "{}", work.timeout_ms());
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_bytes(std::process::id()).expect("our own status") > 0);
    }
}
