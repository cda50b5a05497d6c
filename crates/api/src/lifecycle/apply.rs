//! A lifecycle command carried out: by the store, in one transaction per batch, then the
//! jobs of the instances it made READY published.

use std::collections::HashMap;
use std::sync::Arc;

use drover_bus::Bus;
use drover_core::StepJob;
use drover_core::{Definition, InstanceId, InstanceState};
use drover_store::{
    Acted, LifecycleAction, LifecycleBatch, LifecycleChange, LifecycleFilter, Refusal, Restart,
    Restarted,
};

use super::dto::{
    Cascaded, LifecycleCommand, LifecycleFilterRequest, LifecycleResult, LifecycleSummary,
    RefusalEntry,
};
use super::refusal::refused;
use crate::ApiState;
use crate::error::{ApiError, Result, unknown_instance};
use crate::extract::parse_id;
use crate::operator::definition_of;
use tokio_util::sync::CancellationToken;

/// Instances per transaction when a command applies to a filter.
pub const LIFECYCLE_BATCH: i64 = 200;
/// Refusals a filter command lists (it counts them all).
pub(crate) const MAX_LISTED_REFUSALS: usize = 100;

pub(super) async fn one(
    state: &ApiState,
    command: LifecycleCommand,
    id: &str,
    actor: &str,
) -> Result<LifecycleResult> {
    let id = parse_id(id)?;
    let Some(action) = command.action() else {
        return restart_one(state, id, actor).await;
    };
    let batch = apply(state, action, &[id], actor).await?;
    let (outcome, changed, left_in) = match batch.results.first().map(|(_, acted)| acted) {
        None | Some(Acted::Unknown) => return Err(unknown_instance(id)),
        Some(Acted::Refused { state, refusal }) => {
            return Err(refused(command, id, *state, refusal));
        }
        Some(Acted::Unchanged(state)) => ("unchanged".to_owned(), false, *state),
        Some(Acted::Changed(change)) => (change.outcome.as_str().to_owned(), true, change.to),
    };
    if changed {
        tracing::info!(
            instance.id = %id,
            action = action.as_str(),
            %outcome,
            %actor,
            cascaded = batch.cascaded.len(),
            admitted = batch.admitted.len(),
            "lifecycle command applied"
        );
    }
    let instance = state
        .store
        .get_instance(id)
        .await?
        .ok_or_else(|| unknown_instance(id))?;
    Ok(LifecycleResult {
        id,
        action: action.as_str().to_owned(),
        outcome,
        changed,
        state: left_in,
        restarted_as: None,
        cascaded: batch.cascaded.iter().map(cascaded).collect(),
        admitted: batch.admitted.iter().map(|a| a.id).collect(),
        instance: instance.into(),
    })
}

async fn restart_one(state: &ApiState, id: InstanceId, actor: &str) -> Result<LifecycleResult> {
    let mut definitions = HashMap::new();
    let Some(plan) = plan_restart(state, id, &mut definitions).await? else {
        return Err(unknown_instance(id));
    };
    let restarted = restart_all(state, &[plan], actor)
        .await?
        .into_iter()
        .next()
        .map(|(_, restarted)| restarted)
        .unwrap_or(Restarted::Unknown);
    let (new, changed) = match restarted {
        Restarted::Unknown => return Err(unknown_instance(id)),
        Restarted::Refused { state, refusal } => {
            return Err(refused(LifecycleCommand::Restart, id, state, &refusal));
        }
        Restarted::Already { id: new } => (new, false),
        Restarted::Started(change) => {
            tracing::info!(instance.id = %id, restarted_as = %change.id, %actor, "instance restarted");
            (change.id, true)
        }
    };
    let instance = state
        .store
        .get_instance(new)
        .await?
        .ok_or_else(|| unknown_instance(new))?;
    Ok(LifecycleResult {
        id,
        action: "restart".to_owned(),
        outcome: if changed { "restarted" } else { "unchanged" }.to_owned(),
        changed,
        state: instance.state,
        restarted_as: Some(new),
        cascaded: Vec::new(),
        admitted: Vec::new(),
        instance: instance.into(),
    })
}

