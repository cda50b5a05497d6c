//! Whether the worker may claim: closed while its node cannot heartbeat.

use std::sync::Arc;

use tokio::sync::watch;

/// Opens and closes the worker's claiming. A node that cannot renew its heartbeat may be
/// declared dead at any moment, and its instances given to others: it must not take more
/// work until it knows it is still alive. The node's heartbeat closes the gate when a
/// heartbeat fails and opens it when one succeeds; the worker stops pulling jobs while it is
/// closed (steps already running go on: their commits are fenced if the node was declared
/// dead meanwhile). Cheap to clone; open when created.
#[derive(Clone, Debug)]
pub struct ClaimGate {
    open: Arc<watch::Sender<bool>>,
}

impl Default for ClaimGate {
    fn default() -> Self {
        Self {
            open: Arc::new(watch::Sender::new(true)),
        }
    }
}

impl ClaimGate {
    pub fn open(&self) {
        self.open
            .send_if_modified(|open| !std::mem::replace(open, true));
    }

    pub fn close(&self) {
        self.open
            .send_if_modified(|open| std::mem::replace(open, false));
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Waits until the gate is open (at once if it is).
    pub async fn opened(&self) {
        let mut rx = self.open.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|open| *open).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_gate_holds_waiters_until_it_opens() {
        let gate = ClaimGate::default();
        assert!(gate.is_open());
        gate.opened().await;
        gate.close();
        assert!(!gate.is_open());
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "held while closed");
        gate.open();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("released once open")
            .expect("the waiter does not panic");
    }
}
