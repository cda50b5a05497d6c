//! Events reach NATS even when the relay that claimed them dies before sending.

use std::time::Duration;

use drover_bus::EventKind;
use drover_core::definition::millis;
use drover_tests::{TestEnv, wait_until};
use drover_worker::RelayConfig;
use futures::StreamExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_claimed_by_a_relay_that_died_are_sent_once_its_claim_lapses() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    let client = env.nats_client().await?;
    let mut events = client.subscribe(format!("{}.evt.>", env.prefix)).await?;
    // An event written by some transition, claimed by a node's relay, which was then killed
    // before it published (it claims exactly as every node's relay does).
    let event = env
        .bus
        .campaign_event("spring", EventKind::PermitDrift, json!({ "running": 3 }));
    sqlx::query("INSERT INTO event_outbox (id, subject, payload) VALUES ($1, $2, $3)")
        .bind(event.id)
        .bind(&event.subject)
        .bind(&event.payload)
        .execute(env.store.pool())
        .await?;
    let claim = RelayConfig::default().claim;
    let claimed_at = tokio::time::Instant::now();
    let claimed = env.store.claim_events(100, millis(claim)).await?;
    assert_eq!(claimed.len(), 1);

    // A live node's relay leaves the claimed event alone while the claim holds…
    let _node = env.spawn_node("worker").await?;
    let early = tokio::time::timeout_at(claimed_at + claim * 4 / 5, events.next()).await;
    assert!(early.is_err(), "sent during the claim: {early:?}");
    // …and sends it once the claim lapses.
    let message = tokio::time::timeout(claim + Duration::from_secs(10), events.next())
        .await
        .map_err(|_| anyhow::anyhow!("not sent within {claim:?} + 10 s of the claim"))?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
    assert_eq!(message.subject.as_str(), event.subject);
    let payload: serde_json::Value = serde_json::from_slice(&message.payload)?;
    assert_eq!(payload["id"], event.id.to_string(), "{payload}");
    wait_until(
        "the event marked relayed",
        Duration::from_secs(10),
        || async {
            let (relayed,): (bool,) =
                sqlx::query_as("SELECT relayed_at IS NOT NULL FROM event_outbox WHERE id = $1")
                    .bind(event.id)
                    .fetch_one(env.store.pool())
                    .await?;
            Ok(relayed.then_some(()))
        },
    )
    .await?;
    env.cleanup().await;
    Ok(())
}
