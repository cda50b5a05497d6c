//! Node liveness rows. A node id is fresh per process start; `dead` is one-way.

use chrono::{DateTime, Utc};
use drover_core::{NodeId, Queue};
use uuid::Uuid;

use crate::model::Node;
use crate::{Error, Result, Store};

/// What a heartbeat found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeat {
    Alive,
    /// The node was declared dead (or its row is gone): it must stop claiming and exit.
    Dead,
}

/// A node as it registers.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub id: NodeId,
    pub roles: Vec<String>,
    pub host: String,
    pub version: String,
    /// The queues its worker serves; empty without the worker role.
    pub queues: Vec<Queue>,
    /// The handlers its worker registered: only it claims `handler` steps of these.
    pub handlers: Vec<String>,
}

impl NewNode {
    /// A node of `roles` on `host` running `version`, serving the default queue with no
    /// handlers (set `queues` and `handlers` to say otherwise).
    pub fn new(id: NodeId, roles: &[String], host: &str, version: &str) -> Self {
        Self {
            id,
            roles: roles.to_vec(),
            host: host.to_owned(),
            version: version.to_owned(),
            queues: vec![Queue::default()],
            handlers: Vec::new(),
        }
    }
}

impl Store {
    /// Registers a node process (`alive`, heartbeat now), advertising what its worker serves.
    pub async fn register_node(&self, node: &NewNode) -> Result<()> {
        let queues: Vec<&str> = node.queues.iter().map(Queue::as_str).collect();
        sqlx::query(
            "INSERT INTO node (id, roles, host, version, queues, handlers)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(node.id.0)
        .bind(&node.roles)
        .bind(&node.host)
        .bind(&node.version)
        .bind(&queues)
        .bind(&node.handlers)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews the node's heartbeat (database clock) unless it has been declared dead.
    pub async fn heartbeat(&self, id: NodeId, in_flight: i32, rss_bytes: i64) -> Result<Heartbeat> {
        let done = sqlx::query(
            "UPDATE node SET heartbeat_at = clock_timestamp(), in_flight = $2, rss_bytes = $3
             WHERE id = $1 AND status NOT IN ('dead', 'left')",
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

    /// Marks the node `draining` (it stops claiming) or, once drained, `left` (or `dead`).
    /// A node that is gone already stays as it is.
    pub async fn set_node_status(&self, id: NodeId, status: &str) -> Result<()> {
        sqlx::query(
            "UPDATE node SET status = $2,
                    died_at = CASE WHEN $2 IN ('dead', 'left') THEN clock_timestamp()
                                   ELSE died_at END
             WHERE id = $1 AND status NOT IN ('dead', 'left')",
        )
        .bind(id.0)
        .bind(status)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When `node` last heartbeat; `None` for an unknown node.
    pub async fn last_heartbeat(&self, node: NodeId) -> Result<Option<DateTime<Utc>>> {
        let row: Option<(DateTime<Utc>,)> =
            sqlx::query_as("SELECT heartbeat_at FROM node WHERE id = $1")
                .bind(node.0)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(at,)| at))
    }

    /// The queues the alive workers serve.
    pub async fn served_queues(&self) -> Result<Vec<Queue>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT unnest(queues) FROM node
             WHERE status = 'alive' AND 'worker' = ANY (roles) ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(q,)| {
                q.parse::<Queue>()
                    .map_err(|err| Error::Corrupt(format!("node queue {q:?}: {err}")))
            })
            .collect()
    }

    /// Deletes up to `limit` rows of nodes dead or left for over `retention_ms` that own no
    /// RUNNING instance (the journal keeps their ids); returns how many.
    pub async fn prune_nodes(&self, retention_ms: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM node WHERE id IN (
                 SELECT n.id FROM node n
                 WHERE n.status IN ('dead', 'left')
                   AND n.died_at < clock_timestamp() - $1 * interval '1 millisecond'
                   AND NOT EXISTS (SELECT 1 FROM instance i
                                   WHERE i.owner_node = n.id AND i.state = 'running')
                 ORDER BY n.died_at LIMIT $2)",
        )
        .bind(retention_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn list_nodes(&self) -> Result<Vec<Node>> {
        let rows: Vec<NodeRow> = sqlx::query_as(&format!(
            "SELECT {NODE_COLUMNS} FROM node ORDER BY started_at DESC"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Node::try_from).collect()
    }
}

/// The columns of a `node` row that [`NodeRow`] reads.
pub(crate) const NODE_COLUMNS: &str = "id, roles, queues, handlers, host, version, status, \
    heartbeat_at, started_at, died_at, in_flight, rss_bytes";

#[derive(sqlx::FromRow)]
pub(crate) struct NodeRow {
    id: Uuid,
    roles: Vec<String>,
    queues: Vec<String>,
    handlers: Vec<String>,
    host: String,
    version: String,
    status: String,
    heartbeat_at: DateTime<Utc>,
    started_at: DateTime<Utc>,
    died_at: Option<DateTime<Utc>>,
    in_flight: i32,
    rss_bytes: i64,
}

impl TryFrom<NodeRow> for Node {
    type Error = Error;
    fn try_from(r: NodeRow) -> Result<Self> {
        let queues = r
            .queues
            .into_iter()
            .map(|q| Queue::try_from(q).map_err(|e| Error::Corrupt(e.to_string())))
            .collect::<Result<_>>()?;
        Ok(Node {
            id: NodeId(r.id),
            roles: r.roles,
            queues,
            handlers: r.handlers,
            host: r.host,
            version: r.version,
            status: r.status,
            heartbeat_at: r.heartbeat_at,
            started_at: r.started_at,
            died_at: r.died_at,
            in_flight: r.in_flight,
            rss_bytes: r.rss_bytes,
        })
    }
}
