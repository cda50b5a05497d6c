//! The CLI as a script sees it: a one-line summary on a non-terminal, the API's error JSON
//! with `--json`, documented exit codes, and a timeout against a server that never answers.

use std::time::Duration;

use drover_tests::{TestEnv, wait_until};
use serde_json::Value;

use crate::support::deploy;

const WAITER: &str = "name: waiter\nsteps:\n  - { id: wait, kind: wait_event, name: go, next: [{ to: done }] }\n  - { id: done, kind: end, status: completed }\n";

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_summarises_bulk_work_on_a_pipe_and_reports_errors_with_exit_codes()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, WAITER).await?;

    // A bulk start (two requests of 1000 and one of 500) on a pipe: one line, no bar.
    let out = env
        .cli_raw(api, &["start", "waiter", "--count", "2500"])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(0), "{stderr}");
    assert_eq!(
        stdout,
        "started 2,500 instances of waiter v1 in campaign default (2,500 running, 0 queued)\n"
    );
    assert!(stderr.is_empty(), "no progress bar on a pipe: {stderr:?}");
    let ids = env
        .cli(api, &["start", "waiter", "--count", "3", "--ids"])
        .await?;
    assert_eq!(ids.lines().count(), 3, "{ids}");

    // The live instances of the unlimited default campaign are counted.
    wait_until("the instances to wait", Duration::from_secs(30), || async {
        let out = env
            .cli(api, &["--json", "campaign", "show", "default"])
            .await?;
        let campaign: Value = serde_json::from_str(&out)?;
        Ok((campaign["running"] == 2503).then_some(()))
    })
    .await?;

    // A bulk command by filter runs as an operation and ends in its counts.
    let out = env
        .cli(
            api,
            &["kill", "--campaign", "default", "--workflow", "waiter"],
        )
        .await?;
    assert!(out.starts_with("kill: 2503 matched, 2503 changed"), "{out}");

    // --json errors are the API's error JSON, on stdout; 404 exits 3.
    let unknown = uuid::Uuid::now_v7().to_string();
    let out = env
        .cli_raw(api, &["--json", "instance", "show", &unknown])
        .await?;
    assert_eq!(code(&out), Some(3));
    let error: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(error["error"]["code"], "not_found", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&unknown)),
        "{error}"
    );
    // A conflict (resuming an instance that is not in_error) exits 4.
    let id = ids.lines().next().unwrap_or_default();
    let out = env.cli_raw(api, &["resume", id, "--current-step"]).await?;
    assert_eq!(
        code(&out),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Usage: a bad command line, or an argument that does not parse, exits 2.
    for args in [
        &["start", "waiter", "--vars", "[1"][..],
        &["start"],
        &["no-such-command"],
    ] {
        let out = env.cli_raw(api, args).await?;
        assert_eq!(code(&out), Some(2), "{args:?}");
    }
    let out = env
        .cli_raw(api, &["--json", "start", "waiter", "--vars", "[1"])
        .await?;
    let error: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(error["error"]["code"], "usage", "{error}");

    drop(node);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out_with_a_clear_message() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = format!("http://{}", listener.local_addr()?);
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        env.cli_raw(&api, &["--timeout", "1s", "nodes"]),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the CLI hung"))??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not answer within 1s") && stderr.contains("--timeout"),
        "{stderr}"
    );
    // DROVER_TIMEOUT is the flag's twin.
    let out = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::process::Command::new(drover_tests::node_bin())
            .args(["--json", "nodes"])
            .env("DROVER_API_URL", &api)
            .env("DROVER_TIMEOUT", "1s")
            .output()
            .await
    })
    .await
    .map_err(|_| anyhow::anyhow!("the CLI hung"))??;
    let error: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(error["error"]["code"], "timeout", "{error}");
    held.abort();
    env.cleanup().await;
    Ok(())
}

/// Whether `drover dev` can find its programs here; `None` says what is missing.
fn dev_binaries_missing() -> Option<&'static str> {
    if drover::find_nats().is_none() {
        return Some("nats-server is not installed");
    }
    match drover::pgserver::find_bindir() {
        Ok(Some(_)) => None,
        _ => Some("the Postgres server programs (initdb, pg_ctl) are not installed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drover_dev_starts_a_cluster_with_the_examples_and_stops_it_on_ctrl_c() -> anyhow::Result<()>
{
    if let Some(missing) = dev_binaries_missing() {
        eprintln!("skipped: {missing}");
        return Ok(());
    }
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(drover_tests::node_bin())
        .args(["dev", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let (mut api, mut token, mut dir) = (None, None, None);
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["API", url, ..] => api = Some((*url).to_owned()),
                ["admin", "token", t] => token = Some((*t).to_owned()),
                ["Drover", "dev", "cluster", "ready", ..] => {
                    dir = line
                        .split("deletes ")
                        .nth(1)
                        .map(|d| d.trim_end_matches(')').to_owned());
                }
                ["export", ..] => break,
                _ => {}
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("drover dev did not announce itself in 120s"))??;
    let (Some(api), Some(token), Some(dir)) = (api, token, dir) else {
        anyhow::bail!("drover dev did not print its API, token and directory");
    };
    let workflows: Value = reqwest::Client::new()
        .get(format!("{api}/v1/workflows"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert!(
        workflows["workflows"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == "welcome")),
        "{workflows}"
    );
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .map_err(|_| anyhow::anyhow!("drover dev did not stop on SIGINT"))??;
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "{dir} was not removed"
    );
    Ok(())
}
