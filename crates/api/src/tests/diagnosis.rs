//! `GET /v1/instances/{id}/diagnosis`: the cause for each kind of "not running", built with
//! store calls (a fake worker node, the lease taken or not, clocks moved back in SQL).

use axum::http::StatusCode;
use drover_core::{InstanceId, InstanceState, NodeId};
use drover_store::{COORDINATOR_LEASE, Transition};
use serde_json::{Value, json};

use super::lifecycle::{
    campaign, claim, deploy_all, fake_node, one, start, step, stop, wait_for, with_child,
};
use super::{TestEnv, assert_error};

async fn why(env: &TestEnv, id: InstanceId) -> (String, String, Value) {
    let (status, body) = env.get(&format!("/v1/instances/{id}/diagnosis")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let summary = body["summary"].as_str().expect("a summary").to_owned();
    assert!(summary.ends_with('.'), "one sentence: {summary}");
    let cause = body["cause"].as_str().expect("a cause").to_owned();
    for key in ["state", "step", "campaign", "workers", "leader"] {
        assert!(body["details"].get(key).is_some(), "details.{key}: {body}");
    }
    (cause, summary, body["details"].clone())
}

async fn lead(env: &TestEnv, node: NodeId) {
    let term = env
        .state
        .store
        .acquire_lease(COORDINATOR_LEASE, node, 60_000)
        .await
        .expect("acquires");
    assert!(term.is_some(), "the lease was free");
}

async fn sql(env: &TestEnv, statement: &str, id: uuid::Uuid) {
    sqlx::query(statement)
        .bind(id)
        .execute(&env.pool)
        .await
        .expect("updates");
}

#[tokio::test]
async fn a_queued_instance_names_its_place_the_limit_and_the_permit_holders() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "tight", 2).await;
    let ids = start(&env, "steps", "tight", json!({}), 4).await;
    let (cause, summary, details) = why(&env, ids[3]).await;
    assert_eq!(cause, "queued");
    for part in [
        "queued at position 2 of 2",
        "\"tight\"",
        "(2/2 running",
        &ids[0].to_string(),
        &ids[1].to_string(),
    ] {
        assert!(summary.contains(part), "{part:?} in {summary}");
    }
    assert_eq!(details["queue_position"], 2);
    assert_eq!(details["permit_holder_count"], 2);
    assert_eq!(
        details["permit_holders"][0]["id"],
        json!(ids[0].to_string())
    );
    assert_eq!(details["campaign"]["max_running"], 2);
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_instance_names_who_paused_it() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let id = one(&env, "steps").await;
    let (status, body) = env
        .post_json(&format!("/v1/instances/{id}/pause"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "paused");
    assert!(summary.contains("paused by ada since"), "{summary}");
    assert!(
        summary.contains(&format!("drover unpause {id}")),
        "{summary}"
    );
    assert_eq!(details["paused_by"], "ada");
    assert_eq!(details["paused_from"], "ready");
    env.cleanup().await;
}

