//! The physical ceiling of one step on this machine, measured without Drover: a raw loop of
//! "pull a JetStream message → one Postgres transaction (update + insert) → commit → publish
//! the next message (awaiting its ack) → ack", at several concurrencies; raw Postgres
//! single-row commits; raw JetStream publishes with ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

use crate::env::BenchEnv;
use crate::{Quantiles, Report, rate};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Concurrencies of the raw step loop.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub(crate) concurrency: Vec<usize>,
    /// Steps per raw-loop run (3 per instance).
    #[arg(long, default_value_t = 6000)]
    pub(crate) steps: u64,
    /// Seconds for each of the raw commit and publish rates.
    #[arg(long, default_value_t = 3)]
    pub(crate) seconds: u64,
    /// Steps of the raw one-at-a-time chain that measures step-to-step latency.
    #[arg(long, default_value_t = 1000)]
    pub(crate) chain: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            concurrency: vec![1, 8, 32, 64],
            steps: 6000,
            seconds: 3,
            chain: 1000,
        }
    }
}

/// The measured ceilings.
#[derive(Clone, Debug)]
pub(crate) struct Baseline {
    /// Raw step loop: (concurrency, steps/s).
    pub(crate) step_loop: Vec<(usize, f64)>,
    pub(crate) pg_commits_per_s: f64,
    pub(crate) js_publishes_per_s: f64,
}

impl Baseline {
    /// The best raw step-loop rate: the ceiling Drover's throughput is compared with.
    pub(crate) fn best_step_loop(&self) -> f64 {
        self.step_loop.iter().map(|(_, r)| *r).fold(0.0, f64::max)
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "step_loop": self.step_loop.iter().map(|(c, r)| json!({"concurrency": c, "steps_per_s": r})).collect::<Vec<_>>(),
            "pg_commits_per_s": self.pg_commits_per_s,
            "js_publishes_per_s": self.js_publishes_per_s,
        })
    }

    pub(crate) fn print(&self) {
        println!("{:<58} {:>12}", "baseline", "rate");
        for (c, r) in &self.step_loop {
            println!(
                "{:<58} {:>10.0}/s",
                format!("raw pull→pg txn→publish→ack loop, concurrency {c}"),
                r
            );
        }
        println!(
            "{:<58} {:>10.0}/s",
            "raw Postgres single-row commits (8 connections)", self.pg_commits_per_s
        );
        println!(
            "{:<58} {:>10.0}/s",
            "raw JetStream publish+ack (8 publishers)", self.js_publishes_per_s
        );
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = async {
        let baseline = measure(&env, options).await?;
        let latency = step_latency(&env, options.chain).await?;
        Ok::<_, anyhow::Error>((baseline, latency))
    }
    .await;
    env.cleanup().await;
    let (baseline, latency) = result?;
    println!();
    baseline.print();
    print_latency(&latency);
    let mut json = baseline.to_json();
    json["step_latency"] = latency.to_json();
    Ok(Report {
        figures: Vec::new(),
        json,
    })
}

/// Prints the raw one-step latency row.
pub(crate) fn print_latency(q: &Quantiles) {
    println!(
        "{:<58} p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        format!("raw step-to-step latency, one chain of {} steps", q.n + 1),
        q.p50,
        q.p90,
        q.p99,
        q.max
    );
}

/// The raw stream and tables the baselines use, in the run's database and prefix.
struct Raw {
    js: jetstream::Context,
    pool: sqlx::PgPool,
    stream: String,
    prefix: String,
}

impl Raw {
    async fn setup(env: &BenchEnv, connections: u32) -> anyhow::Result<Self> {
        let js = env.bus.jetstream().clone();
        let stream = env.bus.subjects().jobs_stream().replace("_JOBS", "_RAW");
        js.create_or_update_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{}.raw.>", env.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .context("creating the raw stream")?;
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect(&env.database_url)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS raw_instance (id bigint PRIMARY KEY, step int NOT NULL)",
        )
        .execute(&pool)
        .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS raw_journal (id bigint, step int, at timestamptz DEFAULT now(), PRIMARY KEY (id, step))")
            .execute(&pool)
            .await?;
        Ok(Self {
            js,
            pool,
            stream,
            prefix: env.prefix.clone(),
        })
    }

    async fn teardown(self) {
        let _ = self.js.delete_stream(&self.stream).await;
        self.pool.close().await;
    }

    /// One raw step: the instance row's update and the journal insert, in one transaction.
    async fn step(&self, id: i64, step: i32) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE raw_instance SET step = $2 WHERE id = $1 AND step = $2 - 1")
            .bind(id)
            .bind(step)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO raw_journal (id, step) VALUES ($1, $2)")
            .bind(id)
            .bind(step)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// A fresh range of `n` instance ids, inserted at step 0.
    async fn instances(&self, n: i64) -> anyhow::Result<i64> {
        let (base,): (i64,) = sqlx::query_as("SELECT coalesce(max(id), 0) + 1 FROM raw_instance")
            .fetch_one(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO raw_instance SELECT g, 0 FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind(base)
        .bind(base + n - 1)
        .execute(&self.pool)
        .await?;
        Ok(base)
    }

    async fn consumer(&self, name: &str, subject: &str) -> anyhow::Result<consumer::PullConsumer> {
        let stream = self.js.get_stream(&self.stream).await?;
        Ok(stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                filter_subject: subject.to_owned(),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await?)
    }
}

