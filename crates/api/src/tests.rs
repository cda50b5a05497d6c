//! Router tests, driven with `oneshot` (no socket) against real Postgres and real NATS. Each
//! test gets its own database and subject prefix, so they run in parallel.
//!
//! Set `DATABASE_URL` (a server the tests may create databases on) and `NATS_URL` (a
//! nats-server with JetStream), e.g.
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres NATS_URL=nats://127.0.0.1:14222`.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use drover_bus::{Bus, BusConfig};
use drover_store::Store;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use uuid::Uuid;

use crate::{ApiClient, ApiState, ClientError, ListQuery, MAX_BODY_BYTES, StartRequest, router};

mod auth;
mod campaigns;
mod console;
mod contract;
mod deletes;
mod diagnosis;
mod input;
mod lifecycle;
mod operations;
mod operator;
mod retention;
mod signal;

/// A fresh database and subject prefix, with the router over them. Requests carry the admin
/// token named `ada` unless a test says otherwise.
struct TestEnv {
    state: ApiState,
    /// The admin token `ada`.
    token: String,
    router: Router,
    pool: PgPool,
    admin: PgConnectOptions,
    database: String,
}

impl TestEnv {
    async fn new() -> Self {
        let database_url = std::env::var("DATABASE_URL").expect(
            "set DATABASE_URL to a Postgres server the tests may create databases on, \
             e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres",
        );
        let nats_url = std::env::var("NATS_URL").expect(
            "set NATS_URL to a nats-server with JetStream, e.g. NATS_URL=nats://127.0.0.1:14222",
        );
        let tag = Uuid::now_v7().simple().to_string();
        let database = format!("drover_api_{tag}");

        let admin: PgConnectOptions = database_url
            .parse()
            .expect("DATABASE_URL is a postgres:// URL");
        let mut conn = admin.connect().await.expect("DATABASE_URL is reachable");
        sqlx::raw_sql(&format!("CREATE DATABASE {database}"))
            .execute(&mut conn)
            .await
            .expect("the DATABASE_URL user may create databases");
        drop(conn);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect_with(admin.clone().database(&database))
            .await
            .expect("the fresh test database is reachable");
        drover_store::MIGRATOR
            .run(&pool)
            .await
            .expect("migrations apply to a fresh database");

        let bus = Bus::connect(BusConfig {
            url: nats_url,
            prefix: format!("t{tag}"),
            // NATS reserves the stream's max bytes: keep it small so many tests fit.
            events_max_bytes: 16 << 20,
            ..Default::default()
        })
        .await
        .expect("NATS_URL is reachable and has JetStream");
        let state = ApiState::new(Store::from_pool(pool.clone()), bus);
        let token = crate::Secret::generate().expect("randomness");
        state
            .store
            .create_token(&drover_store::NewToken {
                name: "ada".to_owned(),
                scope: drover_core::Scope::Admin,
                hash: token.hash(),
                expires_at: None,
                actor: "test".to_owned(),
            })
            .await
            .expect("creates the test's admin token");
        // The tests count audit rows of what they do, not of this setup.
        sqlx::query("DELETE FROM audit")
            .execute(&pool)
            .await
            .expect("clears the setup's audit row");
        Self {
            router: router(state.clone()),
            token: token.expose().to_owned(),
            state,
            pool,
            admin,
            database,
        }
    }

    /// Sends a request; answers the status and the body as JSON (a non-JSON body is a
    /// JSON string, which the tests reject where they expect an object).
    async fn call(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        self.call_as(Some(&self.token.clone()), method, uri, content_type, body)
            .await
    }

    /// As [`TestEnv::call`], with `token` (or none) instead of `ada`'s.
    async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        let (status, bytes) = self
            .call_raw_as(token, method, uri, content_type, body)
            .await;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    /// Sends a request as `ada`; answers the status and the body's bytes.
    async fn call_raw(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, axum::body::Bytes) {
        self.call_raw_as(Some(&self.token.clone()), method, uri, content_type, body)
            .await
    }

    async fn call_raw_as(
        &self,
        token: Option<&str>,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, axum::body::Bytes) {
        Self::call_raw_on(&self.router, token, method, uri, content_type, body).await
    }

