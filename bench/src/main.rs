//! `cargo run --release -p drover-bench -- <scenario>`: Drover's figures, each beside a
//! baseline measured in the same run on the same services, as a ratio.
//!
//! Needs `DATABASE_URL` (a role that may CREATE DATABASE) and `NATS_URL` (nats-server ≥ 2.11
//! with JetStream). Each run uses its own database and subject prefix and removes them after.
//! Worker nodes are this same binary re-executed as `drover-bench node …`.

mod baseline;
mod env;
mod recovery;
mod semaphore;
mod throughput;

use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Drover benchmarks, each beside a same-run baseline")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// The physical ceiling of one step here: raw JetStream→Postgres→ack→publish loops, raw
    /// Postgres commits, raw JetStream publishes.
    Baseline(baseline::Options),
    /// N instances of a 3-step no-op workflow across W worker processes, beside the baseline.
    Throughput(throughput::Options),
    /// `kill -9` workers holding running instances, R times: kill-to-redispatch and
    /// kill-to-complete; then kill the leader coordinator: failover time.
    Recovery(recovery::Options),
    /// Campaign limits: a 10,000-instance bulk start into a limited campaign beside the same
    /// into `default`; then the time from a freed permit to the next queued instance running.
    Semaphore(semaphore::Options),
    /// Every scenario with its defaults.
    All,
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
        let report = match args.scenario {
            Scenario::Baseline(o) => baseline::run(&o).await?,
            Scenario::Throughput(o) => throughput::run(&o).await?,
            Scenario::Recovery(o) => recovery::run(&o).await?,
            Scenario::Semaphore(o) => semaphore::run(&o).await?,
            Scenario::All => {
                let t = throughput::run(&throughput::Options::default()).await?;
                let r = recovery::run(&recovery::Options::default()).await?;
                let s = semaphore::run(&semaphore::Options::default()).await?;
                json!({ "throughput": t, "recovery": r, "semaphore": s })
            }
        };
        let dir = std::path::Path::new("bench/out");
        std::fs::create_dir_all(dir)?;
        let path = dir.join("latest.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        println!("\nwrote {}", path.display());
        Ok(())
    })
}

/// The `q` quantile (0..=1) of `values`, nearest rank; 0 for none.
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Steps (or operations) per second.
pub(crate) fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}
