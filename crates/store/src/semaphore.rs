//! The campaign semaphore: admission, release and the reconciler (ARCHITECTURE.md,
//! "Semaphore").
//!
//! A campaign with a limit (`max_running`) hands out permits. A permit belongs to an instance
//! (`holds_permit`), never to a node, so node loss cannot leak or double-count one. Admit and
//! release lock the campaign row; the campaign's `running`/`queued` counters change only under
//! that lock and always in the transaction that changes the rows they count.
//!
//! The lock is `FOR NO KEY UPDATE` (what ARCHITECTURE.md calls `FOR UPDATE`): it excludes
//! every other admitter and releaser just the same, but not the `FOR KEY SHARE` lock an
//! `instance` insert's foreign-key check takes on its campaign row, so starting instances
//! (children included) never waits behind an admission.
//!
//! Lock order (deadlock freedom): instance rows first, then campaign rows in id order. The one
//! exception, admission locking QUEUED rows after the campaign's, skips rows another
//! transaction holds (`SKIP LOCKED`) instead of waiting for them.
//!
//! Unlimited campaigns (`max_running IS NULL`, e.g. `default`) take no permits, queue nothing
//! and their rows are never locked: the common case has no hot row.
//!
//! A paused campaign (`campaign.paused_at`, see `deletes`) admits nothing: a new instance
//! queues even with a permit free, and a released permit is not passed on. So I3 reads
//! `queued > 0 ⇒ running ≥ max_running ∨ paused`; the others hold unchanged. Unpausing admits
//! the head of the queue at once, in FIFO order, like a raised limit.
//!
//! # Events
//! Every function that admits or releases writes the `queued`, `admitted` and
//! `permit_released` facts in the same transaction.
//!
//! # In other modules' transactions
//! A transaction that moves permits itself (the operator lifecycle, resume, recovery) uses:
//! [`release_permits`] after taking instances out of their permit or the queue (it admits the
//! next ones); [`lock_limited_campaigns`] then [`admit_one`] (or [`admit_new`]) and
//! [`save_counters`] to give an instance a permit or a queue place. All run in the caller's transaction, after its instance locks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use drover_core::event::EventKind;
use drover_core::ids::is_slug;
use drover_core::{CampaignId, Fence, InstanceId, NodeId, Route, StepSeq};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::claim::claim_row_json;
use crate::facts::{NewFact, fact_instances, facts_json, insert_campaign_fact, insert_facts};
use crate::lease::COORDINATOR_LEASE;
use crate::lease::LeaderTerm;
use crate::model::{Campaign, StepJob};
use crate::{Error, Result, Store};

/// The smallest and largest limit a campaign may have (the `campaign.max_running` CHECK).
pub const LIMIT_RANGE: std::ops::RangeInclusive<i32> = 1..=100_000;

/// The journal actor of an admission made because a permit was freed (a finished or failed
/// instance, a stop, a raised limit): the semaphore itself, not the one who freed it.
pub const SEMAPHORE_ACTOR: &str = "semaphore";

/// A QUEUED instance given a permit (now READY): publish [`Admitted::job`] after the commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub id: InstanceId,
    pub campaign: CampaignId,
    pub workflow: String,
    pub version: i32,
    pub current_step: String,
    /// The checkpoint after the admission (journal row `admitted`).
    pub step_seq: StepSeq,
    pub fence: Fence,
    /// Its place in the queue it left.
    pub queue_seq: i64,
    /// Where its job goes.
    pub route: Route,
}

impl Admitted {
    /// The job to publish for it, once the admitting transaction has committed.
    pub fn job(&self) -> StepJob {
        StepJob {
            instance: self.id,
            step_seq: self.step_seq,
            fence: self.fence,
            route: self.route.clone(),
        }
    }
}

/// What a campaign does with the permit of an instance that goes `in_error`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorPermit {
    /// Give it back (the next queued instance starts); the instance re-queues when resumed.
    /// If unsure, pick this: an instance waiting for a person should not block the campaign.
    #[default]
    Release,
    /// Keep it: the instance resumes at once, and the campaign runs one fewer meanwhile.
    Hold,
}

impl OnErrorPermit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Hold => "hold",
        }
    }
}

impl fmt::Display for OnErrorPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OnErrorPermit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "release" => Ok(Self::Release),
            "hold" => Ok(Self::Hold),
            other => Err(format!(
                "unknown on_error_permit {other:?} (expected release or hold)"
            )),
        }
    }
}

/// A campaign to create.
#[derive(Clone, Debug)]
pub struct NewCampaign {
    /// A slug (it appears in event subjects).
    pub name: String,
    /// How many instances may hold a permit at once ([`LIMIT_RANGE`]); `None`: no limit (no
    /// permits, no queue — and the limit can never be set later).
    pub max_running: Option<i32>,
    pub on_error_permit: OnErrorPermit,
    /// Who creates it, for the audit trail.
    pub actor: String,
}

/// A campaign with what `drover campaign show` adds: how long its queue has waited.
#[derive(Clone, Debug, Serialize)]
pub struct CampaignStatus {
    #[serde(flatten)]
    pub campaign: Campaign,
    /// When the head of its queue (the oldest QUEUED instance) was queued.
    pub oldest_queued_at: Option<DateTime<Utc>>,
    /// How long ago that was, by the database clock, in milliseconds.
    pub oldest_queued_age_ms: Option<i64>,
}

/// What [`Store::set_campaign_limit`] did.
#[derive(Clone, Debug)]
pub struct LimitSet {
    /// The campaign after the change.
    pub campaign: Campaign,
    /// The limit before.
    pub previous: i32,
    /// QUEUED instances a raised limit admitted: publish their [`Admitted::job`]s.
    pub admitted: Vec<Admitted>,
}

