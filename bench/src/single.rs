//! One workflow at a time, as a client sees it: `POST /v1/instances?wait=…` of a 3-step no-op
//! workflow, answered when the instance ends, against one node (api + worker), one start after
//! the other. Beside it, in the same run, the raw one-step latency (JetStream → Postgres
//! commit → ack → publish), three of which are the floor of a 3-step workflow.

use std::time::Instant;

use anyhow::Context;
use drover_api::{Secret, StartRequest};
use serde_json::json;

use crate::env::{BenchEnv, api_client};
use crate::latency::noop3;
use crate::{Figure, Quantiles, Report, Unit, baseline};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Workflows to run, one after the other.
    #[arg(long, default_value_t = 500)]
    pub(crate) runs: u32,
    /// Runs before measuring (connections open, statements get planned).
    #[arg(long, default_value_t = 50)]
    pub(crate) warmup: u32,
    /// Steps of the raw one-step chain (the baseline).
    #[arg(long, default_value_t = 1000)]
    pub(crate) chain: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 500,
            warmup: 50,
            chain: 1000,
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
    eprintln!("measuring the raw one-step latency…");
    let raw = baseline::step_latency(env, options.chain).await?;

    let client_ms = one_at_a_time(env, "single", options.warmup, options.runs).await?;
    let client = Quantiles::of(&client_ms);

    // The same runs from the database's clocks: created → first step, step → step, and the
    // whole instance (created → last checkpoint).
    let (idle_steps, db_total): (Vec<f64>, Vec<f64>) = {
        let steps: Vec<(f64,)> = sqlx::query_as(
            "SELECT (extract(epoch FROM j.finished_at - p.finished_at) * 1000)::float8
             FROM instance i
             JOIN journal j ON j.instance_id = i.id AND j.step_seq > 0
             JOIN journal p ON p.instance_id = j.instance_id AND p.step_seq = j.step_seq - 1
             WHERE i.workflow = 'single'",
        )
        .fetch_all(env.store.pool())
        .await?;
        let totals: Vec<(f64,)> = sqlx::query_as(
            "SELECT (extract(epoch FROM max(j.finished_at) - i.created_at) * 1000)::float8
             FROM instance i JOIN journal j ON j.instance_id = i.id
             WHERE i.workflow = 'single' GROUP BY i.id, i.created_at",
        )
        .fetch_all(env.store.pool())
        .await?;
        (
            steps.into_iter().map(|(v,)| v).collect(),
            totals.into_iter().map(|(v,)| v).collect(),
        )
    };
    let idle = Quantiles::of(&idle_steps);
    let db_total = Quantiles::of(&db_total);

    println!();
    baseline::print_latency(&raw);
    println!(
        "{:<58} p50 {:>6.2} ms  p99 {:>6.2} ms",
        "client start → result, one 3-step workflow at a time", client.p50, client.p99
    );
    println!(
        "{:<58} p50 {:>6.2} ms  p99 {:>6.2} ms",
        "  … created → ended, database clocks", db_total.p50, db_total.p99
    );
    println!(
        "{:<58} p50 {:>6.2} ms  p99 {:>6.2} ms",
        "  … step → step when idle", idle.p50, idle.p99
    );
    Ok(Report {
        figures: vec![
            Figure::new(
                "one workflow at a time, start → result p50",
                client.p50,
                Unit::Millis,
                "3 × raw one-step p50",
                3.0 * raw.p50,
            ),
            Figure::new(
                "one workflow at a time, start → result p99",
                client.p99,
                Unit::Millis,
                "3 × raw one-step p99",
                3.0 * raw.p99,
            ),
            Figure::new(
                "idle step → step p50",
                idle.p50,
                Unit::Millis,
                "raw one-step p50",
                raw.p50,
            ),
        ],
        json: json!({
            "runs": options.runs,
            "raw_one_step": raw.to_json(),
            "client_start_to_result": client.to_json(),
            "db_created_to_ended": db_total.to_json(),
            "idle_step_to_step": idle.to_json(),
        }),
    })
}

/// Starts one node (api + worker), deploys the 3-step no-op workflow as `name` and runs it
/// `warmup + runs` times one after the other through `POST /v1/instances?wait=30s`: answers
/// the client's start → result times of the last `runs`, in milliseconds. The node is stopped
/// before it answers.
pub(crate) async fn one_at_a_time(
    env: &BenchEnv,
    name: &str,
    warmup: u32,
    runs: u32,
) -> anyhow::Result<Vec<f64>> {
    let token = Secret::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen = free_local_port()?;
    let _node = env.spawn_api_node(&listen, token.expose())?;
    let client = api_client(&listen, token).await?;
    client
        .deploy(noop3(name))
        .await
        .map_err(|e| anyhow::anyhow!("deploying: {e}"))?;
    let request = StartRequest {
        workflow: name.into(),
        ..StartRequest::default()
    };

    eprintln!("running {warmup} + {runs} workflows one at a time…");
    let mut client_ms = Vec::with_capacity(runs as usize);
    for i in 0..warmup + runs {
        let started = Instant::now();
        let answer = client
            .start(&request, Some("30s"))
            .await
            .map_err(|e| anyhow::anyhow!("starting: {e}"))?;
        let took = started.elapsed();
        let state = answer["result"]["instance"]["state"].as_str();
        anyhow::ensure!(
            state == Some("completed"),
            "run {i} answered without a completed instance: {answer}"
        );
        if i >= warmup {
            client_ms.push(took.as_secs_f64() * 1000.0);
        }
    }
    Ok(client_ms)
}

/// A free loopback address for the node's API (bound, then released for the node to take).
pub(crate) fn free_local_port() -> anyhow::Result<String> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(socket.local_addr()?.to_string())
}
