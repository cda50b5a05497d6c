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
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "SELECT {NODE_COLUMNS} FROM node ORDER BY started_at DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Node::from).collect())
    }
}

/// The columns of a `node` row that [`NodeRow`] reads.
pub(crate) const NODE_COLUMNS: &str =
    "id, roles, host, version, status, heartbeat_at, started_at, died_at, in_flight, rss_bytes";

#[derive(sqlx::FromRow)]
pub(crate) struct NodeRow {
    id: Uuid,
    roles: Vec<String>,
    host: String,
    version: String,
    status: String,
    heartbeat_at: DateTime<Utc>,
    started_at: DateTime<Utc>,
    died_at: Option<DateTime<Utc>>,
    in_flight: i32,
    rss_bytes: i64,
}

impl From<NodeRow> for Node {
    fn from(r: NodeRow) -> Self {
        Node {
            id: NodeId(r.id),
            roles: r.roles,
            host: r.host,
            version: r.version,
            status: r.status,
            heartbeat_at: r.heartbeat_at,
            started_at: r.started_at,
            died_at: r.died_at,
            in_flight: r.in_flight,
            rss_bytes: r.rss_bytes,
        }
    }
}
