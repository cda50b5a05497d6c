//! Schedules fire each fire time exactly once: through leader kills (one right at a fire
//! time), and after every coordinator was down (missed fires inside the catch-up window run
//! once each, older ones are recorded skipped).

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use drover_core::NodeId;
use drover_store::COORDINATOR_LEASE;
use drover_tests::{NodeProcess, TestEnv, wait_until};
use uuid::Uuid;

use crate::support::deploy;

const TICK: &str = r#"
name: tick
steps:
  - id: a
    kind: assign
    set: { n: "1" }
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#;

type FireRow = (DateTime<Utc>, String, String, Option<Uuid>);

async fn fires(env: &TestEnv, name: &str) -> anyhow::Result<Vec<FireRow>> {
    Ok(sqlx::query_as(
        "SELECT f.fire_at, f.outcome, f.reason, f.instance_id FROM schedule_fire f
         JOIN schedule s ON s.id = f.schedule_id WHERE s.name = $1 ORDER BY f.fire_at",
    )
    .bind(name)
    .fetch_all(env.store.pool())
    .await?)
}

async fn wait_fires(env: &TestEnv, name: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
    wait_until(&format!("{n} fires of {name}"), timeout, || async {
        Ok((fires(env, name).await?.len() >= n).then_some(()))
    })
    .await
}

async fn leader_id(env: &TestEnv) -> anyhow::Result<Option<NodeId>> {
    let lease = env.store.lease(COORDINATOR_LEASE).await?;
    Ok(lease.filter(|l| l.live).and_then(|l| l.holder))
}

/// Asserts `rows` are an unbroken sequence `every` apart, each fired with its own instance,
/// and that the database holds exactly one instance per fire.
async fn assert_unbroken(env: &TestEnv, rows: &[FireRow], every: TimeDelta) -> anyhow::Result<()> {
    let mut instances = HashSet::new();
    for pair in rows.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            every,
            "unbroken: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    for row in rows {
        if row.1 == "fired" {
            assert!(
                instances.insert(row.3.expect("fired with an instance")),
                "{row:?}"
            );
        }
    }
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance")
        .fetch_one(env.store.pool())
        .await?;
    assert_eq!(
        count as usize,
        instances.len(),
        "one instance per fire, none other"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_fire_every_time_once_through_leader_kills() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api_node = env.spawn_node("api").await?;
    let _worker = env.spawn_node("worker").await?;
    let mut coordinators: Vec<NodeProcess> = vec![
        env.spawn_node("coordinator").await?,
        env.spawn_node("coordinator").await?,
    ];
    let api = api_node.api().to_owned();
    deploy(&api, TICK).await?;
    env.cli(
        &api,
        &[
            "schedule",
            "create",
            "tick",
            "--workflow",
            "tick",
            "--every",
            "2s",
            "--overlap",
            "allow_all",
        ],
    )
    .await?;
    wait_fires(&env, "tick", 3, Duration::from_secs(20)).await?;

    for kill in 0..2 {
        let leader = wait_until("a leader", Duration::from_secs(20), || async {
            leader_id(&env).await
        })
        .await?;
        let at = coordinators
            .iter()
            .position(|c| c.id == leader)
            .expect("the leader is one of the coordinators");
        if kill == 1 {
            // Right at a fire time: the next even second.
            let now = Utc::now();
            let next = DateTime::from_timestamp(now.timestamp() / 2 * 2 + 2, 0).expect("time");
            tokio::time::sleep((next - now).to_std()?).await;
        }
        let mut victim = coordinators.remove(at);
        victim.kill().await?;
        coordinators.push(env.spawn_node("coordinator").await?);
        let seen = fires(&env, "tick").await?.len();
        wait_fires(&env, "tick", seen + 4, Duration::from_secs(30)).await?;
    }
    wait_fires(&env, "tick", 15, Duration::from_secs(40)).await?;
    env.cli(&api, &["schedule", "pause", "tick", "--note", "test over"])
        .await?;
    let rows = fires(&env, "tick").await?;
    assert!(rows.iter().all(|r| r.1 == "fired"), "{rows:?}");
    assert_unbroken(&env, &rows, TimeDelta::seconds(2)).await?;
    let shown = env.cli(&api, &["schedule", "show", "tick"]).await?;
    assert!(shown.contains("test over"), "{shown}");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_all_coordinators_were_down_missed_fires_are_caught_up_or_skipped()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let api_node = env.spawn_node("api").await?;
    let _worker = env.spawn_node("worker").await?;
    let mut coordinator = env.spawn_node("coordinator").await?;
    let api = api_node.api().to_owned();
    deploy(&api, TICK).await?;
    env.cli(
        &api,
        &[
            "schedule",
            "create",
            "tick",
            "--workflow",
            "tick",
            "--every",
            "1s",
            "--overlap",
            "allow_all",
            "--catchup-window",
            "4s",
        ],
    )
    .await?;
    wait_fires(&env, "tick", 2, Duration::from_secs(20)).await?;
    coordinator.kill().await?;
    // The outage under test: every coordinator down for 10 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restarted_at = Utc::now();
    let _coordinator = env.spawn_node("coordinator").await?;
    wait_until(
        "the fires to reach now",
        Duration::from_secs(30),
        || async {
            let rows = fires(&env, "tick").await?;
            Ok(rows
                .last()
                .is_some_and(|r| r.0 > restarted_at + TimeDelta::seconds(2))
                .then_some(()))
        },
    )
    .await?;
    env.cli(&api, &["schedule", "pause", "tick"]).await?;
    let rows = fires(&env, "tick").await?;
    let missed = rows.iter().filter(|r| r.2 == "missed").count();
    let caught_up = rows.iter().filter(|r| r.2 == "catch_up").count();
    assert!(missed >= 4, "older fires recorded skipped: {rows:?}");
    assert!(
        caught_up >= 2,
        "fires inside the window caught up: {rows:?}"
    );
    assert!(rows.iter().all(|r| r.1 != "buffered"));
    assert_unbroken(&env, &rows, TimeDelta::seconds(1)).await?;
    env.cleanup().await;
    Ok(())
}

