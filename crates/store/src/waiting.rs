//! Waking WAITING instances: the leader's timer (`wake_at`) and delivered events (signals).
//! A child's end wakes its parent in the group commit itself ([`Store::commit_waking`]).
//!
//! A wake makes the instance READY at the same step with `step_seq + 1` and the fence
//! unchanged: no worker holds a WAITING instance, so there is no claim to fence off, and the
//! new checkpoint already makes every job published before it stale. Each wake is journaled
//! and announced in its own transaction; the caller publishes the returned jobs after it.

use chrono::{DateTime, Utc};
use drover_core::{Fence, InstanceId, InstanceState, SignalId, StepSeq};
use drover_core::{NodeId, ids::is_slug};
use serde_json::Value;
use uuid::Uuid;

use crate::lease::COORDINATOR_LEASE;
use crate::lease::LeaderTerm;
use crate::model::{Delivery, PendingSignal, StepJob, Woken};
use crate::{Error, Result, Store};

impl Store {
    /// As leader under `term`: makes up to `limit` WAITING instances whose `wake_at` has come
    /// (by the database clock) READY, oldest first, each journaled (`woken`, actor `timer`)
    /// with its `woken` event, in one transaction; returns their jobs to
    /// publish. Does nothing unless `holder` still holds the coordinator lease under `term`
    /// (checked in the same statement that picks the rows). Call it until it returns fewer
    /// than `limit`.
    pub async fn wake_due(
        &self,
        holder: NodeId,
        term: LeaderTerm,
        limit: i64,
    ) -> Result<Vec<StepJob>> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<WaitingRow> = sqlx::query_as(&format!(
            "SELECT {WAITING_COLUMNS}
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE i.state = 'waiting' AND i.wake_at <= clock_timestamp()
               AND EXISTS (SELECT 1 FROM leader_lease
                           WHERE name = $3 AND holder = $1 AND term = $2
                             AND expires_at > clock_timestamp())
             ORDER BY i.wake_at LIMIT $4
             FOR UPDATE OF i SKIP LOCKED"
        ))
        .bind(holder.0)
        .bind(term.0)
        .bind(COORDINATOR_LEASE)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let woken: Vec<Woken> = rows
            .into_iter()
            .map(Woken::try_from)
            .collect::<Result<_>>()?;
        wake(&mut tx, &woken, "woken", "timer", None).await?;
        tx.commit().await?;
        Ok(woken.iter().map(Woken::job).collect())
    }

    /// Delivers the event `name` with `payload` to `instance`, in one transaction: the signal
    /// is stored; if the instance is WAITING for an event of that name it is made READY
    /// (journal `signalled`, a `woken` event) and its job returned to publish;
    /// otherwise the signal is kept for the step that will wait for it.
    ///
    /// Errors: [`Error::UnknownInstance`], [`Error::InstanceFinished`] (a finished instance
    /// takes no events), [`Error::InvalidEventName`] (not a slug: no step could wait for it).
    pub async fn deliver_signal(
        &self,
        instance: InstanceId,
        name: &str,
        payload: &Value,
    ) -> Result<Delivery> {
        if !is_slug(name) {
            return Err(Error::InvalidEventName(name.to_owned()));
        }
        let mut tx = self.pool.begin().await?;
        // The lock orders this delivery with a commit of the instance: either that commit
        // parks it WAITING first (and it is woken here), or it sees `signal_pending`.
        #[derive(sqlx::FromRow)]
        struct Target {
            #[sqlx(flatten)]
            row: WaitingRow,
            state: String,
            wait_event: Option<String>,
        }
        let target: Option<Target> = sqlx::query_as(&format!(
            "SELECT {WAITING_COLUMNS}, i.state, i.wait_event
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE i.id = $1
             FOR UPDATE OF i"
        ))
        .bind(instance.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(Target {
            row,
            state,
            wait_event,
        }) = target
        else {
            return Err(Error::UnknownInstance(instance));
        };
        let state: InstanceState = state
            .parse()
            .map_err(|_| Error::Corrupt(format!("unknown instance state {state:?}")))?;
        if state.is_terminal() {
            return Err(Error::InstanceFinished {
                id: instance,
                state,
            });
        }
        sqlx::query("INSERT INTO instance_signal (instance_id, name, payload) VALUES ($1, $2, $3)")
            .bind(instance.0)
            .bind(name)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
        let delivery = if state == InstanceState::Waiting && wait_event.as_deref() == Some(name) {
            let woken = [Woken::try_from(row)?];
            wake(
                &mut tx,
                &woken,
                "signalled",
                &format!("signal:{name}"),
                Some(name),
            )
            .await?;
            Delivery::Woke(woken[0].job())
        } else {
            sqlx::query("UPDATE instance SET signal_pending = true WHERE id = $1")
                .bind(instance.0)
                .execute(&mut *tx)
                .await?;
            Delivery::Kept
        };
        tx.commit().await?;
        Ok(delivery)
    }

    /// The oldest unconsumed signal named `name` of `instance`, if any.
    pub async fn pending_signal(
        &self,
        instance: InstanceId,
        name: &str,
    ) -> Result<Option<PendingSignal>> {
        let row: Option<(i64, Value, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, payload, received_at FROM instance_signal
             WHERE instance_id = $1 AND name = $2 AND consumed_at IS NULL
             ORDER BY id LIMIT 1",
        )
        .bind(instance.0)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, payload, received_at)| PendingSignal {
            id: SignalId(id),
            payload,
            received_at,
        }))
    }
}

