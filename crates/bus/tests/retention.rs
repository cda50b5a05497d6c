//! The EVENTS stream's retention and every stream's replicas are what the configuration says,
//! on a new stream and after a change on an existing one (against a real nats-server named by
//! `NATS_URL`, a single server, under a random prefix).

use std::time::Duration;

use async_nats::jetstream::stream;
use drover_bus::{Bus, BusConfig, Error};

fn config(prefix: &str) -> BusConfig {
    let url = std::env::var("NATS_URL").expect(
        "set NATS_URL to a nats-server >= 2.11 with JetStream (e.g. nats://127.0.0.1:4222)",
    );
    BusConfig {
        url,
        prefix: prefix.to_owned(),
        // NATS reserves the stream's max bytes: keep it small so many tests fit.
        events_max_bytes: 16 << 20,
        ..Default::default()
    }
}

async fn events_config(bus: &Bus) -> stream::Config {
    bus.jetstream()
        .get_stream(bus.subjects().events_stream())
        .await
        .expect("the events stream exists")
        .info()
        .await
        .expect("stream info")
        .config
        .clone()
}

#[tokio::test]
async fn events_retention_is_provisioned_and_a_change_applies_to_the_existing_stream() {
    let prefix = format!("b{}", uuid::Uuid::now_v7().simple());
    let bus = Bus::connect(BusConfig {
        events_max_age: Duration::from_secs(2 * 3600),
        events_max_bytes: 1 << 20,
        ..config(&prefix)
    })
    .await
    .expect("provisioned");
    let events = events_config(&bus).await;
    assert_eq!(events.max_age, Duration::from_secs(2 * 3600));
    assert_eq!(events.max_bytes, 1 << 20);
    assert_eq!(events.discard, stream::DiscardPolicy::Old);
    assert_eq!(events.num_replicas, 1);

    // Another node (or this one restarted) with other settings updates the stream.
    let changed = Bus::connect(BusConfig {
        events_max_age: Duration::from_secs(3 * 3600),
        events_max_bytes: 2 << 20,
        ..config(&prefix)
    })
    .await
    .expect("updated");
    let events = events_config(&changed).await;
    assert_eq!(events.max_age, Duration::from_secs(3 * 3600));
    assert_eq!(events.max_bytes, 2 << 20);
    bus.delete_streams().await;
}

#[tokio::test]
async fn the_default_retention_is_a_week_and_ten_gibibytes() {
    let prefix = format!("b{}", uuid::Uuid::now_v7().simple());
    // Reserves 10 GiB of the server's storage for as long as the test runs.
    let bus = Bus::connect(BusConfig {
        events_max_bytes: BusConfig::default().events_max_bytes,
        ..config(&prefix)
    })
    .await
    .expect("provisioned");
    let events = events_config(&bus).await;
    assert_eq!(events.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(events.max_bytes, 10 << 30);
    bus.delete_streams().await;
}

#[tokio::test]
async fn replicas_a_single_server_cannot_keep_are_refused_naming_the_flag() {
    let prefix = format!("b{}", uuid::Uuid::now_v7().simple());
    let bus = Bus::connect(config(&prefix)).await.expect("provisioned");
    let err = Bus::connect(BusConfig {
        stream_replicas: 3,
        ..config(&prefix)
    })
    .await
    .expect_err("a single server keeps one copy");
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("--stream-replicas"), "{err}");
    assert!(!err.is_transient());

    let err = Bus::connect(BusConfig {
        stream_replicas: 0,
        ..config(&prefix)
    })
    .await
    .expect_err("no stream has no copy");
    assert!(err.to_string().contains("--stream-replicas"), "{err}");
    bus.delete_streams().await;
}
