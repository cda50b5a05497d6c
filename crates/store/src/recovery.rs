//! Taking instances back from dead nodes, and spotting nodes that died.
//!
//! `dead` is one-way, and a dead node can neither claim (the claim checks the node is alive)
//! nor commit (recovery bumps every fence it takes back). So requeueing a dead node's instances
//! is safe from any coordinator, leader or not, and doing it twice finds nothing the second
//! time.

use drover_core::{Fence, InstanceId, InstanceState, NodeId, StepSeq};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::lease::{COORDINATOR_LEASE, LeaderTerm};
use crate::model::parse_route;
use crate::model::{Orphan, StepJob};
use crate::semaphore::{Admitted, release_permits};
use crate::{Error, Result, Store};

impl Store {
    /// As leader under `term`: marks dead the nodes silent for over `silence_ms`, and those
    /// whose process is gone — their liveness lock released (see [`crate::Liveness`]) — and
    /// whose heartbeat is over `gone_ms` late; returns them. Does nothing unless the lease is
    /// still held under `term` (checked in the same statement).
    pub async fn declare_dead_nodes(
        &self,
        holder: NodeId,
        term: LeaderTerm,
        silence_ms: i64,
        gone_ms: i64,
    ) -> Result<Vec<NodeId>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "UPDATE node SET status = 'dead', died_at = clock_timestamp()
             WHERE status NOT IN ('dead', 'left')
               AND (heartbeat_at < clock_timestamp() - $3 * interval '1 millisecond'
                    OR (liveness_at IS NOT NULL
                        AND heartbeat_at < clock_timestamp() - $5 * interval '1 millisecond'
                        AND NOT EXISTS (
                            SELECT 1 FROM pg_locks l
                            WHERE l.locktype = 'advisory' AND l.granted
                              AND l.database = (SELECT oid FROM pg_database
                                                WHERE datname = current_database())
                              AND l.classid = $6::oid AND l.objid = node.liveness_key::oid
                              AND l.objsubid = 2)))
               AND EXISTS (SELECT 1 FROM leader_lease
                           WHERE name = $4 AND holder = $1 AND term = $2
                             AND expires_at > clock_timestamp())
             RETURNING id",
        )
        .bind(holder.0)
        .bind(term.0)
        .bind(silence_ms)
        .bind(COORDINATOR_LEASE)
        .bind(gone_ms)
        .bind(i64::from(crate::liveness::LIVENESS_NAMESPACE))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| NodeId(id)).collect())
    }

    /// Dead (or left) nodes that still own RUNNING instances (a recovery task may have been
    /// lost).
    pub async fn dead_nodes_with_orphans(&self) -> Result<Vec<NodeId>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT DISTINCT i.owner_node FROM instance i JOIN node n ON n.id = i.owner_node
             WHERE i.state = 'running' AND n.status IN ('dead', 'left')",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| NodeId(id)).collect())
    }

    /// READY instances whose latest checkpoint the dead node `node` committed: it may have died
    /// between that commit and publishing the next job, so their jobs are re-dispatched.
    pub async fn ready_after_dead_node(&self, node: NodeId) -> Result<Vec<StepJob>> {
        let rows: Vec<(Uuid, i64, i64, String, Option<String>)> = sqlx::query_as(
            "SELECT i.id, i.step_seq, i.fence, i.step_queue, i.step_handler
             FROM instance i JOIN journal j ON j.instance_id = i.id AND j.step_seq = i.step_seq
             WHERE i.state = 'ready' AND j.node_id = $1
               AND EXISTS (SELECT 1 FROM node WHERE id = $1 AND status IN ('dead', 'left'))",
        )
        .bind(node.0)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(crate::model::job_row).collect()
    }

    /// Takes back up to `limit` RUNNING instances of the dead (or left) node `node` in one
    /// transaction:
    /// each goes to READY with `fence + 1` (to be re-dispatched), or to IN_ERROR if its step
    /// is not safe to run again (`allow_retry: false`). Each is journaled (actor `recovery`)
    /// with its `requeued` or `in_error` event. Returns no orphans once the node has no more.
    ///
    /// Permits stay with their instances (a permit belongs to the instance, not the node),
    /// except that one going IN_ERROR in a campaign with `on_error_permit: release` gives its
    /// permit back, and the oldest queued instance is admitted in the same transaction
    /// (with their events; publish the admitted jobs).
    ///
    /// `by` is the coordinator doing it (journaled as actor `recovery:<by>`).
    pub async fn requeue_orphans(&self, node: NodeId, by: NodeId, limit: i64) -> Result<Requeued> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Running> = sqlx::query_as(&format!(
            "SELECT {RUNNING_COLUMNS}
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE i.owner_node = $1 AND i.state = 'running'
               AND EXISTS (SELECT 1 FROM node WHERE id = $1 AND status IN ('dead', 'left'))
             ORDER BY i.id LIMIT $2
             FOR UPDATE OF i SKIP LOCKED"
        ))
        .bind(node.0)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let why = format!("node {node} died");
        let requeued = requeue(&mut tx, rows, by, "requeued", &why).await?;
        tx.commit().await?;
        Ok(requeued)
    }

    /// As leader under `term`: RUNNING instances past their run deadline on a node that still
    /// heartbeats (a stuck worker) are taken back like a dead node's, with `fence + 1`, so the
    /// stuck worker's eventual commit is rejected. Permits as in [`Store::requeue_orphans`].
    pub async fn requeue_overdue(
        &self,
        holder: NodeId,
        term: LeaderTerm,
        limit: i64,
    ) -> Result<Requeued> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<Running> = sqlx::query_as(&format!(
            "SELECT {RUNNING_COLUMNS}
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE i.state = 'running' AND i.run_deadline < clock_timestamp()
               AND EXISTS (SELECT 1 FROM leader_lease
                           WHERE name = $3 AND holder = $1 AND term = $2
                             AND expires_at > clock_timestamp())
             ORDER BY i.run_deadline LIMIT $4
             FOR UPDATE OF i SKIP LOCKED"
        ))
        .bind(holder.0)
        .bind(term.0)
        .bind(COORDINATOR_LEASE)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let requeued = requeue(
            &mut tx,
            rows,
            holder,
            "overdue",
            "it overran its step timeout",
        )
        .await?;
        tx.commit().await?;
        Ok(requeued)
    }
}