/// An invariant the reconciler found broken (ARCHITECTURE.md, "Semaphore", I1–I5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub campaign: String,
    pub kind: DriftKind,
    /// What was found, in words.
    pub detail: String,
    /// Whether the reconciler repaired it (counters are; row-level breaks are only reported).
    pub repaired: bool,
}

/// Which invariant broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// I1: `campaign.running` differs from the number of permit holders.
    RunningCount,
    /// I2: `campaign.queued` differs from the number of QUEUED instances.
    QueuedCount,
    /// I3: instances were queued while a permit was free (and the campaign not paused: a
    /// paused campaign's queue waits by design).
    StalledQueue,
    /// I4: a permit holder was admitted from the queue ahead of an instance queued before it.
    OutOfOrder,
    /// I5: a finished instance holds a permit (or a child does: children hold none).
    FinishedHolder,
    /// A READY, RUNNING or WAITING top-level instance of a limited campaign has no permit
    /// (overshoot risk). PAUSED ones are not counted: one paused out of the queue has none.
    Unpermitted,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunningCount => "running_count",
            Self::QueuedCount => "queued_count",
            Self::StalledQueue => "stalled_queue",
            Self::OutOfOrder => "out_of_order",
            Self::FinishedHolder => "finished_holder",
            Self::Unpermitted => "unpermitted",
        }
    }
}

/// The columns of [`CampaignRow`](crate::instances) plus queue age, for [`CampaignStatus`].
/// An unlimited campaign holds no permits, so its `running` counter stays 0: its live
/// instances (ready, running, waiting) are counted instead, through the per-state partial
/// indexes.
const STATUS_COLUMNS: &str = "c.id, c.name, c.max_running, \
    CASE WHEN c.max_running IS NULL THEN (SELECT count(*) FROM instance i \
        WHERE i.campaign_id = c.id AND i.state IN ('ready', 'running', 'waiting'))::int \
    ELSE c.running END AS running, c.queued, \
    c.on_error_permit, c.created_at, c.paused_at, c.paused_by, \
    h.queued_at AS oldest_queued_at, \
    (extract(epoch FROM clock_timestamp() - h.queued_at) * 1000)::bigint AS oldest_queued_age_ms";

/// The head of each campaign's queue (uses the `instance_queued` index).
const QUEUE_HEAD: &str = "LEFT JOIN LATERAL (
        SELECT q.queued_at FROM instance q
        WHERE q.campaign_id = c.id AND q.state = 'queued'
        ORDER BY q.queue_seq LIMIT 1) h ON true";

#[derive(sqlx::FromRow)]
struct StatusRow {
    id: i64,
    name: String,
    max_running: Option<i32>,
    running: i32,
    queued: i32,
    on_error_permit: String,
    created_at: DateTime<Utc>,
    paused_at: Option<DateTime<Utc>>,
    paused_by: Option<String>,
    oldest_queued_at: Option<DateTime<Utc>>,
    oldest_queued_age_ms: Option<i64>,
}

impl From<StatusRow> for CampaignStatus {
    fn from(r: StatusRow) -> Self {
        CampaignStatus {
            campaign: Campaign {
                id: CampaignId(r.id),
                name: r.name,
                max_running: r.max_running,
                running: r.running,
                queued: r.queued,
                on_error_permit: r.on_error_permit,
                created_at: r.created_at,
                paused_at: r.paused_at,
                paused_by: r.paused_by,
            },
            oldest_queued_at: r.oldest_queued_at,
            oldest_queued_age_ms: r.oldest_queued_age_ms,
        }
    }
}

/// A campaign row read under its lock.
#[derive(Clone, Debug, sqlx::FromRow)]
pub(crate) struct LockedCampaign {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) max_running: Option<i32>,
    pub(crate) running: i32,
    pub(crate) queued: i32,
    /// Paused by an operator (`campaign pause`): it admits nothing, neither new instances nor
    /// queued ones, until unpaused.
    pub(crate) paused: bool,
}

impl LockedCampaign {
    /// Permits free for the queue: none while over (or at) the limit, none while paused.
    fn free(&self) -> i64 {
        match self.max_running {
            Some(max) if self.queued > 0 && !self.paused => i64::from(max - self.running).max(0),
            _ => 0,
        }
    }
}

/// Locks the limited campaigns among `ids` (`FOR NO KEY UPDATE`, in id order) and returns them;
/// unlimited ones are neither locked nor returned.
pub(crate) async fn lock_limited_campaigns(
    tx: &mut sqlx::PgConnection,
    ids: &[i64],
) -> Result<Vec<LockedCampaign>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(
        "SELECT id, name, max_running, running, queued, paused_at IS NOT NULL AS paused
                 FROM campaign
         WHERE id = ANY($1) AND max_running IS NOT NULL
         ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?)
}

