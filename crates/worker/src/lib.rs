//! The worker role: pulls step jobs, claims their instances in batches, runs the steps,
//! group-commits the checkpoints, publishes the next jobs, then acks.
//!
//! An instance moving on to its next step is claimed again by its node in that commit (unless
//! the node is draining, or an operator asked it to stop or pause) and runs on here at once:
//! no job round trip through NATS, no claim statement. So does a queued instance admitted with
//! a campaign permit that commit released, in the slot of the step that released it. Jobs go
//! through NATS for new, woken, retried, other admitted, and recovered instances.
//!
//! Checkpoint, then publish, then ack: a crash anywhere in between leaves the instance either
//! at its old checkpoint (the job is redelivered or recovered) or at its new one (the next job
//! is published again by the stale-READY sweeper). A stale or duplicate delivery fails its
//! claim's compare-and-set and is acked and dropped.
//!
//! A worker pulls from the consumer of each worker queue it serves (its bus's
//! `worker_queues`). A job for a `handler` step whose handler it lacks is left, unclaimed, for
//! a worker that has it (see [`Worker`]): it waits for one, however long, and never fails for
//! want of one.
//!
//! Infrastructure trouble is waited out, never a reason to stop: a deleted jobs stream or
//! consumer is provisioned again and the READY instances re-dispatched at once (the jobs of a
//! purged one are re-dispatched by the leader's stale-READY sweeper); Postgres or NATS being
//! away makes claims, commits and the relay retry with capped back-off, logging an outage once
//! when it begins and once when it ends. While the node cannot heartbeat, its [`ClaimGate`] is
//! closed and nothing new is claimed, not even a next step in the commit of the last.

mod body;
mod commit;
mod egress;
mod error;
mod feed;
mod gate;
mod handler;
mod local;
pub mod maintenance;
mod relay;
mod settle;
mod step;
mod waiting;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use drover_bus::{Bus, Delivery};
use drover_core::backoff::SharedOutage;
use drover_core::{Definition, NodeId, PublishPolicy, StepJob, SubjectAllowList};
use drover_store::{Claimed, Store};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span};

pub use egress::{DEFAULT_HTTP_DENY, EgressPolicy, EgressRule, EgressRules, Refusal};
pub use error::{Error, Result};
pub use gate::ClaimGate;
pub use handler::{HandlerInput, Handlers, StepError};
pub use local::{LocalStarts, Reservation};
pub use relay::{OutboxRelay, RelayConfig};

use body::StepContext;
use commit::{Committer, Done};
use feed::JobFeed;
use settle::{Outcome, settle};

/// A job message as the worker's consumers deliver it.
pub(crate) type JobDelivery = Delivery<StepJob>;

/// Worker tuning. If unsure, keep the defaults.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Steps running at once on this node. Many steps wait on I/O; no-op steps take
    /// microseconds, so this mostly bounds memory.
    pub concurrency: usize,
    /// Most jobs claimed, and most completions committed, in one statement.
    pub batch_size: usize,
    /// Group commits on their way to Postgres at once. More lets a finished step go out
    /// without waiting behind the commits in flight; fewer makes bigger batches (fewer
    /// statements per step) under heavy load.
    pub commits_in_flight: usize,
    /// How long a drain waits for in-flight steps on shutdown.
    pub drain_timeout: Duration,
    /// Where `http` steps may connect. The default refuses cloud metadata addresses; add the
    /// API's own address when the node serves it ([`EgressRule::listener`]).
    pub egress: EgressPolicy,
    /// When set and not empty, `publish` steps may only publish to subjects it matches
    /// (checked when the step runs, besides at deploy: the list may have changed).
    pub publish_allow: Option<SubjectAllowList>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 512,
            batch_size: 256,
            commits_in_flight: 2,
            drain_timeout: Duration::from_secs(20),
            egress: EgressPolicy::default(),
            publish_allow: None,
        }
    }
}

/// Counters a node reports.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub claimed: AtomicU64,
    /// Instances claimed again by this node in the commit of their previous step.
    pub continued: AtomicU64,
    /// Queued instances admitted with a permit a commit of this node released, and claimed
    /// for this node in that commit.
    pub handed: AtomicU64,
    pub committed: AtomicU64,
    /// Deliveries whose claim found the instance moved on (acked and dropped).
    pub stale: AtomicU64,
    /// Job messages that could not be decoded (terminated).
    pub garbage: AtomicU64,
    /// Completions rejected at commit by the fence.
    pub fenced: AtomicU64,
    /// Deliveries of `handler` steps whose handler this worker lacks, left for another.
    pub left: AtomicU64,
    pub in_flight: AtomicU64,
}

