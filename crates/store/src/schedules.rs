//! Schedules: rows of `schedule`, and their fires in `schedule_fire`, unique on `(schedule,
//! fire time)`.
//!
//! # Exactly once
//! The leader fires a due schedule in one transaction: it locks the schedule row (`FOR UPDATE
//! SKIP LOCKED`, under a still-held lease checked in the statement), writes the fire row,
//! creates the instance with its `started` and `schedule_fired` events, and moves
//! `next_fire_at` on; the last write checks the lease term again and the transaction rolls
//! back if it was lost. Two coordinators, a leader change at the fire instant or a restart
//! find either the fire row or the moved `next_fire_at`: a fire time starts one instance or
//! none. Fire times missed while no leader ran are fired late when they are still inside the
//! schedule's catch-up window (counted from when they were due), else recorded `skipped`
//! (`missed`); none is left out of the sequence.
//!
//! # Overlap
//! A run is *live* until it is completed, failed or stopped. While a run of the schedule is
//! live a fire is `skipped` (`skip`), `buffered` (`buffer_one`: at most one waits, and the
//! leader starts it once no run is live), or started (`allow_all`; `cancel_other` and
//! `terminate_other` also return the live runs, which the caller stops or kills after the
//! commit).

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use drover_core::event::EventKind;
use drover_core::ids::is_slug;
use drover_core::schedule::{Cadence, Calendar, FireOutcome, OverlapPolicy, ScheduleError, jitter};
use drover_core::{Definition, InstanceId, NodeId, ScheduleId};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::audit::{ScheduleChange, schedule_changed};
use crate::facts::{NewFact, insert_campaign_fact, insert_facts};
use crate::instances::{created, insert_instances};
use crate::lease::COORDINATOR_LEASE;
use crate::lease::LeaderTerm;
use crate::model::{NewInstance, StepJob};
use crate::semaphore::{Admission, admit_new, lock_limited_campaigns};
use crate::{Error, Result, Store};

/// A fire is `on_time` when it starts within this long of when it was due; later, it is a
/// `catch_up`.
const ON_TIME: TimeDelta = TimeDelta::seconds(2);
/// The most fire times one backfill may ask for.
pub const MAX_BACKFILL: usize = 1_000;
/// The default catch-up window: longer than a leader change takes (lease TTL ~5 s).
pub const DEFAULT_CATCHUP_WINDOW: Duration = Duration::from_secs(60);

/// How often a schedule fires, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CadenceSpec {
    /// A cron expression (5 fields, or 6 with seconds) in an IANA time zone.
    Cron { expr: String, timezone: String },
    /// Every so long, counted from the Unix epoch.
    Every(Duration),
}

/// A schedule to create, or what a schedule becomes on update.
#[derive(Clone, Debug)]
pub struct NewSchedule {
    pub name: String,
    pub workflow: String,
    pub campaign: String,
    /// Overrides of the workflow's `vars` (an object).
    pub vars: Value,
    pub cadence: CadenceSpec,
    pub overlap: OverlapPolicy,
    pub catchup_window: Duration,
    pub jitter: Duration,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
}

/// A schedule as operators see it.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub id: ScheduleId,
    pub name: String,
    pub workflow: String,
    pub campaign: String,
    pub vars: Value,
    pub cadence: CadenceSpec,
    pub overlap: OverlapPolicy,
    pub catchup_window: Duration,
    pub jitter: Duration,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    pub paused: bool,
    pub note: Option<String>,
    /// The next nominal fire time; `None`: none left (past `end_at`).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// When it is due (the fire time plus its jitter).
    pub next_due_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The latest fire time recorded.
    pub last_fire: Option<ScheduleFire>,
}

impl Schedule {
    /// When it fires.
    pub fn calendar(&self) -> std::result::Result<Calendar, ScheduleError> {
        calendar(&self.cadence, self.start_at, self.end_at)
    }
}

/// What became of one fire time.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleFire {
    pub fire_at: DateTime<Utc>,
    pub outcome: FireOutcome,
    /// fired: `on_time`, `catch_up`, `buffered`, `trigger`, `backfill`; skipped: `missed`,
    /// `overlap`, `error`.
    pub reason: String,
    pub instance: Option<InstanceId>,
    pub recorded_at: DateTime<Utc>,
}

