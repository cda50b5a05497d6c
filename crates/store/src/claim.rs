//! The fenced claim of delivered jobs.

use chrono::{DateTime, Utc};
use drover_core::{Fence, InstanceId, NodeId, StepSeq};
use serde_json::Value;
use uuid::Uuid;

use crate::model::*;
use crate::{Result, Store};

impl Store {
    /// Claims the instances of a batch of delivered jobs for `node`, in one statement.
    ///
    /// A job claims only if its `(step_seq, fence)` is still the instance's and the instance
    /// is READY, and only while `node` is alive; the claim bumps the fence. A `handler` step
    /// is claimed only by a node that advertises its handler (its node row). Jobs that do not
    /// claim are stale or duplicate deliveries (or, for a handler the node lacks, left to the
    /// stale-READY sweeper): absent from the result.
    pub async fn claim(&self, node: NodeId, jobs: &[StepJob]) -> Result<Vec<Claimed>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut jobs = jobs.to_vec();
        // A stable lock order keeps two concurrent claim batches from deadlocking.
        jobs.sort_by_key(|j| j.instance);
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.instance.0).collect();
        let seqs: Vec<i64> = jobs.iter().map(|j| j.step_seq.0).collect();
        let fences: Vec<i64> = jobs.iter().map(|j| j.fence.0).collect();
        let rows: Vec<ClaimRow> = sqlx::query_as(
            "UPDATE instance i
                SET state = 'running', owner_node = $1, claimed_at = clock_timestamp(),
                    fence = i.fence + 1, step_claims = i.step_claims + 1,
                    signal_pending = false,
                    run_deadline = clock_timestamp()
                                   + (i.step_timeout_ms + 30000) * interval '1 millisecond',
                    updated_at = clock_timestamp()
             FROM unnest($2::uuid[], $3::bigint[], $4::bigint[]) AS j(id, step_seq, fence),
                  campaign c
             WHERE i.id = j.id AND i.step_seq = j.step_seq AND i.fence = j.fence
               -- `|| ''` keeps the state test out of index conditions: with statistics taken
               -- while few rows were READY, the generic plan otherwise scans every READY row
               -- (instance_by_state) for each claim, so a backlog made claims quadratic.
               -- Each job is found by primary key instead.
               AND i.state || '' = 'ready' AND c.id = i.campaign_id
               AND EXISTS (SELECT 1 FROM node WHERE id = $1 AND status = 'alive')
               AND (i.step_handler IS NULL
                    OR i.step_handler = ANY ((SELECT handlers FROM node WHERE id = $1)::text[]))
             RETURNING i.id, i.workflow, i.version, c.name AS campaign, i.current_step,
                       i.step_seq, i.step_entered_seq, i.step_attempt, i.fence, i.step_claims,
                       i.steps_run, i.vars, i.outputs, i.created_at, i.claimed_at,
                       i.wait_deadline, i.wait_child, i.parent_instance_id, i.call_depth,
                       i.step_queue, i.step_handler, i.holds_permit",
        )
        .bind(node.0)
        .bind(&ids)
        .bind(&seqs)
        .bind(&fences)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ClaimRow::into_claimed).collect()
    }
}

/// A claimed instance row `i` of the `instance` table as a JSON [`ClaimRow`] (read as
/// `sqlx::types::Json<ClaimRow>`): how the statements that claim an instance besides
/// [`Store::claim`] return it — a commit that continues it, a hand-off that admits it, a
/// start that creates it claimed. One list of its fields, for all of them.
macro_rules! claim_row_json {
    () => {
        "jsonb_build_object(
            'id', i.id, 'workflow', i.workflow, 'version', i.version,
            'campaign', (SELECT name FROM campaign WHERE id = i.campaign_id),
            'current_step', i.current_step, 'step_seq', i.step_seq,
            'step_entered_seq', i.step_entered_seq, 'step_attempt', i.step_attempt,
            'fence', i.fence, 'step_claims', i.step_claims, 'steps_run', i.steps_run,
            'vars', i.vars, 'outputs', i.outputs, 'created_at', i.created_at,
            'claimed_at', i.claimed_at, 'wait_deadline', i.wait_deadline,
            'wait_child', i.wait_child, 'parent_instance_id', i.parent_instance_id,
            'call_depth', i.call_depth, 'step_queue', i.step_queue,
            'step_handler', i.step_handler, 'holds_permit', i.holds_permit)"
    };
}
pub(crate) use claim_row_json;

/// A claimed instance as a claim (or a commit that continues it) returns it.
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(crate) struct ClaimRow {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign: String,
    current_step: String,
    step_seq: i64,
    step_entered_seq: i64,
    step_attempt: i32,
    fence: i64,
    step_claims: i32,
    steps_run: i32,
    vars: Value,
    outputs: Value,
    created_at: DateTime<Utc>,
    claimed_at: DateTime<Utc>,
    wait_deadline: Option<DateTime<Utc>>,
    wait_child: Option<Uuid>,
    parent_instance_id: Option<Uuid>,
    call_depth: i32,
    step_queue: String,
    step_handler: Option<String>,
    holds_permit: bool,
}

impl ClaimRow {
    pub(crate) fn into_claimed(self) -> Result<Claimed> {
        Ok(Claimed {
            id: InstanceId(self.id),
            workflow: self.workflow,
            version: self.version,
            campaign: self.campaign,
            current_step: self.current_step,
            step_seq: StepSeq(self.step_seq),
            step_entered_seq: StepSeq(self.step_entered_seq),
            step_attempt: self.step_attempt,
            fence: Fence(self.fence),
            step_claims: self.step_claims,
            steps_run: self.steps_run,
            vars: self.vars,
            outputs: self.outputs,
            created_at: self.created_at,
            claimed_at: self.claimed_at,
            wait_deadline: self.wait_deadline,
            wait_child: self.wait_child.map(InstanceId),
            parent: self.parent_instance_id.map(InstanceId),
            call_depth: self.call_depth,
            route: parse_route(self.step_queue, self.step_handler)?,
            holds_permit: self.holds_permit,
        })
    }
}
