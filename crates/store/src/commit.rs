//! The group commit of step completions (checkpoints), with their permits and events.

use std::collections::HashMap;

use drover_core::event::EventKind;
use drover_core::{Fence, InstanceId, InstanceState, NodeId, StepSeq};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::claim::claim_row_json;

use crate::claim::ClaimRow;
use crate::facts::{NewFact, completion_facts, facts_json, insert_facts};
use crate::model::*;
use crate::semaphore::{Admitted, ClaimFor, Leaving, hand_off};
use crate::{Error, Result, Store};

impl Store {
    /// Group-commits a batch of step completions by `node` (one fsync for the batch).
    ///
    /// Each completion is a CAS on its instance row (fence, step_seq, RUNNING, owned by
    /// `node`); for those that pass, the journal entry `step_seq + 1` and the events are
    /// written in the same transaction. Returns one [`Commit`] per completion, in order.
    ///
    /// Instances this commit makes READY besides the completions' own (children started,
    /// parents woken, queued instances admitted) are re-dispatched by the stale-READY sweeper
    /// only: workers call [`Store::commit_waking`], which returns their jobs.
    pub async fn commit(&self, node: NodeId, completions: &[Completion]) -> Result<Vec<Commit>> {
        Ok(self.commit_waking(node, completions).await?.results)
    }

    /// [`Store::commit`], also returning the jobs of the other instances the commit made READY.
    ///
    /// Besides each completion's own transition, in the same transaction:
    /// - `Transition::Wait` parks the instance WAITING (`wake_at`, `wait_event`,
    ///   `wait_child`); a `child` is created READY (journal row 0 `started`, actor
    ///   `parent:<id>`, `call_depth + 1`, the parent's campaign, no permit of its own: it runs
    ///   under its parent's). A wait for an event that was delivered while the step ran, or for
    ///   a child that finished meanwhile, goes READY instead (the step runs again and finds
    ///   it).
    /// - A completion that `consumes` a signal marks it consumed.
    /// - A child reaching `completed`, `failed` or `stopped` wakes its WAITING parent (READY
    ///   at the same step, `step_seq + 1`, journal `woken` by `child:<id>`, a `woken`
    ///   event). Any other transition leaves the current step's wait behind.
    /// - Operator requests are honoured: with `stop_requested_by` set, an instance that would
    ///   go on (READY, WAITING or IN_ERROR) is STOPPED instead (journal outcome `stopped`,
    ///   actor the operator); with `pause_requested_by` set, one that would be READY is PAUSED
    ///   (keeping its permit; `paused_by`/`paused_at` set, the request cleared). Each gets a
    ///   `stopped`/`paused` event.
    /// - A permit holder that finishes (or goes IN_ERROR under `on_error_permit: release`)
    ///   releases its permit, which passes to its campaign's oldest QUEUED instances
    ///   (ARCHITECTURE.md, "Semaphore"), with `permit_released` and `admitted` events.
    ///
    /// Most commits change no permit and honour no request: they are one statement, and
    /// touch no campaign row. Completions that do are committed in a second transaction that
    /// locks their instance rows (id order), then their campaign rows (id order).
    pub async fn commit_waking(
        &self,
        node: NodeId,
        completions: &[Completion],
    ) -> Result<GroupCommit> {
        self.group_commit(node, completions, false).await
    }

    /// [`Store::commit_waking`], where each completion that moves on to its next step and
    /// would be READY is claimed again by `node` in the same statement (RUNNING, fence + 1,
    /// exactly as [`Store::claim`] would, and only while `node` is alive): the worker runs
    /// that step at once, without a job round trip through NATS or a claim statement. Those
    /// instances are in [`GroupCommit::continued`]; nobody else is sent their job. Likewise
    /// the queued instances admitted with the permits the commit releases (up to one per
    /// released permit) are claimed by `node`: [`GroupCommit::handed`]. A node that dies before
    /// committing such a step leaves it RUNNING under a dead owner, as any claim does, for
    /// recovery.
    pub async fn commit_continuing(
        &self,
        node: NodeId,
        completions: &[Completion],
    ) -> Result<GroupCommit> {
        self.group_commit(node, completions, true).await
    }

