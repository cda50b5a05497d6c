//! Events reach NATS even when the relay that held their partition dies before sending.

use std::time::Duration;

use drover_store::RELAY_LEASE;
use drover_tests::{TestEnv, wait_until};
use futures::StreamExt;

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
         VALUES ($1, 'spring', 1, 'permit_drift', '{\"kind\": \"running_count\"}')",
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
