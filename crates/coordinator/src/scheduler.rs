//! Schedules, on the leader: each tick — and between ticks as soon as the earliest schedule
//! is due, so a fire starts well within a second of its time — the leader fires the due
//! schedules through the store (one fire row + its instance per transaction, under the lease
//! term), then publishes the started instances' jobs, and stops or kills the live runs an
//! overlap policy (`cancel_other`, `terminate_other`) displaced. A lost publish only delays an
//! instance: the stale-READY sweeper re-dispatches it.

use std::time::Instant;

use drover_bus::Bus;
use drover_core::NodeId;
use drover_core::StepJob;
use drover_store::{LeaderTerm, LifecycleAction, Store};

use crate::Result;

/// Fire times handled per pass; the rest wait for the next pass (moments later).
const FIRES_PER_PASS: usize = 200;
/// Who the lifecycle commands of an overlap policy are from, in the journal and events.
const ACTOR: &str = "scheduler";

/// Fires what is due as leader under `term`; returns when the next schedule is due.
pub(crate) async fn fire_due(
    store: &Store,
    bus: &Bus,
    node: NodeId,
    term: LeaderTerm,
) -> Result<Option<Instant>> {
    let pass = store.fire_due_schedules(node, term, FIRES_PER_PASS).await?;
    let mut jobs = pass.ready.clone();
    for (action, ids) in [
        (LifecycleAction::Stop, &pass.to_stop),
        (LifecycleAction::Kill, &pass.to_kill),
    ] {
        if ids.is_empty() {
            continue;
        }
        let batch = store.apply_lifecycle(action, ids, ACTOR).await?;
        jobs.extend(batch.jobs());
    }
    publish(bus, &jobs).await?;
    if pass.fired + pass.skipped + pass.buffered > 0 {
        tracing::info!(
            leader.term = %term,
            fired = pass.fired,
            skipped = pass.skipped,
            buffered = pass.buffered,
            stopped = pass.to_stop.len() + pass.to_kill.len(),
            "schedules fired"
        );
    }
    let next = store.next_schedule_due().await?;
    Ok(next.map(|wait| Instant::now() + wait))
}

async fn publish(bus: &Bus, jobs: &[StepJob]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    bus.publish_jobs(jobs).await?;
    Ok(())
}
