//! Events reach NATS even when the relay that held their partition dies before sending; a
//! reader gets every transition of every instance, per instance in order, as the contract
//! says.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_store::RELAY_LEASE;
use drover_tests::{
    EventReader, ReceivedEvent, TestEnv, asyncapi_channel, check_event_log, kinds_and_subjects,
    wait_until,
};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{deploy, start, wait_settled};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_relay_that_died_are_sent_once_its_lease_lapses() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let client = env.nats_client().await?;
    let mut events = client.subscribe(format!("{}.evt.>", env.prefix)).await?;
    // A relay (of a node since killed) took its share of the partitions, all of them while no
    // node was alive…
    let dead_relay = uuid::Uuid::now_v7();
    let leased_at = tokio::time::Instant::now();
    let parts = env.store.lease_relay_parts(dead_relay).await?;
    assert_eq!(parts.len(), 16, "{parts:?}");
    // …and an event was written in one of them.
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO event_fact (id, campaign, seq, kind, data)
         VALUES ($1, 'spring', 1, 'permit_drift',
                 '{\"kind\": \"running_count\", \"detail\": \"running was 3 but 2 hold a permit\",
                   \"repaired\": true, \"leader_term\": 1}')",
    )
    .bind(id)
    .execute(env.store.pool())
    .await?;

    // A live node's relay leaves the partitions alone while the lease holds…
    let _node = env.spawn_node("worker").await?;
    let early = tokio::time::timeout_at(leased_at + RELAY_LEASE * 4 / 5, events.next()).await;
    assert!(early.is_err(), "sent during the lease: {early:?}");
    // …and sends the event once it lapses.
    let message = tokio::time::timeout(RELAY_LEASE + Duration::from_secs(10), events.next())
        .await
        .map_err(|_| anyhow::anyhow!("not sent within {RELAY_LEASE:?} + 10 s of the lease"))?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
    assert_eq!(
        message.subject.as_str(),
        format!("{}.evt.spring._campaign._.permit_drift", env.prefix)
    );
    let payload: serde_json::Value = serde_json::from_slice(&message.payload)?;
    assert_eq!(payload["id"], id.to_string(), "{payload}");
    assert_eq!(payload["droverseq"], 1, "{payload}");
    wait_until(
        "the event marked relayed",
        Duration::from_secs(10),
        || async {
            let (relayed,): (bool,) =
                sqlx::query_as("SELECT relayed_at IS NOT NULL FROM event_fact WHERE id = $1")
                    .bind(id)
                    .fetch_one(env.store.pool())
                    .await?;
            Ok(relayed.then_some(()))
        },
    )
    .await?;
    env.cleanup().await;
    Ok(())
}

