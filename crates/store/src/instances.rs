//! Definitions, campaigns, instances and the journal: creation, fenced claim, group commit.

use chrono::{DateTime, Utc};
use drover_core::event::EventKind;
use drover_core::{CampaignId, Fence, InstanceId, InstanceState, NodeId, Queue, Route, StepSeq};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::facts::{NewFact, completion_facts, facts_json, insert_facts};
use crate::model::*;
use crate::semaphore::{
    Admission, Admitted, LockedCampaign, admit_new, lock_limited_campaigns, release_permits,
};
use crate::{Error, Result, Store};

fn parse_state(state: &str) -> Result<InstanceState> {
    state
        .parse()
        .map_err(|_| Error::Corrupt(format!("unknown instance state {state:?}")))
}

/// A READY instance's job from its row: `(id, step_seq, fence, step_queue, step_handler)`.
pub(crate) type JobRow = (Uuid, i64, i64, String, Option<String>);

pub(crate) fn job_row((id, seq, fence, queue, handler): JobRow) -> Result<StepJob> {
    Ok(StepJob {
        instance: InstanceId(id),
        step_seq: StepSeq(seq),
        fence: Fence(fence),
        route: parse_route(queue, handler)?,
    })
}

/// The route of a step as its instance row keeps it (`step_queue`, `step_handler`).
pub(crate) fn parse_route(queue: String, handler: Option<String>) -> Result<Route> {
    let queue = Queue::try_from(queue).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(Route { queue, handler })
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

    /// The latest version of every workflow, by name: no source, no body, the description's
    /// first [`SUMMARY_DESCRIPTION_CHARS`] characters.
    pub async fn list_definitions(&self) -> Result<Vec<DefinitionSummary>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (name) name, version, left(body->>'description', $1) AS description,
                    coalesce(jsonb_array_length(body->'steps'), 0)::bigint AS steps, created_at
             FROM workflow_definition ORDER BY name, version DESC",
        )
        .bind(SUMMARY_DESCRIPTION_CHARS)
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
        if instances.is_empty() {
            return Ok(Created::default());
        }
        let mut campaign_ids: Vec<i64> = instances.iter().map(|i| i.campaign.0).collect();
        campaign_ids.sort_unstable();
        campaign_ids.dedup();
        // A limit is set at creation or never, so an unlimited campaign read here stays so.
        let limited: Vec<(i64,)> = sqlx::query_as(
            "SELECT id FROM campaign WHERE id = ANY($1) AND max_running IS NOT NULL",
        )
        .bind(&campaign_ids)
        .fetch_all(&self.pool)
        .await?;
        if limited.is_empty() {
            let admissions = vec![Admission::Free; instances.len()];
            let mut conn = self.pool.acquire().await?;
            insert_instances(&mut conn, instances, &admissions, actor, &[]).await?;
            return Ok(created(instances, &admissions));
        }
        let mut tx = self.pool.begin().await?;
        let mut campaigns = lock_limited_campaigns(&mut tx, &campaign_ids).await?;
        let batch: Vec<i64> = instances.iter().map(|i| i.campaign.0).collect();
        let admissions = admit_new(&mut tx, &mut campaigns, &batch).await?;
        insert_instances(&mut tx, instances, &admissions, actor, &campaigns).await?;
        tx.commit().await?;
        Ok(created(instances, &admissions))
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
             ORDER BY i.id DESC LIMIT $5"
        ))
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.campaign.as_deref())
        .bind(filter.workflow.as_deref())
        .bind(before.map(|id| id.0))
        .bind(limit)
        .bind(SUMMARY_ERROR_CHARS)
        .fetch_all(&self.pool)
        .await?)
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
                       i.step_queue, i.step_handler",
        )
        .bind(node.0)
        .bind(&ids)
        .bind(&seqs)
        .bind(&fences)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ClaimRow::into_claimed).collect()
    }

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
    /// instances are in [`GroupCommit::continued`]; nobody else is sent their job. A node
    /// that dies before committing such a step leaves it RUNNING under a dead owner, as any
    /// claim does, for recovery.
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
            });
        }
        let rows = completion_rows(completions);
        let mut results: Vec<CommitRow> = sqlx::query_as(COMMIT)
            .bind(Value::Array(rows.clone()))
            .bind(node.0)
            .bind(false)
            .bind(continuing)
            .fetch_all(&self.pool)
            .await?;
        if results.len() != completions.len() {
            return Err(Error::Corrupt(format!(
                "group commit answered {} results for {} completions",
                results.len(),
                completions.len()
            )));
        }
        // Left out of the fast path: they change a permit or honour an operator's request (or
        // are fenced: the second pass finds that again).
        let deferred: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.committed && !r.existed)
            .map(|(idx, _)| idx)
            .collect();
        let mut admitted = Vec::new();
        if !deferred.is_empty() {
            let (second, also) = self
                .commit_with_permits(node, completions, &rows, &deferred, continuing)
                .await?;
            for row in second {
                let slot = usize::try_from(row.idx)
                    .ok()
                    .and_then(|idx| results.get_mut(idx))
                    .ok_or_else(|| {
                        Error::Corrupt(format!("group commit answered index {}", row.idx))
                    })?;
                *slot = row;
            }
            admitted = also;
        }

        let mut ready = Vec::new();
        let mut continued = Vec::new();
        let mut commits = Vec::with_capacity(results.len());
        for (idx, (row, completion)) in results.into_iter().zip(completions).enumerate() {
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
        })
    }

    /// The second pass of [`Store::commit_waking`]: the completions at `deferred` (indexes into
    /// `completions` and their `rows`) committed in one transaction that may change permits:
    /// instance rows locked first (id order), the commit, its `stopped`/`paused` events, then
    /// the permits released and passed on. Returns the commit rows and the admitted instances.
    async fn commit_with_permits(
        &self,
        node: NodeId,
        completions: &[Completion],
        rows: &[Value],
        deferred: &[usize],
        continuing: bool,
    ) -> Result<(Vec<CommitRow>, Vec<Admitted>)> {
        let mut ids: Vec<Uuid> = deferred
            .iter()
            .filter_map(|&idx| completions.get(idx))
            .map(|c| c.instance.0)
            .collect();
        ids.sort_unstable();
        let rows: Vec<Value> = deferred
            .iter()
            .filter_map(|&idx| rows.get(idx).cloned())
            .collect();
        #[derive(sqlx::FromRow)]
        struct Locked {
            id: Uuid,
            holds_permit: bool,
        }
        let mut tx = self.pool.begin().await?;
        let locked: Vec<Locked> = sqlx::query_as(
            "SELECT id, holds_permit FROM instance
             WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let results: Vec<CommitRow> = sqlx::query_as(COMMIT)
            .bind(Value::Array(rows))
            .bind(node.0)
            .bind(true)
            .bind(continuing)
            .fetch_all(&mut *tx)
            .await?;
        let mut released = Vec::new();
        let mut facts = Vec::new();
        for row in results.iter().filter(|r| r.committed) {
            let Some(completion) = usize::try_from(row.idx)
                .ok()
                .and_then(|idx| completions.get(idx))
            else {
                return Err(Error::Corrupt(format!(
                    "group commit answered index {}",
                    row.idx
                )));
            };
            let Some(before) = locked.iter().find(|l| l.id == completion.instance.0) else {
                continue;
            };
            if before.holds_permit && row.holds_permit == Some(false) {
                released.push(completion.instance);
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
        insert_facts(&mut tx, &facts).await?;
        let admitted = release_permits(&mut tx, &released, &[], "commit").await?;
        tx.commit().await?;
        Ok((results, admitted))
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
fn created(instances: &[NewInstance], admissions: &[Admission]) -> Created {
    let mut created = Created::default();
    for (instance, admission) in instances.iter().zip(admissions) {
        match admission {
            Admission::Free | Admission::Permit => created.ready.push(StepJob {
                instance: instance.id,
                step_seq: StepSeq(0),
                fence: Fence(0),
                route: instance.route.clone(),
            }),
            Admission::Queued(_) => created.queued.push(instance.id),
        }
    }
    created
}

/// Inserts a batch of new instances as `admissions` decided, their journal entries 0, their
/// `started` (and `queued`) events and the counters of the (locked) limited `campaigns`, in
/// one statement.
async fn insert_instances(
    conn: &mut sqlx::PgConnection,
    instances: &[NewInstance],
    admissions: &[Admission],
    actor: &str,
    campaigns: &[LockedCampaign],
) -> Result<()> {
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
                })
            })
            .collect(),
    );
    let ids: Vec<i64> = campaigns.iter().map(|c| c.id).collect();
    let running: Vec<i32> = campaigns.iter().map(|c| c.running).collect();
    let queued: Vec<i32> = campaigns.iter().map(|c| c.queued).collect();
    sqlx::query(
        "WITH n AS (
            SELECT * FROM jsonb_to_recordset($1::jsonb) AS n(
                id uuid, campaign_id bigint, workflow text, version int,
                entry_step text, allow_retry bool, timeout_ms bigint, queue text,
                handler text, vars jsonb, state text, holds_permit bool, queue_seq bigint,
                announce_end bool)
         ), ins AS (
            INSERT INTO instance (id, campaign_id, workflow, version, state, current_step,
                                  step_retryable, step_timeout_ms, step_queue, step_handler,
                                  ready_at, vars, initial_vars, holds_permit, queue_seq,
                                  queued_at, event_seq, announce_end)
            SELECT id, campaign_id, workflow, version, state, entry_step, allow_retry,
                   timeout_ms, queue, handler,
                   CASE WHEN state = 'ready' THEN clock_timestamp() END, vars, vars,
                   holds_permit, queue_seq,
                   CASE WHEN state = 'queued' THEN clock_timestamp() END,
                   CASE WHEN state = 'queued' THEN 2 ELSE 1 END, announce_end
            FROM n
            RETURNING id, current_step, created_at, state, campaign_id, workflow, version,
                      queue_seq
         ), j AS (
            INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                 attempt, actor, started_at, finished_at)
            SELECT id, 0, current_step, 'started', state, 0, 1, $2, created_at, created_at
            FROM ins
         ), cnt AS (
            UPDATE campaign c SET running = d.running, queued = d.queued
            FROM unnest($3::bigint[], $4::int[], $5::int[]) AS d(id, running, queued)
            WHERE c.id = d.id
         )
         INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
         SELECT gen_random_uuid(), ins.id, c.name, ins.workflow, ins.version, e.seq, e.kind,
                e.data
         FROM ins JOIN campaign c ON c.id = ins.campaign_id,
              LATERAL (VALUES
                  (1, 'started', jsonb_build_object('state', ins.state,
                                                    'step', ins.current_step, 'actor', $2::text)),
                  (2, 'queued', jsonb_build_object('state', 'queued', 'step', ins.current_step,
                                                   'queue_seq', ins.queue_seq))
              ) AS e(seq, kind, data)
         WHERE e.seq = 1 OR ins.state = 'queued'
         ORDER BY ins.id, e.seq",
    )
    .bind(rows)
    .bind(actor)
    .bind(&ids)
    .bind(&running)
    .bind(&queued)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One completion as a row of the commit statement's `$1` (`idx` = its index in the batch).
