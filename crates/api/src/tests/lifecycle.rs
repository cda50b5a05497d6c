//! Lifecycle commands (`POST /v1/instances/{id}/{pause|unpause|stop|kill|restart}` and the
//! same by filter) against real Postgres and NATS. Instances are moved by store calls, as a
//! worker would: claimed by a registered (fake) node, committed with a transition.

use axum::http::StatusCode;
use chrono::Utc;
use drover_core::{InstanceId, InstanceState, NodeId};
use drover_store::{
    Claimed, Commit, Completion, NewCampaign, NewChild, OnErrorPermit, StepJob, Transition,
};
use serde_json::{Value, json};

use super::{TestEnv, assert_error};

/// `work` runs (as far as the tests say), then waits for `go`; `nap` sleeps.
pub(super) const STEPS: &str = r#"
name: steps
vars:
  n: 0
steps:
  - id: work
    kind: assign
    set:
      n: "vars.n + 1"
    next:
      - to: wait
  - id: wait
    kind: wait_event
    name: go
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#;

/// Starts `child` and waits for it.
pub(super) const PARENT: &str = r#"
name: parent
steps:
  - id: call
    kind: subworkflow
    workflow: steps
    next:
      - to: done
  - id: done
    kind: end
    status: completed
"#;

pub(super) async fn deploy_all(env: &TestEnv) {
    for source in [STEPS, PARENT] {
        let (status, body) = env.deploy(source).await;
        assert!(status.is_success(), "deploy failed: {status} {body}");
    }
}

/// A campaign with a limit.
pub(super) async fn campaign(env: &TestEnv, name: &str, max_running: i32) {
    env.state
        .store
        .create_campaign(&NewCampaign {
            name: name.to_owned(),
            max_running: Some(max_running),
            on_error_permit: OnErrorPermit::Release,
            actor: "test".to_owned(),
        })
        .await
        .expect("creates the campaign");
}

