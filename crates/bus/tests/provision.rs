//! Streams and consumers deleted by hand are found missing and provisioned again (against a
//! real nats-server named by `NATS_URL`, under a random prefix).

use drover_bus::{Bus, BusConfig, StepJob, WORKER_CONSUMER};
use drover_core::{Fence, InstanceId, StepSeq};

async fn bus() -> Bus {
    let url = std::env::var("NATS_URL").expect(
        "set NATS_URL to a nats-server >= 2.11 with JetStream (e.g. nats://127.0.0.1:4222)",
    );
    let prefix = format!("b{}", uuid::Uuid::now_v7().simple());
    Bus::connect(BusConfig {
        url,
        prefix,
        // NATS reserves the stream's max bytes: keep it small so many tests fit.
        events_max_bytes: 16 << 20,
        ..Default::default()
    })
    .await
    .expect("NATS_URL is reachable")
}

fn job() -> StepJob {
    StepJob::new(InstanceId::new(), StepSeq(0), Fence(0))
}

#[tokio::test]
async fn a_deleted_jobs_stream_is_reported_missing_and_provisioned_again() {
    let bus = bus().await;
    let (_, provisioned) = bus
        .ensure_worker_consumer()
        .await
        .expect("the consumer exists");
    assert!(!provisioned, "nothing to do while it exists");

    bus.jetstream()
        .delete_stream(bus.subjects().jobs_stream())
        .await
        .expect("deleted");
    let err = bus
        .publish_jobs(&[job()])
        .await
        .expect_err("no stream stores the subject");
    assert!(err.needs_provisioning(), "{err}");
    assert!(err.is_transient());
    let err = bus.worker_consumer().await.expect_err("gone");
    assert!(err.needs_provisioning(), "{err}");

    let (_, provisioned) = bus
        .ensure_worker_consumer()
        .await
        .expect("provisioned again");
    assert!(provisioned);
    bus.publish_jobs(&[job()]).await.expect("stored again");
    bus.delete_streams().await;
}

#[tokio::test]
async fn a_deleted_consumer_is_provisioned_again_on_its_stream() {
    let bus = bus().await;
    let mut stream = bus
        .jetstream()
        .get_stream(bus.subjects().jobs_stream())
        .await
        .expect("the stream exists");
    stream
        .delete_consumer(WORKER_CONSUMER)
        .await
        .expect("deleted");
    let (_, provisioned) = bus
        .ensure_worker_consumer()
        .await
        .expect("provisioned again");
    assert!(provisioned);
    let info = stream.info().await.expect("stream info");
    assert_eq!(info.state.consumer_count, 1);
    bus.delete_streams().await;
}

#[tokio::test]
async fn relaying_to_a_deleted_events_stream_reports_it_missing() {
    let bus = bus().await;
    let event = drover_core::Fact {
        id: uuid::Uuid::now_v7(),
        subject: drover_core::event::FactSubject::Instance {
            id: InstanceId::new(),
            workflow: "w".into(),
            version: 1,
        },
        campaign: "default".into(),
        seq: 1,
        kind: drover_bus::EventKind::Started,
        data: serde_json::json!({ "state": "ready", "step": "a" }),
        time: chrono::Utc::now(),
    };
    let relayed = bus.relay(std::slice::from_ref(&event)).await;
    assert_eq!(relayed.ids, vec![event.id]);
    assert!(relayed.failure.is_none());

    bus.jetstream()
        .delete_stream(bus.subjects().events_stream())
        .await
        .expect("deleted");
    let relayed = bus.relay(std::slice::from_ref(&event)).await;
    assert!(relayed.ids.is_empty());
    let failure = relayed.failure.expect("a failure");
    assert!(failure.needs_provisioning(), "{failure}");

    bus.provision().await.expect("provisioned again");
    let relayed = bus.relay(std::slice::from_ref(&event)).await;
    assert_eq!(relayed.ids, vec![event.id]);
    bus.delete_streams().await;
}
