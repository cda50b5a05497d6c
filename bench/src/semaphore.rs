//! The campaign semaphore: bulk-start admission into a limited campaign beside the same start
//! into the unlimited `default` campaign (which takes no campaign lock), and, with workers
//! running, the time from a freed permit to the next queued instance running.

use std::time::{Duration, Instant};

use anyhow::Context;
use drover_bus::{Bus, EventKind, InstanceRef, StepJob};
use drover_core::{CampaignId, Definition, InstanceId, OutboxEvent};
use drover_store::{NewCampaign, NewInstance, OnErrorPermit, PermitEvent, PermitEventKind};
use serde_json::{Value, json};

use crate::env::BenchEnv;

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

pub(crate) async fn run(options: &Options) -> anyhow::Result<Value> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

fn permit_events(bus: &Bus) -> impl Fn(&PermitEvent<'_>) -> OutboxEvent + Send + Sync + '_ {
    move |e: &PermitEvent<'_>| {
        let kind = match e.kind {
            PermitEventKind::Queued => EventKind::Queued,
            PermitEventKind::Admitted => EventKind::Admitted,
            PermitEventKind::PermitReleased => EventKind::PermitReleased,
            PermitEventKind::Stopped => EventKind::Stopped,
            PermitEventKind::Paused => EventKind::Paused,
        };
        let instance = InstanceRef {
            id: e.instance,
            campaign: e.campaign,
            workflow: e.workflow,
            version: e.version,
        };
        bus.event(&instance, kind, e.data.clone())
    }
}

/// Creates `n` instances of `def` in `campaign` as the API does (1000 per transaction, a
/// `started` event each), publishing the READY ones' jobs when `dispatch`. Answers how long
/// it took and how many queued.
async fn bulk_start(
    env: &BenchEnv,
    def: &Definition,
    version: i32,
    campaign: (CampaignId, &str),
    n: u32,
    dispatch: bool,
) -> anyhow::Result<(Duration, usize)> {
    let events_of = permit_events(&env.bus);
    let ids: Vec<InstanceId> = (0..n).map(|_| InstanceId::new()).collect();
    let started = Instant::now();
    let mut queued = 0;
    for chunk in ids.chunks(1000) {
        let rows: Vec<NewInstance> = chunk
            .iter()
            .map(|id| NewInstance {
                id: *id,
                campaign: campaign.0,
                workflow: def.name.clone(),
                version,
                entry_step: def.entry().id.clone(),
                allow_retry: def.entry().allow_retry,
                timeout_ms: def.entry().timeout_ms(),
                vars: Value::Object(def.vars.clone()),
            })
            .collect();
        let events: Vec<OutboxEvent> = chunk
            .iter()
            .map(|id| {
                let r = InstanceRef {
                    id: *id,
                    campaign: campaign.1,
                    workflow: &def.name,
                    version,
                };
                env.bus
                    .event(&r, EventKind::Started, json!({ "step": def.entry().id }))
            })
            .collect();
        let created = env
            .store
            .create_instances(&rows, "bench", &events, &events_of)
            .await?;
        queued += created.queued.len();
        if dispatch {
            let jobs: Vec<StepJob> = created
                .ready
                .iter()
                .map(|r| StepJob::new(r.instance, r.step_seq, r.fence))
                .collect();
            env.bus.publish_jobs(&jobs).await?;
        }
    }
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

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Value> {
    let def = Definition::parse(HOLD).map_err(|e| anyhow::anyhow!("{e}"))?;
    let version = env
        .store
        .deploy_definition(&def.name, &def.to_json(), HOLD)
        .await?
        .version;
    let default = env
        .store
        .campaign_by_name("default")
        .await?
        .context("default campaign")?;

    // 1. Bulk start, no workers: unlimited beside limited (10 permits, the rest queued).
    let n = options.bulk;
    eprintln!("bulk-starting {n} instances, unlimited then limited…");
    let (unlimited, _) = bulk_start(env, &def, version, (default.id, "default"), n, false).await?;
    let bulk = campaign(env, "bulk", 10).await?;
    let (limited, queued) = bulk_start(env, &def, version, (bulk, "bulk"), n, false).await?;
    anyhow::ensure!(
        queued == n as usize - 10,
        "{queued} of {n} queued behind 10 permits"
    );
    sqlx::query("DELETE FROM event_outbox")
        .execute(env.store.pool())
        .await?;
    sqlx::query("DELETE FROM instance")
        .execute(env.store.pool())
        .await?;

    // 2. Permit hand-over with workers running.
    eprintln!("starting {} worker processes…", options.workers);
    let mut nodes = vec![env.spawn_node("coordinator")?];
    for _ in 0..options.workers {
        nodes.push(env.spawn_worker()?);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .store
        .list_nodes()
        .await?
        .iter()
        .filter(|n| n.status == "alive")
        .count()
        < options.workers + 1
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "nodes did not register within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flow = campaign(env, "flow", options.limit).await?;
    let hold_def = {
        let source = HOLD.replace("ms: 20", &format!("ms: {}", options.hold_ms));
        let def = Definition::parse(&source).map_err(|e| anyhow::anyhow!("{e}"))?;
        let version = env
            .store
            .deploy_definition(&def.name, &def.to_json(), &source)
            .await?
            .version;
        (def, version)
    };
    let m = options.instances;
    eprintln!(
        "running {m} instances through a limit of {} ({} ms each)…",
        options.limit, options.hold_ms
    );
    let started = Instant::now();
    bulk_start(env, &hold_def.0, hold_def.1, (flow, "flow"), m, true).await?;
    let limit = Duration::from_secs(600);
    loop {
        let (done,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'completed'")
                .fetch_one(env.store.pool())
                .await?;
        if done >= i64::from(m) {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "only {done}/{m} completed in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let (p50, p99) = (
        crate::quantile(&handover, 0.5),
        crate::quantile(&handover, 0.99),
    );
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
    println!(
        "{:<62} {:>9.1} ms",
        format!(
            "permit freed -> next queued running, p50 ({} hand-overs)",
            handover.len()
        ),
        p50
    );
    println!("{:<62} {:>9.1} ms", "  … p99", p99);
    println!(
        "{:<62} {:>10.0}/s",
        format!(
            "{m} instances through limit {} ({} ms steps), {} workers",
            options.limit, options.hold_ms, options.workers
        ),
        flow_rate
    );
    Ok(json!({
        "bulk": n,
        "bulk_unlimited_per_s": unlimited_rate,
        "bulk_limited_per_s": limited_rate,
        "handover_ms_p50": p50,
        "handover_ms_p99": p99,
        "handovers": handover.len(),
        "limit": options.limit,
        "hold_ms": options.hold_ms,
        "instances": m,
        "workers": options.workers,
        "instances_per_s": flow_rate,
    }))
}
