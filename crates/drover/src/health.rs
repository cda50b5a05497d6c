//! What a readiness probe needs to know about a node, kept current by the node itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use drover_bus::Bus;
use drover_core::NodeId;
use drover_store::Store;

/// The node's own view of its health, shared by its tasks. Cheap to clone and to read: every
/// field is an atomic or the NATS client's own connection state, so `/readyz` can answer from
/// [`Health::readiness`] on every request without I/O.
///
/// Who keeps it current: the node's heartbeat (every second) sets `postgres`; the NATS
/// client tracks its connection; the node sets `roles_running` once its roles have started
/// and clears it while they stop or restart (after the node was declared dead it restarts
/// them under a new id), and sets `draining` on SIGTERM/SIGINT. Each role's loop (worker,
/// relay, coordinator, api, signals) marks itself running while its task runs
/// ([`Health::track`]), so the admin port's `/readyz` can name the one that stopped.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    node: Mutex<Option<NodeId>>,
    registrations: AtomicU64,
    postgres: AtomicBool,
    bus: OnceLock<Bus>,
    /// For the admin port's active checks (a round trip, the applied migrations).
    store: OnceLock<Store>,
    roles_running: AtomicBool,
    draining: AtomicBool,
    /// Each loop the node started, and whether its task still runs.
    loops: Mutex<BTreeMap<&'static str, bool>>,
}

/// A snapshot of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// The id the node runs under now (`None` before it first registered). It changes when
    /// the node re-registers after being declared dead.
    pub node: Option<NodeId>,
    /// How many ids the node has registered under (1 for a node never declared dead).
    pub registrations: u64,
    /// The last heartbeat (or registration) reached Postgres.
    pub postgres: bool,
    /// The NATS connection is up.
    pub nats: bool,
    /// The node's roles run (false while starting, restarting under a new id, or stopping).
    pub roles_running: bool,
    /// The node was told to stop and drains.
    pub draining: bool,
}

impl Readiness {
    /// Ready to take work: both dependencies reachable, roles running, not draining.
    pub fn is_ready(&self) -> bool {
        self.postgres && self.nats && self.roles_running && !self.draining
    }
}

impl Health {
    /// The current state; no I/O.
    pub fn readiness(&self) -> Readiness {
        let inner = &self.inner;
        Readiness {
            node: inner.node.lock().ok().and_then(|node| *node),
            registrations: inner.registrations.load(Ordering::Relaxed),
            postgres: inner.postgres.load(Ordering::Relaxed),
            nats: inner.bus.get().is_some_and(Bus::is_connected),
            roles_running: inner.roles_running.load(Ordering::Relaxed),
            draining: inner.draining.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_bus(&self, bus: &Bus) {
        let _ = self.inner.bus.set(bus.clone());
    }

    /// The NATS connection, once the node made it.
    pub(crate) fn bus(&self) -> Option<&Bus> {
        self.inner.bus.get()
    }

    pub(crate) fn set_store(&self, store: &Store) {
        let _ = self.inner.store.set(store.clone());
    }

    /// The Postgres pool, once the node connected it.
    pub(crate) fn store(&self) -> Option<&Store> {
        self.inner.store.get()
    }

    /// Each loop the node started (`worker`, `relay`, `coordinator`, `api`, `signals`) and
    /// whether it runs now.
    pub fn loops(&self) -> BTreeMap<&'static str, bool> {
        self.inner
            .loops
            .lock()
            .map(|loops| loops.clone())
            .unwrap_or_default()
    }

    /// Runs `task`, the loop of `name`, marking it running until it returns.
    pub(crate) async fn track<T>(&self, name: &'static str, task: impl Future<Output = T>) -> T {
        self.set_loop(name, true);
        let out = task.await;
        self.set_loop(name, false);
        out
    }

    fn set_loop(&self, name: &'static str, running: bool) {
        if let Ok(mut loops) = self.inner.loops.lock() {
            loops.insert(name, running);
        }
    }

    pub(crate) fn registered(&self, node: NodeId) {
        if let Ok(mut current) = self.inner.node.lock() {
            *current = Some(node);
        }
        self.inner.registrations.fetch_add(1, Ordering::Relaxed);
        self.inner.postgres.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_postgres(&self, reachable: bool) {
        self.inner.postgres.store(reachable, Ordering::Relaxed);
    }

    pub(crate) fn set_roles_running(&self, running: bool) {
        self.inner.roles_running.store(running, Ordering::Relaxed);
    }

    pub(crate) fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_ready_only_with_both_dependencies_and_its_roles_and_not_draining() {
        let health = Health::default();
        let fresh = health.readiness();
        assert!(!fresh.is_ready());
        assert_eq!((fresh.node, fresh.registrations), (None, 0));
        let node = NodeId::new();
        health.registered(node);
        health.set_roles_running(true);
        let mut readiness = health.readiness();
        assert_eq!(readiness.node, Some(node));
        assert!(readiness.postgres && readiness.roles_running);
        assert!(!readiness.nats, "no bus yet");
        readiness.nats = true;
        assert!(readiness.is_ready());
        readiness.draining = true;
        assert!(!readiness.is_ready());
        health.set_postgres(false);
        assert!(!health.readiness().postgres);
    }

    #[tokio::test]
    async fn a_tracked_loop_runs_until_its_task_returns() {
        let health = Health::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tracked = health.clone();
        let task = tokio::spawn(async move {
            tracked
                .track("worker", async {
                    let _ = stopped.await;
                })
                .await;
        });
        while health.loops().get("worker") != Some(&true) {
            tokio::task::yield_now().await;
        }
        let _ = stop.send(());
        task.await
            .expect("invariant: the tracked task does not panic");
        assert_eq!(health.loops().get("worker"), Some(&false));
    }
}
