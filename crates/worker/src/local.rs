//! Starts on the node that received them: the api of a process that also runs a worker creates
//! the instances of a small start already claimed by this node (see
//! [`Store::create_instances_claiming`](drover_store::Store::create_instances_claiming)) and
//! hands them here, so their first step runs at once — no job round trip through NATS, no
//! claim statement. Only while the worker has free capacity, is not draining and its node can
//! heartbeat (as any claim); otherwise the api publishes their jobs as usual.

use std::sync::{Arc, PoisonError, RwLock};

use drover_core::NodeId;
use drover_store::Claimed;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::commit::Done;
use crate::{ClaimGate, Runner};

/// The running worker of this process, as the api sees it. Cheap to clone (shared); empty
/// while no worker runs (before it starts, between two registrations of the node, after it
/// drained).
#[derive(Clone, Default)]
pub struct LocalStarts(Arc<RwLock<Option<Slot>>>);

#[derive(Clone)]
pub(crate) struct Slot {
    pub(crate) node: NodeId,
    pub(crate) runner: Runner,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) done_tx: mpsc::WeakSender<Done>,
    pub(crate) gate: ClaimGate,
    pub(crate) shutdown: CancellationToken,
}

/// Room for up to [`Reservation::len`] steps on this node's worker, held until the instances
/// claimed for it are started (the rest is given back when it drops).
pub struct Reservation {
    slot: Slot,
    permit: OwnedSemaphorePermit,
    done_tx: mpsc::Sender<Done>,
}

impl std::fmt::Debug for LocalStarts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalStarts")
    }
}

impl LocalStarts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for up to `max` steps now, if the worker runs, can claim and has any free.
    pub fn reserve(&self, max: usize) -> Option<Reservation> {
        let slot = self
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        if max == 0 || slot.shutdown.is_cancelled() || !slot.gate.is_open() {
            return None;
        }
        let done_tx = slot.done_tx.upgrade()?;
        let free = slot.permits.available_permits().min(max);
        let permit = Arc::clone(&slot.permits)
            .try_acquire_many_owned(u32::try_from(free).ok().filter(|&n| n > 0)?)
            .ok()?;
        Some(Reservation {
            slot,
            permit,
            done_tx,
        })
    }

    pub(crate) fn install(&self, slot: Slot) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(slot);
    }

    pub(crate) fn clear(&self) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Reservation {
    /// The node the instances must be claimed for.
    pub fn node(&self) -> NodeId {
        self.slot.node
    }

    /// How many steps it has room for.
    pub fn len(&self) -> usize {
        self.permit.num_permits()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs the first step of each of `claimed` (claimed for [`Reservation::node`]).
    pub fn start(mut self, claimed: Vec<Claimed>) {
        self.slot
            .runner
            .stats
            .claimed
            .fetch_add(claimed.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for instance in claimed {
            let Some(permit) = self.permit.split(1) else {
                // The store claims at most `len()`; one more is left to recovery, as a claim
                // whose node never ran it.
                tracing::error!(instance.id = %instance.id, "invariant: more instances claimed than reserved; left for recovery");
                continue;
            };
            self.slot
                .runner
                .start(instance, None, permit, self.done_tx.clone());
        }
    }
}