const SLOW: &str = r#"
name: slow
steps:
  - id: nap
    kind: sleep
    for: 6s
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#;

async fn outcomes(env: &TestEnv, name: &str) -> anyhow::Result<(usize, usize, usize)> {
    let rows = fires(env, name).await?;
    let count = |o: &str| rows.iter().filter(|r| r.1 == o).count();
    Ok((count("fired"), count("skipped"), count("buffered")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_policies_decide_what_a_fire_does_while_a_run_is_live() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("coordinator,api,worker").await?;
    let api = node.api().to_owned();
    deploy(&api, SLOW).await?;
    let policies = [
        "skip",
        "buffer_one",
        "allow_all",
        "cancel_other",
        "terminate_other",
    ];
    for policy in policies {
        let name = policy.replace('_', "-");
        env.cli(
            &api,
            &[
                "schedule",
                "create",
                &name,
                "--workflow",
                "slow",
                "--every",
                "1s",
                "--overlap",
                policy,
            ],
        )
        .await?;
    }
    wait_fires(&env, "allow-all", 5, Duration::from_secs(30)).await?;
    for policy in policies {
        env.cli(&api, &["schedule", "pause", &policy.replace('_', "-")])
            .await?;
    }

    let (fired, skipped, _) = outcomes(&env, "skip").await?;
    assert_eq!(fired, 1, "one run at a time");
    assert!(skipped >= 3, "skipped while live: {skipped}");
    let (fired, skipped, buffered) = outcomes(&env, "buffer-one").await?;
    assert_eq!((fired, buffered), (1, 1), "one live, one waiting");
    assert!(skipped >= 2, "the rest skipped: {skipped}");
    let (fired, skipped, _) = outcomes(&env, "allow-all").await?;
    assert!(fired >= 5 && skipped == 0, "{fired} {skipped}");
    for name in ["cancel-other", "terminate-other"] {
        let (fired, skipped, _) = outcomes(&env, name).await?;
        assert!(fired >= 4 && skipped == 0, "{name}: {fired} {skipped}");
        // Every run but the newest is stopped by the next fire.
        let rows = fires(&env, name).await?;
        let older: Vec<Uuid> = rows[..rows.len() - 1].iter().filter_map(|r| r.3).collect();
        wait_until(
            &format!("{name}'s older runs stopped"),
            Duration::from_secs(20),
            || async {
                let (stopped,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM instance WHERE id = ANY($1) AND state = 'stopped'",
                )
                .bind(&older)
                .fetch_one(env.store.pool())
                .await?;
                Ok((stopped as usize == older.len()).then_some(()))
            },
        )
        .await?;
    }

    // The buffered fire starts once the live run ends (the schedule paused or not).
    env.cli(&api, &["schedule", "unpause", "buffer-one"])
        .await?;
    wait_until(
        "the buffered fire to start",
        Duration::from_secs(20),
        || async {
            let rows = fires(&env, "buffer-one").await?;
            Ok(rows
                .iter()
                .any(|r| r.2 == "buffered" && r.1 == "fired")
                .then_some(()))
        },
    )
    .await?;
    env.cli(&api, &["schedule", "pause", "buffer-one"]).await?;

    // Trigger runs now whatever the policy; backfill runs each past fire time once.
    let triggered = env
        .cli(&api, &["--json", "schedule", "trigger", "skip"])
        .await?;
    assert_eq!(triggered.matches("\"instance\"").count(), 1, "{triggered}");
    let args = [
        "--json",
        "schedule",
        "backfill",
        "skip",
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        "2026-01-01T00:00:02Z",
    ];
    let first = env.cli(&api, &args).await?;
    assert_eq!(first.matches("\"instance\"").count(), 3, "{first}");
    let again = env.cli(&api, &args).await?;
    assert_eq!(again.matches("\"fire_at\"").count(), 3, "{again}");
    assert_eq!(
        again.matches("\"instance\"").count(),
        0,
        "once per fire time: {again}"
    );
    let listed = env.cli(&api, &["schedule", "list"]).await?;
    assert!(listed.contains("terminate-other"), "{listed}");
    env.cleanup().await;
    Ok(())
}