    /// Sends a request to `router` (another API node over the same database, say).
    async fn call_raw_on(
        router: &Router,
        token: Option<&str>,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> (StatusCode, axum::body::Bytes) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request
            .body(body.into())
            .expect("test requests are well-formed");
        let response = router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("response bodies are readable");
        (status, bytes)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Method::GET, uri, None, Body::empty()).await
    }

    async fn post_json(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            uri,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    async fn deploy(&self, source: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/workflows",
            Some("application/yaml"),
            source.to_owned(),
        )
        .await
    }

    /// Messages on this test's jobs stream.
    async fn queued_jobs(&self) -> u64 {
        let stream = self
            .state
            .bus
            .jetstream()
            .get_stream(self.state.bus.subjects().jobs_stream())
            .await
            .expect("the jobs stream was provisioned");
        stream.cached_info().state.messages
    }

    /// Drops the database and the streams; failures are ignored.
    async fn cleanup(self) {
        self.pool.close().await;
        if let Ok(mut conn) = self.admin.connect().await {
            let _ = sqlx::raw_sql(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&mut conn)
            .await;
        }
        let subjects = self.state.bus.subjects();
        for stream in [subjects.jobs_stream(), subjects.events_stream()] {
            let _ = self.state.bus.jetstream().delete_stream(stream).await;
        }
    }
}

/// Asserts the JSON error shape and answers the message.
#[track_caller]
fn assert_error(body: &Value, code: &str) -> String {
    assert_eq!(body["error"]["code"], json!(code), "error body: {body}");
    let message = body["error"]["message"]
        .as_str()
        .expect("error messages are strings");
    assert!(!message.is_empty(), "error body: {body}");
    message.to_owned()
}

const GREETING: &str = r#"
name: greeting
description: Says hello
vars:
  n: 0
  who: world
steps:
  - id: count
    kind: assign
    set:
      n: "vars.n + 1"
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#;

async fn deployed(env: &TestEnv) {
    let (status, body) = env.deploy(GREETING).await;
    assert!(status.is_success(), "deploy failed: {status} {body}");
}

#[tokio::test]
async fn deploying_creates_v1_then_the_same_again_is_a_no_op_and_a_change_creates_v2() {
    let env = TestEnv::new().await;

    let (status, body) = env.deploy(GREETING).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body,
        json!({"name": "greeting", "version": 1, "created": true})
    );

    // JSON with any content type is accepted too; the same content is a no-op.
    let (status, body) = env.deploy(GREETING).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"name": "greeting", "version": 1, "created": false})
    );

    let changed = GREETING.replace("Says hello", "Says hello twice");
    let (status, body) = env
        .call(Method::POST, "/v1/workflows", None, changed.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body,
        json!({"name": "greeting", "version": 2, "created": true})
    );

    let (status, body) = env.get("/v1/workflows").await;
    assert_eq!(status, StatusCode::OK);
    let workflows = body["workflows"].as_array().expect("workflows is an array");
    assert_eq!(workflows.len(), 1, "{body}");
    assert_eq!(workflows[0]["name"], "greeting");
    assert_eq!(workflows[0]["version"], 2);
    assert_eq!(workflows[0]["description"], "Says hello twice");
    assert_eq!(workflows[0]["steps"], 2);
    assert!(workflows[0]["created_at"].is_string());

    let (status, body) = env.get("/v1/workflows/greeting").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], 2);
    assert_eq!(body["source"], json!(changed));
    assert_eq!(body["definition"]["steps"][0]["id"], "count");

    let (status, body) = env.get("/v1/workflows/greeting?version=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version"], 1);
    assert_eq!(body["source"], json!(GREETING));
    assert_eq!(body["definition"]["description"], "Says hello");

    env.cleanup().await;
}

