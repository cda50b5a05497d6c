//! Instances and the journal: creation, listing, reading, stale READY rows, instance ends.

use chrono::{DateTime, Utc};
use drover_core::{Fence, InstanceId, InstanceState, NodeId, StepSeq};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::claim::{ClaimRow, claim_row_json};
use crate::model::*;
use crate::semaphore::{Admission, LockedCampaign, admit_new, lock_limited_campaigns};
use crate::{Error, Result, Store};

fn parse_state(state: &str) -> Result<InstanceState> {
    state
        .parse()
        .map_err(|_| Error::Corrupt(format!("unknown instance state {state:?}")))
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
    wake_at: Option<DateTime<Utc>>,
    wait_event: Option<String>,
    wait_child: Option<Uuid>,
    holds_permit: bool,
    queue_position: Option<i64>,
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
            wake_at: r.wake_at,
            wait_event: r.wait_event,
            wait_child: r.wait_child.map(InstanceId),
            holds_permit: r.holds_permit,
            queue_position: r.queue_position,
        })
    }
}

const INSTANCE_COLUMNS: &str = "i.id, i.workflow, i.version, c.name AS campaign, i.state, \
    i.current_step, i.step_seq, i.step_attempt, i.fence, i.owner_node, i.vars, i.outputs, \
    i.error, i.parent_instance_id, i.call_depth, i.created_at, i.updated_at, i.finished_at, \
    i.wake_at, i.wait_event, i.wait_child, i.holds_permit, \
    CASE WHEN i.state = 'queued' THEN \
        (SELECT count(*) FROM instance q \
         WHERE q.campaign_id = i.campaign_id AND q.state = 'queued' AND q.queue_seq <= i.queue_seq) \
    END AS queue_position";

/// The columns of an [`InstanceSummary`]: no `outputs`, no `fence`, `error` cut, and `vars`
/// appended by the query (`i.vars` or `NULL::jsonb`).
const SUMMARY_COLUMNS: &str = "i.id, i.workflow, i.version, c.name AS campaign, i.state, \
    i.current_step, i.step_seq, i.step_attempt, i.owner_node, \
    left(i.error, $6) AS error, i.parent_instance_id, i.call_depth, \
    i.created_at, i.updated_at, i.finished_at, i.wake_at, i.wait_event, i.wait_child, \
    i.holds_permit, \
    CASE WHEN i.state = 'queued' THEN \
        (SELECT count(*) FROM instance q \
         WHERE q.campaign_id = i.campaign_id AND q.state = 'queued' AND q.queue_seq <= i.queue_seq) \
    END AS queue_position";

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign: String,
    state: String,
    current_step: String,
    step_seq: i64,
    step_attempt: i32,
    owner_node: Option<Uuid>,
    vars: Option<Value>,
    error: Option<String>,
    parent_instance_id: Option<Uuid>,
    call_depth: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    wake_at: Option<DateTime<Utc>>,
    wait_event: Option<String>,
    wait_child: Option<Uuid>,
    holds_permit: bool,
    queue_position: Option<i64>,
}

impl TryFrom<SummaryRow> for InstanceSummary {
    type Error = Error;
    fn try_from(r: SummaryRow) -> Result<Self> {
        Ok(InstanceSummary {
            id: InstanceId(r.id),
            workflow: r.workflow,
            version: r.version,
            campaign: r.campaign,
            state: parse_state(&r.state)?,
            current_step: r.current_step,
            step_seq: StepSeq(r.step_seq),
            step_attempt: r.step_attempt,
            owner_node: r.owner_node.map(NodeId),
            vars: r.vars,
            error: r.error,
            parent_instance_id: r.parent_instance_id.map(InstanceId),
            call_depth: r.call_depth,
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            wake_at: r.wake_at,
            wait_event: r.wait_event,
            wait_child: r.wait_child.map(InstanceId),
            holds_permit: r.holds_permit,
            queue_position: r.queue_position,
        })
    }
}

