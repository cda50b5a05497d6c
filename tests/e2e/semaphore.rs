//! Campaign concurrency limits end to end (ARCHITECTURE.md, "Semaphore"): concurrent starters
//! while instances finish, workers killed and frozen mid-run, the limit lowered and raised
//! mid-run, `in_error` under each permit policy, and sub-workflow children under a limit of 1.
//! A sampler reads the permit holders every few milliseconds and fails on any overshoot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use drover_tests::{NodeProcess, Recorder, TestEnv, wait_until};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;

use crate::support::{deploy, get, post_json};

/// One short handler step: a permit is held for about `ms` (plus dispatch).
const SLOW: &str = r#"
name: slow
vars: { ms: 40 }
steps:
  - { id: work, kind: handler, handler: slow, input: { ms: "vars.ms" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

/// `call` answers the status `vars.status` names: 404 (permanent: `in_error`) until an
/// operator corrects it.
fn flaky(recorder: &str) -> String {
    format!(
        r#"
name: flaky
vars: {{ status: 404 }}
steps:
  - id: call
    kind: http
    method: POST
    url: "{recorder}/status/call"
    body: {{ status: "vars.status" }}
    next: [{{ to: done }}]
  - {{ id: done, kind: end, status: completed }}
"#
    )
}

/// Ten children, one after the other.
const PARENT: &str = r#"
name: parent
vars: { i: 0 }
steps:
  - { id: call, kind: subworkflow, workflow: slow, input: { ms: "10" }, next: [{ to: count }] }
  - { id: count, kind: assign, set: { i: "vars.i + 1" }, next: [{ to: call, when: "vars.i < 10" }, { to: done }] }
  - { id: done, kind: end, status: completed }
"#;

/// Starts `count` instances of `workflow` in `campaign`; returns their ids.
async fn start_in(
    api: &str,
    workflow: &str,
    campaign: &str,
    vars: Value,
    count: u32,
) -> anyhow::Result<Vec<String>> {
    let (status, body) = post_json(
        &format!("{api}/v1/instances"),
        &json!({ "workflow": workflow, "campaign": campaign, "vars": vars, "count": count }),
    )
    .await?;
    if status != 201 {
        bail!("start answered {status}: {body}");
    }
    Ok(body["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect())
}

async fn instance(api: &str, id: &str) -> anyhow::Result<Value> {
    let (status, body) = get(&format!("{api}/v1/instances/{id}")).await?;
    anyhow::ensure!(status == 200, "GET instance {id} answered {status}: {body}");
    Ok(body)
}

async fn wait_state(api: &str, id: &str, state: &str) -> anyhow::Result<Value> {
    wait_until(
        &format!("instance {id} to be {state}"),
        Duration::from_secs(30),
        || async {
            let body = instance(api, id).await?;
            Ok((body["state"] == state).then_some(body))
        },
    )
    .await
}

/// Creates a campaign through the CLI.
async fn create_campaign(
    env: &TestEnv,
    api: &str,
    name: &str,
    limit: u32,
    policy: &str,
) -> anyhow::Result<()> {
    let out = env
        .cli(
            api,
            &[
                "campaign",
                "create",
                name,
                "--max-running",
                &limit.to_string(),
                "--on-error-permit",
                policy,
            ],
        )
        .await?;
    anyhow::ensure!(out.contains(name), "{out}");
    Ok(())
}

/// `(holders, running, queued)` of a campaign's rows, and whether a holder admitted from the
/// queue is behind a place still queued (a FIFO break).
async fn sample(pool: &PgPool, campaign: &str) -> anyhow::Result<(i64, i64, i64, bool)> {
    let (holders, running, queued, last_admitted, head): (i64, i64, i64, Option<i64>, Option<i64>) =
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE i.holds_permit),
                    count(*) FILTER (WHERE i.state = 'running' AND i.parent_instance_id IS NULL),
                    count(*) FILTER (WHERE i.state = 'queued'),
                    max(i.queue_seq) FILTER (WHERE i.holds_permit),
                    min(i.queue_seq) FILTER (WHERE i.state = 'queued')
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE c.name = $1 AND (i.holds_permit OR i.state IN ('queued', 'running'))",
        )
        .bind(campaign)
        .fetch_one(pool)
        .await?;
    let out_of_order = matches!((last_admitted, head), (Some(last), Some(head)) if last > head);
    Ok((holders, running, queued, out_of_order))
}

/// Samples a campaign every few milliseconds until stopped; fails on the first sample over
/// `limit` (holders or RUNNING rows) or out of FIFO order.
struct Sampler {
    stop: Arc<AtomicBool>,
    limit: Arc<AtomicI64>,
    task: JoinHandle<anyhow::Result<(i64, u64)>>,
}

impl Sampler {
    fn start(env: &TestEnv, campaign: &str, limit: i64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let limit = Arc::new(AtomicI64::new(limit));
        let store = env.store.clone();
        let campaign = campaign.to_owned();
        let (stop_flag, limit_now) = (stop.clone(), limit.clone());
        let task = tokio::spawn(async move {
            let (mut max, mut samples) = (0, 0u64);
            while !stop_flag.load(Ordering::Relaxed) {
                let (holders, running, queued, out_of_order) =
                    sample(store.pool(), &campaign).await?;
                let limit = limit_now.load(Ordering::Relaxed);
                if holders > limit || running > limit {
                    bail!(
                        "overshoot: {holders} permit holders, {running} running (limit {limit}, \
                         {queued} queued)"
                    );
                }
                if out_of_order {
                    bail!("a holder was admitted ahead of an instance queued before it");
                }
                max = max.max(holders);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            Ok((max, samples))
        });
        Self { stop, limit, task }
    }

    /// From now on, samples are checked against `limit`.
    fn set_limit(&self, limit: i64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Stops; answers the most holders seen and how many samples were taken.
    async fn finish(self) -> anyhow::Result<(i64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("the sampler panicked")?
    }
}

/// The campaign's counters equal its rows (I1, I2), nothing finished holds a permit (I5).
async fn assert_counters_match(env: &TestEnv, campaign: &str) -> anyhow::Result<(i32, i32)> {
    let (running, queued): (i32, i32) =
        sqlx::query_as("SELECT running, queued FROM campaign WHERE name = $1")
            .bind(campaign)
            .fetch_one(env.store.pool())
            .await?;
    let (holders, _, rows_queued, _) = sample(env.store.pool(), campaign).await?;
    assert_eq!(
        (i64::from(running), i64::from(queued)),
        (holders, rows_queued),
        "counters match the rows"
    );
    let (finished_holders,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM instance
         WHERE holds_permit AND state IN ('completed', 'failed', 'stopped')",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(finished_holders, 0);
    Ok((running, queued))
}

/// An admission from the queue: `(queue_seq, admitted at, its next step started at)`.
type Admission = (i64, DateTime<Utc>, Option<DateTime<Utc>>);

/// Admissions from the queue, by place.
async fn admissions(env: &TestEnv, campaign: &str) -> anyhow::Result<Vec<Admission>> {
    Ok(sqlx::query_as(
        "SELECT (a.output->>'queue_seq')::bigint, a.finished_at,
                (SELECT n.started_at FROM journal n
                 WHERE n.instance_id = a.instance_id AND n.step_seq = a.step_seq + 1)
         FROM journal a
         JOIN instance i ON i.id = a.instance_id JOIN campaign c ON c.id = i.campaign_id
         WHERE a.outcome = 'admitted' AND c.name = $1
         ORDER BY 1",
    )
    .bind(campaign)
    .fetch_all(env.store.pool())
    .await?)
}

/// Admissions happened in queue order (within one admitting statement the rows' clock
/// readings may interleave by microseconds).
fn assert_fifo(admitted: &[Admission]) {
    let slack = chrono::TimeDelta::milliseconds(2);
    for (i, (seq, at, _)) in admitted.iter().enumerate() {
        for (later, later_at, _) in &admitted[i + 1..] {
            assert!(
                *at <= *later_at + slack,
                "queue place {seq} was admitted at {at}, after place {later} at {later_at}"
            );
        }
    }
}

/// Milliseconds from each admission (the commit that freed the permit) to the admitted
/// instance's step starting on a worker: `(p50, p99, n)`.
fn admission_latency(admitted: &[Admission]) -> (f64, f64, usize) {
    let mut ms: Vec<f64> = admitted
        .iter()
        .filter_map(|(_, at, started)| {
            started.map(|s| (s - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pick(0.5), pick(0.99), ms.len())
}

async fn wait_all(env: &TestEnv, campaign: &str, state: &str, n: i64) -> anyhow::Result<()> {
    wait_until(
        &format!("{n} instances of {campaign} to be {state}"),
        Duration::from_secs(90),
        || async {
            let (count,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM instance i JOIN campaign c ON c.id = i.campaign_id
                 WHERE c.name = $1 AND i.state = $2",
            )
            .bind(campaign)
            .bind(state)
            .fetch_one(env.store.pool())
            .await?;
            Ok((count == n).then_some(()))
        },
    )
    .await
}

/// Starts `tasks` concurrent starters, each making `rounds` requests of `per` instances.
fn starters(
    api: &str,
    campaign: &str,
    tasks: usize,
    rounds: usize,
    per: u32,
) -> Vec<JoinHandle<anyhow::Result<()>>> {
    (0..tasks)
        .map(|_| {
            let (api, campaign) = (api.to_owned(), campaign.to_owned());
            tokio::spawn(async move {
                for _ in 0..rounds {
                    start_in(&api, "slow", &campaign, json!({}), per).await?;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                Ok(())
            })
        })
        .collect()
}

async fn cluster(env: &TestEnv, workers: usize) -> anyhow::Result<(NodeProcess, Vec<NodeProcess>)> {
    let control = env.spawn_node("coordinator,api").await?;
    let mut nodes = Vec::new();
    for _ in 0..workers {
        nodes.push(env.spawn_node("worker").await?);
    }
    Ok((control, nodes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starters_never_push_a_campaign_past_its_limit_and_start_in_fifo_order()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (control, _workers) = cluster(&env, 2).await?;
    let api = control.api();
    deploy(api, SLOW).await?;
    create_campaign(&env, api, "spring", 3, "release").await?;

    let sampler = Sampler::start(&env, "spring", 3);
    for starter in starters(api, "spring", 4, 10, 3) {
        starter.await.context("a starter panicked")??;
    }
    wait_all(&env, "spring", "completed", 120).await?;
    let (max, samples) = sampler.finish().await?;
    assert_eq!(max, 3, "the limit was reached ({samples} samples)");
    assert!(samples > 100, "the sampler sampled ({samples})");
    assert_eq!(assert_counters_match(&env, "spring").await?, (0, 0));
    let admitted = admissions(&env, "spring").await?;
    assert!(
        admitted.len() > 60,
        "most instances queued first ({})",
        admitted.len()
    );
    assert_fifo(&admitted);
    let (p50, p99, n) = admission_latency(&admitted);
    println!(
        "permit release -> next queued instance running: p50 {p50:.1} ms, p99 {p99:.1} ms ({n} admissions)"
    );

    let shown = env.cli(api, &["campaign", "show", "spring"]).await?;
    assert!(
        shown.contains("max running") && shown.contains('3'),
        "{shown}"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_and_frozen_mid_run_never_overshoot_nor_leak_a_permit() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let (control, mut workers) = cluster(&env, 3).await?;
    let api = control.api();
    deploy(api, SLOW).await?;
    create_campaign(&env, api, "spring", 3, "release").await?;

    let sampler = Sampler::start(&env, "spring", 3);
    let load = starters(api, "spring", 3, 10, 3);
    // Instances hold permits on every worker; then one dies and one freezes past its lease.
    tokio::time::sleep(Duration::from_millis(600)).await;
    workers[0].kill().await?;
    workers[1].pause()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    workers[1].resume()?;
    for starter in load {
        starter.await.context("a starter panicked")??;
    }
    // A fresh worker, so the run finishes even if the frozen one gave up.
    let _spare = env.spawn_node("worker").await?;
    wait_all(&env, "spring", "completed", 90).await?;
    let (max, samples) = sampler.finish().await?;
    assert!(max <= 3, "{max} holders ({samples} samples)");
    assert_eq!(
        assert_counters_match(&env, "spring").await?,
        (0, 0),
        "no permit leaked"
    );
    assert_fifo(&admissions(&env, "spring").await?);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lowering_the_limit_admits_nobody_until_below_and_raising_it_admits_at_once()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (control, _workers) = cluster(&env, 2).await?;
    let api = control.api();
    deploy(api, SLOW).await?;
    create_campaign(&env, api, "spring", 4, "release").await?;
    let ids = start_in(api, "slow", "spring", json!({ "ms": 400 }), 24).await?;
    let sampler = Sampler::start(&env, "spring", 4);
    wait_until("4 running", Duration::from_secs(20), || async {
        Ok((sample(env.store.pool(), "spring").await?.1 == 4).then_some(()))
    })
    .await?;

    let lowered = env
        .cli(api, &["campaign", "set-limit", "spring", "1"])
        .await?;
    assert!(
        lowered.contains("limit 4 -> 1") && lowered.contains("0 admitted"),
        "{lowered}"
    );
    // Nobody is preempted; nobody is admitted until fewer than 1 hold a permit.
    wait_until(
        "holders to drain to the new limit",
        Duration::from_secs(20),
        || async { Ok((sample(env.store.pool(), "spring").await?.0 <= 1).then_some(())) },
    )
    .await?;
    sampler.set_limit(1);
    let before = admissions(&env, "spring").await?.len();
    wait_until(
        "a new admission under the lowered limit",
        Duration::from_secs(20),
        || async { Ok((admissions(&env, "spring").await?.len() > before).then_some(())) },
    )
    .await?;

    // Checked against the raised limit from before the raise: holders only go up with it.
    sampler.set_limit(6);
    let status = reqwest::Client::new()
        .put(format!("{api}/v1/campaigns/spring/limit"))
        .bearer_auth(drover_tests::admin_token())
        .json(&json!({ "max_running": 6 }))
        .send()
        .await?
        .status();
    anyhow::ensure!(status.is_success(), "set-limit answered {status}");
    wait_until(
        "6 holders right after raising",
        Duration::from_secs(5),
        || async { Ok((sample(env.store.pool(), "spring").await?.0 == 6).then_some(())) },
    )
    .await?;
    for id in &ids {
        wait_state(api, id, "completed").await?;
    }
    let (max, _) = sampler.finish().await?;
    assert_eq!(max, 6);
    assert_eq!(assert_counters_match(&env, "spring").await?, (0, 0));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_error_instance_releases_or_holds_its_permit_per_policy_and_resume_requeues_it()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let (control, _workers) = cluster(&env, 1).await?;
    let api = control.api();
    deploy(api, &flaky(&recorder_url)).await?;
    deploy(api, SLOW).await?;
    create_campaign(&env, api, "rel", 1, "release").await?;
    create_campaign(&env, api, "hold", 1, "hold").await?;

    // release: the failed instance's permit goes to the next one at once.
    let failed = start_in(api, "flaky", "rel", json!({}), 1).await?.remove(0);
    let blocker = start_in(api, "slow", "rel", json!({ "ms": 1500 }), 1)
        .await?
        .remove(0);
    let stuck = wait_state(api, &failed, "in_error").await?;
    assert_eq!(stuck["holds_permit"], false, "{stuck}");
    let running = wait_state(api, &blocker, "running").await?;
    assert_eq!(running["holds_permit"], true);
    // Resumed while the campaign is full: it queues, and starts when the blocker ends.
    let shown = env
        .cli(
            api,
            &["resume", &failed, "--current-step", "--set", "status=200"],
        )
        .await?;
    assert!(shown.contains("queued"), "{shown}");
    let queued = instance(api, &failed).await?;
    assert_eq!(queued["state"], "queued");
    assert_eq!(queued["queue_position"], 1);
    wait_state(api, &failed, "completed").await?;
    wait_state(api, &blocker, "completed").await?;
    assert_eq!(assert_counters_match(&env, "rel").await?, (0, 0));

    // hold: the failed instance keeps its permit; the next one waits until it is resumed.
    let failed = start_in(api, "flaky", "hold", json!({}), 1)
        .await?
        .remove(0);
    let waiting = start_in(api, "slow", "hold", json!({}), 1).await?.remove(0);
    let stuck = wait_state(api, &failed, "in_error").await?;
    assert_eq!(stuck["holds_permit"], true, "{stuck}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let behind = instance(api, &waiting).await?;
    assert_eq!(
        (behind["state"].clone(), behind["queue_position"].clone()),
        (json!("queued"), json!(1)),
        "{behind}"
    );
    env.cli(
        api,
        &["resume", &failed, "--current-step", "--set", "status=200"],
    )
    .await?;
    wait_state(api, &failed, "completed").await?;
    wait_state(api, &waiting, "completed").await?;
    assert_eq!(assert_counters_match(&env, "hold").await?, (0, 0));

    let released: (i64,) = sqlx::query_as(
        "SELECT count(*) FROM event_fact WHERE campaign = 'rel' AND kind = 'permit_released'",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert!(
        released.0 >= 3,
        "in_error, and both completions: {}",
        released.0
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_with_ten_children_completes_in_a_campaign_limited_to_one() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (control, _workers) = cluster(&env, 1).await?;
    let api = control.api();
    deploy(api, SLOW).await?;
    deploy(api, PARENT).await?;
    create_campaign(&env, api, "solo", 1, "release").await?;
    let sampler = Sampler::start(&env, "solo", 1);
    let parents = start_in(api, "parent", "solo", json!({}), 2).await?;
    assert_eq!(instance(api, &parents[1]).await?["state"], "queued");
    for id in &parents {
        let done = wait_state(api, id, "completed").await?;
        assert_eq!(done["vars"]["i"], 10, "{done}");
    }
    let (children,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM instance WHERE parent_instance_id IS NOT NULL AND state = 'completed'",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(children, 20);
    let (max, _) = sampler.finish().await?;
    assert_eq!(max, 1);
    assert_eq!(assert_counters_match(&env, "solo").await?, (0, 0));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_repairs_counter_drift_and_counts_it_in_metrics() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let node = env
        .spawn_node_with("coordinator,api", &["--metrics-listen", &metrics])
        .await?;
    let (status, body) = post_json(
        &format!("{}/v1/campaigns", node.api()),
        &json!({ "name": "drifty", "max_running": 5 }),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    // Corrupt the counters behind the semaphore's back.
    sqlx::query(
        "UPDATE campaign SET running = running + 2, queued = queued + 1 WHERE name = 'drifty'",
    )
    .execute(env.store.pool())
    .await?;
    wait_until(
        "the leader to repair the counters",
        Duration::from_secs(40),
        || async {
            let (running, queued): (i32, i32) =
                sqlx::query_as("SELECT running, queued FROM campaign WHERE name = 'drifty'")
                    .fetch_one(env.store.pool())
                    .await?;
            Ok((running == 0 && queued == 0).then_some(()))
        },
    )
    .await?;
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await?
        .text()
        .await?;
    let drift = text
        .lines()
        .filter(|l| {
            l.starts_with("drover_semaphore_drift_total") && l.contains("campaign=\"drifty\"")
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>();
    assert!(drift >= 1.0, "drift counted in metrics:\n{text}");
    env.cleanup().await;
    Ok(())
}
