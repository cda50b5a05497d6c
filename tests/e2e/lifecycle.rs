//! Lifecycle commands through the real CLI against a real node: pause, unpause, stop, kill and
//! restart, one instance at a time and by filter, and what they do to a campaign's permits.

use std::time::Duration;

use anyhow::Context;
use drover_store::{NewCampaign, OnErrorPermit};
use drover_tests::{TestEnv, wait_until};
use serde_json::Value;

use crate::support::{deploy, get};

/// `work` keeps its worker busy for `vars.ms`; then the instance waits for `go`.
const CHORES: &str = r#"
name: chores
vars: { ms: 3000 }
steps:
  - { id: work, kind: handler, handler: slow, input: { ms: "vars.ms" }, timeout: 60s, next: [{ to: rest }] }
  - { id: rest, kind: wait_event, name: go, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

async fn instance(api: &str, id: &str) -> anyhow::Result<Value> {
    let (status, body) = get(&format!("{api}/v1/instances/{id}")).await?;
    anyhow::ensure!(status == 200, "GET instance {id}: {status} {body}");
    Ok(body)
}

async fn wait_state(api: &str, id: &str, state: &str) -> anyhow::Result<Value> {
    wait_until(
        &format!("instance {id} to be {state}"),
        Duration::from_secs(30),
        || async {
            let instance = instance(api, id).await?;
            Ok((instance["state"] == state).then_some(instance))
        },
    )
    .await
}

/// `(running, queued)` of a campaign, as its counters say, checked against its rows.
async fn permits(env: &TestEnv, campaign: &str) -> anyhow::Result<(i32, i32)> {
    let c = env
        .store
        .campaign_by_name(campaign)
        .await?
        .context("the campaign exists")?;
    let (holders, queued): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE holds_permit), count(*) FILTER (WHERE state = 'queued')
         FROM instance WHERE campaign_id = $1",
    )
    .bind(c.id.0)
    .fetch_one(env.store.pool())
    .await?;
    anyhow::ensure!(
        (i64::from(c.running), i64::from(c.queued)) == (holders, queued),
        "counters {}/{} disagree with the rows {holders}/{queued}",
        c.running,
        c.queued
    );
    Ok((c.running, c.queued))
}

