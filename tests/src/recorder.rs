//! A local HTTP server that records what `http` steps send it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use serde_json::{Value, json};

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
    pub body: Value,
    pub at: std::time::Instant,
}

/// Records requests; `/ok/*` answers 200 with JSON, `/slow/*` too after 1.5 s, `/fail/*`
/// answers 500, `/missing/*` 404, `/status/*` the status its JSON body names in `status`
/// (200 when it names none), `/redirect/*?to=URL` a 307 to `URL`.
#[derive(Clone, Default)]
pub struct Recorder {
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    /// Serves on a free loopback port; returns the base URL.
    pub async fn start(&self) -> anyhow::Result<String> {
        let app = Router::new()
            .route("/{kind}/{*rest}", any(handle))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(format!("http://{addr}"))
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

async fn handle(
    State(recorder): State<Recorder>,
    Path((kind, rest)): Path<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Ok(mut requests) = recorder.requests.lock() {
        requests.push(Recorded {
            path: format!("/{kind}/{rest}"),
            idempotency_key: header("idempotency-key"),
            traceparent: header("traceparent"),
            body: body.clone(),
            at: std::time::Instant::now(),
        });
    }
    if kind == "slow" {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    if kind == "redirect" {
        let to = query.get("to").cloned().unwrap_or_default();
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, to)],
            axum::Json(json!({ "redirect": true })),
        )
            .into_response();
    }
    match kind.as_str() {
        "fail" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "error": "boom" })),
        ),
        "missing" => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": "no such thing" })),
        ),
        "status" => {
            let status = body["status"]
                .as_u64()
                .and_then(|code| u16::try_from(code).ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
                .unwrap_or(StatusCode::OK);
            (status, axum::Json(json!({ "status": status.as_u16() })))
        }
        _ => (
            StatusCode::OK,
            axum::Json(json!({ "ok": true, "got": body })),
        ),
    }
    .into_response()
}
