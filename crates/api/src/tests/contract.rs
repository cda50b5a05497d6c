//! The event contract's documents: served without a token, described in the OpenAPI document.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use drover_bus::contract::{self, EventScope};
use serde_json::json;

use super::{TestEnv, assert_error};

#[tokio::test]
async fn every_event_types_schema_is_served_without_a_token() {
    let env = TestEnv::new().await;
    for t in contract::EVENT_TYPES {
        let (status, schema) = env
            .call_as(None, Method::GET, &t.schema_path(), None, Body::empty())
            .await;
        assert_eq!(status, StatusCode::OK, "{}: {schema}", t.kind);
        assert_eq!(Some(schema), contract::schema(t.kind), "{}", t.kind);
    }
    for unknown in ["exploded", "drover.instance.started", "STARTED"] {
        let (status, body) = env
            .call_as(
                None,
                Method::GET,
                &format!("/v1/schemas/events/{unknown}"),
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {body}");
        let message = assert_error(&body, "not_found");
        assert!(
            message.contains(unknown) && message.contains("step_completed"),
            "names the type asked for and the known ones: {message}"
        );
    }
    let (status, body) = env
        .call_as(
            None,
            Method::GET,
            "/v1/schemas/events/a%00b",
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "invalid_path");
    env.cleanup().await;
}

#[tokio::test]
async fn the_asyncapi_document_is_served_without_a_token_with_the_clusters_subjects() {
    let env = TestEnv::new().await;
    let (status, doc) = env
        .call_as(None, Method::GET, "/v1/asyncapi.json", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["asyncapi"], "3.0.0");
    let subjects = env.state.bus.subjects();
    assert_eq!(doc, contract::asyncapi(subjects));
    assert_eq!(
        doc["channels"]["instanceEvents"]["address"],
        subjects.event("{campaign}", "{workflow}", "{instance}", "{kind}")
    );
    assert_eq!(
        doc["channels"]["signals"]["address"],
        subjects.signal("{instance}", "{event}")
    );
    assert_eq!(
        doc["channels"]["instanceEvents"]["x-jetstream-stream"],
        subjects.events_stream()
    );
    let instance_kinds = contract::EVENT_TYPES
        .iter()
        .filter(|t| t.scope == EventScope::Instance)
        .count();
    assert_eq!(
        doc["channels"]["instanceEvents"]["parameters"]["kind"]["enum"]
            .as_array()
            .map(Vec::len),
        Some(instance_kinds)
    );
    env.cleanup().await;
}

#[tokio::test]
async fn the_openapi_document_describes_the_contract_routes() {
    let env = TestEnv::new().await;
    let (status, doc) = env.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let schema = &doc["paths"]["/v1/schemas/events/{type}"]["get"];
    assert_eq!(schema["security"], json!([{}]), "public: {schema}");
    for status in ["200", "400", "404"] {
        assert!(
            schema["responses"].get(status).is_some(),
            "documents {status}"
        );
    }
    let asyncapi = &doc["paths"]["/v1/asyncapi.json"]["get"];
    assert_eq!(asyncapi["security"], json!([{}]), "public: {asyncapi}");
    assert!(asyncapi["responses"].get("200").is_some());
    env.cleanup().await;
}
