//! What becomes of a job message: the one place in the worker that decides between ack, nak,
//! term and a progress ack. The rest of the worker says what happened to a delivery (an
//! [`Outcome`]); [`fate`] maps it to what NATS is told.

use std::time::Duration;

use drover_bus::Fate;

use crate::{JobDelivery, LEAVE_DELAY_MAX};

/// What happened to a delivered job, as far as its message is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done with: its step's checkpoint is committed (or the commit found the instance moved
    /// on: fenced), its claim found the instance past it (stale or duplicate), or, left on
    /// its last delivery, it was published afresh.
    Finished,
    /// Not run here after all — the node cannot heartbeat, the worker stops, the claim or the
    /// commit was given up — so another delivery, soon, goes to whichever worker can.
    Returned,
    /// Delivered to a worker that is draining before it started it: for another worker, now.
    GivenBack,
    /// A job for a handler this worker lacks, on its `delivered`th delivery (1 the first
    /// time): left for a worker that has it, a little later each time round.
    Left { delivered: i64 },
    /// Not a job (undecodable, oversized, an unknown version): never delivered again.
    Garbage,
    /// Its step is still running: the ack wait starts over, so it is not redelivered.
    Running,
}

/// How soon a returned job is delivered again.
const RETURN_DELAY: Duration = Duration::from_secs(1);

/// The fate of a job message whose delivery came to `outcome`.
pub(crate) fn fate(outcome: Outcome) -> Fate {
    match outcome {
        Outcome::Finished => Fate::Ack,
        Outcome::Returned => Fate::Nak(RETURN_DELAY),
        Outcome::GivenBack => Fate::Nak(Duration::ZERO),
        // Doubling from 1 s up to LEAVE_DELAY_MAX, so a job goes round the queue's workers
        // without spinning.
        Outcome::Left { delivered } => {
            let exponent = u32::try_from(delivered.max(1) - 1)
                .unwrap_or(u32::MAX)
                .min(16);
            Fate::Nak(Duration::from_secs(1u64 << exponent).min(LEAVE_DELAY_MAX))
        }
        Outcome::Garbage => Fate::Term,
        Outcome::Running => Fate::Progress,
    }
}

/// Settles `delivery` as its `outcome` says. A settle that fails only means a redelivery
/// (whose claim then fails, or which is run here or elsewhere), so it is not worth more than
/// a debug line: during a NATS outage every one fails.
pub(crate) async fn settle(delivery: &JobDelivery, outcome: Outcome) {
    if let Err(err) = delivery.settle(fate(outcome)).await {
        tracing::debug!(%err, ?outcome, "settling a job message failed; it is redelivered after the ack wait");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_left_job_waits_longer_each_delivery_up_to_the_cap() {
        let delays: Vec<Fate> = [1, 2, 3, 5, 6, 1_000]
            .into_iter()
            .map(|delivered| fate(Outcome::Left { delivered }))
            .collect();
        let secs = |s| Fate::Nak(Duration::from_secs(s));
        assert_eq!(
            delays,
            [secs(1), secs(2), secs(4), secs(16), secs(30), secs(30)]
        );
        assert_eq!(fate(Outcome::Left { delivered: 0 }), secs(1));
    }

    #[test]
    fn every_outcome_has_its_fate() {
        assert_eq!(fate(Outcome::Finished), Fate::Ack);
        assert_eq!(fate(Outcome::Returned), Fate::Nak(RETURN_DELAY));
        assert_eq!(fate(Outcome::GivenBack), Fate::Nak(Duration::ZERO));
        assert_eq!(fate(Outcome::Garbage), Fate::Term);
        assert_eq!(fate(Outcome::Running), Fate::Progress);
    }
}
