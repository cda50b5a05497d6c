//! All of Drover's NATS: subjects, stream and consumer provisioning, the job wire format,
//! CloudEvents, publishing with deterministic `Nats-Msg-Id`s, and the deliveries of the pull
//! consumers with their acks. The roles never touch a NATS client: they go through here.

mod auth;
pub mod contract;
mod delivery;
mod error;
mod event;
mod job;
pub mod permissions;
mod subjects;
pub mod trace;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::context::{
    ConsumerInfoError, ConsumerInfoErrorKind, CreateStreamErrorKind, GetStreamErrorKind,
    PublishError, PublishErrorKind,
};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use drover_core::event::{Fact, FactSubject};
use drover_core::{InstanceId, Queue, StepJob};

pub use auth::{NatsAuth, Secret, TlsConfig, redact_url, server_addrs};
pub use delivery::{Deliveries, Delivery, Fate};
pub use error::{Error, Result};
pub use event::{EventKind, Rendered, dataschema, render};
pub use job::{DecodeError, RecoveryTask, decode_job, encode_job};
pub use permissions::NatsRole;
pub use subjects::{Subjects, is_valid_prefix};

/// How to reach NATS and how to name things there.
#[derive(Clone)]
pub struct BusConfig {
    /// The server, or several separated by commas (`nats://a:4222,nats://b:4222`): the
    /// client connects to one and fails over to the others.
    pub url: String,
    /// Subject prefix of this cluster (`drover` unless several clusters share a server; tests
    /// use a random one). Also names the streams: `<PREFIX>_JOBS`, `<PREFIX>_EVENTS`.
    pub prefix: String,
    /// What this connection does: names its inbox prefix (`_INBOX.<prefix>.<user>`, see
    /// [`permissions::user_for`]) and decides which streams and consumers
    /// [`Bus::connect`] provisions. If unsure: every node role, [`NatsRole::NODE`].
    pub roles: Vec<NatsRole>,
    /// Who this connection is. If unsure: [`NatsAuth::None`] on a developer's machine, a user
    /// of `drover nats-config` anywhere else.
    pub auth: NatsAuth,
    pub tls: TlsConfig,
    /// The connection's name, shown by the server's monitoring. If unsure: `drover`.
    pub name: String,
    /// How long the EVENTS stream keeps events (`drover node --events-max-age`). If unsure:
    /// a week, time enough for a reader to come back from an outage.
    pub events_max_age: Duration,
    /// The most bytes the EVENTS stream keeps (`--events-max-bytes`); past it the oldest
    /// events are discarded, whatever their age. NATS sets this much of its JetStream storage
    /// (`max_file_store`) aside for the stream and refuses a stream it has no room for. If
    /// unsure: 10 GiB.
    pub events_max_bytes: i64,
    /// Copies of every stream Drover provisions (JOBS, EVENTS, RECOVERY) kept by a NATS
    /// cluster (`--stream-replicas`, 1 to 5). If unsure: 1 on a single server, 3 on a
    /// cluster of three or more. Give every node the same value: each applies its own at
    /// start.
    pub stream_replicas: usize,
    /// Job messages larger than this are garbage: terminated, never decoded. Real jobs are
    /// under 100 bytes.
    pub max_job_bytes: usize,
    /// How long a delivered job may go unacknowledged before redelivery; long steps send
    /// progress acks.
    pub ack_wait: Duration,
    /// Deliveries of one job message before NATS gives up on it (Postgres re-dispatches).
    pub max_deliver: i64,
    /// The worker queues whose consumers a worker connection provisions
    /// (`drover node --queues`). If unsure: the default queue alone.
    pub worker_queues: Vec<Queue>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "drover".to_owned(),
            roles: NatsRole::NODE.to_vec(),
            auth: NatsAuth::None,
            tls: TlsConfig::default(),
            name: "drover".to_owned(),
            events_max_age: DEFAULT_EVENTS_MAX_AGE,
            events_max_bytes: DEFAULT_EVENTS_MAX_BYTES,
            stream_replicas: 1,
            max_job_bytes: 4096,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            worker_queues: vec![Queue::default()],
        }
    }
}

