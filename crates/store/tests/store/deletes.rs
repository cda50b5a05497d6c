//! Deleting workflows and campaigns, pausing campaigns, and the audit trail of those and of
//! schedule changes: refusals, effects, and the semaphore under a pause.

use std::time::Duration;

use chrono::Utc;
use drover_core::schedule::OverlapPolicy;
use drover_core::{CampaignId, InstanceId, InstanceState, NodeId, StepJob};
use drover_store::{
    COORDINATOR_LEASE, CadenceSpec, Completion, Error, LifecycleAction, NewCampaign, NewInstance,
    NewSchedule, OnErrorPermit, Store, Transition, WorkflowDelete,
};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn limited(store: &Store, name: &str, max: i32) -> CampaignId {
    store
        .create_campaign(&NewCampaign {
            name: name.to_owned(),
            max_running: Some(max),
            on_error_permit: OnErrorPermit::Release,
            actor: "ada".to_owned(),
        })
        .await
        .expect("creates the campaign")
        .id
}

async fn start(store: &Store, campaign: CampaignId, workflow: &str, n: usize) -> Vec<InstanceId> {
    let batch: Vec<NewInstance> = (0..n)
        .map(|_| NewInstance {
            route: Default::default(),
            id: InstanceId::new(),
            campaign,
            workflow: workflow.to_owned(),
            version: 1,
            entry_step: "a".to_owned(),
            allow_retry: true,
            timeout_ms: 30_000,
            vars: json!({}),
            announce_end: false,
        })
        .collect();
    store
        .create_instances(&batch, "test")
        .await
        .expect("creates");
    batch.iter().map(|i| i.id).collect()
}

/// Runs `id` (READY) to `completed` on `node`; returns the instances its release admitted.
async fn finish(store: &Store, node: NodeId, id: InstanceId) -> Vec<InstanceId> {
    let i = store.get_instance(id).await.expect("get").expect("exists");
    let job = StepJob {
        route: Default::default(),
        instance: id,
        step_seq: i.step_seq,
        fence: i.fence,
    };
    let claimed = store.claim(node, &[job]).await.expect("claims");
    assert_eq!(claimed.len(), 1, "{id} claims");
    let done = store
        .commit_waking(
            node,
            &[Completion::of(
                &claimed[0],
                Utc::now(),
                "completed",
                Transition::Stop {
                    state: InstanceState::Completed,
                },
            )],
        )
        .await
        .expect("commits");
    done.ready.iter().map(|j| j.instance).collect()
}

async fn state(store: &Store, id: InstanceId) -> (InstanceState, bool, Option<i64>) {
    let i = store.get_instance(id).await.expect("get").expect("exists");
    (i.state, i.holds_permit, i.queue_position)
}

/// `(running, queued)` as the campaign row says, and as the rows say (I1, I2).
async fn counters(store: &Store, campaign: CampaignId) -> ((i32, i32), (i64, i64)) {
    let recorded: (i32, i32) = sqlx::query_as("SELECT running, queued FROM campaign WHERE id = $1")
        .bind(campaign.0)
        .fetch_one(store.pool())
        .await
        .expect("reads the campaign");
    let counted: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE holds_permit), count(*) FILTER (WHERE state = 'queued')
         FROM instance WHERE campaign_id = $1",
    )
    .bind(campaign.0)
    .fetch_one(store.pool())
    .await
    .expect("counts");
    (recorded, counted)
}

/// `(actor, action, target, details)` of every audit row whose action starts with `prefix`.
async fn audit(store: &Store, prefix: &str) -> Vec<(String, String, String, Option<Value>)> {
    sqlx::query_as(
        "SELECT actor, action, target, details FROM audit WHERE action LIKE $1 || '%' ORDER BY id",
    )
    .bind(prefix)
    .fetch_all(store.pool())
    .await
    .expect("reads the audit")
}

/// `(campaign, data)` of every event of `kind`, in write order.
async fn events(store: &Store, kind: &str) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT campaign, data FROM event_fact WHERE kind = $1 ORDER BY pos")
        .bind(kind)
        .fetch_all(store.pool())
        .await
        .expect("reads the outbox")
}

