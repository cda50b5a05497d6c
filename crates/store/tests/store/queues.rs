//! Worker queues on real Postgres: the current step's route is kept on the instance row and
//! handed back with every job; only a node advertising a step's handler claims it, and a node
//! continues only steps it serves.

use drover_core::{InstanceId, InstanceState, NodeId, Queue, Route, StepSeq};
use drover_store::{Claimed, Commit, NewChild, NewInstance, NewNode, StepJob, Store, Transition};
use serde_json::json;
use sqlx::PgPool;

use crate::support::*;

fn gpu() -> Queue {
    "gpu".parse().expect("a slug")
}

fn route(queue: Queue, handler: Option<&str>) -> Route {
    Route {
        queue,
        handler: handler.map(str::to_owned),
    }
}

fn next(step: &str, route: Route) -> Transition {
    Transition::Next {
        step: step.to_owned(),
        allow_retry: true,
        timeout_ms: 30_000,
        route,
    }
}

/// Registers a live worker node serving `queues` with `handlers`.
async fn worker(store: &Store, queues: Vec<Queue>, handlers: &[&str]) -> NodeId {
    let id = NodeId::new();
    let node = NewNode {
        queues,
        handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
        ..NewNode::new(id, &["worker".to_owned()], "test", "0")
    };
    store.register_node(&node).await.expect("register");
    id
}

