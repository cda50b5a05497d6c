//! Helpers shared by the scenarios: API calls and queries.

use std::time::Duration;

use anyhow::{Context, bail};
use drover_tests::{TestEnv, admin_token, wait_until};
use serde_json::{Value, json};

pub(crate) async fn post_text(url: &str, body: &str) -> anyhow::Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(admin_token())
        .body(body.to_owned())
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

pub(crate) async fn post_json(url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(admin_token())
        .json(body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

pub(crate) async fn get(url: &str) -> anyhow::Result<(u16, Value)> {
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(admin_token())
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Deploys `source`; fails unless the API accepted it.
pub(crate) async fn deploy(api: &str, source: &str) -> anyhow::Result<Value> {
    let (status, body) = post_text(&format!("{api}/v1/workflows"), source).await?;
    if status != 201 && status != 200 {
        bail!("deploy answered {status}: {body}");
    }
    Ok(body)
}

/// Starts `count` instances; returns their ids.
pub(crate) async fn start(
    api: &str,
    workflow: &str,
    vars: Value,
    count: u32,
) -> anyhow::Result<Vec<String>> {
    let (status, body) = post_json(
        &format!("{api}/v1/instances"),
        &json!({ "workflow": workflow, "vars": vars, "count": count }),
    )
    .await?;
    if status != 201 {
        bail!("start answered {status}: {body}");
    }
    let ids = body["ids"].as_array().context("ids")?;
    Ok(ids
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect())
}

/// Waits until no instance is in a non-terminal, non-error state; returns counts by state.
pub(crate) async fn wait_settled(
    env: &TestEnv,
    expected: i64,
    timeout: Duration,
) -> anyhow::Result<Vec<(String, i64)>> {
    wait_until("every instance to settle", timeout, || async {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM instance GROUP BY state ORDER BY state")
                .fetch_all(env.store.pool())
                .await?;
        let settled: i64 = rows
            .iter()
            .filter(|(s, _)| matches!(s.as_str(), "completed" | "failed" | "in_error"))
            .map(|(_, n)| n)
            .sum();
        Ok((settled == expected).then_some(rows))
    })
    .await
}

/// `(num_pending, num_ack_pending)` of the default queue's worker consumer.
pub(crate) async fn consumer_backlog(env: &TestEnv) -> anyhow::Result<(u64, usize)> {
    let mut consumer = env.bus.worker_consumer(&Default::default()).await?;
    let info = consumer.info().await?;
    Ok((info.num_pending, info.num_ack_pending))
}

/// Waits until every job message has been delivered and acked (or terminated).
pub(crate) async fn wait_jobs_drained(env: &TestEnv) -> anyhow::Result<()> {
    wait_until(
        "the job consumer to drain",
        Duration::from_secs(30),
        || async { Ok((consumer_backlog(env).await? == (0, 0)).then_some(())) },
    )
    .await
}
