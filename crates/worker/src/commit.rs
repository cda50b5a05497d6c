//! Group commit: completions from many steps go to Postgres in one statement, then the next
//! jobs are published (pipelined), then the consumed messages are acked.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use drover_bus::Bus;
use drover_core::backoff::{Backoff, SharedOutage};
use drover_core::{InstanceState, NodeId, Route, StepJob};
use drover_store::{Claimed, Commit, Completion, Store, Transition};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::settle::{Outcome, settle};
use crate::{JobDelivery, Runner, WorkerStats};

/// A finished step on its way to the database.
pub(crate) struct Done {
    pub(crate) completion: Completion,
    /// The job message the step came from; `None` for a step its node continued at commit.
    pub(crate) delivery: Option<JobDelivery>,
    /// Held until the checkpoint is committed: bounds work in flight.
    pub(crate) permit: OwnedSemaphorePermit,
    /// The route of the step it ran: where a retry of it goes.
    pub(crate) route: Route,
}

/// Retries a store call on transient errors (connection loss, deadlock, failover) for up to
/// about half a minute. Each retry is logged at debug only: the caller logs what it gives up.
pub(crate) async fn with_retries<T, F, Fut>(f: F) -> drover_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = drover_store::Result<T>>,
{
    f.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(2))
            .with_max_times(20)
            .with_jitter(),
    )
    .when(drover_store::Error::is_transient)
    .notify(|err, after| tracing::debug!(%err, ?after, "transient store error; retrying"))
    .await
}

/// Attempts after `stop` before [`until_done`] gives up on a transient error: a draining
/// worker still tries to commit what finished, but does not wait out a long outage.
const ATTEMPTS_AFTER_STOP: u32 = 5;