    async fn group_commit(
        &self,
        node: NodeId,
        completions: &[Completion],
        continuing: bool,
    ) -> Result<GroupCommit> {
        if completions.is_empty() {
            return Ok(GroupCommit {
                results: Vec::new(),
                ready: Vec::new(),
                continued: Vec::new(),
                handed: Vec::new(),
            });
        }
        let rows = completion_rows(completions);
        // Completions that end a permit holder go straight to the second pass: the fast path
        // would leave them alone anyway (the hint is the worker's; the row decides).
        let (fast, ids): (Vec<Value>, Vec<Uuid>) = rows
            .iter()
            .zip(completions)
            .filter(|(_, c)| !c.releases_permit())
            .map(|(row, c)| (row.clone(), c.instance.0))
            .unzip();
        let mut results: Vec<Option<CommitRow>> = (0..completions.len()).map(|_| None).collect();
        if !fast.is_empty() {
            let expected = fast.len();
            let answered: Vec<CommitRow> = sqlx::query_as(COMMIT)
                .bind(Value::Array(fast))
                .bind(node.0)
                .bind(false)
                .bind(continuing)
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
            if answered.len() != expected {
                return Err(Error::Corrupt(format!(
                    "group commit answered {} results for {expected} completions",
                    answered.len(),
                )));
            }
            place(&mut results, answered)?;
        }
        // Left out of the fast path: they change a permit or honour an operator's request (or
        // are fenced: the second pass finds that again).
        let deferred: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.as_ref().is_none_or(|r| !r.committed && !r.existed))
            .map(|(idx, _)| idx)
            .collect();
        let mut admitted = Vec::new();
        let mut handed = Vec::new();
        if !deferred.is_empty() {
            let (second, also) = self
                .commit_with_permits(node, completions, &rows, &deferred, continuing)
                .await?;
            place(&mut results, second)?;
            admitted = also.admitted;
            handed = also.claimed;
        }

