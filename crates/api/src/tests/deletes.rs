//! Deleting workflows and campaigns and pausing campaigns over HTTP: refusals as 409s naming
//! what is in the way, admin scope, `why` on a paused campaign's queue.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use drover_core::{InstanceState, Scope};
use drover_store::NewToken;
use serde_json::{Value, json};

use super::lifecycle::{campaign, deploy_all, instance, start};
use super::{TestEnv, assert_error};
use crate::Secret;

async fn delete(env: &TestEnv, uri: &str) -> (StatusCode, Value) {
    env.call(Method::DELETE, uri, None, Body::empty()).await
}

async fn post(env: &TestEnv, uri: &str) -> (StatusCode, Value) {
    env.call(Method::POST, uri, None, Body::empty()).await
}

#[tokio::test]
async fn a_paused_campaign_queues_starts_says_so_in_why_and_unpausing_admits_them() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "tight", 2).await;

    let (status, body) = post(&env, "/v1/campaigns/tight/pause").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], true);
    assert_eq!(body["campaign"]["paused_by"], "ada");
    assert!(body["campaign"]["paused_at"].is_string(), "{body}");

    let ids = start(&env, "steps", "tight", json!({}), 3).await;
    for id in &ids {
        assert_eq!(instance(&env, *id).await.state, InstanceState::Queued);
    }
    let (status, why) = env
        .get(&format!("/v1/instances/{}/diagnosis", ids[0]))
        .await;
    assert_eq!(status, StatusCode::OK, "{why}");
    assert_eq!(why["cause"], "campaign_paused", "{why}");
    let summary = why["summary"].as_str().unwrap_or_default();
    for part in [
        "position 1 of 3",
        "\"tight\" is paused",
        "by ada",
        "drover campaign unpause tight",
    ] {
        assert!(summary.contains(part), "{part:?} in {summary}");
    }

    let (status, shown) = env.get("/v1/campaigns/tight").await;
    assert_eq!(status, StatusCode::OK);
    assert!(shown["paused_at"].is_string(), "{shown}");

    let (status, body) = post(&env, "/v1/campaigns/tight/unpause").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"], true);
    assert_eq!(
        body["admitted"],
        json!([ids[0].to_string(), ids[1].to_string()]),
        "FIFO up to the limit"
    );
    assert!(body["campaign"].get("paused_at").is_none(), "{body}");
    assert_eq!(instance(&env, ids[2]).await.state, InstanceState::Queued);

    let (status, body) = post(&env, "/v1/campaigns/default/pause").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(assert_error(&body, "unlimited_campaign").contains("no limit"));
    let (status, body) = post(&env, "/v1/campaigns/nope/pause").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Changing a campaign is the admin's.
    let operator = Secret::generate().expect("randomness");
    env.state
        .store
        .create_token(&NewToken {
            name: "otto".to_owned(),
            scope: Scope::Operator,
            hash: operator.hash(),
            expires_at: None,
            actor: "test".to_owned(),
        })
        .await
        .expect("creates a token");
    for (method, uri) in [
        (Method::POST, "/v1/campaigns/tight/pause"),
        (Method::POST, "/v1/campaigns/tight/unpause"),
        (Method::DELETE, "/v1/campaigns/tight"),
        (Method::DELETE, "/v1/workflows/steps"),
    ] {
        let (status, body) = env
            .call_as(
                Some(operator.expose()),
                method.clone(),
                uri,
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri}: {body}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn deletes_are_refused_while_in_use_naming_what_uses_them() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "spring", 5).await;
    let ids = start(&env, "steps", "spring", json!({}), 2).await;

    let (status, body) = delete(&env, "/v1/campaigns/spring").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(assert_error(&body, "campaign_in_use").contains("2 instances live"));
    let (status, body) = delete(&env, "/v1/campaigns/default").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_error(&body, "default_campaign");

    let (status, body) = delete(&env, "/v1/workflows/steps").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = assert_error(&body, "workflow_in_use");
    assert!(
        message.contains("2 live instances") && message.contains("--stop-instances"),
        "{message}"
    );
    assert!(
        ids.iter().any(|id| message.contains(&id.to_string())),
        "names an instance: {message}"
    );

    let (status, body) = delete(&env, "/v1/workflows/steps?stop_instances=true").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["versions"], json!([1]));
    assert_eq!(body["stopped"].as_array().map(Vec::len), Some(2), "{body}");
    for id in &ids {
        assert_eq!(instance(&env, *id).await.state, InstanceState::Stopped);
    }

    // Gone from the listing and from starts; kept for its instances.
    let (status, body) = env.get("/v1/workflows/steps").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = env.get("/v1/workflows/steps?version=1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["deleted_at"].is_string(), "{body}");
    let (status, body) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "steps", "version": 1, "campaign": "spring"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(assert_error(&body, "unknown_workflow").contains("deleted"));
    let (status, body) = env.get(&format!("/v1/instances/{}", ids[0])).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Now empty, the campaign goes.
    let (status, body) = delete(&env, "/v1/campaigns/spring").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["deleted"], "spring");
    let (status, _) = env.get("/v1/campaigns/spring").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = delete(&env, "/v1/workflows/nope?version=3").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error(&body, "unknown_workflow");

    let (count,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit
         WHERE action IN ('workflow.delete', 'campaign.delete', 'kill') AND actor = 'ada'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("reads the audit");
    assert_eq!(count, 4, "a delete each and two kills");
    env.cleanup().await;
}
