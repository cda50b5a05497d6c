//! Bad input gets a clear error and loses nothing.

use std::time::Duration;

use drover_tests::{TestEnv, wait_until};
use serde_json::{Value, json};

use crate::support::{
    consumer_backlog, deploy, get, post_json, post_text, start, wait_jobs_drained,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_job_messages_are_terminated_and_the_worker_keeps_working()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(
        api,
        "name: one\nsteps:\n  - { id: a, kind: end, status: completed }\n",
    )
    .await?;
    let subject = env.bus.subjects().job(&Default::default());
    let js = env.bus.jetstream();
    js.publish(subject.clone(), "not msgpack at all".into())
        .await?
        .await?;
    js.publish(subject.clone(), vec![0xc1u8; 3].into())
        .await?
        .await?;
    js.publish(subject.clone(), vec![7u8; 100 * 1024].into())
        .await?
        .await?;
    wait_jobs_drained(&env).await?;

    let ids = start(api, "one", json!({}), 3).await?;
    for id in ids {
        wait_until(
            "completion after garbage",
            Duration::from_secs(20),
            || async {
                let (_, i) = get(&format!("{api}/v1/instances/{id}")).await?;
                Ok((i["state"] == "completed").then_some(()))
            },
        )
        .await?;
    }
    assert_eq!(consumer_backlog(&env).await?, (0, 0));
    env.cleanup().await;
    Ok(())
}

fn error_of(body: &Value) -> (String, String) {
    (
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_definitions_ids_and_bodies_get_clear_errors() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("api").await?;
    let api = node.api();
    let cases: &[(&str, &str, &str)] = &[
        (
            "steps:\n  - { id: a, kind: teleport }\nname: x",
            "a",
            "kind",
        ),
        (
            "name: x\nsteps:\n  - { id: a, kind: assign, set: { v: '1' }, next: [{ to: nope }] }",
            "a",
            "next[0].to",
        ),
        (
            "name: x\nsteps:\n  - { id: a, kind: assign, set: { v: '1 +' }, next: [{ to: b }] }\n  - { id: b, kind: end, status: completed }",
            "a",
            "set.v",
        ),
        (
            "name: x\nsteps:\n  - { id: a, kind: http, method: GET, url: 'http://h', timeout: soon, next: [{ to: b }] }\n  - { id: b, kind: end, status: completed }",
            "a",
            "timeout",
        ),
        (
            "name: Bad Name\nsteps:\n  - { id: a, kind: end, status: completed }",
            "",
            "name",
        ),
    ];
    for (source, step, field) in cases {
        let (status, body) = post_text(&format!("{api}/v1/workflows"), source).await?;
        assert_eq!(status, 422, "{source}: {body}");
        assert_eq!(body["error"]["code"], "invalid_definition");
        let details = body["error"]["details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            details
                .iter()
                .any(|d| d["field"] == *field && (step.is_empty() || d["step"] == *step)),
            "{source}: expected step {step:?} field {field:?} in {details:?}"
        );
    }
    let (status, body) = get(&format!("{api}/v1/workflows")).await?;
    assert_eq!(
        (status, body["workflows"].as_array().map(Vec::len)),
        (200, Some(0)),
        "nothing was stored"
    );

    let unknown = uuid::Uuid::now_v7();
    let (status, body) = get(&format!("{api}/v1/instances/{unknown}")).await?;
    assert_eq!(status, 404);
    assert!(error_of(&body).1.contains(&unknown.to_string()), "{body}");
    let (status, body) = get(&format!("{api}/v1/instances/{unknown}/journal")).await?;
    assert_eq!((status, error_of(&body).0.as_str()), (404, "not_found"));
    let (status, body) = get(&format!("{api}/v1/instances/not-a-uuid")).await?;
    assert_eq!((status, error_of(&body).0.as_str()), (400, "invalid_id"));

    let resp = reqwest::Client::new()
        .post(format!("{api}/v1/instances"))
        .bearer_auth(drover_tests::admin_token())
        .header("content-type", "application/json")
        .body("{\"workflow\": ")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await?;
    assert_eq!(error_of(&body).0, "invalid_json");

    let (status, body) = post_json(
        &format!("{api}/v1/instances"),
        &json!({ "workflow": "ghost" }),
    )
    .await?;
    assert_eq!(status, 404, "{body}");
    let huge = "x".repeat(2 << 20);
    let (status, body) = post_text(&format!("{api}/v1/workflows"), &huge).await?;
    assert_eq!(
        (status, error_of(&body).0.as_str()),
        (413, "payload_too_large")
    );

    // The CLI reports API errors and exits non-zero.
    let out = env
        .cli_raw(api, &["instance", "show", &unknown.to_string()])
        .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&unknown.to_string()));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_deploys_starts_and_shows_instances_as_tables_or_json() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    let file = std::env::temp_dir().join(format!("{}-hello.yaml", env.prefix));
    std::fs::write(
        &file,
        "name: hello\nvars: { who: world }\nsteps:\n  - { id: greet, kind: handler, handler: echo, input: { who: vars.who }, next: [{ to: done }] }\n  - { id: done, kind: end, status: completed }\n",
    )?;
    let out = env
        .cli(
            api,
            &["workflow", "deploy", file.to_str().unwrap_or_default()],
        )
        .await?;
    assert!(out.contains("hello") && out.contains('1'), "{out}");
    let out = env
        .cli(
            api,
            &[
                "--json",
                "start",
                "hello",
                "--count",
                "3",
                "--vars",
                r#"{"who":"cli"}"#,
            ],
        )
        .await?;
    let started: Value = serde_json::from_str(&out)?;
    let ids: Vec<String> = started["ids"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        wait_until("completion", Duration::from_secs(20), || async {
            let out = env.cli(api, &["--json", "instance", "show", id]).await?;
            let instance: Value = serde_json::from_str(&out)?;
            Ok((instance["state"] == "completed").then_some(()))
        })
        .await?;
    }
    let out = env
        .cli(api, &["--json", "instance", "list", "--state", "completed"])
        .await?;
    let listed: Value = serde_json::from_str(&out)?;
    assert_eq!(listed["instances"].as_array().map(Vec::len), Some(3));
    let table = env.cli(api, &["instance", "list"]).await?;
    for id in &ids {
        assert!(table.contains(id.as_str()), "{table}");
    }
    let out = env.cli(api, &["--json", "journal", &ids[0]]).await?;
    let journal: Value = serde_json::from_str(&out)?;
    let entries = journal["entries"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[1]["output"]["echo"]["who"], "cli");
    env.cleanup().await;
    Ok(())
}