/// Starts an instance of `parent` whose entry step has `route`; returns its id and its job.
async fn start_on(store: &Store, route: Route) -> (InstanceId, StepJob) {
    let campaign = store
        .campaign_by_name("default")
        .await
        .expect("campaign")
        .expect("the default campaign exists");
    let id = InstanceId::new();
    let created = store
        .create_instances(
            &[NewInstance {
                id,
                campaign: campaign.id,
                workflow: "parent".to_owned(),
                version: 1,
                entry_step: "a".to_owned(),
                allow_retry: true,
                timeout_ms: 30_000,
                route,
                vars: json!({}),
                announce_end: false,
            }],
            "test",
        )
        .await
        .expect("create");
    let [job] = created.ready.as_slice() else {
        panic!("one READY job: {created:?}");
    };
    (id, job.clone())
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_handler_step_is_claimed_only_by_a_node_advertising_its_handler(pool: PgPool) {
    let (store, plain) = setup(pool).await;
    let greet = route(gpu(), Some("greet"));
    let (id, job) = start_on(&store, greet.clone()).await;
    assert_eq!(job.route, greet, "the job carries the entry step's route");

    let unable = worker(&store, vec![gpu()], &["other"]).await;
    for node in [plain, unable] {
        let claimed = store
            .claim(node, std::slice::from_ref(&job))
            .await
            .expect("claim");
        assert!(
            claimed.is_empty(),
            "claimed without the handler: {claimed:?}"
        );
    }
    // Nobody alive can run it: its job is waiting, not lost, so it is not re-dispatched.
    assert!(store.stale_ready(0, 100).await.expect("stale").is_empty());
    let facts = store
        .diagnosis_facts(id, 3_000)
        .await
        .expect("facts")
        .expect("exists");
    assert_eq!(facts.instance.route, greet);
    assert_eq!((facts.live_workers, facts.capable_workers), (2, 0));

    let able = worker(&store, vec![Queue::default(), gpu()], &["greet"]).await;
    let stale = store.stale_ready(0, 100).await.expect("stale");
    assert_eq!(
        stale,
        std::slice::from_ref(&job),
        "re-dispatched once a worker can run it"
    );
    let facts = store.diagnosis_facts(id, 3_000).await.expect("facts");
    assert_eq!(facts.map(|f| f.capable_workers), Some(1));
    let claimed = claim(&store, able, job).await;
    assert_eq!(claimed.route, greet);
}

/// `claimed` moves on to `step` with `route` in a continuing commit by `node`: returns the
/// instance continued on the node, if it was, else its job (it is READY for others).
async fn move_on(
    store: &Store,
    node: NodeId,
    claimed: &Claimed,
    step: &str,
    route: Route,
) -> Result<Claimed, StepJob> {
    let done = store
        .commit_continuing(
            node,
            &[completion(claimed, "completed", next(step, route.clone()))],
        )
        .await
        .expect("commits");
    assert_eq!(done.results, [Commit::Committed]);
    if let Some((_, continued)) = done.continued.into_iter().next() {
        return Ok(continued);
    }
    let (now, seq) = state(store, claimed.id).await;
    assert_eq!(now, InstanceState::Ready);
    let facts = store
        .diagnosis_facts(claimed.id, 3_000)
        .await
        .expect("facts");
    assert_eq!(facts.map(|f| f.instance.route), Some(route.clone()), "kept");
    Err(StepJob {
        instance: claimed.id,
        step_seq: seq,
        fence: claimed.fence,
        route,
    })
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn the_next_steps_route_is_kept_and_a_node_continues_only_steps_it_serves(pool: PgPool) {
    let (store, _) = setup(pool).await;
    let greeter = worker(&store, vec![Queue::default()], &["greet"]).await;
    let gpu_node = worker(&store, vec![gpu()], &[]).await;
    let other = worker(&store, vec![Queue::default()], &["other"]).await;
    let (id, job) = start_on(&store, Route::default()).await;
    let claimed = claim(&store, greeter, job).await;

    // Not its queue: READY for the gpu node.
    let job = move_on(&store, greeter, &claimed, "b", route(gpu(), None))
        .await
        .expect_err("not continued");
    let claimed = claim(&store, gpu_node, job).await;
    let job = move_on(
        &store,
        gpu_node,
        &claimed,
        "c",
        route(Queue::default(), Some("greet")),
    )
    .await
    .expect_err("not continued");
    let claimed = claim(&store, greeter, job).await;
    // Not its handler: READY for a node that has it; the greeter cannot even claim it.
    let job = move_on(
        &store,
        greeter,
        &claimed,
        "d",
        route(Queue::default(), Some("other")),
    )
    .await
    .expect_err("not continued");
    let refused = store
        .claim(greeter, std::slice::from_ref(&job))
        .await
        .expect("claim");
    assert!(
        refused.is_empty(),
        "claimed without the handler: {refused:?}"
    );
    let claimed = claim(&store, other, job).await;
    let job = move_on(
        &store,
        other,
        &claimed,
        "e",
        route(Queue::default(), Some("greet")),
    )
    .await
    .expect_err("not continued");
    let claimed = claim(&store, greeter, job).await;

    // Its queue and its handler: continued, with the route of the step it continues.
    let greet = route(Queue::default(), Some("greet"));
    let continued = move_on(&store, greeter, &claimed, "f", greet.clone())
        .await
        .expect("continued");
    assert_eq!(continued.route, greet);
    assert_eq!(continued.current_step, "f");
    assert_eq!(
        state(&store, id).await,
        (InstanceState::Running, StepSeq(5))
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_child_and_the_parent_it_wakes_are_handed_back_with_their_routes(pool: PgPool) {
    let (store, node) = setup(pool).await;
    let parent_route = route(Queue::default(), None);
    let (parent, job) = start_on(&store, parent_route.clone()).await;
    let claimed = claim(&store, node, job).await;
    let child = InstanceId::new();
    let child_route = route(gpu(), None);
    let wait = Transition::Wait {
        wake_at_ms: None,
        event: None,
        child: Some(Box::new(NewChild {
            id: child,
            workflow: "child".into(),
            version: 1,
            entry_step: "c".into(),
            allow_retry: true,
            timeout_ms: 30_000,
            route: child_route.clone(),
            vars: json!({}),
        })),
    };
    let done = store
        .commit_waking(node, &[completion(&claimed, "waiting", wait)])
        .await
        .expect("commit");
    let [child_job] = done.ready.as_slice() else {
        panic!("the child's job: {:?}", done.ready);
    };
    assert_eq!(
        (child_job.instance, &child_job.route),
        (child, &child_route)
    );

    let gpu_node = worker(&store, vec![gpu()], &[]).await;
    let running = claim(&store, gpu_node, child_job.clone()).await;
    assert_eq!(running.route, child_route);
    let end = Transition::Stop {
        state: InstanceState::Completed,
    };
    let done = store
        .commit_waking(gpu_node, &[completion(&running, "completed", end)])
        .await
        .expect("commit");
    let [woken] = done.ready.as_slice() else {
        panic!("the parent's job: {:?}", done.ready);
    };
    assert_eq!((woken.instance, &woken.route), (parent, &parent_route));
}

#[sqlx::test(migrations = false)]
async fn the_queue_migration_gives_live_instances_their_steps_handler(pool: PgPool) {
    let migrations: Vec<_> = drover_store::MIGRATOR.iter().collect();
    for m in migrations.iter().filter(|m| m.version < 9) {
        sqlx::raw_sql(&m.sql).execute(&pool).await.expect("applies");
    }
    let body = json!({ "name": "w", "steps": [
        { "id": "hi", "kind": "handler", "handler": "greet" },
        { "id": "sum", "kind": "assign" },
    ]});
    sqlx::query(
        "INSERT INTO workflow_definition (name, version, body, source) VALUES ('w', 1, $1, '')",
    )
    .bind(&body)
    .execute(&pool)
    .await
    .expect("inserts");
    let rows = [
        ("ready", "hi"),
        ("running", "hi"),
        ("completed", "hi"),
        ("ready", "sum"),
    ];
    let mut ids = Vec::new();
    for (state, step) in rows {
        let id = InstanceId::new();
        let owner = (state == "running").then(uuid::Uuid::now_v7);
        sqlx::query(
            "INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                                   owner_node)
             VALUES ($1, (SELECT id FROM campaign WHERE name = 'default'), 'w', 1, $2, $3, $4)",
        )
        .bind(id.0)
        .bind(state)
        .bind(step)
        .bind(owner)
        .execute(&pool)
        .await
        .expect("inserts");
        ids.push(id);
    }
    let queue_migration = migrations
        .iter()
        .find(|m| m.version == 9)
        .expect("the queue migration");
    sqlx::raw_sql(&queue_migration.sql)
        .execute(&pool)
        .await
        .expect("applies");

    let mut found = Vec::new();
    for id in &ids {
        let row: (String, Option<String>) =
            sqlx::query_as("SELECT step_queue, step_handler FROM instance WHERE id = $1")
                .bind(id.0)
                .fetch_one(&pool)
                .await
                .expect("reads");
        found.push(row);
    }
    let default = || "default".to_owned();
    let greet = || Some("greet".to_owned());
    assert_eq!(
        found,
        [
            (default(), greet()),
            (default(), greet()),
            (default(), None),
            (default(), None)
        ],
        "live instances at the handler step need its handler; a finished one needs nothing"
    );
}
