//! The coordinator's leader lease: a row with a `term`. Acquired only when expired (term+1),
//! renewed by its holder under the same term, checked by every leader write in the write's own
//! statement. Expiry is judged by the database clock; advisory locks are not used.

use chrono::{DateTime, Utc};
use drover_core::NodeId;
use uuid::Uuid;

use crate::model::Lease;
use crate::{Result, Store};

/// The lease the coordinators elect their leader with.
pub const COORDINATOR_LEASE: &str = "coordinator";

/// A term of leadership, as granted by the lease row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaderTerm(pub i64);

impl std::fmt::Display for LeaderTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Store {
    /// Takes the lease `name` for `holder` if it is free or expired; returns the new term.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: NodeId,
        ttl_ms: i64,
    ) -> Result<Option<LeaderTerm>> {
        let term: Option<(i64,)> = sqlx::query_as(
            "UPDATE leader_lease
                SET holder = $2, term = term + 1, acquired_at = clock_timestamp(),
                    expires_at = clock_timestamp() + $3 * interval '1 millisecond'
             WHERE name = $1 AND expires_at <= clock_timestamp()
             RETURNING term",
        )
        .bind(name)
        .bind(holder.0)
        .bind(ttl_ms)
        .fetch_optional(&self.pool)
        .await?;
        Ok(term.map(|(t,)| LeaderTerm(t)))
    }

    /// Extends the lease if `holder` still holds it under `term` and it has not expired.
    /// `false` means leadership is lost: stop acting as leader at once.
    pub async fn renew_lease(
        &self,
        name: &str,
        holder: NodeId,
        term: LeaderTerm,
        ttl_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE leader_lease SET expires_at = clock_timestamp() + $4 * interval '1 millisecond'
             WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > clock_timestamp()",
        )
        .bind(name)
        .bind(holder.0)
        .bind(term.0)
        .bind(ttl_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up (a clean shutdown), so another replica need not wait for the TTL.
    pub async fn release_lease(&self, name: &str, holder: NodeId, term: LeaderTerm) -> Result<()> {
        sqlx::query(
            "UPDATE leader_lease SET expires_at = clock_timestamp()
             WHERE name = $1 AND holder = $2 AND term = $3",
        )
        .bind(name)
        .bind(holder.0)
        .bind(term.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn lease(&self, name: &str) -> Result<Option<Lease>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            name: String,
            holder: Option<Uuid>,
            term: i64,
            expires_at: DateTime<Utc>,
            acquired_at: Option<DateTime<Utc>>,
            live: bool,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT name, holder, term, expires_at, acquired_at,
                    expires_at > clock_timestamp() AS live
             FROM leader_lease WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Lease {
            name: r.name,
            holder: r.holder.map(NodeId),
            term: r.term,
            expires_at: r.expires_at,
            acquired_at: r.acquired_at,
            live: r.live,
        }))
    }
}
