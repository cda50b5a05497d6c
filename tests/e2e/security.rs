//! Safe by default: API tokens from the CLI, each acting under its own name, and never a
//! token in a log.

use std::time::Duration;

use anyhow::Context;
use drover_tests::{TestEnv, admin_token, wait_until};
use serde_json::Value;

use crate::support::deploy;

const ONE_STEP: &str = "name: one\nsteps:\n  - id: done\n    kind: end\n    status: completed\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_the_logs_even_at_trace_level() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut node = env
        .spawn_node_env(
            "worker,api,coordinator",
            &[],
            &[("RUST_LOG".to_owned(), "trace".to_owned())],
        )
        .await?;
    let api = node.api().to_owned();
    let created: Value = serde_json::from_str(
        &env.cli(
            &api,
            &["--json", "token", "create", "ci", "--scope", "operator"],
        )
        .await?,
    )?;
    let token = created["token"].as_str().context("a token")?.to_owned();
    deploy(&api, ONE_STEP).await?;
    env.cli(&api, &["--token", &token, "start", "one", "--count", "3"])
        .await?;
    wait_until(
        "the instances to complete",
        Duration::from_secs(20),
        || async {
            let (done,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM instance WHERE state = 'completed'")
                    .fetch_one(env.store.pool())
                    .await?;
            Ok((done == 3).then_some(()))
        },
    )
    .await?;
    let refused = env
        .cli_raw(&api, &["--token", "drv_wrong-token-value", "nodes"])
        .await?;
    assert!(!refused.status.success());
    node.stop().await?;

    let log = std::fs::read_to_string(&node.log)?;
    assert!(
        log.contains("TRACE") && log.lines().count() > 100,
        "the node logged at trace level ({} lines)",
        log.lines().count()
    );
    for secret in [admin_token(), &token, "drv_wrong-token-value"] {
        assert!(
            !log.contains(secret),
            "a token is in the log {}",
            node.log.display()
        );
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_and_revokes_tokens_and_scopes_hold() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api,coordinator").await?;
    let api = node.api();
    deploy(api, ONE_STEP).await?;

    let created: Value = serde_json::from_str(
        &env.cli(
            api,
            &[
                "--json",
                "token",
                "create",
                "vera",
                "--scope",
                "viewer",
                "--expires",
                "1h",
            ],
        )
        .await?,
    )?;
    let mut keys: Vec<&String> = created.as_object().context("an object")?.keys().collect();
    keys.sort();
    assert_eq!(keys, ["expires_at", "name", "scope", "token"]);
    let viewer = created["token"].as_str().context("a token")?.to_owned();
    // Without --json: the token alone on standard output.
    let plain = env
        .cli(api, &["token", "create", "otto", "--scope", "operator"])
        .await?;
    let operator = plain.trim().to_owned();
    assert!(
        operator.starts_with("drv_") && !operator.contains(' '),
        "{plain}"
    );

    let listed = env.cli(api, &["token", "list"]).await?;
    assert!(listed.contains("vera") && listed.contains("viewer") && listed.contains("otto"));
    assert!(!listed.contains(&viewer[4..]) && !listed.contains(&operator[4..]));

    env.cli(api, &["--token", &viewer, "instance", "list"])
        .await?;
    let refused = env
        .cli_raw(api, &["--token", &viewer, "start", "one"])
        .await?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("needs the operator scope"), "{stderr}");
    env.cli(api, &["--token", &operator, "start", "one"])
        .await?;
    let file = std::env::temp_dir().join(format!("{}-one.yaml", env.prefix));
    std::fs::write(&file, ONE_STEP)?;
    let refused = env
        .cli_raw(
            api,
            &[
                "--token",
                &operator,
                "workflow",
                "deploy",
                &file.to_string_lossy(),
            ],
        )
        .await?;
    assert!(!refused.status.success(), "operators do not deploy");

    let nobody = env.cli_raw(api, &["--token", "", "nodes"]).await?;
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(!nobody.status.success());
    assert!(stderr.contains("needs an API token"), "{stderr}");

    env.cli(api, &["token", "revoke", "otto"]).await?;
    let revoked = env.cli_raw(api, &["--token", &operator, "nodes"]).await?;
    let stderr = String::from_utf8_lossy(&revoked.stderr);
    assert!(!revoked.status.success());
    assert!(stderr.contains("unknown or revoked token"), "{stderr}");
    env.cleanup().await;
    Ok(())
}