/// Passwords in `url` are redacted; secrets in `auth` print as `***`.
impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("roles", &self.roles)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("name", &self.name)
            .field("events_max_age", &self.events_max_age)
            .field("events_max_bytes", &self.events_max_bytes)
            .field("stream_replicas", &self.stream_replicas)
            .field("max_job_bytes", &self.max_job_bytes)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.max_deliver)
            .field("worker_queues", &self.worker_queues)
            .finish()
    }
}

impl BusConfig {
    /// The subjects and stream names of this configuration's cluster.
    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.prefix)
    }

    /// Connects a plain client as this configuration says (servers, credentials, TLS, inbox
    /// prefix), provisioning nothing: what [`Bus::connect`] uses, and what a program reading
    /// events or sending signals needs. A server that does not answer yet (it may be
    /// starting alongside) is retried for [`CONNECT_WAIT`]; a refusal no retry mends (a
    /// login the server rejects, a certificate either side does not trust) fails at once,
    /// saying why. Once connected, the client reconnects by itself.
    pub async fn connect_client(&self) -> Result<async_nats::Client> {
        let servers = server_addrs(&self.url)?;
        let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
        let mut pause = Duration::from_millis(100);
        loop {
            let err = match self.connect_options().await?.connect(servers.clone()).await {
                Ok(client) => return Ok(client),
                Err(err) => err,
            };
            // async-nats says "IO error"; its source says "connection refused".
            let why = drover_core::error_chain(&err);
            if !unreachable(&err) {
                return Err(Error::Refused(why));
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(Error::Connect(format!(
                    "no server of {} answered within {CONNECT_WAIT:?}: {why}",
                    redact_url(&self.url)
                )));
            }
            tracing::warn!(%err, "no NATS server answers yet; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// The options [`BusConfig::connect_client`] connects with (servers aside: see
    /// [`server_addrs`]). It logs the server's errors (a permissions violation names the
    /// subject) through an event callback; replacing it loses those logs.
    pub async fn connect_options(&self) -> Result<async_nats::ConnectOptions> {
        if !is_valid_prefix(&self.prefix) {
            return Err(Error::Config(format!(
                "invalid subject prefix {:?}: use [a-z0-9][a-z0-9_-]*",
                self.prefix
            )));
        }
        let user = permissions::user_for(&self.roles);
        let mut options = async_nats::ConnectOptions::new()
            .name(&self.name)
            .custom_inbox_prefix(self.subjects().inbox_prefix(user))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::ServerError(err) => {
                        tracing::warn!(%err, "nats server error");
                    }
                    async_nats::Event::ClientError(err) => {
                        tracing::warn!(%err, "nats client error");
                    }
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::debug!(event = %other, "nats"),
                }
            });
        options = match &self.auth {
            NatsAuth::None => options,
            NatsAuth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.expose().to_owned())
            }
            NatsAuth::Token(token) => options.token(token.expose().to_owned()),
            NatsAuth::NKeySeedFile(path) => {
                let seed = tokio::fs::read_to_string(path).await.map_err(|err| {
                    Error::Config(format!(
                        "reading the NKey seed file {}: {err}",
                        path.display()
                    ))
                })?;
                let seed = seed
                    .lines()
                    .map(str::trim)
                    .find(|line| line.starts_with('S'))
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "the NKey seed file {} holds no seed (a line starting with `S`)",
                            path.display()
                        ))
                    })?;
                options.nkey(seed.to_owned())
            }
            NatsAuth::CredsFile(path) => options.credentials_file(path).await.map_err(|err| {
                Error::Config(format!(
                    "reading the credentials file {}: {err}",
                    path.display()
                ))
            })?,
        };
        let tls = &self.tls;
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => {
                return Err(Error::Config(
                    "a TLS client certificate needs both its certificate and its key file"
                        .to_owned(),
                ));
            }
        }
        if tls.required {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// How long the EVENTS stream keeps events unless told otherwise: a week.
pub const DEFAULT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most bytes the EVENTS stream keeps unless told otherwise: 10 GiB.
pub const DEFAULT_EVENTS_MAX_BYTES: i64 = 10 << 30;
/// The most copies of a stream a NATS cluster keeps.
pub const MAX_STREAM_REPLICAS: usize = 5;

/// How long [`BusConfig::connect_client`] waits for a server that does not answer.
pub const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Does a JetStream API error answer a stream create or update with "not this
/// configuration" (no retry mends it), rather than a passing trouble?
fn refuses_config(code: ErrorCode) -> bool {
    [
        ErrorCode(10052), // the stream configuration is invalid
        ErrorCode(10047), // insufficient storage resources
        ErrorCode(10074), // replicas > 1 on a server that is not clustered
        ErrorCode(10113), // the account requires a max bytes
        ErrorCode(10122), // max bytes above the account's limit
    ]
    .contains(&code)
}

/// `7d`, `1h 30m`: a duration as the flags take it.
fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= len && secs.is_multiple_of(len) {
            return format!("{}{unit}", secs / len);
        }
    }
    format!("{duration:?}")
}

