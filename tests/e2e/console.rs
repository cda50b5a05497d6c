//! The web console in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, `fantoccini`) against a live node. Logs in, finds an instance, reads its
//! journal, resumes it from `in_error` with an edited variable and watches it complete (the
//! page updates itself from the event stream), lowers a campaign's limit, pauses and unpauses
//! its admissions, and looks at every page. Screenshots of each page land in
//! `target/console-screenshots/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (CI installs them); without chromedriver
//! the test fails and says so.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use drover_tests::{Recorder, TestEnv, admin_token, wait_until};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::{deploy, get, post_json};

/// `call` answers the status `vars.status` names: 404 (permanent) until an operator sets it.
fn flaky_workflow(recorder: &str) -> String {
    format!(
        r#"
name: flaky-call
description: Calls a service that answers the status its variables name.
vars: {{ status: 404 }}
steps:
  - id: call
    kind: http
    method: POST
    url: "{recorder}/status/call"
    body: {{ status: "vars.status", id: "instance.id" }}
    next:
      - to: celebrate
        when: 'vars.status == 200'
      - to: done
  - id: celebrate
    kind: assign
    set: {{ celebrated: "true" }}
    next: [{{ to: done }}]
  - id: done
    kind: end
    status: completed
"#
    )
}

/// chromedriver on PATH (or `CHROMEDRIVER`), or why the test cannot run.
fn chromedriver() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMEDRIVER") {
        return Ok(PathBuf::from(path));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromedriver"))
            .find(|path| path.is_file())
    });
    found.context(
        "chromedriver is not installed: the console's browser tests drive headless Chromium \
         through it. Install Debian's packages (apt-get install -y chromium chromium-driver; \
         .ci/run does), or point CHROMEDRIVER at a chromedriver binary",
    )
}

/// A chromedriver process on a free port; killed when dropped.
struct Driver {
    _child: Child,
    url: String,
}

async fn start_driver() -> anyhow::Result<Driver> {
    let binary = chromedriver()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&binary)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    wait_until(
        "chromedriver to answer",
        Duration::from_secs(20),
        || async {
            Ok(reqwest::get(format!("{url}/status"))
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        },
    )
    .await?;
    Ok(Driver { _child: child, url })
}

async fn browser(driver: &Driver) -> anyhow::Result<Client> {
    let mut caps = serde_json::Map::new();
    let mut options = json!({
        "args": [
            "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1366,900", "--hide-scrollbars"
        ]
    });
    if let Some(binary) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|path| Path::new(path).exists())
    {
        options["binary"] = json!(binary);
    }
    caps.insert("goog:chromeOptions".to_owned(), options);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .context("opening a Chromium session through chromedriver")
}

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots")
}

async fn screenshot(client: &Client, name: &str) -> anyhow::Result<()> {
    let png = client.screenshot().await?;
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.png")), png)?;
    Ok(())
}

/// The text of the element `css`, once it contains `wanted` (the page may update itself).
async fn wait_text(client: &Client, css: &str, wanted: &str) -> anyhow::Result<String> {
    wait_until(
        &format!("{css} to read {wanted:?}"),
        Duration::from_secs(30),
        || async {
            let Ok(element) = client.find(Locator::Css(css)).await else {
                return Ok(None);
            };
            let text = element.text().await.unwrap_or_default();
            Ok(text.contains(wanted).then_some(text))
        },
    )
    .await
}

/// The element `css`, once the page has it (a click may still be navigating).
async fn wait_element(client: &Client, css: &str) -> anyhow::Result<Element> {
    wait_until(
        &format!("{css} on the page"),
        Duration::from_secs(30),
        || async { Ok(client.find(Locator::Css(css)).await.ok()) },
    )
    .await
}

/// Clicks `css`'s submit button and accepts the confirmation the page asks for.
async fn confirm_submit(client: &Client, css: &str) -> anyhow::Result<()> {
    client.find(Locator::Css(css)).await?.click().await?;
    wait_until(
        "the confirmation dialog",
        Duration::from_secs(10),
        || async { Ok(client.get_alert_text().await.ok()) },
    )
    .await?;
    client.accept_alert().await?;
    Ok(())
}

