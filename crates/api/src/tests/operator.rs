//! Operator actions (`POST /v1/instances/{id}/resume`) and the cluster views (`GET /v1/nodes`,
//! `GET /v1/leader`). Instances are put `in_error` by store calls, as a worker would: claimed
//! by a registered (fake) node, then committed with `Transition::Stop { state: InError }`.

use axum::http::StatusCode;
use chrono::Utc;
use drover_core::{InstanceId, InstanceState, NodeId};
use drover_store::{Commit, Completion, Resume, Resumed, StepJob, Transition};
use serde_json::{Value, json};

use super::{TestEnv, assert_error};

/// `call` never runs here (no worker); the tests decide how it ended. Its transitions read
/// `vars` (so `set` can steer them) and `output` (its latest recorded output, or null).
const FLAKY: &str = r#"
name: flaky
vars:
  skip: false
  status: 404
steps:
  - id: call
    kind: http
    method: POST
    url: "http://127.0.0.1:9/never"
    body:
      status: "vars.status"
    timeout: 7s
    allow_retry: false
    next:
      - to: skipped
        when: "vars.skip == true && output == null"
      - to: noted
        when: "output != null && output.status == 404"
      - to: done
  - id: skipped
    kind: assign
    set:
      skipped: "true"
    next:
      - to: done
  - id: noted
    kind: assign
    set:
      noted: "true"
    timeout: 3s
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#;

/// A `when` that fails when evaluated: `vars.missing` does not exist.
const BROKEN: &str = r#"
name: broken
steps:
  - id: call
    kind: assign
    set:
      n: "1"
    next:
      - to: done
        when: "vars.missing > 1"
      - to: done
  - id: done
    kind: end
    status: completed
"#;