pub(crate) async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Baseline> {
    let max_c = options
        .concurrency
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(8);
    let raw = Raw::setup(env, u32::try_from(max_c).unwrap_or(64)).await?;
    let result = async {
        let mut step_loop = Vec::new();
        for (run, &c) in options.concurrency.iter().enumerate() {
            let r = step_loop_rate(&raw, run, c, options.steps).await?;
            eprintln!("  raw loop c={c}: {r:.0} steps/s");
            step_loop.push((c, r));
        }
        let seconds = Duration::from_secs(options.seconds);
        let pg_commits_per_s = pg_commit_rate(&raw.pool, 8, seconds).await?;
        let js_publishes_per_s =
            js_publish_rate(&raw.js, &format!("{}.raw.pub", raw.prefix), 8, seconds).await?;
        Ok(Baseline {
            step_loop,
            pg_commits_per_s,
            js_publishes_per_s,
        })
    }
    .await;
    raw.teardown().await;
    result
}

/// The floor of step-to-step latency here: one chain of `steps` raw steps with one message in
/// flight (pull → Postgres transaction → publish the next, awaiting its ack → ack), timed from
/// one commit to the next.
pub(crate) async fn step_latency(env: &BenchEnv, steps: u32) -> anyhow::Result<Quantiles> {
    let raw = Raw::setup(env, 2).await?;
    let result = chain(&raw, steps.max(2)).await;
    raw.teardown().await;
    result
}

async fn chain(raw: &Raw, steps: u32) -> anyhow::Result<Quantiles> {
    let id = raw.instances(1).await?;
    let subject = format!("{}.raw.chain{id}", raw.prefix);
    let consumer = raw.consumer(&format!("chain{id}"), &subject).await?;
    let mut messages = consumer.messages().await?;
    raw.js
        .publish(subject.clone(), encode(id, 1))
        .await?
        .await?;
    let mut gaps = Vec::with_capacity(steps as usize);
    let mut last: Option<Instant> = None;
    for step in 1..=i32::try_from(steps)? {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("the raw chain stalled")?
            .context("the raw chain's stream ended")?
            .map_err(|e| anyhow::anyhow!("raw chain: {e}"))?;
        raw.step(id, step).await?;
        let now = Instant::now();
        if let Some(last) = last {
            gaps.push((now - last).as_secs_f64() * 1000.0);
        }
        last = Some(now);
        if step < i32::try_from(steps)? {
            raw.js
                .publish(subject.clone(), encode(id, step + 1))
                .await?
                .await?;
        }
        msg.ack()
            .await
            .map_err(|e| anyhow::anyhow!("raw chain ack: {e}"))?;
    }
    Ok(Quantiles::of(&gaps))
}

fn encode(id: i64, step: i32) -> bytes::Bytes {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&step.to_be_bytes());
    b.into()
}

fn decode(payload: &[u8]) -> Option<(i64, i32)> {
    let id = i64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
    let step = i32::from_be_bytes(payload.get(8..12)?.try_into().ok()?);
    Some((id, step))
}

async fn step_loop_rate(
    raw: &Raw,
    run: usize,
    concurrency: usize,
    steps: u64,
) -> anyhow::Result<f64> {
    let subject = format!("{}.raw.loop{run}", raw.prefix);
    let instances = i64::try_from((steps / 3).max(1))?;
    let base = raw.instances(instances).await?;
    let consumer = raw.consumer(&format!("loop{run}"), &subject).await?;
    let mut acks = Vec::new();
    for id in base..base + instances {
        acks.push(raw.js.publish(subject.clone(), encode(id, 1)).await?);
    }
    for ack in acks {
        ack.await?;
    }
    let total = usize::try_from(instances * 3)?;
    let messages = consumer.messages().await?;
    let started = Instant::now();
    messages
        .take(total)
        .for_each_concurrent(concurrency, |msg| {
            let subject = subject.clone();
            async move {
                let Ok(msg) = msg else { return };
                let Some((id, step)) = decode(&msg.payload) else {
                    return;
                };
                if let Err(err) = raw.step(id, step).await {
                    eprintln!("raw loop txn: {err}");
                    return;
                }
                if step < 3 {
                    match raw.js.publish(subject, encode(id, step + 1)).await {
                        Ok(ack) => {
                            let _ = ack.await;
                        }
                        Err(err) => eprintln!("raw loop publish: {err}"),
                    }
                }
                let _ = msg.ack().await;
            }
        })
        .await;
    Ok(crate::rate(total as u64, started.elapsed()))
}

async fn pg_commit_rate(
    pool: &sqlx::PgPool,
    tasks: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE IF NOT EXISTS raw_commit (id bigserial PRIMARY KEY, v int)")
        .execute(pool)
        .await?;
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (pool, count, stop) = (pool.clone(), Arc::clone(&count), Arc::clone(&stop));
        handles.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if sqlx::query("INSERT INTO raw_commit (v) VALUES (1)")
                    .execute(&pool)
                    .await
                    .is_ok()
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    Ok(rate(count.load(Ordering::Relaxed), started.elapsed()))
}

async fn js_publish_rate(
    js: &jetstream::Context,
    subject: &str,
    tasks: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (js, count, stop, subject) = (
            js.clone(),
            Arc::clone(&count),
            Arc::clone(&stop),
            subject.to_owned(),
        );
        handles.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(ack) = js.publish(subject.clone(), "x".into()).await
                    && ack.await.is_ok()
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    Ok(rate(count.load(Ordering::Relaxed), started.elapsed()))
}
