//! A node's fast liveness signal: a session-level advisory lock held on a connection of its
//! own (migration `0011_node_liveness.sql`).
//!
//! A process that dies (`kill -9`, a crash, an OOM kill) closes its sockets at once; Postgres
//! ends the session and releases the lock within milliseconds. The leader, seeing a node's lock
//! gone and its heartbeat a little late, declares it dead without waiting out the whole
//! heartbeat silence ([`Store::declare_dead_nodes`]). Both must hold: a live node whose lock
//! connection alone broke keeps heartbeating and takes its lock again on its next beat.
//!
//! The lock proves nothing about fencing: a node declared dead this way that was alive after
//! all is fenced out like any other (its next claim or commit finds itself dead), and
//! registers again. A frozen process or a partitioned host keeps its session (or cannot be told
//! from one that does): the heartbeat silence stays the rule for those.

use drover_core::NodeId;
use sqlx::{Connection, PgConnection};

use crate::{Error, Result, Store};

/// The advisory lock namespace (the first key of the two-key form): "DRVR".
pub(crate) const LIVENESS_NAMESPACE: i32 = 0x4452_5652;

/// A held liveness lock. Dropping it closes its connection, which releases the lock.
pub struct Liveness {
    node: NodeId,
    conn: PgConnection,
}

impl Liveness {
    /// The node whose lock this is.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// One round trip on the lock's connection: an error means the session (and the lock) is
    /// gone, and the lock must be taken again with [`Store::hold_liveness`].
    pub async fn check(&mut self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&mut self.conn).await?;
        Ok(())
    }

    /// Releases the lock (on a graceful exit; dropping it does the same, less politely).
    pub async fn release(self) {
        let _ = self.conn.close().await;
    }
}

impl Store {
    /// Takes node `node`'s liveness lock on a connection of its own and records that it holds
    /// one. Fails if the node row is gone, or the lock is held by another session (which
    /// cannot happen while keys are unique among registered nodes).
    pub async fn hold_liveness(&self, node: NodeId) -> Result<Liveness> {
        let options = self.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        let key: Option<(i32,)> = sqlx::query_as("SELECT liveness_key FROM node WHERE id = $1")
            .bind(node.0)
            .fetch_optional(&mut conn)
            .await?;
        let Some((key,)) = key else {
            return Err(Error::UnknownNode(node));
        };
        let (held,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LIVENESS_NAMESPACE)
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if !held {
            return Err(Error::LivenessHeld(node));
        }
        sqlx::query(
            "UPDATE node SET liveness_at = coalesce(liveness_at, clock_timestamp()) WHERE id = $1",
        )
        .bind(node.0)
        .execute(&mut conn)
        .await?;
        Ok(Liveness { node, conn })
    }
}
