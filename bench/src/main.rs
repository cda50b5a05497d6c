//! `cargo run --release -p drover-bench -- <scenario>`: Drover's figures, each beside a
//! baseline measured in the same run on the same services, as a ratio.
//!
//! Needs `DATABASE_URL` (a role that may CREATE DATABASE) and `NATS_URL` (nats-server ≥ 2.11
//! with JetStream). Each run uses its own database and subject prefix and removes them after.
//! Worker nodes are this same binary re-executed as `drover-bench node …`. Results go to
//! `bench/out/`: `latest.json` and an SVG chart per scenario that has a time series.

mod baseline;
mod chart;
mod cleanup;
mod env;
mod latency;
mod memory;
mod peer;
mod recovery;
mod scale;
mod semaphore;
mod single;
mod throughput;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Drover benchmarks, each beside a same-run baseline")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// The physical ceiling of one step here: raw JetStream→Postgres→ack→publish loops, raw
    /// Postgres commits, raw JetStream publishes, and the raw one-step latency.
    Baseline(baseline::Options),
    /// N instances of a 3-step no-op workflow across W worker processes, beside the baseline.
    Throughput(throughput::Options),
    /// Steady offered load at fractions of the measured maximum: step-to-step and
    /// start-to-complete latency, beside the raw one-step latency.
    Latency(latency::Options),
    /// `kill -9` workers holding running instances, R times: kill-to-redispatch and
    /// kill-to-complete; then kill the leader coordinator: failover time.
    Recovery(recovery::Options),
    /// One 3-step no-op workflow at a time through the API (`start --wait`): client start →
    /// result, beside the raw one-step latency.
    Single(single::Options),
    /// Campaign limits: a 10,000-instance bulk start into a limited campaign beside the same
    /// into `default`; then the time from a freed permit to the next queued instance running.
    Semaphore(semaphore::Options),
    /// Steps/s and claim/commit latency as finished history grows (10k → 1M instances).
    Scale(scale::Options),
    /// No-op steps/s while the `system-cleanup` technical workflow deletes many finished
    /// instances past retention, beside the same load without it.
    Cleanup(cleanup::Options),
    /// RSS of a worker node holding 10,000 steps in flight and of an api node under listing
    /// load, beside their idle RSS; and their growth over a `--duration` run (10 minutes).
    Memory(memory::Options),
    /// Drover beside Restate 1.7.12 in the same run, alternating rounds: no-op steps/s of a
    /// 3-step workflow and one workflow at a time. Needs `npm ci --prefix bench/peer`.
    Peer(peer::Options),
    /// Every scenario with its defaults (about 20 minutes on 2 cores, 10 of them `memory`),
    /// and `peer` (a few minutes more) when `bench/peer` is installed.
    All,
}

/// What a scenario measured: its figures for the summary table and its full JSON.
pub(crate) struct Report {
    pub(crate) figures: Vec<Figure>,
    pub(crate) json: Value,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Unit {
    PerSecond,
    Millis,
    MiB,
}

/// A headline figure beside the same-run baseline it is judged against.
#[derive(Clone, Debug)]
pub(crate) struct Figure {
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: Unit,
    pub(crate) baseline_name: String,
    pub(crate) baseline: f64,
}

impl Figure {
    pub(crate) fn new(
        name: impl Into<String>,
        value: f64,
        unit: Unit,
        baseline_name: impl Into<String>,
        baseline: f64,
    ) -> Self {
        Self {
            name: name.into(),
            value,
            unit,
            baseline_name: baseline_name.into(),
            baseline,
        }
    }

    fn ratio(&self) -> f64 {
        self.value / self.baseline.max(1e-9)
    }

