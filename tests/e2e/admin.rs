//! The admin port (`--admin-listen`): `/healthz` answers while the process lives, `/readyz`
//! goes unready — saying why, as JSON — when Postgres or NATS cannot be reached or a
//! migration is missing, and ready again once they are back; `/metrics` serves what the node
//! records.

use std::time::Duration;

use anyhow::Context;
use drover_tests::{NodeProcess, Proxy, TestEnv, wait_until};
use serde_json::{Value, json};

use crate::support::{deploy, start, wait_settled};

const TWO_STEPS: &str = r#"
name: two-steps
vars: { n: 0 }
steps:
  - { id: count, kind: assign, set: { n: "vars.n + 1" }, next: [{ to: compute }] }
  - { id: compute, kind: handler, handler: double, input: { n: "vars.n" }, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

/// A loopback address no one listens on now, for a node's admin port. (The node prints the
/// address it bound, but the harness reads only the lines it knows.)
fn free_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

async fn spawn_with_admin(
    env: &TestEnv,
    roles: &str,
    args: &[&str],
) -> anyhow::Result<(NodeProcess, String)> {
    let addr = free_addr()?;
    let mut all = vec!["--admin-listen", addr.as_str()];
    all.extend_from_slice(args);
    let node = env.spawn_node_with(roles, &all).await?;
    Ok((node, format!("http://{addr}")))
}

/// `(status, body)` of `GET url` (JSON when it parses, else the text as a JSON string).
async fn fetch(url: &str) -> anyhow::Result<(u16, Value)> {
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Waits until `/readyz` answers `status`, and the body `pick` accepts; returns the body.
async fn wait_readyz(
    admin: &str,
    what: &str,
    status: u16,
    pick: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let url = format!("{admin}/readyz");
    wait_until(what, Duration::from_secs(45), || async {
        let (got, body) = fetch(&url).await?;
        Ok((got == status && pick(&body)).then_some(body))
    })
    .await
}

fn reasons(body: &Value) -> Vec<String> {
    body["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn has_reason(body: &Value, check: &str) -> bool {
    reasons(body)
        .iter()
        .any(|r| r.starts_with(&format!("{check}: ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_goes_unready_while_postgres_or_nats_is_cut_off_and_ready_again_once_healed()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (pg_proxy, pg_url) = Proxy::for_url(&env.database_url).await?;
    let (nats_proxy, nats_url) = Proxy::for_url(&env.nats_url).await?;
    let (node, admin) = spawn_with_admin(
        &env,
        "worker,coordinator,api",
        &["--database-url", &pg_url, "--nats-url", &nats_url],
    )
    .await?;

    let (status, body) = fetch(&format!("{admin}/healthz")).await?;
    assert_eq!((status, body), (200, json!("ok")));
    let ready = wait_readyz(&admin, "the node to be ready", 200, |_| true).await?;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["node"], json!(node.id.to_string()));
    assert_eq!(ready["reasons"], json!([]));
    let checks = &ready["checks"];
    assert_eq!(
        (&checks["postgres"], &checks["migrations"], &checks["nats"]),
        (&json!("ok"), &json!("ok"), &json!("ok"))
    );
    for role in ["worker", "relay", "coordinator", "api", "signals"] {
        assert_eq!(checks["loops"][role], "running", "{role}: {ready}");
    }
    assert_eq!(checks["draining"], false);

    // /metrics serves what the node records: run a workflow, find its steps counted.
    deploy(node.api(), TWO_STEPS).await?;
    start(node.api(), "two-steps", json!({}), 3).await?;
    wait_settled(&env, 3, Duration::from_secs(30)).await?;
    let metrics = wait_until(
        "the committed steps in /metrics",
        Duration::from_secs(10),
        || async {
            let (status, body) = fetch(&format!("{admin}/metrics")).await?;
            let text = body.as_str().unwrap_or_default().to_owned();
            Ok(
                (status == 200 && text.contains("drover_worker_steps_committed_total"))
                    .then_some(text),
            )
        },
    )
    .await?;
    assert!(metrics.contains("# TYPE drover_worker_steps_committed_total counter"));

    // Postgres cut off: unready, naming it; alive all the same.
    pg_proxy.cut();
    let unready = wait_readyz(&admin, "unready for Postgres", 503, |b| {
        has_reason(b, "postgres")
    })
    .await?;
    assert_eq!(unready["ready"], false);
    assert_ne!(unready["checks"]["postgres"], "ok");
    let (status, _) = fetch(&format!("{admin}/healthz")).await?;
    assert_eq!(status, 200, "alive while Postgres is away");
    pg_proxy.heal();
    wait_readyz(&admin, "ready again after Postgres healed", 200, |_| true).await?;

    // NATS cut off (the connection looks up: only a round trip tells).
    nats_proxy.cut();
    let unready = wait_readyz(&admin, "unready for NATS", 503, |b| has_reason(b, "nats")).await?;
    assert_eq!(unready["checks"]["postgres"], "ok", "{unready}");
    nats_proxy.heal();
    wait_readyz(&admin, "ready again after NATS healed", 200, |_| true).await?;

    drop(node);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_migration_the_database_lacks() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (node, admin) = spawn_with_admin(&env, "worker", &[]).await?;
    wait_readyz(&admin, "the node to be ready", 200, |_| true).await?;

    // As if the database were one migration behind this binary.
    let (version, description): (i64, String) = sqlx::query_as(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations) \
         RETURNING version, description",
    )
    .fetch_one(env.store.pool())
    .await?;
    let unready = wait_readyz(&admin, "unready for the migration", 503, |b| {
        has_reason(b, "migrations")
    })
    .await?;
    let migrations = unready["checks"]["migrations"].as_str().unwrap_or_default();
    assert!(
        migrations.contains(&format!("{version} ({description})")),
        "{unready}"
    );
    assert_eq!(reasons(&unready).len(), 1, "only the migration: {unready}");

    drop(node);
    env.cleanup().await;
    Ok(())
}

/// The `drover_*` metric names a PromQL text queries (histogram series by their base name).
fn queried_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("drover_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric names a Prometheus exposition text has series of (histograms by base name).
fn exposed_metrics(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_exists_on_a_live_cluster() -> anyhow::Result<()>
{
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/observability");
    let dashboard = std::fs::read_to_string(format!("{root}/grafana-dashboard.json"))?;
    let alerts = std::fs::read_to_string(format!("{root}/prometheus-alerts.yml"))?;
    let exprs: Vec<String> = serde_json::from_str::<Value>(&dashboard)?["panels"]
        .as_array()
        .context("panels")?
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let mut wanted = queried_metrics(&exprs.join("\n"));
    assert!(wanted.len() > 20, "the dashboard queries {wanted:?}");
    let rules: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert_eq!(
        rules.len(),
        4,
        "no leader, outbox backlog, permit drift, stuck ready"
    );
    wanted.extend(queried_metrics(&rules.join("\n")));

    // A cluster that ran a little of everything the panels show: handler, http and assign
    // steps in a limited campaign.
    let env = TestEnv::new().await?;
    let recorder = drover_tests::Recorder::default();
    let url = recorder.start().await?;
    let (coordinator, coordinator_admin) = spawn_with_admin(&env, "coordinator,api", &[]).await?;
    let (_worker, worker_admin) = spawn_with_admin(&env, "worker", &[]).await?;
    let api = coordinator.api().to_owned();
    let (status, body) = crate::support::post_json(
        &format!("{api}/v1/campaigns"),
        &json!({ "name": "metered", "max_running": 2 }),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    deploy(
        &api,
        &format!(
            r#"
name: metered
steps:
  - {{ id: compute, kind: handler, handler: double, input: {{ n: "2" }}, next: [{{ to: call }}] }}
  - {{ id: call, kind: http, method: POST, url: "{url}/ok/m", next: [{{ to: done }}] }}
  - {{ id: done, kind: end, status: completed }}
"#
        ),
    )
    .await?;
    let (status, body) = crate::support::post_json(
        &format!("{api}/v1/instances"),
        &json!({ "workflow": "metered", "campaign": "metered", "count": 5 }),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    wait_settled(&env, 5, Duration::from_secs(60)).await?;

    let missing = wait_until(
        "every queried metric on the nodes",
        Duration::from_secs(30),
        || async {
            let mut exposed = std::collections::BTreeSet::new();
            for admin in [&coordinator_admin, &worker_admin] {
                let (_, body) = fetch(&format!("{admin}/metrics")).await?;
                exposed.extend(exposed_metrics(body.as_str().unwrap_or_default()));
            }
            let missing: Vec<String> = wanted.difference(&exposed).cloned().collect();
            Ok(missing.is_empty().then_some(missing))
        },
    )
    .await;
    if missing.is_err() {
        let mut exposed = std::collections::BTreeSet::new();
        for admin in [&coordinator_admin, &worker_admin] {
            let (_, body) = fetch(&format!("{admin}/metrics")).await?;
            exposed.extend(exposed_metrics(body.as_str().unwrap_or_default()));
        }
        let missing: Vec<&String> = wanted.difference(&exposed).collect();
        panic!("queried but not exposed: {missing:?}");
    }
    env.cleanup().await;
    Ok(())
}
