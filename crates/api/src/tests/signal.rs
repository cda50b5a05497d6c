//! Delivering events (`POST /v1/instances/{id}/events/{name}`) and the NATS signal listener.
//! Instances are parked WAITING by store calls, as a worker would: claimed by a registered
//! (fake) node, then committed with `Transition::Wait`.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use chrono::Utc;
use drover_core::{InstanceId, InstanceState, NodeId};
use drover_store::{Commit, Completion, StepJob, Transition};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{TestEnv, assert_error};
use crate::SignalListener;

const APPROVE: &str = r#"
name: approve
steps:
  - { id: wait, kind: wait_event, name: approved, timeout: 1h, next: [{ to: done }] }
  - { id: done, kind: end, status: completed }
"#;

/// Deploys [`APPROVE`] and starts one instance; `park` also runs its first step as a worker
/// would, leaving it WAITING for `approved`.
async fn instance(env: &TestEnv, park: bool) -> InstanceId {
    let (status, body) = env.deploy(APPROVE).await;
    assert!(status.is_success(), "{status} {body}");
    let (status, body) = env
        .post_json("/v1/instances", &json!({ "workflow": "approve" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id: InstanceId = body["ids"][0]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("an instance id");
    if park {
        let store = &env.state.store;
        let node = NodeId::new();
        store
            .register_node(&drover_store::NewNode::new(
                node,
                &["worker".to_owned()],
                "test",
                "0",
            ))
            .await
            .expect("registers");
        let job = StepJob {
            route: Default::default(),
            instance: id,
            step_seq: drover_core::StepSeq(0),
            fence: drover_core::Fence(0),
        };
        let claimed = store.claim(node, &[job]).await.expect("claims").remove(0);
        let parked = Completion::of(
            &claimed,
            Utc::now(),
            "waiting",
            Transition::Wait {
                wake_at_ms: Some(3_600_000),
                event: Some("approved".to_owned()),
                child: None,
            },
        );
        let commits = store.commit(node, &[parked]).await.expect("commits");
        assert_eq!(commits, [Commit::Committed]);
    }
    id
}

async fn state(env: &TestEnv, id: InstanceId) -> InstanceState {
    let instance = env.state.store.get_instance(id).await.expect("reads");
    instance.expect("exists").state
}

#[tokio::test]
async fn an_event_it_waits_for_wakes_an_instance_and_dispatches_it_others_are_kept() {
    let env = TestEnv::new().await;
    let id = instance(&env, true).await;
    assert_eq!(state(&env, id).await, InstanceState::Waiting);
    let jobs = env.queued_jobs().await;

    let (status, body) = env
        .post_json(
            &format!("/v1/instances/{id}/events/rejected"),
            &json!({ "no": 1 }),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::ACCEPTED, json!({ "delivered": "kept" }))
    );
    assert_eq!(state(&env, id).await, InstanceState::Waiting);
    assert_eq!(env.queued_jobs().await, jobs);

    let (status, body) = env
        .post_json(
            &format!("/v1/instances/{id}/events/approved"),
            &json!({ "ok": true }),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::ACCEPTED, json!({ "delivered": "woke" }))
    );
    assert_eq!(state(&env, id).await, InstanceState::Ready);
    assert_eq!(
        env.queued_jobs().await,
        jobs + 1,
        "the woken instance's job"
    );
    let journal = env
        .state
        .store
        .journal(id)
        .await
        .expect("reads")
        .expect("exists");
    let last = journal.last().expect("entries");
    assert_eq!(
        (last.outcome.as_str(), last.actor.as_deref()),
        ("signalled", Some("signal:approved"))
    );
    let signal = env
        .state
        .store
        .pending_signal(id, "approved")
        .await
        .expect("reads");
    assert_eq!(
        signal.map(|s| s.payload),
        Some(json!({ "ok": true })),
        "kept for the step"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn event_requests_are_checked_and_an_empty_body_is_a_null_payload() {
    let env = TestEnv::new().await;
    let id = instance(&env, false).await;

    let (status, body) = env
        .call(
            Method::POST,
            &format!("/v1/instances/{id}/events/early"),
            None,
            Body::empty(),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::ACCEPTED, json!({ "delivered": "kept" }))
    );
    let signal = env
        .state
        .store
        .pending_signal(id, "early")
        .await
        .expect("reads");
    assert_eq!(signal.map(|s| s.payload), Some(Value::Null));

    let (status, body) = env
        .post_json("/v1/instances/nope/events/x", &json!(1))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_id");
    let (status, body) = env
        .post_json(&format!("/v1/instances/{id}/events/Bad.Name"), &json!(1))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(assert_error(&body, "invalid_event_name").contains("Bad.Name"));
    let (status, body) = env
        .call(
            Method::POST,
            &format!("/v1/instances/{id}/events/x"),
            Some("application/json"),
            "{not json",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, "invalid_json");
    let unknown = InstanceId::new();
    let (status, body) = env
        .post_json(&format!("/v1/instances/{unknown}/events/x"), &json!(1))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(assert_error(&body, "not_found").contains(&unknown.to_string()));

    sqlx::query("UPDATE instance SET state = 'completed' WHERE id = $1")
        .bind(id.0)
        .execute(&env.pool)
        .await
        .expect("updates");
    let (status, body) = env
        .post_json(&format!("/v1/instances/{id}/events/x"), &json!(1))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(assert_error(&body, "instance_finished").contains("completed"));

    let (_, doc) = env.get("/v1/openapi.json").await;
    let path = &doc["paths"]["/v1/instances/{id}/events/{name}"]["post"];
    assert!(path["responses"]["202"].is_object(), "{path}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_signal_listener_answers_requests_and_survives_garbage() {
    let env = TestEnv::new().await;
    let id = instance(&env, true).await;
    let shutdown = CancellationToken::new();
    let listener = SignalListener::new(env.state.store.clone(), env.state.bus.clone());
    let running = tokio::spawn(listener.run(shutdown.clone()));
    let bus = &env.state.bus;
    let client = bus.client();
    // The subscription is made asynchronously: ask until it answers.
    let ask = |subject: String, payload: &'static str| async move {
        let reply = client.request(subject, payload.into()).await.ok()?;
        serde_json::from_slice::<Value>(&reply.payload).ok()
    };
    let prefix = bus.subjects().prefix().to_owned();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let answer = loop {
        if let Some(answer) = ask(format!("{prefix}.signal.x.y"), "1").await {
            break answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(answer["error"]["code"], "invalid_subject", "{answer}");
    let subject = bus.subjects().signal(&id.to_string(), "approved");
    let answer = ask(subject.clone(), "{garbage").await.expect("answers");
    assert_eq!(answer["error"]["code"], "invalid_json", "{answer}");
    let answer = ask(subject.clone(), r#"{"via":"n\u0000ts"}"#)
        .await
        .expect("answers");
    assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
    assert_eq!(
        answer["error"]["details"][0]["field"], "payload.via",
        "{answer}"
    );
    assert_eq!(
        state(&env, id).await,
        InstanceState::Waiting,
        "nothing delivered"
    );
    let answer = ask(subject, r#"{"via":"nats"}"#).await.expect("answers");
    assert_eq!(answer, json!({ "delivered": "woke" }));
    assert_eq!(state(&env, id).await, InstanceState::Ready);

    shutdown.cancel();
    let stopped = running.await.expect("the listener task does not panic");
    assert!(stopped.is_ok(), "{stopped:?}");
    env.cleanup().await;
}
