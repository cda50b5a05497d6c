//! Campaign retention over HTTP: set, cleared, shown, refused when invalid; audited.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{TestEnv, assert_error};

async fn put_json(env: &TestEnv, uri: &str, body: &Value) -> (StatusCode, Value) {
    env.call(
        Method::PUT,
        uri,
        Some("application/json"),
        Body::from(body.to_string()),
    )
    .await
}

#[tokio::test]
async fn a_campaigns_retention_is_set_cleared_and_refused_when_invalid() {
    let env = TestEnv::new().await;
    let (status, body) = env.get("/v1/campaigns/default/retention").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["retention"], Value::Null);

    let uri = "/v1/campaigns/default/retention";
    let (status, body) = put_json(&env, uri, &json!({"retention": "30d"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["retention_ms"], 30 * 86_400_000_i64);
    let (_, body) = env.get(uri).await;
    assert_eq!(body["retention"], "30days");

    let (status, body) = put_json(&env, uri, &json!({"retention": null})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["retention"], Value::Null);

    for bad in [
        json!({"retention": "soon"}),
        json!({"retention": "20years"}),
    ] {
        let (status, body) = put_json(&env, uri, &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let (status, body) = put_json(
        &env,
        "/v1/campaigns/nope/retention",
        &json!({"retention": "1d"}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error(&body, "unknown_campaign");

    let (audits,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit WHERE action = 'campaign.set_retention' AND target = 'default'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("audit");
    assert_eq!(audits, 2);
    assert_eq!(
        crate::auth::required_scope(&Method::PUT, "/v1/campaigns/{name}/retention"),
        drover_core::Scope::Admin
    );
}