/// Rows read per statement while a listing or journal page fills a byte budget: what it may
/// read past the budget.
const BUDGET_BATCH: i64 = 8;

/// The length of `value` as compact JSON, without building the text.
fn json_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
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

impl From<JournalRow> for JournalEntry {
    fn from(r: JournalRow) -> Self {
        JournalEntry {
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
        }
    }
}

impl Store {
    /// Creates instances at their entry step, each with its journal entry 0 (`started`) and
    /// its `started` event (actor `actor`), in one transaction.
    ///
    /// An instance of an unlimited campaign is READY (no permit, no campaign lock). One of a
    /// limited campaign is admitted under the campaign's row lock (ARCHITECTURE.md,
    /// "Semaphore"): READY with a permit while `running < max_running` and nobody queues, else
    /// QUEUED with its place taken under the lock (in input order) and a `queued` event.
    /// Returns the READY instances' jobs (publish them after this returns) and
    /// the queued ones.
    pub async fn create_instances(
        &self,
        instances: &[NewInstance],
        actor: &str,
    ) -> Result<Created> {
        self.create_instances_claiming(instances, actor, None).await
    }

    /// [`Store::create_instances`], where up to `claim.max` of the instances created READY
    /// are claimed at once by `claim.node` in the same statement (RUNNING, fence 1, exactly as
    /// [`Store::claim`] would, and only while that node is alive, serves the entry step's
    /// queue and has its handler): the caller runs their first step at once, with no job round
    /// trip through NATS and no claim statement. They are in [`Created::claimed`], not in
    /// [`Created::ready`]. A node that dies before committing such a step leaves it RUNNING
    /// under a dead owner, as any claim does, for recovery.
    pub async fn create_instances_claiming(
        &self,
        instances: &[NewInstance],
        actor: &str,
        claim: Option<LocalClaim>,
    ) -> Result<Created> {
        if instances.is_empty() {
            return Ok(Created::default());
        }
        let mut campaign_ids: Vec<i64> = instances.iter().map(|i| i.campaign.0).collect();
        campaign_ids.sort_unstable();
        campaign_ids.dedup();
        // A limit is set at creation or never, so an unlimited campaign read here stays so.
        let unlimited = self.known_unlimited(&campaign_ids) || {
            let found: Vec<(i64, bool)> = sqlx::query_as(
                "SELECT id, max_running IS NOT NULL FROM campaign WHERE id = ANY($1)",
            )
            .bind(&campaign_ids)
            .fetch_all(&self.pool)
            .await?;
            let free: Vec<i64> = found
                .iter()
                .filter(|(_, limited)| !limited)
                .map(|(id, _)| *id)
                .collect();
            self.remember_unlimited(&free);
            found.iter().all(|(_, limited)| !limited)
        };
        if unlimited {
            let admissions = vec![Admission::Free; instances.len()];
            let mut conn = self.pool.acquire().await?;
            let claimed =
                insert_instances(&mut conn, instances, &admissions, actor, &[], claim).await?;
            return Ok(created(instances, &admissions, claimed));
        }
        let mut tx = self.pool.begin().await?;
        let mut campaigns = lock_limited_campaigns(&mut tx, &campaign_ids).await?;
        let batch: Vec<i64> = instances.iter().map(|i| i.campaign.0).collect();
        let admissions = admit_new(&mut tx, &mut campaigns, &batch).await?;
        let claimed =
            insert_instances(&mut tx, instances, &admissions, actor, &campaigns, claim).await?;
        tx.commit().await?;
        Ok(created(instances, &admissions, claimed))
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

    /// A page of the instances matching `filter`, newest first: at most `filter.limit`, and
    /// with `filter.vars_budget`, no more than fit it. Reads `vars` only with a budget, and
    /// then in batches of [`BUDGET_BATCH`] rows, so a page of large vars is never read whole.
    pub async fn list_instances(&self, filter: &InstanceFilter) -> Result<InstancePage> {
        let limit = filter.limit.max(1);
        let Some(budget) = filter.vars_budget else {
            let mut rows = self
                .summary_rows(filter, filter.before, limit + 1, false)
                .await?;
            let more = rows.len() as i64 > limit;
            rows.truncate(limit as usize);
            return Ok(InstancePage {
                instances: rows
                    .into_iter()
                    .map(InstanceSummary::try_from)
                    .collect::<Result<_>>()?,
                more,
            });
        };
        let mut page = InstancePage::default();
        let mut bytes = 0;
        let mut before = filter.before;
        loop {
            let want = (limit + 1 - page.instances.len() as i64).min(BUDGET_BATCH);
            let rows = self.summary_rows(filter, before, want, true).await?;
            let fetched = rows.len() as i64;
            for row in rows {
                let size = row.vars.as_ref().map_or(0, json_len);
                let full = page.instances.len() as i64 == limit
                    || (!page.instances.is_empty() && bytes + size > budget);
                if full {
                    page.more = true;
                    return Ok(page);
                }
                bytes += size;
                before = Some(InstanceId(row.id));
                page.instances.push(row.try_into()?);
            }
            if fetched < want {
                return Ok(page);
            }
        }
    }

    async fn summary_rows(
        &self,
        filter: &InstanceFilter,
        before: Option<InstanceId>,
        limit: i64,
        vars: bool,
    ) -> Result<Vec<SummaryRow>> {
        let vars = if vars {
            "i.vars"
        } else {
            "NULL::jsonb AS vars"
        };
        Ok(sqlx::query_as(&format!(
            "SELECT {SUMMARY_COLUMNS}, {vars} \
             FROM instance i JOIN campaign c ON c.id = i.campaign_id \
             WHERE ($1::text IS NULL OR i.state = $1) \
               AND ($2::text IS NULL OR c.name = $2) \
               AND ($3::text IS NULL OR i.workflow = $3) \
               AND ($4::uuid IS NULL OR i.id < $4) \
               AND ($7::uuid IS NULL OR i.parent_instance_id = $7) \
             ORDER BY i.id DESC LIMIT $5"
        ))
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.campaign.as_deref())
        .bind(filter.workflow.as_deref())
        .bind(before.map(|id| id.0))
        .bind(limit)
        .bind(SUMMARY_ERROR_CHARS)
        .bind(filter.parent.map(|id| id.0))
        .fetch_all(&self.pool)
        .await?)
    }