/// Admits up to `campaign.free()` of the campaign's oldest QUEUED instances, in `tx`, under
/// the campaign lock the caller holds: each becomes READY with its permit (`step_seq + 1`,
/// journal row `admitted` by `actor`); their `admitted` facts are appended to `facts`
/// and `campaign`'s counters updated in memory. The caller writes the counters (see
/// [`write_counters`]).
///
/// A queued row another transaction has locked (an operator pausing or stopping it) is
/// skipped rather than waited for: that transaction locked the instance before asking for
/// the campaign, so waiting could deadlock. It keeps its place and goes next time.
pub(crate) async fn admit(
    tx: &mut sqlx::PgConnection,
    campaign: &mut LockedCampaign,
    actor: &str,
    by: &str,
    facts: &mut Vec<NewFact>,
) -> Result<Vec<Admitted>> {
    let free = campaign.free();
    if free == 0 {
        return Ok(Vec::new());
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Uuid,
        workflow: String,
        version: i32,
        current_step: String,
        step_seq: i64,
        fence: i64,
        queue_seq: i64,
        step_queue: String,
        step_handler: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "WITH q AS (
            SELECT id FROM instance
            WHERE campaign_id = $1 AND state = 'queued'
            ORDER BY queue_seq LIMIT $2
            FOR NO KEY UPDATE SKIP LOCKED
         ), upd AS (
            UPDATE instance i SET
                state = 'ready', holds_permit = true, step_seq = i.step_seq + 1,
                ready_at = clock_timestamp(), updated_at = clock_timestamp()
            FROM q WHERE i.id = q.id AND i.state || '' = 'queued'
            RETURNING i.id, i.workflow, i.version, i.current_step, i.step_seq, i.fence,
                      i.step_attempt, i.queue_seq, i.step_queue, i.step_handler
         ), j AS (
            INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                                 attempt, actor, started_at, finished_at, output)
            SELECT id, step_seq, current_step, 'admitted', 'ready', fence, step_attempt, $3,
                   clock_timestamp(), clock_timestamp(),
                   jsonb_build_object('queue_seq', queue_seq, 'by', $4::text)
            FROM upd
         )
         SELECT id, workflow, version, current_step, step_seq, fence, queue_seq, step_queue,
                step_handler
         FROM upd ORDER BY queue_seq",
    )
    .bind(campaign.id)
    .bind(free)
    .bind(actor)
    .bind(by)
    .fetch_all(&mut *tx)
    .await?;
    let n = i32::try_from(rows.len()).unwrap_or(i32::MAX);
    campaign.running += n;
    campaign.queued = (campaign.queued - n).max(0);
    let mut admitted = Vec::with_capacity(rows.len());
    for r in rows {
        facts.push(NewFact::new(
            InstanceId(r.id),
            EventKind::Admitted,
            json!({
                "state": "ready",
                "step": r.current_step,
                "step_seq": r.step_seq,
                "queue_seq": r.queue_seq,
                "actor": by,
            }),
        ));
        admitted.push(Admitted {
            id: InstanceId(r.id),
            campaign: CampaignId(campaign.id),
            workflow: r.workflow,
            version: r.version,
            current_step: r.current_step,
            step_seq: StepSeq(r.step_seq),
            fence: Fence(r.fence),
            queue_seq: r.queue_seq,
            route: crate::model::parse_route(r.step_queue, r.step_handler)?,
        });
    }
    Ok(admitted)
}

/// Writes the in-memory counters of locked campaigns back, and `facts`.
pub(crate) async fn write_counters(
    tx: &mut sqlx::PgConnection,
    campaigns: &[LockedCampaign],
    facts: &[NewFact],
) -> Result<()> {
    let ids: Vec<i64> = campaigns.iter().map(|c| c.id).collect();
    let running: Vec<i32> = campaigns.iter().map(|c| c.running.max(0)).collect();
    let queued: Vec<i32> = campaigns.iter().map(|c| c.queued.max(0)).collect();
    sqlx::query(
        "UPDATE campaign c SET running = d.running, queued = d.queued
         FROM unnest($1::bigint[], $2::int[], $3::int[]) AS d(id, running, queued)
         WHERE c.id = d.id",
    )
    .bind(&ids)
    .bind(&running)
    .bind(&queued)
    .execute(&mut *tx)
    .await?;
    insert_facts(tx, facts).await
}

/// Releases the permits of `released` and the queue places of `dequeued`, and passes the freed
/// permits on, all in the caller's transaction `tx`.
///
/// Contract: the caller has already, in `tx`,
/// - moved each instance of `released` out of its permit: set `holds_permit = false` in the
///   same UPDATE that made it `stopped`, `completed`, … (the `permit_only_while_live` CHECK
///   requires it), having seen it hold one (lock it `FOR UPDATE` first and read
///   `holds_permit`);
/// - moved each instance of `dequeued` out of QUEUED (e.g. to `stopped`), having seen it
///   QUEUED under its row lock.
///
/// List each instance once. Instances of unlimited campaigns may be listed: they are skipped.
///
/// Under the lock of their campaign rows (locked in id order, after the caller's instance
/// locks), this decrements `running` / `queued`, writes a `permit_released` event per released
/// instance, and then admits the oldest QUEUED instances (by `queue_seq`) while
/// `running < max_running`: each becomes READY with `holds_permit` (`step_seq + 1`, journal row
/// `admitted` with actor `actor`, an `admitted` event whose `actor` is `actor`). Returns those;
/// publish their [`Admitted::job`]s after `tx` commits.
pub(crate) async fn release_permits(
    tx: &mut sqlx::PgConnection,
    released: &[InstanceId],
    dequeued: &[InstanceId],
    actor: &str,
) -> Result<Vec<Admitted>> {
    if released.is_empty() && dequeued.is_empty() {
        return Ok(Vec::new());
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        id: Uuid,
        campaign_id: i64,
        limited: bool,
        state: String,
        holds_permit: bool,
        released: bool,
    }
    let released_ids: Vec<Uuid> = released.iter().map(|i| i.0).collect();
    let dequeued_ids: Vec<Uuid> = dequeued.iter().map(|i| i.0).collect();
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT i.id, i.campaign_id, c.max_running IS NOT NULL AS limited, i.state,
                i.holds_permit,
                i.id = ANY($1) AS released
         FROM instance i JOIN campaign c ON c.id = i.campaign_id
         WHERE i.id = ANY($1) OR i.id = ANY($2)",
    )
    .bind(&released_ids)
    .bind(&dequeued_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut leaving = Vec::with_capacity(rows.len());
    for r in rows.into_iter().filter(|r| r.limited) {
        if r.holds_permit || r.state == "queued" {
            return Err(Error::Corrupt(format!(
                "release_permits: instance {} is still {}{}: the caller must move it first",
                r.id,
                r.state,
                if r.holds_permit { " with a permit" } else { "" }
            )));
        }
        leaving.push(Leaving {
            id: InstanceId(r.id),
            campaign: r.campaign_id,
            state: r.state,
            released: r.released,
        });
    }
    Ok(hand_off(tx, &leaving, Vec::new(), actor, None)
        .await?
        .admitted)
}