        let mut ready = Vec::new();
        let mut continued = Vec::new();
        let mut commits = Vec::with_capacity(results.len());
        for (idx, (row, completion)) in results.into_iter().zip(completions).enumerate() {
            let row = row.ok_or_else(|| {
                Error::Corrupt(format!("group commit answered nothing for index {idx}"))
            })?;
            commits.push(match (row.committed, row.existed) {
                (true, _) => Commit::Committed,
                (false, true) => Commit::AlreadyCommitted,
                (false, false) => Commit::Fenced,
            });
            if !row.committed {
                continue;
            }
            if let Some(claimed) = row.continued {
                continued.push((idx, claimed.0.into_claimed()?));
            }
            if let (
                Some(child),
                Transition::Wait {
                    child: Some(new), ..
                },
            ) = (row.child_id, &completion.transition)
            {
                ready.push(StepJob {
                    instance: InstanceId(child),
                    step_seq: StepSeq(0),
                    fence: Fence(0),
                    route: new.route.clone(),
                });
            }
            if let (Some(id), Some(seq), Some(fence), Some(queue)) = (
                row.parent_id,
                row.parent_seq,
                row.parent_fence,
                row.parent_queue,
            ) {
                ready.push(StepJob {
                    instance: InstanceId(id),
                    step_seq: StepSeq(seq),
                    fence: Fence(fence),
                    route: parse_route(queue, row.parent_handler)?,
                });
            }
            // A wait that went READY at once: its job is not one the caller expects.
            if matches!(completion.transition, Transition::Wait { .. })
                && row.state.as_deref() == Some("ready")
                && let (Some(seq), Some(fence), Some(queue)) =
                    (row.step_seq, row.fence, row.step_queue)
            {
                ready.push(StepJob {
                    instance: completion.instance,
                    step_seq: StepSeq(seq),
                    fence: Fence(fence),
                    route: parse_route(queue, row.step_handler)?,
                });
            }
        }
        ready.extend(admitted.iter().map(Admitted::job));
        Ok(GroupCommit {
            results: commits,
            ready,
            continued,
            handed,
        })
    }

    /// The second pass of [`Store::commit_waking`]: the completions at `deferred` (indexes into
    /// `completions` and their `rows`) committed in one transaction that may change permits:
    /// instance rows locked first (id order), the commit, its `stopped`/`paused` events, then
    /// the permits released and passed on. Returns the commit rows and the admitted instances:
    /// when `continuing`, as many of them as permits were released are claimed for `node`
    /// (the worker slots of the steps that released them are free).
    async fn commit_with_permits(
        &self,
        node: NodeId,
        completions: &[Completion],
        rows: &[Value],
        deferred: &[usize],
        continuing: bool,
    ) -> Result<(Vec<CommitRow>, crate::semaphore::HandedOff)> {
        let mut ids: Vec<Uuid> = deferred
            .iter()
            .filter_map(|&idx| completions.get(idx))
            .map(|c| c.instance.0)
            .collect();
        ids.sort_unstable();
        #[derive(sqlx::FromRow)]
        struct Locked {
            id: Uuid,
            holds_permit: bool,
            requested: bool,
        }
        let mut tx = self.pool.begin().await?;
        let locked: Vec<Locked> = sqlx::query_as(
            "SELECT id, holds_permit,
                    stop_requested_by IS NOT NULL OR pause_requested_by IS NOT NULL AS requested
             FROM instance
             WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        // An end run at once may not end an instance an operator asked to stop or pause: the
        // step commits its move to the end alone, and the request is honoured there, as it
        // would have been. (The row lock keeps new requests out until this commits.)
        let unfolded: HashMap<usize, Completion> = deferred
            .iter()
            .filter_map(|&idx| {
                let c = completions.get(idx)?;
                let requested = locked.iter().any(|l| l.id == c.instance.0 && l.requested);
                Some((idx, c.unfolded().filter(|_| requested)?))
            })
            .collect();
        let completion = |idx: usize| unfolded.get(&idx).or_else(|| completions.get(idx));
        let rows: Vec<Value> = deferred
            .iter()
            .filter_map(|&idx| match unfolded.get(&idx) {
                Some(c) => Some(completion_row(idx, c)),
                None => rows.get(idx).cloned(),
            })
            .collect();
        let results: Vec<CommitRow> = sqlx::query_as(COMMIT)
            .bind(Value::Array(rows))
            .bind(node.0)
            .bind(true)
            .bind(continuing)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        let mut released = Vec::new();
        let mut facts = Vec::new();
        for row in results.iter().filter(|r| r.committed) {
            let Some(completion) = usize::try_from(row.idx).ok().and_then(completion) else {
                return Err(Error::Corrupt(format!(
                    "group commit answered index {}",
                    row.idx
                )));
            };
            let Some(before) = locked.iter().find(|l| l.id == completion.instance.0) else {
                continue;
            };
            if before.holds_permit && row.holds_permit == Some(false) {
                let (Some(campaign), Some(state)) = (row.campaign_id, row.state.clone()) else {
                    return Err(Error::Corrupt(format!(
                        "group commit answered no campaign or state for {}",
                        completion.instance
                    )));
                };
                // Only instances of limited campaigns hold permits.
                released.push(Leaving {
                    id: completion.instance,
                    campaign,
                    state,
                    released: true,
                });
            }
            let honoured = match (row.state.as_deref(), &completion.transition) {
                (Some("stopped"), Transition::Stop { state })
                    if *state == InstanceState::Stopped =>
                {
                    None
                }
                (Some("stopped"), _) => Some((EventKind::Stopped, &row.stop_requested_by)),
                (Some("paused"), _) => Some((EventKind::Paused, &row.paused_by)),
                _ => None,
            };
            if let Some((kind, actor)) = honoured {
                facts.push(NewFact::new(
                    completion.instance,
                    kind,
                    json!({
                        "state": row.state,
                        "step": row.current_step,
                        "step_seq": row.step_seq,
                        "actor": actor,
                        "requested": true,
                    }),
                ));
            }
        }
        let claim = continuing.then_some(ClaimFor {
            node,
            max: released.len(),
        });
        let handed = if released.is_empty() {
            insert_facts(&mut tx, &facts).await?;
            Default::default()
        } else {
            hand_off(&mut tx, &released, facts, "commit", claim).await?
        };
        tx.commit().await?;
        Ok((results, handed))
    }
}

/// Puts each answered commit row in its completion's slot (by the row's `idx`).
fn place(results: &mut [Option<CommitRow>], rows: Vec<CommitRow>) -> Result<()> {
    for row in rows {
        let slot = usize::try_from(row.idx)
            .ok()
            .and_then(|idx| results.get_mut(idx))
            .ok_or_else(|| Error::Corrupt(format!("group commit answered index {}", row.idx)))?;
        *slot = Some(row);
    }
    Ok(())
}

/// The completions as the commit statement's `$1`.
fn completion_rows(completions: &[Completion]) -> Vec<Value> {
    completions
        .iter()
        .enumerate()
        .map(|(idx, c)| completion_row(idx, c))
        .collect()
}