/// Retries a store call on transient errors with capped back-off until it succeeds or fails
/// for good — however long Postgres is away — or until `stop` is cancelled (then after a few
/// more attempts: the last transient error is returned). The outage is logged once, in
/// `postgres`, which the worker's tasks share.
pub(crate) async fn until_done<T, F, Fut>(
    mut f: F,
    stop: &CancellationToken,
    postgres: &SharedOutage,
    what: &str,
) -> drover_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = drover_store::Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(5));
    let mut after_stop = 0;
    loop {
        match f().await {
            Ok(value) => {
                postgres_ok(postgres);
                return Ok(value);
            }
            Err(err) if err.is_transient() => {
                postgres_failed(postgres, &err, what);
                if stop.is_cancelled() {
                    after_stop += 1;
                    if after_stop > ATTEMPTS_AFTER_STOP {
                        return Err(err);
                    }
                }
                let delay = backoff.failed().delay;
                tracing::debug!(%err, ?delay, what, "transient store error; retrying");
                tokio::select! {
                    // Cancelled mid-wait: one more attempt at once, then the count above.
                    () = stop.cancelled(), if !stop.is_cancelled() => {}
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// A store call of the worker failed transiently: logs the outage if this began it.
pub(crate) fn postgres_failed(postgres: &SharedOutage, err: &drover_store::Error, what: &str) {
    if postgres.failed() {
        tracing::warn!(%err, what, "Postgres unavailable; the worker waits it out, retrying with back-off");
    }
}

/// A publish of the worker failed: logs the trouble if this began it (the jobs it could not
/// publish are re-dispatched from Postgres).
pub(crate) fn nats_failed(nats: &SharedOutage, err: &drover_bus::Error, what: &str) {
    if nats.failed() {
        tracing::warn!(%err, what, "publishing jobs fails; the stale-READY sweeper re-dispatches what is not published");
    } else {
        tracing::debug!(%err, what, "publishing jobs failed again");
    }
}

/// A publish of the worker succeeded: logs the end of its trouble if this ended it.
pub(crate) fn nats_ok(nats: &SharedOutage) {
    if let Some(recovered) = nats.succeeded() {
        tracing::info!(
            after = ?recovered.after,
            failures = recovered.failures,
            "publishing jobs works again"
        );
    }
}

/// A store call of the worker succeeded: logs the end of an outage if this ended it.
pub(crate) fn postgres_ok(postgres: &SharedOutage) {
    if let Some(recovered) = postgres.succeeded() {
        tracing::info!(
            after = ?recovered.after,
            failures = recovered.failures,
            "Postgres available again"
        );
    }
}

pub(crate) struct Committer {
    pub(crate) node: NodeId,
    pub(crate) store: Store,
    pub(crate) bus: Bus,
    pub(crate) batch_size: usize,
    /// Group commits on their way to Postgres at once.
    pub(crate) commits_in_flight: usize,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) relay_wakeup: Arc<tokio::sync::Notify>,
    /// Tracks publishes after commit, and delayed retry publishes (those are cancelled at
    /// shutdown; the sweeper re-dispatches).
    pub(crate) delayed: TaskTracker,
    /// Starts the next step of the instances this node continues at commit.
    pub(crate) runner: Runner,
    /// Where continued steps report; weak, so the committer does not keep the channel open
    /// once the worker drains.
    pub(crate) done_tx: mpsc::WeakSender<Done>,
    pub(crate) postgres: Arc<SharedOutage>,
    /// NATS as this worker's publishes see it: trouble is logged once.
    pub(crate) nats: Arc<SharedOutage>,
    pub(crate) gate: crate::ClaimGate,
}

impl Committer {
    /// Commits until every sender is gone (the worker has drained).
    ///
    /// Two lanes, each batching what arrives while its commits are on their way:
    /// - steps that release a campaign permit (a permit holder's last step) commit in the
    ///   permit lane, one transaction at a time: it waits for the campaign's lock, and the
    ///   releases that pile up meanwhile go together in the next one, under one lock;
    /// - every other step commits in the plain lane, up to `commits_in_flight` group commits
    ///   at once, never queued behind a campaign lock.
    ///
    /// (Each instance has one step, so one completion, in flight at a time: concurrent commits
    /// touch disjoint instance rows.)
    pub(crate) async fn run(
        self,
        mut rx: mpsc::Receiver<Done>,
        shutdown: CancellationToken,
    ) -> crate::Result<()> {
        let this = Arc::new(self);
        // Unbounded: every `Done` holds a worker permit, which bounds them.
        let (plain_tx, plain_rx) = mpsc::unbounded_channel();
        let (permit_tx, permit_rx) = mpsc::unbounded_channel();
        let plain = tokio::spawn(
            Arc::clone(&this)
                .lane(plain_rx, this.commits_in_flight, shutdown.clone())
                .in_current_span(),
        );
        let permits = tokio::spawn(
            Arc::clone(&this)
                .lane(permit_rx, 1, shutdown)
                .in_current_span(),
        );
        while let Some(done) = rx.recv().await {
            let lane = if done.completion.releases_permit() {
                &permit_tx
            } else {
                &plain_tx
            };
            if lane.send(done).is_err() {
                tracing::error!("invariant: a commit lane ended before the worker drained");
            }
        }
        drop((plain_tx, permit_tx));
        for lane in [plain, permits] {
            if let Err(err) = lane.await {
                tracing::error!(%err, "a commit lane failed");
            }
        }
        this.delayed.close();
        this.delayed.wait().await;
        Ok(())
    }

    /// One lane of [`Committer::run`]: up to `slots` group commits at once, each of what
    /// arrived by the time a slot was free (so a busy node still commits big batches).
    async fn lane(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Done>,
        slots: usize,
        shutdown: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(slots.max(1)));
        let mut commits = JoinSet::new();
        while let Some(first) = rx.recv().await {
            let slot = Arc::clone(&slots)
                .acquire_owned()
                .await
                .expect("invariant: the semaphore is never closed");
            let mut batch: Vec<Done> = Vec::with_capacity(self.batch_size);
            batch.push(first);
            while batch.len() < self.batch_size {
                match rx.try_recv() {
                    Ok(done) => batch.push(done),
                    Err(_) => break,
                }
            }
            let committer = Arc::clone(&self);
            let shutdown = shutdown.clone();
            let span =
                tracing::info_span!("commit_batch", node.id = %self.node, size = batch.len());
            commits.spawn(
                async move {
                    committer.commit_batch(batch, &shutdown).await;
                    drop(slot);
                }
                .instrument(span),
            );
            while commits.try_join_next().is_some() {}
        }
        while commits.join_next().await.is_some() {}
    }

    async fn commit_batch(&self, batch: Vec<Done>, shutdown: &CancellationToken) {
        let completions: Vec<Completion> = batch.iter().map(|d| d.completion.clone()).collect();
        // Instances going on to their next step stay on this node, claimed in the commit
        // itself: no job round trip through NATS, no claim statement. Not while draining, nor
        // while the node cannot heartbeat (that is claiming too).
        let done_tx = if shutdown.is_cancelled() || !self.gate.is_open() {
            None
        } else {
            self.done_tx.upgrade()
        };
        let continuing = done_tx.is_some();
        metrics::histogram!("drover_worker_commit_batch_size").record(completions.len() as f64);
        let clock = std::time::Instant::now();
        // A commit waits out a Postgres outage (holding its steps' permits, so the worker
        // takes no new work meanwhile): its steps ran, and giving up would leave their
        // instances RUNNING until the node is declared dead or their deadline passes.
        let commit = until_done(
            || async {
                if continuing {
                    self.store.commit_continuing(self.node, &completions).await
                } else {
                    self.store.commit_waking(self.node, &completions).await
                }
            },
            shutdown,
            &self.postgres,
            "committing checkpoints",
        )
        .await;
        metrics::histogram!("drover_worker_commit_duration_seconds")
            .record(clock.elapsed().as_secs_f64());
        let (results, also_ready, continued, handed) = match commit {
            Ok(done) => (done.results, done.ready, done.continued, done.handed),
            Err(err) if !err.is_transient() => {
                // One bad completion (say, a value Postgres refuses) must not sink the
                // batch: commit one by one, and turn what still fails into an in_error
                // checkpoint.
                tracing::warn!(%err, "group commit refused; committing one by one");
                let mut results = Vec::with_capacity(completions.len());
                let mut ready = Vec::new();
                for completion in &completions {
                    let (result, also) = self.commit_alone(completion).await;
                    results.push(result);
                    ready.extend(also);
                }
                (results, ready, Vec::new(), Vec::new())
            }
            Err(err) => {
                tracing::warn!(%err, count = batch.len(), "group commit given up while stopping; its steps will be recovered");
                for done in &batch {
                    self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                    if let Some(delivery) = &done.delivery {
                        settle(delivery, Outcome::Returned).await;
                    }
                }
                return;
            }
        };

        // Children started, parents woken, waits that ended at once.
        let mut next_jobs: Vec<StepJob> = also_ready;
        let mut continued: HashMap<usize, Claimed> = continued.into_iter().collect();
        let mut finished = Vec::with_capacity(batch.len());
        for (idx, (done, result)) in batch.into_iter().zip(&results).enumerate() {
            let mut permit = Some(done.permit);
            match result {
                Commit::Committed => {
                    self.stats.committed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("drover_worker_steps_committed_total").increment(1);
                    let c = &done.completion;
                    let job = |route: &Route| {
                        StepJob::new(c.instance, c.step_seq.next(), c.fence, route.clone())
                    };
                    match &c.transition {
                        Transition::Next { route, .. } => {
                            match (continued.remove(&idx), &done_tx) {
                                // Its permit carries over to its next step.
                                (Some(claimed), Some(tx)) => {
                                    if let Some(permit) = permit.take() {
                                        self.stats.continued.fetch_add(1, Ordering::Relaxed);
                                        metrics::counter!("drover_worker_steps_continued_total")
                                            .increment(1);
                                        self.runner.start(claimed, None, permit, tx.clone());
                                    }
                                }
                                (Some(_), None) => tracing::error!(
                                    instance.id = %c.instance,
                                    "invariant: a continued instance without a committer channel; left for recovery"
                                ),
                                (None, _) => next_jobs.push(job(route)),
                            }
                        }
                        Transition::Retry { delay_ms } if *delay_ms == 0 => {
                            next_jobs.push(job(&done.route))
                        }
                        Transition::Retry { delay_ms } => {
                            self.publish_later(job(&done.route), *delay_ms, shutdown)
                        }
                        // Whatever ends the wait publishes the job then.
                        Transition::Stop { .. } | Transition::Wait { .. } => {}
                    }
                }
                Commit::AlreadyCommitted | Commit::Fenced => {
                    self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("drover_worker_fenced_commits_total").increment(1);
                    tracing::info!(
                        node.id = %self.node,
                        instance.id = %done.completion.instance,
                        step.id = %done.completion.step_id,
                        ?result,
                        "checkpoint not committed: the instance moved on (fenced)"
                    );
                }
            }
            finished.push((done.delivery, permit));
        }
        // Queued instances admitted with the permits this batch released, claimed for this
        // node: each runs in the worker slot of a step that released one (the store hands over
        // no more than were released, and those steps did not continue).
        let mut handed = handed.into_iter();
        if let Some(tx) = &done_tx {
            for (_, permit) in finished.iter_mut() {
                if permit.is_none() {
                    continue;
                }
                let Some(claimed) = handed.next() else { break };
                if let Some(permit) = permit.take() {
                    self.stats.handed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("drover_worker_steps_handed_total").increment(1);
                    self.runner.start(claimed, None, permit, tx.clone());
                }
            }
        }
        for claimed in handed {
            tracing::error!(
                instance.id = %claimed.id,
                "invariant: an admitted instance claimed for this node without a free slot; left for recovery"
            );
        }
        self.relay_wakeup.notify_one();
        // Publish, then ack, off the commit loop: the next group commit need not wait for
        // this batch's round trips to NATS. Each batch keeps its own order (checkpoint,
        // publish, ack), and its permits bound how many batches are on their way.
        let bus = self.bus.clone();
        let stats = Arc::clone(&self.stats);
        let nats = Arc::clone(&self.nats);
        let publish_then_ack = async move {
            if !next_jobs.is_empty() {
                // Committed READY rows are re-dispatched by the stale-READY sweeper.
                match bus.publish_jobs(&next_jobs).await {
                    Ok(()) => nats_ok(&nats),
                    Err(err) => nats_failed(&nats, &err, "publishing next jobs"),
                }
            }
            for (delivery, permit) in finished {
                stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                if let Some(delivery) = delivery {
                    settle(&delivery, Outcome::Finished).await;
                }
                drop(permit);
            }
        };
        self.delayed.spawn(publish_then_ack.in_current_span());
    }

    async fn commit_alone(&self, completion: &Completion) -> (Commit, Vec<StepJob>) {
        let single = std::slice::from_ref(completion);
        match with_retries(|| self.store.commit_waking(self.node, single)).await {
            Ok(done) => (
                done.results.first().copied().unwrap_or(Commit::Fenced),
                done.ready,
            ),
            Err(err) => {
                let mut fallback = completion.clone();
                fallback.transition = Transition::Stop {
                    state: InstanceState::InError,
                };
                fallback.outcome = "error".to_owned();
                fallback.vars = None;
                fallback.output = None;
                fallback.error = Some(format!("checkpoint refused by the database: {err}"));
                fallback.consumes = None;
                match with_retries(|| {
                    self.store
                        .commit(self.node, std::slice::from_ref(&fallback))
                })
                .await
                {
                    Ok(results) => (
                        results.first().copied().unwrap_or(Commit::Fenced),
                        Vec::new(),
                    ),
                    Err(err) => {
                        tracing::error!(instance.id = %completion.instance, %err, "cannot checkpoint; left for recovery");
                        (Commit::Fenced, Vec::new())
                    }
                }
            }
        }
    }

    fn publish_later(&self, job: StepJob, delay_ms: u64, shutdown: &CancellationToken) {
        let bus = self.bus.clone();
        let shutdown = shutdown.clone();
        let nats = Arc::clone(&self.nats);
        self.delayed.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(delay_ms)) => {
                    match bus.publish_jobs(&[job]).await {
                        Ok(()) => nats_ok(&nats),
                        Err(err) => nats_failed(&nats, &err, "publishing a delayed retry"),
                    }
                }
            }
        });
    }
}
