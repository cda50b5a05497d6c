//! Authentication and scopes, route by route.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use chrono::{Duration, Utc};
use drover_core::Scope;
use drover_store::NewToken;
use serde_json::{Value, json};

use super::TestEnv;
use super::lifecycle::{deploy_all, one};
use crate::{AuthMode, Secret, router};

/// Stores a token named `name` with `scope`, expiring at `expires_at`; answers the token.
async fn token(
    env: &TestEnv,
    name: &str,
    scope: Scope,
    expires_at: Option<chrono::DateTime<Utc>>,
) -> String {
    let token = Secret::generate().expect("randomness");
    env.state
        .store
        .create_token(&NewToken {
            name: name.to_owned(),
            scope,
            hash: token.hash(),
            expires_at,
            actor: "test".to_owned(),
        })
        .await
        .expect("creates a token");
    token.expose().to_owned()
}

/// Every operation of the OpenAPI document, with its path made concrete.
fn operations() -> Vec<(Method, String, String)> {
    let doc = serde_json::to_value(crate::openapi()).expect("the document serializes");
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let method: Method = method.to_uppercase().parse().expect("an HTTP method");
            let concrete = path
                .replace("{id}", &uuid::Uuid::now_v7().to_string())
                .replace("{name}", "nobody");
            let public = operation["security"] == json!([{}]) || operation["security"] == json!([]);
            let class = if public {
                "public".to_owned()
            } else {
                crate::auth::required_scope(&method, path).to_string()
            };
            out.push((method, concrete, class));
        }
    }
    out
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn every_route_but_the_public_ones_refuses_a_request_without_a_valid_token() {
    let env = TestEnv::new().await;
    let expired = token(
        &env,
        "old",
        Scope::Admin,
        Some(Utc::now() - Duration::seconds(1)),
    )
    .await;
    let revoked = token(&env, "gone", Scope::Admin, None).await;
    env.state
        .store
        .revoke_token("gone", "test")
        .await
        .expect("revokes");
    let operations = operations();
    assert!(operations.len() > 25, "the document lists the routes");
    for (method, path, class) in &operations {
        for presented in [
            None,
            Some("drv_not-a-token"),
            Some(&expired[..]),
            Some(&revoked[..]),
        ] {
            let (status, body) = env
                .call_as(presented, method.clone(), path, None, Body::empty())
                .await;
            if class == "public" {
                assert!(
                    status != StatusCode::UNAUTHORIZED,
                    "{method} {path} is public: {body}"
                );
                continue;
            }
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {presented:?}: {body}"
            );
            assert_eq!(error_code(&body), "unauthorized", "{body}");
        }
    }
    let (_, body) = env
        .call_as(
            Some(&expired),
            Method::GET,
            "/v1/stats",
            None,
            Body::empty(),
        )
        .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"old\" expired")),
        "says the token expired: {body}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn each_scope_may_do_what_it_allows_and_is_told_what_it_lacks() {
    let env = TestEnv::new().await;
    let viewer = token(&env, "vera", Scope::Viewer, None).await;
    let operator = token(&env, "otto", Scope::Operator, None).await;
    for (method, path, class) in operations() {
        let needed: Scope = match class.parse() {
            Ok(scope) => scope,
            Err(_) => continue, // public
        };
        for (presented, scope) in [(&viewer, Scope::Viewer), (&operator, Scope::Operator)] {
            let (status, body) = env
                .call_as(Some(presented), method.clone(), &path, None, Body::empty())
                .await;
            if scope.allows(needed) {
                assert!(
                    status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
                    "{scope} may {method} {path}: {body}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{scope}: {method} {path}: {body}"
                );
                assert_eq!(error_code(&body), "forbidden");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains(&format!("needs the {needed} scope")),
                    "names the scope needed: {message}"
                );
            }
        }
    }

    // The classes themselves: reads are viewer's, running things operator's, changing what
    // runs admin's.
    deploy_all(&env).await;
    let id = one(&env, "steps").await;
    let start = json!({"workflow": "steps"}).to_string();
    let (status, body) = env
        .call_as(
            Some(&viewer),
            Method::GET,
            &format!("/v1/instances/{id}"),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = env
        .call_as(
            Some(&viewer),
            Method::POST,
            "/v1/instances",
            Some("application/json"),
            start.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = env
        .call_as(
            Some(&operator),
            Method::POST,
            "/v1/instances",
            Some("application/json"),
            start,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = env
        .call_as(
            Some(&operator),
            Method::POST,
            "/v1/workflows",
            Some("application/yaml"),
            "name: x\nsteps: [{id: done, kind: end, status: completed}]\n",
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "operators do not deploy");
    let (status, _) = env
        .call_as(
            Some(&operator),
            Method::POST,
            "/v1/campaigns",
            Some("application/json"),
            json!({"name": "c"}).to_string(),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "operators do not create campaigns"
    );
    let (status, _) = env
        .call_as(
            Some(&operator),
            Method::GET,
            "/v1/tokens",
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "operators do not see tokens");

    // What an operator does is recorded under the token's name.
    let (status, body) = env
        .call_as(
            Some(&operator),
            Method::POST,
            &format!("/v1/instances/{id}/pause"),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (actor,): (String,) =
        sqlx::query_as("SELECT actor FROM audit WHERE target = $1 AND action = 'pause'")
            .bind(id.to_string())
            .fetch_one(&env.pool)
            .await
            .expect("an audit row");
    assert_eq!(actor, "otto");
    env.cleanup().await;
}

#[tokio::test]
async fn tokens_are_created_once_listed_without_secrets_and_revoked_at_once() {
    let env = TestEnv::new().await;
    let (status, created) = env
        .post_json(
            "/v1/tokens",
            &json!({"name": "ci", "scope": "operator", "expires_in": "30d"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["token"].as_str().expect("the token").to_owned();
    assert!(secret.starts_with("drv_") && secret.len() >= 47, "{secret}");
    assert_eq!(created["scope"], "operator");
    let expires: chrono::DateTime<Utc> =
        serde_json::from_value(created["expires_at"].clone()).expect("an expiry");
    assert!(
        (expires - Utc::now() - Duration::days(30))
            .num_seconds()
            .abs()
            < 60
    );

    // Stored only as a hash; listed without it.
    let (stored,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM api_token t WHERE t::text LIKE '%' || $1 || '%'")
            .bind(&secret[4..])
            .fetch_one(&env.pool)
            .await
            .expect("counts");
    assert_eq!(stored, 0, "the token itself is stored nowhere");
    let (status, listed) = env.get("/v1/tokens").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!listed.to_string().contains(&secret[4..]), "{listed}");
    assert_eq!(listed["tokens"][1]["name"], "ci");
    assert_eq!(listed["tokens"][1]["status"], "active");
    assert_eq!(listed["tokens"][1]["created_by"], "ada");

    let (status, body) = env
        .call_as(Some(&secret), Method::GET, "/v1/stats", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = env
        .post_json("/v1/tokens", &json!({"name": "ci", "scope": "viewer"}))
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::CONFLICT, "token_exists")
    );
    for bad in [
        json!({"name": "bootstrap", "scope": "admin"}),
        json!({"name": "Not A Slug", "scope": "admin"}),
        json!({"name": "x", "scope": "admin", "expires_in": "soon"}),
        json!({"name": "x", "scope": "admin", "expires_in": "0s"}),
    ] {
        let (status, body) = env.post_json("/v1/tokens", &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let (status, _) = env
        .post_json("/v1/tokens", &json!({"name": "x", "scope": "root"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unknown scope");

    let (status, body) = env
        .call(Method::DELETE, "/v1/tokens/ci", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "revoked");
    let (status, body) = env
        .call_as(Some(&secret), Method::GET, "/v1/stats", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked at once: {body}");
    let (status, _) = env
        .call(Method::DELETE, "/v1/tokens/nobody", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env
        .call(Method::DELETE, "/v1/tokens/bootstrap", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // A revoked name can be given to a new token.
    let (status, body) = env
        .post_json("/v1/tokens", &json!({"name": "ci", "scope": "viewer"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let audit: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT actor, action, target FROM audit WHERE action LIKE 'token.%' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("audit rows");
    let ada = |action: &str| ("ada".to_owned(), action.to_owned(), "ci".to_owned());
    assert_eq!(
        audit,
        vec![
            ada("token.create"),
            ada("token.revoke"),
            ada("token.create")
        ]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_bootstrap_token_is_an_admin_and_auth_off_is_reported() {
    let env = TestEnv::new().await;
    let bootstrap = Secret::new("b".repeat(40));
    let app = router(
        env.state
            .clone()
            .with_auth(AuthMode::on(Some(bootstrap.clone())).expect("long enough")),
    );
    let env = TestEnv { router: app, ..env };
    let (status, body) = env
        .call_as(
            Some(bootstrap.expose()),
            Method::POST,
            "/v1/campaigns",
            Some("application/json"),
            json!({"name": "spring"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (actor,): (String,) =
        sqlx::query_as("SELECT actor FROM audit WHERE action = 'campaign.create'")
            .fetch_one(&env.pool)
            .await
            .expect("an audit row");
    assert_eq!(actor, "bootstrap");
    let (status, ready) = env
        .call_as(None, Method::GET, "/readyz", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["auth"], "on");
    assert_eq!(ready["checks"]["postgres"], "ok");
    assert_eq!(ready["warnings"], json!([]));

    let open = router(env.state.clone().with_auth(AuthMode::Off));
    let env = TestEnv {
        router: open,
        ..env
    };
    let (status, body) = env
        .call_as(
            None,
            Method::POST,
            "/v1/campaigns",
            Some("application/json"),
            json!({"name": "open"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "anyone is an admin: {body}");
    let (_, ready) = env
        .call_as(None, Method::GET, "/readyz", None, Body::empty())
        .await;
    assert_eq!(ready["auth"], "off");
    assert!(
        ready["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("authentication is off")),
        "{ready}"
    );
    env.cleanup().await;
}

#[test]
fn the_openapi_document_requires_the_bearer_token_except_on_public_routes() {
    let doc = serde_json::to_value(crate::openapi()).expect("serializes");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let public: Vec<String> = operations()
        .into_iter()
        .filter(|(_, _, class)| class == "public")
        .map(|(method, path, _)| format!("{method} {path}"))
        .collect();
    assert_eq!(
        public,
        vec![
            "GET /healthz",
            "GET /readyz",
            "GET /v1/asyncapi.json",
            "GET /v1/openapi.json",
            "GET /v1/schemas/events/{type}"
        ]
    );
    assert!(doc["paths"]["/v1/stats"]["get"]["responses"]["401"].is_object());
    assert!(doc["paths"]["/v1/workflows"]["post"]["responses"]["403"].is_object());
}
