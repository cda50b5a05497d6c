//! Stopping a test's nodes before its streams are deleted: a running node provisions deleted
//! streams again (as it must in production), which would leave them behind on the server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The node processes a test spawned, by pid.
#[derive(Clone, Debug, Default)]
pub(crate) struct Spawned(Arc<Mutex<Vec<u32>>>);

impl Spawned {
    pub(crate) fn add(&self, pid: u32) {
        if let Ok(mut pids) = self.0.lock() {
            pids.push(pid);
        }
    }

    /// SIGKILLs those still running — only a process whose environment carries this test's
    /// `DROVER_PREFIX` (so never another process that reuses a pid) — and waits until they
    /// are gone. Linux only (it reads `/proc`); elsewhere it does nothing and the nodes die
    /// when their `NodeProcess` is dropped.
    pub(crate) async fn kill_all(&self, prefix: &str) {
        let pids = self.0.lock().map(|p| p.clone()).unwrap_or_default();
        let marker = format!("DROVER_PREFIX={prefix}");
        let ours: Vec<u32> = pids
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker.as_bytes()))
            })
            .collect();
        for pid in &ours {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = crate::wait_until("the nodes to die", Duration::from_secs(10), || async {
            Ok(ours.iter().all(|pid| !alive(*pid)).then_some(()))
        })
        .await;
    }
}

/// Is `pid` running (not gone, not a zombie)?
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) state …`: the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
