//! Start-and-wait: a request that starts an instance with `?wait=` is answered when the
//! instance ends, pushed by the commit that ends it (Postgres `NOTIFY`, see
//! [`Store::listen_instance_ends`]), or when the wait lapses. No polling while the
//! announcements flow; if the listening connection breaks, every waiter looks again, and each
//! also looks once a second whatever happens, so a lost announcement only delays an answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use drover_core::backoff::Backoff;
use drover_core::{InstanceId, InstanceState};
use drover_store::{Instance, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// The longest a request may wait for its instance.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// How often a waiter looks at its instance even without an announcement.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// Who waits for which instance. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct EndWatch {
    waiters: Arc<Mutex<HashMap<InstanceId, Arc<Notify>>>>,
}

/// Does a waiter stop waiting for an instance in `state`?
pub fn has_ended(state: InstanceState) -> bool {
    state.is_terminal() || state == InstanceState::InError
}

impl EndWatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Listens for instance ends until `shutdown`, waking their waiters. Never fails: a lost
    /// connection wakes every waiter (to look again) and is retried with back-off.
    pub async fn run(self, store: Store, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let listened = tokio::select! {
                () = shutdown.cancelled() => return,
                listened = self.listen(&store) => listened,
            };
            // The connection broke (or never came): announcements may have been missed.
            self.wake_all();
            let failure = backoff.failed();
            if let Err(err) = listened {
                if failure.first {
                    tracing::warn!(%err, "cannot listen for instance ends; waiters poll meanwhile");
                } else {
                    tracing::debug!(%err, "listening for instance ends failed again");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(failure.delay) => {}
            }
        }
    }

    /// One listening connection's life: returns when it breaks.
    async fn listen(&self, store: &Store) -> Result<()> {
        let mut listener = store.listen_instance_ends().await?;
        loop {
            match listener.next().await? {
                Some(id) => self.wake(id),
                None => return Ok(()),
            }
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Arc<Notify>>> {
        // A poisoned lock only means a panic elsewhere while holding it: the map is intact.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self, id: InstanceId) {
        if let Some(notify) = self.waiters().get(&id) {
            notify.notify_one();
        }
    }

    fn wake_all(&self) {
        for notify in self.waiters().values() {
            notify.notify_one();
        }
    }

    /// Waits up to `wait` for `id` to end; returns it as it is then (ended or not), or `None`
    /// if it does not exist.
    pub async fn wait_for_end(
        &self,
        store: &Store,
        id: InstanceId,
        wait: Duration,
    ) -> Result<Option<Instance>> {
        let deadline = tokio::time::Instant::now() + wait;
        let notify = Arc::clone(self.waiters().entry(id).or_default());
        let _registered = Registered { watch: self, id };
        loop {
            // Registered before looking: an end committed after this read is announced to us.
            let Some(instance) = store.get_instance(id).await? else {
                return Ok(None);
            };
            if has_ended(instance.state) || tokio::time::Instant::now() >= deadline {
                return Ok(Some(instance));
            }
            let look_again = (tokio::time::Instant::now() + LOOK_AGAIN).min(deadline);
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep_until(look_again) => {}
            }
        }
    }
}

/// Unregisters a waiter when its request ends (answered, failed or cancelled).
struct Registered<'a> {
    watch: &'a EndWatch,
    id: InstanceId,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.watch.waiters().remove(&self.id);
    }
}