/// Deploys `source` and starts one instance of it with `vars`.
async fn started(env: &TestEnv, source: &str, vars: Value) -> InstanceId {
    let (status, body) = env.deploy(source).await;
    assert!(status.is_success(), "deploy failed: {status} {body}");
    let (status, body) = env
        .post_json(
            "/v1/instances",
            &json!({ "workflow": body["name"], "vars": vars }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["ids"][0]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("an instance id")
}

/// A node row the fake worker claims as.
async fn fake_node(env: &TestEnv) -> NodeId {
    let node = NodeId::new();
    env.state
        .store
        .register_node(&drover_store::NewNode::new(
            node,
            &["worker".to_owned()],
            "test",
            "0.0.0",
        ))
        .await
        .expect("registers");
    node
}

/// Claims `id` at its checkpoint as `node` and commits `transition`, as a worker would.
async fn run_step(
    env: &TestEnv,
    node: NodeId,
    id: InstanceId,
    transition: Transition,
    output: Option<Value>,
) {
    let store = &env.state.store;
    let instance = store
        .get_instance(id)
        .await
        .expect("reads")
        .expect("exists");
    let claimed = store
        .claim(
            node,
            &[StepJob {
                route: Default::default(),
                instance: id,
                step_seq: instance.step_seq,
                fence: instance.fence,
            }],
        )
        .await
        .expect("claims");
    let [claimed] = claimed.as_slice() else {
        panic!("the instance did not claim: {claimed:?}");
    };
    let error = matches!(transition, Transition::Stop { .. })
        .then(|| format!("http: status 404 at step {}", claimed.current_step));
    let commits = store
        .commit(
            node,
            &[Completion {
                output,
                error: error.clone(),
                ..Completion::of(
                    claimed,
                    Utc::now(),
                    if error.is_some() {
                        "failed"
                    } else {
                        "completed"
                    },
                    transition,
                )
            }],
        )
        .await
        .expect("commits");
    assert_eq!(commits, vec![Commit::Committed]);
}

fn in_error() -> Transition {
    Transition::Stop {
        state: InstanceState::InError,
    }
}

/// Starts an instance of `source` and fails its entry step (`output` recorded as its output).
async fn failed(env: &TestEnv, source: &str, vars: Value, output: Option<Value>) -> InstanceId {
    let id = started(env, source, vars).await;
    let node = fake_node(env).await;
    run_step(env, node, id, in_error(), output).await;
    id
}

async fn resume(env: &TestEnv, id: InstanceId, request: &Value) -> (StatusCode, Value) {
    env.post_json(&format!("/v1/instances/{id}/resume"), request)
        .await
}

async fn last_journal_entry(env: &TestEnv, id: InstanceId) -> Value {
    let (status, journal) = env.get(&format!("/v1/instances/{id}/journal")).await;
    assert_eq!(status, StatusCode::OK, "{journal}");
    journal["entries"]
        .as_array()
        .and_then(|entries| entries.last().cloned())
        .expect("a journal entry")
}

#[tokio::test]
async fn resuming_the_current_step_retries_it_at_a_new_checkpoint_with_a_job_and_an_audit_row() {
    let env = TestEnv::new().await;
    let id = failed(&env, FLAKY, json!({}), None).await;
    let before = env
        .state
        .store
        .get_instance(id)
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(before.state, InstanceState::InError);
    assert_eq!(env.queued_jobs().await, 1, "the start's job");

    let (status, body) = resume(
        &env,
        id,
        &json!({"mode": "current_step", "set": {"status": 200, "note": {"by": "ada"}}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], json!(id.to_string()));
    assert_eq!(body["state"], "ready");
    assert_eq!(body["current_step"], "call");
    assert_eq!(body["step_attempt"], 1);
    assert_eq!(body["step_seq"], json!(before.step_seq.0 + 1));
    assert_eq!(body["error"], Value::Null, "the error is cleared");
    assert_eq!(
        body["vars"],
        json!({"skip": false, "status": 200, "note": {"by": "ada"}}),
        "set is merged key by key"
    );

    let after = env
        .state
        .store
        .get_instance(id)
        .await
        .expect("reads")
        .expect("exists");
    assert_eq!(after.fence, before.fence.next(), "fenced");
    assert_eq!(after.step_seq, before.step_seq.next(), "a new checkpoint");
    let (retryable, timeout_ms, claims, entered): (bool, i64, i32, i64) = sqlx::query_as(
        "SELECT step_retryable, step_timeout_ms, step_claims, step_entered_seq
         FROM instance WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(&env.pool)
    .await
    .expect("reads the row");
    assert!(!retryable, "call has allow_retry: false");
    assert_eq!(timeout_ms, 7_000);
    assert_eq!(claims, 0);
    assert_eq!(
        entered, after.step_seq.0,
        "entered anew: a new idempotency key"
    );

    let entry = last_journal_entry(&env, id).await;
    assert_eq!(entry["step_seq"], json!(after.step_seq.0));
    assert_eq!(entry["outcome"], "resumed");
    assert_eq!(entry["step_id"], "call");
    assert_eq!(entry["transition"], "call");
    assert_eq!(entry["actor"], "ada");
    assert_eq!(entry["node_id"], Value::Null);

    assert_eq!(env.queued_jobs().await, 2, "the resume published a job");

    let audit: Vec<(String, String, String, Value)> =
        sqlx::query_as("SELECT actor, action, target, details FROM audit")
            .fetch_all(&env.pool)
            .await
            .expect("reads the audit trail");
    let [(actor, action, target, details)] = audit.as_slice() else {
        panic!("one audit row: {audit:?}");
    };
    assert_eq!(
        (actor.as_str(), action.as_str()),
        ("ada", "resume"),
        "{details}"
    );
    assert_eq!(target, &id.to_string());
    assert_eq!(details["mode"], "current_step");
    assert_eq!(details["from_step"], "call");
    assert_eq!(details["to_step"], "call");

    let events: Vec<drover_bus::Rendered> = env
        .state
        .store
        .instance_facts(id)
        .await
        .expect("reads the outbox")
        .iter()
        .filter(|f| f.kind == drover_bus::EventKind::Resumed)
        .map(|f| drover_bus::render(env.state.bus.subjects(), f))
        .collect();
    let [
        drover_bus::Rendered {
            subject,
            cloudevent: payload,
        },
    ] = events.as_slice()
    else {
        panic!("one resumed event: {events:?}");
    };
    assert!(
        subject.ends_with(&format!(".default.flaky.{id}.resumed")),
        "{subject}"
    );
    assert_eq!(payload["type"], "drover.instance.resumed");
    assert_eq!(payload["data"]["step_seq"], json!(after.step_seq.0));
    assert_eq!(payload["data"]["next_step"], "call");
    assert_eq!(payload["data"]["actor"], "ada");

    // Resuming again is refused: it is READY now.
    let (status, body) = resume(&env, id, &json!({"mode": "current_step"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        assert_error(&body, "not_in_error").contains("ready"),
        "{body}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn resuming_the_next_step_follows_the_steps_transitions_with_set_applied_first() {
    let env = TestEnv::new().await;

    // No recorded output, `skip` set by the resume: the first transition.
    let skipped = failed(&env, FLAKY, json!({}), None).await;
    let (status, body) = resume(
        &env,
        skipped,
        &json!({"mode": "next_step", "set": {"skip": true}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "ready");
    assert_eq!(body["current_step"], "skipped");
    assert_eq!(body["step_attempt"], 1);
    assert_eq!(body["vars"]["skip"], true);
    let entry = last_journal_entry(&env, skipped).await;
    assert_eq!(
        (&entry["outcome"], &entry["step_id"], &entry["transition"]),
        (&json!("resumed"), &json!("call"), &json!("skipped"))
    );
    assert_eq!(entry["actor"], "ada", "the token's name");
    let (retryable, timeout_ms): (bool, i64) =
        sqlx::query_as("SELECT step_retryable, step_timeout_ms FROM instance WHERE id = $1")
            .bind(skipped.0)
            .fetch_one(&env.pool)
            .await
            .expect("reads the row");
    assert!(retryable, "the chosen step's allow_retry");
    assert_eq!(timeout_ms, 30_000, "the chosen step's (default) timeout");

    // `output` is the step's latest recorded output: the second transition.
    let noted = failed(&env, FLAKY, json!({}), Some(json!({"status": 404}))).await;
    let (status, body) = resume(&env, noted, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current_step"], "noted");
    let (timeout_ms,): (i64,) =
        sqlx::query_as("SELECT step_timeout_ms FROM instance WHERE id = $1")
            .bind(noted.0)
            .fetch_one(&env.pool)
            .await
            .expect("reads the row");
    assert_eq!(timeout_ms, 3_000);

    // Neither: the unconditional last transition.
    let done = failed(&env, FLAKY, json!({}), None).await;
    let (status, body) = resume(&env, done, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current_step"], "done");

    assert_eq!(
        env.queued_jobs().await,
        6,
        "a start job and a resume job each"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn next_step_is_refused_at_an_end_step_and_when_a_transition_fails_to_evaluate() {
    let env = TestEnv::new().await;
    let node = fake_node(&env).await;

    // In error at `done`, an end step (say its step budget ran out there).
    let at_end = started(&env, FLAKY, json!({})).await;
    run_step(
        &env,
        node,
        at_end,
        Transition::Next {
            route: Default::default(),
            step: "done".to_owned(),
            allow_retry: true,
            timeout_ms: 30_000,
        },
        Some(json!({"status": 200})),
    )
    .await;
    run_step(&env, node, at_end, in_error(), None).await;
    let (status, body) = resume(&env, at_end, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = assert_error(&body, "end_step");
    assert!(message.contains("\"done\""), "names the step: {message}");
    // The current step may still be retried.
    let (status, body) = resume(&env, at_end, &json!({"mode": "current_step"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current_step"], "done");

    let broken = failed(&env, BROKEN, json!({}), None).await;
    let (status, body) = resume(&env, broken, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = assert_error(&body, "transition_error");
    assert!(
        message.contains("vars.missing > 1") && message.contains("\"call\""),
        "names the expression and the step: {message}"
    );
    // `set` fixes what the expression reads.
    let (status, body) = resume(
        &env,
        broken,
        &json!({"mode": "next_step", "set": {"missing": 5}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["current_step"], "done");
    env.cleanup().await;
}

#[tokio::test]
async fn bad_resume_requests_are_refused_before_anything_changes() {
    let env = TestEnv::new().await;
    let id = failed(&env, FLAKY, json!({}), None).await;
    let ready = started(&env, FLAKY, json!({})).await;

    let (status, body) = resume(&env, ready, &json!({"mode": "current_step"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let message = assert_error(&body, "not_in_error");
    assert!(
        message.contains(&ready.to_string()) && message.contains("ready"),
        "names the instance and its state: {message}"
    );

    let unknown = InstanceId::new();
    let (status, body) = resume(&env, unknown, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(assert_error(&body, "not_found").contains(&unknown.to_string()));

    let (status, body) = env
        .post_json("/v1/instances/nope/resume", &json!({"mode": "next_step"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "invalid_id");

    for request in [
        json!({"mode": "sideways"}),
        json!({}),
        json!({"mode": "next_step", "typo": 1}),
    ] {
        let (status, body) = resume(&env, id, &request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {body}");
        let message = assert_error(&body, "invalid_json");
        if request["mode"] == "sideways" {
            assert!(
                message.contains("current_step") && message.contains("next_step"),
                "lists the modes: {message}"
            );
        }
    }
    for request in [
        json!({"mode": "next_step", "set": [1]}),
        json!({"mode": "next_step", "set": "skip=true"}),
    ] {
        let (status, body) = resume(&env, id, &request).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{request}: {body}"
        );
        assert_error(&body, "invalid_request");
    }

    let (_, instance) = env.get(&format!("/v1/instances/{id}")).await;
    assert_eq!(instance["state"], "in_error", "nothing changed: {instance}");
    let (audits,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit")
        .fetch_one(&env.pool)
        .await
        .expect("counts");
    assert_eq!(audits, 0);
    assert_eq!(env.queued_jobs().await, 2, "only the start jobs");
    env.cleanup().await;
}

#[tokio::test]
async fn only_the_deepest_in_error_instance_of_a_call_chain_can_be_resumed() {
    let env = TestEnv::new().await;
    let parent = failed(&env, FLAKY, json!({}), None).await;
    let child = failed(&env, FLAKY, json!({}), None).await;
    let grandchild = failed(&env, FLAKY, json!({}), None).await;
    // The sub-workflow step does not exist yet: link the chain by hand.
    for (id, parent, depth) in [(child, parent, 1), (grandchild, child, 2)] {
        sqlx::query("UPDATE instance SET parent_instance_id = $2, call_depth = $3 WHERE id = $1")
            .bind(id.0)
            .bind(parent.0)
            .bind(depth)
            .execute(&env.pool)
            .await
            .expect("links the chain");
    }

    for id in [parent, child] {
        let (status, body) = resume(&env, id, &json!({"mode": "current_step"})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let message = assert_error(&body, "not_deepest");
        assert!(
            message.contains(&format!("resume child {grandchild} first")),
            "names the deepest failed child: {message}"
        );
    }
    let (status, body) = resume(&env, grandchild, &json!({"mode": "current_step"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Now the child is the deepest in_error instance; the parent still waits for it.
    let (status, body) = resume(&env, parent, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(assert_error(&body, "not_deepest").contains(&child.to_string()));
    let (status, body) = resume(&env, child, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = resume(&env, parent, &json!({"mode": "next_step"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_resume_decided_on_a_stale_read_changes_nothing() {
    let env = TestEnv::new().await;
    let id = failed(&env, FLAKY, json!({}), None).await;
    let store = &env.state.store;
    let instance = store
        .get_instance(id)
        .await
        .expect("reads")
        .expect("exists");
    let request = |fence| Resume {
        route: Default::default(),
        instance: id,
        fence,
        step_seq: instance.step_seq,
        step: "call".to_owned(),
        allow_retry: true,
        timeout_ms: 1_000,
        set: serde_json::Map::new(),
        actor: "ada".to_owned(),
        mode: "current_step".to_owned(),
    };
    assert_eq!(
        store
            .resume(&request(instance.fence.next()))
            .await
            .expect("answers"),
        Resumed::Conflict,
        "a fence that is not the instance's"
    );
    let resumed = store
        .resume(&request(instance.fence))
        .await
        .expect("answers");
    assert!(matches!(resumed, Resumed::Resumed { .. }), "{resumed:?}");
    assert_eq!(
        store
            .resume(&request(instance.fence))
            .await
            .expect("answers"),
        Resumed::Conflict,
        "the same resume twice applies once"
    );
    assert_eq!(
        store
            .resume(&Resume {
                instance: InstanceId::new(),
                ..request(instance.fence)
            },)
            .await
            .expect("answers"),
        Resumed::Unknown
    );
    let (journaled,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM journal WHERE instance_id = $1 AND outcome = 'resumed'",
    )
    .bind(id.0)
    .fetch_one(&env.pool)
    .await
    .expect("counts");
    assert_eq!(journaled, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn the_leader_view_of_a_cluster_that_never_had_a_coordinator_shows_no_holder() {
    let env = TestEnv::new().await;
    let (status, body) = env.get("/v1/leader").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "coordinator");
    assert_eq!(body["holder"], Value::Null, "nobody ever led");
    assert_eq!(body["live"], false);
    env.cleanup().await;
}

#[tokio::test]
async fn nodes_show_their_memory_and_the_leader_view_shows_the_lease() {
    let env = TestEnv::new().await;
    let node = fake_node(&env).await;
    env.state
        .store
        .heartbeat(node, 3, 42 * 1024 * 1024)
        .await
        .expect("heartbeats");
    let (status, body) = env.get("/v1/nodes").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let shown = &body["nodes"][0];
    assert_eq!(shown["id"], json!(node.to_string()));
    assert_eq!(shown["in_flight"], 3);
    assert_eq!(shown["rss_bytes"], 42 * 1024 * 1024);

    let term = env
        .state
        .store
        .acquire_lease(drover_store::COORDINATOR_LEASE, node, 5_000)
        .await
        .expect("acquires")
        .expect("the lease was free");
    let (status, body) = env.get("/v1/leader").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["name", "holder", "term", "expires_at", "live"]);
    assert_eq!(body["holder"], json!(node.to_string()));
    assert_eq!(body["term"], json!(term.0));
    assert_eq!(body["live"], true);
    assert!(body["expires_at"].is_string());

    let (status, doc) = env.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for (path, method) in [("/v1/instances/{id}/resume", "post"), ("/v1/leader", "get")] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is described"
        );
    }
    for schema in ["ResumeRequest", "ResumeMode", "Leader"] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} is described"
        );
    }
    env.cleanup().await;
}