const WAITING_COLUMNS: &str = "i.id, i.workflow, i.version, c.name AS campaign, \
    i.current_step, i.step_seq, i.fence, i.step_queue, i.step_handler";

#[derive(sqlx::FromRow)]
struct WaitingRow {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign: String,
    current_step: String,
    step_seq: i64,
    fence: i64,
    step_queue: String,
    step_handler: Option<String>,
}

impl TryFrom<WaitingRow> for Woken {
    type Error = crate::Error;
    /// As it will be after the wake.
    fn try_from(r: WaitingRow) -> Result<Self> {
        Ok(Woken {
            id: InstanceId(r.id),
            workflow: r.workflow,
            version: r.version,
            campaign: r.campaign,
            current_step: r.current_step,
            step_seq: StepSeq(r.step_seq + 1),
            fence: Fence(r.fence),
            route: crate::model::parse_route(r.step_queue, r.step_handler)?,
        })
    }
}

/// Makes the locked WAITING rows `woken` READY (`step_seq + 1`), journals each (`outcome`,
/// `actor`) and writes their `woken` events (by the timer, or by the event `signal`), in `tx`.
async fn wake(
    tx: &mut sqlx::PgConnection,
    woken: &[Woken],
    outcome: &str,
    actor: &str,
    signal: Option<&str>,
) -> Result<()> {
    if woken.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = woken.iter().map(|w| w.id.0).collect();
    let (updated,): (i64,) = sqlx::query_as(
        "WITH upd AS (
            UPDATE instance i SET
                state = 'ready', step_seq = i.step_seq + 1, wake_at = NULL, wait_event = NULL,
                ready_at = clock_timestamp(), updated_at = clock_timestamp(),
                event_seq = i.event_seq + 1
            WHERE i.id = ANY($1) AND i.state = 'waiting'
            RETURNING i.id, i.step_seq, i.current_step, i.fence, i.step_attempt, i.event_seq,
                      i.workflow, i.version, i.campaign_id
         ), j AS (
            INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                 attempt, actor, started_at, finished_at)
            SELECT id, step_seq, current_step, $2, 'ready', fence, step_attempt, $3,
                   clock_timestamp(), clock_timestamp()
            FROM upd
         ), ev AS (
            INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind,
                                    data)
            SELECT gen_random_uuid(), upd.id, c.name, upd.workflow, upd.version, upd.event_seq,
                   'woken',
                   jsonb_strip_nulls(jsonb_build_object(
                       'state', 'ready', 'step', upd.current_step, 'step_seq', upd.step_seq,
                       'by', CASE WHEN $4::text IS NULL THEN 'timer' ELSE 'signal' END,
                       'signal', $4::text))
            FROM upd JOIN campaign c ON c.id = upd.campaign_id
         )
         SELECT count(*) FROM upd",
    )
    .bind(&ids)
    .bind(outcome)
    .bind(actor)
    .bind(signal)
    .fetch_one(&mut *tx)
    .await?;
    if updated != woken.len() as i64 {
        return Err(Error::Corrupt(format!(
            "wake updated {updated} of {} locked WAITING rows",
            woken.len()
        )));
    }
    Ok(())
}