/// One completion as a row of the commit statement's `$1` (`idx` = its index in the batch).
fn completion_row(idx: usize, c: &Completion) -> Value {
    let (next_state, next_step, retry, delay_ms) = match &c.transition {
        Transition::Next { step, .. } => ("ready", Some(step.as_str()), false, 0),
        Transition::Retry { delay_ms } => ("ready", None, true, *delay_ms),
        Transition::Stop { state } => (state.as_str(), None, false, 0),
        Transition::Wait { .. } => ("waiting", None, false, 0),
    };
    // An end run at once takes the end step's settings, as its move there would have.
    let step_move = c.ends.as_ref().map_or(&c.transition, |end| &end.next);
    let (allow_retry, timeout_ms, route) = match step_move {
        Transition::Next {
            allow_retry,
            timeout_ms,
            route,
            ..
        } => (Some(*allow_retry), Some(*timeout_ms), Some(route)),
        _ => (None, None, None),
    };
    let (wait, wake_at_ms, wait_event, child) = match &c.transition {
        Transition::Wait {
            wake_at_ms,
            event,
            child,
        } => (true, *wake_at_ms, event.as_deref(), child.as_deref()),
        _ => (false, None, None, None),
    };
    // A step whose end ran at once moved to that end first.
    let transition = next_step
        .or(c.ends.as_ref().map(|e| e.step_id.as_str()))
        .unwrap_or(next_state);
    let mut row = json!({
        "idx": idx,
        "instance_id": c.instance,
        "fence": c.fence,
        "step_seq": c.step_seq,
        "step_id": c.step_id,
        "attempt": c.attempt,
        "started_at": c.started_at,
        "outcome": c.outcome,
        "transition": transition,
        "next_state": next_state,
        "next_step": next_step,
        "allow_retry": allow_retry,
        "timeout_ms": timeout_ms,
        "retry": retry,
        "delay_ms": delay_ms,
        "vars": c.vars,
        "output": c.output,
        "error": c.error,
        "events": facts_json(&completion_facts(c)),
        "wait": wait,
    });
    // The rest only when present (absent keys read as NULL): most completions are
    // plain steps, and the statement parses every byte.
    if let Some(row) = row.as_object_mut() {
        let mut put = |key: &str, value: Value| {
            if !value.is_null() {
                row.insert(key.to_owned(), value);
            }
        };
        if let Some(route) = route {
            put("queue", json!(route.queue));
            put("handler", json!(route.handler));
        }
        put("wake_at_ms", json!(wake_at_ms));
        put("wait_event", json!(wait_event));
        put("signal_id", json!(c.consumes));
        if let Some(k) = child {
            put("child_id", json!(k.id));
            put("child_workflow", json!(k.workflow));
            put("child_version", json!(k.version));
            put("child_entry", json!(k.entry_step));
            put("child_allow_retry", json!(k.allow_retry));
            put("child_timeout_ms", json!(k.timeout_ms));
            put("child_queue", json!(k.route.queue));
            put("child_handler", json!(k.route.handler));
            put("child_vars", k.vars.clone());
        }
        if let Some(end) = &c.ends {
            put("end_step", json!(end.step_id));
            put("end_output", json!(end.output));
            put("end_error", json!(end.error));
        }
    }
    row
}

/// What the commit statement answers per completion.
#[derive(sqlx::FromRow)]
struct CommitRow {
    idx: i32,
    committed: bool,
    existed: bool,
    state: Option<String>,
    step_seq: Option<i64>,
    fence: Option<i64>,
    current_step: Option<String>,
    holds_permit: Option<bool>,
    campaign_id: Option<i64>,
    stop_requested_by: Option<String>,
    paused_by: Option<String>,
    child_id: Option<Uuid>,
    parent_id: Option<Uuid>,
    parent_seq: Option<i64>,
    parent_fence: Option<i64>,
    /// The route of the instance's step after the commit, and of the parent it woke.
    step_queue: Option<String>,
    step_handler: Option<String>,
    parent_queue: Option<String>,
    parent_handler: Option<String>,
    /// The instance claimed again by the committing node for its next step (see
    /// [`Store::commit_continuing`]).
    continued: Option<sqlx::types::Json<ClaimRow>>,
}

/// Does a completion's wait end at once? It waits for an event that was delivered while the
/// step ran (`signal_pending`), or keeps waiting for a child that has finished meanwhile.
macro_rules! wait_ends_at_once {
    () => {
        "(c.wait AND ((c.wait_event IS NOT NULL AND i.signal_pending)
                      OR (c.child_id IS NULL AND i.wait_child IS NOT NULL
                          AND i.pending_children = 0)))"
    };
}