fn completion_rows(completions: &[Completion]) -> Vec<Value> {
    completions
        .iter()
        .enumerate()
        .map(|(idx, c)| {
            let (next_state, next_step, retry, delay_ms) = match &c.transition {
                Transition::Next { step, .. } => ("ready", Some(step.as_str()), false, 0),
                Transition::Retry { delay_ms } => ("ready", None, true, *delay_ms),
                Transition::Stop { state } => (state.as_str(), None, false, 0),
                Transition::Wait { .. } => ("waiting", None, false, 0),
            };
            let (allow_retry, timeout_ms, route) = match &c.transition {
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
            let transition = next_step.unwrap_or(next_state);
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
            }
            row
        })
        .collect()
}

/// What the commit statement answers per completion.
/// A claimed instance as a claim (or a commit that continues it) returns it.
#[derive(sqlx::FromRow, serde::Deserialize)]
struct ClaimRow {
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
}

impl ClaimRow {
    fn into_claimed(self) -> Result<Claimed> {
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
        })
    }
}

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
            child_queue text, child_handler text, child_vars jsonb)
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
            step_seq = i.step_seq + 1,
            event_seq = i.event_seq + jsonb_array_length(c.events),
            current_step = coalesce(c.next_step, i.current_step),
            step_entered_seq = CASE WHEN c.next_step IS NOT NULL THEN i.step_seq + 1
                                    ELSE i.step_entered_seq END,
            step_attempt = CASE WHEN c.retry THEN i.step_attempt + 1
                                WHEN c.next_step IS NOT NULL THEN 1
                                ELSE i.step_attempt END,
            step_claims = CASE WHEN ",
    continues!(),
    " THEN 1 ELSE 0 END,
            step_retryable = coalesce(c.allow_retry, i.step_retryable),
            step_timeout_ms = coalesce(c.timeout_ms, i.step_timeout_ms),
            step_queue = coalesce(c.queue, i.step_queue),
            step_handler = CASE WHEN c.next_step IS NOT NULL THEN c.handler ELSE i.step_handler END,
            run_deadline = CASE WHEN ",
    continues!(),
    " THEN t.now + (coalesce(c.timeout_ms, i.step_timeout_ms) + 30000)
                                       * interval '1 millisecond' END,
            steps_run = i.steps_run + CASE WHEN c.retry OR c.wait THEN 0 ELSE 1 END,
            vars = coalesce(c.vars, i.vars),
            outputs = CASE WHEN c.output IS NULL THEN i.outputs
                           ELSE i.outputs || jsonb_build_object(c.step_id, c.output) END,
            error = c.error,
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
          AND i.state = 'running' AND i.owner_node = $2
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
                  CASE WHEN i.state = 'running' THEN jsonb_build_object(
                      'id', i.id, 'workflow', i.workflow, 'version', i.version,
                      'campaign', (SELECT name FROM campaign WHERE id = i.campaign_id),
                      'current_step', i.current_step, 'step_seq', i.step_seq,
                      'step_entered_seq', i.step_entered_seq, 'step_attempt', i.step_attempt,
                      'fence', i.fence, 'step_claims', i.step_claims, 'steps_run', i.steps_run,
                      'vars', i.vars, 'outputs', i.outputs, 'created_at', i.created_at,
                      'claimed_at', i.claimed_at, 'wait_deadline', i.wait_deadline,
                      'wait_child', i.wait_child, 'parent_instance_id', i.parent_instance_id,
                      'call_depth', i.call_depth, 'step_queue', i.step_queue,
                      'step_handler', i.step_handler) END AS continued
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
            upd.stop_requested_by, upd.paused_by,
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
