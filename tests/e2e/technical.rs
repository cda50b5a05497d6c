//! The technical workflows shipped with Drover: `drover migrate` installs them and their
//! schedules (again without undoing an operator's changes), and, triggered on a live cluster,
//! they run as ordinary instances that do their work: the cleanup deletes finished instances
//! past retention (never live ones), the paused check warns, then stops per severity.

use std::time::Duration;

use anyhow::Context;
use drover_tests::{TestEnv, wait_until};
use serde_json::Value;
use uuid::Uuid;

use crate::support::{deploy, start};

const CHORE: &str = r#"
name: chore
steps:
  - { id: a, kind: assign, set: { n: "1" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

/// Waits for an event that never comes unless sent.
const IDLE: &str = r#"
name: idle
steps:
  - { id: rest, kind: wait_event, name: go, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

const VITAL: &str = r#"
name: vital
severity: critical
steps:
  - { id: rest, kind: wait_event, name: go, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

async fn migrate(env: &TestEnv, api: &str) -> anyhow::Result<String> {
    let out = env
        .cli_raw(api, &["migrate", "--database-url", &env.database_url])
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn state(env: &TestEnv, id: &str) -> anyhow::Result<Option<String>> {
    let row: Option<(String,)> = sqlx::query_as("SELECT state FROM instance WHERE id = $1")
        .bind(Uuid::parse_str(id)?)
        .fetch_optional(env.store.pool())
        .await?;
    Ok(row.map(|(s,)| s))
}

/// Triggers schedule `name` and waits for the instance it started to complete; answers the
/// instance's id and final variables.
async fn run_now(env: &TestEnv, api: &str, name: &str) -> anyhow::Result<(Uuid, Value)> {
    env.cli(api, &["schedule", "trigger", name]).await?;
    let id: Uuid = wait_until(
        &format!("{name} to fire"),
        Duration::from_secs(10),
        || async {
            let row: Option<(Uuid,)> = sqlx::query_as(
                "SELECT f.instance_id FROM schedule_fire f JOIN schedule s ON s.id = f.schedule_id
             WHERE s.name = $1 AND f.instance_id IS NOT NULL ORDER BY f.recorded_at DESC LIMIT 1",
            )
            .bind(name)
            .fetch_optional(env.store.pool())
            .await?;
            Ok(row.map(|(id,)| id))
        },
    )
    .await?;
    let vars = wait_until(
        &format!("{name} to complete"),
        Duration::from_secs(60),
        || async {
            let row: Option<(String, Value)> =
                sqlx::query_as("SELECT state, vars FROM instance WHERE id = $1")
                    .bind(id)
                    .fetch_optional(env.store.pool())
                    .await?;
            match row {
                Some((state, vars)) if state == "completed" => Ok(Some(vars)),
                Some((state, _)) if state == "in_error" || state == "failed" => {
                    anyhow::bail!("{name} instance {id} ended {state}")
                }
                _ => Ok(None),
            }
        },
    )
    .await?;
    Ok((id, vars))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technical_workflows_are_installed_and_run_as_instances_that_do_their_work()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("api,worker,coordinator").await?;
    let api = node.api().to_owned();

    // Installed by migrate, with their schedules; shown by `schedule list`.
    let first = migrate(&env, &api).await?;
    assert!(
        first.contains("system-cleanup v1: deployed, schedule created"),
        "{first}"
    );
    let list = env.cli(&api, &["schedule", "list"]).await?;
    assert!(
        list.contains("system-cleanup") && list.contains("system-paused-instances"),
        "{list}"
    );
    // An operator re-times and pauses one; migrating again keeps that.
    env.cli(
        &api,
        &[
            "schedule",
            "update",
            "system-paused-instances",
            "--workflow",
            "system-paused-instances",
            "--cron",
            "30 6 * * 2",
            "--vars",
            r#"{"warn_after": "0s", "stop_after": "1h"}"#,
        ],
    )
    .await?;
    env.cli(
        &api,
        &[
            "schedule",
            "pause",
            "system-paused-instances",
            "--note",
            "tests",
        ],
    )
    .await?;
    let again = migrate(&env, &api).await?;
    assert!(
        again.contains("system-paused-instances v1: up to date, schedule kept as it is"),
        "{again}"
    );
    let (cron, paused, vars): (Option<String>, bool, Value) = sqlx::query_as(
        "SELECT cron, paused, vars FROM schedule WHERE name = 'system-paused-instances'",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!((cron.as_deref(), paused), (Some("30 6 * * 2"), true));
    assert_eq!(vars["stop_after"], "1h");

    // Cleanup: 30 finished instances, aged past the campaign's 1-day retention; a live one
    // as old; a finished one too recent.
    deploy(&api, CHORE).await?;
    deploy(&api, IDLE).await?;
    deploy(&api, VITAL).await?;
    let done = start(&api, "chore", serde_json::json!({}), 30).await?;
    let live = start(&api, "idle", serde_json::json!({}), 1).await?;
    wait_until("30 chores to complete", Duration::from_secs(30), || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM instance WHERE workflow = 'chore' AND state = 'completed'",
        )
        .fetch_one(env.store.pool())
        .await?;
        Ok((n == 30).then_some(()))
    })
    .await?;
    let recent = start(&api, "chore", serde_json::json!({}), 1).await?;
    wait_until(
        "the recent chore to complete",
        Duration::from_secs(30),
        || async {
            Ok((state(&env, &recent[0]).await?.as_deref() == Some("completed")).then_some(()))
        },
    )
    .await?;
    let done_ids: Vec<Uuid> = done
        .iter()
        .map(|id| Uuid::parse_str(id))
        .collect::<Result<_, _>>()?;
    sqlx::query(
        "UPDATE instance SET finished_at = finished_at - interval '2 days',
                             created_at = created_at - interval '2 days'
         WHERE id = ANY($1) OR id = $2",
    )
    .bind(&done_ids)
    .bind(Uuid::parse_str(&live[0])?)
    .execute(env.store.pool())
    .await?;
    env.cli(&api, &["campaign", "set-retention", "default", "1d"])
        .await?;
    let shown = env.cli(&api, &["campaign", "retention", "default"]).await?;
    assert!(shown.contains("1day"), "{shown}");
    // Small batches, one per step: the cleanup loops through several journaled steps.
    env.cli(
        &api,
        &[
            "schedule",
            "update",
            "system-cleanup",
            "--workflow",
            "system-cleanup",
            "--cron",
            "0 4 * * *",
            "--vars",
            r#"{"batch_size": 7, "step_budget": "0s", "batch_pause": "0s"}"#,
        ],
    )
    .await?;
    let (cleanup, vars) = run_now(&env, &api, "system-cleanup").await?;
    assert_eq!(vars["deleted"]["instances"], 30, "{vars}");
    assert!(
        vars["deleted"]["journal"].as_u64().context("journal")? >= 60,
        "{vars}"
    );
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM instance WHERE id = ANY($1)")
        .bind(&done_ids)
        .fetch_one(env.store.pool())
        .await?;
    assert_eq!(left, 0);
    assert_eq!(state(&env, &live[0]).await?.as_deref(), Some("waiting"));
    assert_eq!(state(&env, &recent[0]).await?.as_deref(), Some("completed"));
    // Its journal says what each step deleted: several sweeps of at most 7.
    let sweeps: Vec<(Value,)> = sqlx::query_as(
        "SELECT output FROM journal WHERE instance_id = $1 AND step_id = 'sweep' AND output IS NOT NULL ORDER BY step_seq",
    )
    .bind(cleanup)
    .fetch_all(env.store.pool())
    .await?;
    assert!(sweeps.len() >= 5, "{sweeps:?}");
    assert!(
        sweeps
            .iter()
            .all(|(o,)| o["pass"]["instances"].as_u64() <= Some(7)),
        "{sweeps:?}"
    );
    // Diagnosable like any instance.
    env.cli(&api, &["why", &cleanup.to_string()]).await?;

    // Paused too long (thresholds shortened by the schedule's vars: warn at once, stop past
    // an hour): an old normal one is stopped, an old critical one and a recent normal one
    // only warned about.
    let idle = start(&api, "idle", serde_json::json!({}), 2).await?;
    let vital = start(&api, "vital", serde_json::json!({}), 1).await?;
    let (old_normal, new_normal, old_critical) = (&idle[0], &idle[1], &vital[0]);
    for id in [old_normal, new_normal, old_critical] {
        wait_until("waiting", Duration::from_secs(10), || async {
            Ok((state(&env, id).await?.as_deref() == Some("waiting")).then_some(()))
        })
        .await?;
        env.cli(&api, &["pause", id]).await?;
    }
    sqlx::query(
        "UPDATE instance SET paused_at = paused_at - interval '40 days' WHERE id = ANY($1)",
    )
    .bind(vec![
        Uuid::parse_str(old_normal)?,
        Uuid::parse_str(old_critical)?,
    ])
    .execute(env.store.pool())
    .await?;
    run_now(&env, &api, "system-paused-instances").await?;
    let (check,): (Value,) = sqlx::query_as(
        "SELECT j.output FROM journal j JOIN schedule_fire f ON f.instance_id = j.instance_id
         JOIN schedule s ON s.id = f.schedule_id
         WHERE s.name = 'system-paused-instances' AND j.step_id = 'check' AND j.output IS NOT NULL",
    )
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(
        (check["warned"].as_u64(), check["stopped"].as_u64()),
        (Some(2), Some(1)),
        "{check}"
    );
    assert_eq!(state(&env, old_normal).await?.as_deref(), Some("stopped"));
    assert_eq!(state(&env, new_normal).await?.as_deref(), Some("paused"));
    assert_eq!(state(&env, old_critical).await?.as_deref(), Some("paused"));
    let (actor,): (Option<String>,) = sqlx::query_as(
        "SELECT actor FROM journal WHERE instance_id = $1 ORDER BY step_seq DESC LIMIT 1",
    )
    .bind(Uuid::parse_str(old_normal)?)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(actor.as_deref(), Some("system-paused-instances"));
    let (reason,): (Value,) = sqlx::query_as(
        "SELECT details FROM audit WHERE action = 'instance.paused_too_long' AND target = $1",
    )
    .bind(old_normal)
    .fetch_one(env.store.pool())
    .await?;
    assert_eq!(reason["action"], "stop");
    for id in [old_normal, new_normal, old_critical] {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM event_fact WHERE instance_id = $1 AND kind = 'paused_too_long'",
        )
        .bind(Uuid::parse_str(id)?)
        .fetch_one(env.store.pool())
        .await?;
        assert_eq!(n, 1, "{id}");
    }
    // The events reach NATS and keep the contract (checked at cleanup).
    wait_until("events relayed", Duration::from_secs(20), || async {
        Ok((env.store.pending_events().await? == 0).then_some(()))
    })
    .await?;
    drop(node);
    env.cleanup().await;
    Ok(())
}
