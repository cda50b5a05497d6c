//! N instances of a 3-step no-op workflow across W worker processes, beside the raw step-loop
//! ceiling measured in the same run.

use std::time::{Duration, Instant};

use anyhow::Context;
use drover_bus::{EventKind, InstanceRef, StepJob};
use drover_core::{Definition, InstanceId};
use drover_store::{NewInstance, PermitEvent, PermitEventKind};
use serde_json::{Value, json};

use crate::baseline;
use crate::env::BenchEnv;

const NOOP3: &str = r#"
name: noop3
steps:
  - { id: a, kind: assign, set: { x: "1" }, next: [{ to: b }] }
  - { id: b, kind: assign, set: { y: "2" }, next: [{ to: c }] }
  - { id: c, kind: end, status: completed }
"#;

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

pub(crate) async fn run(options: &Options) -> anyhow::Result<Value> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Value> {
    eprintln!("measuring the baseline…");
    let baseline = baseline::measure(env, &options.baseline).await?;

    eprintln!("starting {} worker processes…", options.workers);
    let mut workers = Vec::new();
    for _ in 0..options.workers {
        workers.push(env.spawn_worker()?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .store
        .list_nodes()
        .await?
        .iter()
        .filter(|n| n.status == "alive")
        .count()
        < options.workers
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "workers did not register within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let def = Definition::parse(NOOP3).map_err(|e| anyhow::anyhow!("{e}"))?;
    let deployed = env
        .store
        .deploy_definition(&def.name, &def.to_json(), NOOP3)
        .await?;
    let n = options.instances;
    eprintln!("running {n} instances…");
    let started = Instant::now();
    start_instances(env, &def, deployed.version, n).await?;
    let created = started.elapsed();
    let mut series = Vec::new();
    let limit = Duration::from_secs(600);
    loop {
        let (done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'completed'")
                .fetch_one(env.store.pool())
                .await?;
        series.push((started.elapsed().as_secs_f64(), done));
        if done >= i64::from(n) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "only {done}/{n} instances completed in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    drop(workers);

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
    Ok(json!({
        "baseline": baseline.to_json(),
        "instances": n,
        "workers": options.workers,
        "elapsed_s": elapsed.as_secs_f64(),
        "steps_per_s": steps_per_s,
        "instances_per_s": instances_per_s,
        "ratio_to_best_raw_loop": steps_per_s / best,
        "completed_over_time": series,
    }))
}

/// Creates `n` instances of `def` and dispatches their first jobs, 1000 per transaction.
pub(crate) async fn start_instances(
    env: &BenchEnv,
    def: &Definition,
    version: i32,
    n: u32,
) -> anyhow::Result<()> {
    let campaign = env
        .store
        .campaign_by_name("default")
        .await?
        .context("default campaign")?;
    let ids: Vec<InstanceId> = (0..n).map(|_| InstanceId::new()).collect();
    for chunk in ids.chunks(1000) {
        let rows: Vec<NewInstance> = chunk
            .iter()
            .map(|id| NewInstance {
                id: *id,
                campaign: campaign.id,
                workflow: def.name.clone(),
                version,
                entry_step: def.entry().id.clone(),
                allow_retry: def.entry().allow_retry,
                timeout_ms: def.entry().timeout_ms(),
                vars: serde_json::Value::Object(def.vars.clone()),
            })
            .collect();
        let events: Vec<_> = chunk
            .iter()
            .map(|id| {
                let r = InstanceRef {
                    id: *id,
                    campaign: &campaign.name,
                    workflow: &def.name,
                    version,
                };
                env.bus
                    .event(&r, EventKind::Started, json!({ "state": "ready" }))
            })
            .collect();
        let bus = &env.bus;
        let permit_event = |e: &PermitEvent<'_>| {
            let instance = InstanceRef {
                id: e.instance,
                campaign: e.campaign,
                workflow: e.workflow,
                version: e.version,
            };
            let kind = match e.kind {
                PermitEventKind::Queued => EventKind::Queued,
                PermitEventKind::Admitted => EventKind::Admitted,
                PermitEventKind::PermitReleased => EventKind::PermitReleased,
                PermitEventKind::Stopped => EventKind::Stopped,
                PermitEventKind::Paused => EventKind::Paused,
            };
            bus.event(&instance, kind, e.data.clone())
        };
        let created = env
            .store
            .create_instances(&rows, "bench", &events, &permit_event)
            .await?;
        let jobs: Vec<StepJob> = created
            .ready
            .iter()
            .map(|r| StepJob::new(r.instance, r.step_seq, r.fence))
            .collect();
        env.bus.publish_jobs(&jobs).await?;
    }
    Ok(())
}