fn schedule(name: &str, workflow: &str, campaign: &str) -> NewSchedule {
    NewSchedule {
        name: name.to_owned(),
        workflow: workflow.to_owned(),
        campaign: campaign.to_owned(),
        vars: json!({}),
        cadence: CadenceSpec::Every(Duration::from_secs(60)),
        overlap: OverlapPolicy::Skip,
        catchup_window: Duration::from_secs(60),
        jitter: Duration::ZERO,
        start_at: None,
        end_at: None,
    }
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_paused_campaign_admits_nothing_and_unpausing_admits_its_queue_in_order(pool: PgPool) {
    let (store, node) = crate::support::setup_with(pool, &["job"]).await;
    let c = limited(&store, "spring", 3).await;
    let first = start(&store, c, "job", 1).await;

    let paused = store.pause_campaign("spring", "ada").await.expect("pauses");
    assert!(paused.changed);
    assert_eq!(paused.campaign.paused_by.as_deref(), Some("ada"));
    assert!(
        !store
            .pause_campaign("spring", "ada")
            .await
            .expect("answers")
            .changed,
        "pausing a paused campaign changes nothing"
    );

    // New starts queue although two permits are free.
    let queued = start(&store, c, "job", 4).await;
    for (place, id) in queued.iter().enumerate() {
        assert_eq!(
            state(&store, *id).await,
            (InstanceState::Queued, false, Some(place as i64 + 1))
        );
    }
    // The running one finishes; its permit is not passed on.
    assert_eq!(finish(&store, node, first[0]).await, [], "nothing admitted");
    assert_eq!(counters(&store, c).await, ((0, 4), (0, 4)));
    // Neither a raised limit nor the reconciler admits, and a paused queue is not drift.
    let raised = store
        .set_campaign_limit("spring", 4, "ada")
        .await
        .expect("raises");
    assert!(raised.admitted.is_empty());
    store
        .set_campaign_limit("spring", 3, "ada")
        .await
        .expect("lowers");
    let term = store
        .acquire_lease(COORDINATOR_LEASE, node, 10_000)
        .await
        .expect("acquires")
        .expect("free");
    let reconciled = store
        .reconcile_permits(node, term)
        .await
        .expect("reconciles");
    assert!(reconciled.drift.is_empty(), "{:?}", reconciled.drift);
    assert!(reconciled.admitted.is_empty());

    // `why` has the pause to say.
    let facts = store
        .diagnosis_facts(queued[0], 3_000)
        .await
        .expect("reads")
        .expect("exists");
    assert!(facts.campaign.paused_at.is_some());
    assert_eq!(facts.campaign.paused_by.as_deref(), Some("ada"));

    // Unpause admits the head of the queue at once, FIFO, up to the limit.
    let unpaused = store
        .unpause_campaign("spring", "bob")
        .await
        .expect("unpauses");
    assert!(unpaused.changed);
    assert!(unpaused.campaign.paused_at.is_none());
    assert_eq!(
        unpaused.admitted.iter().map(|a| a.id).collect::<Vec<_>>(),
        queued[..3]
    );
    assert_eq!(
        state(&store, queued[3]).await,
        (InstanceState::Queued, false, Some(1))
    );
    assert_eq!(counters(&store, c).await, ((3, 1), (3, 1)));
    assert!(
        !store
            .unpause_campaign("spring", "bob")
            .await
            .expect("answers")
            .changed
    );
    // A finished holder hands its permit on again.
    assert_eq!(finish(&store, node, queued[0]).await, [queued[3]]);

    let audited = audit(&store, "campaign.").await;
    let actions: Vec<(&str, &str)> = audited
        .iter()
        .map(|(actor, action, _, _)| (actor.as_str(), action.as_str()))
        .filter(|(_, action)| action.ends_with("pause"))
        .collect();
    assert_eq!(
        actions,
        [("ada", "campaign.pause"), ("bob", "campaign.unpause")]
    );
    let paused_events = events(&store, "campaign_paused").await;
    assert_eq!(paused_events.len(), 1);
    assert_eq!(paused_events[0].0, "spring");
    assert_eq!(paused_events[0].1["actor"], "ada");
    let unpaused_events = events(&store, "campaign_unpaused").await;
    assert_eq!(unpaused_events.len(), 1);
    assert_eq!(unpaused_events[0].1["admitted"], 3);

    // Only a campaign with a queue can be paused.
    assert!(matches!(
        store.pause_campaign("default", "ada").await,
        Err(Error::UnlimitedCampaign(_))
    ));
    assert!(matches!(
        store.pause_campaign("nope", "ada").await,
        Err(Error::UnknownCampaign(_))
    ));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_campaign_is_deleted_only_when_empty_and_its_history_stays(pool: PgPool) {
    let (store, node) = crate::support::setup_with(pool, &["job"]).await;
    assert!(matches!(
        store.delete_campaign("default", "ada").await,
        Err(Error::DefaultCampaign)
    ));
    let c = limited(&store, "spring", 1).await;
    let ids = start(&store, c, "job", 2).await;
    match store.delete_campaign("spring", "ada").await {
        Err(Error::CampaignNotEmpty { live, queued, .. }) => assert_eq!((live, queued), (2, 1)),
        other => panic!("refused as not empty, not {other:?}"),
    }
    store
        .create_schedule(&schedule("nightly", "job", "spring"), "ada")
        .await
        .expect("creates");

    // The running one finishes, the queued one is killed: nothing live, a schedule left.
    assert_eq!(finish(&store, node, ids[0]).await, [ids[1]]);
    store
        .apply_lifecycle(LifecycleAction::Kill, &ids[1..], "ada")
        .await
        .expect("kills");
    match store.delete_campaign("spring", "ada").await {
        Err(Error::CampaignScheduled { schedules, .. }) => assert_eq!(schedules, ["nightly"]),
        other => panic!("refused for its schedule, not {other:?}"),
    }
    assert!(
        store
            .delete_schedule("nightly", "ada")
            .await
            .expect("deletes")
    );
    store
        .delete_campaign("spring", "ada")
        .await
        .expect("deletes the empty campaign");

    assert!(
        store
            .campaign_by_name("spring")
            .await
            .expect("reads")
            .is_none()
    );
    assert!(
        !store
            .list_campaigns()
            .await
            .expect("lists")
            .iter()
            .any(|c| c.name == "spring")
    );
    let old = store
        .get_instance(ids[0])
        .await
        .expect("reads")
        .expect("its history stays");
    assert_eq!(old.campaign, "spring");
    assert!(matches!(
        store.delete_campaign("spring", "ada").await,
        Err(Error::UnknownCampaign(_))
    ));
    assert_eq!(
        audit(&store, "campaign.delete").await[0].2,
        "spring",
        "audited"
    );
    assert_eq!(events(&store, "campaign_deleted").await.len(), 1);

    // Its name revives the row: same id, new settings, history kept.
    let revived = store
        .create_campaign(&NewCampaign {
            name: "spring".to_owned(),
            max_running: Some(5),
            on_error_permit: OnErrorPermit::Hold,
            actor: "ada".to_owned(),
        })
        .await
        .expect("revives");
    assert_eq!(revived.id, c);
    assert_eq!(revived.max_running, Some(5));
    assert_eq!(counters(&store, c).await, ((0, 0), (0, 0)));
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn a_workflow_in_use_is_deleted_only_with_its_live_instances_stopped(pool: PgPool) {
    let (store, node) = crate::support::setup_with(pool, &["job", "other"]).await;
    let default = store
        .campaign_by_name("default")
        .await
        .expect("reads")
        .expect("exists")
        .id;
    let ids = start(&store, default, "job", 3).await;
    finish(&store, node, ids[0]).await;
    let delete = WorkflowDelete {
        workflow: "job".to_owned(),
        version: None,
        stop_instances: false,
        actor: "ada".to_owned(),
    };
    match store.delete_workflow(&delete).await {
        Err(Error::WorkflowLive { live, examples, .. }) => {
            assert_eq!(live, 2);
            let mut expected = ids[1..].to_vec();
            expected.sort();
            assert_eq!(examples, expected);
        }
        other => panic!("refused while live, not {other:?}"),
    }
    store
        .create_schedule(&schedule("hourly", "job", "default"), "ada")
        .await
        .expect("creates");
    let stopping = WorkflowDelete {
        stop_instances: true,
        ..delete.clone()
    };
    assert!(
        matches!(
            store.delete_workflow(&stopping).await,
            Err(Error::WorkflowScheduled { ref schedules, .. }) if schedules == &["hourly"]
        ),
        "a schedule blocks it even with --stop-instances"
    );
    assert!(
        store
            .delete_schedule("hourly", "ada")
            .await
            .expect("deletes")
    );

    let deleted = store.delete_workflow(&stopping).await.expect("deletes");
    assert_eq!(deleted.versions, [1]);
    let mut stopped = deleted.stopped.clone();
    stopped.sort();
    let mut expected = ids[1..].to_vec();
    expected.sort();
    assert_eq!(stopped, expected);
    for id in &ids[1..] {
        assert_eq!(state(&store, *id).await.0, InstanceState::Stopped);
    }
    let kills = audit(&store, "kill").await;
    assert_eq!(kills.len(), 2);
    for (actor, _, _, details) in &kills {
        assert_eq!(actor, "ada");
        assert_eq!(
            details.as_ref().map(|d| d["reason"].clone()),
            Some(json!("workflow.delete job"))
        );
    }

    // Soft: not listed, not started, but the version stays readable for its instances.
    assert!(
        store
            .get_definition("job", None)
            .await
            .expect("reads")
            .is_none()
    );
    let v1 = store
        .get_definition("job", Some(1))
        .await
        .expect("reads")
        .expect("kept");
    assert!(v1.deleted_at.is_some());
    let listed: Vec<String> = store
        .list_definitions()
        .await
        .expect("lists")
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(listed, ["other"]);
    assert!(store.journal(ids[0]).await.expect("reads").is_some());
    assert!(matches!(
        store.delete_workflow(&delete).await,
        Err(Error::UnknownWorkflow(_))
    ));
    let audited = audit(&store, "workflow.delete").await;
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].2, "job");
    let announced = events(&store, "workflow_deleted").await;
    assert_eq!(announced.len(), 1);
    assert_eq!(announced[0].0, "default");
    assert_eq!(announced[0].1["versions"], json!([1]));
    assert_eq!(announced[0].1["stopped"], 2);

    // Deploying it again takes the next number, even with the same content.
    let again = store
        .deploy_definition("job", &json!({ "name": "job" }), "job")
        .await
        .expect("deploys");
    assert_eq!((again.version, again.created), (2, true));

    // One old version may go while a schedule starts the latest; the latest may not.
    store
        .deploy_definition("other", &json!({ "name": "other", "v": 2 }), "other")
        .await
        .expect("deploys v2");
    store
        .create_schedule(&schedule("often", "other", "default"), "ada")
        .await
        .expect("creates");
    let one = |version| WorkflowDelete {
        workflow: "other".to_owned(),
        version: Some(version),
        stop_instances: false,
        actor: "ada".to_owned(),
    };
    assert!(matches!(
        store.delete_workflow(&one(2)).await,
        Err(Error::WorkflowScheduled { .. })
    ));
    assert_eq!(
        store
            .delete_workflow(&one(1))
            .await
            .expect("deletes v1")
            .versions,
        [1]
    );
    assert!(matches!(
        store.delete_workflow(&one(1)).await,
        Err(Error::UnknownVersion { version: 1, .. })
    ));
    assert_eq!(
        store
            .get_definition("other", None)
            .await
            .expect("reads")
            .expect("v2 lives")
            .version,
        2
    );
}

#[sqlx::test(migrator = "drover_store::MIGRATOR")]
async fn schedule_changes_are_audited_and_announced(pool: PgPool) {
    let (store, _) = crate::support::setup_with(pool, &["job"]).await;
    let mut new = schedule("nightly", "job", "default");
    store.create_schedule(&new, "ada").await.expect("creates");
    store
        .set_schedule_paused("nightly", true, Some("db migration"), "bob")
        .await
        .expect("pauses");
    store
        .set_schedule_paused("nightly", false, None, "bob")
        .await
        .expect("unpauses");
    new.jitter = Duration::from_secs(5);
    store.update_schedule(&new, "ada").await.expect("updates");
    assert!(
        store
            .delete_schedule("nightly", "ada")
            .await
            .expect("deletes")
    );

    let audited: Vec<(String, String, String)> = audit(&store, "schedule.")
        .await
        .into_iter()
        .map(|(actor, action, target, _)| (actor, action, target))
        .collect();
    let expected = [
        ("ada", "schedule.create"),
        ("bob", "schedule.pause"),
        ("bob", "schedule.unpause"),
        ("ada", "schedule.update"),
        ("ada", "schedule.delete"),
    ]
    .map(|(actor, action)| (actor.to_owned(), action.to_owned(), "nightly".to_owned()));
    assert_eq!(audited, expected);
    let announced = events(&store, "schedule_changed").await;
    let actions: Vec<&str> = announced
        .iter()
        .map(|(campaign, data)| {
            assert_eq!(campaign, "default");
            assert_eq!(data["schedule"], "nightly");
            data["action"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        actions,
        ["created", "paused", "unpaused", "updated", "deleted"]
    );
    assert_eq!(announced[1].1["note"], "db migration");
}