/// The state a completion asks for, a wait that ends at once being READY.
macro_rules! asked_state {
    () => {
        concat!(
            "(CASE WHEN ",
            wait_ends_at_once!(),
            " THEN 'ready' ELSE c.next_state END)"
        )
    };
}

/// The state the instance ends up in: what it asks for, unless an operator asked to stop it
/// (anything but finishing becomes STOPPED) or to pause it (READY becomes PAUSED).
macro_rules! final_state {
    () => {
        concat!(
            "(CASE WHEN i.stop_requested_by IS NOT NULL
                        AND ",
            asked_state!(),
            " IN ('ready', 'waiting', 'in_error') THEN 'stopped'
                   WHEN i.pause_requested_by IS NOT NULL AND ",
            asked_state!(),
            " = 'ready' THEN 'paused'
                   ELSE ",
            asked_state!(),
            " END)"
        )
    };
}

/// Does the committing node claim the instance again at once for its next step? Only when
/// asked (`$4`, [`Store::commit_continuing`]), for a plain move to the next step that would
/// leave it READY, while the node is alive (as a claim requires), and if it serves the next
/// step's queue and has its handler (its node row).
macro_rules! continues {
    () => {
        concat!(
            "($4 AND c.next_step IS NOT NULL AND NOT c.retry AND NOT c.wait AND t.alive
              AND c.queue = ANY (t.queues) AND (c.handler IS NULL OR c.handler = ANY (t.handlers))
              AND ",
            final_state!(),
            " = 'ready')"
        )
    };
}

/// Does the instance give its permit back? It finishes, or goes IN_ERROR in a campaign whose
/// `on_error_permit` is `release`. (`$state` is the state it ends up in.)
macro_rules! gives_back {
    ($($state:tt)*) => {
        concat!(
            "(",
            $($state)*,
            " IN ('completed', 'failed', 'stopped')
              OR (",
            $($state)*,
            " = 'in_error'
                  AND (SELECT on_error_permit FROM campaign WHERE id = i.campaign_id) = 'release'))"
        )
    };
}

