//! Input Postgres cannot store is refused naming the field (never a 500), JSON bodies need a
//! JSON content type, and every listing is bounded in size.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use drover_core::InstanceId;
use serde_json::{Value, json};

use super::{GREETING, TestEnv, assert_error, deployed};
use crate::routes::{MAX_JOURNAL_PAGE_BYTES, MAX_LIST_VARS_BYTES};
use crate::{ApiClient, JournalQuery};

/// Asserts a 4xx error with `code` whose `details` name `field`, and that the message does.
#[track_caller]
fn assert_names_field(
    status: StatusCode,
    body: &Value,
    expected: StatusCode,
    code: &str,
    field: &str,
) {
    assert_eq!(status, expected, "{body}");
    let message = assert_error(body, code);
    assert_eq!(body["error"]["details"][0]["field"], json!(field), "{body}");
    assert!(
        message.contains(field),
        "the message names {field}: {message}"
    );
    assert!(message.contains("NUL"), "the message says why: {message}");
}

#[tokio::test]
async fn a_nul_in_any_string_of_a_request_is_refused_naming_the_field_never_500() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    let some_id = InstanceId::new();
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;

    // Bodies: a top-level string, nested vars, an object key, resume `set`, a campaign name,
    // a lifecycle filter.
    for (uri, body, field) in [
        (
            "/v1/instances".to_owned(),
            json!({"workflow": "greet\u{0}ing"}),
            "workflow",
        ),
        (
            "/v1/instances".to_owned(),
            json!({"workflow": "greeting", "campaign": "\u{0}"}),
            "campaign",
        ),
        (
            "/v1/instances".to_owned(),
            json!({"workflow": "greeting", "vars": {"customer": {"name": "Ann\u{0}"}}}),
            "vars.customer.name",
        ),
        (
            "/v1/instances".to_owned(),
            json!({"workflow": "greeting", "vars": {"tags": ["ok", "no\u{0}"]}}),
            "vars.tags[1]",
        ),
        (
            "/v1/instances".to_owned(),
            json!({"workflow": "greeting", "vars": {"a\u{0}b": 1}}),
            r#"vars["a\u0000b"]"#,
        ),
        (
            format!("/v1/instances/{some_id}/resume"),
            json!({"mode": "next_step", "set": {"email": "a@b\u{0}"}}),
            "set.email",
        ),
        (
            "/v1/campaigns".to_owned(),
            json!({"name": "spring\u{0}"}),
            "name",
        ),
        (
            "/v1/instances/pause".to_owned(),
            json!({"campaign": "default\u{0}"}),
            "campaign",
        ),
        (
            format!("/v1/instances/{some_id}/events/approved"),
            json!({"note": {"text": "\u{0}"}}),
            "payload.note.text",
        ),
    ] {
        let (status, answer) = env.post_json(&uri, &body).await;
        assert_names_field(status, &answer, unprocessable, "invalid_request", field);
    }

    // Path segments and query parameters.
    for (uri, code, field) in [
        ("/v1/workflows/greet%00ing", "invalid_path", "name"),
        ("/v1/campaigns/default%00", "invalid_path", "name"),
        ("/v1/instances/%00/journal", "invalid_path", "id"),
        (
            "/v1/instances?campaign=default%00",
            "invalid_query",
            "campaign",
        ),
        ("/v1/instances?workflow=%00", "invalid_query", "workflow"),
        ("/v1/instances?state=ready%00", "invalid_query", "state"),
        ("/v1/instances?before=%00", "invalid_query", "before"),
    ] {
        let (status, answer) = env.get(uri).await;
        assert_names_field(status, &answer, StatusCode::BAD_REQUEST, code, field);
    }
    let (status, answer) = env
        .call(
            Method::POST,
            &format!("/v1/instances/{some_id}/events/appro%00ved"),
            Some("application/json"),
            "1",
        )
        .await;
    assert_names_field(
        status,
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_path",
        "name",
    );

    // Definitions: a YAML escape and a raw NUL byte.
    let escaped = GREETING.replace("Says hello", "\"Says \\0 hello\"");
    let (status, answer) = env.deploy(&escaped).await;
    assert_eq!(status, unprocessable, "{answer}");
    assert_error(&answer, "invalid_definition");
    assert_eq!(
        answer["error"]["details"][0]["field"], "description",
        "{answer}"
    );
    let raw = GREETING.replace("Says hello", "Says \0 hello");
    let (status, answer) = env.deploy(&raw).await;
    assert_eq!(status, unprocessable, "{answer}");
    assert_eq!(answer["error"]["details"][0]["field"], "source", "{answer}");

    let (_, listed) = env.get("/v1/instances").await;
    assert_eq!(listed["instances"], json!([]), "nothing was started");
    let (_, workflow) = env.get("/v1/workflows/greeting").await;
    assert_eq!(workflow["version"], 1, "nothing was deployed");
    assert_eq!(env.queued_jobs().await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_json_body_without_a_json_content_type_is_415() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    let some_id = InstanceId::new();
    let start = r#"{"workflow": "greeting"}"#;
    for (method, uri, content_type, body) in [
        (
            Method::POST,
            "/v1/instances".to_owned(),
            Some("text/plain"),
            start,
        ),
        (Method::POST, "/v1/instances".to_owned(), None, start),
        (
            Method::POST,
            "/v1/instances".to_owned(),
            Some("application/jsonx"),
            start,
        ),
        (
            Method::POST,
            "/v1/campaigns".to_owned(),
            None,
            r#"{"name": "spring"}"#,
        ),
        (
            Method::PUT,
            "/v1/campaigns/default/limit".to_owned(),
            Some("application/x-www-form-urlencoded"),
            r#"{"max_running": 2}"#,
        ),
        (
            Method::POST,
            format!("/v1/instances/{some_id}/resume"),
            Some("text/plain"),
            r#"{"mode": "current_step"}"#,
        ),
    ] {
        let (status, answer) = env.call(method, &uri, content_type, body.to_owned()).await;
        assert_eq!(
            status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{uri} {content_type:?}: {answer}"
        );
        assert_error(&answer, "unsupported_media_type");
    }
    assert_eq!(env.queued_jobs().await, 0);

    // Parameters and `+json` are JSON too; an integral float is an integer.
    for content_type in [
        "application/json; charset=utf-8",
        "application/vnd.drover+json",
    ] {
        let (status, answer) = env
            .call(
                Method::POST,
                "/v1/instances",
                Some(content_type),
                r#"{"workflow": "greeting", "count": 2.0}"#,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{content_type}: {answer}");
        assert_eq!(answer["ids"].as_array().map(Vec::len), Some(2), "{answer}");
    }
    // Every JSON body is an object, even an optional one (serde alone fills a struct from
    // an array).
    for uri in [
        format!("/v1/instances/{some_id}/restart"),
        "/v1/instances/pause".to_owned(),
        "/v1/instances".to_owned(),
    ] {
        let (status, answer) = env.post_json(&uri, &json!([])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {answer}");
        assert!(
            assert_error(&answer, "invalid_json").contains("object"),
            "{answer}"
        );
    }
    let (status, answer) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "greeting", "count": 2.5}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        assert_error(&answer, "invalid_json").contains("count"),
        "{answer}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_listing_of_large_vars_instances_stays_small_and_include_vars_is_bounded() {
    let env = TestEnv::new().await;
    deployed(&env).await;
    const INSTANCES: usize = 50;
    const VARS_BYTES: usize = 200 * 1024;
    let blob = "x".repeat(VARS_BYTES);
    let (status, answer) = env
        .post_json(
            "/v1/instances",
            &json!({"workflow": "greeting", "count": INSTANCES, "vars": {"blob": blob}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");

    // Summaries: no vars, about 600 bytes an instance.
    let (status, bytes) = env
        .call_raw(Method::GET, "/v1/instances?limit=1000", None, Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        bytes.len() < INSTANCES * 1024,
        "{} bytes for {INSTANCES} summaries",
        bytes.len()
    );
    let listed: Value = serde_json::from_slice(&bytes).expect("JSON");
    let instances = listed["instances"].as_array().expect("an array");
    assert_eq!(instances.len(), INSTANCES);
    assert!(instances.iter().all(|i| i.get("vars").is_none()), "no vars");
    assert!(
        listed.get("next").is_none(),
        "all listed: {}",
        listed["next"]
    );

    // With vars: pages stop at the budget, and `next` leads through every instance.
    let mut seen = Vec::new();
    let mut uri = "/v1/instances?limit=1000&include=vars".to_owned();
    loop {
        let (status, bytes) = env.call_raw(Method::GET, &uri, None, Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            bytes.len() <= MAX_LIST_VARS_BYTES + INSTANCES * 1024,
            "a page of {} bytes",
            bytes.len()
        );
        let page: Value = serde_json::from_slice(&bytes).expect("JSON");
        let instances = page["instances"].as_array().expect("an array");
        assert!(!instances.is_empty(), "{uri}");
        for instance in instances {
            assert_eq!(
                instance["vars"]["blob"].as_str().map(str::len),
                Some(VARS_BYTES)
            );
            seen.push(instance["id"].as_str().expect("an id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => {
                assert!(
                    instances.len() < INSTANCES,
                    "a page is cut by the budget, not the limit"
                );
                uri = format!("/v1/instances?limit=1000&include=vars&before={next}");
            }
            None => break,
        }
    }
    let pages_needed = INSTANCES * VARS_BYTES / MAX_LIST_VARS_BYTES;
    assert!(
        pages_needed >= 2,
        "the test makes more vars than one page holds"
    );
    let unique: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        (seen.len(), unique.len()),
        (INSTANCES, INSTANCES),
        "each once"
    );

    let (status, answer) = env.get("/v1/instances?include=outputs").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_error(&answer, "invalid_query");
    let (status, answer) = env.get("/v1/instances?campaign=Not%20A%20Slug").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(
        answer["error"]["details"][0]["field"], "campaign",
        "{answer}"
    );
    env.cleanup().await;
}

/// Starts one instance and gives it `extra` more journal entries (step_seq 1…), each with
/// `output`, as if steps had run.
async fn journaled(env: &TestEnv, extra: i64, output: &Value) -> InstanceId {
    deployed(env).await;
    let (status, answer) = env
        .post_json("/v1/instances", &json!({"workflow": "greeting"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let id: InstanceId = answer["ids"][0]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("an id");
    sqlx::query(
        "INSERT INTO journal (instance_id, step_seq, step_id, outcome, fence, attempt,
                              started_at, finished_at, output)
         SELECT $1, seq, 'count', 'completed', 0, 1, now(), now(), $3
         FROM generate_series(1, $2) AS seq",
    )
    .bind(id.0)
    .bind(extra)
    .bind(output)
    .execute(&env.pool)
    .await
    .expect("journal entries insert");
    id
}

#[tokio::test]
async fn the_journal_is_paged_by_step_seq_and_the_client_follows_the_pages() {
    let env = TestEnv::new().await;
    let id = journaled(&env, 250, &json!({"n": 1})).await;

    let (status, first) = env.get(&format!("/v1/instances/{id}/journal")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let entries = first["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 100, "the default page");
    assert_eq!(entries[0]["step_seq"], 0);
    assert_eq!(first["next"], 99);

    let (_, rest) = env
        .get(&format!("/v1/instances/{id}/journal?after=99&limit=5000"))
        .await;
    let entries = rest["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 151, "the rest, the limit capped at 1000");
    assert_eq!(entries[0]["step_seq"], 100);
    assert_eq!(entries[150]["step_seq"], 250);
    assert!(
        rest.get("next").is_none(),
        "the last page: {}",
        rest["next"]
    );

    let (_, past) = env
        .get(&format!("/v1/instances/{id}/journal?after=250"))
        .await;
    assert_eq!(past["entries"], json!([]), "{past}");
    for query in ["limit=0", "after=-1", "limit=x"] {
        let (status, answer) = env
            .get(&format!("/v1/instances/{id}/journal?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert_error(&answer, "invalid_query");
    }
    let (status, answer) = env
        .get(&format!(
            "/v1/instances/{}/journal?after=3",
            InstanceId::new()
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");

    // The client (and so `drover journal`) gives the whole journal.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("an address");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(crate::serve(listener, env.state.clone(), shutdown.clone()));
    let client = ApiClient::new(&format!("http://{addr}"))
        .expect("a valid URL")
        .with_token(crate::Secret::new(env.token.clone()));
    let whole = client.journal(&id.to_string()).await.expect("the journal");
    let seqs: Vec<i64> = whole["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["step_seq"].as_i64())
        .collect();
    assert_eq!(seqs, (0..=250).collect::<Vec<_>>());
    assert!(whole.get("next").is_none());
    let page = client
        .journal_page(
            &id.to_string(),
            &JournalQuery {
                limit: Some(10),
                after: Some(5),
            },
        )
        .await
        .expect("a page");
    assert_eq!(page["entries"][0]["step_seq"], 6);
    assert_eq!(page["next"], 15);
    shutdown.cancel();
    server
        .await
        .expect("the server task does not panic")
        .expect("the server stops cleanly");
    env.cleanup().await;
}

#[tokio::test]
async fn a_journal_page_of_large_outputs_stops_at_its_byte_budget() {
    let env = TestEnv::new().await;
    let big = json!({"blob": "y".repeat(1024 * 1024)});
    let id = journaled(&env, 10, &big).await;
    let mut after = None::<i64>;
    let mut total = 0;
    loop {
        let uri = match after {
            Some(after) => format!("/v1/instances/{id}/journal?limit=1000&after={after}"),
            None => format!("/v1/instances/{id}/journal?limit=1000"),
        };
        let (status, bytes) = env.call_raw(Method::GET, &uri, None, Body::empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            bytes.len() <= MAX_JOURNAL_PAGE_BYTES + 64 * 1024,
            "a page of {} bytes",
            bytes.len()
        );
        let page: Value = serde_json::from_slice(&bytes).expect("JSON");
        total += page["entries"].as_array().map_or(0, Vec::len);
        match page["next"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(total, 11, "every entry, over several pages");
    env.cleanup().await;
}
