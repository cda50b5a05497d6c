//! Node liveness rows. A node id is fresh per process start; `dead` is one-way.

use chrono::{DateTime, Utc};
use drover_core::NodeId;
use uuid::Uuid;

use crate::model::Node;
use crate::{Result, Store};

/// What a heartbeat found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    Alive,
    /// The node was declared dead (or its row is gone): it must stop claiming and exit.
    Dead,
}

impl Store {
    pub async fn register_node(
        &self,
        id: NodeId,
        roles: &[String],
        host: &str,
        version: &str,
    ) -> Result<()> {
        sqlx::query("INSERT INTO node (id, roles, host, version) VALUES ($1, $2, $3, $4)")
            .bind(id.0)
            .bind(roles)
            .bind(host)
            .bind(version)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Renews the node's heartbeat (database clock) unless it has been declared dead.
    pub async fn heartbeat(&self, id: NodeId, in_flight: i32, rss_bytes: i64) -> Result<Heartbeat> {
        let done = sqlx::query(
            "UPDATE node SET heartbeat_at = clock_timestamp(), in_flight = $2, rss_bytes = $3
             WHERE id = $1 AND status <> 'dead'",
        )
        .bind(id.0)
        .bind(in_flight)
        .bind(rss_bytes)
        .execute(&self.pool)
        .await?;
        Ok(if done.rows_affected() == 1 {
            Heartbeat::Alive
        } else {
            Heartbeat::Dead
        })
    }

    /// Marks the node `draining` (it stops claiming) or, once drained, `dead`.
    pub async fn set_node_status(&self, id: NodeId, status: &str) -> Result<()> {
        sqlx::query(
            "UPDATE node SET status = $2,
                    died_at = CASE WHEN $2 = 'dead' THEN clock_timestamp() ELSE died_at END
             WHERE id = $1 AND status <> 'dead'",
        )
        .bind(id.0)
        .bind(status)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            Uuid,
            Vec<String>,
            String,
            String,
            String,
            DateTime<Utc>,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            i32,
            i64,
        )> = sqlx::query_as(
            "SELECT id, roles, host, version, status, heartbeat_at, started_at, died_at, in_flight,
                    rss_bytes
             FROM node ORDER BY started_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(
                    id,
                    roles,
                    host,
                    version,
                    status,
                    heartbeat_at,
                    started_at,
                    died_at,
                    in_flight,
                    rss_bytes,
                )| Node {
                    id: NodeId(id),
                    roles,
                    host,
                    version,
                    status,
                    heartbeat_at,
                    started_at,
                    died_at,
                    in_flight,
                    rss_bytes,
                },
            )
            .collect())
    }
}