/// Is `err` a server not (yet) answering, rather than a refusal? TLS failures reported as
/// I/O (a client certificate the server requires or rejects shows as an alert after the
/// handshake) carry invalid data; a server not listening refuses, resets or times out.
fn unreachable(err: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as Kind;
    match err.kind() {
        Kind::Io => {
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                    return io.kind() != std::io::ErrorKind::InvalidData;
                }
                source = cause.source();
            }
            true
        }
        Kind::Dns | Kind::TimedOut => true,
        _ => false,
    }
}

/// A connected bus with its streams provisioned. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    config: BusConfig,
}

/// The durable pull consumer of worker queue `queue`, which the workers serving it share:
/// `workers-<queue>`, filtering [`Subjects::job`].
pub fn worker_consumer_name(queue: &Queue) -> String {
    format!("workers-{queue}")
}

/// The one consumer all workers shared before worker queues, filtering every job subject. On
/// a WorkQueue stream consumers may not overlap, and no Drover user may delete a consumer: a
/// worker narrows it to [`Subjects::legacy_job`], where nothing is published any more (a
/// worker of the old version still running then gets only the old version's jobs).
pub const LEGACY_WORKER_CONSUMER: &str = "workers";
/// The durable pull consumer all coordinators share.
pub const RECOVERY_CONSUMER: &str = "coordinators";
/// The queue group of the api role's signal listeners: each signal is handled by one node.
pub const SIGNAL_QUEUE: &str = "signals";

impl Bus {
    /// Connects and provisions, idempotently (several nodes may do so at once), what
    /// `config.roles` use: every node role the JOBS and EVENTS streams, a worker the consumer
    /// of each of its `worker_queues`, a coordinator the RECOVERY stream and its consumer.
    /// Other roles provision nothing.
    pub async fn connect(config: BusConfig) -> Result<Self> {
        let client = config.connect_client().await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        let bus = Self {
            client,
            js,
            subjects: Subjects::new(&config.prefix),
            config,
        };
        bus.provision().await?;
        Ok(bus)
    }