#[tokio::test]
async fn an_invalid_definition_is_422_with_details_naming_step_and_field() {
    let env = TestEnv::new().await;
    let source = GREETING
        .replace("to: done", "to: nowhere")
        .replace("kind: end", "kind: teleport");
    let (status, body) = env.deploy(&source).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = assert_error(&body, "invalid_definition");
    let details = body["error"]["details"]
        .as_array()
        .expect("details is an array");
    assert!(details.len() >= 2, "every problem is reported: {body}");
    assert_eq!(
        message.lines().count(),
        details.len(),
        "one line per problem: {message}"
    );
    assert!(
        details
            .iter()
            .any(|d| d["step"] == "count" && d["field"].as_str().is_some_and(|f| f.ends_with("to"))),
        "the unknown target names step and field: {body}"
    );
    assert!(
        details
            .iter()
            .any(|d| d["step"] == "done" && d["field"] == "kind"),
        "the unknown kind names step and field: {body}"
    );
    for detail in details {
        assert!(detail["message"].is_string(), "{detail}");
    }

    let (status, body) = env.deploy("steps: [unclosed").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_error(&body, "invalid_definition");

    let (status, body) = env
        .call(Method::POST, "/v1/workflows", None, vec![0xff, 0xfe, 0x00])
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "source", "{body}");

    let (status, body) = env.get("/v1/workflows").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"workflows": []}), "nothing was stored");
    env.cleanup().await;
}

