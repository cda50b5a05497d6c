//! History must not slow the hot path: steps/s through the workers, and the store's claim and
//! commit latency, as the instance table fills with finished instances (10k → 1M, each with
//! its journal). The smallest level, measured in the same run, is the baseline.

use std::time::Instant;

use chrono::Utc;
use drover_core::{CampaignId, InstanceState, NodeId};
use drover_store::{Commit, Completion, StepJob, Transition};
use serde_json::{Value, json};

use crate::chart::{self, Panel};
use crate::env::{BenchEnv, Deployed};
use crate::latency::noop3;
use crate::{Figure, Quantiles, Report, Unit};

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Finished instances in the table at each level (each with a 4-row journal).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub(crate) rows: Vec<u64>,
    /// Instances run through the workers at each level.
    #[arg(long, default_value_t = 3000)]
    pub(crate) instances: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
    /// Batches claimed and committed directly at each level (3 claims and 3 commits each).
    #[arg(long, default_value_t = 100)]
    pub(crate) probes: usize,
    /// Instances per probe batch.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rows: vec![10_000, 100_000, 1_000_000],
            instances: 3000,
            workers: 2,
            probes: 100,
            batch: 64,
        }
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    let env = BenchEnv::new().await?;
    let result = measure(&env, options).await;
    env.cleanup().await;
    result
}

struct Level {
    rows: i64,
    journal_rows: i64,
    table_mb: f64,
    steps_per_s: f64,
    claim: Quantiles,
    commit: Quantiles,
}

async fn measure(env: &BenchEnv, options: &Options) -> anyhow::Result<Report> {
    eprintln!("starting {} worker processes…", options.workers);
    let workers = env.spawn_nodes("worker", options.workers).await?;
    let history = env.deploy(&noop3("history")).await?;
    let probe = env.deploy(&noop3("probe")).await?;
    let campaign = env.default_campaign().await?;
    let node = drover_core::NodeId::new();
    env.store
        .register_node(&drover_store::NewNode::new(
            node,
            &["bench".to_owned()],
            "bench",
            "probe",
        ))
        .await?;

    let mut targets = options.rows.clone();
    targets.sort_unstable();
    let mut filled = 0;
    let mut levels = Vec::new();
    for (i, &target) in targets.iter().enumerate() {
        if target > filled {
            eprintln!("filling history to {target} finished instances…");
            let t = Instant::now();
            fill(env, campaign.0, history.version, target - filled).await?;
            filled = target;
            eprintln!("  filled in {:.1} s", t.elapsed().as_secs_f64());
        }
        // Each level starts from the same footing: the previous level's dead row versions
        // vacuumed and its writes checkpointed, as autovacuum and the checkpointer would
        // have done by then.
        sqlx::query("VACUUM (ANALYZE) instance, journal, event_fact")
            .execute(env.store.pool())
            .await?;
        sqlx::query("CHECKPOINT").execute(env.store.pool()).await?;
        let (claim, commit) =
            probe_store(env, node, &probe, (campaign.0, &campaign.1), options).await?;
        let name = format!("run{i}");
        let run = env.deploy(&noop3(&name)).await?;
        let started = Instant::now();
        let ids = env
            .start(&run, (campaign.0, &campaign.1), options.instances, true)
            .await?
            .ids;
        env.wait_completed(&ids, started).await?;
        let steps_per_s = crate::rate(u64::from(options.instances) * 3, started.elapsed());
        let (rows, journal_rows, bytes): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM instance), (SELECT count(*) FROM journal),
                    pg_total_relation_size('instance') + pg_total_relation_size('journal')",
        )
        .fetch_one(env.store.pool())
        .await?;
        eprintln!(
            "  {rows} instances: {steps_per_s:.0} steps/s, claim p50 {:.1} ms, commit p50 {:.1} ms",
            claim.p50, commit.p50
        );
        levels.push(Level {
            rows,
            journal_rows,
            table_mb: bytes as f64 / 1e6,
            steps_per_s,
            claim,
            commit,
        });
    }
    drop(workers);

    let chart_path = crate::out_dir()?.join("scale.svg");
    let points = |f: &dyn Fn(&Level) -> f64| -> Vec<(f64, f64)> {
        levels.iter().map(|l| (l.rows as f64, f(l))).collect()
    };
    chart::write_svg(
        &chart_path,
        &format!(
            "scale: finished instances in the table vs the hot path ({} workers)",
            options.workers
        ),
        &[
            Panel::new(
                "no-op steps/s through the workers",
                "instances in the table",
                "steps/s",
            )
            .series("steps/s", points(&|l| l.steps_per_s))
            .log_x(),
            Panel::new(
                &format!("store latency per batch of {}", options.batch),
                "instances in the table",
                "ms",
            )
            .series("claim p50", points(&|l| l.claim.p50))
            .series("claim p99", points(&|l| l.claim.p99))
            .series("commit p50", points(&|l| l.commit.p50))
            .series("commit p99", points(&|l| l.commit.p99))
            .log_x(),
        ],
    )?;

    println!();
    println!(
        "{:>10} {:>10} {:>9} {:>10}   {:>20}   {:>20}",
        "instances",
        "journal",
        "MB",
        "steps/s",
        format!("claim({}) p50 / p99", options.batch),
        format!("commit({}) p50 / p99", options.batch)
    );
    for l in &levels {
        println!(
            "{:>10} {:>10} {:>9.0} {:>8.0}/s   {:>8.2} / {:>6.2} ms   {:>8.2} / {:>6.2} ms",
            l.rows,
            l.journal_rows,
            l.table_mb,
            l.steps_per_s,
            l.claim.p50,
            l.claim.p99,
            l.commit.p50,
            l.commit.p99
        );
    }
    println!("chart: {}", chart_path.display());

    let mut figures = Vec::new();
    if let (Some(small), Some(big)) = (levels.first(), levels.last()) {
        let at = |what: &str| format!("{what} with {} instances in the table", big.rows);
        let base = |what: &str| format!("{what} with {}", small.rows);
        figures.push(Figure::new(
            at("no-op steps/s"),
            big.steps_per_s,
            Unit::PerSecond,
            base("same"),
            small.steps_per_s,
        ));
        figures.push(Figure::new(
            at(&format!("claim of {} p50", options.batch)),
            big.claim.p50,
            Unit::Millis,
            base("same"),
            small.claim.p50,
        ));
        figures.push(Figure::new(
            at(&format!("commit of {} p50", options.batch)),
            big.commit.p50,
            Unit::Millis,
            base("same"),
            small.commit.p50,
        ));
    }
    Ok(Report {
        figures,
        json: json!({
            "workers": options.workers,
            "instances_per_level": options.instances,
            "probe_batch": options.batch,
            "levels": levels.iter().map(|l| json!({
                "instances": l.rows,
                "journal_rows": l.journal_rows,
                "table_mb": l.table_mb,
                "steps_per_s": l.steps_per_s,
                "claim": l.claim.to_json(),
                "commit": l.commit.to_json(),
            })).collect::<Vec<Value>>(),
            "chart": chart_path,
        }),
    })
}

