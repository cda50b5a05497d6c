//! Events as facts (ARCHITECTURE.md, "Events"): every transaction that changes an instance
//! writes what happened to `event_fact` in the same transaction, numbered per instance by the
//! counter on the instance row it has locked (`instance.event_seq`; `campaign.event_seq` for
//! campaign events), so the numbers follow commit order without gaps. Only this crate decides
//! which facts a transition makes; the bus renders them as CloudEvents when it relays them.
//!
//! Relaying: the 16 partitions of `event_fact` (all events of an instance share one) are
//! leased to the relays of the alive nodes, a fair share each; only the holder of a partition
//! sends its events, oldest first, so each instance's events go out in order. A relay that
//! dies loses its lease after [`RELAY_LEASE`], and another sends what it left (again, if it
//! had sent it: NATS drops the copy by event id).

use chrono::{DateTime, Utc};
use drover_core::event::{EventKind, Fact, FactSubject};
use drover_core::{InstanceId, InstanceState};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::model::{Completion, Transition};
use crate::{Error, Result, Store};

/// How many relay partitions there are (`event_fact.part`).
pub const RELAY_PARTS: i64 = 16;

/// A fact to write about an instance: the store fills in its campaign, workflow, version,
/// sequence and time from the instance row.
#[derive(Clone, Debug)]
pub(crate) struct NewFact {
    pub(crate) instance: InstanceId,
    pub(crate) kind: EventKind,
    /// An object of the kind's own fields.
    pub(crate) data: Value,
}

impl NewFact {
    pub(crate) fn new(instance: InstanceId, kind: EventKind, data: Value) -> Self {
        Self {
            instance,
            kind,
            data: strip_nulls(data),
        }
    }
}

/// Drops the `null` fields of an object: an absent optional field is left out, not `null`.
fn strip_nulls(data: Value) -> Value {
    match data {
        Value::Object(mut map) => {
            map.retain(|_, v| !v.is_null());
            Value::Object(map)
        }
        other => other,
    }
}

/// Facts as the `$n::jsonb` of a statement: `[{ord, id, instance_id, kind, data}]`, `ord`
/// counting from 1 in the given order.
pub(crate) fn facts_json(facts: &[NewFact]) -> Value {
    Value::Array(
        facts
            .iter()
            .enumerate()
            .map(|(i, f)| {
                json!({
                    "ord": i + 1,
                    "id": Uuid::now_v7(),
                    "instance_id": f.instance,
                    "kind": f.kind.as_str(),
                    "data": f.data,
                })
            })
            .collect(),
    )
}

/// The distinct instances `facts` are about: bound beside [`facts_json`] so the statement finds
/// each instance row by primary key (`i.id = ANY(..)`). A recordset's rows are estimated at
/// 100 whatever their number, and a plan cached while the table was small scans it whole.
pub(crate) fn fact_instances(facts: &[NewFact]) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = facts.iter().map(|f| f.instance.0).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Writes `facts` (about instances this transaction has locked or created), numbering them
/// per instance after the instance's last event.
pub(crate) async fn insert_facts(conn: &mut sqlx::PgConnection, facts: &[NewFact]) -> Result<()> {
    if facts.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH f AS (
            SELECT * FROM jsonb_to_recordset($1::jsonb)
                AS f(ord int, id uuid, instance_id uuid, kind text, data jsonb)
         ), n AS (
            SELECT instance_id, count(*) AS c FROM f GROUP BY instance_id
         ), u AS (
            UPDATE instance i SET event_seq = i.event_seq + n.c
            FROM n WHERE i.id = n.instance_id AND i.id = ANY($2)
            RETURNING i.id, i.event_seq - n.c AS base, i.workflow, i.version, i.campaign_id
         )
         INSERT INTO event_fact (id, instance_id, campaign, workflow, version, seq, kind, data)
         SELECT f.id, f.instance_id, c.name, u.workflow, u.version,
                u.base + row_number() OVER (PARTITION BY f.instance_id ORDER BY f.ord),
                f.kind, f.data
         FROM f JOIN u ON u.id = f.instance_id JOIN campaign c ON c.id = u.campaign_id
         ORDER BY f.ord",
    )
    .bind(facts_json(facts))
    .bind(fact_instances(facts))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes a fact about campaign `campaign` itself (e.g. `permit_drift`).
pub(crate) async fn insert_campaign_fact(
    conn: &mut sqlx::PgConnection,
    campaign: &str,
    kind: EventKind,
    data: Value,
) -> Result<()> {
    sqlx::query(
        "WITH u AS (
            UPDATE campaign SET event_seq = event_seq + 1 WHERE name = $2
            RETURNING name, event_seq
         )
         INSERT INTO event_fact (id, campaign, seq, kind, data)
         SELECT $1, name, event_seq, $3, $4 FROM u",
    )
    .bind(Uuid::now_v7())
    .bind(campaign)
    .bind(kind.as_str())
    .bind(strip_nulls(data))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The kind of the event that announces where `transition` takes an instance.