    /// Creates the streams and consumers, or updates them to this configuration: idempotent,
    /// and safe while other nodes do the same. A node calls it at start and again whenever it
    /// finds a stream or consumer gone ([`Error::needs_provisioning`], or a consumer's message
    /// stream ending): an operator may delete or purge them by hand, and Postgres re-dispatches
    /// whatever jobs went with them.
    pub async fn provision(&self) -> Result<()> {
        let s = &self.subjects;
        let roles = &self.config.roles;
        if !roles.iter().any(|r| r.is_node_role()) {
            return Ok(());
        }
        self.check_stream_limits()?;
        self.create_or_update_stream(stream::Config {
            name: s.jobs_stream(),
            subjects: vec![s.job_filter()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            discard: stream::DiscardPolicy::Old,
            num_replicas: self.config.stream_replicas,
            ..Default::default()
        })
        .await?;
        self.create_or_update_stream(stream::Config {
            name: s.events_stream(),
            subjects: vec![s.event_filter()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: self.config.events_max_age,
            max_bytes: self.config.events_max_bytes,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.config.stream_replicas,
            ..Default::default()
        })
        .await?;
        if roles.contains(&NatsRole::Coordinator) {
            self.provision_recovery().await?;
        }
        if roles.contains(&NatsRole::Worker) {
            let jobs = self
                .js
                .get_stream(s.jobs_stream())
                .await
                .map_err(|e| Error::Provision(format!("stream {}: {e}", s.jobs_stream())))?;
            self.narrow_legacy_consumer(&jobs).await?;
            for queue in &self.config.worker_queues {
                let name = worker_consumer_name(queue);
                jobs.create_consumer(self.worker_consumer_config(&name, s.job(queue)))
                    .await
                    .map_err(|e| Error::Provision(format!("consumer {name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Narrows the [`LEGACY_WORKER_CONSUMER`] left by a Drover before worker queues, if there
    /// is one, so that it no longer overlaps the queues' consumers.
    async fn narrow_legacy_consumer(&self, jobs: &stream::Stream) -> Result<()> {
        let legacy = self.subjects.legacy_job();
        match jobs.consumer_info(LEGACY_WORKER_CONSUMER).await {
            Ok(info) if info.config.filter_subject == legacy => Ok(()),
            Ok(_) => {
                tracing::info!(
                    consumer = LEGACY_WORKER_CONSUMER,
                    subject = %legacy,
                    "narrowing the consumer of a Drover before worker queues to the subject it \
                     used (nothing new is published there)"
                );
                jobs.create_consumer(
                    self.worker_consumer_config(LEGACY_WORKER_CONSUMER, legacy.clone()),
                )
                .await
                .map_err(|e| {
                    Error::Provision(format!("narrowing consumer {LEGACY_WORKER_CONSUMER}: {e}"))
                })?;
                Ok(())
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Provision(format!(
                "consumer {LEGACY_WORKER_CONSUMER}: {e}"
            ))),
        }
    }

    async fn provision_recovery(&self) -> Result<()> {
        let s = &self.subjects;
        self.create_or_update_stream(stream::Config {
            name: s.recovery_stream(),
            subjects: vec![s.recovery_filter()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.config.stream_replicas,
            ..Default::default()
        })
        .await?;
        let recovery = self
            .js
            .get_stream(s.recovery_stream())
            .await
            .map_err(|e| Error::Provision(format!("stream {}: {e}", s.recovery_stream())))?;
        recovery
            .create_consumer(consumer::pull::Config {
                durable_name: Some(RECOVERY_CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: -1,
                filter_subject: s.recovery_filter(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Provision(format!("consumer {RECOVERY_CONSUMER}: {e}")))?;
        Ok(())
    }

    /// Refuses retention and replica settings no server accepts, before asking one.
    fn check_stream_limits(&self) -> Result<()> {
        let c = &self.config;
        if !(1..=MAX_STREAM_REPLICAS).contains(&c.stream_replicas) {
            return Err(Error::Config(format!(
                "stream replicas {} (--stream-replicas): use 1 to {MAX_STREAM_REPLICAS}",
                c.stream_replicas
            )));
        }
        if c.events_max_bytes < 1 {
            return Err(Error::Config(format!(
                "events max bytes {} (--events-max-bytes): must be positive",
                c.events_max_bytes
            )));
        }
        if c.events_max_age.is_zero() {
            return Err(Error::Config(
                "events max age 0 (--events-max-age): must be positive (0 would keep events \
                 forever)"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Creates `config`'s stream, or updates it to `config` (a changed setting takes effect
    /// on a stream that exists). A configuration the server refuses is an [`Error::Config`]
    /// naming the settings and their flags: no retry mends it.
    async fn create_or_update_stream(&self, config: stream::Config) -> Result<()> {
        let name = config.name.clone();
        let mut settings = format!("replicas {} (--stream-replicas)", config.num_replicas);
        if name == self.subjects.events_stream() {
            settings.push_str(&format!(
                ", max age {} (--events-max-age), max bytes {} (--events-max-bytes)",
                humanize(config.max_age),
                config.max_bytes
            ));
        }
        let err = match self.js.create_or_update_stream(config).await {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        match err.kind() {
            CreateStreamErrorKind::JetStream(js) if refuses_config(js.error_code()) => {
                Err(Error::Config(format!(
                    "the NATS server refused stream {name} with {settings}: {js}"
                )))
            }
            _ => Err(Error::Provision(format!(
                "stream {name} ({settings}): {err}"
            ))),
        }
    }

    fn worker_consumer_config(&self, name: &str, filter_subject: String) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: self.config.max_deliver,
            max_ack_pending: 50_000,
            filter_subject,
            ..Default::default()
        }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Is the connection to NATS up right now? (No I/O: the client's own view, which it keeps
    /// current while it reconnects.)
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The consumer of worker queue `queue` ([`Error::Missing`] if it or its stream is gone).
    pub async fn worker_consumer(&self, queue: &Queue) -> Result<consumer::PullConsumer> {
        self.consumer(self.subjects.jobs_stream(), &worker_consumer_name(queue))
            .await
    }

    /// Jobs of worker queue `queue` waiting for a worker (not yet delivered), and those
    /// delivered but not yet settled.
    pub async fn pending_jobs(&self, queue: &Queue) -> Result<(u64, u64)> {
        let mut consumer = self.worker_consumer(queue).await?;
        let info = consumer
            .info()
            .await
            .map_err(|err| Error::Subscribe(format!("reading consumer info: {err}")))?;
        Ok((
            info.num_pending,
            u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
        ))
    }

    /// The consumer of worker queue `queue` (one of the configuration's `worker_queues`),
    /// provisioned again first if it or its stream is gone; the flag says whether that was
    /// needed (the jobs the stream held are then lost: re-dispatch).
    pub async fn ensure_worker_consumer(
        &self,
        queue: &Queue,
    ) -> Result<(consumer::PullConsumer, bool)> {
        self.ensure_consumer(self.subjects.jobs_stream(), &worker_consumer_name(queue))
            .await
    }

    /// The recovery consumer, provisioned again first if it or its stream is gone; the flag
    /// says whether that was needed.
    pub async fn ensure_recovery_consumer(&self) -> Result<(consumer::PullConsumer, bool)> {
        self.ensure_consumer(self.subjects.recovery_stream(), RECOVERY_CONSUMER)
            .await
    }

    /// The deliveries of worker queue `queue`'s consumer, `batch` pulled at a time,
    /// provisioning again first if the consumer or its stream is gone; the flag says whether
    /// that was needed (the jobs the stream held are then lost: re-dispatch).
    pub async fn pull_jobs(
        &self,
        queue: &Queue,
        batch: usize,
    ) -> Result<(Deliveries<StepJob>, bool)> {
        let (consumer, provisioned) = self.ensure_worker_consumer(queue).await?;
        let messages = pull_stream(&consumer, batch).await?;
        Ok((
            Deliveries::new(messages, job::decode_job, self.config.max_job_bytes),
            provisioned,
        ))
    }

    /// The deliveries of the recovery consumer, one at a time, provisioning again first if
    /// it or its stream is gone; the flag says whether that was needed.
    pub async fn pull_recovery_tasks(&self) -> Result<(Deliveries<RecoveryTask>, bool)> {
        let (consumer, provisioned) = self.ensure_recovery_consumer().await?;
        let messages = pull_stream(&consumer, 1).await?;
        Ok((
            Deliveries::new(messages, |payload, _| RecoveryTask::decode(payload), 4096),
            provisioned,
        ))
    }

    async fn ensure_consumer(
        &self,
        stream: String,
        name: &str,
    ) -> Result<(consumer::PullConsumer, bool)> {
        match self.consumer(stream.clone(), name).await {
            Ok(consumer) => Ok((consumer, false)),
            Err(err) if err.needs_provisioning() => {
                self.provision().await?;
                Ok((self.consumer(stream, name).await?, true))
            }
            Err(err) => Err(err),
        }
    }

    async fn consumer(&self, stream: String, name: &str) -> Result<consumer::PullConsumer> {
        let handle = self.js.get_stream(&stream).await.map_err(|e| {
            let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND);
            if missing {
                Error::Missing(format!("stream {stream}"))
            } else {
                Error::Provision(format!("stream {stream}: {e}"))
            }
        })?;
        handle.get_consumer(name).await.map_err(|e| {
            let missing = e.downcast_ref::<ConsumerInfoError>().is_some_and(|e| {
                matches!(
                    e.kind(),
                    ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                )
            });
            if missing {
                Error::Missing(format!("consumer {name} of stream {stream}"))
            } else {
                Error::Provision(format!("consumer {name} of stream {stream}: {e}"))
            }
        })
    }

    /// The durable pull consumer `name` on the EVENTS stream (every event, from the oldest
    /// kept), created if missing: how an events reader reads without missing events while it
    /// is away. Needs only what the `events-reader` user may do.
    pub async fn events_consumer(&self, name: &str) -> Result<consumer::PullConsumer> {
        let stream = self
            .js
            .get_stream(self.subjects.events_stream())
            .await
            .map_err(|e| {
                Error::Provision(format!("stream {}: {e}", self.subjects.events_stream()))
            })?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                filter_subject: self.subjects.event_filter(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Provision(format!("consumer {name}: {e}")))
    }

    /// Deletes this prefix's streams (tests and benchmarks clean up with it). Best effort.
    pub async fn delete_streams(&self) {
        let s = &self.subjects;
        for name in [s.jobs_stream(), s.events_stream(), s.recovery_stream()] {
            let _ = self.js.delete_stream(name).await;
        }
    }

    /// The shared recovery-task consumer ([`Error::Missing`] if it or its stream is gone).
    pub async fn recovery_consumer(&self) -> Result<consumer::PullConsumer> {
        self.consumer(self.subjects.recovery_stream(), RECOVERY_CONSUMER)
            .await
    }

    /// Publishes a recovery task; `dedup` keys the `Nats-Msg-Id` (the same key within the
    /// duplicate window is published once).
    pub async fn publish_recovery(&self, task: &RecoveryTask, dedup: &str) -> Result<()> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(task.encode())
            .message_id(format!("r:{}:{dedup}", task.node));
        self.js
            .send_publish(self.subjects.recovery(), publish)
            .await
            .map_err(publish_error)?
            .await
            .map_err(publish_error)?;
        Ok(())
    }

    /// Subscribes to signals (`<prefix>.signal.*.*`) in the queue group [`SIGNAL_QUEUE`], so
    /// each one reaches one listener however many api nodes run. Plain NATS: a signal
    /// published while no listener runs is lost, so senders should use a request and wait
    /// for the answer.
    pub async fn subscribe_signals(&self) -> Result<async_nats::Subscriber> {
        self.client
            .queue_subscribe(self.subjects.signal_filter(), SIGNAL_QUEUE.to_owned())
            .await
            .map_err(|e| Error::Subscribe(e.to_string()))
    }

    /// Follows the events the relay publishes, live (a plain subscription, no consumer: what
    /// was published before, or while the subscriber lagged, is not seen): every event, or
    /// only those about `instance`. Gives each event's instance and kind. The web console's
    /// live updates.
    pub async fn follow_events(
        &self,
        instance: Option<drover_core::InstanceId>,
    ) -> Result<impl futures::Stream<Item = EventSeen> + Send + Unpin + 'static> {
        use futures::StreamExt as _;
        let subject = match instance {
            Some(id) => self.subjects.instance_event_filter(&id.to_string()),
            None => self.subjects.event_filter(),
        };
        let subscriber = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| Error::Subscribe(e.to_string()))?;
        Ok(subscriber.map(|message| EventSeen::of_subject(&message.subject)))
    }

    /// Publishes jobs pipelined (all sent, then all acks awaited), each to its queue's
    /// subject. Each carries `Nats-Msg-Id = j:{instance}:{step_seq}:{fence}`, so a
    /// re-dispatch of the same job inside the duplicate window is dropped by the server.
    pub async fn publish_jobs(&self, jobs: &[StepJob]) -> Result<()> {
        self.send_jobs(jobs, None).await
    }

    /// Publishes jobs again under `j:…:{tag}` message ids: a re-dispatch that must get through
    /// even if the first publish of the same job is still in the duplicate window (it may sit,
    /// unacknowledged, with a worker that died). A resulting double delivery only fails its
    /// claim.
    pub async fn redispatch_jobs(&self, jobs: &[StepJob], tag: &str) -> Result<()> {
        self.send_jobs(jobs, Some(tag)).await
    }

    async fn send_jobs(&self, jobs: &[StepJob], tag: Option<&str>) -> Result<()> {
        let mut acks = Vec::with_capacity(jobs.len());
        // The publisher's trace context (the API request, the step that led here, the sweep).
        let traceparent = trace::current_traceparent();
        for job in jobs {
            let msg_id = match tag {
                Some(tag) => format!("{}:{tag}", job::msg_id(job)),
                None => job::msg_id(job),
            };
            let mut publish = jetstream::message::PublishMessage::build()
                .payload(job::encode_job(job))
                .message_id(msg_id);
            if let Some(traceparent) = &traceparent {
                publish = publish.header("traceparent", traceparent.as_str());
            }
            let ack = self
                .js
                .send_publish(self.subjects.job(&job.route.queue), publish)
                .await
                .map_err(publish_error)?;
            acks.push(ack);
        }
        // Every ack is awaited (none left dangling), the first failure reported.
        let mut failure = None;
        for ack in acks {
            if let Err(err) = ack.await
                && failure.is_none()
            {
                failure = Some(publish_error(err));
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Does a JetStream stream store `subject`? (A JetStream publish to a subject no stream
    /// stores would wait for an ack that never comes.) Asks the server every time.
    pub async fn stream_stores(&self, subject: &str) -> bool {
        self.js.stream_by_subject(subject).await.is_ok()
    }

    /// Publishes a plain NATS message (no stream stores `subject`: it reaches the live
    /// subscribers, if any), with `headers`.
    pub async fn publish_plain(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
    ) -> Result<()> {
        self.client
            .publish_with_headers(subject.to_owned(), header_map(headers), payload)
            .await
            .map_err(|err| Error::Publish(err.to_string()))
    }

    /// Publishes to the stream that stores `subject` and waits for its ack; returns the
    /// message's stream sequence. A `Nats-Msg-Id` among `headers` deduplicates it.
    pub async fn publish_stored(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
    ) -> Result<u64> {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(header_map(headers));
        let ack = self
            .js
            .send_publish(subject.to_owned(), publish)
            .await
            .map_err(|err| Error::Publish(err.to_string()))?
            .await
            .map_err(|err| Error::Publish(err.to_string()))?;
        Ok(ack.sequence)
    }

    /// Publishes `facts` as CloudEvents (see [`event::render`]), each with `Nats-Msg-Id` = its
    /// id, so that a later event of an instance (or campaign) never lands before an earlier
    /// one: each one's events go in their order, one at a time, and its next is sent only once
    /// the server has acknowledged the one before. Different instances' go pipelined, a wave
    /// at a time (the first of each, then the second of each, …). Returns the ids the server
    /// acknowledged (the rest are relayed again later) and the first failure, if any (not
    /// logged here: the relay logs an outage once).
    ///
    /// (Sending an instance's events pipelined and stopping at the first failure was not
    /// enough: when the events stream was deleted and provisioned again mid-batch, an event
    /// sent before it was back failed while a later one, sent after, landed first.)
    pub async fn relay(&self, facts: &[Fact]) -> Relayed {
        // Each instance's (or, for campaign events, campaign's) events, in the order given.
        let mut groups: Vec<VecDeque<&Fact>> = Vec::new();
        let mut index: HashMap<(Option<InstanceId>, &str), usize> = HashMap::new();
        for fact in facts {
            let instance = match &fact.subject {
                FactSubject::Instance { id, .. } => Some(*id),
                FactSubject::Campaign => None,
            };
            let key = (instance, fact.campaign.as_str());
            let at = *index.entry(key).or_insert_with(|| {
                groups.push(VecDeque::new());
                groups.len() - 1
            });
            if let Some(group) = groups.get_mut(at) {
                group.push_back(fact);
            }
        }
        let mut failure = None;
        let mut ids = Vec::with_capacity(facts.len());
        while !groups.is_empty() {
            let mut pending = Vec::with_capacity(groups.len());
            for (at, group) in groups.iter_mut().enumerate() {
                let Some(fact) = group.pop_front() else {
                    continue;
                };
                match self.send_fact(fact).await {
                    Ok(ack) => pending.push((at, fact.id, ack)),
                    Err(err) => {
                        // Neither it nor the rest of its instance's go this time.
                        group.clear();
                        failure.get_or_insert(err);
                    }
                }
            }
            for (at, id, ack) in pending {
                match ack.await {
                    Ok(_) => ids.push(id),
                    Err(err) => {
                        if let Some(group) = groups.get_mut(at) {
                            group.clear();
                        }
                        failure.get_or_insert(publish_error(err));
                    }
                }
            }
            groups.retain(|group| !group.is_empty());
        }
        Relayed { ids, failure }
    }

    /// Sends one fact as its CloudEvent; the future answers the server's ack.
    async fn send_fact(
        &self,
        fact: &Fact,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture> {
        let rendered = event::render(&self.subjects, fact);
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/cloudevents+json");
        // Not sent if it cannot be rendered: it stays in the outbox to inspect.
        let payload = serde_json::to_vec(&rendered.cloudevent)
            .map_err(|err| Error::Publish(format!("event {}: {err}", fact.id)))?;
        let publish = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(payload))
            .headers(headers)
            .message_id(fact.id.to_string());
        self.js
            .send_publish(rendered.subject, publish)
            .await
            .map_err(publish_error)
    }
}

/// What [`Bus::relay`] got through.
#[derive(Debug, Default)]
pub struct Relayed {
    /// The events the server acknowledged.
    pub ids: Vec<uuid::Uuid>,
    /// The first publish that failed ([`Error::Missing`] when no stream stores the subject:
    /// the events stream is gone).
    pub failure: Option<Error>,
}

/// Opens the message stream of a pull consumer, `batch` messages pulled at a time.
/// How long one pull request stays open on the server. Short, so that a node that stops
/// reading (frozen, or dead before anyone noticed) is sent nothing more after this: the
/// server hands the jobs to the nodes still pulling instead of into a socket nobody reads.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// The server's idle heartbeat on an open pull request (at most half its expiry); two missed
/// ones end the message stream, which the worker then opens again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

async fn pull_stream(consumer: &consumer::PullConsumer, batch: usize) -> Result<pull::Stream> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(PULL_HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await
        .map_err(|err| Error::Subscribe(format!("pulling from consumer: {err}")))
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, *value);
    }
    map
}

/// A JetStream publish error: "no stream stores this subject" (the server answers "no
/// responders") means the stream is gone.
fn publish_error(err: PublishError) -> Error {
    match err.kind() {
        PublishErrorKind::StreamNotFound => {
            Error::Missing(format!("stream for the subject: {err}"))
        }
        _ => Error::Publish(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_not_listening_is_unreachable_not_a_refusal() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let err = async_nats::ConnectOptions::new()
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .expect_err("nothing listens");
        assert!(unreachable(&err), "{err}");
    }
}

/// An event seen on its subject (`<prefix>.evt.<campaign>.<workflow>.<instance>.<kind>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSeen {
    /// The instance id as the subject spells it (`_` for a campaign's own events).
    pub instance: String,
    pub kind: String,
}

impl EventSeen {
    fn of_subject(subject: &str) -> Self {
        let mut tokens = subject.rsplit('.');
        let kind = tokens.next().unwrap_or_default().to_owned();
        let instance = tokens.next().unwrap_or_default().to_owned();
        Self { instance, kind }
    }
}
