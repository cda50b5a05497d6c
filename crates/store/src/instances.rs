//! Definitions, campaigns, instances and the journal: creation, fenced claim, group commit.

use chrono::{DateTime, Utc};
use drover_core::{CampaignId, Fence, InstanceId, InstanceState, NodeId, OutboxEvent, StepSeq};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::model::*;
use crate::{Error, Result, Store};

fn parse_state(state: &str) -> Result<InstanceState> {
    state
        .parse()
        .map_err(|_| Error::Corrupt(format!("unknown instance state {state:?}")))
}

fn events_json(events: &[OutboxEvent]) -> Value {
    Value::Array(
        events
            .iter()
            .map(|e| json!({ "id": e.id, "subject": e.subject, "payload": e.payload }))
            .collect(),
    )
}

#[derive(sqlx::FromRow)]
struct InstanceRow {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign: String,
    state: String,
    current_step: String,
    step_seq: i64,
    step_attempt: i32,
    fence: i64,
    owner_node: Option<Uuid>,
    vars: Value,
    outputs: Value,
    error: Option<String>,
    parent_instance_id: Option<Uuid>,
    call_depth: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

impl TryFrom<InstanceRow> for Instance {
    type Error = Error;
    fn try_from(r: InstanceRow) -> Result<Self> {
        Ok(Instance {
            id: InstanceId(r.id),
            workflow: r.workflow,
            version: r.version,
            campaign: r.campaign,
            state: parse_state(&r.state)?,
            current_step: r.current_step,
            step_seq: StepSeq(r.step_seq),
            step_attempt: r.step_attempt,
            fence: Fence(r.fence),
            owner_node: r.owner_node.map(NodeId),
            vars: r.vars,
            outputs: r.outputs,
            error: r.error,
            parent_instance_id: r.parent_instance_id.map(InstanceId),
            call_depth: r.call_depth,
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
        })
    }
}

const INSTANCE_COLUMNS: &str = "i.id, i.workflow, i.version, c.name AS campaign, i.state, \
    i.current_step, i.step_seq, i.step_attempt, i.fence, i.owner_node, i.vars, i.outputs, \
    i.error, i.parent_instance_id, i.call_depth, i.created_at, i.updated_at, i.finished_at";

#[derive(sqlx::FromRow)]
struct CampaignRow {
    id: i64,
    name: String,
    max_running: Option<i32>,
    running: i32,
    queued: i32,
    on_error_permit: String,
    created_at: DateTime<Utc>,
}

impl From<CampaignRow> for Campaign {
    fn from(r: CampaignRow) -> Self {
        Campaign {
            id: CampaignId(r.id),
            name: r.name,
            max_running: r.max_running,
            running: r.running,
            queued: r.queued,
            on_error_permit: r.on_error_permit,
            created_at: r.created_at,
        }
    }
}

#[derive(sqlx::FromRow)]
struct JournalRow {
    step_seq: i64,
    step_id: String,
    outcome: String,
    transition: Option<String>,
    fence: i64,
    attempt: i32,
    node_id: Option<Uuid>,
    actor: Option<String>,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    output: Option<Value>,
    error: Option<String>,
}

impl Store {
    /// Stores `body` as the next version of workflow `name`, unless it equals the latest
    /// version, which is then returned unchanged.
    pub async fn deploy_definition(
        &self,
        name: &str,
        body: &Value,
        source: &str,
    ) -> Result<Deployed> {
        loop {
            let latest: Option<(i32, Value)> = sqlx::query_as(
                "SELECT version, body FROM workflow_definition WHERE name = $1 \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
            let version = match latest {
                Some((version, latest)) if &latest == body => {
                    return Ok(Deployed {
                        name: name.to_owned(),
                        version,
                        created: false,
                    });
                }
                Some((version, _)) => version + 1,
                None => 1,
            };
            let inserted = sqlx::query(
                "INSERT INTO workflow_definition (name, version, body, source) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .bind(version)
            .bind(body)
            .bind(source)
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(Deployed {
                    name: name.to_owned(),
                    version,
                    created: true,
                });
            }
            // A concurrent deploy took this version number: look again.
        }
    }

    /// The latest version of every workflow, by name.
    pub async fn list_definitions(&self) -> Result<Vec<DefinitionSummary>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (name) name, version, body->>'description' AS description,
                    coalesce(jsonb_array_length(body->'steps'), 0)::bigint AS steps, created_at
             FROM workflow_definition ORDER BY name, version DESC",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// A version of a workflow; the latest when `version` is `None`.
    pub async fn get_definition(
        &self,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<StoredDefinition>> {
        Ok(sqlx::query_as(
            "SELECT name, version, body, source, created_at FROM workflow_definition \
             WHERE name = $1 AND ($2::int IS NULL OR version = $2) \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn campaign_by_name(&self, name: &str) -> Result<Option<Campaign>> {
        let row: Option<CampaignRow> = sqlx::query_as(
            "SELECT id, name, max_running, running, queued, on_error_permit, created_at \
             FROM campaign WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Campaign::from))
    }

    pub async fn list_campaigns(&self) -> Result<Vec<Campaign>> {
        let rows: Vec<CampaignRow> = sqlx::query_as(
            "SELECT id, name, max_running, running, queued, on_error_permit, created_at \
             FROM campaign ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Campaign::from).collect())
    }

    /// Creates instances READY at their entry step, each with its journal entry 0
    /// (`started`) and its events, in one transaction.
    pub async fn create_instances(
        &self,
        instances: &[NewInstance],
        actor: &str,
        events: &[OutboxEvent],
    ) -> Result<()> {
        if instances.is_empty() {
            return Ok(());
        }
        let rows = Value::Array(
            instances
                .iter()
                .map(|i| {
                    json!({
                        "id": i.id,
                        "campaign_id": i.campaign,
                        "workflow": i.workflow,
                        "version": i.version,
                        "entry_step": i.entry_step,
                        "vars": i.vars,
                    })
                })
                .collect(),
        );
        sqlx::query(
            "WITH n AS (
                SELECT * FROM jsonb_to_recordset($1::jsonb) AS n(
                    id uuid, campaign_id bigint, workflow text, version int,
                    entry_step text, vars jsonb)
             ), ins AS (
                INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                                      ready_at, vars, initial_vars)
                SELECT id, campaign_id, workflow, version, 'ready', entry_step,
                       clock_timestamp(), vars, vars
                FROM n
                RETURNING id, current_step, created_at
             ), j AS (
                INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                     attempt, actor, started_at, finished_at)
                SELECT id, 0, current_step, 'started', 'ready', 0, 1, $2, created_at, created_at
                FROM ins
             )
             INSERT INTO event_outbox (id, subject, payload)
             SELECT e.id, e.subject, e.payload
             FROM jsonb_to_recordset($3::jsonb) AS e(id uuid, subject text, payload jsonb)",
        )
        .bind(rows)
        .bind(actor)
        .bind(events_json(events))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_instance(&self, id: InstanceId) -> Result<Option<Instance>> {
        let row: Option<InstanceRow> = sqlx::query_as(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instance i JOIN campaign c ON c.id = i.campaign_id \
             WHERE i.id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Instance::try_from).transpose()
    }

    /// Instances matching `filter`, newest first.
    pub async fn list_instances(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        let rows: Vec<InstanceRow> = sqlx::query_as(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instance i JOIN campaign c ON c.id = i.campaign_id \
             WHERE ($1::text IS NULL OR i.state = $1) \
               AND ($2::text IS NULL OR c.name = $2) \
               AND ($3::text IS NULL OR i.workflow = $3) \
               AND ($4::uuid IS NULL OR i.id < $4) \
             ORDER BY i.id DESC LIMIT $5"
        ))
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.campaign.as_deref())
        .bind(filter.workflow.as_deref())
        .bind(filter.before.map(|id| id.0))
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Instance::try_from).collect()
    }

    /// Counts instances by state (all states, zeros included).
    pub async fn count_by_state(&self) -> Result<Vec<(InstanceState, i64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM instance GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let mut counts: Vec<(InstanceState, i64)> =
            InstanceState::ALL.iter().map(|s| (*s, 0)).collect();
        for (state, n) in rows {
            let state = parse_state(&state)?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == state) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }

    /// The instance's journal in checkpoint order; `None` for an unknown instance.
    pub async fn journal(&self, id: InstanceId) -> Result<Option<Vec<JournalEntry>>> {
        let rows: Vec<JournalRow> = sqlx::query_as(
            "SELECT step_seq, step_id, outcome, transition, fence, attempt, node_id, actor,
                    started_at, finished_at, output, error
             FROM journal WHERE instance_id = $1 ORDER BY step_seq",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() && self.get_instance(id).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(
            rows.into_iter()
                .map(|r| JournalEntry {
                    step_seq: StepSeq(r.step_seq),
                    step_id: r.step_id,
                    outcome: r.outcome,
                    transition: r.transition,
                    fence: Fence(r.fence),
                    attempt: r.attempt,
                    node_id: r.node_id.map(NodeId),
                    actor: r.actor,
                    started_at: r.started_at,
                    finished_at: r.finished_at,
                    output: r.output,
                    error: r.error,
                })
                .collect(),
        ))
    }

