//! Deliveries from the pull consumers and how they are settled, and publishing from plain
//! data (against a real nats-server named by `NATS_URL`, under a random prefix).

use std::time::Duration;

use drover_bus::{Bus, BusConfig, Deliveries, Delivery};
use drover_core::{Fence, InstanceId, Queue, Route, StepJob, StepSeq};
use futures::StreamExt;

fn config() -> BusConfig {
    let url = std::env::var("NATS_URL").expect(
        "set NATS_URL to a nats-server >= 2.11 with JetStream (e.g. nats://127.0.0.1:4222)",
    );
    BusConfig {
        url,
        prefix: format!("d{}", uuid::Uuid::now_v7().simple()),
        // NATS reserves the stream's max bytes: keep it small so many tests fit.
        events_max_bytes: 16 << 20,
        ..Default::default()
    }
}

/// The next delivery, waiting at most 10 s for it.
async fn next(deliveries: &mut Deliveries<StepJob>) -> Delivery<StepJob> {
    tokio::time::timeout(Duration::from_secs(10), deliveries.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the stream goes on")
        .expect("a message")
}

#[tokio::test]
async fn a_nakd_job_comes_back_decoded_and_garbage_is_terminated() {
    let bus = Bus::connect(config()).await.expect("NATS_URL is reachable");
    let route = Route {
        queue: Queue::default(),
        handler: Some("greet".into()),
    };
    let job = StepJob::new(InstanceId::new(), StepSeq(2), Fence(5), route);
    bus.publish_jobs(std::slice::from_ref(&job))
        .await
        .expect("published");
    let (mut deliveries, provisioned) =
        bus.pull_jobs(&Queue::default(), 10).await.expect("pulling");
    assert!(!provisioned);

    let first = next(&mut deliveries).await;
    assert_eq!(first.decoded().ok(), Some(&job));
    assert_eq!(first.delivered(), 1);
    assert_eq!(first.subject(), bus.subjects().job(&Queue::default()));
    first.progress().await.expect("progress");
    first.nak(Duration::from_millis(50)).await.expect("nak");

    let again = next(&mut deliveries).await;
    assert_eq!(again.decoded().ok(), Some(&job));
    assert_eq!(again.delivered(), 2, "the same message, delivered again");
    again.ack().await.expect("ack");

    bus.publish_plain(
        &bus.subjects().job(&Queue::default()),
        &[],
        "garbage".into(),
    )
    .await
    .expect("published");
    let garbage = next(&mut deliveries).await;
    assert!(garbage.decoded().is_err());
    garbage.term().await.expect("term");

    // Nothing left unsettled: acks and terms are fire and forget, so wait for the server.
    let mut consumer = bus
        .worker_consumer(&Queue::default())
        .await
        .expect("the consumer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.expect("consumer info");
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still unsettled after 10 s: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus.delete_streams().await;
}

#[tokio::test]
async fn a_stored_publish_is_deduplicated_by_its_message_id_header() {
    let bus = Bus::connect(config()).await.expect("NATS_URL is reachable");
    let subject = bus.subjects().job(&Queue::default());
    assert!(bus.stream_stores(&subject).await);
    assert!(
        !bus.stream_stores(&format!("{}.nowhere", bus.subjects().prefix()))
            .await
    );
    let headers = [("Nats-Msg-Id", "p:once")];
    let seq = bus
        .publish_stored(&subject, &headers, "one".into())
        .await
        .expect("published");
    let again = bus
        .publish_stored(&subject, &headers, "one".into())
        .await
        .expect("published again");
    assert_eq!(seq, again, "the second is the first, deduplicated");
    bus.delete_streams().await;
}
