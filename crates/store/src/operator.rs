//! Operator actions on instances. Each is one transaction that re-checks, under a row lock,
//! what the caller decided from an earlier read (state, fence and checkpoint), so a concurrent
//! change makes the action refuse instead of acting on stale facts. Each writes its journal
//! row, an `audit` row and its events in that same transaction.

use drover_core::event::EventKind;
use drover_core::{Fence, InstanceId, InstanceState, Route, StepSeq};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::facts::{NewFact, insert_facts};
use crate::model::StepJob;
use crate::semaphore::{Admission, admit_one, lock_limited_campaigns, save_counters};
use crate::{Error, Result, Store};

/// How deep a call chain is followed looking for failed descendants: far deeper than any real
/// chain, and a bound should `parent_instance_id` ever form a cycle.
const MAX_CALL_CHAIN: i32 = 1_000;

/// An operator's resume of an `in_error` instance, as the caller decided it from the instance
/// it read (`fence`, `step_seq`) and its definition (`step` and that step's settings).
#[derive(Clone, Debug)]
pub struct Resume {
    pub instance: InstanceId,
    /// The fence read: the resume applies only if it is still the instance's.
    pub fence: Fence,
    /// The checkpoint read: the resume applies only if it is still the instance's.
    pub step_seq: StepSeq,
    /// The step the instance is READY at afterwards: its current step (retry) or the target of
    /// the current step's transition (skip).
    pub step: String,
    /// `step`'s `allow_retry`.
    pub allow_retry: bool,
    /// `step`'s timeout.
    pub timeout_ms: i64,
    /// `step`'s route.
    pub route: Route,
    /// Variables replaced (top-level keys) before the instance runs on.
    pub set: Map<String, Value>,
    /// Who resumes: the journal's and the audit row's `actor`.
    pub actor: String,
    /// Recorded in the audit row and the `resumed` event (`current_step` or `next_step`).
    pub mode: String,
}

/// What became of a [`Resume`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// READY at the new checkpoint: publish `job` (after the commit, which has happened).
    Resumed { job: StepJob },
    /// QUEUED at the new checkpoint: it had given its permit back (`on_error_permit:
    /// release`) and its campaign is at its limit or has a queue; a freed permit admits it.
    Queued {
        /// Its place in the queue (1 = admitted next).
        position: i64,
    },
    /// No such instance.
    Unknown,
    /// The instance is not `in_error` (and its fence has not moved since it was read).
    NotInError(InstanceState),
    /// A descendant deeper in the instance's call chain is `in_error`: resume that one first.
    NotDeepest(InstanceId),
    /// The instance moved on since it was read (fence or checkpoint changed): nothing done.
    Conflict,
}

impl Store {
    /// The deepest `in_error` descendant of `id` (children via `parent_instance_id`,
    /// recursively), if any: while there is one, `id` may not be resumed.
    pub async fn deepest_failed_descendant(&self, id: InstanceId) -> Result<Option<InstanceId>> {
        deepest_failed_descendant(&mut *self.pool.acquire().await?, id).await
    }