fn transition_kind(transition: &Transition) -> EventKind {
    match transition {
        Transition::Next { .. } => EventKind::StepCompleted,
        Transition::Retry { .. } => EventKind::StepRetry,
        Transition::Wait { .. } => EventKind::Waiting,
        Transition::Stop { state } => match state {
            InstanceState::Completed => EventKind::Completed,
            InstanceState::Failed => EventKind::Failed,
            InstanceState::Stopped => EventKind::Stopped,
            _ => EventKind::InError,
        },
    }
}

/// The facts of a step commit, as the worker ran it (a stop or pause an operator asked for
/// that the commit honours adds its own): `step_completed`, `step_retry` or `waiting`; or, for
/// an end, `step_completed` then `completed`, `failed`, `in_error` or `stopped`.
pub(crate) fn completion_facts(c: &Completion) -> Vec<NewFact> {
    // A step and the end it ran at once: the facts of each, as if committed one by one.
    if let (Some(moved), Some(end)) = (c.unfolded(), &c.ends) {
        let ended = Completion {
            step_id: end.step_id.clone(),
            step_seq: c.step_seq.next(),
            attempt: 1,
            outcome: "completed".to_owned(),
            error: end.error.clone(),
            ends: None,
            ..c.clone()
        };
        let mut facts = completion_facts(&moved);
        facts.extend(completion_facts(&ended));
        return facts;
    }
    let (next_step, state) = match &c.transition {
        Transition::Next { step, .. } => (Some(step.as_str()), InstanceState::Ready),
        Transition::Retry { .. } => (Some(c.step_id.as_str()), InstanceState::Ready),
        Transition::Stop { state } => (None, *state),
        Transition::Wait { .. } => (Some(c.step_id.as_str()), InstanceState::Waiting),
    };
    let data = json!({
        "step": c.step_id,
        "step_seq": c.step_seq.next(),
        "attempt": c.attempt,
        "outcome": c.outcome,
        "next_step": next_step,
        "state": state,
        "error": c.error,
    });
    let kind = transition_kind(&c.transition);
    // `next_step` and `error` are part of these kinds' shape even when null.
    let fact = |kind| NewFact {
        instance: c.instance,
        kind,
        data: data.clone(),
    };
    let mut facts = Vec::with_capacity(2);
    if matches!(c.transition, Transition::Stop { .. }) {
        facts.push(fact(EventKind::StepCompleted));
    }
    facts.push(fact(kind));
    facts
}

/// The columns of a [`FactRow`].
const FACT_COLUMNS: &str =
    "id, instance_id, campaign, workflow, version, seq, kind, data, created_at";

/// An event fact row as the relay reads it.
#[derive(sqlx::FromRow)]
struct FactRow {
    id: Uuid,
    instance_id: Option<Uuid>,
    campaign: String,
    workflow: Option<String>,
    version: Option<i32>,
    seq: i64,
    kind: String,
    data: Value,
    created_at: DateTime<Utc>,
}

impl TryFrom<FactRow> for Fact {
    type Error = Error;

    fn try_from(row: FactRow) -> Result<Self> {
        let kind = row
            .kind
            .parse::<EventKind>()
            .map_err(|e| Error::Corrupt(format!("event {}: {e}", row.id)))?;
        let subject = match (row.instance_id, row.workflow, row.version) {
            (Some(id), Some(workflow), Some(version)) => FactSubject::Instance {
                id: InstanceId(id),
                workflow,
                version,
            },
            (None, _, _) => FactSubject::Campaign,
            _ => {
                return Err(Error::Corrupt(format!(
                    "event {}: an instance event without its workflow",
                    row.id
                )));
            }
        };
        Ok(Fact {
            id: row.id,
            subject,
            campaign: row.campaign,
            seq: row.seq,
            kind,
            data: row.data,
            time: row.created_at,
        })
    }
}

/// How long a relay's lease on its partitions lasts unless renewed.
pub const RELAY_LEASE: std::time::Duration = std::time::Duration::from_secs(5);

