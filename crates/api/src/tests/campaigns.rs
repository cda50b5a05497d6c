//! Campaigns over HTTP: create, show, list, set-limit, and what a limit does to starts.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{GREETING, TestEnv, assert_error, deployed};

async fn put_json(env: &TestEnv, uri: &str, body: &Value) -> (StatusCode, Value) {
    env.call(
        Method::PUT,
        uri,
        Some("application/json"),
        Body::from(body.to_string()),
    )
    .await
}

async fn create(env: &TestEnv, body: Value) -> (StatusCode, Value) {
    env.post_json("/v1/campaigns", &body).await
}

#[tokio::test]
async fn a_campaign_is_created_shown_listed_and_refused_when_invalid_or_taken() {
    let env = TestEnv::new().await;
    let (status, body) = create(
        &env,
        json!({"name": "spring", "max_running": 3, "on_error_permit": "hold"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "spring");
    assert_eq!(body["max_running"], 3);
    assert_eq!(body["on_error_permit"], "hold");
    assert_eq!(
        (body["running"].clone(), body["queued"].clone()),
        (json!(0), json!(0))
    );

    let (status, body) = create(&env, json!({"name": "spring", "max_running": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(assert_error(&body, "campaign_exists").contains("spring"));

    for (bad, why) in [
        (json!({"name": "Spring!", "max_running": 3}), "slug"),
        (json!({"name": "big", "max_running": 100_001}), "100000"),
        (json!({"name": "zero", "max_running": 0}), "between"),
        (
            json!({"name": "odd", "on_error_permit": "keep"}),
            "release or hold",
        ),
    ] {
        let (status, body) = create(&env, bad.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert!(
            assert_error(&body, "invalid_request").contains(why),
            "{body}"
        );
    }

    let (status, body) = env.get("/v1/campaigns/spring").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["max_running"], 3);
    let (status, body) = env.get("/v1/campaigns/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(assert_error(&body, "unknown_campaign").contains("nope"));

    let (status, body) = env.get("/v1/campaigns").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let names: Vec<&str> = body["campaigns"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["default", "spring"]);
    env.cleanup().await;
}

#[tokio::test]
async fn starts_beyond_the_limit_queue_with_their_position_and_a_raised_limit_admits_them() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    let (status, body) = create(&env, json!({"name": "spring", "max_running": 2})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, started) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "greeting", "campaign": "spring", "count": 5}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    assert_eq!(started["queued"], 3);
    assert_eq!(
        env.queued_jobs().await,
        2,
        "only the admitted instances are dispatched"
    );
    let ids: Vec<String> = started["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect();
    let (_, fourth) = env.get(&format!("/v1/instances/{}", ids[3])).await;
    assert_eq!(fourth["state"], "queued");
    assert_eq!(fourth["queue_position"], 2);
    assert_eq!(fourth["holds_permit"], false);
    let (_, first) = env.get(&format!("/v1/instances/{}", ids[0])).await;
    assert_eq!(first["holds_permit"], true);
    assert!(first.get("queue_position").is_none(), "{first}");

    let (status, body) = env.get("/v1/campaigns/spring").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["running"].clone(), body["queued"].clone()),
        (json!(2), json!(3))
    );
    assert!(body["oldest_queued_age_ms"].as_i64().is_some(), "{body}");

    let (status, body) = put_json(
        &env,
        "/v1/campaigns/spring/limit",
        &json!({"max_running": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["previous"], 2);
    assert_eq!(body["admitted"], json!([ids[2], ids[3]]), "FIFO");
    assert_eq!(body["campaign"]["running"], 4);
    assert_eq!(
        env.queued_jobs().await,
        4,
        "the admitted are dispatched at once"
    );
    let (_, fifth) = env.get(&format!("/v1/instances/{}", ids[4])).await;
    assert_eq!(fifth["queue_position"], 1);

    let (status, body) = put_json(
        &env,
        "/v1/campaigns/spring/limit",
        &json!({"max_running": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) =
        put_json(&env, "/v1/campaigns/nope/limit", &json!({"max_running": 3})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error(&body, "unknown_campaign");
    let (status, body) = put_json(
        &env,
        "/v1/campaigns/default/limit",
        &json!({"max_running": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_error(&body, "unlimited_campaign");

    let (queued_events,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM event_fact WHERE campaign = 'spring' AND kind = 'queued'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("counts");
    assert_eq!(queued_events, 3);
    let (admitted_events,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM event_fact
         WHERE campaign = 'spring' AND workflow = 'greeting' AND kind = 'admitted'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("counts");
    assert_eq!(admitted_events, 2);
    let _ = GREETING;
    env.cleanup().await;
}

#[tokio::test]
async fn the_client_speaks_the_campaign_routes() {
    let env = TestEnv::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let url = format!("http://{}", listener.local_addr().expect("an address"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(crate::serve(listener, env.state.clone(), shutdown.clone()));
    let client = crate::ApiClient::new(&url)
        .expect("a client")
        .with_token(crate::Secret::new(env.token.clone()));
    let created = client
        .create_campaign(&crate::CreateCampaign {
            name: "spring".to_owned(),
            max_running: Some(2),
            on_error_permit: None,
        })
        .await
        .expect("creates");
    assert_eq!(created["on_error_permit"], "release");
    let changed = client
        .set_campaign_limit("spring", &crate::SetLimit { max_running: 5 })
        .await
        .expect("changes");
    assert_eq!(changed["campaign"]["max_running"], 5);
    let shown = client.campaign("spring").await.expect("shows");
    assert_eq!(shown["max_running"], 5);
    let err = client.campaign("nope").await.expect_err("unknown");
    assert_eq!(err.code(), Some("unknown_campaign"));
    shutdown.cancel();
    let _ = server.await;
    env.cleanup().await;
}