/// Three ways through: `a` loops over a slow handler step (mid-step when a worker dies), `b`
/// sleeps (waiting, woken) then doubles, `c` ends failed at once.
const BRANCHING: &str = r#"
name: branching
vars: { side: "a", i: 0 }
steps:
  - id: pick
    kind: assign
    set: { i: "vars.i + 1" }
    next:
      - { to: work, when: "vars.side == 'a'" }
      - { to: nap, when: "vars.side == 'b'" }
      - { to: give_up }
  - { id: work, kind: handler, handler: slow, input: { ms: "150" }, next: [{ to: pick, when: "vars.i < 3" }, { to: done }] }
  - { id: nap, kind: sleep, for: 300ms, next: [{ to: twice }] }
  - { id: twice, kind: handler, handler: double, input: { n: "vars.i" }, next: [{ to: done, when: "output.n == 2" }, { to: give_up }] }
  - { id: done, kind: end, status: completed }
  - { id: give_up, kind: end, status: failed }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_every_transition_of_every_instance_in_order_through_a_worker_kill()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let coordinator = env.spawn_node("coordinator,api").await?;
    let mut victim = env.spawn_node("worker").await?;
    let _survivor = env.spawn_node("worker").await?;
    let api = coordinator.api();

    // Subscribed before anything starts, reading as a third party would.
    let mut reader = EventReader::open(&env.bus).await?;
    let received: Arc<Mutex<Vec<ReceivedEvent>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reading = tokio::spawn({
        let (received, stop) = (received.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(event) = reader.next(Duration::from_millis(200)).await? {
                    received
                        .lock()
                        .expect("invariant: no panic holds it")
                        .push(event);
                }
            }
            anyhow::Ok(())
        }
    });

    deploy(api, BRANCHING).await?;
    let mut ids = Vec::new();
    for (side, count) in [("a", 100), ("b", 60), ("c", 40)] {
        ids.extend(start(api, "branching", json!({ "side": side }), count).await?);
    }
    wait_until(
        "instances running on the victim",
        Duration::from_secs(30),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM instance WHERE state = 'running' AND owner_node = $1",
            )
            .bind(victim.id.0)
            .fetch_one(env.store.pool())
            .await?;
            Ok((n >= 5).then_some(()))
        },
    )
    .await?;
    victim.kill().await?;
    let states = wait_settled(&env, 200, Duration::from_secs(90)).await?;
    assert_eq!(
        states,
        vec![("completed".to_owned(), 160), ("failed".to_owned(), 40)]
    );

    // Every instance's last event (completed or failed) reaches the reader.
    let terminal = |events: &[ReceivedEvent]| -> BTreeSet<String> {
        events
            .iter()
            .filter(|e| matches!(e.kind(), Some("completed" | "failed")))
            .filter_map(|e| {
                e.payload.as_ref().ok()?["subject"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    };
    wait_until(
        "every instance's last event read",
        Duration::from_secs(30),
        || async {
            let events = received
                .lock()
                .expect("invariant: no panic holds it")
                .clone();
            Ok((terminal(&events).len() == ids.len()).then_some(()))
        },
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    reading.await??;
    let events = received
        .lock()
        .expect("invariant: no panic holds it")
        .clone();
    assert_eq!(
        terminal(&events),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );

    // Every journaled transition has its event: `started` for checkpoint 0, else an event of
    // that checkpoint (`data.step_seq`).
    let journal: Vec<(Uuid, i64, String)> =
        sqlx::query_as("SELECT instance_id, step_seq, outcome FROM journal ORDER BY 1, 2")
            .fetch_all(env.store.pool())
            .await?;
    let mut checkpoints: BTreeMap<(String, i64), BTreeSet<String>> = BTreeMap::new();
    for event in &events {
        let (Ok(payload), Some(kind)) = (&event.payload, event.kind()) else {
            continue;
        };
        let subject = payload["subject"].as_str().unwrap_or_default().to_owned();
        let step_seq = if kind == "started" {
            Some(0)
        } else {
            payload["data"]["step_seq"].as_i64()
        };
        if let Some(step_seq) = step_seq {
            checkpoints
                .entry((subject, step_seq))
                .or_default()
                .insert(kind.to_owned());
        }
    }
    let missing: Vec<String> = journal
        .iter()
        .filter(|(id, step_seq, _)| !checkpoints.contains_key(&(id.to_string(), *step_seq)))
        .map(|(id, step_seq, outcome)| format!("{id} checkpoint {step_seq} ({outcome})"))
        .collect();
    assert!(
        missing.is_empty(),
        "{} journaled transitions have no event, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // The AsyncAPI document (served without a token) names every subject and type of the run.
    let doc: Value = reqwest::get(format!("{api}/v1/asyncapi.json"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let (kinds, subjects) = kinds_and_subjects(&events);
    for kind in [
        "started",
        "step_completed",
        "waiting",
        "woken",
        "completed",
        "failed",
    ] {
        assert!(kinds.contains(kind), "the run produced {kind}: {kinds:?}");
    }
    for subject in &subjects {
        let (channel, values) = asyncapi_channel(&doc, subject)
            .ok_or_else(|| anyhow::anyhow!("no AsyncAPI channel has {subject}"))?;
        let kind = &values["kind"];
        assert!(
            doc["channels"][channel]["messages"].get(kind).is_some(),
            "channel {channel} lists {kind}"
        );
    }
    for kind in &kinds {
        let title = &doc["components"]["messages"][kind]["title"];
        assert!(
            title
                .as_str()
                .is_some_and(|t| t.ends_with(&format!(".{kind}"))),
            "message {kind}: {title}"
        );
    }

    // Per instance in `droverseq` order from 1 without gaps, each valid against its schema,
    // a copy only with the same id: what the reader got, and what the stream keeps.
    let live = check_event_log(env.bus.subjects(), &events, false)?;
    assert_eq!(live.last_seq.len(), ids.len(), "one sequence per instance");
    let kept = env.check_events().await?;
    assert_eq!(kept.last_seq, live.last_seq);
    env.cleanup().await;
    Ok(())
}