    /// Resumes an `in_error` instance in one transaction: under a lock on its row, checks it
    /// is still `in_error` at the fence and checkpoint the caller read and that no descendant
    /// is `in_error`; then makes it READY at `resume.step` (`fence + 1`, `step_seq + 1`,
    /// attempt 1, variables merged with `resume.set`, error and the step's wait cleared: the
    /// step is entered anew) and writes the journal row (outcome `resumed`), the audit row and
    /// its `resumed` event.
    ///
    /// An instance that gave its permit back when it went `in_error` (`on_error_permit:
    /// release`) needs one again: under its campaign's lock (after its own) it takes a free
    /// one if nobody queues (an `admitted` event), else it re-queues
    /// (QUEUED at the back, a `queued` event) and a freed permit admits it later. One that held
    /// its permit keeps it; a child runs under its parent's.
    pub async fn resume(&self, resume: &Resume) -> Result<Resumed> {
        let mut tx = self.pool.begin().await?;
        #[derive(sqlx::FromRow)]
        struct Row {
            state: String,
            fence: i64,
            step_seq: i64,
            current_step: String,
            step_attempt: i32,
            needs_permit: bool,
            campaign_id: i64,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT i.state, i.fence, i.step_seq, i.current_step, i.step_attempt,
                    NOT i.holds_permit AND i.parent_instance_id IS NULL
                        AND c.max_running IS NOT NULL AS needs_permit,
                    i.campaign_id
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE i.id = $1 FOR UPDATE OF i",
        )
        .bind(resume.instance.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(Row {
            state,
            fence,
            step_seq,
            current_step: from_step,
            step_attempt: from_attempt,
            needs_permit,
            campaign_id,
        }) = row
        else {
            return Ok(Resumed::Unknown);
        };
        if fence != resume.fence.0 || step_seq != resume.step_seq.0 {
            return Ok(Resumed::Conflict);
        }
        let state: InstanceState = state
            .parse()
            .map_err(|_| Error::Corrupt(format!("unknown instance state {state:?}")))?;
        if state != InstanceState::InError {
            return Ok(Resumed::NotInError(state));
        }
        if let Some(child) = deepest_failed_descendant(&mut tx, resume.instance).await? {
            return Ok(Resumed::NotDeepest(child));
        }

        // Its permit, if it needs one: under the campaign lock, taken after the instance's.
        let mut locked = Vec::new();
        let admission = if needs_permit {
            locked = lock_limited_campaigns(&mut tx, &[campaign_id]).await?;
            match locked.first_mut() {
                Some(c) => admit_one(&mut tx, c).await?,
                None => Admission::Free,
            }
        } else {
            Admission::Free
        };
        let (to_state, permit, place) = match admission {
            Admission::Free => ("ready", false, None),
            Admission::Permit => ("ready", true, None),
            Admission::Queued(place) => ("queued", false, Some(place)),
        };

        let details = json!({
            "mode": resume.mode,
            "from_step": from_step,
            "to_step": resume.step,
            "set": resume.set,
            "fence": resume.fence.next(),
            "step_seq": resume.step_seq.next(),
            "state": to_state,
        });
        let next_seq = resume.step_seq.next();
        let mut facts = vec![NewFact::new(
            resume.instance,
            EventKind::Resumed,
            json!({
                "state": to_state,
                "step": from_step,
                "step_seq": next_seq,
                "mode": resume.mode,
                "next_step": resume.step,
                "actor": resume.actor,
            }),
        )];
        match admission {
            Admission::Free => {}
            Admission::Permit => facts.push(NewFact::new(
                resume.instance,
                EventKind::Admitted,
                json!({ "state": "ready", "step": resume.step, "step_seq": next_seq,
                        "actor": resume.actor }),
            )),
            Admission::Queued(place) => facts.push(NewFact::new(
                resume.instance,
                EventKind::Queued,
                json!({ "state": "queued", "step": resume.step, "step_seq": next_seq,
                        "queue_seq": place }),
            )),
        }
        let resumed: Option<(i64, i64)> = sqlx::query_as(
            "WITH upd AS (
                UPDATE instance i SET
                    state = $12,
                    holds_permit = i.holds_permit OR $13,
                    queue_seq = coalesce($14, i.queue_seq),
                    queued_at = CASE WHEN $12 = 'queued' THEN clock_timestamp()
                                     ELSE i.queued_at END,
                    current_step = $4,
                    fence = i.fence + 1,
                    step_seq = i.step_seq + 1,
                    step_entered_seq = i.step_seq + 1,
                    step_attempt = 1,
                    step_claims = 0,
                    -- A resume grants a fresh step budget: an operator decided to go on.
                    steps_run = 0,
                    step_retryable = $5,
                    step_timeout_ms = $6,
                    step_queue = $15,
                    step_handler = $16,
                    run_deadline = NULL,
                    wake_at = NULL,
                    wait_deadline = NULL,
                    wait_event = NULL,
                    wait_child = NULL,
                    error = NULL,
                    vars = i.vars || $7::jsonb,
                    ready_at = CASE WHEN $12 = 'ready' THEN clock_timestamp() END,
                    updated_at = clock_timestamp()
                WHERE i.id = $1 AND i.state = 'in_error' AND i.fence = $2 AND i.step_seq = $3
                RETURNING i.id, i.step_seq, i.fence
             ), j AS (
                INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                     attempt, actor, started_at, finished_at)
                SELECT id, step_seq, $10, 'resumed', $4, fence, $11, $8,
                       clock_timestamp(), clock_timestamp()
                FROM upd
             ), a AS (
                INSERT INTO audit (actor, action, target, details)
                SELECT $8, 'resume', id::text, $9 FROM upd
             )
             SELECT step_seq, fence FROM upd",
        )
        .bind(resume.instance.0)
        .bind(resume.fence.0)
        .bind(resume.step_seq.0)
        .bind(&resume.step)
        .bind(resume.allow_retry)
        .bind(resume.timeout_ms)
        .bind(Value::Object(resume.set.clone()))
        .bind(&resume.actor)
        .bind(details)
        .bind(&from_step)
        .bind(from_attempt)
        .bind(to_state)
        .bind(permit)
        .bind(place)
        .bind(resume.route.queue.as_str())
        .bind(resume.route.handler.as_deref())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((step_seq, fence)) = resumed else {
            return Err(Error::Corrupt(format!(
                "instance {} was locked in_error at fence {} but its resume updated nothing",
                resume.instance, resume.fence
            )));
        };
        save_counters(&mut tx, &locked).await?;
        insert_facts(&mut tx, &facts).await?;
        if place.is_some() {
            let (position,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM instance WHERE campaign_id = $1 AND state = 'queued'",
            )
            .bind(campaign_id)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Resumed::Queued { position });
        }
        tx.commit().await?;
        Ok(Resumed::Resumed {
            job: StepJob {
                instance: resume.instance,
                step_seq: StepSeq(step_seq),
                fence: Fence(fence),
                route: resume.route.clone(),
            },
        })
    }
}

pub(crate) async fn deepest_failed_descendant(
    conn: &mut sqlx::PgConnection,
    id: InstanceId,
) -> Result<Option<InstanceId>> {
    let row: Option<(Uuid,)> = sqlx::query_as(
        "WITH RECURSIVE d (id, state, depth) AS (
            SELECT id, state, 1 FROM instance WHERE parent_instance_id = $1
            UNION ALL
            SELECT i.id, i.state, d.depth + 1
            FROM instance i JOIN d ON i.parent_instance_id = d.id
            WHERE d.depth < $2
         )
         SELECT id FROM d WHERE state = 'in_error' ORDER BY depth DESC, id LIMIT 1",
    )
    .bind(id.0)
    .bind(MAX_CALL_CHAIN)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(id,)| InstanceId(id)))
}
