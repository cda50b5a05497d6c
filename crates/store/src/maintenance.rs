//! What the technical workflows do to the database (issue 13): retention cleanup of finished
//! instances, campaign retention, and the paused-too-long check.
//!
//! # Cleanup
//! [`Store::delete_finished_batch`] deletes, in one short transaction, up to `limit` finished
//! (`completed`, `failed`, `stopped`) instances of one campaign that finished longer than the
//! retention ago, with their journal, signals and relayed events. Never a live or `in_error`
//! one, and never one whose family is not going with it: an instance is kept while it has a
//! parent or a child that is not deleted in the same batch (children run under their parent;
//! a live parent may still read its child), or while a restart of it (`restarted_from`) stays.
//! The candidates are locked `FOR UPDATE SKIP LOCKED`, so a concurrent restart of one waits
//! for the batch (and then finds it gone) or the batch skips it. Batches walk the campaign's
//! finished instances oldest first by `(finished_at, id)`: the caller passes back the cursor
//! it got, so kept instances are stepped over instead of filling every batch. Unrelayed
//! events stay for the relay (then the replay-window purge takes them).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_core::definition::millis;
use drover_core::event::EventKind;
use drover_core::{CampaignId, InstanceId, Severity, StepSeq};
use serde_json::json;
use uuid::Uuid;

use crate::facts::{NewFact, insert_facts};
use crate::{Error, Result, Store};

/// Where a walk over a campaign's finished instances stands: the last one looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FinishedCursor {
    pub finished_at: DateTime<Utc>,
    pub id: InstanceId,
}

/// What one cleanup batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupBatch {
    /// Finished instances past retention looked at (at most the limit): fewer than the limit
    /// means the campaign has no more.
    pub scanned: u64,
    pub instances: u64,
    pub journal: u64,
    pub signals: u64,
    /// Relayed events of the deleted instances.
    pub events: u64,
    /// Candidates kept because of a parent, child or restart that stays.
    pub kept: u64,
    /// Pass it to the next batch; `None` when nothing was looked at.
    pub cursor: Option<FinishedCursor>,
}

/// A campaign and how long its finished instances are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignRetention {
    pub id: CampaignId,
    pub name: String,
    /// `None`: the cluster default.
    pub retention: Option<Duration>,
}

/// A PAUSED instance paused for longer than asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PausedInstance {
    pub id: InstanceId,
    pub workflow: String,
    pub version: i32,
    pub campaign: String,
    pub current_step: String,
    pub step_seq: StepSeq,
    pub paused_at: DateTime<Utc>,
    /// How long it had been paused when it was read (database clock).
    pub paused_for: Duration,
    pub severity: Severity,
}

/// What to do about an instance paused too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PausedAction {
    Warn,
    /// Stop it next (its severity allows, and it is past the stop threshold).
    Stop,
}

impl PausedAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PausedAction::Warn => "warn",
            PausedAction::Stop => "stop",
        }
    }
}