    /// The state of each of `ids` that exists (in no particular order; unknown ids are left
    /// out). One index lookup per id: callers bound `ids`.
    pub async fn instance_states(
        &self,
        ids: &[InstanceId],
    ) -> Result<Vec<(InstanceId, InstanceState)>> {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT id, state FROM instance WHERE id = ANY ($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(id, state)| Ok((InstanceId(id), parse_state(&state)?)))
            .collect()
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
        let rows = self.journal_rows(id, None, None).await?;
        if rows.is_empty() && !self.instance_exists(id).await? {
            return Ok(None);
        }
        Ok(Some(rows.into_iter().map(JournalEntry::from).collect()))
    }

    /// A page of the instance's journal in checkpoint order: the entries after `after`, at
    /// most `limit`, and no more than fit `budget` bytes of `output` and `error` (the first
    /// entry is given whatever its size). Reads in batches of [`BUDGET_BATCH`] entries.
    /// `None` for an unknown instance.
    pub async fn journal_page(
        &self,
        id: InstanceId,
        after: Option<StepSeq>,
        limit: i64,
        budget: usize,
    ) -> Result<Option<JournalPage>> {
        let limit = limit.max(1);
        let mut page = JournalPage::default();
        let mut bytes = 0;
        let mut after = after;
        loop {
            let want = (limit + 1 - page.entries.len() as i64).min(BUDGET_BATCH);
            let rows = self.journal_rows(id, after, Some(want)).await?;
            let fetched = rows.len() as i64;
            for row in rows {
                let size = row.output.as_ref().map_or(0, json_len)
                    + row.error.as_ref().map_or(0, String::len);
                let full = page.entries.len() as i64 == limit
                    || (!page.entries.is_empty() && bytes + size > budget);
                if full {
                    page.more = true;
                    return Ok(Some(page));
                }
                bytes += size;
                after = Some(StepSeq(row.step_seq));
                page.entries.push(row.into());
            }
            if fetched < want {
                break;
            }
        }
        if page.entries.is_empty() && !self.instance_exists(id).await? {
            return Ok(None);
        }
        Ok(Some(page))
    }