#[tokio::test]
async fn a_definition_publishing_into_the_clusters_own_subjects_is_rejected() {
    let env = TestEnv::new().await;
    let prefix = env.state.bus.subjects().prefix().to_owned();
    let source = format!(
        r#"
name: sneaky
steps:
  - id: shout
    kind: publish
    subject: "{prefix}.job.step"
    payload: {{}}
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#
    );
    let (status, body) = env.deploy(&source).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_error(&body, "invalid_definition");
    assert_eq!(body["error"]["details"][0]["step"], "shout", "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "subject", "{body}");
    env.cleanup().await;
}

fn calling(workflow: &str, version: Option<i32>) -> String {
    let version = version.map_or(String::new(), |v| format!("\n    version: {v}"));
    format!(
        "name: caller\nsteps:\n  - id: call\n    kind: subworkflow\n    workflow: {workflow}{version}\n    \
         next:\n      - to: done\n  - id: done\n    kind: end\n    status: completed\n"
    )
}

#[tokio::test]
async fn a_subworkflow_naming_no_deployed_workflow_is_rejected_naming_step_and_field() {
    let env = TestEnv::new().await;
    let (status, body) = env.deploy(&calling("greeting", None)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_error(&body, "invalid_definition");
    assert_eq!(body["error"]["details"][0]["step"], "call", "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "workflow", "{body}");
    let message = body["error"]["details"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("\"greeting\""), "{body}");

    deployed(&env).await;
    let (status, body) = env.deploy(&calling("greeting", Some(2))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["step"], "call", "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "version", "{body}");

    for source in [calling("greeting", None), calling("greeting", Some(1))] {
        let (status, body) = env.deploy(&source).await;
        assert!(status.is_success(), "{status} {body}");
    }
    // A workflow may call itself: the call depth bounds the recursion.
    let (status, body) = env.deploy(&calling("caller", None)).await;
    assert!(status.is_success(), "{status} {body}");

    let (_, body) = env.get("/v1/workflows").await;
    let versions: Vec<(&str, i64)> = body["workflows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| Some((w["name"].as_str()?, w["version"].as_i64()?)))
        .collect();
    assert_eq!(versions, [("caller", 3), ("greeting", 1)], "{body}");
    env.cleanup().await;
}

#[tokio::test]
async fn cel_naming_undeclared_variables_and_endless_loops_are_rejected_at_deploy() {
    let env = TestEnv::new().await;
    let source = GREETING.replace("\"vars.n + 1\"", "\"var_n + 1\"");
    let (status, body) = env.deploy(&source).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_error(&body, "invalid_definition");
    assert_eq!(body["error"]["details"][0]["step"], "count", "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "set.n", "{body}");

    let source = GREETING.replace("to: done", "to: count");
    let (status, body) = env.deploy(&source).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let details = body["error"]["details"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        details
            .iter()
            .any(|d| d["step"] == "count" && d["field"] == "next"),
        "{body}"
    );
    env.cleanup().await;
}

fn publishing(subject: &str) -> String {
    format!(
        r#"
name: announcer
steps:
  - id: shout
    kind: publish
    subject: "{subject}"
    payload: {{}}
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#
    )
}

#[tokio::test]
async fn deploys_refuse_nats_system_subjects_and_subjects_outside_the_publish_allow_list() {
    let mut env = TestEnv::new().await;
    let allow = "orders.>,crm.*".parse().expect("a valid allow-list");
    env.router = router(env.state.clone().with_publish_allow(Some(allow)));
    let jobs = env.state.bus.subjects().jobs_stream();
    for (subject, needle) in [
        (format!("$JS.API.STREAM.DELETE.{jobs}"), "NATS system space"),
        ("_INBOX.abc".to_owned(), "NATS reply space"),
        (
            "crm.lead.new".to_owned(),
            "publish allow-list (orders.>,crm.*)",
        ),
    ] {
        let (status, body) = env.deploy(&publishing(&subject)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{subject}: {body}"
        );
        let detail = &body["error"]["details"][0];
        assert_eq!(detail["step"], "shout", "{body}");
        assert_eq!(detail["field"], "subject", "{body}");
        let message = detail["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{subject}: {body}");
    }
    let (status, body) = env.deploy(&publishing("orders.new.eu")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    env.cleanup().await;
}

#[tokio::test]
async fn started_instances_are_ready_at_step_zero_with_a_journal_entry_and_a_job_each() {
    let env = TestEnv::new().await;
    deployed(&env).await;

    let request =
        json!({"workflow": "greeting", "vars": {"who": "drover", "extra": true}, "count": 3});
    let (status, body) = env.post_json("/v1/instances", &request).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["workflow"], "greeting");
    assert_eq!(body["version"], 1);
    assert_eq!(body["campaign"], "default");
    let ids: Vec<String> = body["ids"]
        .as_array()
        .expect("ids is an array")
        .iter()
        .map(|id| id.as_str().expect("ids are strings").to_owned())
        .collect();
    assert_eq!(ids.len(), 3);

    let (status, body) = env.get("/v1/instances?workflow=greeting&state=ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed: Vec<&str> = body["instances"]
        .as_array()
        .expect("instances is an array")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    let mut newest_first: Vec<&str> = ids.iter().map(String::as_str).collect();
    newest_first.reverse();
    assert_eq!(listed, newest_first, "listed newest first");

    for id in &ids {
        let (status, instance) = env.get(&format!("/v1/instances/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{instance}");
        let keys: Vec<&str> = instance
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "workflow",
                "version",
                "campaign",
                "state",
                "current_step",
                "step_seq",
                "step_attempt",
                "vars",
                "error",
                "parent_instance_id",
                "call_depth",
                "owner_node",
                "created_at",
                "updated_at",
                "finished_at",
                "holds_permit"
            ]
        );
        assert_eq!(instance["id"], json!(id));
        assert_eq!(instance["state"], "ready");
        assert_eq!(instance["step_seq"], 0);
        assert_eq!(instance["current_step"], "count");
        assert_eq!(instance["campaign"], "default");
        assert_eq!(
            instance["vars"],
            json!({"n": 0, "who": "drover", "extra": true}),
            "request vars override key by key"
        );

        let (status, journal) = env.get(&format!("/v1/instances/{id}/journal")).await;
        assert_eq!(status, StatusCode::OK, "{journal}");
        assert_eq!(journal["instance"], json!(id));
        let entries = journal["entries"].as_array().expect("entries is an array");
        assert_eq!(entries.len(), 1, "{journal}");
        assert_eq!(entries[0]["step_seq"], 0);
        assert_eq!(entries[0]["outcome"], "started");
        assert_eq!(entries[0]["step_id"], "count");
        assert_eq!(entries[0]["actor"], "ada", "the token's name");
    }

    assert_eq!(env.queued_jobs().await, 3, "one job per instance");

    let (status, stats) = env.get("/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    let counts = stats["instances"].as_object().expect("counts is an object");
    assert_eq!(
        counts.len(),
        drover_core::InstanceState::ALL.len(),
        "every state: {stats}"
    );
    assert_eq!(counts.keys().next().map(String::as_str), Some("queued"));
    assert_eq!(stats["instances"]["ready"], 3);
    assert_eq!(stats["instances"]["running"], 0);

    let (status, campaigns) = env.get("/v1/campaigns").await;
    assert_eq!(status, StatusCode::OK);
    let default = &campaigns["campaigns"][0];
    assert_eq!(default["name"], "default", "{campaigns}");
    for key in ["max_running", "running", "queued", "on_error_permit"] {
        assert!(
            default.get(key).is_some(),
            "campaign has {key}: {campaigns}"
        );
    }

    let (status, nodes) = env.get("/v1/nodes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(nodes, json!({"nodes": []}));
    env.cleanup().await;
}

#[tokio::test]
async fn a_start_larger_than_one_chunk_creates_and_dispatches_every_instance() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    let count = crate::START_CHUNK + 1;
    let (status, body) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "greeting", "count": count}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(count));
    assert_eq!(env.queued_jobs().await, count as u64);
    let (_, stats) = env.get("/v1/stats").await;
    assert_eq!(stats["instances"]["ready"], count);

    // Paging: `before` the last id of a page gives the next page.
    let (status, page) = env.get("/v1/instances?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    let page = page["instances"]
        .as_array()
        .expect("instances is an array")
        .clone();
    assert_eq!(page.len(), 2);
    let last = page[1]["id"].as_str().expect("ids are strings");
    let (_, next) = env
        .get(&format!("/v1/instances?limit=2&before={last}"))
        .await;
    let next = next["instances"].as_array().expect("instances is an array");
    assert_eq!(next.len(), 2);
    assert!(
        next.iter().all(|i| i["id"].as_str() < Some(last)),
        "older than the page"
    );

    let (_, capped) = env.get("/v1/instances?limit=5000").await;
    assert_eq!(
        capped["instances"].as_array().map(Vec::len),
        Some(1000),
        "limit is capped at 1000"
    );
    let next = capped["next"]
        .as_str()
        .expect("1001 instances: a next page");
    let (_, rest) = env
        .get(&format!("/v1/instances?limit=1000&before={next}"))
        .await;
    assert_eq!(
        rest["instances"].as_array().map(Vec::len),
        Some(1),
        "{rest}"
    );
    assert!(
        rest.get("next").is_none(),
        "the last page has no next: {rest}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn unknown_workflows_versions_campaigns_and_instances_are_404_json() {
    let env = TestEnv::new().await;
    deployed(&env).await;

    let (status, body) = env.get("/v1/workflows/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "not_found").contains("nope"));
    let (status, body) = env.get("/v1/workflows/greeting?version=7").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "not_found").contains('7'));

    let (status, body) = env
        .post_json("/v1/instances", &json!({"workflow": "nope"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "unknown_workflow").contains("nope"));
    let (status, body) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "greeting", "version": 9}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, "unknown_workflow");
    let (status, body) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "greeting", "campaign": "spring"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "unknown_campaign").contains("spring"));

    let id = drover_core::InstanceId::new().to_string();
    let (status, body) = env.get(&format!("/v1/instances/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        assert_error(&body, "not_found").contains(&id),
        "names the id: {body}"
    );
    let (status, body) = env.get(&format!("/v1/instances/{id}/journal")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "not_found").contains(&id));

    assert_eq!(env.queued_jobs().await, 0, "nothing was started");
    env.cleanup().await;
}

#[tokio::test]
async fn malformed_ids_and_query_parameters_are_400_json() {
    let env = TestEnv::new().await;
    for uri in [
        "/v1/instances/not-a-uuid",
        "/v1/instances/123/journal",
        "/v1/instances?before=zzz",
    ] {
        let (status, body) = env.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_error(&body, "invalid_id");
    }

    let (status, body) = env.get("/v1/instances?state=RUNNING").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = assert_error(&body, "invalid_query");
    for state in drover_core::InstanceState::ALL {
        assert!(
            message.contains(state.as_str()),
            "lists the valid states: {message}"
        );
    }
    for uri in [
        "/v1/instances?limit=abc",
        "/v1/instances?limit=0",
        "/v1/workflows/greeting?version=x",
    ] {
        let (status, body) = env.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_error(&body, "invalid_query");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn malformed_json_bodies_are_400_invalid_json() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    let cases: [(Option<&str>, &str); 4] = [
        (Some("application/json"), "{\"workflow\": "),
        (Some("application/json"), "{}"),
        (
            Some("application/json"),
            "{\"workflow\": \"greeting\", \"count\": \"two\"}",
        ),
        (
            Some("application/json"),
            "{\"workflow\": \"greeting\", \"typo\": 1}",
        ),
    ];
    for (content_type, body) in cases {
        let (status, answer) = env
            .call(Method::POST, "/v1/instances", content_type, body.to_owned())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_error(&answer, "invalid_json");
    }
    assert_eq!(env.queued_jobs().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn an_oversized_body_is_413_json() {
    let env = TestEnv::new().await;
    let huge = format!("description: \"{}\"", "x".repeat(MAX_BODY_BYTES + 1));
    let (status, body) = env.deploy(&huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_error(&body, "payload_too_large");

    let huge = json!({"workflow": "greeting", "vars": {"blob": "x".repeat(MAX_BODY_BYTES + 1)}});
    let (status, body) = env.post_json("/v1/instances", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_error(&body, "payload_too_large");
    env.cleanup().await;
}

#[tokio::test]
async fn a_count_of_0_or_10001_and_non_object_vars_are_422() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    for request in [
        json!({"workflow": "greeting", "count": 0}),
        json!({"workflow": "greeting", "count": 10_001}),
        json!({"workflow": "greeting", "vars": [1, 2]}),
        json!({"workflow": "greeting", "vars": "who=me"}),
    ] {
        let (status, body) = env.post_json("/v1/instances", &request).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{request}: {body}"
        );
        assert_error(&body, "invalid_request");
    }
    assert_eq!(env.queued_jobs().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn openapi_json_is_a_document_with_every_path() {
    let env = TestEnv::new().await;
    let (status, doc) = env.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    let paths = doc["paths"].as_object().expect("paths is an object");
    for (path, method) in [
        ("/v1/workflows", "post"),
        ("/v1/workflows", "get"),
        ("/v1/workflows/{name}", "get"),
        ("/v1/instances", "post"),
        ("/v1/instances", "get"),
        ("/v1/instances/{id}", "get"),
        ("/v1/instances/{id}/journal", "get"),
        ("/v1/campaigns", "get"),
        ("/v1/campaigns/{name}", "delete"),
        ("/v1/campaigns/{name}/pause", "post"),
        ("/v1/campaigns/{name}/unpause", "post"),
        ("/v1/workflows/{name}", "delete"),
        ("/v1/nodes", "get"),
        ("/v1/stats", "get"),
        ("/v1/openapi.json", "get"),
        ("/healthz", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is described"
        );
    }
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("schemas is an object");
    for schema in [
        "ErrorBody",
        "StartRequest",
        "Started",
        "Instance",
        "InstanceState",
        "JournalEntry",
        "Workflow",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema} is described");
    }
    // What the document promises, the behaviour keeps (crates/api/src/tests/input.rs).
    let start = &paths["/v1/instances"]["post"]["responses"];
    for status in ["201", "400", "404", "413", "415", "422", "500", "503"] {
        assert!(
            start.get(status).is_some(),
            "POST /v1/instances documents {status}"
        );
    }
    let list = &paths["/v1/instances"]["get"];
    assert!(list["responses"].get("400").is_some());
    let params = list["parameters"].as_array().expect("parameters");
    let param = |name: &str| {
        params
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("parameter {name}: {list}"))
    };
    assert_eq!(
        param("campaign")["schema"]["pattern"],
        "^[a-z0-9][a-z0-9_-]{0,62}$"
    );
    assert_eq!(
        param("include")["schema"]["$ref"],
        "#/components/schemas/ListInclude"
    );
    assert_eq!(
        param("state")["schema"]["$ref"],
        "#/components/schemas/InstanceState"
    );
    let name = &paths["/v1/workflows/{name}"]["get"]["parameters"][0];
    assert_eq!(
        name["schema"]["pattern"], "^[a-z0-9][a-z0-9_-]{0,62}$",
        "{name}"
    );
    assert!(
        !schemas["InstanceSummary"]["required"]
            .as_array()
            .expect("required")
            .contains(&json!("vars")),
        "listings carry vars only when asked"
    );
    assert_eq!(
        schemas["StartRequest"]["properties"]["vars"]["additionalProperties"]["$ref"],
        "#/components/schemas/StorableJson"
    );
    // Every $ref resolves.
    let text = doc.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap_or_default();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }

    let (status, body) = env.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!("ok"));
    env.cleanup().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_errors() {
    let env = TestEnv::new().await;
    let (status, body) = env.get("/v1/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "not_found").contains("/v1/nope"));
    let (status, body) = env
        .call(Method::DELETE, "/v1/workflows", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&body, "method_not_allowed");
    env.cleanup().await;
}

#[tokio::test]
async fn the_client_speaks_to_a_served_api_and_reports_errors_with_code_and_status() {
    let env = TestEnv::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(crate::serve(listener, env.state.clone(), shutdown.clone()));
    let client = ApiClient::new(&format!("http://{addr}/"))
        .expect("a valid URL")
        .with_token(crate::Secret::new(env.token.clone()));

    let deployed = client.deploy(GREETING.to_owned()).await.expect("deploys");
    assert_eq!(
        deployed,
        json!({"name": "greeting", "version": 1, "created": true})
    );
    let started = client
        .start(
            &StartRequest {
                workflow: "greeting".into(),
                count: Some(2),
                ..Default::default()
            },
            None,
        )
        .await
        .expect("starts");
    let id = started["ids"][0].as_str().expect("an id").to_owned();
    assert_eq!(client.instance(&id).await.expect("shows")["state"], "ready");
    assert_eq!(
        client.journal(&id).await.expect("journal")["entries"][0]["outcome"],
        "started"
    );
    let listed = client
        .instances(&ListQuery {
            workflow: Some("greeting".into()),
            limit: Some(1),
            ..Default::default()
        })
        .await
        .expect("lists");
    assert_eq!(listed["instances"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        client.workflow("greeting", Some(1)).await.expect("shows")["version"],
        1
    );
    assert!(client.workflows().await.expect("lists")["workflows"].is_array());
    assert!(client.campaigns().await.expect("lists")["campaigns"].is_array());
    assert!(client.nodes().await.expect("lists")["nodes"].is_array());

    let err = client.instance("nope").await.expect_err("a malformed id");
    assert_eq!(err.status(), Some(400));
    assert_eq!(err.code(), Some("invalid_id"));
    assert!(err.to_string().ends_with("(invalid_id, HTTP 400)"), "{err}");
    let err = client
        .workflow("a/b c", None)
        .await
        .expect_err("not a slug");
    assert_eq!(err.code(), Some("invalid_path"), "{err}");
    assert!(
        err.to_string().contains("a/b c"),
        "the name is encoded as one segment: {err}"
    );
    let err = client.deploy("name: x".into()).await.expect_err("invalid");
    assert!(
        matches!(
            &err,
            ClientError::Api {
                status: 422,
                details: Some(_),
                ..
            }
        ),
        "{err}"
    );

    shutdown.cancel();
    server
        .await
        .expect("the server task does not panic")
        .expect("the server stops cleanly");

    let err = client.nodes().await.expect_err("the server is gone");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&addr.to_string()) && message.contains("DROVER_API_URL"),
        "{message}"
    );
    assert!(matches!(
        ApiClient::new("localhost:8080"),
        Err(ClientError::InvalidUrl { .. })
    ));
    env.cleanup().await;
}

#[tokio::test]
async fn a_request_to_a_server_that_never_answers_times_out_naming_the_flag() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds a free port");
    let addr = listener.local_addr().expect("a local address");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let client = ApiClient::with_timeout(
        &format!("http://{addr}"),
        std::time::Duration::from_millis(300),
    )
    .expect("a valid URL");
    let err = client.nodes().await.expect_err("no answer");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("300ms") && message.contains("DROVER_TIMEOUT"),
        "{message}"
    );
    assert_eq!(err.to_json()["error"]["code"], "timeout");
    held.abort();
}