/// What one leader pass over the due schedules did.
#[derive(Clone, Debug, Default)]
pub struct SchedulerPass {
    /// Jobs of the READY instances started: publish them.
    pub ready: Vec<StepJob>,
    /// Instances started (READY or QUEUED).
    pub fired: usize,
    pub skipped: usize,
    pub buffered: usize,
    /// Live runs to stop gracefully (`cancel_other`).
    pub to_stop: Vec<InstanceId>,
    /// Live runs to kill (`terminate_other`).
    pub to_kill: Vec<InstanceId>,
}

/// A fire an operator asked for (`trigger`, `backfill`).
#[derive(Clone, Debug, PartialEq)]
pub struct ManualFire {
    pub fire_at: DateTime<Utc>,
    /// `None`: that fire time had been recorded already.
    pub instance: Option<InstanceId>,
}

/// What a manual fire (trigger, backfill) started.
#[derive(Clone, Debug, Default)]
pub struct ManualFires {
    pub fires: Vec<ManualFire>,
    /// Jobs of the READY instances started: publish them.
    pub ready: Vec<StepJob>,
}

fn calendar(
    cadence: &CadenceSpec,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
) -> std::result::Result<Calendar, ScheduleError> {
    let cadence = match cadence {
        CadenceSpec::Cron { expr, timezone } => Cadence::cron(expr, timezone)?,
        CadenceSpec::Every(every) => Cadence::every(*every)?,
    };
    Calendar::new(cadence, start_at, end_at)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn duration_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The next fire time after `after` and when it is due.
fn next_fire(
    calendar: &Calendar,
    id: ScheduleId,
    jitter_max: Duration,
    after: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    match calendar.next_after(after) {
        Some(at) => {
            let delay = jitter(id.0, at, jitter_max);
            let due = at + TimeDelta::from_std(delay).unwrap_or(TimeDelta::zero());
            (Some(at), Some(due))
        }
        None => (None, None),
    }
}

const SCHEDULE_COLUMNS: &str = "s.id, s.name, s.workflow, c.name AS campaign, s.vars, s.cron, \
    s.timezone, s.every_ms, s.overlap, s.catchup_window_ms, s.jitter_ms, s.start_at, s.end_at, \
    s.paused, s.note, s.next_fire_at, s.next_due_at, s.created_at, s.updated_at, \
    lf.fire_at AS last_fire_at, lf.outcome AS last_outcome, lf.reason AS last_reason, \
    lf.instance_id AS last_instance, lf.recorded_at AS last_recorded_at";

const SCHEDULE_FROM: &str = "schedule s JOIN campaign c ON c.id = s.campaign_id \
    LEFT JOIN LATERAL (SELECT * FROM schedule_fire f WHERE f.schedule_id = s.id \
                       ORDER BY f.fire_at DESC LIMIT 1) lf ON true";

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    id: Uuid,
    name: String,
    workflow: String,
    campaign: String,
    vars: Value,
    cron: Option<String>,
    timezone: String,
    every_ms: Option<i64>,
    overlap: String,
    catchup_window_ms: i64,
    jitter_ms: i64,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    paused: bool,
    note: Option<String>,
    next_fire_at: Option<DateTime<Utc>>,
    next_due_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_fire_at: Option<DateTime<Utc>>,
    last_outcome: Option<String>,
    last_reason: Option<String>,
    last_instance: Option<Uuid>,
    last_recorded_at: Option<DateTime<Utc>>,
}

fn parse_outcome(outcome: &str) -> Result<FireOutcome> {
    outcome.parse().map_err(Error::Corrupt)
}

impl TryFrom<ScheduleRow> for Schedule {
    type Error = Error;
    fn try_from(r: ScheduleRow) -> Result<Self> {
        let cadence = match (r.cron, r.every_ms) {
            (Some(expr), _) => CadenceSpec::Cron {
                expr,
                timezone: r.timezone,
            },
            (None, Some(ms)) => CadenceSpec::Every(duration_ms(ms)),
            (None, None) => {
                return Err(Error::Corrupt(format!(
                    "schedule {:?} has neither cron nor every",
                    r.name
                )));
            }
        };
        let last_fire = match (
            r.last_fire_at,
            r.last_outcome,
            r.last_reason,
            r.last_recorded_at,
        ) {
            (Some(fire_at), Some(outcome), Some(reason), Some(recorded_at)) => Some(ScheduleFire {
                fire_at,
                outcome: parse_outcome(&outcome)?,
                reason,
                instance: r.last_instance.map(InstanceId),
                recorded_at,
            }),
            _ => None,
        };
        Ok(Schedule {
            id: ScheduleId(r.id),
            overlap: r
                .overlap
                .parse()
                .map_err(|e: ScheduleError| Error::Corrupt(e.to_string()))?,
            name: r.name,
            workflow: r.workflow,
            campaign: r.campaign,
            vars: r.vars,
            cadence,
            catchup_window: duration_ms(r.catchup_window_ms),
            jitter: duration_ms(r.jitter_ms),
            start_at: r.start_at,
            end_at: r.end_at,
            paused: r.paused,
            note: r.note,
            next_fire_at: r.next_fire_at,
            next_due_at: r.next_due_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            last_fire,
        })
    }
}

