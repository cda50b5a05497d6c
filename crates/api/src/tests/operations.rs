//! Operations kept in Postgres: any API node reads and cancels them, one whose node is gone
//! reads as interrupted, and a stopping node interrupts its own. Plus
//! `POST /v1/instances/states`, which `drover start --wait` follows instances with.

use axum::Router;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use drover_core::NodeId;
use drover_store::{NewNode, NewOperation};
use serde_json::{Value, json};

use super::lifecycle::{deploy_all, start};
use super::{TestEnv, assert_error};
use crate::{ApiState, MAX_STATE_IDS, router};

/// Sends `body` (JSON, or none) to `router` as `env`'s admin.
async fn call(
    env: &TestEnv,
    router: &Router,
    method: Method,
    uri: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let (status, bytes) = TestEnv::call_raw_on(
        router,
        Some(&env.token),
        method,
        uri,
        body.map(|_| "application/json"),
        body.map_or_else(Body::empty, |body| Body::from(body.to_string())),
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn register(env: &TestEnv) -> NodeId {
    let node = NodeId::new();
    env.state
        .store
        .register_node(&NewNode::new(node, &["api".to_owned()], "test", "0"))
        .await
        .expect("registers");
    node
}

/// Holds every instance row locked, so an operation's first batch waits until it is dropped.
async fn hold_instances(env: &TestEnv) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = env.pool.begin().await.expect("begins");
    sqlx::query("SELECT id FROM instance FOR UPDATE")
        .execute(&mut *tx)
        .await
        .expect("locks the instances");
    tx
}

/// Reads operation `id` through `router` until it is not running (or a minute passed).
pub(super) async fn ended(env: &TestEnv, router: &Router, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, body) = call(
            env,
            router,
            Method::GET,
            &format!("/v1/operations/{id}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["state"] != "running" {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_second_api_node_reads_and_cancels_an_operation_the_first_runs() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    start(&env, "steps", "default", json!({}), 1000).await;
    let first_node = register(&env).await;
    env.state.operations.set_node(first_node);
    // Another API node over the same database: nothing shared but Postgres (and the bus).
    let second = router(ApiState::new(
        env.state.store.clone(),
        env.state.bus.clone(),
    ));

    let held = hold_instances(&env).await;
    let (status, started) = env
        .post_json(
            "/v1/operations",
            &json!({"command": "pause", "campaign": "default"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_str().expect("an id").to_owned();
    assert_eq!(started["node"], json!(first_node.to_string()), "{started}");
    assert_eq!(started["filter"], json!({"campaign": "default"}));

    let (status, seen) = call(
        &env,
        &second,
        Method::GET,
        &format!("/v1/operations/{id}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the second node knows it: {seen}");
    assert_eq!(
        (&seen["state"], &seen["actor"]),
        (&json!("running"), &json!("ada"))
    );
    let (status, cancelling) = call(
        &env,
        &second,
        Method::POST,
        &format!("/v1/operations/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{cancelling}");
    assert_eq!(cancelling["cancel_requested"], true, "{cancelling}");
    held.rollback().await.expect("releases the instances");

    // The first node's task reads the flag after its first batch and stops there.
    let done = ended(&env, &second, &id).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["progress"]["changed"], 200, "one batch: {done}");
    let (_, first_view) = env.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(first_view["state"], "cancelled", "{first_view}");
    let (_, paused) = env.get("/v1/instances?state=paused&limit=1000").await;
    assert_eq!(paused["instances"].as_array().map(Vec::len), Some(200));
    env.cleanup().await;
}

#[tokio::test]
async fn an_operation_whose_node_is_gone_or_stopped_reads_as_interrupted() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    start(&env, "steps", "default", json!({}), 600).await;

    // Its node died (as the table says): any API node answers `interrupted`, and why.
    let dead = register(&env).await;
    let orphan = uuid::Uuid::now_v7();
    env.state
        .store
        .create_operation(
            &NewOperation {
                id: orphan,
                command: "kill".to_owned(),
                filter: json!({"state": "ready"}),
                actor: "ada".to_owned(),
                progress: json!({"action": "kill", "matched": 200, "changed": 200, "unchanged": 0,
                    "refused": 0, "outcomes": {}, "cascaded": 0, "admitted": 0,
                    "refusals": [], "started": []}),
                owner: Some(dead),
            },
            3_600_000,
        )
        .await
        .expect("records an operation");
    env.state
        .store
        .set_node_status(dead, "dead")
        .await
        .expect("dies");
    let (status, body) = env.get(&format!("/v1/operations/{orphan}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "interrupted", "{body}");
    assert_eq!(body["progress"]["changed"], 200, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains(&dead.to_string()) && m.contains("run the command again")),
        "{body}"
    );

    // A node that stops interrupts its running operations between two batches.
    env.state.operations.set_node(register(&env).await);
    let held = hold_instances(&env).await;
    let (status, started) = env
        .post_json(
            "/v1/operations",
            &json!({"command": "pause", "workflow": "steps"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_str().expect("an id").to_owned();
    let operations = env.state.operations.clone();
    let stopping = operations.stop();
    tokio::pin!(stopping);
    // Polled once: the stop is signalled, and it waits for the task, which waits for the rows.
    assert!(
        tokio::time::timeout(std::time::Duration::ZERO, &mut stopping)
            .await
            .is_err()
    );
    held.rollback().await.expect("releases the instances");
    stopping.await;
    let (_, done) = env.get(&format!("/v1/operations/{id}")).await;
    assert_eq!(done["state"], "interrupted", "{done}");
    // It stopped before its first batch or after it (whether its task had begun it): the
    // counts say which.
    let changed = done["progress"]["changed"].as_u64().unwrap_or(u64::MAX);
    assert!(changed == 0 || changed == 200, "{done}");
    let (_, paused) = env.get("/v1/instances?state=paused&limit=1000").await;
    assert_eq!(
        paused["instances"].as_array().map(|list| list.len() as u64),
        Some(changed)
    );
    assert!(
        done["error"]
            .as_str()
            .is_some_and(|m| m.contains("stopped before it was done")),
        "{done}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_states_of_many_instances_are_counted_in_one_request() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let ids = start(&env, "steps", "default", json!({}), 3).await;
    let (status, body) = env
        .post_json(&format!("/v1/instances/{}/stop", ids[0]), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let unknown = uuid::Uuid::now_v7().to_string();
    let asked = json!({"ids": [ids[0], ids[1], ids[2], ids[1], unknown]});
    let (status, body) = env.post_json("/v1/instances/states", &asked).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["total"], 4, "a repeated id counts once: {body}");
    assert_eq!(body["counts"], json!({"ready": 2, "stopped": 1}), "{body}");
    assert_eq!(body["ended"], 1, "{body}");
    assert_eq!(
        body["ended_instances"],
        json!([{"id": ids[0], "state": "stopped"}]),
        "{body}"
    );
    assert_eq!(
        (&body["unknown"], &body["unknown_ids"]),
        (&json!(1), &json!([unknown]))
    );

    // Bad input: a clear error, nothing read.
    let too_many: Vec<String> = (0..=MAX_STATE_IDS)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let (status, body) = env
        .post_json("/v1/instances/states", &json!({ "ids": too_many }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        assert_error(&body, "invalid_request").contains("at most 10000"),
        "{body}"
    );
    let (status, body) = env
        .post_json("/v1/instances/states", &json!({ "ids": [] }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = env
        .post_json(
            "/v1/instances/states",
            &json!({ "ids": [ids[0], "garbage"] }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        assert_error(&body, "invalid_request").contains("ids[1]"),
        "{body}"
    );
    assert_eq!(body["error"]["details"][0]["field"], "ids[1]", "{body}");
    for garbage in [
        json!({"ids": "nope"}),
        json!({"ids": [1, 2]}),
        json!([]),
        json!({"id": []}),
    ] {
        let (status, body) = env.post_json("/v1/instances/states", &garbage).await;
        assert!(status.is_client_error(), "{garbage}: {status} {body}");
        assert!(body["error"]["code"].is_string(), "{garbage}: {body}");
    }
    let (status, body) = env
        .call(
            Method::POST,
            "/v1/instances/states",
            Some("application/json"),
            "{not json",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    env.cleanup().await;
}
