//! Operator actions through the real CLI against real nodes: resuming `in_error` instances at
//! their next step (skip) or their current step (retry), and the cluster views.

use std::time::Duration;

use drover_tests::{Recorder, TestEnv, wait_until};
use serde_json::{Value, json};

use crate::support::{deploy, get, start};

/// `call` answers the status `vars.status` names: 404 (permanent) until an operator sets it.
fn flaky_workflow(recorder: &str) -> String {
    format!(
        r#"
name: flaky-call
vars: {{ status: 404, note: none }}
steps:
  - id: call
    kind: http
    method: POST
    url: "{recorder}/status/call"
    body: {{ status: "vars.status", id: "instance.id" }}
    next:
      - to: skipped
        when: 'vars.note == "skip"'
      - to: done
  - id: skipped
    kind: assign
    set: {{ skipped: "true" }}
    next: [{{ to: done }}]
  - id: done
    kind: end
    status: completed
"#
    )
}

async fn wait_state(api: &str, id: &str, state: &str) -> anyhow::Result<Value> {
    wait_until(
        &format!("instance {id} to be {state}"),
        Duration::from_secs(30),
        || async {
            let (_, instance) = get(&format!("{api}/v1/instances/{id}")).await?;
            Ok((instance["state"] == state).then_some(instance))
        },
    )
    .await
}

async fn journal(api: &str, id: &str) -> anyhow::Result<Vec<Value>> {
    let (_, journal) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    Ok(journal["entries"].as_array().cloned().unwrap_or_default())
}

/// `(step_id, outcome, transition)` of each journal entry.
fn path(entries: &[Value]) -> Vec<(String, String, String)> {
    let field = |e: &Value, k: &str| e[k].as_str().unwrap_or("-").to_owned();
    entries
        .iter()
        .map(|e| {
            (
                field(e, "step_id"),
                field(e, "outcome"),
                field(e, "transition"),
            )
        })
        .collect()
}

fn owned(rows: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_in_error_resumes_at_its_next_step_or_retries_its_current_step_from_the_cli()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, &flaky_workflow(&recorder_url)).await?;
    let ids = start(api, "flaky-call", json!({}), 2).await?;
    let [skip, retry] = ids.as_slice() else {
        anyhow::bail!("two instances started: {ids:?}");
    };
    for id in &ids {
        let instance = wait_state(api, id, "in_error").await?;
        assert!(
            instance["error"]
                .as_str()
                .is_some_and(|e| e.contains("404")),
            "a 404 is permanent: {instance}"
        );
    }

    // Refused before any request: --set needs JSON, and exactly one mode.
    let out = env
        .cli_raw(
            api,
            &["resume", retry, "--current-step", "--set", "status=oops"],
        )
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not valid JSON"), "{stderr}");
    let out = env.cli_raw(api, &["resume", retry]).await?;
    assert!(!out.status.success(), "a mode is required");

    // Skip: `call`'s transitions are evaluated with the corrected variables.
    let shown = env
        .cli(
            api,
            &["resume", skip, "--next-step", "--set", r#"note="skip""#],
        )
        .await?;
    assert!(
        shown.contains(&format!("resumed {skip}")) && shown.contains("at step skipped"),
        "{shown}"
    );
    let instance = wait_state(api, skip, "completed").await?;
    assert_eq!(instance["vars"]["skipped"], true, "{instance}");
    assert_eq!(instance["vars"]["note"], "skip");
    let entries = journal(api, skip).await?;
    assert_eq!(
        path(&entries),
        owned(&[
            ("call", "started", "ready"),
            ("call", "failed", "in_error"),
            ("call", "resumed", "skipped"),
            ("skipped", "completed", "done"),
            ("done", "completed", "completed"),
        ])
    );
    // The CLI acts with the nodes' bootstrap admin token.
    assert_eq!(entries[2]["actor"], json!("bootstrap"));

    // Retry: `call` runs again with the corrected status, under a new idempotency key.
    let shown = env
        .cli(
            api,
            &["resume", retry, "--current-step", "--set", "status=200"],
        )
        .await?;
    assert!(shown.contains("at step call"), "{shown}");
    let instance = wait_state(api, retry, "completed").await?;
    assert_eq!(instance["vars"]["status"], 200, "{instance}");
    let entries = journal(api, retry).await?;
    assert_eq!(
        path(&entries),
        owned(&[
            ("call", "started", "ready"),
            ("call", "failed", "in_error"),
            ("call", "resumed", "call"),
            ("call", "completed", "done"),
            ("done", "completed", "completed"),
        ])
    );

    let sent = |id: &str| {
        recorder
            .requests()
            .into_iter()
            .filter(|r| r.body["id"] == json!(id))
            .map(|r| (r.body["status"].clone(), r.idempotency_key))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        sent(skip),
        vec![(json!(404), Some(format!("{skip}:0")))],
        "a skipped step is not run again"
    );
    assert_eq!(
        sent(retry),
        vec![
            (json!(404), Some(format!("{retry}:0"))),
            (json!(200), Some(format!("{retry}:2"))),
        ],
        "the retry is a new checkpoint"
    );

    // A completed instance is not resumed; the API's refusal reaches the operator.
    let out = env
        .cli_raw(api, &["resume", skip, "--current-step"])
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not_in_error") && stderr.contains("completed"),
        "{stderr}"
    );

    drop(node);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_the_nodes_and_which_coordinator_leads() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api,coordinator").await?;
    let api = node.api();

    let leader: Value = wait_until(
        "a coordinator to take the lease",
        Duration::from_secs(30),
        || async {
            let out = env.cli(api, &["--json", "leader"]).await?;
            let leader: Value = serde_json::from_str(&out)?;
            Ok((leader["live"] == true).then_some(leader))
        },
    )
    .await?;
    let holder = leader["holder"].as_str().unwrap_or_default().to_owned();
    assert!(!holder.is_empty(), "{leader}");
    let shown = env.cli(api, &["leader"]).await?;
    assert!(
        shown.contains(&holder) && shown.contains(&format!("term {}", leader["term"])),
        "{shown}"
    );

    let nodes: Value = serde_json::from_str(&env.cli(api, &["--json", "nodes"]).await?)?;
    let listed = nodes["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1, "{nodes}");
    assert_eq!(listed[0]["id"], json!(holder), "the one node leads");
    assert!(listed[0]["rss_bytes"].is_i64(), "{nodes}");
    let shown = env.cli(api, &["nodes"]).await?;
    let mut lines = shown.lines();
    let header = lines.next().unwrap_or_default();
    for column in [
        "ID",
        "ROLES",
        "HOST",
        "VERSION",
        "STATUS",
        "LAST HEARTBEAT",
        "IN FLIGHT",
        "MEMORY",
    ] {
        assert!(header.contains(column), "{column} in {shown}");
    }
    let row = lines.next().unwrap_or_default();
    assert!(
        row.contains(&holder) && row.contains("worker,api,coordinator") && row.contains("s ago"),
        "{shown}"
    );

    drop(node);
    env.cleanup().await;
    Ok(())
}
