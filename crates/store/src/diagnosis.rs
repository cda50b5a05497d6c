//! The facts behind "why is this instance not running?" (`drover why`): the instance's row and
//! everything that drives (or should drive) it on: its campaign's queue and permit holders, its
//! wait, its child, its node, the live workers and the coordinator's lease.
//!
//! Read in one read-only snapshot (REPEATABLE READ), so the facts agree with each other; ages
//! are measured against the database clock read in that snapshot. The store only gathers; the
//! API decides which fact explains the instance best and words it.

use chrono::{DateTime, Utc};
use drover_core::{Fence, InstanceId, InstanceState, NodeId, Route, StepSeq};
use serde::Serialize;
use uuid::Uuid;

use crate::lease::COORDINATOR_LEASE;
use crate::model::{Campaign, Lease, Node};
use crate::nodes::{NODE_COLUMNS, NodeRow};
use crate::{Error, Result, Store};

/// The permit holders a diagnosis lists at most (the count covers them all).
pub const MAX_LISTED_HOLDERS: i64 = 20;

/// Everything [`Store::diagnosis_facts`] found about one instance.
#[derive(Clone, Debug, Serialize)]
pub struct DiagnosisFacts {
    /// The database clock when the facts were read: what every age is measured against.
    pub now: DateTime<Utc>,
    pub instance: DiagnosedInstance,
    pub campaign: Campaign,
    /// For a QUEUED instance: its place in its campaign's queue, 1 = next to be admitted.
    pub queue_position: Option<i64>,
    /// Instances holding a permit of the campaign, oldest holder first (at most
    /// [`MAX_LISTED_HOLDERS`]).
    pub permit_holders: Vec<PermitHolder>,
    /// All instances holding a permit of the campaign.
    pub permit_holder_count: i64,
    /// The child its current `subworkflow` step started, if any.
    pub child: Option<ChildFacts>,
    /// The deepest `in_error` descendant: only it can be resumed.
    pub failed_descendant: Option<InstanceId>,
    /// Whether an unconsumed event named like the instance's `wait_event` is stored.
    pub event_stored: bool,
    /// The node running it (while RUNNING), with its last heartbeat.
    pub owner: Option<Node>,
    /// Worker nodes alive and heard from within the `live_within_ms` the caller gave.
    pub live_workers: i64,
    /// Those of them that can run the current step: they serve its queue and, for a
    /// `handler` step, registered its handler.
    pub capable_workers: i64,
    /// The latest heartbeat of any worker node, whatever its status; `None` if none ever ran.
    pub last_worker_heartbeat: Option<DateTime<Utc>>,
    /// The coordinator's leader lease (`live` says whether anyone holds it now).
    pub lease: Option<Lease>,
    /// The instance restarted from this one, if it was restarted.
    pub restarted_as: Option<InstanceId>,
}

