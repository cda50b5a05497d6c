//! Least privilege on NATS, against a private nats-server configured with the users
//! `drover nats-config` generates: each role may do its job and nothing more.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use drover_bus::permissions::AuthorizationConfig;
use drover_bus::{Bus, BusConfig, NatsRole, server_addrs};
use drover_tests::{NatsServer, TestEnv, wait_until};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::support::{deploy, get, start, wait_settled};

fn prefix() -> String {
    format!("t{}", uuid::Uuid::now_v7().simple())
}

fn auth_config(prefix: &str, publish_allow: Option<Vec<String>>) -> AuthorizationConfig {
    AuthorizationConfig {
        prefix: prefix.to_owned(),
        publish_allow,
        ..Default::default()
    }
}

/// A client connected as `config` says, whose server errors (permission violations) arrive
/// on the returned channel.
async fn connect_watched(
    config: &BusConfig,
) -> anyhow::Result<(async_nats::Client, mpsc::UnboundedReceiver<String>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = config
        .connect_options()
        .await?
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(err) = event {
                    let _ = tx.send(err.to_string());
                }
            }
        })
        .connect(server_addrs(&config.url)?)
        .await?;
    Ok((client, rx))
}

/// Waits for the server to report a permissions violation naming `subject`.
async fn refused(
    errors: &mut mpsc::UnboundedReceiver<String>,
    subject: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(err)) => {
                if err.contains("Permissions Violation") && err.contains(&format!("\"{subject}\""))
                {
                    return Ok(());
                }
                seen.push(err);
            }
            Ok(None) => bail!("the connection's events ended"),
            Err(_) => bail!("no permissions violation for {subject:?}; server errors: {seen:?}"),
        }
    }
}

/// A JetStream context that gives up on an unanswered request after 2 s (a refused request
/// is never answered).
fn jetstream(client: &async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone())
}