    async fn journal_rows(
        &self,
        id: InstanceId,
        after: Option<StepSeq>,
        limit: Option<i64>,
    ) -> Result<Vec<JournalRow>> {
        Ok(sqlx::query_as(
            "SELECT step_seq, step_id, outcome, transition, fence, attempt, node_id, actor,
                    started_at, finished_at, output, error
             FROM journal WHERE instance_id = $1 AND ($2::bigint IS NULL OR step_seq > $2)
             ORDER BY step_seq LIMIT $3",
        )
        .bind(id.0)
        .bind(after.map(|seq| seq.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn instance_exists(&self, id: InstanceId) -> Result<bool> {
        let (exists,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM instance WHERE id = $1)")
                .bind(id.0)
                .fetch_one(&self.pool)
                .await?;
        Ok(exists)
    }

    /// The instances of `jobs` whose job each still is: READY at that checkpoint and fence.
    pub async fn current_jobs(&self, jobs: &[StepJob]) -> Result<Vec<InstanceId>> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.instance.0).collect();
        let seqs: Vec<i64> = jobs.iter().map(|j| j.step_seq.0).collect();
        let fences: Vec<i64> = jobs.iter().map(|j| j.fence.0).collect();
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT i.id FROM instance i
             JOIN unnest($1::uuid[], $2::bigint[], $3::bigint[]) AS j(id, step_seq, fence)
               ON i.id = j.id AND i.step_seq = j.step_seq AND i.fence = j.fence
             WHERE i.state = 'ready'",
        )
        .bind(&ids)
        .bind(&seqs)
        .bind(&fences)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id,)| InstanceId(id)).collect())
    }

    /// READY instances whose `ready_at` is older than `older_than_ms`: their job may have
    /// been lost. Returns their jobs for re-dispatch.
    ///
    /// Left out: instances no alive worker can run (none serves the step's queue, or none that
    /// does has its handler). Their job is not lost but waiting, handed between the workers
    /// that cannot run it (or kept by a queue no worker pulls from); publishing it again would
    /// only pile up copies. Once a capable worker registers they are stale again.
    pub async fn stale_ready(&self, older_than_ms: i64, limit: i64) -> Result<Vec<StepJob>> {
        let rows: Vec<(Uuid, i64, i64, String, Option<String>)> = sqlx::query_as(
            "SELECT id, step_seq, fence, step_queue, step_handler FROM instance i
             WHERE state = 'ready'
               AND ready_at < clock_timestamp() - $1 * interval '1 millisecond'
               AND EXISTS (SELECT 1 FROM node n
                           WHERE n.status = 'alive' AND 'worker' = ANY (n.roles)
                             AND i.step_queue = ANY (n.queues)
                             AND (i.step_handler IS NULL OR i.step_handler = ANY (n.handlers)))
             ORDER BY ready_at LIMIT $2",
        )
        .bind(older_than_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(job_row).collect()
    }
}