/// An instance of a limited campaign that left its permit (`released`) or its queue place,
/// as [`release_permits`] requires, in state `state`.
pub(crate) struct Leaving {
    pub(crate) id: InstanceId,
    pub(crate) campaign: i64,
    pub(crate) state: String,
    pub(crate) released: bool,
}

/// Instances admitted by [`hand_off`] may be claimed at once for `node` (RUNNING, fence + 1,
/// exactly as [`Store::claim`](crate::Store::claim) would, and only while `node` is alive and
/// serves their step's queue and handler): at most `max` of them, oldest first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClaimFor {
    pub(crate) node: NodeId,
    pub(crate) max: usize,
}

/// What [`hand_off`] admitted.
#[derive(Default)]
pub(crate) struct HandedOff {
    /// Admitted and READY: publish their [`Admitted::job`]s after the commit.
    pub(crate) admitted: Vec<Admitted>,
    /// Admitted and claimed for [`ClaimFor::node`]: it runs them; nobody is sent their job.
    pub(crate) claimed: Vec<crate::model::Claimed>,
}

/// [`release_permits`] for instances the caller has already checked (all of limited
/// campaigns, each moved out of its permit or QUEUED under its row lock). `facts` (about
/// instances `tx` has locked, none of them QUEUED) are written too, then the `permit_released`
/// ones.
///
/// The campaign locks are held as briefly as the rule allows: one statement locks the
/// campaigns (id order), updates their counters, admits the heads of their queues and writes
/// the `admitted` journal rows and events; the caller commits next. That statement reads the
/// queue with the snapshot it started with, so an instance queued by a transaction that
/// committed while it waited for a lock is not seen; such instances come after every visible
/// one (queue places are taken under the lock), so FIFO holds, and if permits are still free
/// afterwards they are admitted by a second statement, as [`admit`] does (I3).
pub(crate) async fn hand_off(
    tx: &mut sqlx::PgConnection,
    leaving: &[Leaving],
    mut facts: Vec<NewFact>,
    actor: &str,
    claim: Option<ClaimFor>,
) -> Result<HandedOff> {
    let mut counts: BTreeMap<i64, (i32, i32)> = BTreeMap::new();
    for l in leaving {
        let entry = counts.entry(l.campaign).or_default();
        if l.released {
            entry.0 += 1;
            facts.push(NewFact::new(
                l.id,
                EventKind::PermitReleased,
                json!({ "state": l.state, "actor": actor }),
            ));
        } else {
            entry.1 += 1;
        }
    }
    if counts.is_empty() {
        insert_facts(tx, &facts).await?;
        return Ok(HandedOff::default());
    }
    let ids: Vec<i64> = counts.keys().copied().collect();
    let permits: Vec<i32> = counts.values().map(|c| c.0).collect();
    let places: Vec<i32> = counts.values().map(|c| c.1).collect();
    #[derive(sqlx::FromRow)]
    struct Row {
        campaign_id: i64,
        campaign: String,
        max_running: Option<i32>,
        running: i32,
        queued: i32,
        paused: bool,
        id: Option<Uuid>,
        workflow: Option<String>,
        version: Option<i32>,
        current_step: Option<String>,
        step_seq: Option<i64>,
        fence: Option<i64>,
        queue_seq: Option<i64>,
        step_queue: Option<String>,
        step_handler: Option<String>,
        claimed: Option<sqlx::types::Json<crate::claim::ClaimRow>>,
    }
    // Planned once per connection: a custom plan of this statement costs more to make (over
    // a millisecond) than to run, and the planner keeps choosing one, for each call.
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<Row> = sqlx::query_as(HAND_OFF)
        .bind(&ids)
        .bind(&permits)
        .bind(&places)
        .bind(SEMAPHORE_ACTOR)
        .bind(actor)
        .bind(claim.map(|c| c.node.0))
        .bind(claim.map_or(0, |c| i64::try_from(c.max).unwrap_or(i64::MAX)))
        .bind(facts_json(&facts))
        .bind(fact_instances(&facts))
        .fetch_all(&mut *tx)
        .await?;
    let mut out = HandedOff::default();
    let mut campaigns: Vec<LockedCampaign> = Vec::new();
    for r in rows {
        if campaigns.last().is_none_or(|c| c.id != r.campaign_id) {
            campaigns.push(LockedCampaign {
                id: r.campaign_id,
                name: r.campaign.clone(),
                max_running: r.max_running,
                running: r.running,
                queued: r.queued,
                paused: r.paused,
            });
        }
        let (
            Some(id),
            Some(workflow),
            Some(version),
            Some(current_step),
            Some(step_seq),
            Some(fence),
            Some(queue_seq),
            Some(step_queue),
        ) = (
            r.id,
            r.workflow,
            r.version,
            r.current_step,
            r.step_seq,
            r.fence,
            r.queue_seq,
            r.step_queue,
        )
        else {
            continue;
        };
        if let Some(campaign) = campaigns.last_mut() {
            campaign.running += 1;
            campaign.queued = (campaign.queued - 1).max(0);
        }
        match r.claimed {
            Some(claimed) => out.claimed.push(claimed.0.into_claimed()?),
            None => out.admitted.push(Admitted {
                id: InstanceId(id),
                campaign: CampaignId(r.campaign_id),
                workflow,
                version,
                current_step,
                step_seq: StepSeq(step_seq),
                fence: Fence(fence),
                queue_seq,
                route: crate::model::parse_route(step_queue, r.step_handler)?,
            }),
        }
    }
    // Permits still free while instances queue: some were queued after the statement's
    // snapshot (see above). This statement sees them.
    let mut late = Vec::new();
    let mut stalled = Vec::new();
    for campaign in &mut campaigns {
        if campaign.free() > 0 {
            out.admitted
                .extend(admit(tx, campaign, SEMAPHORE_ACTOR, actor, &mut late).await?);
            stalled.push(campaign.clone());
        }
    }
    if !stalled.is_empty() {
        write_counters(tx, &stalled, &late).await?;
    }
    Ok(out)
}

