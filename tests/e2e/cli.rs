//! The CLI as a script sees it: a one-line summary on a non-terminal, the API's error JSON
//! with `--json`, documented exit codes, and a timeout against a server that never answers.

use std::time::Duration;

use drover_tests::{TestEnv, wait_until};
use serde_json::{Value, json};

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

const QUICK: &str = "name: quick\nvars: { n: 0 }\nsteps:\n  - { id: add, kind: assign, set: { n: 'vars.n + 1' }, next: [{ to: done }] }\n  - { id: done, kind: end, status: completed }\n";
const DOOMED: &str = "name: doomed\nsteps:\n  - { id: give_up, kind: end, status: failed }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_follows_many_instances_to_their_end_and_fails_unless_all_completed()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    for source in [QUICK, DOOMED, WAITER] {
        deploy(api, source).await?;
    }

    // All complete: the start's line, then how they ended; exit 0.
    let out = env
        .cli_raw(api, &["start", "quick", "--count", "1200", "--wait", "2m"])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("started 1,200 instances of quick v1 in campaign default"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("all 1,200 ended in ") && lines[1].ends_with(": 1,200 completed"),
        "{stdout}"
    );
    // On a pipe: no bar, at most a line every 5 s.
    assert!(
        stderr.lines().all(|line| line.starts_with("waiting: ")),
        "{stderr:?}"
    );

    // Some ended otherwise: exit 1; with --json, one JSON document saying which.
    let out = env
        .cli_raw(
            api,
            &["--json", "start", "doomed", "--count", "3", "--wait", "2m"],
        )
        .await?;
    assert_eq!(
        code(&out),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(answer["ids"].as_array().map(Vec::len), Some(3), "{answer}");
    let wait = &answer["wait"];
    assert_eq!(
        (&wait["total"], &wait["ended"], &wait["lapsed"]),
        (&json!(3), &json!(3), &json!(false)),
        "{answer}"
    );
    assert_eq!(wait["ended_by_state"], json!({"failed": 3}), "{answer}");
    assert_eq!(wait["not_completed"].as_array().map(Vec::len), Some(3));

    // The wait lapses: exit 1, the summary says what had not ended.
    let out = env
        .cli_raw(api, &["start", "waiter", "--count", "4", "--wait", "1s"])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("the wait lapsed after 1s: 0/4 ended, 0 completed · 4 "),
        "{stdout}"
    );
    assert!(
        stderr.contains("4 had not ended when the wait lapsed"),
        "{stderr}"
    );

    drop(node);
    env.cleanup().await;
    Ok(())
}

/// Runs `drover args` under a pseudo-terminal (util-linux `script`), answering its exit code
/// and everything it wrote to the terminal; `None` when `script` is not installed.
async fn on_a_terminal(api: &str, args: &[&str]) -> anyhow::Result<Option<(Option<i32>, String)>> {
    let command = std::iter::once(drover_tests::node_bin().display().to_string())
        .chain(args.iter().map(|arg| (*arg).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = match tokio::process::Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("DROVER_API_URL", api)
        .env("DROVER_TOKEN", drover_tests::admin_token())
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output()
        .await
    {
        Ok(out) => out,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    Ok(Some((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_bulk_start_and_wait_draw_a_progress_bar() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let node = env.spawn_node("worker,api").await?;
    let api = node.api();
    deploy(api, QUICK).await?;
    let Some((status, screen)) = on_a_terminal(api, &["start", "quick", "--count", "2500"]).await?
    else {
        eprintln!("skipped: util-linux `script` is not installed");
        return Ok(());
    };
    assert_eq!(status, Some(0), "{screen}");
    // The bar (drawn, then cleared), then the summary.
    assert!(screen.contains("starting "), "no bar drawn: {screen:?}");
    assert!(screen.contains("/2,500"), "no bar drawn: {screen:?}");
    assert!(
        screen.contains(
            "started 2,500 instances of quick v1 in campaign default (2,500 running, 0 queued)"
        ),
        "{screen:?}"
    );

    let Some((status, screen)) =
        on_a_terminal(api, &["start", "quick", "--count", "1500", "--wait", "2m"]).await?
    else {
        anyhow::bail!("script went away");
    };
    assert_eq!(status, Some(0), "{screen}");
    assert!(screen.contains("waiting "), "no wait bar drawn: {screen:?}");
    assert!(
        screen.contains("/1,500 ended"),
        "no wait bar drawn: {screen:?}"
    );
    assert!(screen.contains("all 1,500 ended in "), "{screen:?}");
    assert!(screen.contains(": 1,500 completed"), "{screen:?}");

    drop(node);
    env.cleanup().await;
    Ok(())
}
