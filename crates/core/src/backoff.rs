//! Waiting out an outage: capped exponential back-off, and knowing when an outage begins and
//! ends so that a loop logs it once (not once per retry).
//!
//! Pure bookkeeping, no I/O and no clock of its own beyond [`Instant`]: the caller sleeps and
//! logs.
//!
//! ```
//! use std::time::Duration;
//! use drover_core::backoff::Backoff;
//!
//! let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
//! let first = backoff.failed();
//! assert!(first.first, "the first failure of an outage is the one to log");
//! assert!(!backoff.failed().first);
//! assert!(backoff.succeeded().is_some(), "the end of the outage is logged too");
//! assert!(backoff.succeeded().is_none());
//! ```

use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One failure's verdict: how long to wait, and whether it began an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Wait this long before the next attempt.
    pub delay: Duration,
    /// This failure began an outage (the previous attempt succeeded, or there was none):
    /// log it; the failures after it until the next success are the same outage.
    pub first: bool,
}

/// The end of an outage: how long it lasted and how many attempts failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub after: Duration,
    pub failures: u64,
}

/// Capped exponential back-off with jitter, and the outage it measures: each failure doubles
/// the delay (from `min`, at most `max`, ±25 % jitter so that many nodes do not retry in step);
/// a success resets it.
///
/// If unsure: `min` 100 ms and `max` 5 s for a loop that waits on Postgres or NATS.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    down_since: Option<Instant>,
    failures: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            next: min,
            down_since: None,
            failures: 0,
        }
    }

    /// An attempt failed: the delay before the next one.
    pub fn failed(&mut self) -> Failure {
        let first = self.down_since.is_none();
        if first {
            self.down_since = Some(Instant::now());
        }
        self.failures += 1;
        let delay = jitter(self.next).min(self.max);
        self.next = self.next.saturating_mul(2).min(self.max);
        Failure { delay, first }
    }

    /// An attempt succeeded: `Some` if it ended an outage (log that once), and the delay
    /// starts from `min` again.
    pub fn succeeded(&mut self) -> Option<Recovered> {
        self.next = self.min;
        let since = self.down_since.take()?;
        let failures = std::mem::take(&mut self.failures);
        Some(Recovered {
            after: since.elapsed(),
            failures,
        })
    }

    /// Is an outage going on (the last attempt failed)?
    pub fn is_down(&self) -> bool {
        self.down_since.is_some()
    }
}

impl Default for Backoff {
    /// 100 ms to 5 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// ±25 %: a random factor from the standard library's per-hasher random keys (no RNG crate).
fn jitter(delay: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    // 0.75 ..= 1.25 in thousandths.
    let factor = 750 + random % 501;
    delay.saturating_mul(u32::try_from(factor).unwrap_or(1000)) / 1000
}

/// An outage seen by several tasks at once (say, every commit of a worker failing while
/// Postgres restarts): the first to fail reports it, the first to succeed reports its end.
/// Shared by reference; no back-off of its own (each task keeps its [`Backoff`]).
#[derive(Debug, Default)]
pub struct SharedOutage {
    /// Failures since the last success; 0 while up.
    failures: AtomicU64,
    since: Mutex<Option<Instant>>,
}

impl SharedOutage {
    /// A task failed: `true` if this began the outage (log it).
    pub fn failed(&self) -> bool {
        let began = self.failures.fetch_add(1, Ordering::AcqRel) == 0;
        if began && let Ok(mut since) = self.since.lock() {
            *since = Some(Instant::now());
        }
        began
    }

    /// A task succeeded: `Some` if this ended an outage (log it).
    pub fn succeeded(&self) -> Option<Recovered> {
        if self.failures.load(Ordering::Acquire) == 0 {
            return None;
        }
        let failures = self.failures.swap(0, Ordering::AcqRel);
        if failures == 0 {
            return None;
        }
        let after = self
            .since
            .lock()
            .ok()
            .and_then(|mut since| since.take())
            .map_or(Duration::ZERO, |since| since.elapsed());
        Some(Recovered { after, failures })
    }

    /// Is an outage going on?
    pub fn is_down(&self) -> bool {
        self.failures.load(Ordering::Acquire) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.failed().delay).collect();
        assert!(delays[0] >= Duration::from_millis(75) && delays[0] <= Duration::from_millis(125));
        assert!(delays[2] >= Duration::from_millis(300) && delays[2] <= Duration::from_millis(500));
        for d in &delays {
            assert!(*d <= Duration::from_secs(1), "capped: {d:?}");
        }
        assert!(delays[7] >= Duration::from_millis(750));
        let recovered = b.succeeded().expect("an outage ended");
        assert_eq!(recovered.failures, 8);
        let again = b.failed();
        assert!(again.first, "a new outage");
        assert!(
            again.delay <= Duration::from_millis(125),
            "reset: {again:?}"
        );
    }

    #[test]
    fn an_outage_is_reported_once_at_each_end() {
        let mut b = Backoff::default();
        assert!(b.succeeded().is_none(), "no outage yet");
        assert!(b.failed().first);
        assert!(b.is_down());
        assert!(!b.failed().first);
        assert!(!b.failed().first);
        assert_eq!(b.succeeded().map(|r| r.failures), Some(3));
        assert!(!b.is_down());
        assert!(b.succeeded().is_none());
    }

    #[test]
    fn a_shared_outage_is_begun_and_ended_by_one_task_each() {
        let outage = SharedOutage::default();
        assert!(outage.succeeded().is_none());
        assert!(outage.failed());
        assert!(!outage.failed());
        assert!(outage.is_down());
        assert_eq!(outage.succeeded().map(|r| r.failures), Some(2));
        assert!(outage.succeeded().is_none());
        assert!(!outage.is_down());
    }
}