/// The one statement of [`hand_off`] under the campaign locks: `$1` the campaigns, `$2` the
/// permits and `$3` the queue places leaving each, `$4` the journal actor, `$5` who freed the
/// permits, `$6` the node that may claim the admitted instances (or NULL), `$7` how many, `$8`
/// other facts to write first (as [`insert_facts`] does; their instances are not QUEUED, so
/// none of them is admitted here), `$9` those facts' instances.
/// Answers one row per campaign and admitted instance (or one with NULLs if none was), the
/// campaign's counters as they were before this statement's admissions.
/// Rows are found by primary key: `$9` for the facts' instances, and `state || ''` in the
/// admission's update so that the generic plan does not read every queued instance through
/// the `instance_queued` partial index while it holds the campaign locks.
const HAND_OFF: &str = concat!(
    "WITH f AS (
        SELECT * FROM jsonb_to_recordset($8::jsonb)
            AS f(ord int, id uuid, instance_id uuid, kind text, data jsonb)
     ), fu AS (
        UPDATE instance i SET event_seq = i.event_seq + n.c
        FROM (SELECT instance_id, count(*) AS c FROM f GROUP BY instance_id) n
        WHERE i.id = n.instance_id AND i.id = ANY($9)
        RETURNING i.id, i.event_seq - n.c AS base, i.workflow, i.version, i.campaign_id
     ), fi AS (
        INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
        SELECT f.id, f.instance_id, c.name, fu.workflow, fu.version,
               fu.base + row_number() OVER (PARTITION BY f.instance_id ORDER BY f.ord),
               f.kind, f.data
        FROM f JOIN fu ON fu.id = f.instance_id JOIN campaign c ON c.id = fu.campaign_id
        ORDER BY f.ord
     ), d AS (
        SELECT * FROM unnest($1::bigint[], $2::int[], $3::int[]) AS d(id, permits, places)
     ), cl AS MATERIALIZED (
        SELECT c.id, c.name, c.max_running,
               greatest(c.running - d.permits, 0) AS running,
               greatest(c.queued - d.places, 0) AS queued,
               c.paused_at IS NOT NULL AS paused
        FROM campaign c JOIN d ON d.id = c.id
        WHERE c.max_running IS NOT NULL
        ORDER BY c.id
        FOR NO KEY UPDATE OF c
     ), q AS MATERIALIZED (
        SELECT h.id, h.queue_seq,
               coalesce(n.alive, false) AND h.step_queue = ANY (n.queues)
                   AND (h.step_handler IS NULL OR h.step_handler = ANY (n.handlers))
                   AS claimable
        FROM cl
        CROSS JOIN LATERAL (
            SELECT i.id, i.queue_seq, i.step_queue, i.step_handler FROM instance i
            WHERE i.campaign_id = cl.id AND i.state = 'queued'
            ORDER BY i.queue_seq
            LIMIT CASE WHEN cl.queued > 0 AND NOT cl.paused
                       THEN greatest(cl.max_running - cl.running, 0) ELSE 0 END
            FOR NO KEY UPDATE SKIP LOCKED
        ) h
        LEFT JOIN (SELECT status = 'alive' AS alive, queues, handlers FROM node WHERE id = $6) n
            ON true
     ), k AS (
        SELECT id, claimable
                   AND row_number() OVER (PARTITION BY claimable ORDER BY queue_seq) <= $7
                   AS claim
        FROM q
     ), upd AS (
        UPDATE instance i SET
            state = CASE WHEN k.claim THEN 'running' ELSE 'ready' END,
            holds_permit = true, step_seq = i.step_seq + 1, event_seq = i.event_seq + 1,
            ready_at = CASE WHEN k.claim THEN NULL ELSE clock_timestamp() END,
            owner_node = CASE WHEN k.claim THEN $6 ELSE i.owner_node END,
            claimed_at = CASE WHEN k.claim THEN clock_timestamp() ELSE i.claimed_at END,
            fence = i.fence + CASE WHEN k.claim THEN 1 ELSE 0 END,
            step_claims = i.step_claims + CASE WHEN k.claim THEN 1 ELSE 0 END,
            signal_pending = i.signal_pending AND NOT k.claim,
            run_deadline = CASE WHEN k.claim
                                THEN clock_timestamp()
                                     + (i.step_timeout_ms + 30000) * interval '1 millisecond'
                                ELSE i.run_deadline END,
            updated_at = clock_timestamp()
        FROM k WHERE i.id = k.id AND i.state || '' = 'queued'
        RETURNING i.id, i.campaign_id, i.workflow, i.version, i.current_step, i.step_seq,
                  i.fence - CASE WHEN k.claim THEN 1 ELSE 0 END AS fence, i.step_attempt,
                  i.queue_seq, i.step_queue, i.step_handler, i.event_seq,
                  CASE WHEN k.claim THEN ",
    claim_row_json!(),
    " END AS claimed
     ), j AS (
        INSERT INTO journal (instance_id, step_seq, step_id, outcome, transition, fence,
                             attempt, actor, started_at, finished_at, output)
        SELECT id, step_seq, current_step, 'admitted', 'ready', fence, step_attempt, $4,
               clock_timestamp(), clock_timestamp(),
               jsonb_build_object('queue_seq', queue_seq, 'by', $5::text)
        FROM upd
     ), ev AS (
        INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
        SELECT gen_random_uuid(), upd.id, cl.name, upd.workflow, upd.version, upd.event_seq,
               'admitted',
               jsonb_build_object('state', 'ready', 'step', upd.current_step,
                                  'step_seq', upd.step_seq, 'queue_seq', upd.queue_seq,
                                  'actor', $5::text)
        FROM upd JOIN cl ON cl.id = upd.campaign_id
        ORDER BY upd.queue_seq
     ), cnt AS (
        UPDATE campaign c SET running = cl.running + coalesce(a.n, 0),
                              queued = greatest(cl.queued - coalesce(a.n, 0), 0)
        FROM cl LEFT JOIN (SELECT campaign_id, count(*)::int AS n FROM upd GROUP BY campaign_id) a
             ON a.campaign_id = cl.id
        WHERE c.id = cl.id
     )
     SELECT cl.id AS campaign_id, cl.name AS campaign, cl.max_running, cl.running, cl.queued,
            cl.paused, upd.id, upd.workflow, upd.version, upd.current_step, upd.step_seq,
            upd.fence, upd.queue_seq, upd.step_queue, upd.step_handler, upd.claimed
     FROM cl LEFT JOIN upd ON upd.campaign_id = cl.id
     ORDER BY cl.id, upd.queue_seq"
);