    /// Claims the instances of a batch of delivered jobs for `node`, in one statement.
    ///
    /// A job claims only if its `(step_seq, fence)` is still the instance's and the instance
    /// is READY, and only while `node` is alive; the claim bumps the fence. Jobs that do not
    /// claim are stale or duplicate deliveries: absent from the result.
    pub async fn claim(&self, node: NodeId, jobs: &[ClaimRequest]) -> Result<Vec<Claimed>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut jobs = jobs.to_vec();
        // A stable lock order keeps two concurrent claim batches from deadlocking.
        jobs.sort_by_key(|j| j.instance);
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.instance.0).collect();
        let seqs: Vec<i64> = jobs.iter().map(|j| j.step_seq.0).collect();
        let fences: Vec<i64> = jobs.iter().map(|j| j.fence.0).collect();
        #[derive(sqlx::FromRow)]
        struct Row {
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
        }
        let rows: Vec<Row> = sqlx::query_as(
            "UPDATE instance i
                SET state = 'running', owner_node = $1, claimed_at = clock_timestamp(),
                    fence = i.fence + 1, step_claims = i.step_claims + 1,
                    updated_at = clock_timestamp()
             FROM unnest($2::uuid[], $3::bigint[], $4::bigint[]) AS j(id, step_seq, fence),
                  campaign c
             WHERE i.id = j.id AND i.step_seq = j.step_seq AND i.fence = j.fence
               AND i.state = 'ready' AND c.id = i.campaign_id
               AND EXISTS (SELECT 1 FROM node WHERE id = $1 AND status = 'alive')
             RETURNING i.id, i.workflow, i.version, c.name AS campaign, i.current_step,
                       i.step_seq, i.step_entered_seq, i.step_attempt, i.fence, i.step_claims,
                       i.steps_run, i.vars, i.outputs, i.created_at",
        )
        .bind(node.0)
        .bind(&ids)
        .bind(&seqs)
        .bind(&fences)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Claimed {
                id: InstanceId(r.id),
                workflow: r.workflow,
                version: r.version,
                campaign: r.campaign,
                current_step: r.current_step,
                step_seq: StepSeq(r.step_seq),
                step_entered_seq: StepSeq(r.step_entered_seq),
                step_attempt: r.step_attempt,
                fence: Fence(r.fence),
                step_claims: r.step_claims,
                steps_run: r.steps_run,
                vars: r.vars,
                outputs: r.outputs,
                created_at: r.created_at,
            })
            .collect())
    }

    /// Group-commits a batch of step completions by `node` in one statement (one fsync).
    ///
    /// Each completion is a CAS on its instance row (fence, step_seq, RUNNING, owned by
    /// `node`); for those that pass, the journal entry `step_seq + 1` and the events are
    /// written in the same transaction. Returns one [`Commit`] per completion, in order.
    pub async fn commit(&self, node: NodeId, completions: &[Completion]) -> Result<Vec<Commit>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let rows = Value::Array(
            completions
                .iter()
                .enumerate()
                .map(|(idx, c)| {
                    let (next_state, next_step, retry, delay_ms) = match &c.transition {
                        Transition::Next { step } => ("ready", Some(step.as_str()), false, 0),
                        Transition::Retry { delay_ms } => ("ready", None, true, *delay_ms),
                        Transition::Stop { state } => (state.as_str(), None, false, 0),
                    };
                    let transition = next_step.unwrap_or(next_state);
                    json!({
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
                        "retry": retry,
                        "delay_ms": delay_ms,
                        "vars": c.vars,
                        "output": c.output,
                        "error": c.error,
                        "events": events_json(&c.events),
                    })
                })
                .collect(),
        );
        let results: Vec<(i32, bool, bool)> = sqlx::query_as(
            "WITH c AS (
                SELECT * FROM jsonb_to_recordset($1::jsonb) AS c(
                    idx int, instance_id uuid, fence bigint, step_seq bigint, step_id text,
                    attempt int, started_at timestamptz, outcome text, transition text,
                    next_state text, next_step text, retry bool, delay_ms bigint, vars jsonb,
                    output jsonb, error text, events jsonb)
             ), upd AS (
                UPDATE instance i SET
                    state = c.next_state,
                    owner_node = NULL,
                    claimed_at = NULL,
                    step_seq = i.step_seq + 1,
                    current_step = coalesce(c.next_step, i.current_step),
                    step_entered_seq = CASE WHEN c.next_step IS NOT NULL THEN i.step_seq + 1
                                            ELSE i.step_entered_seq END,
                    step_attempt = CASE WHEN c.retry THEN i.step_attempt + 1
                                        WHEN c.next_step IS NOT NULL THEN 1
                                        ELSE i.step_attempt END,
                    step_claims = 0,
                    steps_run = i.steps_run + CASE WHEN c.retry THEN 0 ELSE 1 END,
                    vars = coalesce(c.vars, i.vars),
                    outputs = CASE WHEN c.output IS NULL THEN i.outputs
                                   ELSE i.outputs || jsonb_build_object(c.step_id, c.output) END,
                    error = c.error,
                    ready_at = CASE WHEN c.next_state = 'ready'
                                    THEN clock_timestamp() + c.delay_ms * interval '1 millisecond'
                               END,
                    finished_at = CASE WHEN c.next_state IN ('completed', 'failed')
                                       THEN clock_timestamp() END,
                    holds_permit = i.holds_permit
                                   AND c.next_state NOT IN ('completed', 'failed', 'stopped'),
                    updated_at = clock_timestamp()
                FROM c
                WHERE i.id = c.instance_id AND i.fence = c.fence AND i.step_seq = c.step_seq
                  AND i.state = 'running' AND i.owner_node = $2
                RETURNING c.idx
             ), j AS (
                INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                     attempt, node_id, started_at, finished_at, output, error)
                SELECT c.instance_id, c.step_seq + 1, c.step_id, c.outcome, c.transition,
                       c.fence, c.attempt, $2, c.started_at, clock_timestamp(), c.output, c.error
                FROM c JOIN upd ON upd.idx = c.idx
             ), ev AS (
                INSERT INTO event_outbox (id, subject, payload)
                SELECT e.id, e.subject, e.payload
                FROM c JOIN upd ON upd.idx = c.idx,
                     jsonb_to_recordset(c.events) AS e(id uuid, subject text, payload jsonb)
             )
             SELECT c.idx, upd.idx IS NOT NULL,
                    EXISTS (SELECT 1 FROM journal jr
                            WHERE jr.instance_id = c.instance_id AND jr.step_seq = c.step_seq + 1)
             FROM c LEFT JOIN upd ON upd.idx = c.idx
             ORDER BY c.idx",
        )
        .bind(rows)
        .bind(node.0)
        .fetch_all(&self.pool)
        .await?;
        if results.len() != completions.len() {
            return Err(Error::Corrupt(format!(
                "group commit answered {} results for {} completions",
                results.len(),
                completions.len()
            )));
        }
        Ok(results
            .into_iter()
            .map(|(_, committed, existed)| match (committed, existed) {
                (true, _) => Commit::Committed,
                (false, true) => Commit::AlreadyCommitted,
                (false, false) => Commit::Fenced,
            })
            .collect())
    }

    /// READY instances whose `ready_at` is older than `older_than_ms`: their job may have
    /// been lost. Returns `(instance, step_seq, fence)` for re-dispatch.
    pub async fn stale_ready(&self, older_than_ms: i64, limit: i64) -> Result<Vec<ClaimRequest>> {
        let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
            "SELECT id, step_seq, fence FROM instance
             WHERE state = 'ready'
               AND ready_at < clock_timestamp() - $1 * interval '1 millisecond'
             ORDER BY ready_at LIMIT $2",
        )
        .bind(older_than_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, seq, fence)| ClaimRequest {
                instance: InstanceId(id),
                step_seq: StepSeq(seq),
                fence: Fence(fence),
            })
            .collect())
    }
}
