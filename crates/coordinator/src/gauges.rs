//! Cluster-wide gauges the leader samples for Prometheus (every node exports only its own
//! counters; these describe the cluster, so exactly one node — the leader — sets them).

use drover_bus::Bus;
use drover_store::{LeaderTerm, Store};

use crate::Result;

/// Sets the cluster gauges: instances per state, each limited campaign's permits in use,
/// limit and queue, the outbox relay's backlog and lag, the leader's term, and the jobs waiting
/// in each served queue.
pub(crate) async fn sample(store: &Store, bus: &Bus, term: LeaderTerm) -> Result<()> {
    for (state, n) in store.count_by_state().await? {
        metrics::gauge!("drover_instances", "state" => state.as_str()).set(n as f64);
    }
    for campaign in store.list_campaigns().await? {
        let Some(limit) = campaign.max_running else {
            continue;
        };
        let name = campaign.name.clone();
        metrics::gauge!("drover_campaign_permits_in_use", "campaign" => name.clone())
            .set(f64::from(campaign.running));
        metrics::gauge!("drover_campaign_permits_limit", "campaign" => name.clone())
            .set(f64::from(limit));
        metrics::gauge!("drover_campaign_queued_instances", "campaign" => name)
            .set(f64::from(campaign.queued));
    }
    let (backlog, lag) = store.relay_backlog().await?;
    metrics::gauge!("drover_outbox_backlog_events").set(backlog as f64);
    metrics::gauge!("drover_outbox_relay_lag_seconds").set(lag);
    metrics::gauge!("drover_leader_term").set(term.0 as f64);
    for queue in store.served_queues().await? {
        // Best effort: a NATS user without the right to look (an older configuration) only
        // leaves the gauge out.
        let (pending, unsettled) = match bus.pending_jobs(&queue).await {
            Ok(counts) => counts,
            Err(err) => {
                tracing::debug!(%err, %queue, "cannot sample the queue's pending jobs");
                continue;
            }
        };
        metrics::gauge!("drover_jobs_pending", "queue" => queue.as_str().to_owned())
            .set(pending as f64);
        metrics::gauge!("drover_jobs_unsettled", "queue" => queue.as_str().to_owned())
            .set(unsettled as f64);
    }
    Ok(())
}