/// How the creation of a batch of instances is admitted: per instance, in input order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// An unlimited campaign: READY, no permit.
    Free,
    /// READY with a permit.
    Permit,
    /// QUEUED at this place.
    Queued(i64),
}

/// Decides, under the locks of `campaigns` (the limited ones among the batch's), how each new
/// instance of `batch` (their campaign ids, in order) is admitted, and updates the counters in
/// memory. Queue places are taken from `instance_queue_seq` under the lock, so queue order is
/// lock order. The caller writes the counters with the rows.
pub(crate) async fn admit_new(
    tx: &mut sqlx::PgConnection,
    campaigns: &mut [LockedCampaign],
    batch: &[i64],
) -> Result<Vec<Admission>> {
    let mut admissions = Vec::with_capacity(batch.len());
    let mut queued = 0usize;
    for campaign_id in batch {
        let Some(campaign) = campaigns.iter_mut().find(|c| c.id == *campaign_id) else {
            admissions.push(Admission::Free);
            continue;
        };
        let max = campaign.max_running.unwrap_or(i32::MAX);
        if campaign.queued == 0 && campaign.running < max && !campaign.paused {
            campaign.running += 1;
            admissions.push(Admission::Permit);
        } else {
            campaign.queued += 1;
            queued += 1;
            admissions.push(Admission::Queued(0));
        }
    }
    if queued > 0 {
        let mut seqs: Vec<(i64,)> =
            sqlx::query_as("SELECT nextval('instance_queue_seq') FROM generate_series(1, $1)")
                .bind(i64::try_from(queued).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await?;
        // One session's nextval calls increase: sorted, they are this batch's places in order.
        seqs.sort_unstable();
        let mut seqs = seqs.into_iter().map(|(s,)| s);
        for admission in &mut admissions {
            if let Admission::Queued(place) = admission {
                *place = seqs.next().ok_or_else(|| {
                    Error::Corrupt("instance_queue_seq returned too few values".to_owned())
                })?;
            }
        }
    }
    Ok(admissions)
}

/// Takes a queue place for one instance re-entering a limited campaign (a resume), under the
/// campaign lock the caller holds: `Permit` if one is free and nobody queues, else `Queued`.
pub(crate) async fn admit_one(
    tx: &mut sqlx::PgConnection,
    campaign: &mut LockedCampaign,
) -> Result<Admission> {
    let id = campaign.id;
    let mut admissions = admit_new(tx, std::slice::from_mut(campaign), &[id]).await?;
    admissions
        .pop()
        .ok_or_else(|| Error::Corrupt("admission decided nothing".to_owned()))
}

/// Writes locked campaigns' counters (after [`admit_new`] / [`admit_one`]), in `tx`.
pub(crate) async fn save_counters(
    tx: &mut sqlx::PgConnection,
    campaigns: &[LockedCampaign],
) -> Result<()> {
    if campaigns.is_empty() {
        return Ok(());
    }
    write_counters(tx, campaigns, &[]).await
}

impl Store {
    /// Creates a campaign (audited as `campaign.create`). The name of a deleted campaign may
    /// be used again: that revives the deleted row with the new settings.
    ///
    /// Errors: [`Error::InvalidCampaignName`], [`Error::InvalidLimit`],
    /// [`Error::CampaignExists`].
    pub async fn create_campaign(&self, new: &NewCampaign) -> Result<Campaign> {
        if !is_slug(&new.name) {
            return Err(Error::InvalidCampaignName(new.name.clone()));
        }
        if let Some(max) = new.max_running
            && !LIMIT_RANGE.contains(&max)
        {
            return Err(Error::InvalidLimit(i64::from(max)));
        }
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            created_at: DateTime<Utc>,
        }
        let row: Option<Row> = sqlx::query_as(
            "WITH c AS (
                INSERT INTO campaign (name, max_running, on_error_permit)
                VALUES ($1, $2, $3)
                -- A deleted campaign's name revives it (same row: its finished instances
                -- and event sequence stay with it); a live one's is taken.
                ON CONFLICT (name) DO UPDATE SET
                    max_running = EXCLUDED.max_running,
                    on_error_permit = EXCLUDED.on_error_permit,
                    created_at = clock_timestamp(),
                    deleted_at = NULL, deleted_by = NULL, paused_at = NULL, paused_by = NULL
                WHERE campaign.deleted_at IS NOT NULL
                RETURNING id, created_at
             ), a AS (
                INSERT INTO audit (actor, action, target, details)
                SELECT $4, 'campaign.create', $1,
                       jsonb_build_object('max_running', $2::int, 'on_error_permit', $3::text)
                FROM c
             )
             SELECT id, created_at FROM c",
        )
        .bind(&new.name)
        .bind(new.max_running)
        .bind(new.on_error_permit.as_str())
        .bind(&new.actor)
        .fetch_optional(&self.pool)
        .await?;
        let row = row.ok_or_else(|| Error::CampaignExists(new.name.clone()))?;
        Ok(Campaign {
            id: CampaignId(row.id),
            name: new.name.clone(),
            max_running: new.max_running,
            running: 0,
            queued: 0,
            on_error_permit: new.on_error_permit.as_str().to_owned(),
            created_at: row.created_at,
            paused_at: None,
            paused_by: None,
        })
    }

    /// Sets a limited campaign's limit, in one transaction under the campaign lock (audited as
    /// `campaign.set_limit`). Raising it admits queued instances at once (returned: publish
    /// their jobs); lowering it admits nothing until fewer than the new limit hold permits
    /// (nobody is preempted).
    ///
    /// Errors: [`Error::UnknownCampaign`], [`Error::InvalidLimit`], and
    /// [`Error::UnlimitedCampaign`] for a campaign created without a limit (its running
    /// instances hold no permits, so a limit could not be enforced on them).
    pub async fn set_campaign_limit(
        &self,
        name: &str,
        max_running: i32,
        actor: &str,
    ) -> Result<LimitSet> {
        if !LIMIT_RANGE.contains(&max_running) {
            return Err(Error::InvalidLimit(i64::from(max_running)));
        }
        let mut tx = self.pool.begin().await?;
        let locked: Option<LockedCampaign> = sqlx::query_as(
            "SELECT id, name, max_running, running, queued, paused_at IS NOT NULL AS paused
                 FROM campaign
             WHERE name = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let mut campaign = locked.ok_or_else(|| Error::UnknownCampaign(name.to_owned()))?;
        let previous = campaign
            .max_running
            .ok_or_else(|| Error::UnlimitedCampaign(name.to_owned()))?;
        sqlx::query(
            "WITH a AS (
                INSERT INTO audit (actor, action, target, details)
                VALUES ($3, 'campaign.set_limit', $4,
                        jsonb_build_object('from', $5::int, 'to', $2::int))
             )
             UPDATE campaign SET max_running = $2 WHERE id = $1",
        )
        .bind(campaign.id)
        .bind(max_running)
        .bind(actor)
        .bind(name)
        .bind(previous)
        .execute(&mut *tx)
        .await?;
        campaign.max_running = Some(max_running);
        let mut out = Vec::new();
        let by = format!("limit:{actor}");
        let admitted = admit(&mut tx, &mut campaign, SEMAPHORE_ACTOR, &by, &mut out).await?;
        if !admitted.is_empty() {
            write_counters(&mut tx, std::slice::from_ref(&campaign), &out).await?;
        }
        tx.commit().await?;
        let campaign = self
            .campaign_by_name(name)
            .await?
            .ok_or_else(|| Error::UnknownCampaign(name.to_owned()))?;
        Ok(LimitSet {
            campaign,
            previous,
            admitted,
        })
    }

    /// A campaign with the age of its queue; `None` if unknown.
    pub async fn campaign_status(&self, name: &str) -> Result<Option<CampaignStatus>> {
        let row: Option<StatusRow> = sqlx::query_as(&format!(
            "SELECT {STATUS_COLUMNS} FROM campaign c {QUEUE_HEAD} WHERE c.name = $1 AND c.deleted_at IS NULL"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(CampaignStatus::from))
    }

    /// Every campaign with the age of its queue, by name.
    pub async fn campaign_statuses(&self) -> Result<Vec<CampaignStatus>> {
        let rows: Vec<StatusRow> = sqlx::query_as(&format!(
            "SELECT {STATUS_COLUMNS} FROM campaign c {QUEUE_HEAD} WHERE c.deleted_at IS NULL ORDER BY c.name"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(CampaignStatus::from).collect())
    }

    /// As leader under `term`: checks the semaphore invariants (I1–I5) of every limited
    /// campaign, each in its own short transaction under its campaign lock, and repairs what
    /// can be repaired: `running` and `queued` are recomputed from the rows, and queued
    /// instances are admitted if permits are free (their jobs are returned with the drift:
    /// publish them). Each finding gets a `permit_drift` campaign event, written in the same
    /// transaction, as admissions get their `admitted` events. Row-level breaks (a finished
    /// or child holder, an unpermitted live instance, an out-of-order admission) are reported,
    /// not repaired: they point at a bug, and a guess could make it worse.
    ///
    /// Does nothing once `holder` no longer holds the coordinator lease under `term` (checked
    /// in each transaction).
    ///
    /// A campaign over its limit is not drift: it happens when an operator lowers the limit.
    pub async fn reconcile_permits(&self, holder: NodeId, term: LeaderTerm) -> Result<Reconciled> {
        let ids: Vec<(i64,)> =
            sqlx::query_as("SELECT id FROM campaign WHERE max_running IS NOT NULL ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        let mut done = Reconciled::default();
        for (id,) in ids {
            let mut tx = self.pool.begin().await?;
            let locked: Option<LockedCampaign> = sqlx::query_as(
                "SELECT id, name, max_running, running, queued, paused_at IS NOT NULL AS paused
                 FROM campaign
                 WHERE id = $1 AND max_running IS NOT NULL
                   AND EXISTS (SELECT 1 FROM leader_lease
                               WHERE name = $4 AND holder = $2 AND term = $3
                                 AND expires_at > clock_timestamp())
                 FOR NO KEY UPDATE",
            )
            .bind(id)
            .bind(holder.0)
            .bind(term.0)
            .bind(COORDINATOR_LEASE)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(mut campaign) = locked else {
                // The lease is gone (or the campaign lost its limit, which cannot happen).
                return Ok(done);
            };
            let counted: Counted = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE holds_permit) AS holders,
                        count(*) FILTER (WHERE state = 'queued') AS queued,
                        count(*) FILTER (WHERE holds_permit
                                         AND (state IN ('completed', 'failed', 'stopped')
                                              OR parent_instance_id IS NOT NULL))
                            AS finished_holders,
                        count(*) FILTER (WHERE NOT holds_permit AND parent_instance_id IS NULL
                                         AND state IN ('ready', 'running', 'waiting'))
                            AS unpermitted,
                        min(queue_seq) FILTER (WHERE state = 'queued') AS head_seq,
                        max(queue_seq) FILTER (WHERE holds_permit) AS last_admitted_seq
                 FROM instance
                 WHERE campaign_id = $1
                   AND (holds_permit
                        OR state IN ('queued', 'ready', 'running', 'waiting', 'paused'))",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let mut found = Vec::new();
            let name = campaign.name.clone();
            let mut drift = |kind, detail: String, repaired| {
                found.push(Drift {
                    campaign: name.clone(),
                    kind,
                    detail,
                    repaired,
                })
            };
            let holders = i32::try_from(counted.holders).unwrap_or(i32::MAX);
            let queued = i32::try_from(counted.queued).unwrap_or(i32::MAX);
            let mut repair = false;
            if holders != campaign.running {
                drift(
                    DriftKind::RunningCount,
                    format!(
                        "running was {} but {holders} instances hold a permit",
                        campaign.running
                    ),
                    true,
                );
                campaign.running = holders;
                repair = true;
            }
            if queued != campaign.queued {
                drift(
                    DriftKind::QueuedCount,
                    format!(
                        "queued was {} but {queued} instances are queued",
                        campaign.queued
                    ),
                    true,
                );
                campaign.queued = queued;
                repair = true;
            }
            if counted.finished_holders > 0 {
                drift(
                    DriftKind::FinishedHolder,
                    format!(
                        "{} finished or child instances hold a permit",
                        counted.finished_holders
                    ),
                    false,
                );
            }
            if counted.unpermitted > 0 {
                drift(
                    DriftKind::Unpermitted,
                    format!(
                        "{} live top-level instances run without a permit",
                        counted.unpermitted
                    ),
                    false,
                );
            }
            if let (Some(head), Some(last)) = (counted.head_seq, counted.last_admitted_seq)
                && last > head
            {
                drift(
                    DriftKind::OutOfOrder,
                    format!(
                        "a holder admitted from queue place {last} while place {head} still \
                         queues"
                    ),
                    false,
                );
            }
            let free = campaign.free();
            let mut out = Vec::new();
            let mut admitted = Vec::new();
            if free > 0 {
                admitted = admit(
                    &mut tx,
                    &mut campaign,
                    SEMAPHORE_ACTOR,
                    "reconciler",
                    &mut out,
                )
                .await?;
                drift(
                    DriftKind::StalledQueue,
                    format!(
                        "{queued} queued while {free} permits were free; admitted {}",
                        admitted.len()
                    ),
                    true,
                );
                repair = true;
            }
            for drift in &found {
                insert_campaign_fact(
                    &mut tx,
                    &drift.campaign,
                    EventKind::PermitDrift,
                    json!({
                        "kind": drift.kind,
                        "detail": drift.detail,
                        "repaired": drift.repaired,
                        "leader_term": term.0,
                    }),
                )
                .await?;
            }
            if repair {
                write_counters(&mut tx, std::slice::from_ref(&campaign), &out).await?;
            } else {
                insert_facts(&mut tx, &out).await?;
            }
            tx.commit().await?;
            done.drift.extend(found);
            done.admitted.extend(admitted);
        }
        Ok(done)
    }
}

/// What [`Store::reconcile_permits`] found and did.
#[derive(Clone, Debug, Default)]
pub struct Reconciled {
    /// Every broken invariant found, repaired or not.
    pub drift: Vec<Drift>,
    /// Queued instances the repair admitted: publish their [`Admitted::job`]s.
    pub admitted: Vec<Admitted>,
}

#[derive(sqlx::FromRow)]
struct Counted {
    holders: i64,
    queued: i64,
    finished_holders: i64,
    unpermitted: i64,
    head_seq: Option<i64>,
    last_admitted_seq: Option<i64>,
}