#[tokio::test]
async fn a_waiting_instance_names_its_timer_event_or_child_unless_no_leader_fires_its_timer() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;

    let timer = one(&env, "steps").await;
    step(
        &env,
        node,
        timer,
        Transition::Wait {
            wake_at_ms: Some(3_600_000),
            event: None,
            child: None,
        },
    )
    .await;
    let (cause, summary, details) = why(&env, timer).await;
    assert_eq!(cause, "waiting_timer");
    assert!(
        summary.contains("waiting for a timer") && summary.contains("(in 59m"),
        "{summary}"
    );
    assert!(details["wake_at"].is_string());

    // Due, with no coordinator: the missing leader is the cause; with one, it is on its way.
    sql(
        &env,
        "UPDATE instance SET wake_at = clock_timestamp() - interval '10 seconds' WHERE id = $1",
        timer.0,
    )
    .await;
    let (cause, summary, _) = why(&env, timer).await;
    assert_eq!(cause, "no_leader", "{summary}");
    assert!(
        summary.contains("no coordinator holds the leader lease"),
        "{summary}"
    );
    lead(&env, node).await;
    let (cause, _, details) = why(&env, timer).await;
    assert_eq!(cause, "timer_due");
    assert_eq!(details["leader"]["live"], true);

    let event = one(&env, "steps").await;
    step(&env, node, event, wait_for("go")).await;
    let (cause, summary, details) = why(&env, event).await;
    assert_eq!(cause, "waiting_event");
    assert!(summary.contains("waiting for event \"go\""), "{summary}");
    assert!(summary.contains("with no timeout"), "{summary}");
    assert!(
        summary.contains(&format!("drover send-event {event} go")),
        "{summary}"
    );
    assert_eq!(details["event"], "go");

    let parent = one(&env, "parent").await;
    let child = with_child(&env, node, parent).await;
    let (cause, summary, details) = why(&env, parent).await;
    assert_eq!(cause, "waiting_child");
    assert!(
        summary.contains(&format!("its child {child} (steps), which is ready")),
        "{summary}"
    );
    assert_eq!(details["child"]["state"], "ready");
    step(&env, node, child, stop(InstanceState::InError)).await;
    let (_, summary, _) = why(&env, parent).await;
    assert!(
        summary.contains("in_error") && summary.contains(&format!("drover resume {child}")),
        "{summary}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_in_error_instance_gives_its_error_and_the_resume_commands() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;
    let id = one(&env, "steps").await;
    step(&env, node, id, stop(InstanceState::InError)).await;
    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "in_error");
    assert!(summary.contains("boom"), "{summary}");
    assert!(
        summary.contains(&format!("`drover resume {id} --current-step`")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("`drover resume {id} --next-step`")),
        "{summary}"
    );
    assert_eq!(
        details["resume_commands"],
        json!([
            format!("drover resume {id} --current-step"),
            format!("drover resume {id} --next-step")
        ])
    );

    // A failed descendant is resumed first.
    let parent = one(&env, "parent").await;
    let child = with_child(&env, node, parent).await;
    step(&env, node, child, stop(InstanceState::InError)).await;
    sql(
        &env,
        "UPDATE instance SET state = 'in_error' WHERE id = $1",
        parent.0,
    )
    .await;
    let (cause, summary, details) = why(&env, parent).await;
    assert_eq!(cause, "failed_descendant");
    assert!(
        summary.contains(&format!("drover resume {child} --current-step")),
        "{summary}"
    );
    assert_eq!(details["failed_descendant"], json!(child.to_string()));
    env.cleanup().await;
}