/// Decides a restart of `id` from its definition version's entry step; `None` for an unknown
/// instance. Whether it may be restarted is the store's to decide, under the row lock.
async fn plan_restart(
    state: &ApiState,
    id: InstanceId,
    definitions: &mut HashMap<(String, i32), Arc<Definition>>,
) -> Result<Option<Restart>> {
    let Some(instance) = state.store.get_instance(id).await? else {
        return Ok(None);
    };
    let key = (instance.workflow.clone(), instance.version);
    let definition = match definitions.get(&key) {
        Some(definition) => Arc::clone(definition),
        None => {
            let definition = Arc::new(definition_of(state, &instance).await?);
            definitions.insert(key, Arc::clone(&definition));
            definition
        }
    };
    let entry = definition.entry();
    Ok(Some(Restart {
        from: id,
        id: InstanceId::new(),
        entry_step: entry.id.clone(),
        allow_retry: entry.allow_retry,
        timeout_ms: entry.timeout_ms(),
        route: definition.route(entry),
    }))
}

pub(super) async fn many(
    state: &ApiState,
    command: LifecycleCommand,
    request: LifecycleFilterRequest,
    actor: &str,
) -> Result<LifecycleSummary> {
    let filter = prepare(state, command, request).await?;
    let (summary, _complete) = by_filter(
        state,
        command,
        &filter,
        actor,
        &mut NoProgress,
        &CancellationToken::new(),
    )
    .await?;
    Ok(summary)
}

/// Checks a filter command's request: a filter given, a known state and campaign.
pub(crate) async fn prepare(
    state: &ApiState,
    command: LifecycleCommand,
    request: LifecycleFilterRequest,
) -> Result<LifecycleFilter> {
    if request.campaign.is_none() && request.workflow.is_none() && request.state.is_none() {
        return Err(ApiError::invalid(
            "invalid_request",
            format!(
                "give at least one of campaign, workflow and state: {} applies to every \
                 instance they select",
                command.as_str()
            ),
        ));
    }
    let instance_state = request
        .state
        .as_deref()
        .map(str::parse::<InstanceState>)
        .transpose()
        .map_err(|err| ApiError::invalid("invalid_request", err.to_string()))?;
    if let Some(campaign) = &request.campaign
        && state.store.campaign_by_name(campaign).await?.is_none()
    {
        return Err(ApiError::not_found(
            "unknown_campaign",
            format!("unknown campaign {campaign:?}"),
        ));
    }
    Ok(LifecycleFilter {
        campaign: request.campaign,
        workflow: request.workflow,
        state: instance_state,
    })
}

/// What a filter command does after each batch.
pub(crate) trait Progress {
    /// Sees the counts so far; answers whether to go on.
    fn after_batch(&mut self, summary: &LifecycleSummary) -> impl Future<Output = bool> + Send;
}

/// Goes on, recording nothing.
struct NoProgress;

impl Progress for NoProgress {
    async fn after_batch(&mut self, _summary: &LifecycleSummary) -> bool {
        true
    }
}

/// Applies `command` to the instances of `filter`, one transaction per
/// [`LIFECYCLE_BATCH`]; `progress` sees the counts after each batch and answers whether to go
/// on. Cancelling `cancel`, or `progress` answering false, stops it between batches (what is
/// done stays done). Answers the counts, and whether it went through every instance.
pub(crate) async fn by_filter(
    state: &ApiState,
    command: LifecycleCommand,
    filter: &LifecycleFilter,
    actor: &str,
    progress: &mut impl Progress,
    cancel: &CancellationToken,
) -> Result<(LifecycleSummary, bool)> {
    let mut summary = LifecycleSummary {
        action: command.as_str().to_owned(),
        ..Default::default()
    };
    let mut definitions = HashMap::new();
    let mut after = None;
    let mut complete = false;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let ids = state
            .store
            .lifecycle_targets(filter, command.action(), after, LIFECYCLE_BATCH)
            .await?;
        let Some(last) = ids.last().copied() else {
            complete = true;
            break;
        };
        after = Some(last);
        summary.matched += ids.len() as u64;
        match command.action() {
            Some(action) => {
                let batch = apply(state, action, &ids, actor).await?;
                summary.cascaded += batch.cascaded.len() as u64;
                summary.admitted += batch.admitted.len() as u64;
                for (id, acted) in &batch.results {
                    tally(&mut summary, command, *id, acted.into());
                }
            }
            None => {
                let mut restarts = Vec::with_capacity(ids.len());
                for id in &ids {
                    if let Some(restart) = plan_restart(state, *id, &mut definitions).await? {
                        restarts.push(restart);
                    }
                }
                for (id, restarted) in &restart_all(state, &restarts, actor).await? {
                    if let Restarted::Started(change) = restarted {
                        summary.started.push(change.id);
                    }
                    tally(&mut summary, command, *id, restarted.into());
                }
            }
        }
        let go_on = progress.after_batch(&summary).await;
        if (ids.len() as i64) < LIFECYCLE_BATCH {
            complete = true;
            break;
        }
        if !go_on {
            break;
        }
    }
    tracing::info!(
        action = command.as_str(),
        matched = summary.matched,
        changed = summary.changed,
        unchanged = summary.unchanged,
        refused = summary.refused,
        admitted = summary.admitted,
        complete,
        %actor,
        "lifecycle command applied by filter"
    );
    Ok((summary, complete))
}