/// Builds a [`Worker`]: `Worker::builder().handler("name", f).build(node, store, bus)`. It
/// serves the queues of its bus's [`worker_queues`](drover_bus::BusConfig::worker_queues);
/// its node row must advertise its queues and handlers (as `drover node` registers it): the
/// store claims a `handler` step only for a node advertising its handler.
#[derive(Default)]
pub struct WorkerBuilder {
    handlers: Handlers,
    config: WorkerConfig,
    gate: ClaimGate,
    local: LocalStarts,
}

impl WorkerBuilder {
    /// Registers a Rust handler for `handler` steps named `name`.
    pub fn handler<F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(HandlerInput) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, StepError>> + Send + 'static,
    {
        self.handlers.insert(name, f);
        self
    }

    pub fn handlers(mut self, handlers: Handlers) -> Self {
        self.handlers = handlers;
        self
    }

    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// The gate its node closes while it cannot heartbeat (open by default).
    pub fn claim_gate(mut self, gate: ClaimGate) -> Self {
        self.gate = gate;
        self
    }

    /// Where this process's api finds the worker, to start small starts here at once.
    pub fn local_starts(mut self, local: LocalStarts) -> Self {
        self.local = local;
        self
    }

    pub fn build(self, node: NodeId, store: Store, bus: Bus) -> Worker {
        let egress = egress::Egress::new(self.config.egress.clone());
        let publish = PublishPolicy {
            prefix: bus.subjects().prefix().to_owned(),
            allow: self.config.publish_allow.clone(),
        };
        Worker {
            node,
            store: store.clone(),
            config: self.config,
            stats: Arc::new(WorkerStats::default()),
            definitions: Arc::new(RwLock::new(HashMap::new())),
            ctx: Arc::new(StepContext {
                bus,
                store,
                egress,
                publish,
                handlers: self.handlers,
                streams_by_subject: Default::default(),
            }),
            relay_wakeup: Arc::new(tokio::sync::Notify::new()),
            gate: self.gate,
            postgres: Arc::new(SharedOutage::default()),
            nats: Arc::new(SharedOutage::default()),
            missing_handlers: Default::default(),
            local: self.local,
        }
    }
}

type DefinitionCache = Arc<RwLock<HashMap<(String, i32), Arc<Definition>>>>;

/// The worker role of one node.
///
/// A job for a `handler` step whose handler it lacks is left for a worker that has it, never
/// claimed (the claim would refuse it anyway: see [`Store::claim`]): nak'd with a delay that
/// doubles with each delivery up to [`LEAVE_DELAY_MAX`], so it goes round the queue's workers
/// without spinning, and on the last delivery NATS allows (`max_deliver`) published again as a
/// fresh message, if it is still the instance's job. While no worker alive can run it, the
/// stale-READY sweeper leaves it alone; once one registers, it re-dispatches it.
pub struct Worker {
    node: NodeId,
    store: Store,
    config: WorkerConfig,
    stats: Arc<WorkerStats>,
    definitions: DefinitionCache,
    ctx: Arc<StepContext>,
    relay_wakeup: Arc<tokio::sync::Notify>,
    gate: ClaimGate,
    /// Postgres as this worker's claims, commits and loads see it: an outage is logged once.
    postgres: Arc<SharedOutage>,
    /// NATS as this worker's publishes see it.
    nats: Arc<SharedOutage>,
    /// The handlers jobs have asked for that this worker lacks: each is logged once.
    missing_handlers: std::sync::Mutex<HashSet<String>>,
    /// Offered to the api of this process while the worker runs.
    local: LocalStarts,
}

/// How long a draining worker keeps giving back deliveries that were already on their way.
const GIVE_BACK_WINDOW: Duration = Duration::from_millis(100);

/// The longest a worker leaves a job it cannot run before it is delivered again.
pub const LEAVE_DELAY_MAX: Duration = Duration::from_secs(30);