/// The instance's own row, as far as a diagnosis needs it.
#[derive(Clone, Debug, Serialize)]
pub struct DiagnosedInstance {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub state: InstanceState,
    pub current_step: String,
    /// Where the current step's job goes, and the handler it needs.
    pub route: Route,
    pub step_seq: StepSeq,
    pub step_attempt: i32,
    pub fence: Fence,
    pub holds_permit: bool,
    pub owner_node: Option<NodeId>,
    pub claimed_at: Option<DateTime<Utc>>,
    /// READY since (or, for a delayed retry, from) this time.
    pub ready_at: Option<DateTime<Utc>>,
    pub wake_at: Option<DateTime<Utc>>,
    pub wait_deadline: Option<DateTime<Utc>>,
    pub wait_event: Option<String>,
    pub wait_child: Option<InstanceId>,
    pub pending_children: i32,
    pub parent_instance_id: Option<InstanceId>,
    pub error: Option<String>,
    pub paused_at: Option<DateTime<Utc>>,
    pub paused_by: Option<String>,
    /// The state an operator paused it from (`None` when its step's commit paused it).
    pub paused_from: Option<InstanceState>,
    pub pause_requested_by: Option<String>,
    pub stop_requested_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One instance holding a campaign permit.
#[derive(Clone, Debug, Serialize)]
pub struct PermitHolder {
    pub id: InstanceId,
    pub workflow: String,
    pub state: InstanceState,
    pub current_step: String,
    pub created_at: DateTime<Utc>,
}

/// The child instance a waiting parent waits for.
#[derive(Clone, Debug, Serialize)]
pub struct ChildFacts {
    pub id: InstanceId,
    pub workflow: String,
    pub state: InstanceState,
    pub current_step: String,
    pub error: Option<String>,
}

pub(crate) fn parse_state(state: &str) -> Result<InstanceState> {
    state
        .parse()
        .map_err(|_| Error::Corrupt(format!("unknown instance state {state:?}")))
}

#[derive(sqlx::FromRow)]
struct Row {
    now: DateTime<Utc>,
    id: Uuid,
    workflow: String,
    version: i32,
    state: String,
    current_step: String,
    step_queue: String,
    step_handler: Option<String>,
    step_seq: i64,
    step_attempt: i32,
    fence: i64,
    holds_permit: bool,
    queue_seq: Option<i64>,
    owner_node: Option<Uuid>,
    claimed_at: Option<DateTime<Utc>>,
    ready_at: Option<DateTime<Utc>>,
    wake_at: Option<DateTime<Utc>>,
    wait_deadline: Option<DateTime<Utc>>,
    wait_event: Option<String>,
    wait_child: Option<Uuid>,
    pending_children: i32,
    parent_instance_id: Option<Uuid>,
    error: Option<String>,
    paused_at: Option<DateTime<Utc>>,
    paused_by: Option<String>,
    paused_from: Option<String>,
    pause_requested_by: Option<String>,
    stop_requested_by: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    campaign_id: i64,
    campaign: String,
    max_running: Option<i32>,
    running: i32,
    queued: i32,
    on_error_permit: String,
    campaign_created_at: DateTime<Utc>,
    campaign_paused_at: Option<DateTime<Utc>>,
    campaign_paused_by: Option<String>,
}

type HolderRow = (Uuid, String, String, String, DateTime<Utc>);
type ChildRow = (Uuid, String, String, String, Option<String>);

impl Store {
    /// The facts explaining where `id` stands; `None` for an unknown instance. A worker node
    /// counts as live when it is `alive` and heartbeat within `live_within_ms`.
    pub async fn diagnosis_facts(
        &self,
        id: InstanceId,
        live_within_ms: i64,
    ) -> Result<Option<DiagnosisFacts>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let row: Option<Row> = sqlx::query_as(
            "SELECT clock_timestamp() AS now, i.id, i.workflow, i.version, i.state,
                    i.current_step, i.step_queue, i.step_handler, i.step_seq, i.step_attempt,
                    i.fence, i.holds_permit,
                    i.queue_seq, i.owner_node, i.claimed_at, i.ready_at, i.wake_at,
                    i.wait_deadline, i.wait_event, i.wait_child, i.pending_children,
                    i.parent_instance_id, i.error, i.paused_at, i.paused_by, i.paused_from,
                    i.pause_requested_by, i.stop_requested_by, i.created_at, i.updated_at,
                    i.finished_at, c.id AS campaign_id, c.name AS campaign, c.max_running,
                    c.running, c.queued, c.on_error_permit, c.created_at AS campaign_created_at,
                    c.paused_at AS campaign_paused_at, c.paused_by AS campaign_paused_by
             FROM instance i JOIN campaign c ON c.id = i.campaign_id
             WHERE i.id = $1",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        let state = parse_state(&r.state)?;

        let queue_position = match (state, r.queue_seq) {
            (InstanceState::Queued, Some(seq)) => {
                let (ahead,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM instance
                     WHERE campaign_id = $1 AND state = 'queued' AND queue_seq < $2",
                )
                .bind(r.campaign_id)
                .bind(seq)
                .fetch_one(&mut *tx)
                .await?;
                Some(ahead + 1)
            }
            _ => None,
        };

        let (permit_holders, permit_holder_count) = if r.max_running.is_some() {
            let rows: Vec<HolderRow> = sqlx::query_as(
                "SELECT id, workflow, state, current_step, created_at FROM instance
                 WHERE campaign_id = $1 AND holds_permit
                 ORDER BY created_at, id LIMIT $2",
            )
            .bind(r.campaign_id)
            .bind(MAX_LISTED_HOLDERS)
            .fetch_all(&mut *tx)
            .await?;
            let (count,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM instance WHERE campaign_id = $1 AND holds_permit",
            )
            .bind(r.campaign_id)
            .fetch_one(&mut *tx)
            .await?;
            let holders = rows
                .into_iter()
                .map(|(id, workflow, state, current_step, created_at)| {
                    Ok(PermitHolder {
                        id: InstanceId(id),
                        workflow,
                        state: parse_state(&state)?,
                        current_step,
                        created_at,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (holders, count)
        } else {
            (Vec::new(), 0)
        };

        let child = match r.wait_child {
            Some(child) => {
                let row: Option<ChildRow> = sqlx::query_as(
                    "SELECT id, workflow, state, current_step, error FROM instance WHERE id = $1",
                )
                .bind(child)
                .fetch_optional(&mut *tx)
                .await?;
                row.map(|(id, workflow, state, current_step, error)| {
                    Ok::<_, Error>(ChildFacts {
                        id: InstanceId(id),
                        workflow,
                        state: parse_state(&state)?,
                        current_step,
                        error,
                    })
                })
                .transpose()?
            }
            None => None,
        };

        let failed_descendant = if state == InstanceState::InError {
            crate::operator::deepest_failed_descendant(&mut tx, id).await?
        } else {
            None
        };

        let event_stored = match &r.wait_event {
            Some(name) => {
                let (stored,): (bool,) = sqlx::query_as(
                    "SELECT EXISTS (SELECT 1 FROM instance_signal
                                    WHERE instance_id = $1 AND name = $2 AND consumed_at IS NULL)",
                )
                .bind(id.0)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
                stored
            }
            None => false,
        };

        let owner = match r.owner_node {
            Some(node) => {
                let row: Option<NodeRow> =
                    sqlx::query_as(&format!("SELECT {NODE_COLUMNS} FROM node WHERE id = $1"))
                        .bind(node)
                        .fetch_optional(&mut *tx)
                        .await?;
                row.map(Node::try_from).transpose()?
            }
            None => None,
        };

        let route = crate::model::parse_route(r.step_queue, r.step_handler)?;
        let (live_workers, capable_workers, last_worker_heartbeat): (
            i64,
            i64,
            Option<DateTime<Utc>>,
        ) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE live),
                    count(*) FILTER (WHERE live AND $3 = ANY (queues)
                                     AND ($4::text IS NULL OR $4 = ANY (handlers))),
                    max(heartbeat_at)
             FROM (SELECT *, status = 'alive'
                             AND heartbeat_at > $1 - $2 * interval '1 millisecond' AS live
                   FROM node WHERE 'worker' = ANY (roles)) n",
        )
        .bind(r.now)
        .bind(live_within_ms)
        .bind(route.queue.as_str())
        .bind(route.handler.as_deref())
        .fetch_one(&mut *tx)
        .await?;

        #[allow(clippy::type_complexity)]
        let lease: Option<(
            String,
            Option<Uuid>,
            i64,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
        )> = sqlx::query_as(
            "SELECT name, holder, term, expires_at, acquired_at FROM leader_lease WHERE name = $1",
        )
        .bind(COORDINATOR_LEASE)
        .fetch_optional(&mut *tx)
        .await?;
        let lease = lease.map(|(name, holder, term, expires_at, acquired_at)| Lease {
            name,
            holder: holder.map(NodeId),
            term,
            expires_at,
            acquired_at,
            live: expires_at > r.now,
        });

        let restarted_as: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM instance WHERE restarted_from = $1")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;

        let paused_from = r.paused_from.as_deref().map(parse_state).transpose()?;
        Ok(Some(DiagnosisFacts {
            now: r.now,
            instance: DiagnosedInstance {
                id: InstanceId(r.id),
                workflow: r.workflow,
                version: r.version,
                state,
                current_step: r.current_step,
                route,
                step_seq: StepSeq(r.step_seq),
                step_attempt: r.step_attempt,
                fence: Fence(r.fence),
                holds_permit: r.holds_permit,
                owner_node: r.owner_node.map(NodeId),
                claimed_at: r.claimed_at,
                ready_at: r.ready_at,
                wake_at: r.wake_at,
                wait_deadline: r.wait_deadline,
                wait_event: r.wait_event,
                wait_child: r.wait_child.map(InstanceId),
                pending_children: r.pending_children,
                parent_instance_id: r.parent_instance_id.map(InstanceId),
                error: r.error,
                paused_at: r.paused_at,
                paused_by: r.paused_by,
                paused_from,
                pause_requested_by: r.pause_requested_by,
                stop_requested_by: r.stop_requested_by,
                created_at: r.created_at,
                updated_at: r.updated_at,
                finished_at: r.finished_at,
            },
            campaign: Campaign {
                id: drover_core::CampaignId(r.campaign_id),
                name: r.campaign,
                max_running: r.max_running,
                running: r.running,
                queued: r.queued,
                on_error_permit: r.on_error_permit,
                created_at: r.campaign_created_at,
                paused_at: r.campaign_paused_at,
                paused_by: r.campaign_paused_by,
            },
            queue_position,
            permit_holders,
            permit_holder_count,
            child,
            failed_descendant,
            event_stored,
            owner,
            live_workers,
            capable_workers,
            last_worker_heartbeat,
            lease,
            restarted_as: restarted_as.map(|(id,)| InstanceId(id)),
        }))
    }
}