#[derive(sqlx::FromRow)]
struct Candidate {
    id: Uuid,
    finished_at: DateTime<Utc>,
    parent_instance_id: Option<Uuid>,
    restarted_from: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
struct PausedRow {
    id: Uuid,
    workflow: String,
    version: i32,
    campaign: String,
    current_step: String,
    step_seq: i64,
    paused_at: DateTime<Utc>,
    paused_for_ms: i64,
    severity: String,
}

/// The candidates that may go: those with no parent, child or restart staying behind, the
/// staying spreading along parent and child links and from a restart to what it restarted.
fn deletable(candidates: &[Candidate], blocked_by_outsiders: HashSet<Uuid>) -> Vec<Uuid> {
    let ids: HashSet<Uuid> = candidates.iter().map(|c| c.id).collect();
    let mut kept = blocked_by_outsiders;
    for c in candidates {
        if c.parent_instance_id.is_some_and(|p| !ids.contains(&p)) {
            kept.insert(c.id);
        }
    }
    let mut changed = true;
    while changed {
        changed = false;
        for c in candidates {
            let mut also = Vec::new();
            if kept.contains(&c.id) {
                // Its parent and what it restarted stay with it.
                also.extend(c.parent_instance_id);
                also.extend(c.restarted_from);
            } else if c.parent_instance_id.is_some_and(|p| kept.contains(&p)) {
                // A child of one that stays, stays.
                also.push(c.id);
            }
            for id in also {
                if ids.contains(&id) && kept.insert(id) {
                    changed = true;
                }
            }
        }
    }
    candidates
        .iter()
        .filter(|c| !kept.contains(&c.id))
        .map(|c| c.id)
        .collect()
}

impl Store {
    /// Every campaign with its retention override, by id.
    pub async fn campaign_retentions(&self) -> Result<Vec<CampaignRetention>> {
        let rows: Vec<(i64, String, Option<i64>)> =
            sqlx::query_as("SELECT id, name, retention_ms FROM campaign ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, ms)| CampaignRetention {
                id: CampaignId(id),
                name,
                retention: ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
            })
            .collect())
    }

    /// Sets (`Some`) or clears (`None`: back to the cluster default) how long campaign
    /// `name`'s finished instances are kept; audited as `campaign.set_retention`.
    ///
    /// Errors: [`Error::UnknownCampaign`].
    pub async fn set_campaign_retention(
        &self,
        name: &str,
        retention: Option<Duration>,
        actor: &str,
    ) -> Result<CampaignRetention> {
        let row: Option<(i64, String, Option<i64>)> = sqlx::query_as(
            "WITH old AS (SELECT id, retention_ms FROM campaign WHERE name = $1 FOR NO KEY UPDATE),
                  a AS (INSERT INTO audit (actor, action, target, details)
                        SELECT $3, 'campaign.set_retention', $1,
                               jsonb_build_object('from_ms', old.retention_ms, 'to_ms', $2::bigint)
                        FROM old)
             UPDATE campaign c SET retention_ms = $2 FROM old WHERE c.id = old.id
             RETURNING c.id, c.name, c.retention_ms",
        )
        .bind(name)
        .bind(retention.map(millis))
        .bind(actor)
        .fetch_optional(&self.pool)
        .await?;
        let (id, name, ms) = row.ok_or_else(|| Error::UnknownCampaign(name.to_owned()))?;
        Ok(CampaignRetention {
            id: CampaignId(id),
            name,
            retention: ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        })
    }

    /// Deletes one batch of campaign `campaign`'s finished instances past `retention`, after
    /// `after` (see the module docs). One short transaction.
    pub async fn delete_finished_batch(
        &self,
        campaign: CampaignId,
        retention: Duration,
        after: Option<FinishedCursor>,
        limit: i64,
    ) -> Result<CleanupBatch> {
        let (after_at, after_id) = match after {
            Some(cursor) => (Some(cursor.finished_at), cursor.id.0),
            None => (None, Uuid::nil()),
        };
        let mut tx = self.pool.begin().await?;
        let candidates: Vec<Candidate> = sqlx::query_as(
            "SELECT id, finished_at, parent_instance_id, restarted_from FROM instance
             WHERE campaign_id = $1 AND state IN ('completed', 'failed', 'stopped')
               AND finished_at < clock_timestamp() - $2 * interval '1 millisecond'
               AND (finished_at, id) > (coalesce($3, '-infinity'::timestamptz), $4)
             ORDER BY finished_at, id LIMIT $5
             FOR UPDATE SKIP LOCKED",
        )
        .bind(campaign.0)
        .bind(millis(retention))
        .bind(after_at)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = candidates.last() else {
            tx.commit().await?;
            return Ok(CleanupBatch::default());
        };
        let cursor = FinishedCursor {
            finished_at: last.finished_at,
            id: InstanceId(last.id),
        };
        let ids: Vec<Uuid> = candidates.iter().map(|c| c.id).collect();
        // Candidates a row outside the batch points at: as its parent, or as what it restarted.
        let blockers: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT parent_instance_id FROM instance
             WHERE parent_instance_id = ANY($1) AND NOT (id = ANY($1))
             UNION
             SELECT restarted_from FROM instance
             WHERE restarted_from = ANY($1) AND NOT (id = ANY($1))",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let doomed = deletable(&candidates, blockers.into_iter().map(|(id,)| id).collect());
        let mut batch = CleanupBatch {
            scanned: candidates.len() as u64,
            kept: (candidates.len() - doomed.len()) as u64,
            cursor: Some(cursor),
            ..CleanupBatch::default()
        };
        if !doomed.is_empty() {
            let (events, journal, signals): (i64, i64, i64) = sqlx::query_as(
                "WITH e AS (DELETE FROM event_fact
                            WHERE instance_id = ANY($1) AND relayed_at IS NOT NULL RETURNING 1),
                      j AS (DELETE FROM journal WHERE instance_id = ANY($1) RETURNING 1),
                      s AS (DELETE FROM instance_signal WHERE instance_id = ANY($1) RETURNING 1)
                 SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM j),
                        (SELECT count(*) FROM s)",
            )
            .bind(&doomed)
            .fetch_one(&mut *tx)
            .await?;
            let deleted = sqlx::query("DELETE FROM instance WHERE id = ANY($1)")
                .bind(&doomed)
                .execute(&mut *tx)
                .await?;
            batch.events = u64::try_from(events).unwrap_or(0);
            batch.journal = u64::try_from(journal).unwrap_or(0);
            batch.signals = u64::try_from(signals).unwrap_or(0);
            batch.instances = deleted.rows_affected();
        }
        tx.commit().await?;
        Ok(batch)
    }

    /// Up to `limit` PAUSED instances paused for longer than `older_than`, after `after`,
    /// oldest pause first, with their workflow's severity.
    pub async fn paused_longer_than(
        &self,
        older_than: Duration,
        after: Option<(DateTime<Utc>, InstanceId)>,
        limit: i64,
    ) -> Result<Vec<PausedInstance>> {
        let rows: Vec<PausedRow> = sqlx::query_as(
            "SELECT i.id, i.workflow, i.version, c.name AS campaign, i.current_step, i.step_seq,
                    i.paused_at,
                    (extract(epoch FROM clock_timestamp() - i.paused_at) * 1000)::bigint
                        AS paused_for_ms,
                    d.severity
             FROM instance i
             JOIN campaign c ON c.id = i.campaign_id
             JOIN workflow_definition d ON d.name = i.workflow AND d.version = i.version
             WHERE i.state = 'paused'
               AND i.paused_at < clock_timestamp() - $1 * interval '1 millisecond'
               AND (i.paused_at, i.id) > (coalesce($2, '-infinity'::timestamptz), $3)
             ORDER BY i.paused_at, i.id LIMIT $4",
        )
        .bind(millis(older_than))
        .bind(after.map(|(at, _)| at))
        .bind(after.map_or(Uuid::nil(), |(_, id)| id.0))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(PausedInstance {
                    id: InstanceId(r.id),
                    workflow: r.workflow,
                    version: r.version,
                    campaign: r.campaign,
                    current_step: r.current_step,
                    step_seq: StepSeq(r.step_seq),
                    paused_at: r.paused_at,
                    paused_for: Duration::from_millis(u64::try_from(r.paused_for_ms).unwrap_or(0)),
                    severity: r
                        .severity
                        .parse()
                        .map_err(|e: String| Error::Corrupt(format!("definition severity: {e}")))?,
                })
            })
            .collect()
    }

    /// Writes a `paused_too_long` event for each of `found` still paused since the same time
    /// (one transaction, the instances locked), and an audit row `instance.paused_too_long`
    /// by `actor` with the reason for each to be stopped. Returns the ids it wrote for.
    pub async fn record_paused_too_long(
        &self,
        found: &[(PausedInstance, PausedAction)],
        reason: &str,
        actor: &str,
    ) -> Result<Vec<InstanceId>> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let mut ids: Vec<Uuid> = found.iter().map(|(p, _)| p.id.0).collect();
        ids.sort();
        let still: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, paused_at FROM instance WHERE id = ANY($1) AND state = 'paused'
             ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let still: HashMap<Uuid, DateTime<Utc>> = still.into_iter().collect();
        let mut facts = Vec::new();
        let mut written = Vec::new();
        for (paused, action) in found {
            if still.get(&paused.id.0) != Some(&paused.paused_at) {
                continue;
            }
            facts.push(NewFact::new(
                paused.id,
                EventKind::PausedTooLong,
                json!({
                    "state": "paused",
                    "step": paused.current_step,
                    "step_seq": paused.step_seq.0,
                    "paused_at": paused.paused_at,
                    "paused_for_ms": millis(paused.paused_for),
                    "severity": paused.severity.as_str(),
                    "action": action.as_str(),
                    "actor": actor,
                }),
            ));
            sqlx::query(
                "INSERT INTO audit (actor, action, target, details)
                 VALUES ($1, 'instance.paused_too_long', $2, $3)",
            )
            .bind(actor)
            .bind(paused.id.to_string())
            .bind(json!({
                "action": action.as_str(),
                "reason": reason,
                "paused_at": paused.paused_at,
                "paused_for_ms": millis(paused.paused_for),
                "severity": paused.severity.as_str(),
            }))
            .execute(&mut *tx)
            .await?;
            written.push(paused.id);
        }
        insert_facts(&mut tx, &facts).await?;
        tx.commit().await?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u128, parent: Option<u128>, restarted_from: Option<u128>) -> Candidate {
        Candidate {
            id: Uuid::from_u128(id),
            finished_at: DateTime::UNIX_EPOCH,
            parent_instance_id: parent.map(Uuid::from_u128),
            restarted_from: restarted_from.map(Uuid::from_u128),
        }
    }

    #[test]
    fn a_family_goes_whole_or_not_at_all() {
        // 1 ← 2 ← 3 (parent links); 3 has a child outside the batch: the whole chain stays.
        let chain = [c(1, None, None), c(2, Some(1), None), c(3, Some(2), None)];
        let outside: HashSet<Uuid> = [Uuid::from_u128(3)].into();
        assert!(deletable(&chain, outside).is_empty());
        // Nothing outside: all go.
        assert_eq!(deletable(&chain, HashSet::new()).len(), 3);
        // A child whose parent is not in the batch stays; so do its own children.
        let orphans = [c(5, Some(4), None), c(6, Some(5), None), c(7, None, None)];
        assert_eq!(
            deletable(&orphans, HashSet::new()),
            vec![Uuid::from_u128(7)]
        );
        // A restart that stays keeps what it restarted; one that goes does not.
        let restarts = [c(8, None, None), c(9, None, Some(8))];
        assert_eq!(deletable(&restarts, HashSet::new()).len(), 2);
        let kept: HashSet<Uuid> = [Uuid::from_u128(9)].into();
        assert!(deletable(&restarts, kept).is_empty());
    }
}