/// Starts `count` instances of `workflow` in `campaign` with `vars`.
pub(super) async fn start(
    env: &TestEnv,
    workflow: &str,
    campaign: &str,
    vars: Value,
    count: u32,
) -> Vec<InstanceId> {
    let (status, body) = env
        .post_json(
            "/v1/instances",
            &json!({ "workflow": workflow, "campaign": campaign, "vars": vars, "count": count }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_str().and_then(|id| id.parse().ok()).expect("an id"))
        .collect()
}

pub(super) async fn one(env: &TestEnv, workflow: &str) -> InstanceId {
    start(env, workflow, "default", json!({}), 1).await[0]
}

pub(super) async fn fake_node(env: &TestEnv) -> NodeId {
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

pub(super) async fn instance(env: &TestEnv, id: InstanceId) -> drover_store::Instance {
    env.state
        .store
        .get_instance(id)
        .await
        .expect("reads")
        .expect("exists")
}

/// Claims `id` at its checkpoint as `node`: it is RUNNING afterwards.
pub(super) async fn claim(env: &TestEnv, node: NodeId, id: InstanceId) -> Claimed {
    let i = instance(env, id).await;
    let mut claimed = env
        .state
        .store
        .claim(
            node,
            &[StepJob {
                route: Default::default(),
                instance: id,
                step_seq: i.step_seq,
                fence: i.fence,
            }],
        )
        .await
        .expect("claims");
    assert_eq!(claimed.len(), 1, "{id} ({}) did not claim", i.state);
    claimed.remove(0)
}

/// Commits `transition` for a claim, as its worker would; answers what the commit did.
pub(super) async fn commit(
    env: &TestEnv,
    node: NodeId,
    claimed: &Claimed,
    transition: Transition,
) -> Commit {
    let error = matches!(
        transition,
        Transition::Stop {
            state: InstanceState::InError | InstanceState::Failed
        }
    )
    .then(|| "boom".to_owned());
    let commits = env
        .state
        .store
        .commit(
            node,
            &[Completion {
                vars: Some(json!({ "n": 41 })),
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
    commits[0]
}

/// Claims and commits `transition`.
pub(super) async fn step(env: &TestEnv, node: NodeId, id: InstanceId, transition: Transition) {
    let claimed = claim(env, node, id).await;
    assert_eq!(
        commit(env, node, &claimed, transition).await,
        Commit::Committed
    );
}

pub(super) fn wait_for(event: &str) -> Transition {
    Transition::Wait {
        wake_at_ms: None,
        event: Some(event.to_owned()),
        child: None,
    }
}

pub(super) fn stop(state: InstanceState) -> Transition {
    Transition::Stop { state }
}

/// Parks `parent` (an instance of PARENT) WAITING for a new child of `steps`; answers the child.
pub(super) async fn with_child(env: &TestEnv, node: NodeId, parent: InstanceId) -> InstanceId {
    let child = InstanceId::new();
    step(
        env,
        node,
        parent,
        Transition::Wait {
            wake_at_ms: None,
            event: None,
            child: Some(Box::new(NewChild {
                route: Default::default(),
                id: child,
                workflow: "steps".to_owned(),
                version: 1,
                entry_step: "work".to_owned(),
                allow_retry: true,
                timeout_ms: 30_000,
                vars: json!({ "n": 0 }),
            })),
        },
    )
    .await;
    child
}

/// Sends `command` as the test's token, `ada`.
async fn act(env: &TestEnv, id: InstanceId, command: &str) -> (StatusCode, Value) {
    env.post_json(&format!("/v1/instances/{id}/{command}"), &json!({}))
        .await
}

/// Acts and expects 200; answers the body.
async fn ok(env: &TestEnv, id: InstanceId, command: &str) -> Value {
    let (status, body) = act(env, id, command).await;
    assert_eq!(status, StatusCode::OK, "{command} {id}: {body}");
    body
}

/// Acts and expects a 409 with `code`; answers the message.
async fn conflict(env: &TestEnv, id: InstanceId, command: &str, code: &str) -> String {
    let (status, body) = act(env, id, command).await;
    assert_eq!(status, StatusCode::CONFLICT, "{command} {id}: {body}");
    assert_error(&body, code)
}

async fn journal(env: &TestEnv, id: InstanceId) -> Vec<(i64, String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT step_seq, outcome, coalesce(transition, ''), actor FROM journal
         WHERE instance_id = $1 ORDER BY step_seq",
    )
    .bind(id.0)
    .fetch_all(&env.pool)
    .await
    .expect("reads the journal")
}

async fn audit(env: &TestEnv, id: InstanceId) -> Vec<(String, String, Value)> {
    sqlx::query_as("SELECT actor, action, details FROM audit WHERE target = $1 ORDER BY id")
        .bind(id.to_string())
        .fetch_all(&env.pool)
        .await
        .expect("reads the audit trail")
}

/// The kinds of the events of `id`, in sequence order (numbered without gaps).
async fn events(env: &TestEnv, id: InstanceId) -> Vec<String> {
    let facts = env
        .state
        .store
        .instance_facts(id)
        .await
        .expect("reads the outbox");
    let seqs: Vec<i64> = facts.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, (1..=facts.len() as i64).collect::<Vec<_>>(), "{id}");
    facts.iter().map(|f| f.kind.as_str().to_owned()).collect()
}

/// `(running, queued)` of a campaign, and its permit holders.
async fn permits(env: &TestEnv, campaign: &str) -> (i32, i32, Vec<InstanceId>) {
    let c = env
        .state
        .store
        .campaign_by_name(campaign)
        .await
        .expect("reads")
        .expect("exists");
    let holders: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT id FROM instance WHERE campaign_id = $1 AND holds_permit ORDER BY id",
    )
    .bind(c.id.0)
    .fetch_all(&env.pool)
    .await
    .expect("reads the holders");
    (
        c.running,
        c.queued,
        holders.into_iter().map(|(id,)| InstanceId(id)).collect(),
    )
}

async fn flags(env: &TestEnv, id: InstanceId) -> (Option<String>, Option<String>) {
    sqlx::query_as("SELECT pause_requested_by, stop_requested_by FROM instance WHERE id = $1")
        .bind(id.0)
        .fetch_one(&env.pool)
        .await
        .expect("reads the flags")
}

#[tokio::test]
async fn pausing_a_ready_instance_fences_its_job_and_unpausing_dispatches_a_new_one() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let id = one(&env, "steps").await;
    let before = instance(&env, id).await;
    assert_eq!(env.queued_jobs().await, 1, "the start's job");

    let body = ok(&env, id, "pause").await;
    assert_eq!(body["outcome"], "paused", "{body}");
    assert_eq!(body["changed"], true);
    assert_eq!(body["state"], "paused");
    assert_eq!(body["instance"]["state"], "paused");
    let paused = instance(&env, id).await;
    assert_eq!(paused.fence, before.fence.next(), "fenced");
    assert_eq!(paused.step_seq, before.step_seq.next(), "a new checkpoint");

    // The job published at start no longer claims.
    let node = fake_node(&env).await;
    let stale = env
        .state
        .store
        .claim(
            node,
            &[StepJob {
                route: Default::default(),
                instance: id,
                step_seq: before.step_seq,
                fence: before.fence,
            }],
        )
        .await
        .expect("claims");
    assert!(stale.is_empty(), "the old job is stale");

    // Pausing again does nothing, successfully.
    let body = ok(&env, id, "pause").await;
    assert_eq!(
        (&body["outcome"], &body["changed"]),
        (&json!("unchanged"), &json!(false))
    );
    assert_eq!(instance(&env, id).await.step_seq, paused.step_seq);

    let body = ok(&env, id, "unpause").await;
    assert_eq!(body["outcome"], "unpaused", "{body}");
    assert_eq!(body["state"], "ready");
    assert_eq!(env.queued_jobs().await, 2, "the unpause published a job");
    let ready = instance(&env, id).await;
    assert_eq!(ready.step_seq, paused.step_seq.next());
    assert_eq!(ready.fence, paused.fence, "nothing to fence off");
    claim(&env, node, id).await;

    let message = conflict(&env, id, "unpause", "running").await;
    assert!(message.contains("no pause is requested"), "{message}");

    assert_eq!(
        journal(&env, id).await,
        vec![
            (
                0,
                "started".to_owned(),
                "ready".to_owned(),
                Some("ada".to_owned())
            ),
            (
                1,
                "paused".to_owned(),
                "paused".to_owned(),
                Some("ada".to_owned())
            ),
            (
                2,
                "unpaused".to_owned(),
                "ready".to_owned(),
                Some("ada".to_owned())
            ),
        ],
        "no-ops and refusals write nothing"
    );
    let audit = audit(&env, id).await;
    let actions: Vec<(&str, &str, &Value)> = audit
        .iter()
        .map(|(actor, action, details)| (actor.as_str(), action.as_str(), &details["outcome"]))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("ada", "pause", &json!("paused")),
            ("ada", "unpause", &json!("unpaused")),
        ]
    );
    assert_eq!(audit[0].2["from"], "ready");
    assert_eq!(audit[0].2["fence"], json!(paused.fence.0));
    assert_eq!(events(&env, id).await, ["started", "paused", "unpaused"]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_running_instance_is_asked_to_pause_or_stop_and_a_kill_fences_its_commit() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let id = one(&env, "steps").await;
    let node = fake_node(&env).await;
    let claimed = claim(&env, node, id).await;
    let seq = claimed.step_seq;

    let body = ok(&env, id, "pause").await;
    assert_eq!(body["outcome"], "pause_requested", "{body}");
    assert_eq!(body["state"], "running");
    assert_eq!(flags(&env, id).await, (Some("ada".to_owned()), None));
    let body = ok(&env, id, "pause").await;
    assert_eq!(body["outcome"], "unchanged", "already requested: {body}");

    // Unpause withdraws the request; then there is nothing left to unpause.
    let body = ok(&env, id, "unpause").await;
    assert_eq!(body["outcome"], "pause_withdrawn", "{body}");
    assert_eq!(flags(&env, id).await, (None, None));
    conflict(&env, id, "unpause", "running").await;

    let body = ok(&env, id, "stop").await;
    assert_eq!(body["outcome"], "stop_requested", "{body}");
    assert_eq!(flags(&env, id).await, (None, Some("ada".to_owned())));
    let body = ok(&env, id, "stop").await;
    assert_eq!(body["outcome"], "unchanged", "{body}");
    let message = conflict(&env, id, "pause", "stopping").await;
    assert!(message.contains("drover kill"), "{message}");

    // Requests take no checkpoint (the running step's commit would collide with one).
    let running = instance(&env, id).await;
    assert_eq!(running.state, InstanceState::Running);
    assert_eq!(running.step_seq, seq);
    assert_eq!(journal(&env, id).await.len(), 1);

    let body = ok(&env, id, "kill").await;
    assert_eq!(body["outcome"], "killed", "{body}");
    assert_eq!(body["state"], "stopped");
    let killed = instance(&env, id).await;
    assert_eq!(killed.state, InstanceState::Stopped);
    assert_eq!(killed.fence, claimed.fence.next(), "fenced at once");
    assert_eq!(killed.owner_node, None);
    assert!(killed.finished_at.is_some());
    let last = journal(&env, id).await.pop().expect("a journal row");
    assert_eq!(
        last,
        (
            seq.0 + 1,
            "killed".to_owned(),
            "stopped".to_owned(),
            Some("ada".to_owned())
        )
    );
    let node_id: (Option<uuid::Uuid>,) =
        sqlx::query_as("SELECT node_id FROM journal WHERE instance_id = $1 AND step_seq = $2")
            .bind(id.0)
            .bind(seq.0 + 1)
            .fetch_one(&env.pool)
            .await
            .expect("reads");
    assert_eq!(
        node_id.0,
        Some(node.0),
        "the journal names the node it ran on"
    );

    // The step finishes on its node anyway: its commit lands nowhere.
    assert_ne!(
        commit(&env, node, &claimed, stop(InstanceState::Completed)).await,
        Commit::Committed
    );
    assert_eq!(instance(&env, id).await.state, InstanceState::Stopped);

    let body = ok(&env, id, "kill").await;
    assert_eq!(body["outcome"], "unchanged", "{body}");
    let body = ok(&env, id, "stop").await;
    assert_eq!(body["outcome"], "unchanged", "{body}");
    for command in ["pause", "unpause"] {
        let message = conflict(&env, id, command, "finished").await;
        assert!(message.contains("stopped"), "{message}");
    }
    let actions: Vec<String> = audit(&env, id)
        .await
        .into_iter()
        .map(|a| a.2["outcome"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        actions,
        [
            "pause_requested",
            "pause_withdrawn",
            "stop_requested",
            "killed"
        ]
    );
    assert_eq!(
        events(&env, id).await,
        [
            "started",
            "pause_requested",
            "unpaused",
            "stop_requested",
            "stopped"
        ]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn in_error_and_finished_instances_refuse_what_their_state_does_not_allow() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;

    let failed = one(&env, "steps").await;
    step(&env, node, failed, stop(InstanceState::InError)).await;
    for command in ["pause", "unpause"] {
        let message = conflict(&env, failed, command, "in_error").await;
        assert!(message.contains("drover resume"), "{message}");
    }
    conflict(&env, failed, "restart", "not_finished").await;
    let body = ok(&env, failed, "stop").await;
    assert_eq!(
        body["outcome"], "stopped",
        "an in_error instance stops at once: {body}"
    );
    assert_eq!(body["state"], "stopped");
    let last = journal(&env, failed).await.pop().expect("a row");
    assert_eq!((last.1.as_str(), last.2.as_str()), ("stopped", "stopped"));

    let done = one(&env, "steps").await;
    step(&env, node, done, stop(InstanceState::Completed)).await;
    for command in ["pause", "unpause", "stop", "kill"] {
        let message = conflict(&env, done, command, "finished").await;
        assert!(
            message.contains("completed") && message.contains("restart"),
            "{message}"
        );
    }
    assert_eq!(journal(&env, done).await.len(), 2, "refusals write nothing");
    assert!(audit(&env, done).await.is_empty());

    let unknown = InstanceId::new();
    for command in ["pause", "unpause", "stop", "kill", "restart"] {
        let (status, body) = act(&env, unknown, command).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_error(&body, "not_found");
    }
    let (status, body) = env.post_json("/v1/instances/nope/pause", &json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_error(&body, "invalid_id");
    let (status, body) = env
        .post_json(
            &format!("/v1/instances/{done}/kill"),
            &json!({ "actor": "mallory" }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the actor is the token's name; a body cannot claim one: {body}"
    );
    let (status, body) = env
        .post_json(
            &format!("/v1/instances/{done}/kill"),
            &json!({ "who": "x" }),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused: {body}"
    );

    // No body at all: the actor is still the token's name.
    let ready = one(&env, "steps").await;
    let (status, body) = env
        .call(
            axum::http::Method::POST,
            &format!("/v1/instances/{ready}/pause"),
            None,
            axum::body::Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(audit(&env, ready).await[0].0, "ada");
    env.cleanup().await;
}

async fn queue_seq(env: &TestEnv, id: InstanceId) -> Option<i64> {
    let (seq,): (Option<i64>,) = sqlx::query_as("SELECT queue_seq FROM instance WHERE id = $1")
        .bind(id.0)
        .fetch_one(&env.pool)
        .await
        .expect("reads");
    seq
}

#[tokio::test]
async fn killing_the_running_instance_of_a_full_campaign_admits_the_queued_one() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "one-at-a-time", 1).await;
    let ids = start(&env, "steps", "one-at-a-time", json!({}), 2).await;
    let (a, b) = (ids[0], ids[1]);
    assert_eq!(instance(&env, b).await.state, InstanceState::Queued);
    assert_eq!(permits(&env, "one-at-a-time").await, (1, 1, vec![a]));
    let node = fake_node(&env).await;
    claim(&env, node, a).await;
    let jobs = env.queued_jobs().await;

    let body = ok(&env, a, "kill").await;
    assert_eq!(body["outcome"], "killed", "{body}");
    assert_eq!(body["admitted"], json!([b.to_string()]), "{body}");
    assert_eq!(instance(&env, b).await.state, InstanceState::Ready);
    assert_eq!(permits(&env, "one-at-a-time").await, (1, 0, vec![b]));
    assert_eq!(env.queued_jobs().await, jobs + 1, "the admitted one's job");
    assert_eq!(
        events(&env, a).await,
        ["started", "stopped", "permit_released"],
        "the kill is announced with the permit it gave back"
    );
    assert!(events(&env, b).await.contains(&"admitted".to_owned()));

    // A paused instance keeps its permit: the campaign stays full.
    let body = ok(&env, b, "pause").await;
    assert_eq!(body["outcome"], "paused", "{body}");
    assert_eq!(permits(&env, "one-at-a-time").await, (1, 0, vec![b]));
    let c = start(&env, "steps", "one-at-a-time", json!({}), 1).await[0];
    assert_eq!(instance(&env, c).await.state, InstanceState::Queued);
    let body = ok(&env, b, "unpause").await;
    assert_eq!(
        body["state"], "ready",
        "it has its permit: no queueing: {body}"
    );

    // A graceful stop of a READY instance is at once, and passes its permit on.
    let body = ok(&env, b, "stop").await;
    assert_eq!(body["outcome"], "stopped", "{body}");
    assert_eq!(body["admitted"], json!([c.to_string()]));
    assert_eq!(permits(&env, "one-at-a-time").await, (1, 0, vec![c]));

    // Killing a QUEUED instance takes it out of the queue.
    let d = start(&env, "steps", "one-at-a-time", json!({}), 1).await[0];
    assert_eq!(permits(&env, "one-at-a-time").await, (1, 1, vec![c]));
    let body = ok(&env, d, "kill").await;
    assert_eq!(body["admitted"], json!([]), "{body}");
    assert_eq!(permits(&env, "one-at-a-time").await, (1, 0, vec![c]));
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_queued_instance_leaves_the_queue_and_rejoins_at_its_back() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "narrow", 1).await;
    let ids = start(&env, "steps", "narrow", json!({}), 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);

    let body = ok(&env, b, "pause").await;
    assert_eq!(body["outcome"], "paused", "{body}");
    assert_eq!(
        permits(&env, "narrow").await,
        (1, 1, vec![a]),
        "b left the queue"
    );
    assert_eq!(instance(&env, c).await.queue_position, Some(1));

    let body = ok(&env, b, "unpause").await;
    assert_eq!(body["state"], "queued", "the campaign is full: {body}");
    assert_eq!(permits(&env, "narrow").await, (1, 2, vec![a]));
    assert!(
        queue_seq(&env, b).await > queue_seq(&env, c).await,
        "at the back"
    );
    assert_eq!(instance(&env, b).await.queue_position, Some(2));
    let announced = events(&env, b).await;
    assert!(
        announced.contains(&"unpaused".to_owned()) && announced.contains(&"queued".to_owned()),
        "{announced:?}"
    );

    let body = ok(&env, a, "kill").await;
    assert_eq!(
        body["admitted"],
        json!([c.to_string()]),
        "FIFO: c first: {body}"
    );
    let body = ok(&env, c, "kill").await;
    assert_eq!(body["admitted"], json!([b.to_string()]), "{body}");

    // With a permit free and nobody queued, an unpaused instance is admitted at once.
    let body = ok(&env, b, "kill").await;
    assert_eq!(body["admitted"], json!([]));
    let e = start(&env, "steps", "narrow", json!({}), 2).await;
    ok(&env, e[1], "pause").await;
    ok(&env, e[0], "kill").await;
    let body = ok(&env, e[1], "unpause").await;
    assert_eq!(body["state"], "ready", "{body}");
    assert_eq!(permits(&env, "narrow").await, (1, 0, vec![e[1]]));
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_waiting_instance_waits_again_unless_what_it_waited_for_came() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let node = fake_node(&env).await;

    // An event: none came, so it waits again; one came while paused, so it runs.
    let id = one(&env, "steps").await;
    step(&env, node, id, wait_for("go")).await;
    let body = ok(&env, id, "pause").await;
    assert_eq!(body["outcome"], "paused", "{body}");
    let body = ok(&env, id, "unpause").await;
    assert_eq!(body["state"], "waiting", "{body}");
    assert_eq!(body["instance"]["waiting_for"]["event"], "go");
    ok(&env, id, "pause").await;
    let (status, body) = env
        .post_json(
            &format!("/v1/instances/{id}/events/go"),
            &json!({ "ok": true }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["delivered"], "kept",
        "a paused instance is not woken: {body}"
    );
    assert_eq!(instance(&env, id).await.state, InstanceState::Paused);
    let jobs = env.queued_jobs().await;
    let body = ok(&env, id, "unpause").await;
    assert_eq!(body["state"], "ready", "{body}");
    assert_eq!(env.queued_jobs().await, jobs + 1);
    let outcomes: Vec<String> = journal(&env, id)
        .await
        .into_iter()
        .map(|j| format!("{}:{}", j.1, j.2))
        .collect();
    assert_eq!(
        outcomes,
        [
            "started:ready",
            "completed:waiting",
            "paused:paused",
            "unpaused:waiting",
            "paused:paused",
            "unpaused:ready"
        ]
    );

    // A timer: not due yet, so it waits again with the same wake time; due, so it runs.
    let id = one(&env, "steps").await;
    step(
        &env,
        node,
        id,
        Transition::Wait {
            wake_at_ms: Some(3_600_000),
            event: None,
            child: None,
        },
    )
    .await;
    let wake_at = instance(&env, id).await.wake_at;
    assert!(wake_at.is_some());
    ok(&env, id, "pause").await;
    let body = ok(&env, id, "unpause").await;
    assert_eq!(body["state"], "waiting", "{body}");
    assert_eq!(instance(&env, id).await.wake_at, wake_at, "the same timer");
    ok(&env, id, "pause").await;
    sqlx::query(
        "UPDATE instance SET wake_at = clock_timestamp() - interval '1 second' WHERE id = $1",
    )
    .bind(id.0)
    .execute(&env.pool)
    .await
    .expect("moves the timer back");
    let body = ok(&env, id, "unpause").await;
    assert_eq!(
        body["state"], "ready",
        "its timer passed while it was paused: {body}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn stopping_a_child_wakes_its_parent_and_stopping_a_parent_stops_its_children() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "family", 5).await;
    let node = fake_node(&env).await;
    let parents = start(&env, "parent", "family", json!({}), 4).await;

    // A stopped child wakes its WAITING parent, as a child's terminal commit does.
    let child = with_child(&env, node, parents[0]).await;
    let body = ok(&env, child, "stop").await;
    assert_eq!(body["outcome"], "stopped", "{body}");
    assert_eq!(
        body["cascaded"],
        json!([{ "id": parents[0].to_string(), "outcome": "woken", "state": "ready" }])
    );
    let parent = instance(&env, parents[0]).await;
    assert_eq!(parent.state, InstanceState::Ready);
    let (pending,): (i32,) = sqlx::query_as("SELECT pending_children FROM instance WHERE id = $1")
        .bind(parents[0].0)
        .fetch_one(&env.pool)
        .await
        .expect("reads");
    assert_eq!(pending, 0);
    let woken = journal(&env, parents[0]).await.pop().expect("a row");
    assert_eq!(
        (woken.1.as_str(), woken.2.as_str(), woken.3),
        ("woken", "ready", Some(format!("child:{child}")))
    );
    assert!(
        events(&env, parents[0])
            .await
            .ends_with(&["woken".to_owned()])
    );

    // A kill of a parent kills its running child: fenced too.
    let child = with_child(&env, node, parents[1]).await;
    let claimed = claim(&env, node, child).await;
    let body = ok(&env, parents[1], "kill").await;
    assert_eq!(
        body["cascaded"],
        json!([{ "id": child.to_string(), "outcome": "killed", "state": "stopped" }]),
        "{body}"
    );
    assert_eq!(instance(&env, child).await.fence, claimed.fence.next());
    assert_ne!(
        commit(&env, node, &claimed, stop(InstanceState::Completed)).await,
        Commit::Committed
    );

    // A graceful stop of a parent asks its running child to stop.
    let child = with_child(&env, node, parents[2]).await;
    claim(&env, node, child).await;
    let body = ok(&env, parents[2], "stop").await;
    assert_eq!(
        body["outcome"], "stopped",
        "a WAITING parent stops at once: {body}"
    );
    assert_eq!(
        body["cascaded"],
        json!([{ "id": child.to_string(), "outcome": "stop_requested", "state": "running" }])
    );
    assert_eq!(flags(&env, child).await.1, Some("ada".to_owned()));

    // A paused parent whose child is killed meanwhile runs on when unpaused.
    let child = with_child(&env, node, parents[3]).await;
    ok(&env, parents[3], "pause").await;
    let body = ok(&env, child, "kill").await;
    assert_eq!(
        body["cascaded"],
        json!([]),
        "a paused parent is not woken: {body}"
    );
    assert_eq!(
        instance(&env, parents[3]).await.state,
        InstanceState::Paused
    );
    let body = ok(&env, parents[3], "unpause").await;
    assert_eq!(body["state"], "ready", "its child has ended: {body}");

    assert_eq!(
        permits(&env, "family").await,
        (2, 0, vec![parents[0], parents[3]]),
        "the stopped parents gave their permits back"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_restart_starts_a_new_instance_with_the_initial_variables_once() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "solo", 1).await;
    let node = fake_node(&env).await;
    let old = start(&env, "steps", "solo", json!({ "n": 5 }), 1).await[0];
    step(&env, node, old, stop(InstanceState::Completed)).await;
    assert_eq!(instance(&env, old).await.vars, json!({ "n": 41 }));

    let jobs = env.queued_jobs().await;
    let body = ok(&env, old, "restart").await;
    assert_eq!(body["outcome"], "restarted", "{body}");
    assert_eq!(body["changed"], true);
    let new: InstanceId = body["restarted_as"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("the new instance");
    assert_eq!(body["instance"]["id"], json!(new.to_string()));
    assert_eq!(body["state"], "ready");
    let restarted = instance(&env, new).await;
    assert_eq!(restarted.vars, json!({ "n": 5 }), "the initial variables");
    assert_eq!(
        (restarted.workflow.as_str(), restarted.version),
        ("steps", 1)
    );
    assert_eq!(restarted.campaign, "solo");
    assert_eq!(restarted.current_step, "work");
    assert!(restarted.holds_permit, "admitted like any start");
    assert_eq!(env.queued_jobs().await, jobs + 1);
    assert_eq!(
        journal(&env, new).await,
        vec![(
            0,
            "started".to_owned(),
            "ready".to_owned(),
            Some("ada".to_owned())
        )]
    );
    assert_eq!(audit(&env, old).await[0].1, "restart");
    assert_eq!(
        audit(&env, old).await[0].2["related"],
        json!(new.to_string())
    );
    assert!(events(&env, old).await.ends_with(&["restarted".to_owned()]));
    assert_eq!(events(&env, new).await, ["started"]);

    let body = ok(&env, old, "restart").await;
    assert_eq!(body["outcome"], "unchanged", "{body}");
    assert_eq!(
        body["restarted_as"],
        json!(new.to_string()),
        "the first restart"
    );

    // The campaign is full: a restart queues.
    let queued = start(&env, "steps", "solo", json!({}), 1).await[0];
    let message = conflict(&env, queued, "restart", "not_finished").await;
    assert!(message.contains("queued"), "{message}");
    ok(&env, queued, "kill").await;
    let body = ok(&env, queued, "restart").await;
    assert_eq!(body["state"], "queued", "{body}");

    // A child is its parent's business.
    let parent = one(&env, "parent").await;
    let child = with_child(&env, node, parent).await;
    ok(&env, child, "kill").await;
    let message = conflict(&env, child, "restart", "child_instance").await;
    assert!(message.contains(&parent.to_string()), "{message}");
    env.cleanup().await;
}

#[tokio::test]
async fn commands_by_filter_apply_to_each_matching_instance_and_count_what_they_did() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    campaign(&env, "batch", 10).await;
    let ids = start(&env, "steps", "batch", json!({}), 3).await;
    let other = one(&env, "steps").await;
    let node = fake_node(&env).await;

    let (status, body) = env
        .post_json("/v1/instances/pause", &json!({ "campaign": "batch" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            &body["matched"],
            &body["changed"],
            &body["unchanged"],
            &body["refused"]
        ),
        (&json!(3), &json!(3), &json!(0), &json!(0)),
        "{body}"
    );
    assert_eq!(body["outcomes"], json!({ "paused": 3 }));
    assert_eq!(
        instance(&env, other).await.state,
        InstanceState::Ready,
        "another campaign"
    );

    let (status, body) = env
        .post_json(
            "/v1/instances/unpause",
            &json!({ "campaign": "batch", "state": "paused" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcomes"], json!({ "unpaused": 3 }), "{body}");
    let (_, body) = env
        .post_json("/v1/instances/unpause", &json!({ "campaign": "batch" }))
        .await;
    assert_eq!(body["matched"], 0, "nothing paused is left: {body}");

    claim(&env, node, ids[0]).await;
    let (_, body) = env
        .post_json("/v1/instances/pause", &json!({ "campaign": "batch" }))
        .await;
    assert_eq!(
        body["outcomes"],
        json!({ "paused": 2, "pause_requested": 1 }),
        "{body}"
    );
    let (_, body) = env
        .post_json("/v1/instances/pause", &json!({ "campaign": "batch" }))
        .await;
    assert_eq!(
        body["outcomes"],
        json!({ "unchanged": 3 }),
        "idempotent: {body}"
    );

    let (_, body) = env
        .post_json(
            "/v1/instances/kill",
            &json!({ "workflow": "steps", "campaign": "batch" }),
        )
        .await;
    assert_eq!(body["outcomes"], json!({ "killed": 3 }), "{body}");
    assert_eq!(permits(&env, "batch").await, (0, 0, vec![]));

    // Without a state, restart takes the finished ones; with one, exactly that state, and
    // what the command cannot do is counted and explained.
    let (_, body) = env
        .post_json("/v1/instances/restart", &json!({ "campaign": "batch" }))
        .await;
    assert_eq!(body["outcomes"], json!({ "restarted": 3 }), "{body}");
    assert_eq!(body["started"].as_array().map(Vec::len), Some(3));
    let (_, body) = env
        .post_json(
            "/v1/instances/stop",
            &json!({ "campaign": "batch", "state": "stopped" }),
        )
        .await;
    assert_eq!(body["outcomes"], json!({ "unchanged": 3 }), "{body}");
    let (_, body) = env
        .post_json(
            "/v1/instances/pause",
            &json!({ "campaign": "batch", "state": "stopped" }),
        )
        .await;
    assert_eq!(
        (&body["matched"], &body["refused"]),
        (&json!(3), &json!(3)),
        "{body}"
    );
    let refusals = body["refusals"].as_array().expect("refusals");
    assert_eq!(refusals.len(), 3);
    assert_eq!(refusals[0]["code"], "finished");
    assert!(
        refusals[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped"))
    );

    let (status, body) = env.post_json("/v1/instances/kill", &json!({})).await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no filter: {body}"
    );
    let (status, body) = env
        .post_json("/v1/instances/kill", &json!({ "campaign": "nope" }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error(&body, "unknown_campaign");
    let (status, body) = env
        .post_json("/v1/instances/kill", &json!({ "state": "sleepy" }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        instance(&env, other).await.state,
        InstanceState::Ready,
        "untouched"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_bulk_command_runs_as_an_operation_whose_progress_and_result_can_be_read() {
    let env = TestEnv::new().await;
    deploy_all(&env).await;
    let (status, body) = env
        .post_json("/v1/instances", &json!({"workflow": "steps", "count": 450}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let (status, started) = env
        .post_json(
            "/v1/operations",
            &json!({"command": "pause", "campaign": "default"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    assert_eq!(started["command"], "pause");
    assert_eq!(started["actor"], "ada");
    let id = started["id"].as_str().expect("an operation id").to_owned();
    let done = super::operations::ended(&env, &env.router, &id).await;
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["progress"]["matched"], 450, "{done}");
    assert_eq!(done["progress"]["changed"], 450, "{done}");
    assert!(done["finished_at"].is_string(), "{done}");
    let (_, listed) = env.get("/v1/instances?state=paused&limit=1000").await;
    assert_eq!(listed["instances"].as_array().map(Vec::len), Some(450));

    // Cancelled, it stops between batches: what it did stays done, and is counted.
    let (_, started) = env
        .post_json(
            "/v1/operations",
            &json!({"command": "unpause", "state": "paused"}),
        )
        .await;
    let id = started["id"].as_str().expect("an operation id").to_owned();
    let (status, body) = env
        .post_json(&format!("/v1/operations/{id}/cancel"), &json!(null))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let done = super::operations::ended(&env, &env.router, &id).await;
    let unpaused = done["progress"]["changed"].as_u64().unwrap_or(u64::MAX);
    let (_, listed) = env.get("/v1/instances?state=paused&limit=1000").await;
    let still_paused = listed["instances"].as_array().map_or(0, Vec::len) as u64;
    assert_eq!(unpaused + still_paused, 450, "{done}");
    assert!(
        done["state"] == "cancelled" || done["state"] == "completed",
        "{done}"
    );

    // Bad requests are refused before anything runs.
    let (status, body) = env
        .post_json(
            "/v1/operations",
            &json!({"command": "explode", "state": "paused"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = env
        .post_json("/v1/operations", &json!({"command": "kill"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = env
        .post_json(
            "/v1/operations",
            &json!({"command": "kill", "campaign": "nope"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_error(&body, "unknown_campaign");
    let (status, body) = env
        .get(&format!("/v1/operations/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    env.cleanup().await;
}
