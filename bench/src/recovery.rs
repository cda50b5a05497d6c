//! Recovery: `kill -9` a worker holding running instances, again and again, and measure how
//! long until its instances are re-dispatched and until their interrupted step completes
//! elsewhere; freeze one (SIGSTOP) and measure how long until every instance it ran or may
//! have held a job of is on its next step; then kill the leader coordinator and measure the
//! failover. The baselines are the configured floors of the same run: the dead-node deadline
//! (3 s of heartbeat silence) and the lease TTL (5 s).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use drover_core::{InstanceId, NodeId};
use drover_store::{COORDINATOR_LEASE, InstanceFilter};
use serde_json::json;
use tokio::process::Child;
use uuid::Uuid;

use crate::env::{BenchEnv, poll};
use crate::{Figure, Report, Unit, quantile};

const DEAD_AFTER: Duration = Duration::from_secs(3);
const LEASE_TTL: Duration = Duration::from_secs(5);

const LOAD: &str = r#"
name: busy
vars: { i: 0 }
steps:
  - { id: work, kind: handler, handler: sleep, input: { ms: "400" }, next: [{ to: count }] }
  - { id: count, kind: assign, set: { i: "vars.i + 1" }, next: [{ to: work, when: "vars.i < 100000" }, { to: done }] }
  - { id: done, kind: end, status: completed }
"#;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Worker kills to measure.
    #[arg(long, default_value_t = 20)]
    pub(crate) kills: usize,
    /// Worker freezes (SIGSTOP) to measure.
    #[arg(long, default_value_t = 5)]
    pub(crate) freezes: usize,
    /// Leader kills to measure.
    #[arg(long, default_value_t = 3)]
    pub(crate) failovers: usize,
    /// Instances kept busy (each loops over a 400 ms step).
    #[arg(long, default_value_t = 200)]
    pub(crate) instances: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kills: 20,
            freezes: 5,
            failovers: 3,
            instances: 200,
        }
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

/// Spawns a node of `roles` and returns it with its id, once registered.
async fn node(env: &BenchEnv, roles: &str) -> anyhow::Result<(Child, NodeId)> {
    env.spawn_registered(|| env.spawn_node(roles)).await
}