/// The group commit (see [`Store::commit_waking`]): `$1` the completions as JSON, `$2` the
/// node, `$3` whether permits may change, `$4` whether the node continues instances on
/// their next step ([`Store::commit_continuing`]).
///
/// With `$3` false (the fast path, autocommit) a completion that would release a permit or
/// honour an operator's stop or pause request is left alone (not committed, not existed):
/// such a commit must lock its campaign row and admit queued instances in the same
/// transaction, which needs statements after this one. With `$3` true it is committed; the
/// caller, in the same transaction, does the rest.
///
/// A child's terminal commit locks its parent row (`pl`) whatever the parent's state, and
/// always decrements `pending_children`: so a parent that commits a wait for that child at the
/// same moment either is seen WAITING here (and woken), or sees `pending_children = 0` itself
/// (and goes READY). Neither can miss the other.
const COMMIT: &str = concat!(
    "WITH c AS (
        SELECT * FROM jsonb_to_recordset($1::jsonb) AS c(
            idx int, instance_id uuid, fence bigint, step_seq bigint, step_id text,
            attempt int, started_at timestamptz, outcome text, transition text,
            next_state text, next_step text, allow_retry bool, timeout_ms bigint,
            queue text, handler text, retry bool, delay_ms bigint, vars jsonb, output jsonb, error text,
            events jsonb, wait bool, wake_at_ms bigint, wait_event text, signal_id bigint,
            child_id uuid, child_workflow text, child_version int,
            child_entry text, child_allow_retry bool, child_timeout_ms bigint,
            child_queue text, child_handler text, child_vars jsonb,
            end_step text, end_output jsonb, end_error text)
     ), t AS (
        SELECT clock_timestamp() AS now,
               EXISTS (SELECT 1 FROM node WHERE id = $2 AND status = 'alive') AS alive,
               (SELECT queues FROM node WHERE id = $2) AS queues,
               (SELECT handlers FROM node WHERE id = $2) AS handlers
     ), upd AS (
        UPDATE instance i SET
            state = CASE WHEN ",
    continues!(),
    " THEN 'running' ELSE ",
    final_state!(),
    " END,
            owner_node = CASE WHEN ",
    continues!(),
    " THEN $2 END,
            claimed_at = CASE WHEN ",
    continues!(),
    " THEN t.now END,
            fence = i.fence + CASE WHEN ",
    continues!(),
    " THEN 1 ELSE 0 END,
            signal_pending = i.signal_pending AND NOT ",
    continues!(),
    ",
            -- An end run at once (`end_step`) is a second step: its own entry, seq + 2.
            step_seq = i.step_seq + CASE WHEN c.end_step IS NOT NULL THEN 2 ELSE 1 END,
            event_seq = i.event_seq + jsonb_array_length(c.events),
            current_step = coalesce(c.next_step, c.end_step, i.current_step),
            step_entered_seq = CASE WHEN c.next_step IS NOT NULL THEN i.step_seq + 1
                                    WHEN c.end_step IS NOT NULL THEN i.step_seq + 2
                                    ELSE i.step_entered_seq END,
            step_attempt = CASE WHEN c.retry THEN i.step_attempt + 1
                                WHEN c.next_step IS NOT NULL OR c.end_step IS NOT NULL THEN 1
                                ELSE i.step_attempt END,
            step_claims = CASE WHEN ",
    continues!(),
    " THEN 1 ELSE 0 END,
            step_retryable = coalesce(c.allow_retry, i.step_retryable),
            step_timeout_ms = coalesce(c.timeout_ms, i.step_timeout_ms),
            step_queue = coalesce(c.queue, i.step_queue),
            step_handler = CASE WHEN c.next_step IS NOT NULL OR c.end_step IS NOT NULL THEN c.handler
                                ELSE i.step_handler END,
            run_deadline = CASE WHEN ",
    continues!(),
    " THEN t.now + (coalesce(c.timeout_ms, i.step_timeout_ms) + 30000)
                                       * interval '1 millisecond' END,
            steps_run = i.steps_run + CASE WHEN c.retry OR c.wait THEN 0
                                           WHEN c.end_step IS NOT NULL THEN 2 ELSE 1 END,
            vars = coalesce(c.vars, i.vars),
            outputs = CASE WHEN c.output IS NULL THEN i.outputs
                           ELSE i.outputs || jsonb_build_object(c.step_id, c.output) END
                      || CASE WHEN c.end_output IS NULL THEN '{}'::jsonb
                              ELSE jsonb_build_object(c.end_step, c.end_output) END,
            error = coalesce(c.end_error, c.error),
            ready_at = CASE WHEN ",
    final_state!(),
    " <> 'ready' OR ",
    continues!(),
    " THEN NULL
                            WHEN ",
    wait_ends_at_once!(),
    " THEN t.now
                            ELSE t.now + c.delay_ms * interval '1 millisecond'
                       END,
            finished_at = CASE WHEN ",
    final_state!(),
    " IN ('completed', 'failed', 'stopped') THEN t.now END,
            holds_permit = i.holds_permit AND NOT ",
    gives_back!(final_state!()),
    ",
            wake_at = CASE WHEN c.wake_at_ms IS NOT NULL AND ",
    final_state!(),
    " = 'waiting'
                           THEN coalesce(i.wait_deadline,
                                         t.now + c.wake_at_ms * interval '1 millisecond')
                      END,
            -- Kept across waits and retries of the step (a retry must not restart a timeout).
            wait_deadline = CASE WHEN c.wait
                                 THEN coalesce(i.wait_deadline,
                                               t.now + c.wake_at_ms * interval '1 millisecond')
                                 WHEN c.retry THEN i.wait_deadline
                            END,
            wait_event = CASE WHEN c.wait THEN c.wait_event END,
            -- A child is created only for an instance that does wait (not one stopped instead).
            wait_child = CASE WHEN c.child_id IS NOT NULL AND ",
    final_state!(),
    " = 'waiting' THEN c.child_id
                              WHEN c.child_id IS NULL AND c.wait THEN i.wait_child END,
            pending_children = CASE WHEN c.child_id IS NOT NULL AND ",
    final_state!(),
    " = 'waiting' THEN 1
                                    WHEN c.child_id IS NULL AND c.wait THEN i.pending_children
                                    ELSE 0 END,
            pause_requested_by = CASE WHEN ",
    final_state!(),
    " = 'paused' THEN NULL ELSE i.pause_requested_by END,
            paused_by = CASE WHEN ",
    final_state!(),
    " = 'paused' THEN i.pause_requested_by ELSE i.paused_by END,
            paused_at = CASE WHEN ",
    final_state!(),
    " = 'paused' THEN t.now ELSE i.paused_at END,
            updated_at = t.now
        FROM c, t
        WHERE i.id = c.instance_id AND i.fence = c.fence AND i.step_seq = c.step_seq
          -- Each completion is found by primary key, whatever the statistics were when the
          -- connection planned this statement: `= ANY($5)` is estimated at a few rows (the
          -- recordset at 100, which made a young table's generic plan a sequential scan of
          -- it per commit), and `|| ''` keeps the state test out of index conditions, as in
          -- the claim (else the plan read every instance this node runs, instance_running,
          -- for each commit: a one-step commit cost 4-5 ms with 120 steps in flight).
          AND i.id = ANY($5::uuid[])
          AND i.state || '' = 'running' AND i.owner_node = $2
          -- A node declared dead (or gone) abandons its steps: none of its writes land.
          AND EXISTS (SELECT 1 FROM node WHERE id = $2 AND status NOT IN ('dead', 'left'))
          AND ($3 OR NOT (i.stop_requested_by IS NOT NULL OR i.pause_requested_by IS NOT NULL
                          OR (i.holds_permit AND ",
    gives_back!(asked_state!()),
    ")))
        RETURNING c.idx, i.id, i.state, i.step_seq, i.fence, i.campaign_id, i.call_depth,
                  i.parent_instance_id, i.wake_at, i.wait_child, i.current_step,
                  i.holds_permit, i.stop_requested_by, i.paused_by, i.event_seq,
                  i.workflow, i.version, i.step_queue, i.step_handler,
                  CASE WHEN i.state = 'running' THEN ",
    claim_row_json!(),
    " END AS continued
     ), j AS (
        INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                             attempt, node_id, actor, started_at, finished_at, output, error)
        SELECT c.instance_id, c.step_seq + 1, c.step_id,
               CASE WHEN upd.state = 'stopped' AND c.next_state <> 'stopped' THEN 'stopped'
                    ELSE c.outcome END,
               CASE WHEN c.wait OR (upd.state IN ('stopped', 'paused')
                                    AND upd.state <> c.next_state)
                    THEN upd.state ELSE c.transition END,
               c.fence, c.attempt, $2,
               CASE WHEN upd.state = 'stopped' AND c.next_state <> 'stopped'
                    THEN upd.stop_requested_by
                    WHEN upd.state = 'paused' THEN upd.paused_by END,
               c.started_at, clock_timestamp(),
               CASE WHEN c.wait
                    THEN jsonb_strip_nulls(jsonb_build_object(
                        'wake_at', upd.wake_at, 'event', c.wait_event,
                        'child', upd.wait_child))
                    ELSE c.output END,
               c.error
        FROM c JOIN upd ON upd.idx = c.idx
     ), je AS (
        -- The end step run at once: its entry as its own commit would have written it.
        INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                             attempt, node_id, started_at, finished_at, output, error)
        SELECT c.instance_id, c.step_seq + 2, c.end_step, 'completed', upd.state, c.fence, 1,
               $2, clock_timestamp(), clock_timestamp(), c.end_output, c.end_error
        FROM c JOIN upd ON upd.idx = c.idx
        WHERE c.end_step IS NOT NULL
     ), ev AS (
        INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
        SELECT e.id, upd.id, cp.name, upd.workflow, upd.version,
               upd.event_seq - jsonb_array_length(c.events) + e.ord, e.kind, e.data
        FROM c JOIN upd ON upd.idx = c.idx JOIN campaign cp ON cp.id = upd.campaign_id,
             jsonb_to_recordset(c.events) AS e(ord int, id uuid, kind text, data jsonb)
     ), sig AS (
        UPDATE instance_signal s SET consumed_at = clock_timestamp(),
                                     consumed_seq = c.step_seq + 1
        FROM c JOIN upd ON upd.idx = c.idx
        WHERE c.signal_id IS NOT NULL
          AND s.id = c.signal_id AND s.instance_id = c.instance_id AND s.consumed_at IS NULL
     ), child AS (
        INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                              step_retryable, step_timeout_ms, step_queue, step_handler,
                              ready_at, vars, initial_vars, parent_instance_id, call_depth,
                              event_seq)
        SELECT c.child_id, upd.campaign_id, c.child_workflow, c.child_version, 'ready',
               c.child_entry, c.child_allow_retry, c.child_timeout_ms, c.child_queue,
               c.child_handler, clock_timestamp(), c.child_vars, c.child_vars, upd.id,
               upd.call_depth + 1, 1
        FROM c JOIN upd ON upd.idx = c.idx
        WHERE c.child_id IS NOT NULL AND upd.state = 'waiting'
        RETURNING id, current_step, created_at, parent_instance_id, campaign_id, workflow,
                  version
     ), child_ev AS (
        INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
        SELECT gen_random_uuid(), child.id, cp.name, child.workflow, child.version, 1,
               'started',
               jsonb_build_object('state', 'ready', 'step', child.current_step,
                                  'parent', child.parent_instance_id,
                                  'actor', 'parent:' || child.parent_instance_id)
        FROM child JOIN campaign cp ON cp.id = child.campaign_id
     ), child_j AS (
        INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                             attempt, actor, started_at, finished_at)
        SELECT id, 0, current_step, 'started', 'ready', 0, 1, 'parent:' || parent_instance_id,
               created_at, created_at
        FROM child
     ), pl AS (
        SELECT p.id, p.state, p.wait_child, upd.id AS child_id, upd.state AS child_state,
               upd.idx
        FROM instance p JOIN upd ON p.id = upd.parent_instance_id
        WHERE upd.state IN ('completed', 'failed', 'stopped')
        FOR UPDATE OF p
     ), pw AS (
        UPDATE instance p SET
            state = 'ready', step_seq = p.step_seq + 1, event_seq = p.event_seq + 1,
            pending_children = greatest(p.pending_children - 1, 0),
            wake_at = NULL, wait_event = NULL, ready_at = clock_timestamp(),
            updated_at = clock_timestamp()
        FROM pl
        WHERE p.id = pl.id AND pl.state = 'waiting' AND pl.wait_child = pl.child_id
        RETURNING p.id, p.step_seq, p.fence, p.current_step, p.step_attempt, pl.child_id,
                  pl.child_state, pl.idx, p.event_seq, p.workflow, p.version, p.campaign_id,
                  p.step_queue, p.step_handler
     ), pdec AS (
        UPDATE instance p SET pending_children = greatest(p.pending_children - 1, 0),
                              updated_at = clock_timestamp()
        FROM pl
        WHERE p.id = pl.id AND pl.state <> 'waiting' AND pl.wait_child = pl.child_id
     ), pj AS (
        INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                             attempt, actor, started_at, finished_at, output)
        SELECT id, step_seq, current_step, 'woken', 'ready', fence, step_attempt,
               'child:' || child_id, clock_timestamp(), clock_timestamp(),
               jsonb_build_object('child', child_id, 'status', child_state)
        FROM pw
     ), pev AS (
        INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
        SELECT gen_random_uuid(), pw.id, cp.name, pw.workflow, pw.version, pw.event_seq,
               'woken',
               jsonb_build_object('state', 'ready', 'step', pw.current_step,
                                  'step_seq', pw.step_seq, 'by', 'child',
                                  'child', pw.child_id, 'child_state', pw.child_state)
        FROM pw JOIN campaign cp ON cp.id = pw.campaign_id
     )
     SELECT c.idx, upd.idx IS NOT NULL AS committed,
            coalesce(ex.existed, false) AS existed,
            upd.state, upd.step_seq, upd.fence, upd.current_step, upd.holds_permit,
            upd.stop_requested_by, upd.paused_by, upd.campaign_id,
            child.id AS child_id,
            pw.id AS parent_id, pw.step_seq AS parent_seq, pw.fence AS parent_fence,
            upd.step_queue, upd.step_handler, pw.step_queue AS parent_queue,
            pw.step_handler AS parent_handler, upd.continued
     FROM c LEFT JOIN upd ON upd.idx = c.idx
            -- Probed by primary key for the completions that did not commit only: a lateral
            -- LIMIT 1 cannot be turned into a hash of the whole journal (which the planner
            -- picks for a plain EXISTS while the journal's statistics are small, making
            -- every commit's cost grow with history).
            LEFT JOIN LATERAL (
                SELECT true AS existed FROM journal jr
                WHERE upd.idx IS NULL
                  AND jr.instance_id = c.instance_id AND jr.step_seq = c.step_seq + 1
                LIMIT 1
            ) ex ON true
            LEFT JOIN child ON child.parent_instance_id = c.instance_id
            LEFT JOIN pw ON pw.idx = c.idx
     ORDER BY c.idx"
);