impl Worker {
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        Arc::clone(&self.stats)
    }

    /// Woken after each group commit, so the outbox relay sends events at once.
    pub fn relay_wakeup(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.relay_wakeup)
    }

    /// Pulls and runs jobs until `shutdown`, then drains in-flight steps. Infrastructure
    /// trouble is waited out (see the crate docs); it returns an error only if its commit
    /// task died.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        // A batch waits for a permit per job: one larger than the concurrency would never get
        // them all.
        let pull_batch = self.config.batch_size.min(self.config.concurrency).max(1);
        let queues = self.ctx.bus.config().worker_queues.clone();
        if queues.is_empty() {
            return Err(Error::Consumer("the worker serves no queue".to_owned()));
        }
        let mut jobs = JobFeed::new(
            self.ctx.bus.clone(),
            self.store.clone(),
            pull_batch,
            &queues,
        );
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let tasks = TaskTracker::new();
        let (done_tx, done_rx) = mpsc::channel::<Done>(self.config.concurrency.max(1));
        let runner = Runner {
            node: self.node,
            ctx: Arc::clone(&self.ctx),
            store: self.store.clone(),
            definitions: Arc::clone(&self.definitions),
            stats: Arc::clone(&self.stats),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            postgres: Arc::clone(&self.postgres),
        };
        let committer = Committer {
            node: self.node,
            store: self.store.clone(),
            bus: self.ctx.bus.clone(),
            batch_size: self.config.batch_size,
            commits_in_flight: self.config.commits_in_flight.max(1),
            stats: Arc::clone(&self.stats),
            relay_wakeup: Arc::clone(&self.relay_wakeup),
            delayed: tasks.clone(),
            runner: runner.clone(),
            done_tx: done_tx.downgrade(),
            postgres: Arc::clone(&self.postgres),
            nats: Arc::clone(&self.nats),
            gate: self.gate.clone(),
        };
        let committer = tokio::spawn(committer.run(done_rx, shutdown.clone()));
        self.local.install(local::Slot {
            node: self.node,
            runner: runner.clone(),
            permits: Arc::clone(&permits),
            done_tx: done_tx.downgrade(),
            gate: self.gate.clone(),
            shutdown: shutdown.clone(),
        });
        let queues: Vec<&str> = queues.iter().map(|q| q.as_str()).collect();
        tracing::info!(node.id = %self.node, ?queues, "worker pulling jobs");

        loop {
            if !self.gate.is_open() {
                tracing::warn!(node.id = %self.node, "not claiming: the node cannot heartbeat");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.gate.opened() => {}
                }
                tracing::info!(node.id = %self.node, "claiming again: the node heartbeats");
            }
            let Some(first) = jobs.next(&shutdown).await else {
                break;
            };
            let mut batch = vec![first];
            while batch.len() < pull_batch {
                match jobs.next_now() {
                    Some(msg) => batch.push(msg),
                    None => break,
                }
            }
            if !self.gate.is_open() {
                // Its heartbeat failed while these came: give them back (they go to another
                // node, or come back here once the node heartbeats again).
                for delivery in &batch {
                    settle(delivery, Outcome::Returned).await;
                }
                continue;
            }
            let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            let permit = tokio::select! {
                () = shutdown.cancelled() => {
                    for delivery in &batch {
                        settle(delivery, Outcome::GivenBack).await;
                    }
                    break;
                }
                permit = Arc::clone(&permits).acquire_many_owned(n) => {
                    permit.expect("invariant: the semaphore is never closed")
                }
            };
            let span = tracing::info_span!("claim_batch", node.id = %self.node, size = batch.len());
            self.dispatch(batch, permit, &runner, &done_tx)
                .instrument(span)
                .await;
        }

        self.local.clear();
        // Drain: no new jobs — those delivered here but not started go back at once, for the
        // other workers to take now rather than after the ack wait — and in-flight steps
        // finish and commit within the grace period.
        let mut given_back = 0;
        // Deliveries already on their way land within moments: look for a short while.
        let until = tokio::time::Instant::now() + GIVE_BACK_WINDOW;
        loop {
            match jobs.next_now() {
                Some(delivery) => {
                    settle(&delivery, Outcome::GivenBack).await;
                    given_back += 1;
                }
                None if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                None => break,
            }
        }
        // No more pulls: what the server would send now goes to the other workers.
        drop(jobs);
        if given_back > 0 {
            tracing::info!(node.id = %self.node, jobs = given_back, "draining: gave back the jobs not started");
        }
        tasks.close();
        drop(done_tx);
        if tokio::time::timeout(self.config.drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain timed out; unfinished steps will be recovered elsewhere");
        }
        match tokio::time::timeout(self.config.drain_timeout, committer).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => Err(Error::Consumer(format!("committer task failed: {err}"))),
            Err(_) => {
                tracing::warn!("final commits timed out; those steps will be recovered elsewhere");
                Ok(())
            }
        }
    }

    /// Decodes, claims and starts a batch of deliveries.
    async fn dispatch(
        &self,
        batch: Vec<JobDelivery>,
        mut permit: OwnedSemaphorePermit,
        runner: &Runner,
        done_tx: &mpsc::Sender<Done>,
    ) {
        let mut jobs: Vec<StepJob> = Vec::with_capacity(batch.len());
        let mut deliveries: Vec<JobDelivery> = Vec::with_capacity(batch.len());
        for delivery in batch {
            let job = match delivery.decoded() {
                Ok(job) => job.clone(),
                Err(err) => {
                    self.stats.garbage.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("drover_worker_garbage_jobs_total").increment(1);
                    tracing::warn!(subject = delivery.subject(), %err, "terminating undecodable job message");
                    settle(&delivery, Outcome::Garbage).await;
                    continue;
                }
            };
            if self.can_run(&job) {
                jobs.push(job);
                deliveries.push(delivery);
            } else {
                self.leave(job, &delivery).await;
            }
        }
        if jobs.is_empty() {
            return;
        }
        metrics::histogram!("drover_worker_claim_batch_size").record(jobs.len() as f64);
        let clock = std::time::Instant::now();
        let claimed = commit::with_retries(|| self.store.claim(self.node, &jobs)).await;
        metrics::histogram!("drover_worker_claim_duration_seconds")
            .record(clock.elapsed().as_secs_f64());
        let claimed = match claimed {
            Ok(claimed) => {
                commit::postgres_ok(&self.postgres);
                claimed
            }
            Err(err) => {
                if err.is_transient() {
                    commit::postgres_failed(&self.postgres, &err, "claiming");
                } else {
                    tracing::error!(%err, "claim failed; jobs will be redelivered");
                }
                for delivery in &deliveries {
                    settle(delivery, Outcome::Returned).await;
                }
                return;
            }
        };
        self.stats
            .claimed
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        let mut by_id: HashMap<_, Claimed> = claimed.into_iter().map(|c| (c.id, c)).collect();
        for (job, delivery) in jobs.iter().zip(deliveries) {
            let Some(claimed) = by_id.remove(&job.instance) else {
                // Stale or duplicate: the instance has moved past this job.
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("drover_worker_stale_deliveries_total").increment(1);
                settle(&delivery, Outcome::Finished).await;
                continue;
            };
            let Some(step_permit) = permit.split(1) else {
                // invariant: one permit was taken per delivered message
                settle(&delivery, Outcome::Returned).await;
                continue;
            };
            runner.start(claimed, Some(delivery), step_permit, done_tx.clone());
        }
    }

    /// Has it what `job`'s step needs? (Its queue it serves: the job came from its consumer.)
    fn can_run(&self, job: &StepJob) -> bool {
        job.route
            .handler
            .as_deref()
            .is_none_or(|handler| self.ctx.handlers.get(handler).is_some())
    }

    /// Leaves a job it cannot run for a worker that can (see [`Worker`]).
    async fn leave(&self, job: StepJob, delivery: &JobDelivery) {
        self.stats.left.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("drover_worker_jobs_left_total").increment(1);
        let handler = job.route.handler.clone().unwrap_or_default();
        let first = self
            .missing_handlers
            .lock()
            .is_ok_and(|mut missing| missing.insert(handler.clone()));
        if first {
            tracing::warn!(node.id = %self.node, handler, queue = %job.route.queue, "jobs need a handler this worker does not have; leaving them for a worker that has it");
        }
        let delivered = delivery.delivered();
        let max_deliver = self.ctx.bus.config().max_deliver;
        if max_deliver > 0 && delivered >= max_deliver {
            // NATS would give up on it after this delivery: publish it afresh, unless the
            // instance has moved past it.
            self.republish(job, delivery).await;
            return;
        }
        settle(delivery, Outcome::Left { delivered }).await;
    }

    /// Publishes a job left on its last delivery again as a fresh message, then acks the old
    /// one; a job whose instance has moved on is only acked.
    async fn republish(&self, job: StepJob, delivery: &JobDelivery) {
        let current = match commit::with_retries(|| {
            self.store.current_jobs(std::slice::from_ref(&job))
        })
        .await
        {
            Ok(current) => !current.is_empty(),
            Err(err) => {
                // Dropped by NATS after this delivery; the stale-READY sweeper publishes it
                // again once a worker that can run it is alive.
                tracing::warn!(instance.id = %job.instance, %err, "cannot tell whether a left job is current; leaving it to the sweeper");
                settle(delivery, Outcome::Returned).await;
                return;
            }
        };
        if current {
            let tag = format!(
                "l{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            );
            if let Err(err) = self
                .ctx
                .bus
                .redispatch_jobs(std::slice::from_ref(&job), &tag)
                .await
            {
                tracing::warn!(instance.id = %job.instance, %err, "cannot publish a left job again; leaving it to the sweeper");
                settle(delivery, Outcome::Returned).await;
                return;
            }
        }
        settle(delivery, Outcome::Finished).await;
    }
}