/// A schedule row locked for firing.
#[derive(sqlx::FromRow)]
struct DueRow {
    id: Uuid,
    name: String,
    workflow: String,
    campaign_id: i64,
    campaign: String,
    vars: Value,
    cron: Option<String>,
    timezone: String,
    every_ms: Option<i64>,
    overlap: String,
    catchup_window_ms: i64,
    jitter_ms: i64,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
    next_fire_at: Option<DateTime<Utc>>,
    next_due_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
}

impl DueRow {
    fn cadence(&self) -> Option<CadenceSpec> {
        match (&self.cron, self.every_ms) {
            (Some(expr), _) => Some(CadenceSpec::Cron {
                expr: expr.clone(),
                timezone: self.timezone.clone(),
            }),
            (None, Some(ms)) => Some(CadenceSpec::Every(duration_ms(ms))),
            (None, None) => None,
        }
    }
}

const DUE_COLUMNS: &str = "s.id, s.name, s.workflow, s.campaign_id, c.name AS campaign, s.vars, \
    s.cron, s.timezone, s.every_ms, s.overlap, s.catchup_window_ms, s.jitter_ms, s.start_at, \
    s.end_at, s.next_fire_at, s.next_due_at, clock_timestamp() AS now";

const LEASE_HELD: &str = "EXISTS (SELECT 1 FROM leader_lease WHERE name = $1 AND holder = $2 \
    AND term = $3 AND expires_at > clock_timestamp())";

/// Why a fire fired or was skipped.
struct FireRecord<'a> {
    fire_at: DateTime<Utc>,
    reason: &'a str,
    term: Option<LeaderTerm>,
}