async fn messages_in(env: &TestEnv, stream: &str) -> anyhow::Result<u64> {
    let mut stream = env.bus.jetstream().get_stream(stream).await?;
    Ok(stream.info().await?.state.messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_reader_may_neither_publish_jobs_nor_read_the_jobs_stream() -> anyhow::Result<()>
{
    let server = NatsServer::start(&auth_config(&prefix(), None)).await?;
    let env = TestEnv::with_nats(&server).await?;
    let s = env.bus.subjects().clone();
    let reader = server.bus_config(&[NatsRole::EventsReader])?;
    let (client, mut errors) = connect_watched(&reader).await?;
    let js = jetstream(&client);

    let job = s.job(&Default::default());
    let published = async { js.publish(job.clone(), "{}".into()).await?.await }.await;
    assert!(published.is_err(), "a job published: {published:?}");
    refused(&mut errors, &job).await?;

    let info = js.get_stream(s.jobs_stream()).await;
    assert!(info.is_err(), "the jobs stream described: {info:?}");
    refused(
        &mut errors,
        &format!("$JS.API.STREAM.INFO.{}", s.jobs_stream()),
    )
    .await?;
    let pulled = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            "workers-default",
            s.jobs_stream(),
        )
        .await;
    assert!(
        pulled.is_err(),
        "the workers consumer described: {:?}",
        pulled.map(|_| ())
    );
    refused(
        &mut errors,
        &format!("$JS.API.CONSUMER.INFO.{}.workers-default", s.jobs_stream()),
    )
    .await?;
    let mine = js
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                durable_name: Some("reader".to_owned()),
                ..Default::default()
            },
            s.jobs_stream(),
        )
        .await;
    assert!(
        mine.is_err(),
        "a consumer on the jobs stream: {:?}",
        mine.map(|_| ())
    );
    refused(
        &mut errors,
        &format!("$JS.API.CONSUMER.CREATE.{}.reader", s.jobs_stream()),
    )
    .await?;
    let _subscription = client.subscribe(s.job_filter()).await?;
    let err = tokio::time::timeout(Duration::from_secs(10), errors.recv())
        .await
        .context("no answer to the job subscription")?
        .context("the connection's events ended")?;
    assert!(
        err.contains("Permissions Violation for Subscription") && err.contains(&s.job_filter()),
        "{err}"
    );
    assert_eq!(messages_in(&env, &s.jobs_stream()).await?, 0);

    // What it may do, it can: read events through its own durable consumer.
    let bus = Bus::connect(reader).await?;
    let consumer = bus.events_consumer("reader").await?;
    assert_eq!(
        consumer.cached_info().config.durable_name.as_deref(),
        Some("reader")
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_may_neither_delete_nor_purge_a_stream_nor_delete_a_consumer() -> anyhow::Result<()>
{
    let server = NatsServer::start(&auth_config(&prefix(), None)).await?;
    let env = TestEnv::with_nats(&server).await?;
    let s = env.bus.subjects().clone();
    env.bus
        .jetstream()
        .publish(s.job(&Default::default()), "not a job".into())
        .await?
        .await?;
    // A worker provisions what it uses with its own user…
    let worker = server.bus_config(&[NatsRole::Worker])?;
    let _bus = Bus::connect(worker.clone()).await?;
    let (client, mut errors) = connect_watched(&worker).await?;
    let js = jetstream(&client);

    // …but deletes and purges nothing.
    for stream in [s.jobs_stream(), s.events_stream(), s.recovery_stream()] {
        let deleted = js.delete_stream(&stream).await;
        assert!(deleted.is_err(), "{stream} deleted");
        refused(&mut errors, &format!("$JS.API.STREAM.DELETE.{stream}")).await?;
    }
    let jobs = js.get_stream(s.jobs_stream()).await?;
    let purged = jobs.purge().await;
    assert!(purged.is_err(), "jobs purged: {purged:?}");
    refused(
        &mut errors,
        &format!("$JS.API.STREAM.PURGE.{}", s.jobs_stream()),
    )
    .await?;
    let deleted = jobs.delete_consumer("workers-default").await;
    assert!(deleted.is_err(), "the workers consumer deleted");
    refused(
        &mut errors,
        &format!(
            "$JS.API.CONSUMER.DELETE.{}.workers-default",
            s.jobs_stream()
        ),
    )
    .await?;
    let removed = jobs.delete_message(1).await;
    assert!(removed.is_err(), "a job message deleted: {removed:?}");
    refused(
        &mut errors,
        &format!("$JS.API.STREAM.MSG.DELETE.{}", s.jobs_stream()),
    )
    .await?;

    assert_eq!(messages_in(&env, &s.jobs_stream()).await?, 1);
    for stream in [s.events_stream(), s.recovery_stream()] {
        env.bus.jetstream().get_stream(&stream).await?;
    }
    env.bus.worker_consumer(&Default::default()).await?;
    env.cleanup().await;
    Ok(())
}

fn relay_workflow(subject: &str) -> String {
    format!(
        r#"
name: relay
vars: {{ by: null }}
steps:
  - id: announce
    kind: publish
    subject: "{subject}"
    payload: {{ id: "instance.id" }}
    next: [{{ to: wait }}]
  - {{ id: wait, kind: wait_event, name: approved, next: [{{ to: nap }}] }}
  - {{ id: nap, kind: sleep, for: 1s, next: [{{ to: record }}] }}
  - {{ id: record, kind: assign, set: {{ by: "steps.wait.by" }}, next: [{{ to: done }}] }}
  - {{ id: done, kind: end, status: completed }}
"#
    )
}

async fn state_of(api: &str, id: &str) -> anyhow::Result<Value> {
    let (status, body) = get(&format!("{api}/v1/instances/{id}")).await?;
    anyhow::ensure!(status == 200, "GET instance {id} answered {status}: {body}");
    Ok(body["state"].clone())
}

/// The instance id and kind of an event subject `<prefix>.evt.<campaign>.<wf>.<id>.<kind>`.
fn instance_and_kind(subject: &str) -> Option<(String, String)> {
    let mut tokens = subject.rsplit('.');
    let kind = tokens.next()?.to_owned();
    let instance = tokens.next()?.to_owned();
    Some((instance, kind))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_one_nats_user_per_role_runs_publish_and_wait_event_workflows()
-> anyhow::Result<()> {
    let prefix = prefix();
    let published = format!("ext{prefix}.announce");
    let allow = vec![format!("ext{prefix}.>")];
    let server = NatsServer::start(&auth_config(&prefix, Some(allow))).await?;
    let env = TestEnv::with_nats(&server).await?;
    let s = env.bus.subjects().clone();

    // An events reader, live and through its durable consumer; someone listening to what
    // the `publish` steps publish.
    let reader = Bus::connect(server.bus_config(&[NatsRole::EventsReader])?).await?;
    let mut live = reader.client().subscribe(s.event_filter()).await?;
    let consumer = reader.events_consumer("reader").await?;
    let listener = env.nats_client().await?;
    let mut announced = listener.subscribe(published.clone()).await?;

    // One node per role, each its own NATS user; one node with two roles as the union user,
    // given two server URLs.
    let api_node = env
        .spawn_node_env("api", &[], &server.node_env("api")?)
        .await?;
    let mut worker = env
        .spawn_node_env("worker", &[], &server.node_env("worker")?)
        .await?;
    let _coordinator = env
        .spawn_node_env("coordinator", &[], &server.node_env("coordinator")?)
        .await?;
    let mut union = server.node_env("node")?;
    union.push((
        "NATS_URL".to_owned(),
        format!("{},{}", server.url, server.url),
    ));
    let _both = env
        .spawn_node_env("worker,coordinator", &[], &union)
        .await?;
    let api = api_node.api();
    deploy(api, &relay_workflow(&published)).await?;
    let ids = start(api, "relay", json!({}), 5).await?;

    // Workers published for each instance (a `publish` step within --publish-allow)…
    let mut announced_ids = HashSet::new();
    while announced_ids.len() < ids.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), announced.next())
            .await
            .context("the publish steps did not all publish within 30 s")?
            .context("subscription ended")?;
        let payload: Value = serde_json::from_slice(&message.payload)?;
        announced_ids.insert(payload["id"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(announced_ids, ids.iter().cloned().collect::<HashSet<_>>());

    // …then each waits for its event, which the signaler user delivers over NATS; the api
    // node answers.
    for id in &ids {
        wait_until(
            &format!("instance {id} to wait"),
            Duration::from_secs(20),
            || async { Ok((state_of(api, id).await? == "waiting").then_some(())) },
        )
        .await?;
    }
    let signaler = server
        .bus_config(&[NatsRole::Signaler])?
        .connect_client()
        .await?;
    for id in &ids {
        let reply = signaler
            .request(s.signal(id, "approved"), r#"{"by":"nats"}"#.into())
            .await?;
        let reply: Value = serde_json::from_slice(&reply.payload)?;
        assert_eq!(reply, json!({ "delivered": "woke" }), "signal to {id}");
    }

    // The sleep's timer is the coordinator leader's: every instance completes.
    let states = wait_settled(&env, ids.len() as i64, Duration::from_secs(60)).await?;
    assert_eq!(states, vec![("completed".to_owned(), ids.len() as i64)]);
    for id in &ids {
        let (_, body) = get(&format!("{api}/v1/instances/{id}")).await?;
        assert_eq!(body["vars"]["by"], "nats", "{body}");
    }

    // The events reader read every instance's completion, live and from the stream.
    let mut live_done = HashSet::new();
    while live_done.len() < ids.len() {
        let message = tokio::time::timeout(Duration::from_secs(20), live.next())
            .await
            .context("not every completion reached the live reader")?
            .context("subscription ended")?;
        if let Some((id, kind)) = instance_and_kind(&message.subject)
            && kind == "completed"
        {
            live_done.insert(id);
        }
    }
    let mut messages = consumer.messages().await?;
    let mut read_done = HashSet::new();
    while read_done.len() < ids.len() {
        let message = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .context("not every completion was read from the events stream")?
            .context("consumer ended")?
            .map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
        if let Some((id, kind)) = instance_and_kind(&message.subject)
            && kind == "completed"
        {
            read_done.insert(id);
        }
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("acking an event: {e}"))?;
    }
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(live_done, expected);
    assert_eq!(read_done, expected);

    // A worker dies: the leader publishes its recovery task and a coordinator takes it.
    let mut tasks = listener.subscribe(s.recovery_filter()).await?;
    worker.kill().await?;
    let task = tokio::time::timeout(Duration::from_secs(20), tasks.next())
        .await
        .context("no recovery task for the killed worker within 20 s")?
        .context("subscription ended")?;
    let task = drover_bus::RecoveryTask::decode(&task.payload)
        .map_err(|e| anyhow::anyhow!("a recovery task that does not decode: {e}"))?;
    assert_eq!(task.node, worker.id);
    wait_until(
        "the recovery task to be taken",
        Duration::from_secs(20),
        || async { Ok((messages_in(&env, &s.recovery_stream()).await? == 0).then_some(())) },
    )
    .await?;

    // Nobody overstepped: the server logged no permission violation.
    let violations = server.violations();
    assert!(
        violations.is_empty(),
        "permission violations: {violations:#?}"
    );
    env.cleanup().await;
    Ok(())
}