/// Why a claimed step's definition is not at hand.
enum LoadError {
    /// It cannot run (not deployed, invalid): the instance goes `in_error` with this.
    Broken(String),
    /// Postgres stayed away until the worker stopped: leave the step to recovery.
    Unavailable,
}

async fn load_definition(
    runner: &Runner,
    workflow: &str,
    version: i32,
) -> Result<Arc<Definition>, LoadError> {
    let key = (workflow.to_owned(), version);
    if let Some(def) = runner
        .definitions
        .read()
        .ok()
        .and_then(|c| c.get(&key).cloned())
    {
        return Ok(def);
    }
    let stored = commit::until_done(
        || runner.store.get_definition(workflow, Some(version)),
        &runner.shutdown,
        &runner.postgres,
        "loading a workflow definition",
    )
    .await
    .map_err(|e| {
        if e.is_transient() {
            LoadError::Unavailable
        } else {
            LoadError::Broken(format!("loading {workflow} v{version}: {e}"))
        }
    })?
    .ok_or_else(|| LoadError::Broken(format!("workflow {workflow} v{version} is not deployed")))?;
    let def = Definition::from_json(&stored.body).map_err(|e| {
        LoadError::Broken(format!(
            "stored definition {workflow} v{version} is invalid: {e}"
        ))
    })?;
    let def = Arc::new(def);
    if let Ok(mut cache) = runner.definitions.write() {
        cache.insert(key, Arc::clone(&def));
    }
    Ok(def)
}