    fn to_json(&self) -> Value {
        json!({
            "figure": self.name,
            "value": self.value,
            "unit": match self.unit { Unit::PerSecond => "per_s", Unit::Millis => "ms", Unit::MiB => "MiB" },
            "baseline": self.baseline_name,
            "baseline_value": self.baseline,
            "ratio": self.ratio(),
        })
    }
}

pub(crate) fn format_value(value: f64, unit: Unit) -> String {
    match unit {
        Unit::PerSecond => format!("{value:.0}/s"),
        Unit::Millis if value >= 100.0 => format!("{value:.0} ms"),
        Unit::Millis => format!("{value:.1} ms"),
        Unit::MiB => format!("{value:.1} MiB"),
    }
}

/// Prints `figures` as a Markdown table (the README's "Performance" table is one).
pub(crate) fn print_figures(figures: &[Figure]) {
    println!();
    println!("| figure | value | same-run baseline | ratio |");
    println!("|---|---:|---|---:|");
    for f in figures {
        println!(
            "| {} | {} | {} {} | {:.2}x |",
            f.name,
            format_value(f.value, f.unit),
            f.baseline_name,
            format_value(f.baseline, f.unit),
            f.ratio()
        );
    }
}

/// Where results go: `bench/out` of this checkout.
pub(crate) fn out_dir() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("out");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn main() -> anyhow::Result<()> {
    // Worker nodes are this binary re-executed: `drover-bench node --roles worker …`.
    if std::env::args().nth(1).as_deref() == Some("node") {
        let mut handlers = drover::Handlers::default();
        // Holds a step for `ms` milliseconds: work in flight for the recovery scenario.
        handlers.insert("sleep", |input: drover::HandlerInput| async move {
            let ms = input.input["ms"].as_u64().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, drover::StepError>(serde_json::Value::Null)
        });
        let code = drover::main(handlers);
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let started = Instant::now();
        let (figures, report) = match args.scenario {
            Scenario::Baseline(o) => one("baseline", baseline::run(&o).await?),
            Scenario::Throughput(o) => one("throughput", throughput::run(&o).await?),
            Scenario::Latency(o) => one("latency", latency::run(&o).await?),
            Scenario::Recovery(o) => one("recovery", recovery::run(&o).await?),
            Scenario::Semaphore(o) => one("semaphore", semaphore::run(&o).await?),
            Scenario::Scale(o) => one("scale", scale::run(&o).await?),
            Scenario::Cleanup(o) => one("cleanup", cleanup::run(&o).await?),
            Scenario::Single(o) => one("single", single::run(&o).await?),
            Scenario::Memory(o) => one("memory", memory::run(&o).await?),
            Scenario::Peer(o) => one("peer", peer::run(&o).await?),
            Scenario::All => all().await?,
        };
        print_figures(&figures);
        let path = out_dir()?.join("latest.json");
        let report = json!({
            "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
            "scenarios": report,
            "seconds": started.elapsed().as_secs_f64(),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        println!(
            "\nwrote {} ({:.0} s in all)",
            path.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    })
}

fn one(name: &str, report: Report) -> (Vec<Figure>, Value) {
    (report.figures, json!({ name: report.json }))
}

/// Every scenario with its defaults; the latency scenario's load comes from the throughput
/// scenario's measured maximum.
async fn all() -> anyhow::Result<(Vec<Figure>, Value)> {
    let mut figures = Vec::new();
    let mut report = serde_json::Map::new();
    let mut add = |name: &str, r: Report| {
        figures.extend(r.figures);
        report.insert(name.to_owned(), r.json);
    };
    add("single", single::run(&single::Options::default()).await?);
    let t = throughput::run(&throughput::Options::default()).await?;
    let max_rate = t.json["instances_per_s"].as_f64();
    add("throughput", t);
    let latency = latency::Options {
        max_rate,
        ..latency::Options::default()
    };
    add("latency", latency::run(&latency).await?);
    add("scale", scale::run(&scale::Options::default()).await?);
    add("cleanup", cleanup::run(&cleanup::Options::default()).await?);
    add(
        "semaphore",
        semaphore::run(&semaphore::Options::default()).await?,
    );
    add(
        "recovery",
        recovery::run(&recovery::Options::default()).await?,
    );
    add("memory", memory::run(&memory::Options::default()).await?);
    if peer::installed() {
        add("peer", peer::run(&peer::Options::default()).await?);
    } else {
        eprintln!("skipping `peer`: Restate is not installed (`npm ci --prefix bench/peer`)");
    }
    Ok((figures, Value::Object(report)))
}

/// The `q` quantile (0..=1) of `values`, nearest rank; 0 for none.
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile_sorted(&sorted, q)
}

/// [`quantile`] of values sorted ascending.
pub(crate) fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Steps (or operations) per second.
pub(crate) fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Latency quantiles of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Quantiles {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Quantiles {
    pub(crate) fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            n: sorted.len(),
            p50: quantile_sorted(&sorted, 0.5),
            p90: quantile_sorted(&sorted, 0.9),
            p99: quantile_sorted(&sorted, 0.99),
            max: sorted.last().copied().unwrap_or(0.0),
        }
    }

    pub(crate) fn to_json(self) -> Value {
        json!({ "n": self.n, "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99, "max_ms": self.max })
    }
}