async fn running(env: &BenchEnv, node: NodeId) -> anyhow::Result<Vec<(InstanceId, i64)>> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT id, step_seq FROM instance WHERE state = 'running' AND owner_node = $1",
    )
    .bind(node.0)
    .fetch_all(env.store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, seq)| (InstanceId(id), seq))
        .collect())
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    let mut coordinators = vec![
        node(env, "coordinator").await?,
        node(env, "coordinator").await?,
    ];
    let mut workers = vec![node(env, "worker").await?, node(env, "worker").await?];
    let workflow = env.deploy(LOAD).await?;
    let campaign = env.default_campaign().await?;
    env.start(
        &workflow,
        (campaign.0, &campaign.1),
        options.instances,
        true,
    )
    .await?;

    eprintln!("killing a busy worker {} times…", options.kills);
    let mut redispatch = Vec::new();
    let mut complete = Vec::new();
    for round in 0..options.kills {
        let victim = round % workers.len();
        let victim_id = workers[victim].1;
        let orphans = busy(env, victim_id).await?;
        workers[victim].0.kill().await?;
        let killed = Instant::now();
        poll("re-dispatch", Duration::from_secs(30), || async {
            Ok(running(env, victim_id).await?.is_empty())
        })
        .await?;
        redispatch.push(killed.elapsed().as_secs_f64() * 1000.0);
        // Complete: the interrupted step checkpointed elsewhere (requeue +1, the step +1).
        poll(
            "the interrupted steps to complete",
            Duration::from_secs(60),
            || async { progressed(env, &orphans).await },
        )
        .await?;
        complete.push(killed.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "  kill {}: {} orphans, re-dispatched in {:.0} ms, completed in {:.0} ms",
            round + 1,
            orphans.len(),
            redispatch[round],
            complete[round]
        );
        workers[victim] = node(env, "worker").await?;
    }

    eprintln!("freezing a busy worker {} times…", options.freezes);
    let mut unfrozen = Vec::new();
    for round in 0..options.freezes {
        // The busiest worker: a node keeps continuing what it runs, so a replaced one may
        // hold nothing yet.
        let mut victim = 0;
        let mut most = 0;
        for (i, (_, id)) in workers.iter().enumerate() {
            let count = running(env, *id).await?.len();
            if count > most {
                (victim, most) = (i, count);
            }
        }
        // Affected: what it runs and every READY instance, whose job it may hold unstarted
        // (+1: claimed and committed once).
        let mut affected = busy(env, workers[victim].1).await?;
        let ready: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT id, step_seq FROM instance WHERE state = 'ready'")
                .fetch_all(env.store.pool())
                .await?;
        affected.extend(ready.into_iter().map(|(id, seq)| (InstanceId(id), seq + 1)));
        signal(&workers[victim].0, "-STOP")?;
        let frozen = Instant::now();
        poll(
            "every affected instance to commit its next step",
            Duration::from_secs(60),
            || async { progressed(env, &affected).await },
        )
        .await?;
        unfrozen.push(frozen.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "  freeze {}: {} affected, all on their next step in {:.0} ms",
            round + 1,
            affected.len(),
            unfrozen[round]
        );
        signal(&workers[victim].0, "-CONT")?;
        workers[victim].0.kill().await?;
        workers[victim] = node(env, "worker").await?;
    }

    eprintln!("killing the leader {} times…", options.failovers);
    let mut failover = Vec::new();
    for _ in 0..options.failovers {
        let lease = env.store.lease(COORDINATOR_LEASE).await?.context("lease")?;
        let Some(index) = coordinators
            .iter()
            .position(|(_, id)| Some(*id) == lease.holder)
        else {
            anyhow::bail!("no coordinator of ours holds the lease");
        };
        let term = lease.term;
        coordinators[index].0.kill().await?;
        let killed = Instant::now();
        poll("another leader", Duration::from_secs(30), || async {
            let lease = env.store.lease(COORDINATOR_LEASE).await?.context("lease")?;
            Ok(lease.live && lease.term > term)
        })
        .await?;
        failover.push(killed.elapsed().as_secs_f64() * 1000.0);
        coordinators[index] = node(env, "coordinator").await?;
    }
    let stuck = env
        .store
        .list_instances(&InstanceFilter {
            state: Some(drover_core::InstanceState::InError),
            limit: 10,
            ..Default::default()
        })
        .await?
        .instances;
    anyhow::ensure!(
        stuck.is_empty(),
        "instances ended in_error: {:?}",
        stuck.first().map(|i| &i.error)
    );
    drop(workers);
    drop(coordinators);

    let floor = DEAD_AFTER.as_secs_f64() * 1000.0;
    let ttl = LEASE_TTL.as_secs_f64() * 1000.0;
    let row = |name: &str, values: &[f64], base: f64, base_name: &str| {
        let (p50, p99) = (quantile(values, 0.5), quantile(values, 0.99));
        println!(
            "{name:<44} p50 {p50:>6.0} ms  p99 {p99:>6.0} ms   {:.2}x / {:.2}x {base_name} ({base:.0} ms)",
            p50 / base,
            p99 / base
        );
        json!({ "p50_ms": p50, "p99_ms": p99, "baseline_ms": base, "baseline": base_name, "samples": values })
    };
    println!();
    let r = row(
        &format!("kill -9 → re-dispatched ({} kills)", options.kills),
        &redispatch,
        floor,
        "dead-node deadline",
    );
    let c = row(
        "kill -9 → interrupted step completed",
        &complete,
        floor,
        "dead-node deadline",
    );
    let z = row(
        &format!(
            "SIGSTOP → affected on their next step ({})",
            options.freezes
        ),
        &unfrozen,
        floor,
        "dead-node deadline",
    );
    let f = row(
        &format!("leader kill -9 → new leader ({} kills)", options.failovers),
        &failover,
        ttl,
        "lease TTL",
    );
    let figure = |name: &str, values: &[f64], q: f64, base: f64, base_name: &str| {
        Figure::new(name, quantile(values, q), Unit::Millis, base_name, base)
    };
    Ok(Report {
        figures: vec![
            figure(
                "kill -9 → orphans re-dispatched, p50",
                &redispatch,
                0.5,
                floor,
                "dead-node deadline",
            ),
            figure(
                "kill -9 → orphans re-dispatched, p99",
                &redispatch,
                0.99,
                floor,
                "dead-node deadline",
            ),
            figure(
                "kill -9 → interrupted step completed elsewhere, p50",
                &complete,
                0.5,
                floor,
                "dead-node deadline",
            ),
            figure(
                "kill -9 → interrupted step completed elsewhere, p99",
                &complete,
                0.99,
                floor,
                "dead-node deadline",
            ),
            figure(
                "SIGSTOP → every affected instance on its next step, p99",
                &unfrozen,
                0.99,
                floor,
                "dead-node deadline",
            ),
            figure(
                "leader kill -9 → new leader, p50",
                &failover,
                0.5,
                ttl,
                "lease TTL",
            ),
        ],
        json: json!({ "kill_to_redispatch": r, "kill_to_complete": c, "stop_to_next_step": z, "leader_failover": f }),
    })
}

/// Once `node` runs at least 5 instances: each with the step number it reaches once it is
/// requeued and its interrupted step is committed elsewhere (+2).
async fn busy(env: &BenchEnv, node: NodeId) -> anyhow::Result<HashMap<InstanceId, i64>> {
    poll(
        "the victim to hold running instances",
        Duration::from_secs(30),
        || async { Ok(running(env, node).await?.len() >= 5) },
    )
    .await?;
    Ok(running(env, node)
        .await?
        .into_iter()
        .map(|(id, seq)| (id, seq + 2))
        .collect())
}

/// Whether every instance of `targets` reached its step number.
async fn progressed(env: &BenchEnv, targets: &HashMap<InstanceId, i64>) -> anyhow::Result<bool> {
    let ids: Vec<Uuid> = targets.keys().map(|id| id.0).collect();
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT id, step_seq FROM instance WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(env.store.pool())
            .await?;
    Ok(rows.iter().all(|(id, seq)| {
        targets
            .get(&InstanceId(*id))
            .is_some_and(|target| *seq >= *target)
    }))
}

/// Sends `signal` (`-STOP`, `-CONT`) to a node process.
fn signal(child: &Child, signal: &str) -> anyhow::Result<()> {
    let pid = child.id().context("the node has exited")?;
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}