/// Starts claimed steps: the pull loop for the jobs it claims, the committer for the
/// instances it continues on their next step.
#[derive(Clone)]
pub(crate) struct Runner {
    /// This worker's node: a field of every step's span.
    node: NodeId,
    ctx: Arc<StepContext>,
    store: Store,
    definitions: DefinitionCache,
    stats: Arc<WorkerStats>,
    tasks: TaskTracker,
    /// The worker's shutdown: a step whose definition cannot be loaded before it is given up.
    shutdown: CancellationToken,
    postgres: Arc<SharedOutage>,
}

impl Runner {
    /// Runs `claimed`'s current step in a tracked task holding `permit`, in the step's span;
    /// `delivery` is the job it came from, if any.
    pub(crate) fn start(
        &self,
        claimed: Claimed,
        delivery: Option<JobDelivery>,
        permit: OwnedSemaphorePermit,
        done_tx: mpsc::Sender<Done>,
    ) {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let span = step_span(
            self.node,
            &claimed,
            &claimed.current_step,
            claimed.step_seq.0,
            claimed.step_attempt,
        );
        if let Some(delivery) = &delivery {
            drover_bus::trace::link_to_publisher(&span, delivery);
        }
        self.tasks
            .spawn(run_one(self.clone(), claimed, delivery, permit, done_tx).instrument(span));
    }
}

/// The span of one step of `claimed` on `node`: a root, since a step is its own unit of work
/// whichever batch claimed it, in a trace of its own linked to the instance's root (no trace
/// grows with the instance).
fn step_span(node: NodeId, claimed: &Claimed, step_id: &str, seq: i64, attempt: i32) -> Span {
    let span = tracing::info_span!(
        parent: None,
        "step",
        instance.id = %claimed.id,
        workflow = %claimed.workflow,
        campaign = %claimed.campaign,
        step.id = %step_id,
        step.seq = seq,
        attempt = attempt,
        node.id = %node,
    );
    drover_bus::trace::link_to_instance_root(&span, claimed.id);
    span
}

