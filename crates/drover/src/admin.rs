//! The admin port (`--admin-listen`): what an orchestrator and a scraper ask a node, on every
//! role, apart from the public API.
//!
//! | route | answers |
//! | --- | --- |
//! | `GET /healthz` | 200 `ok` while the process serves HTTP (liveness: restart me if not) |
//! | `GET /readyz` | 200 when ready to take work, else 503; JSON naming each check and, when not ready, the reasons |
//! | `GET /metrics` | the node's Prometheus metrics (`drover_*`) |
//!
//! Ready means: Postgres answers a round trip, every migration this binary knows is applied,
//! JetStream answers a round trip (the jobs stream's info: a connection black-holed by a
//! partition looks connected until then), every loop the node started still runs, and the node is not draining. The port
//! serves from the node's first instant (ready: no, with the reason) to its last, draining
//! included, so a probe never sees it vanish before the process does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::migrate::Migrate;
use tokio::net::TcpListener;

use crate::health::Health;

/// How long `/readyz` waits for each dependency's round trip: well under a probe's usual
/// `timeoutSeconds` (k8s default 1 s is too short for a loaded database; the manifests use 5).
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Option<PrometheusHandle>,
}

/// Binds the admin port; the returned future serves it until dropped (the node aborts it
/// last, once it has drained).
pub(crate) async fn bind(
    addr: SocketAddr,
    health: Health,
    metrics: Option<PrometheusHandle>,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin port to {addr}"))?;
    let addr = listener
        .local_addr()
        .context("reading the admin port's address")?;
    let router = router(AdminState { health, metrics });
    Ok((addr, async move { axum::serve(listener, router).await }))
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder\n").into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let report = check(&state.health).await;
    let status = if report.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report.to_json())).into_response()
}

/// What one `/readyz` found: each check is `ok` or why not.
struct Report {
    node: Option<String>,
    postgres: String,
    migrations: String,
    nats: String,
    loops: BTreeMap<&'static str, bool>,
    roles_running: bool,
    draining: bool,
}

impl Report {
    /// Why the node is not ready (empty: it is).
    fn reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        for (check, value) in [
            ("postgres", &self.postgres),
            ("migrations", &self.migrations),
            ("nats", &self.nats),
        ] {
            if value != "ok" {
                reasons.push(format!("{check}: {value}"));
            }
        }
        if self.loops.is_empty() || !self.roles_running {
            reasons.push("roles: not running (starting, stopping, or re-registering)".to_owned());
        }
        for (name, running) in &self.loops {
            if !running {
                reasons.push(format!("{name}: its loop stopped"));
            }
        }
        if self.draining {
            reasons.push("draining: the node was told to stop".to_owned());
        }
        reasons
    }

    fn ready(&self) -> bool {
        self.reasons().is_empty()
    }

    fn to_json(&self) -> serde_json::Value {
        let reasons = self.reasons();
        let loops: BTreeMap<&str, &str> = self
            .loops
            .iter()
            .map(|(name, running)| (*name, if *running { "running" } else { "stopped" }))
            .collect();
        json!({
            "ready": reasons.is_empty(),
            "node": self.node,
            "checks": {
                "postgres": self.postgres,
                "migrations": self.migrations,
                "nats": self.nats,
                "loops": loops,
                "draining": self.draining,
            },
            "reasons": reasons,
        })
    }
}

async fn check(health: &Health) -> Report {
    let readiness = health.readiness();
    let (postgres, migrations) = match health.store() {
        None => (
            "not connected yet".to_owned(),
            "unknown (no database connection yet)".to_owned(),
        ),
        Some(store) => {
            let postgres = within(async { store.ping().await.map_err(|e| e.to_string()) }).await;
            let migrations = if postgres == "ok" {
                within(pending_migrations(store)).await
            } else {
                "unknown (Postgres unreachable)".to_owned()
            };
            (postgres, migrations)
        }
    };
    let nats = match health.bus() {
        None => "not connected yet".to_owned(),
        Some(bus) if !bus.is_connected() => "disconnected (reconnecting)".to_owned(),
        // A JetStream round trip every node's NATS user may make: a connection a partition
        // black-holes still looks connected until then.
        Some(bus) => {
            within(async {
                let stream = bus.subjects().jobs_stream();
                bus.jetstream()
                    .get_stream(&stream)
                    .await
                    .map(drop)
                    .map_err(|e| format!("JetStream stream {stream}: {e}"))
            })
            .await
        }
    };
    Report {
        node: readiness.node.map(|node| node.to_string()),
        postgres,
        migrations,
        nats,
        loops: health.loops(),
        roles_running: readiness.roles_running,
        draining: readiness.draining,
    }
}

/// `ok`, or the error, or that it timed out.
async fn within(check: impl Future<Output = Result<(), String>>) -> String {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(err)) => format!("unreachable: {err}"),
        Err(_) => format!("no answer within {CHECK_TIMEOUT:?}"),
    }
}

/// `Ok` when every migration this binary embeds is applied; else which are not.
async fn pending_migrations(store: &drover_store::Store) -> Result<(), String> {
    let mut conn = store.pool().acquire().await.map_err(|e| e.to_string())?;
    let applied = conn
        .list_applied_migrations()
        .await
        .map_err(|e| format!("reading the applied migrations: {e}"))?;
    let pending: Vec<String> = drover_store::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect();
    if pending.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "pending: {} (run `drover migrate` or start a node with --migrate)",
            pending.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            node: None,
            postgres: "ok".to_owned(),
            migrations: "ok".to_owned(),
            nats: "ok".to_owned(),
            loops: BTreeMap::from([("worker", true), ("relay", true)]),
            roles_running: true,
            draining: false,
        }
    }

    #[test]
    fn a_node_with_every_check_ok_is_ready() {
        let report = report();
        assert!(report.ready());
        assert_eq!(report.to_json()["reasons"], json!([]));
        assert_eq!(report.to_json()["checks"]["loops"]["worker"], "running");
    }

    #[test]
    fn each_failed_check_is_a_reason() {
        let mut report = report();
        report.nats = "no answer within 2s".to_owned();
        report.loops.insert("coordinator", false);
        report.draining = true;
        assert!(!report.ready());
        let json = report.to_json();
        assert_eq!(json["ready"], false);
        assert_eq!(
            json["reasons"],
            json!([
                "nats: no answer within 2s",
                "coordinator: its loop stopped",
                "draining: the node was told to stop",
            ])
        );
    }

    #[test]
    fn a_node_whose_roles_have_not_started_is_not_ready() {
        let mut report = report();
        report.loops.clear();
        assert!(!report.ready());
    }
}
