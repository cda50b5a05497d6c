//! Bulk commands in chunks, each request short, with a progress bar on standard error when it
//! is a terminal (and nothing there otherwise: the command's summary is the whole output).

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use drover_api::{ApiClient, START_CHUNK, StartOperation, StartRequest};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::render::thousands;

/// A progress bar of `total` on standard error, hidden unless it is a terminal.
pub(super) fn bar(total: u64, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let style = ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{human_pos}}/{{human_len}} ({{per_sec}}, {{eta}} left)"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Starts `request.count` instances in requests of [`START_CHUNK`], all of the version the
/// first request pinned; answers one `Started` JSON for them all (`ids`, `queued`, `workflow`,
/// `version`, `campaign`).
pub(super) async fn start_all(client: &ApiClient, mut request: StartRequest) -> Result<Value> {
    let total = u64::from(request.count.unwrap_or(1));
    let progress = bar(total, "starting");
    let mut ids: Vec<Value> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut queued = 0u64;
    let mut first: Option<Value> = None;
    let chunk = u64::try_from(START_CHUNK).unwrap_or(1000);
    while (ids.len() as u64) < total {
        let n = chunk.min(total - ids.len() as u64);
        request.count = Some(u32::try_from(n).unwrap_or(1));
        let answer = client.start(&request, None).await.with_context(|| {
            if ids.is_empty() {
                "starting instances".to_owned()
            } else {
                format!(
                    "after {} of {total} instances started (they run on)",
                    ids.len()
                )
            }
        })?;
        // Later chunks run the version the first one pinned, even if another is deployed
        // meanwhile.
        request.version = answer["version"]
            .as_i64()
            .and_then(|v| i32::try_from(v).ok());
        queued += answer["queued"].as_u64().unwrap_or(0);
        ids.extend(answer["ids"].as_array().cloned().unwrap_or_default());
        progress.set_position(ids.len() as u64);
        first.get_or_insert(answer);
    }
    progress.finish_and_clear();
    let first = first.unwrap_or(Value::Null);
    Ok(json!({
        "ids": ids,
        "queued": queued,
        "workflow": first["workflow"],
        "version": first["version"],
        "campaign": first["campaign"],
    }))
}

/// How often a followed operation is read.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Runs a lifecycle command on a filter as a server-side operation and follows it to its
/// end, a spinner with its counts on a terminal; Ctrl-C cancels it (after its current
/// batch). Answers its final counts (the `LifecycleSummary`, with the operation's `id` and
/// `state` added).
pub(super) async fn follow_operation(
    client: &ApiClient,
    request: &StartOperation,
) -> Result<Value> {
    let started = client
        .start_operation(request)
        .await
        .context("starting the operation")?;
    let id = started["id"].as_str().unwrap_or_default().to_owned();
    let spinner = bar(0, &request.command);
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut ticks = tokio::time::interval(POLL_EVERY);
    let mut cancelled = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let operation = loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = &mut ctrl_c, if !cancelled => {
                cancelled = true;
                spinner.println(format!("cancelling operation {id} after its current batch…"));
                client.cancel_operation(&id).await.context("cancelling the operation")?;
                continue;
            }
        }
        let operation = client
            .operation(&id)
            .await
            .with_context(|| format!("reading operation {id}"))?;
        let progress = &operation["progress"];
        spinner.set_message(format!(
            "{}: {} matched, {} changed",
            request.command,
            thousands(progress["matched"].as_u64().unwrap_or(0)),
            thousands(progress["changed"].as_u64().unwrap_or(0)),
        ));
        spinner.tick();
        if operation["state"] != "running" {
            break operation;
        }
    };
    spinner.finish_and_clear();
    let state = operation["state"].as_str().unwrap_or_default().to_owned();
    if state == "failed" {
        anyhow::bail!(
            "operation {id} failed: {}",
            operation["error"].as_str().unwrap_or("no reason given")
        );
    }
    let mut summary = operation["progress"].clone();
    if let Some(fields) = summary.as_object_mut() {
        fields.insert("operation".to_owned(), json!(id));
        fields.insert("state".to_owned(), json!(state));
        if let Some(error) = operation.get("error") {
            fields.insert("error".to_owned(), error.clone());
        }
    }
    Ok(summary)
}