/// The jobs and queue of a created batch.
pub(crate) fn created(
    instances: &[NewInstance],
    admissions: &[Admission],
    claimed: Vec<Claimed>,
) -> Created {
    let mut created = Created::default();
    for (instance, admission) in instances.iter().zip(admissions) {
        match admission {
            Admission::Free | Admission::Permit if !claimed.iter().any(|c| c.id == instance.id) => {
                created.ready.push(StepJob {
                    instance: instance.id,
                    step_seq: StepSeq(0),
                    fence: Fence(0),
                    route: instance.route.clone(),
                })
            }
            Admission::Free | Admission::Permit => {}
            Admission::Queued(_) => created.queued.push(instance.id),
        }
    }
    created.claimed = claimed;
    created
}

/// Inserts a batch of new instances as `admissions` decided, their journal entries 0, their
/// `started` (and `queued`) events and the counters of the (locked) limited `campaigns`, in
/// one statement; with `claim`, the first `claim.max` READY ones are claimed by `claim.node`
/// (see [`Store::create_instances_claiming`]) and returned.
pub(crate) async fn insert_instances(
    conn: &mut sqlx::PgConnection,
    instances: &[NewInstance],
    admissions: &[Admission],
    actor: &str,
    campaigns: &[LockedCampaign],
    claim: Option<LocalClaim>,
) -> Result<Vec<Claimed>> {
    let mut claims_left = claim.map_or(0, |c| c.max);
    let rows = Value::Array(
        instances
            .iter()
            .zip(admissions)
            .map(|(i, admission)| {
                let (state, permit, place) = match admission {
                    Admission::Free => ("ready", false, None),
                    Admission::Permit => ("ready", true, None),
                    Admission::Queued(place) => ("queued", false, Some(*place)),
                };
                let claim = state == "ready" && claims_left > 0;
                if claim {
                    claims_left -= 1;
                }
                json!({
                    "id": i.id,
                    "campaign_id": i.campaign,
                    "workflow": i.workflow,
                    "version": i.version,
                    "entry_step": i.entry_step,
                    "allow_retry": i.allow_retry,
                    "timeout_ms": i.timeout_ms,
                    "queue": i.route.queue,
                    "handler": i.route.handler,
                    "vars": i.vars,
                    "state": state,
                    "holds_permit": permit,
                    "queue_seq": place,
                    "announce_end": i.announce_end,
                    "claim": claim,
                })
            })
            .collect(),
    );
    let ids: Vec<i64> = campaigns.iter().map(|c| c.id).collect();
    let running: Vec<i32> = campaigns.iter().map(|c| c.running).collect();
    let queued: Vec<i32> = campaigns.iter().map(|c| c.queued).collect();
    let rows: Vec<(sqlx::types::Json<ClaimRow>,)> = sqlx::query_as(concat!(
        "WITH n AS (
            SELECT * FROM jsonb_to_recordset($1::jsonb) AS n(
                id uuid, campaign_id bigint, workflow text, version int,
                entry_step text, allow_retry bool, timeout_ms bigint, queue text,
                handler text, vars jsonb, state text, holds_permit bool, queue_seq bigint,
                announce_end bool, claim bool)
         ), t AS (
            SELECT clock_timestamp() AS now, node.queues, node.handlers
            FROM (SELECT 1) AS one
                 LEFT JOIN node ON node.id = $6 AND node.status = 'alive'
         ), m AS (
            -- Claimed at once: READY, asked for, and the node may claim it (as a claim).
            SELECT n.*, t.now,
                   (n.claim AND n.queue = ANY (t.queues)
                    AND (n.handler IS NULL OR n.handler = ANY (t.handlers)))
                   IS TRUE AS claimed
            FROM n, t
         ), ins AS (
            INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                                  step_retryable, step_timeout_ms, step_queue, step_handler,
                                  ready_at, vars, initial_vars, holds_permit, queue_seq,
                                  queued_at, event_seq, announce_end, owner_node, claimed_at,
                                  fence, step_claims, run_deadline)
            SELECT id, campaign_id, workflow, version,
                   CASE WHEN claimed THEN 'running' ELSE state END, entry_step, allow_retry,
                   timeout_ms, queue, handler,
                   CASE WHEN state = 'ready' AND NOT claimed THEN now END, vars, vars,
                   holds_permit, queue_seq,
                   CASE WHEN state = 'queued' THEN now END,
                   CASE WHEN state = 'queued' THEN 2 ELSE 1 END, announce_end,
                   CASE WHEN claimed THEN $6::uuid END, CASE WHEN claimed THEN now END,
                   CASE WHEN claimed THEN 1 ELSE 0 END, CASE WHEN claimed THEN 1 ELSE 0 END,
                   CASE WHEN claimed
                        THEN now + (timeout_ms + 30000) * interval '1 millisecond' END
            FROM m
            RETURNING *
         ), j AS (
            -- Entry 0 and the `started` event say READY for a claimed one too: the claim
            -- itself, as any claim, is neither journaled nor an event.
            INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                 attempt, actor, started_at, finished_at)
            SELECT id, 0, current_step, 'started',
                   CASE WHEN state = 'running' THEN 'ready' ELSE state END, 0, 1, $2,
                   created_at, created_at
            FROM ins
         ), cnt AS (
            UPDATE campaign c SET running = d.running, queued = d.queued
            FROM unnest($3::bigint[], $4::int[], $5::int[]) AS d(id, running, queued)
            WHERE c.id = d.id
         ), ev AS (
            INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind,
                                    data)
            SELECT gen_random_uuid(), ins.id, c.name, ins.workflow, ins.version, e.seq,
                   e.kind, e.data
            FROM ins JOIN campaign c ON c.id = ins.campaign_id,
                 LATERAL (VALUES
                     (1, 'started', jsonb_build_object(
                         'state', CASE WHEN ins.state = 'running' THEN 'ready' ELSE ins.state END,
                         'step', ins.current_step, 'actor', $2::text)),
                     (2, 'queued', jsonb_build_object('state', 'queued',
                                                      'step', ins.current_step,
                                                      'queue_seq', ins.queue_seq))
                 ) AS e(seq, kind, data)
            WHERE e.seq = 1 OR ins.state = 'queued'
            ORDER BY ins.id, e.seq
         )
         SELECT ",
        claim_row_json!(),
        " FROM ins AS i WHERE i.state = 'running'"
    ))
    .bind(rows)
    .bind(actor)
    .bind(&ids)
    .bind(&running)
    .bind(&queued)
    .bind(claim.map(|c| c.node.0))
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|(row,)| row.0.into_claimed())
        .collect()
}