/// Starts one instance of `row`'s workflow for the fire `record` and writes the fire row,
/// in `tx`. `None`: the fire time was recorded already (nothing started).
async fn start_fire(
    tx: &mut sqlx::PgConnection,
    row: &DueRow,
    record: &FireRecord<'_>,
    pass: &mut Vec<StepJob>,
) -> Result<Option<InstanceId>> {
    let id = InstanceId::new();
    let inserted = sqlx::query(
        "INSERT INTO schedule_fire (schedule_id, fire_at, outcome, reason, instance_id, leader_term)
         VALUES ($1, $2, 'fired', $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(row.id)
    .bind(record.fire_at)
    .bind(record.reason)
    .bind(id.0)
    .bind(record.term.map(|t| t.0))
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(None);
    }
    let ready = create_instance(tx, row, id).await?;
    fired_fact(tx, row, id, record, !ready.is_empty()).await?;
    pass.extend(ready);
    Ok(Some(id))
}

/// Creates instance `id` of `row`'s workflow (latest version) in `tx`, admitted like any start.
async fn create_instance(
    tx: &mut sqlx::PgConnection,
    row: &DueRow,
    id: InstanceId,
) -> Result<Vec<StepJob>> {
    let stored: Option<(i32, Value)> = sqlx::query_as(
        "SELECT version, body FROM workflow_definition WHERE name = $1 AND deleted_at IS NULL \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(&row.workflow)
    .fetch_optional(&mut *tx)
    .await?;
    let (version, body) = stored.ok_or_else(|| Error::UnknownWorkflow(row.workflow.clone()))?;
    let definition = Definition::from_json(&body).map_err(|errors| {
        Error::Corrupt(format!(
            "stored definition {} v{version} no longer validates: {errors}",
            row.workflow
        ))
    })?;
    let mut vars = definition.vars.clone();
    if let Value::Object(overrides) = &row.vars {
        vars.extend(overrides.clone());
    }
    let entry = definition.entry();
    let instance = NewInstance {
        id,
        campaign: drover_core::CampaignId(row.campaign_id),
        workflow: row.workflow.clone(),
        version,
        entry_step: entry.id.as_str().to_owned(),
        allow_retry: entry.allow_retry,
        timeout_ms: entry.timeout_ms(),
        route: definition.route(entry),
        vars: Value::Object(vars),
        announce_end: false,
    };
    let instances = [instance];
    let actor = format!("schedule:{}", row.name);
    let limited: Option<(i64,)> =
        sqlx::query_as("SELECT id FROM campaign WHERE id = $1 AND max_running IS NOT NULL")
            .bind(row.campaign_id)
            .fetch_optional(&mut *tx)
            .await?;
    let admissions = if limited.is_none() {
        let admissions = vec![Admission::Free];
        insert_instances(tx, &instances, &admissions, &actor, &[], None).await?;
        admissions
    } else {
        let mut campaigns = lock_limited_campaigns(tx, &[row.campaign_id]).await?;
        let admissions = admit_new(tx, &mut campaigns, &[row.campaign_id]).await?;
        insert_instances(tx, &instances, &admissions, &actor, &campaigns, None).await?;
        admissions
    };
    Ok(created(&instances, &admissions, Vec::new()).ready)
}

async fn fired_fact(
    tx: &mut sqlx::PgConnection,
    row: &DueRow,
    id: InstanceId,
    record: &FireRecord<'_>,
    ready: bool,
) -> Result<()> {
    insert_facts(
        tx,
        &[NewFact::new(
            id,
            EventKind::ScheduleFired,
            json!({
                "state": if ready { "ready" } else { "queued" },
                "actor": format!("schedule:{}", row.name),
                "schedule": row.name,
                "fire_at": record.fire_at,
                "reason": record.reason,
                "leader_term": record.term.map(|t| t.0),
            }),
        )],
    )
    .await
}

/// Records fire `record` of `row` as `outcome` (skipped or buffered), with its event for a
/// skip. `false`: the fire time was recorded already.
async fn record_without_instance(
    tx: &mut sqlx::PgConnection,
    row: &DueRow,
    record: &FireRecord<'_>,
    outcome: FireOutcome,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO schedule_fire (schedule_id, fire_at, outcome, reason, leader_term)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(row.id)
    .bind(record.fire_at)
    .bind(outcome.as_str())
    .bind(record.reason)
    .bind(record.term.map(|t| t.0))
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    if outcome == FireOutcome::Skipped {
        insert_campaign_fact(
            tx,
            &row.campaign,
            EventKind::ScheduleSkipped,
            json!({
                "schedule": row.name,
                "workflow": row.workflow,
                "fire_at": record.fire_at,
                "reason": record.reason,
                "leader_term": record.term.map(|t| t.0),
            }),
        )
        .await?;
    }
    Ok(true)
}

/// The live (not completed, failed or stopped) runs of schedule `id`.
async fn live_runs(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<Vec<InstanceId>> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT i.id FROM schedule_fire f JOIN instance i ON i.id = f.instance_id
         WHERE f.schedule_id = $1 AND f.outcome = 'fired'
           AND i.state NOT IN ('completed', 'failed', 'stopped')
         ORDER BY i.id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|(id,)| InstanceId(id)).collect())
}