const RUNNING_COLUMNS: &str = "i.id, i.workflow, i.version, c.name AS campaign, i.current_step, \
    i.step_seq, i.fence, i.step_retryable, i.owner_node, \
    i.holds_permit AND c.on_error_permit = 'release' AS releases_on_error, i.step_queue, \
    i.step_handler";

#[derive(sqlx::FromRow)]
struct Running {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign: String,
    current_step: String,
    step_seq: i64,
    fence: i64,
    step_retryable: bool,
    owner_node: Option<Uuid>,
    /// It holds a permit its campaign takes back when it goes IN_ERROR.
    releases_on_error: bool,
    step_queue: String,
    step_handler: Option<String>,
}

/// What a requeue did.
#[derive(Clone, Debug, Default)]
pub struct Requeued {
    /// The instances taken back: publish the jobs of the READY ones.
    pub orphans: Vec<Orphan>,
    /// Queued instances admitted with the permits of orphans that went IN_ERROR: publish
    /// their jobs.
    pub admitted: Vec<Admitted>,
}

impl Requeued {
    /// The jobs to publish: the READY orphans' and the admitted instances'.
    pub fn jobs(&self) -> Vec<StepJob> {
        self.orphans
            .iter()
            .filter(|o| o.state == InstanceState::Ready)
            .map(Orphan::job)
            .chain(self.admitted.iter().map(Admitted::job))
            .collect()
    }
}