/// The CLI acts with the nodes' bootstrap admin token: that is who the journal names.
fn actor() -> String {
    "bootstrap".to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_commands_from_the_cli_hand_a_campaigns_only_permit_along() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    env.store
        .create_campaign(&NewCampaign {
            name: "solo".to_owned(),
            max_running: Some(1),
            on_error_permit: OnErrorPermit::Release,
            actor: "test".to_owned(),
        })
        .await?;
    let node = env.spawn_node("worker,api,coordinator").await?;
    let api = node.api();
    deploy(api, CHORES).await?;
    let out = env
        .cli(
            api,
            &[
                "start",
                "chores",
                "--ids",
                "--campaign",
                "solo",
                "--count",
                "3",
                "--vars",
                r#"{"ms": 4000}"#,
            ],
        )
        .await?;
    let ids: Vec<&str> = out.lines().map(str::trim).collect();
    let [a, b, c] = ids.as_slice() else {
        anyhow::bail!("three instances started: {out}");
    };
    wait_state(api, a, "running").await?;
    assert_eq!(instance(api, b).await?["state"], "queued");
    assert_eq!(permits(&env, "solo").await?, (1, 2));
    let why = env.cli(api, &["why", c]).await?;
    assert!(
        why.contains("queued at position 2 of 2") && why.contains(a),
        "{why}"
    );

    // A kill fences the running step at once; its permit starts the next in the queue.
    let out = env.cli(api, &["kill", a]).await?;
    assert!(
        out.contains(&format!("killed {a}")) && out.contains(&format!("admitted {b}")),
        "{out}"
    );
    assert_eq!(instance(api, a).await?["state"], "stopped");
    wait_state(api, b, "running").await?;
    assert_eq!(permits(&env, "solo").await?, (1, 1));

    // A pause lets the running step finish; the paused instance keeps the permit.
    let out = env.cli(api, &["pause", b]).await?;
    assert!(out.contains("pause requested"), "{out}");
    let paused = wait_state(api, b, "paused").await?;
    assert_eq!(
        paused["current_step"], "rest",
        "the step finished first: {paused}"
    );
    assert_eq!(instance(api, c).await?["state"], "queued");
    let why = env.cli(api, &["why", b]).await?;
    assert!(why.contains(&format!("paused by {}", actor())), "{why}");
    let why = env.cli(api, &["why", c]).await?;
    assert!(why.contains("position 1") && why.contains(b), "{why}");
    let out = env.cli(api, &["pause", b]).await?;
    assert!(out.contains("already"), "idempotent: {out}");

    let out = env.cli(api, &["unpause", b]).await?;
    assert!(out.contains(&format!("unpaused {b}: ready")), "{out}");
    wait_state(api, b, "waiting").await?;

    // A graceful stop of a waiting instance is at once, and passes the permit on.
    let out = env.cli(api, &["stop", b]).await?;
    assert!(
        out.contains(&format!("stopped {b}")) && out.contains(&format!("admitted {c}")),
        "{out}"
    );
    wait_state(api, c, "running").await?;
    let out = env.cli(api, &["stop", c]).await?;
    assert!(out.contains("stop requested"), "{out}");
    wait_state(api, c, "stopped").await?;
    let (_, journal) = get(&format!("{api}/v1/instances/{c}/journal")).await?;
    let last = journal["entries"]
        .as_array()
        .and_then(|entries| entries.last().cloned())
        .context("a journal")?;
    assert_eq!(
        (&last["step_id"], &last["outcome"], &last["transition"]),
        (
            &Value::from("work"),
            &Value::from("stopped"),
            &Value::from("stopped")
        ),
        "the step finished, then the instance stopped: {journal}"
    );
    assert_eq!(last["actor"], Value::from(actor()));
    assert_eq!(permits(&env, "solo").await?, (0, 0));

    // Refusals reach the operator.
    let out = env.cli_raw(api, &["unpause", c]).await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("finished") && stderr.contains("409"),
        "{stderr}"
    );

    // A restart is a new instance, admitted like any start; once.
    let out = env.cli(api, &["--json", "restart", a]).await?;
    let restarted: Value = serde_json::from_str(&out)?;
    let d = restarted["restarted_as"]
        .as_str()
        .context("the new instance")?
        .to_owned();
    assert_eq!(restarted["instance"]["vars"]["ms"], 4000, "{restarted}");
    wait_state(api, &d, "running").await?;
    let out = env.cli(api, &["restart", a]).await?;
    assert!(out.contains(&format!("restarted before, as {d}")), "{out}");

    // By filter.
    let out = env.cli(api, &["kill", "--campaign", "solo"]).await?;
    assert!(out.starts_with("kill: 1 matched, 1 changed"), "{out}");
    assert_eq!(permits(&env, "solo").await?, (0, 0));

    let out = env
        .cli(
            api,
            &[
                "start",
                "chores",
                "--ids",
                "--campaign",
                "solo",
                "--count",
                "3",
                "--vars",
                r#"{"ms": 50}"#,
            ],
        )
        .await?;
    let more: Vec<&str> = out.lines().map(str::trim).collect();
    wait_state(api, more[0], "waiting").await?;
    assert_eq!(
        permits(&env, "solo").await?,
        (1, 2),
        "a waiting instance keeps its permit"
    );
    let out = env
        .cli(api, &["pause", "--campaign", "solo", "--state", "queued"])
        .await?;
    assert!(out.starts_with("pause: 2 matched, 2 changed"), "{out}");
    assert_eq!(permits(&env, "solo").await?, (1, 0));
    let out = env
        .cli(api, &["unpause", "--campaign", "solo", "--state", "paused"])
        .await?;
    assert!(out.starts_with("unpause: 2 matched, 2 changed"), "{out}");
    assert_eq!(permits(&env, "solo").await?, (1, 2), "queued again");
    let out = env.cli(api, &["stop", "--campaign", "solo"]).await?;
    assert!(out.starts_with("stop: 3 matched, 3 changed"), "{out}");
    assert_eq!(permits(&env, "solo").await?, (0, 0));

    // Every stopped one restarts, but `a` only once: one READY with the permit, the rest
    // queued behind it.
    let out = env
        .cli(
            api,
            &["restart", "--campaign", "solo", "--workflow", "chores"],
        )
        .await?;
    assert!(
        out.starts_with("restart: 7 matched, 6 changed, 1 unchanged, 0 refused"),
        "{out}"
    );
    assert_eq!(permits(&env, "solo").await?, (1, 5));
    env.cli(api, &["kill", "--campaign", "solo"]).await?;
    assert_eq!(permits(&env, "solo").await?, (0, 0));

    drop(node);
    env.cleanup().await;
    Ok(())
}