impl Store {
    /// The database's clock.
    async fn db_now(&self) -> Result<DateTime<Utc>> {
        let (now,): (DateTime<Utc>,) = sqlx::query_as("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await?;
        Ok(now)
    }

    /// Creates a schedule; its first fire is the first fire time after now. Audited as
    /// `schedule.create` by `actor`, announced by `schedule_changed`.
    ///
    /// Errors: [`Error::InvalidScheduleName`], [`Error::InvalidSchedule`],
    /// [`Error::UnknownWorkflow`], [`Error::UnknownCampaign`], [`Error::ScheduleExists`].
    pub async fn create_schedule(&self, new: &NewSchedule, actor: &str) -> Result<Schedule> {
        if !is_slug(&new.name) {
            return Err(Error::InvalidScheduleName(new.name.clone()));
        }
        let id = ScheduleId::new();
        self.write_schedule(Some(id), new, actor).await?;
        self.get_schedule(&new.name)
            .await?
            .ok_or_else(|| Error::UnknownSchedule(new.name.clone()))
    }

    /// Replaces what schedule `new.name` does (its pause stays); its next fire is recomputed
    /// from now. `None`: no such schedule. Audited as `schedule.update`.
    pub async fn update_schedule(
        &self,
        new: &NewSchedule,
        actor: &str,
    ) -> Result<Option<Schedule>> {
        if !self.write_schedule(None, new, actor).await? {
            return Ok(None);
        }
        self.get_schedule(&new.name).await
    }

    /// Inserts (`id` given) or updates schedule `new.name`; `false`: nothing to update.
    async fn write_schedule(
        &self,
        id: Option<ScheduleId>,
        new: &NewSchedule,
        actor: &str,
    ) -> Result<bool> {
        let cal = calendar(&new.cadence, new.start_at, new.end_at)
            .map_err(|e| Error::InvalidSchedule(e.to_string()))?;
        if !new.vars.is_object() {
            return Err(Error::InvalidSchedule("vars must be a JSON object".into()));
        }
        let known: Option<(i32,)> = sqlx::query_as(
            "SELECT version FROM workflow_definition WHERE name = $1 AND deleted_at IS NULL \
                 LIMIT 1",
        )
        .bind(&new.workflow)
        .fetch_optional(&self.pool)
        .await?;
        if known.is_none() {
            return Err(Error::UnknownWorkflow(new.workflow.clone()));
        }
        let campaign = self
            .campaign_by_name(&new.campaign)
            .await?
            .ok_or_else(|| Error::UnknownCampaign(new.campaign.clone()))?;
        let existing: Option<(Uuid,)> = match id {
            Some(id) => Some((id.0,)),
            None => {
                sqlx::query_as("SELECT id FROM schedule WHERE name = $1")
                    .bind(&new.name)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        let Some((sid,)) = existing else {
            return Ok(false);
        };
        let now = self.db_now().await?;
        let (next_fire, next_due) = next_fire(&cal, ScheduleId(sid), new.jitter, now);
        let (cron, timezone, every_ms) = match &new.cadence {
            CadenceSpec::Cron { expr, timezone } => (Some(expr.clone()), timezone.clone(), None),
            CadenceSpec::Every(every) => (None, "UTC".to_owned(), Some(millis(*every))),
        };
        let details = json!({
            "cron": cron, "timezone": timezone, "every_ms": every_ms,
            "overlap": new.overlap.as_str(), "vars": new.vars,
            "catchup_window_ms": millis(new.catchup_window), "jitter_ms": millis(new.jitter),
            "start_at": new.start_at, "end_at": new.end_at,
        });
        let sql = if id.is_some() {
            "INSERT INTO schedule (id, name, workflow, campaign_id, vars, cron, timezone, every_ms,
                                   overlap, catchup_window_ms, jitter_ms, start_at, end_at,
                                   next_fire_at, next_due_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (name) DO NOTHING"
        } else {
            "UPDATE schedule SET workflow = $3, campaign_id = $4, vars = $5, cron = $6,
                    timezone = $7, every_ms = $8, overlap = $9, catchup_window_ms = $10,
                    jitter_ms = $11, start_at = $12, end_at = $13, next_fire_at = $14,
                    next_due_at = $15, updated_at = clock_timestamp()
             WHERE id = $1 AND name = $2"
        };
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(sql)
            .bind(sid)
            .bind(&new.name)
            .bind(&new.workflow)
            .bind(campaign.id.0)
            .bind(&new.vars)
            .bind(cron)
            .bind(timezone)
            .bind(every_ms)
            .bind(new.overlap.as_str())
            .bind(millis(new.catchup_window))
            .bind(millis(new.jitter))
            .bind(new.start_at)
            .bind(new.end_at)
            .bind(next_fire)
            .bind(next_due)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            if id.is_some() {
                return Err(Error::ScheduleExists(new.name.clone()));
            }
            return Ok(false);
        }
        let change = if id.is_some() {
            ScheduleChange::Create
        } else {
            ScheduleChange::Update
        };
        schedule_changed(
            &mut tx,
            change,
            actor,
            &new.name,
            &new.workflow,
            &campaign.name,
            details,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>> {
        let row: Option<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} WHERE s.name = $1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Schedule::try_from).transpose()
    }

    /// Every schedule, by name.
    pub async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM {SCHEDULE_FROM} ORDER BY s.name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Schedule::try_from).collect()
    }