/// What a command did to one instance of a filter, for the counts.
enum Tally<'a> {
    Changed(&'a str),
    Unchanged,
    Refused(InstanceState, &'a Refusal),
    /// Deleted between the listing and the command: not there to act on.
    Gone,
}

impl<'a> From<&'a Acted> for Tally<'a> {
    fn from(acted: &'a Acted) -> Self {
        match acted {
            Acted::Changed(change) => Tally::Changed(change.outcome.as_str()),
            Acted::Unchanged(_) => Tally::Unchanged,
            Acted::Refused { state, refusal } => Tally::Refused(*state, refusal),
            Acted::Unknown => Tally::Gone,
        }
    }
}

impl<'a> From<&'a Restarted> for Tally<'a> {
    fn from(restarted: &'a Restarted) -> Self {
        match restarted {
            Restarted::Started(_) => Tally::Changed("restarted"),
            Restarted::Already { .. } => Tally::Unchanged,
            Restarted::Refused { state, refusal } => Tally::Refused(*state, refusal),
            Restarted::Unknown => Tally::Gone,
        }
    }
}

fn tally(
    summary: &mut LifecycleSummary,
    command: LifecycleCommand,
    id: InstanceId,
    done: Tally<'_>,
) {
    let outcome = match done {
        Tally::Changed(outcome) => {
            summary.changed += 1;
            outcome
        }
        Tally::Unchanged => {
            summary.unchanged += 1;
            "unchanged"
        }
        Tally::Refused(state, refusal) => {
            summary.refused += 1;
            if summary.refusals.len() < MAX_LISTED_REFUSALS {
                let err = refused(command, id, state, refusal);
                let code = match &err {
                    ApiError::Conflict { code, .. } => (*code).to_owned(),
                    _ => "refused".to_owned(),
                };
                summary.refusals.push(RefusalEntry {
                    id,
                    state,
                    code,
                    message: err.to_string(),
                });
            }
            "refused"
        }
        Tally::Gone => {
            summary.matched = summary.matched.saturating_sub(1);
            return;
        }
    };
    *summary.outcomes.entry(outcome.to_owned()).or_default() += 1;
}

/// Restarts as `restarts` plan and publishes the new READY instances' jobs.
async fn restart_all(
    state: &ApiState,
    restarts: &[Restart],
    actor: &str,
) -> Result<Vec<(InstanceId, Restarted)>> {
    let results = state.store.restart(restarts, actor).await?;
    let jobs = results
        .iter()
        .filter_map(|(_, restarted)| match restarted {
            Restarted::Started(change) => change.job(),
            _ => None,
        })
        .collect();
    publish(&state.bus, jobs).await;
    Ok(results)
}

/// Applies `action` to `ids` and publishes the jobs it made.
async fn apply(
    state: &ApiState,
    action: LifecycleAction,
    ids: &[InstanceId],
    actor: &str,
) -> Result<LifecycleBatch> {
    let batch = state.store.apply_lifecycle(action, ids, actor).await?;
    publish(&state.bus, batch.jobs()).await;
    Ok(batch)
}

async fn publish(bus: &Bus, jobs: Vec<StepJob>) {
    if jobs.is_empty() {
        return;
    }
    if let Err(err) = bus.publish_jobs(&jobs).await {
        tracing::warn!(
            jobs = jobs.len(),
            %err,
            "publishing the jobs of a lifecycle command failed; the sweeper will re-dispatch"
        );
    }
}

fn cascaded(change: &LifecycleChange) -> Cascaded {
    Cascaded {
        id: change.id,
        outcome: change.outcome.as_str().to_owned(),
        state: change.to,
    }
}