async fn api_state(api: &str, id: &str) -> anyhow::Result<Value> {
    let (_, instance) = get(&format!("{api}/v1/instances/{id}")).await?;
    Ok(instance)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resumes_an_instance_and_lowers_a_limit_in_the_browser() -> anyhow::Result<()> {
    let driver = start_driver().await?;
    let env = TestEnv::new().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let node = env.spawn_node("worker,coordinator,api").await?;
    let api = node.api().to_owned();
    deploy(&api, &flaky_workflow(&recorder_url)).await?;
    let (status, body) = post_json(
        &format!("{api}/v1/campaigns"),
        &json!({ "name": "batch", "max_running": 5 }),
    )
    .await?;
    anyhow::ensure!(status == 201, "campaign: {status} {body}");
    let (status, body) = post_json(
        &format!("{api}/v1/instances"),
        &json!({ "workflow": "flaky-call", "campaign": "batch", "count": 3 }),
    )
    .await?;
    anyhow::ensure!(status == 201, "start: {status} {body}");
    let ids: Vec<String> = body["ids"]
        .as_array()
        .context("ids")?
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect();
    let id = ids.first().context("an instance")?.clone();
    for id in &ids {
        wait_until("instances in error", Duration::from_secs(30), || async {
            Ok((api_state(&api, id).await?["state"] == "in_error").then_some(()))
        })
        .await?;
    }

    let client = browser(&driver).await?;
    let outcome = scenario(&client, &api, &id).await;
    if outcome.is_err() {
        let _ = screenshot(&client, "failure").await;
    }
    let _ = client.close().await;
    outcome?;

    // What the browser did, the API shows.
    let instance = api_state(&api, &id).await?;
    assert_eq!(instance["state"], "completed", "{instance}");
    assert_eq!(instance["vars"]["status"], 200);
    assert_eq!(instance["vars"]["celebrated"], true);
    let (_, campaign) = get(&format!("{api}/v1/campaigns/batch")).await?;
    assert_eq!(campaign["max_running"], 1, "{campaign}");
    assert!(campaign["paused_at"].is_null(), "unpaused: {campaign}");
    env.cleanup().await;
    Ok(())
}

async fn scenario(client: &Client, api: &str, id: &str) -> anyhow::Result<()> {
    // Not logged in: the login form, then the page asked for.
    client.goto(&format!("{api}/ui/instances")).await?;
    let login = client.find(Locator::Css("#token")).await?;
    screenshot(client, "login").await?;
    login.send_keys(admin_token()).await?;
    client
        .find(Locator::Css("form.login button[type=submit]"))
        .await?
        .click()
        .await?;
    wait_text(client, "h1", "Instances").await?;
    let counts = wait_text(client, "#counts", "in_error").await?;
    anyhow::ensure!(counts.contains('3'), "three in error: {counts}");

    // Find it: filter by state and campaign, then open it from the list.
    client
        .find(Locator::Css("select[name=state] option[value=in_error]"))
        .await?
        .click()
        .await?;
    client
        .find(Locator::Css("select[name=campaign] option[value=batch]"))
        .await?
        .click()
        .await?;
    client
        .find(Locator::Css("form.filters button[type=submit]"))
        .await?
        .click()
        .await?;
    wait_text(client, "#list", id).await?;
    screenshot(client, "instances").await?;
    client
        .find(Locator::Css(&format!("a[href='/ui/instances/{id}']")))
        .await?
        .click()
        .await?;

    // Its journal and why it stopped.
    wait_text(client, "#state", "in_error").await?;
    let journal = wait_text(client, "#journal", "call").await?;
    anyhow::ensure!(
        journal.contains("failed") && journal.contains("404"),
        "the journal shows the failed call: {journal}"
    );
    let why = client.find(Locator::Css("#why")).await?.text().await?;
    anyhow::ensure!(!why.is_empty(), "a why sentence");
    screenshot(client, "instance-in-error").await?;

    // Resume at the current step with the corrected variable; the page follows it to the end.
    let editor = client.find(Locator::Css("textarea#set")).await?;
    editor.clear().await?;
    editor.send_keys(r#"{"status": 200}"#).await?;
    confirm_submit(client, "form.resume button[type=submit]").await?;
    let result = wait_text(client, "#result", "resumed").await?;
    anyhow::ensure!(result.contains("call"), "resumed at call: {result}");
    wait_text(client, "#state", "completed").await?;
    wait_text(client, "#journal", "celebrate").await?;
    screenshot(client, "instance").await?;

    // Lower the campaign's limit.
    client.goto(&format!("{api}/ui/campaigns")).await?;
    wait_text(client, "#campaign-batch", "batch").await?;
    screenshot(client, "campaigns").await?;
    let limit = client.find(Locator::Css("#limit-batch")).await?;
    limit.clear().await?;
    limit.send_keys("1").await?;
    confirm_submit(client, "#campaign-batch form button[type=submit]").await?;
    let result = wait_text(client, "#result", "limit").await?;
    anyhow::ensure!(result.contains("5 → 1"), "{result}");
    wait_text(client, "#campaign-batch .limit", "1").await?;

    // Pause its admissions, then unpause them.
    confirm_submit(
        client,
        "#campaign-batch form[action$='/pause'] button[type=submit]",
    )
    .await?;
    wait_text(client, "#result", "paused").await?;
    wait_text(client, "#campaign-batch th", "paused").await?;
    let (_, paused) = get(&format!("{api}/v1/campaigns/batch")).await?;
    anyhow::ensure!(
        paused["paused_at"].is_string(),
        "the API shows the campaign paused: {paused}"
    );
    confirm_submit(
        client,
        "#campaign-batch form[action$='/pause'] button[type=submit]",
    )
    .await?;
    wait_text(client, "#result", "unpaused").await?;

    // The other pages.
    client.goto(&format!("{api}/ui/workflows")).await?;
    wait_text(client, "main", "flaky-call").await?;
    screenshot(client, "workflows").await?;
    client
        .goto(&format!("{api}/ui/workflows/flaky-call"))
        .await?;
    client.find(Locator::Css(".graph svg")).await?;
    screenshot(client, "workflow").await?;
    client.goto(&format!("{api}/ui/schedules")).await?;
    wait_text(client, "h1", "Schedules").await?;
    screenshot(client, "schedules").await?;
    client.goto(&format!("{api}/ui/nodes")).await?;
    wait_text(client, "#leader", "Leader:").await?;
    screenshot(client, "nodes").await?;

    // Logging out forgets the token.
    client
        .find(Locator::Css("form.logout button"))
        .await?
        .click()
        .await?;
    wait_element(client, "#token").await?;
    client.goto(&format!("{api}/ui/nodes")).await?;
    wait_element(client, "#token").await?;
    if client.current_url().await?.path() != "/ui/" {
        bail!("logged out, a page sends to the login form");
    }
    Ok(())
}
