//! The event outbox: events are written with the transition they describe and relayed to
//! NATS afterwards, so publishing never blocks a commit and no transition goes unannounced.
//!
//! A relay claims a batch for a while (`claimed_until`); if it dies before marking the batch
//! relayed, the claim expires and another relay sends it again (NATS deduplicates by event id).

use chrono::{DateTime, Utc};
use drover_core::OutboxEvent;
use serde_json::Value;
use uuid::Uuid;

use crate::model::PendingEvent;
use crate::{Result, Store};

impl Store {
    /// Claims up to `limit` unrelayed events for `claim_ms`, oldest first.
    pub async fn claim_events(&self, limit: i64, claim_ms: i64) -> Result<Vec<PendingEvent>> {
        let mut rows: Vec<(Uuid, String, Value, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE event_outbox SET claimed_until = clock_timestamp() + $2 * interval '1 millisecond'
             WHERE id IN (
                SELECT id FROM event_outbox
                WHERE relayed_at IS NULL
                  AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
                ORDER BY created_at LIMIT $1
                FOR UPDATE SKIP LOCKED)
             RETURNING id, subject, payload, created_at",
        )
        .bind(limit)
        .bind(claim_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.sort_by_key(|row| (row.3, row.0));
        Ok(rows
            .into_iter()
            .map(|(id, subject, payload, created_at)| PendingEvent {
                event: OutboxEvent {
                    id,
                    subject,
                    payload,
                },
                created_at,
            })
            .collect())
    }

    /// Marks events as relayed (kept for the replay window, then purged).
    pub async fn mark_relayed(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE event_outbox SET relayed_at = clock_timestamp() WHERE id = ANY($1)")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Hands claimed events back at once (the relay failed to publish them).
    pub async fn release_events(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("UPDATE event_outbox SET claimed_until = NULL WHERE id = ANY($1) AND relayed_at IS NULL")
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
            "DELETE FROM event_outbox WHERE id IN (
                SELECT id FROM event_outbox
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
            sqlx::query_as("SELECT count(*) FROM event_outbox WHERE relayed_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(n)
    }
}