#[tokio::test]
async fn a_ready_instance_blames_missing_workers_then_a_missing_leader() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let id = one(&env, "steps").await;

    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "no_live_worker");
    assert!(
        summary.contains("no live worker has ever registered"),
        "{summary}"
    );
    assert_eq!(details["workers"]["live"], 0);

    let node = fake_node(&env).await;
    sql(
        &env,
        "UPDATE node SET heartbeat_at = clock_timestamp() - interval '90 seconds' WHERE id = $1",
        node.0,
    )
    .await;
    let (cause, summary, _) = why(&env, id).await;
    assert_eq!(cause, "no_live_worker");
    assert!(
        summary.contains("no live worker has reported for 90 seconds"),
        "{summary}"
    );

    sql(
        &env,
        "UPDATE node SET heartbeat_at = clock_timestamp() WHERE id = $1",
        node.0,
    )
    .await;
    let (cause, summary, _) = why(&env, id).await;
    assert_eq!(cause, "ready", "ready a moment ago: {summary}");
    assert!(summary.contains("one of 1 live workers"), "{summary}");

    sql(
        &env,
        "UPDATE instance SET ready_at = clock_timestamp() - interval '30 seconds' WHERE id = $1",
        id.0,
    )
    .await;
    let (cause, summary, _) = why(&env, id).await;
    assert_eq!(cause, "no_leader");
    assert!(summary.contains("ready for 30s"), "{summary}");
    lead(&env, node).await;
    let (cause, _, _) = why(&env, id).await;
    assert_eq!(cause, "ready");

    sql(
        &env,
        "UPDATE instance SET ready_at = clock_timestamp() + interval '5 minutes' WHERE id = $1",
        id.0,
    )
    .await;
    let (cause, summary, _) = why(&env, id).await;
    assert_eq!(cause, "retry_delay");
    assert!(
        summary.contains("retries step \"work\" (attempt 1)"),
        "{summary}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_running_instance_names_its_node_and_whether_it_is_alive() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;
    let id = one(&env, "steps").await;
    claim(&env, node, id).await;

    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "running");
    assert!(
        summary.contains(&format!("running step \"work\" (attempt 1) on node {node}"))
            && summary.contains("which is alive"),
        "{summary}"
    );
    assert_eq!(details["node"]["id"], json!(node.to_string()));

    let (status, body) = env
        .post_json(&format!("/v1/instances/{id}/stop"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, summary, _) = why(&env, id).await;
    assert!(summary.contains("ada asked it to stop"), "{summary}");

    sql(
        &env,
        "UPDATE node SET heartbeat_at = clock_timestamp() - interval '20 seconds' WHERE id = $1",
        node.0,
    )
    .await;
    let (cause, summary, _) = why(&env, id).await;
    assert_eq!(cause, "node_silent");
    assert!(
        summary.contains("has not reported for 20s") && summary.contains("nobody declares it dead"),
        "{summary}"
    );

    sql(
        &env,
        "UPDATE node SET status = 'dead', died_at = clock_timestamp() WHERE id = $1",
        node.0,
    )
    .await;
    let (cause, summary, _) = why(&env, id).await;
    assert_eq!(cause, "node_dead");
    assert!(summary.contains("declared dead"), "{summary}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_finished_instance_says_how_and_when_and_an_unknown_one_is_404() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;
    let id = one(&env, "steps").await;
    step(&env, node, id, stop(InstanceState::Completed)).await;
    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "finished");
    assert!(summary.contains("has finished: completed at"), "{summary}");
    assert!(
        summary.contains(&format!("drover restart {id}")),
        "{summary}"
    );
    assert!(details["finished_at"].is_string());

    let (status, body) = env
        .get(&format!("/v1/instances/{}/diagnosis", InstanceId::new()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error(&body, "not_found");
    let (status, body) = env.get("/v1/instances/nope/diagnosis").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_ready_instance_no_live_worker_can_run_names_the_queue_and_handler_it_waits_for() {
    let env = TestEnv::new().await;
    let (status, body) = env
        .deploy(
            "name: greeter\nqueue: gpu\nsteps:\n  - id: hi\n    kind: handler\n    handler: greet\n    \
             input: {}\n    next: [{to: sum}]\n  - id: sum\n    kind: assign\n    queue: default\n    \
             set: {}\n    next: [{to: done}]\n  - {id: done, kind: end, status: completed}\n",
        )
        .await;
    assert!(status.is_success(), "deploy failed: {status} {body}");
    let id = one(&env, "greeter").await;
    // A live worker, but of the default queue and with no handlers.
    let node = fake_node(&env).await;

    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "no_capable_worker");
    assert!(
        summary.contains("waiting for a worker serving queue gpu with handler greet (none alive)"),
        "{summary}"
    );
    assert_eq!(
        (&details["queue"], &details["handler"]),
        (&json!("gpu"), &json!("greet"))
    );
    assert_eq!(
        (&details["workers"]["live"], &details["workers"]["capable"]),
        (&json!(1), &json!(0))
    );

    // Serving gpu is not enough without the handler; with it, the instance just waits its
    // turn.
    let serves = |queues: &str, handlers: &str| {
        format!("UPDATE node SET queues = '{queues}', handlers = '{handlers}' WHERE id = $1")
    };
    sql(&env, &serves("{gpu}", "{}"), node.0).await;
    let (cause, _, _) = why(&env, id).await;
    assert_eq!(cause, "no_capable_worker");
    sql(&env, &serves("{gpu}", "{greet}"), node.0).await;
    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "ready", "{summary}");
    assert!(
        summary.contains("one of 1 live workers serving queue gpu"),
        "{summary}"
    );
    assert_eq!(details["workers"]["capable"], 1);

    // The next step is on the default queue, which nobody serves now, and needs no handler.
    let stored = env
        .state
        .store
        .get_definition("greeter", None)
        .await
        .expect("reads")
        .expect("deployed");
    let definition = drover_core::Definition::from_json(&stored.body).expect("valid");
    step(&env, node, id, Transition::next(&definition, "sum")).await;
    let (cause, summary, details) = why(&env, id).await;
    assert_eq!(cause, "no_capable_worker");
    assert!(
        summary.contains("waiting for a worker serving queue default (none alive)"),
        "{summary}"
    );
    assert_eq!(details["handler"], Value::Null);
    env.cleanup().await;
}
