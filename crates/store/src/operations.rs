//! Server-side operations (migration `0016_operation.sql`): the record of a bulk lifecycle
//! command that an API node runs in the background. Any API node reads it and may ask it to
//! stop; only the node running it (`owner_node`) writes its progress and its end.
//!
//! A `running` operation whose owner is no longer alive (nor draining) in the `node` table
//! reads as `interrupted`: its node stopped or died between two batches. An operation run by
//! an API with no node identity (`owner_node` NULL: an API not run by a node) is never judged
//! so. Finished operations, and interrupted ones as old, are pruned by
//! [`Store::create_operation`].

use chrono::{DateTime, Utc};
use drover_core::NodeId;
use serde_json::Value;
use uuid::Uuid;

use crate::{Result, Store};

/// An operation as it is created.
#[derive(Clone, Debug)]
pub struct NewOperation {
    pub id: Uuid,
    /// `pause`, `unpause`, `stop`, `kill` or `restart`.
    pub command: String,
    /// The filter as given.
    pub filter: Value,
    /// The token that started it.
    pub actor: String,
    /// Its counts before the first batch.
    pub progress: Value,
    /// The node whose API runs it, if it has one.
    pub owner: Option<NodeId>,
}

/// An operation as stored, with `state` `interrupted` for a running one whose node is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct OperationRecord {
    pub id: Uuid,
    pub command: String,
    pub filter: Value,
    pub actor: String,
    /// `running`, `completed`, `cancelled`, `failed` or `interrupted`.
    pub state: String,
    pub progress: Value,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub owner: Option<NodeId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationEnd {
    Completed,
    Cancelled,
    Failed,
    /// Its node stopped before it was done.
    Interrupted,
}

impl OperationEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }
}

/// Whether `owner_node` (of the row aliased `o`) is alive or draining.
const OWNER_LIVE: &str = "EXISTS (SELECT 1 FROM node n
                                 WHERE n.id = o.owner_node AND n.status IN ('alive', 'draining'))";

#[derive(sqlx::FromRow)]
struct OperationRow {
    id: Uuid,
    command: String,
    filter: Value,
    actor: String,
    state: String,
    progress: Value,
    error: Option<String>,
    cancel_requested: bool,
    owner_node: Option<Uuid>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<OperationRow> for OperationRecord {
    fn from(r: OperationRow) -> Self {
        Self {
            id: r.id,
            command: r.command,
            filter: r.filter,
            actor: r.actor,
            state: r.state,
            progress: r.progress,
            error: r.error,
            cancel_requested: r.cancel_requested,
            owner: r.owner_node.map(NodeId),
            created_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
        }
    }
}

impl Store {
    /// Records a new `running` operation, first deleting those finished (or interrupted, by
    /// their last progress) more than `keep_finished_ms` ago; answers how many it deleted.
    pub async fn create_operation(
        &self,
        operation: &NewOperation,
        keep_finished_ms: i64,
    ) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let pruned = prune(&mut tx, keep_finished_ms).await?;
        sqlx::query(
            "INSERT INTO operation (id, command, filter, actor, progress, owner_node)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(operation.id)
        .bind(&operation.command)
        .bind(&operation.filter)
        .bind(&operation.actor)
        .bind(&operation.progress)
        .bind(operation.owner.map(|node| node.0))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(pruned)
    }

    /// Operation `id`; `None` if unknown (or pruned).
    pub async fn operation(&self, id: Uuid) -> Result<Option<OperationRecord>> {
        let row: Option<OperationRow> = sqlx::query_as(&format!(
            "SELECT o.id, o.command, o.filter, o.actor,
                    CASE WHEN o.state = 'running' AND o.owner_node IS NOT NULL
                              AND NOT {OWNER_LIVE}
                         THEN 'interrupted' ELSE o.state END AS state,
                    o.progress, o.error, o.cancel_requested, o.owner_node,
                    o.created_at, o.updated_at, o.finished_at
             FROM operation o WHERE o.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    /// Records a running operation's counts after a batch (and, with `owner`, the node running
    /// it now: a node that registered again runs under a new id). Answers whether a cancel was
    /// requested, or `None` if the operation is not running any more (ended, or pruned).
    pub async fn operation_progress(
        &self,
        id: Uuid,
        progress: &Value,
        owner: Option<NodeId>,
    ) -> Result<Option<bool>> {
        let row: Option<(bool,)> = sqlx::query_as(
            "UPDATE operation
             SET progress = $2, owner_node = coalesce($3, owner_node),
                 updated_at = clock_timestamp()
             WHERE id = $1 AND state = 'running'
             RETURNING cancel_requested",
        )
        .bind(id)
        .bind(progress)
        .bind(owner.map(|node| node.0))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(cancel,)| cancel))
    }

    /// Records how an operation ended, with its final counts (`None`: those it recorded
    /// last).
    pub async fn finish_operation(
        &self,
        id: Uuid,
        end: OperationEnd,
        progress: Option<&Value>,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE operation
             SET state = $2, progress = coalesce($3, progress), error = $4,
                 finished_at = clock_timestamp(), updated_at = clock_timestamp()
             WHERE id = $1",
        )
        .bind(id)
        .bind(end.as_str())
        .bind(progress)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Asks a running operation to stop after its current batch (a no-op once it ended);
    /// answers it as it stands, or `None` if unknown.
    pub async fn request_operation_cancel(&self, id: Uuid) -> Result<Option<OperationRecord>> {
        sqlx::query(
            "UPDATE operation SET cancel_requested = true WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.operation(id).await
    }

    /// Deletes the operations finished (or interrupted, by their last progress) more than
    /// `keep_finished_ms` ago; answers how many.
    pub async fn prune_operations(&self, keep_finished_ms: i64) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        prune(&mut conn, keep_finished_ms).await
    }
}

async fn prune(conn: &mut sqlx::PgConnection, keep_finished_ms: i64) -> Result<u64> {
    let done = sqlx::query(&format!(
        "DELETE FROM operation o
         WHERE o.finished_at < clock_timestamp() - $1 * interval '1 millisecond'
            OR (o.state = 'running'
                AND o.updated_at < clock_timestamp() - $1 * interval '1 millisecond'
                AND (o.owner_node IS NULL OR NOT {OWNER_LIVE}))"
    ))
    .bind(keep_finished_ms)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