/// Moves locked RUNNING rows on: READY (fence+1) or, for a non-retryable step, IN_ERROR
/// (releasing its permit if its campaign says so); journals each (`outcome`, actor
/// `recovery:<by>`) and writes their `requeued` or `in_error` events, in `tx`.
async fn requeue(
    tx: &mut sqlx::PgConnection,
    rows: Vec<Running>,
    by: NodeId,
    outcome: &str,
    why: &str,
) -> Result<Requeued> {
    if rows.is_empty() {
        return Ok(Requeued::default());
    }
    let mut batch = Vec::with_capacity(rows.len());
    let mut orphans = Vec::with_capacity(rows.len());
    let mut released = Vec::new();
    for r in rows {
        let state = if r.step_retryable {
            InstanceState::Ready
        } else {
            InstanceState::InError
        };
        let release = state == InstanceState::InError && r.releases_on_error;
        if release {
            released.push(InstanceId(r.id));
        }
        let error = (state == InstanceState::InError).then(|| {
            format!(
                "step {:?} was interrupted ({why}); its outcome is unknown (allow_retry: false): \
                 resume it at the current or the next step",
                r.current_step
            )
        });
        batch.push(json!({
            "id": r.id,
            "owner": r.owner_node,
            "state": state,
            "outcome": if error.is_some() { "interrupted" } else { outcome },
            "error": error,
            "release": release,
        }));
        orphans.push(Orphan {
            id: InstanceId(r.id),
            workflow: r.workflow,
            version: r.version,
            campaign: r.campaign,
            current_step: r.current_step,
            step_seq: StepSeq(r.step_seq + 1),
            fence: Fence(r.fence + 1),
            state,
            route: parse_route(r.step_queue, r.step_handler)?,
        });
    }
    let (updated,): (i64,) = sqlx::query_as(
        "WITH b AS (
            SELECT * FROM jsonb_to_recordset($1::jsonb)
                AS b(id uuid, owner uuid, state text, outcome text, error text, release bool)
         ), upd AS (
            UPDATE instance i SET
                state = b.state, owner_node = NULL, claimed_at = NULL, run_deadline = NULL,
                fence = i.fence + 1, step_seq = i.step_seq + 1,
                holds_permit = i.holds_permit AND NOT b.release,
                ready_at = CASE WHEN b.state = 'ready' THEN clock_timestamp() END,
                error = coalesce(b.error, i.error), updated_at = clock_timestamp(),
                event_seq = i.event_seq + 1
            FROM b WHERE i.id = b.id AND i.id = ANY($3) AND i.state || '' = 'running'
            RETURNING i.id, i.step_seq, i.current_step, i.fence, i.step_attempt, b.owner,
                      b.outcome, b.state, b.error, i.event_seq, i.workflow, i.version,
                      i.campaign_id
         ), j AS (
            INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                 attempt, node_id, actor, started_at, finished_at, error)
            SELECT id, step_seq, current_step, outcome, state, fence, step_attempt, owner,
                   $2, clock_timestamp(), clock_timestamp(), error
            FROM upd
         ), ev AS (
            INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind,
                                    data)
            SELECT gen_random_uuid(), upd.id, c.name, upd.workflow, upd.version, upd.event_seq,
                   CASE WHEN upd.state = 'ready' THEN 'requeued' ELSE 'in_error' END,
                   CASE WHEN upd.state = 'ready'
                        THEN jsonb_build_object('state', upd.state, 'step', upd.current_step,
                                                'step_seq', upd.step_seq, 'actor', $2::text)
                        ELSE jsonb_build_object('state', upd.state, 'step', upd.current_step,
                                                'step_seq', upd.step_seq,
                                                'attempt', upd.step_attempt,
                                                'outcome', upd.outcome, 'next_step', NULL,
                                                'error', upd.error, 'actor', $2::text)
                   END
            FROM upd JOIN campaign c ON c.id = upd.campaign_id
         )
         SELECT count(*) FROM upd",
    )
    .bind(Value::Array(batch))
    .bind(format!("recovery:{by}"))
    .bind(orphans.iter().map(|o| o.id.0).collect::<Vec<Uuid>>())
    .fetch_one(&mut *tx)
    .await?;
    if updated != orphans.len() as i64 {
        return Err(Error::Corrupt(format!(
            "requeue updated {updated} of {} locked rows",
            orphans.len()
        )));
    }
    let admitted = release_permits(tx, &released, &[], "recovery").await?;
    Ok(Requeued { orphans, admitted })
}