impl Store {
    /// Renews `relay`'s partition leases and takes or gives back partitions so it holds a
    /// fair share (16 ÷ alive nodes, rounded up); returns the partitions it holds.
    pub async fn lease_relay_parts(&self, relay: Uuid) -> Result<Vec<i16>> {
        let lease_ms = drover_core::definition::millis(RELAY_LEASE);
        let parts: Vec<(i16,)> = sqlx::query_as(
            "WITH share AS (
                SELECT ceil($3::numeric / greatest(count(*), 1))::bigint AS n
                FROM node WHERE status = 'alive'
             ), mine AS (
                SELECT part, row_number() OVER (ORDER BY part) AS k FROM event_relay
                WHERE owner = $1 AND lease_until > clock_timestamp()
             ), free_rows AS (
                SELECT part, lease_until FROM event_relay
                WHERE lease_until IS NULL OR lease_until <= clock_timestamp()
                FOR UPDATE SKIP LOCKED
             ), free AS (
                SELECT part, lease_until,
                       row_number() OVER (ORDER BY lease_until NULLS FIRST, part)
                       + (SELECT count(*) FROM mine) AS k
                FROM free_rows
             ), keep AS (
                SELECT part FROM mine, share WHERE mine.k <= share.n
                UNION ALL
                -- Past its share, a relay still takes a partition nobody has taken for two
                -- leases (the alive count still names a node that died).
                SELECT part FROM free, share
                WHERE free.k <= share.n
                   OR free.lease_until < clock_timestamp() - 2 * $2 * interval '1 millisecond'
             ), gone AS (
                UPDATE event_relay r SET owner = NULL, lease_until = clock_timestamp()
                FROM mine, share
                WHERE r.part = mine.part AND mine.k > share.n
             )
             UPDATE event_relay r
             SET owner = $1, lease_until = clock_timestamp() + $2 * interval '1 millisecond'
             FROM keep WHERE r.part = keep.part
             RETURNING r.part",
        )
        .bind(relay)
        .bind(lease_ms)
        .bind(RELAY_PARTS)
        .fetch_all(&self.pool)
        .await?;
        let mut parts: Vec<i16> = parts.into_iter().map(|(p,)| p).collect();
        parts.sort_unstable();
        Ok(parts)
    }

    /// Gives `relay`'s partitions back at once (it is stopping).
    pub async fn release_relay_parts(&self, relay: Uuid) -> Result<()> {
        sqlx::query("UPDATE event_relay SET owner = NULL, lease_until = NULL WHERE owner = $1")
            .bind(relay)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Unrelayed events of partitions `parts`, each partition's in the order they were written
    /// (so each instance's in its sequence order): up to `limit` in all, a fair share of it
    /// from each partition.
    ///
    /// Each partition is read by its own ordered scan of `event_fact_pending`, which stops at
    /// its share: the cost follows `limit`, not the backlog. (One scan of all the partitions
    /// had to sort every pending event per call, and its bitmap scan never cleared the index
    /// entries of relayed rows: 2 ms a call with 3,000 pending.)
    pub async fn unrelayed_facts(&self, parts: &[i16], limit: i64) -> Result<Vec<Fact>> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let n = i64::try_from(parts.len()).unwrap_or(i64::MAX);
        let share = (limit.max(1) + n - 1) / n;
        let rows: Vec<FactRow> = sqlx::query_as(&format!(
            "SELECT f.* FROM unnest($1::smallint[]) AS p(part)
             CROSS JOIN LATERAL (
                SELECT {FACT_COLUMNS}, pos FROM event_fact
                WHERE part = p.part AND relayed_at IS NULL
                ORDER BY pos LIMIT $2
             ) f
             ORDER BY f.pos"
        ))
        .bind(parts)
        .bind(share)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Fact::try_from).collect()
    }

    /// Marks events as relayed (kept for the replay window, then purged).
    pub async fn mark_relayed(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE event_fact SET relayed_at = clock_timestamp() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes up to `limit` relayed events older than the replay window, oldest first;
    /// returns how many (`limit`: there may be more). Rows another purge is deleting are
    /// skipped, not waited for, so relays of several nodes purge side by side.
    pub async fn purge_relayed(&self, older_than_ms: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM event_fact WHERE pos IN (
                SELECT pos FROM event_fact
                WHERE relayed_at IS NOT NULL
                  AND relayed_at < clock_timestamp() - $1 * interval '1 millisecond'
                ORDER BY relayed_at LIMIT $2
                FOR UPDATE SKIP LOCKED)",
        )
        .bind(older_than_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Events not relayed yet.
    pub async fn pending_events(&self) -> Result<i64> {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM event_fact WHERE relayed_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(n)
    }

    /// Events not relayed yet, and how long the oldest of them has waited (seconds; 0 when
    /// none): the outbox relay's backlog and lag.
    pub async fn relay_backlog(&self) -> Result<(i64, f64)> {
        let (n, lag): (i64, f64) = sqlx::query_as(
            "SELECT count(*),
                    coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
             FROM event_fact WHERE relayed_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((n, lag))
    }

    /// Every event written about `instance`, in sequence order (relayed or not, until the
    /// replay window purges them).
    pub async fn instance_facts(&self, instance: InstanceId) -> Result<Vec<Fact>> {
        let rows: Vec<FactRow> = sqlx::query_as(&format!(
            "SELECT {FACT_COLUMNS} FROM event_fact WHERE instance_id = $1 ORDER BY seq"
        ))
        .bind(instance.0)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Fact::try_from).collect()
    }
}