    /// The latest `limit` fires of schedule `name`, newest first.
    pub async fn schedule_fires(&self, name: &str, limit: i64) -> Result<Vec<ScheduleFire>> {
        type FireRow = (DateTime<Utc>, String, String, Option<Uuid>, DateTime<Utc>);
        let rows: Vec<FireRow> = sqlx::query_as(
            "SELECT f.fire_at, f.outcome, f.reason, f.instance_id, f.recorded_at
                 FROM schedule_fire f JOIN schedule s ON s.id = f.schedule_id
                 WHERE s.name = $1 ORDER BY f.fire_at DESC LIMIT $2",
        )
        .bind(name)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(fire_at, outcome, reason, instance, recorded_at)| {
                Ok(ScheduleFire {
                    fire_at,
                    outcome: parse_outcome(&outcome)?,
                    reason,
                    instance: instance.map(InstanceId),
                    recorded_at,
                })
            })
            .collect()
    }

    /// Deletes schedule `name` and its fire records; `false`: no such schedule. Audited as
    /// `schedule.delete`.
    pub async fn delete_schedule(&self, name: &str, actor: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let deleted: Option<(String, String)> = sqlx::query_as(
            "DELETE FROM schedule s USING campaign c
             WHERE s.name = $1 AND c.id = s.campaign_id
             RETURNING s.workflow, c.name",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((workflow, campaign)) = deleted else {
            return Ok(false);
        };
        schedule_changed(
            &mut tx,
            ScheduleChange::Delete,
            actor,
            name,
            &workflow,
            &campaign,
            json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Pauses (with an optional note) or unpauses schedule `name`. Fire times that pass while
    /// it is paused are neither run nor recorded: unpausing resumes at the next fire time
    /// after now. `None`: no such schedule. Audited as `schedule.pause` / `schedule.unpause`.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        note: Option<&str>,
        actor: &str,
    ) -> Result<Option<Schedule>> {
        let Some(schedule) = self.get_schedule(name).await? else {
            return Ok(None);
        };
        let (next_fire, next_due) = if paused {
            (schedule.next_fire_at, schedule.next_due_at)
        } else {
            let cal = schedule
                .calendar()
                .map_err(|e| Error::Corrupt(e.to_string()))?;
            next_fire(&cal, schedule.id, schedule.jitter, self.db_now().await?)
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE schedule SET paused = $2, note = $3, next_fire_at = $4, next_due_at = $5,
                    updated_at = clock_timestamp()
             WHERE id = $1",
        )
        .bind(schedule.id.0)
        .bind(paused)
        .bind(note)
        .bind(next_fire)
        .bind(next_due)
        .execute(&mut *tx)
        .await?;
        let change = if paused {
            ScheduleChange::Pause
        } else {
            ScheduleChange::Unpause
        };
        schedule_changed(
            &mut tx,
            change,
            actor,
            name,
            &schedule.workflow,
            &schedule.campaign,
            json!({ "note": note }),
        )
        .await?;
        tx.commit().await?;
        self.get_schedule(name).await
    }

    /// Starts schedule `name`'s workflow now (fire time: now, reason `trigger`), whatever its
    /// overlap policy and pause. `None`: no such schedule.
    pub async fn trigger_schedule(&self, name: &str) -> Result<Option<ManualFires>> {
        let now = self.db_now().await?;
        // Whole milliseconds, like every other fire time.
        let at = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        self.manual_fires(name, &[at], "trigger").await
    }

    /// Runs schedule `name` for each of its fire times in `[from, to]` not recorded yet
    /// (reason `backfill`), whatever its overlap policy and pause. `None`: no such schedule.
    ///
    /// Errors: [`Error::InvalidSchedule`] for more than [`MAX_BACKFILL`] fire times.
    pub async fn backfill_schedule(
        &self,
        name: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Option<ManualFires>> {
        let Some(schedule) = self.get_schedule(name).await? else {
            return Ok(None);
        };
        let cal = schedule
            .calendar()
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let times = cal.between(from, to, MAX_BACKFILL + 1);
        if times.len() > MAX_BACKFILL {
            return Err(Error::InvalidSchedule(format!(
                "backfill covers more than {MAX_BACKFILL} fire times; narrow --from/--to"
            )));
        }
        self.manual_fires(name, &times, "backfill").await
    }

    async fn manual_fires(
        &self,
        name: &str,
        times: &[DateTime<Utc>],
        reason: &str,
    ) -> Result<Option<ManualFires>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<DueRow> = sqlx::query_as(&format!(
            "SELECT {DUE_COLUMNS} FROM schedule s JOIN campaign c ON c.id = s.campaign_id
             WHERE s.name = $1 FOR UPDATE OF s"
        ))
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut out = ManualFires::default();
        for &fire_at in times {
            let record = FireRecord {
                fire_at,
                reason,
                term: None,
            };
            let instance = start_fire(&mut tx, &row, &record, &mut out.ready).await?;
            out.fires.push(ManualFire { fire_at, instance });
        }
        tx.commit().await?;
        Ok(Some(out))
    }

    /// How long until the earliest unpaused schedule is due (zero if one is due now); `None`
    /// when none will be.
    pub async fn next_schedule_due(&self) -> Result<Option<Duration>> {
        let (ms,): (Option<f64>,) = sqlx::query_as(
            "SELECT extract(epoch FROM min(next_due_at) - clock_timestamp())::float8 * 1000
             FROM schedule WHERE NOT paused AND next_due_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }

    /// As leader under `term`: starts the buffered fires whose schedule has no live run left,
    /// then fires the due schedules (at most `limit` fire times), each in its own transaction.
    /// Does nothing once the lease is no longer held under `term` (checked in the statements).
    pub async fn fire_due_schedules(
        &self,
        holder: NodeId,
        term: LeaderTerm,
        limit: usize,
    ) -> Result<SchedulerPass> {
        let mut pass = SchedulerPass::default();
        // Buffered fires first: they are older than any fire due now.
        for _ in 0..limit {
            if !self.start_one_buffered(holder, term, &mut pass).await? {
                break;
            }
        }
        for _ in 0..limit {
            if !self.fire_one(holder, term, &mut pass).await? {
                break;
            }
        }
        Ok(pass)
    }

    /// Fires (or skips, or buffers) the earliest due fire time; `false`: none is due.
    async fn fire_one(
        &self,
        holder: NodeId,
        term: LeaderTerm,
        pass: &mut SchedulerPass,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let row: Option<DueRow> = sqlx::query_as(&format!(
            "SELECT {DUE_COLUMNS} FROM schedule s JOIN campaign c ON c.id = s.campaign_id
             WHERE NOT s.paused AND s.next_due_at <= clock_timestamp() AND {LEASE_HELD}
             ORDER BY s.next_due_at LIMIT 1
             FOR UPDATE OF s SKIP LOCKED"
        ))
        .bind(COORDINATOR_LEASE)
        .bind(holder.0)
        .bind(term.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let (Some(fire_at), Some(due_at)) = (row.next_fire_at, row.next_due_at) else {
            return Ok(false);
        };
        let id = ScheduleId(row.id);
        let cal = row
            .cadence()
            .ok_or(ScheduleError::Bounds)
            .and_then(|c| calendar(&c, row.start_at, row.end_at));
        let (next, next_due) = match &cal {
            Ok(cal) => next_fire(cal, id, duration_ms(row.jitter_ms), fire_at),
            Err(err) => {
                tracing::error!(schedule = %row.name, %err, "schedule no longer parses; stopped");
                (None, None)
            }
        };
        let late = row.now - due_at;
        let window = TimeDelta::milliseconds(row.catchup_window_ms);
        let started = pass.ready.len();
        if late > window {
            let record = FireRecord {
                fire_at,
                reason: "missed",
                term: Some(term),
            };
            if record_without_instance(&mut tx, &row, &record, FireOutcome::Skipped).await? {
                pass.skipped += 1;
            }
        } else {
            let policy: OverlapPolicy = row.overlap.parse().unwrap_or_default();
            let live = if policy == OverlapPolicy::AllowAll {
                Vec::new()
            } else {
                live_runs(&mut tx, row.id).await?
            };
            let reason = if late <= ON_TIME {
                "on_time"
            } else {
                "catch_up"
            };
            let mut record = FireRecord {
                fire_at,
                reason,
                term: Some(term),
            };
            let hold = match policy {
                OverlapPolicy::Skip if !live.is_empty() => Some(FireOutcome::Skipped),
                OverlapPolicy::BufferOne if !live.is_empty() => {
                    let (waiting,): (bool,) = sqlx::query_as(
                        "SELECT EXISTS (SELECT 1 FROM schedule_fire
                                        WHERE schedule_id = $1 AND outcome = 'buffered')",
                    )
                    .bind(row.id)
                    .fetch_one(&mut *tx)
                    .await?;
                    Some(if waiting {
                        FireOutcome::Skipped
                    } else {
                        FireOutcome::Buffered
                    })
                }
                _ => None,
            };
            match hold {
                Some(outcome) => {
                    if outcome == FireOutcome::Skipped {
                        record.reason = "overlap";
                    }
                    if record_without_instance(&mut tx, &row, &record, outcome).await? {
                        match outcome {
                            FireOutcome::Buffered => pass.buffered += 1,
                            _ => pass.skipped += 1,
                        }
                    }
                }
                None => match start_fire(&mut tx, &row, &record, &mut pass.ready).await {
                    Ok(Some(_)) => {
                        pass.fired += 1;
                        match policy {
                            OverlapPolicy::CancelOther => pass.to_stop.extend(live),
                            OverlapPolicy::TerminateOther => pass.to_kill.extend(live),
                            _ => {}
                        }
                    }
                    Ok(None) => {}
                    Err(err @ (Error::UnknownWorkflow(_) | Error::Corrupt(_))) => {
                        // Not transient: record the fire skipped rather than retry it forever.
                        tracing::error!(schedule = %row.name, %err, "schedule cannot start its workflow");
                        tx.rollback().await?;
                        tx = self.pool.begin().await?;
                        let locked: Option<(Uuid,)> = sqlx::query_as(&format!(
                            "SELECT s.id FROM schedule s WHERE s.id = $4 AND {LEASE_HELD}
                             AND s.next_fire_at = $5 FOR UPDATE OF s SKIP LOCKED"
                        ))
                        .bind(COORDINATOR_LEASE)
                        .bind(holder.0)
                        .bind(term.0)
                        .bind(row.id)
                        .bind(fire_at)
                        .fetch_optional(&mut *tx)
                        .await?;
                        if locked.is_none() {
                            return Ok(true);
                        }
                        record.reason = "error";
                        if record_without_instance(&mut tx, &row, &record, FireOutcome::Skipped)
                            .await?
                        {
                            pass.skipped += 1;
                        }
                    }
                    Err(err) => return Err(err),
                },
            }
        }
        let moved = sqlx::query(&format!(
            "UPDATE schedule s SET next_fire_at = $5, next_due_at = $6
             WHERE s.id = $4 AND {LEASE_HELD}"
        ))
        .bind(COORDINATOR_LEASE)
        .bind(holder.0)
        .bind(term.0)
        .bind(row.id)
        .bind(next)
        .bind(next_due)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            // The lease was lost meanwhile: the next leader fires it.
            tx.rollback().await?;
            pass.ready.truncate(started);
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Starts one buffered fire whose schedule has no live run; `false`: none.
    async fn start_one_buffered(
        &self,
        holder: NodeId,
        term: LeaderTerm,
        pass: &mut SchedulerPass,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let row: Option<DueRow> = sqlx::query_as(&format!(
            "SELECT {DUE_COLUMNS} FROM schedule s JOIN campaign c ON c.id = s.campaign_id
             WHERE NOT s.paused AND {LEASE_HELD}
               AND EXISTS (SELECT 1 FROM schedule_fire b
                           WHERE b.schedule_id = s.id AND b.outcome = 'buffered')
               AND NOT EXISTS (SELECT 1 FROM schedule_fire f JOIN instance i
                                   ON i.id = f.instance_id
                               WHERE f.schedule_id = s.id AND f.outcome = 'fired'
                                 AND i.state NOT IN ('completed', 'failed', 'stopped'))
             LIMIT 1 FOR UPDATE OF s SKIP LOCKED"
        ))
        .bind(COORDINATOR_LEASE)
        .bind(holder.0)
        .bind(term.0)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let id = InstanceId::new();
        let (fire_at,): (DateTime<Utc>,) = sqlx::query_as(
            "UPDATE schedule_fire SET outcome = 'fired', reason = 'buffered', instance_id = $2,
                    leader_term = $3, recorded_at = clock_timestamp()
             WHERE schedule_id = $1 AND outcome = 'buffered'
             RETURNING fire_at",
        )
        .bind(row.id)
        .bind(id.0)
        .bind(term.0)
        .fetch_one(&mut *tx)
        .await?;
        let ready = create_instance(&mut tx, &row, id).await?;
        let record = FireRecord {
            fire_at,
            reason: "buffered",
            term: Some(term),
        };
        fired_fact(&mut tx, &row, id, &record, !ready.is_empty()).await?;
        tx.commit().await?;
        pass.ready.extend(ready);
        pass.fired += 1;
        Ok(true)
    }
}