/// Runs one claimed step, sending progress acks while it takes long, and hands the result to
/// the committer.
async fn run_one(
    runner: Runner,
    claimed: Claimed,
    delivery: Option<JobDelivery>,
    permit: OwnedSemaphorePermit,
    done_tx: mpsc::Sender<Done>,
) {
    let ctx = Arc::clone(&runner.ctx);
    let started_at = Utc::now();
    let clock = std::time::Instant::now();
    let mut kind = "unknown";
    let completion = match load_definition(&runner, &claimed.workflow, claimed.version).await {
        Ok(def) => {
            kind = def
                .step(&claimed.current_step)
                .map_or("unknown", |step| step.kind.name());
            let progress_every = ctx.bus.config().ack_wait / 3;
            let step = step::run(Arc::clone(&ctx), def, &claimed, started_at);
            tokio::pin!(step);
            let mut ticker = tokio::time::interval_at(
                tokio::time::Instant::now() + progress_every,
                progress_every,
            );
            loop {
                tokio::select! {
                    completion = &mut step => break completion,
                    _ = ticker.tick() => {
                        if let Some(delivery) = &delivery {
                            settle(delivery, Outcome::Running).await;
                        }
                    }
                }
            }
        }
        Err(LoadError::Broken(error)) => step::stop_in_error(&claimed, started_at, "error", error),
        Err(LoadError::Unavailable) => {
            // The worker is stopping and Postgres is away: nothing ran, nothing is
            // committed. The instance stays RUNNING on this node, and is taken back
            // when the node is declared dead or leaves.
            tracing::warn!(instance.id = %claimed.id, "step abandoned: its definition could not be loaded before the worker stopped");
            runner.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Some(delivery) = &delivery {
                settle(delivery, Outcome::Returned).await;
            }
            drop(permit);
            return;
        }
    };
    metrics::counter!("drover_worker_steps_total", "kind" => kind, "outcome" => completion.outcome.clone())
        .increment(1);
    metrics::histogram!("drover_worker_step_duration_seconds", "kind" => kind)
        .record(clock.elapsed().as_secs_f64());
    if let Some(end) = &completion.ends {
        // The end the step ran at once: counted and traced as a step of its own.
        metrics::counter!("drover_worker_steps_total", "kind" => "end", "outcome" => "completed")
            .increment(1);
        drop(step_span(
            runner.node,
            &claimed,
            &end.step_id,
            claimed.step_seq.0 + 1,
            1,
        ));
    }
    // The committer never goes away before the steps it serves.
    let _ = done_tx
        .send(Done {
            completion,
            delivery,
            permit,
            route: claimed.route.clone(),
        })
        .await;
}

/// Describes the worker's metrics (their `# HELP`) and registers those a quiet node has not
/// recorded yet, so that dashboards and alerts find every series from the start.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "drover_worker_steps_total",
        "Steps run, by step kind and outcome."
    );
    describe_histogram!(
        "drover_worker_step_duration_seconds",
        Unit::Seconds,
        "Time a step ran, by step kind."
    );
    describe_histogram!(
        "drover_worker_claim_batch_size",
        "Jobs claimed in one statement."
    );
    describe_histogram!(
        "drover_worker_claim_duration_seconds",
        Unit::Seconds,
        "Time of one claim statement (with its retries)."
    );
    describe_histogram!(
        "drover_worker_commit_batch_size",
        "Completions committed in one group commit."
    );
    describe_histogram!(
        "drover_worker_commit_duration_seconds",
        Unit::Seconds,
        "Time of one group commit (with its retries)."
    );
    describe_counter!(
        "drover_http_step_responses_total",
        "Responses http steps got, by status class."
    );
    for (name, help) in [
        (
            "drover_worker_steps_committed_total",
            "Checkpoints committed.",
        ),
        (
            "drover_worker_steps_continued_total",
            "Instances claimed again by this node in the commit of their previous step.",
        ),
        (
            "drover_worker_steps_handed_total",
            "Queued instances admitted with a permit this node's commit released, and claimed for this node in that commit.",
        ),
        (
            "drover_worker_stale_deliveries_total",
            "Deliveries whose claim found the instance moved on.",
        ),
        (
            "drover_worker_jobs_left_total",
            "Handler jobs left for a worker that has the handler.",
        ),
        (
            "drover_worker_garbage_jobs_total",
            "Job messages that could not be decoded.",
        ),
        (
            "drover_worker_fenced_commits_total",
            "Completions refused by the fence.",
        ),
    ] {
        describe_counter!(name, help);
        metrics::counter!(name).increment(0);
    }
    for name in [
        "drover_worker_claim_batch_size",
        "drover_worker_claim_duration_seconds",
        "drover_worker_commit_batch_size",
        "drover_worker_commit_duration_seconds",
    ] {
        let _ = metrics::histogram!(name);
    }
}