/// The channel an instance's end is announced on (migration 0010).
const INSTANCE_END_CHANNEL: &str = "drover_instance_end";

/// Announcements of ends of instances created with [`NewInstance::announce_end`].
pub struct EndListener(sqlx::postgres::PgListener);

impl std::fmt::Debug for EndListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndListener")
    }
}

impl Store {
    /// Listens for instance ends: each instance created with `announce_end` is announced by
    /// the transaction that makes it `completed`, `failed`, `stopped` or `in_error`.
    pub async fn listen_instance_ends(&self) -> Result<EndListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(INSTANCE_END_CHANNEL).await?;
        Ok(EndListener(listener))
    }
}

impl EndListener {
    /// The next instance that ended; `None` when the connection was lost (announcements may
    /// have been missed meanwhile: look again at what you wait for). The next call connects
    /// again.
    pub async fn next(&mut self) -> Result<Option<InstanceId>> {
        match self.0.try_recv().await? {
            Some(notification) => {
                let id = notification.payload().parse::<Uuid>().map_err(|e| {
                    Error::Corrupt(format!(
                        "instance end announced as {:?}: {e}",
                        notification.payload()
                    ))
                })?;
                Ok(Some(InstanceId(id)))
            }
            None => Ok(None),
        }
    }
}
