//! Streams and consumers deleted by hand are found missing and provisioned again (against a
//! real nats-server named by `NATS_URL`, under a random prefix).

use async_nats::jetstream::consumer;
use drover_bus::{Bus, BusConfig, LEGACY_WORKER_CONSUMER, NatsRole, worker_consumer_name};
use drover_core::{Fence, InstanceId, Queue, Route, StepJob, StepSeq};

fn config() -> BusConfig {
    let url = std::env::var("NATS_URL").expect(
        "set NATS_URL to a nats-server >= 2.11 with JetStream (e.g. nats://127.0.0.1:4222)",
    );
    BusConfig {
        url,
        prefix: format!("b{}", uuid::Uuid::now_v7().simple()),
        // NATS reserves the stream's max bytes: keep it small so many tests fit.
        events_max_bytes: 16 << 20,
        ..Default::default()
    }
}

async fn bus() -> Bus {
    Bus::connect(config()).await.expect("NATS_URL is reachable")
}

fn job() -> StepJob {
    job_on(Queue::default())
}

fn job_on(queue: Queue) -> StepJob {
    let route = Route {
        queue,
        handler: None,
    };
    StepJob::new(InstanceId::new(), StepSeq(0), Fence(0), route)
}

fn gpu() -> Queue {
    "gpu".parse().expect("a slug")
}

#[tokio::test]
async fn a_deleted_jobs_stream_is_reported_missing_and_provisioned_again() {
    let bus = bus().await;
    let (_, provisioned) = bus
        .ensure_worker_consumer(&Queue::default())
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
    let err = bus
        .worker_consumer(&Queue::default())
        .await
        .expect_err("gone");
    assert!(err.needs_provisioning(), "{err}");

    let (_, provisioned) = bus
        .ensure_worker_consumer(&Queue::default())
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
        .delete_consumer(&worker_consumer_name(&Queue::default()))
        .await
        .expect("deleted");
    let (_, provisioned) = bus
        .ensure_worker_consumer(&Queue::default())
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

#[tokio::test]
async fn each_queue_has_its_own_consumer_and_gets_only_its_own_jobs() {
    let bus = Bus::connect(BusConfig {
        worker_queues: vec![Queue::default(), gpu()],
        ..config()
    })
    .await
    .expect("NATS_URL is reachable");
    bus.publish_jobs(&[job(), job_on(gpu()), job_on(gpu())])
        .await
        .expect("published");
    let mut default = bus
        .worker_consumer(&Queue::default())
        .await
        .expect("provisioned");
    let mut gpu_consumer = bus.worker_consumer(&gpu()).await.expect("provisioned");
    assert_eq!(default.info().await.expect("info").num_pending, 1);
    assert_eq!(gpu_consumer.info().await.expect("info").num_pending, 2);
    assert_eq!(
        gpu_consumer.cached_info().config.filter_subject,
        bus.subjects().job(&gpu())
    );
    bus.delete_streams().await;
}

#[tokio::test]
async fn the_catch_all_consumer_of_a_drover_before_queues_is_narrowed_out_of_the_way() {
    // A cluster as a Drover before worker queues left it: one `workers` consumer on every
    // job subject (with it, no queue's consumer could be created on the work-queue stream).
    let config = config();
    let before = Bus::connect(BusConfig {
        roles: vec![NatsRole::Api],
        ..config.clone()
    })
    .await
    .expect("NATS_URL is reachable");
    let s = before.subjects().clone();
    let jobs = before
        .jetstream()
        .get_stream(s.jobs_stream())
        .await
        .expect("the stream exists");
    jobs.create_consumer(consumer::pull::Config {
        durable_name: Some(LEGACY_WORKER_CONSUMER.to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        filter_subject: s.job_filter(),
        max_deliver: 10,
        max_ack_pending: 50_000,
        ..Default::default()
    })
    .await
    .expect("the legacy consumer");

    let bus = Bus::connect(config)
        .await
        .expect("a worker provisions its queue's consumer");
    let legacy = jobs
        .consumer_info(LEGACY_WORKER_CONSUMER)
        .await
        .expect("kept");
    assert_eq!(legacy.config.filter_subject, s.legacy_job());
    bus.publish_jobs(&[job()]).await.expect("published");
    let mut default = bus
        .worker_consumer(&Queue::default())
        .await
        .expect("provisioned");
    assert_eq!(default.info().await.expect("info").num_pending, 1);
    bus.provision().await.expect("idempotent");
    bus.delete_streams().await;
}