/// Adds `n` finished instances of `history` (created over the last 90 days), each with the
/// four journal rows of a 3-step run, 100,000 per statement.
pub(crate) async fn fill(
    env: &BenchEnv,
    campaign: CampaignId,
    version: i32,
    n: u64,
) -> anyhow::Result<()> {
    let mut left = i64::try_from(n)?;
    while left > 0 {
        let chunk = left.min(100_000);
        sqlx::query(
            r#"WITH ins AS (
                 INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                                       step_seq, step_entered_seq, steps_run, fence, vars,
                                       outputs, created_at, updated_at, finished_at)
                 SELECT gen_random_uuid(), $1, 'history', $2, 'completed', 'c', 3, 3, 3, 3,
                        '{"x": 1, "y": 2}', '{"a": {"x": 1}, "b": {"y": 2}}',
                        t, t + interval '40 ms', t + interval '40 ms'
                 FROM (SELECT now() - random() * interval '90 days' AS t
                       FROM generate_series(1::bigint, $3::bigint)) g
                 RETURNING id, created_at
               )
               INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                    attempt, actor, started_at, finished_at)
               SELECT ins.id, s, (ARRAY['a', 'a', 'b', 'c'])[s + 1],
                      CASE WHEN s = 0 THEN 'started' ELSE 'completed' END,
                      (ARRAY['a', 'b', 'c', 'completed'])[s + 1], s, 1,
                      CASE WHEN s = 0 THEN 'bench' END,
                      ins.created_at + s * interval '10 ms', ins.created_at + s * interval '10 ms'
               FROM ins CROSS JOIN generate_series(0, 3) s"#,
        )
        .bind(campaign.0)
        .bind(version)
        .bind(chunk)
        .execute(env.store.pool())
        .await?;
        left -= chunk;
    }
    Ok(())
}

/// Runs `probes` batches of new `probe` instances through their three steps by calling the
/// store as a worker does (claim, then group commit, per step): the latency of each call.
async fn probe_store(
    env: &BenchEnv,
    node: NodeId,
    probe: &Deployed,
    campaign: (CampaignId, &str),
    options: &Options,
) -> anyhow::Result<(Quantiles, Quantiles)> {
    let mut claims = Vec::new();
    let mut commits = Vec::new();
    for _ in 0..options.probes {
        let mut jobs = env
            .start(probe, campaign, options.batch, false)
            .await?
            .ready;
        for step in ["a", "b", "c"] {
            let t = Instant::now();
            let claimed = env.store.claim(node, &jobs).await?;
            claims.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(
                claimed.len() == jobs.len(),
                "claimed {} of {} probe instances",
                claimed.len(),
                jobs.len()
            );
            let completions: Vec<Completion> = claimed
                .iter()
                .map(|c| {
                    let transition = match step {
                        "a" => Transition::next(&probe.def, "b"),
                        "b" => Transition::next(&probe.def, "c"),
                        _ => Transition::Stop {
                            state: InstanceState::Completed,
                        },
                    };
                    Completion {
                        vars: Some(json!({ "x": 1 })),
                        output: Some(json!({ "x": 1 })),
                        ..Completion::of(c, Utc::now(), "completed", transition)
                    }
                })
                .collect();
            let t = Instant::now();
            let results = env.store.commit(node, &completions).await?;
            commits.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(
                results.iter().all(|r| *r == Commit::Committed),
                "a probe commit did not land: {results:?}"
            );
            jobs = completions
                .iter()
                .map(|c| StepJob {
                    instance: c.instance,
                    step_seq: c.step_seq.next(),
                    fence: c.fence,
                    route: Default::default(),
                })
                .collect();
        }
    }
    Ok((Quantiles::of(&claims), Quantiles::of(&commits)))
}
