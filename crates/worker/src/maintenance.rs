//! The technical workflows shipped with Drover (issue 13) and the built-in maintenance
//! handlers they call. Every worker registers the handlers ([`Handlers::add_maintenance`]), so
//! the workflows run as ordinary instances: journaled, explained by `why`, recovered like any
//! other. `drover migrate` installs the definitions and their schedules
//! ([`install_technical_workflows`]).
//!
//! - `system-cleanup` (daily 04:00 UTC), handler `system.cleanup`: deletes finished instances
//!   past retention (the campaign's, else the workflow's `retention` variable: the cluster
//!   default), then relayed events past the replay window, then the rows of nodes gone past
//!   their retention, in batches of `batch_size` rows, each its own short transaction, with
//!   `batch_pause` between them. One step works for at most `step_budget` and hands its cursor
//!   to the next through the instance's variables, so a long cleanup is a loop of journaled
//!   steps, each re-runnable after a crash (a batch re-run finds its rows gone).
//! - `system-paused-instances` (Mondays 05:00 UTC), handler `system.paused-instances`: a
//!   `paused_too_long` event and a log line for each instance paused longer than `warn_after`;
//!   past `stop_after`, those whose workflow's severity is `normal` are stopped (audited, with
//!   the reason); `production` and `critical` ones are only warned about.

use std::time::{Duration, Instant};

use drover_bus::Bus;
use drover_core::schedule::OverlapPolicy;
use drover_core::{Definition, Severity};
use drover_store::{
    CadenceSpec, DEFAULT_CATCHUP_WINDOW, FinishedCursor, LifecycleAction, NewSchedule,
    PausedAction, Store,
};
use serde_json::{Value, json};

use crate::handler::{HandlerInput, Handlers, StepError};

/// The handler of the cleanup workflow's steps.
pub const CLEANUP_HANDLER: &str = "system.cleanup";
/// The handler of the paused-instances workflow's step.
pub const PAUSED_HANDLER: &str = "system.paused-instances";
/// Who the paused-instances check acts as (audit rows, events, the journal).
pub const PAUSED_ACTOR: &str = "system-paused-instances";

/// A technical workflow as shipped: its definition and when its schedule fires by default.
#[derive(Clone, Copy, Debug)]
pub struct TechnicalWorkflow {
    /// The workflow's and its schedule's name.
    pub name: &'static str,
    pub source: &'static str,
    /// 5-field cron, UTC.
    pub cron: &'static str,
}

/// The technical workflows `drover migrate` installs.
pub const TECHNICAL_WORKFLOWS: [TechnicalWorkflow; 2] = [
    TechnicalWorkflow {
        name: "system-cleanup",
        source: include_str!("../technical/system-cleanup.yaml"),
        cron: "0 4 * * *",
    },
    TechnicalWorkflow {
        name: "system-paused-instances",
        source: include_str!("../technical/system-paused-instances.yaml"),
        cron: "0 5 * * 1",
    },
];

/// What installing one technical workflow did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub name: &'static str,
    pub version: i32,
    /// A new version was deployed (the shipped one differs from the latest).
    pub deployed: bool,
    /// Its schedule was created (it did not exist: an existing one is left as the operator
    /// set it).
    pub scheduled: bool,
}

/// Deploys the technical workflows (a no-op for a version already deployed) and creates their
/// schedules when missing; never changes an existing schedule, so an operator's re-timing,
/// pause or variables survive every `drover migrate`.
pub async fn install_technical_workflows(store: &Store) -> Result<Vec<Installed>, String> {
    let mut installed = Vec::new();
    for shipped in TECHNICAL_WORKFLOWS {
        let definition = Definition::parse(shipped.source)
            .map_err(|e| format!("invariant: the shipped {} is valid: {e}", shipped.name))?;
        let deployed = store
            .deploy_definition(shipped.name, &definition.to_json(), shipped.source)
            .await
            .map_err(|e| format!("deploying {}: {e}", shipped.name))?;
        let schedule = NewSchedule {
            name: shipped.name.to_owned(),
            workflow: shipped.name.to_owned(),
            campaign: "default".to_owned(),
            vars: json!({}),
            cadence: CadenceSpec::Cron {
                expr: shipped.cron.to_owned(),
                timezone: "UTC".to_owned(),
            },
            overlap: OverlapPolicy::Skip,
            catchup_window: DEFAULT_CATCHUP_WINDOW,
            jitter: Duration::ZERO,
            start_at: None,
            end_at: None,
        };
        let scheduled = match store.create_schedule(&schedule, "drover migrate").await {
            Ok(_) => true,
            Err(drover_store::Error::ScheduleExists(_)) => false,
            Err(e) => return Err(format!("scheduling {}: {e}", shipped.name)),
        };
        installed.push(Installed {
            name: shipped.name,
            version: deployed.version,
            deployed: deployed.created,
            scheduled,
        });
    }
    Ok(installed)
}

impl Handlers {
    /// Registers the built-in maintenance handlers ([`CLEANUP_HANDLER`], [`PAUSED_HANDLER`]),
    /// working on `store`; `bus` publishes the jobs of instances a stop admits.
    pub fn add_maintenance(&mut self, store: Store, bus: Bus) {
        let cleanup_store = store.clone();
        self.insert(CLEANUP_HANDLER, move |input: HandlerInput| {
            let store = cleanup_store.clone();
            async move { cleanup(&store, &input.input).await }
        });
        self.insert(PAUSED_HANDLER, move |input: HandlerInput| {
            let store = store.clone();
            let bus = bus.clone();
            async move { paused_instances(&store, &bus, &input.input).await }
        });
    }
}

fn store_error(err: drover_store::Error) -> StepError {
    if err.is_transient() {
        StepError::Retryable(err.to_string())
    } else {
        StepError::Permanent(err.to_string())
    }
}

/// A duration argument: `"30d"`, `"250ms"`, or whole milliseconds.
fn duration_arg(input: &Value, key: &str, default: Duration) -> Result<Duration, StepError> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) => humantime::parse_duration(s)
            .map_err(|e| StepError::Permanent(format!("input {key:?}: {s:?}: {e}"))),
        Some(Value::Number(n)) => n.as_u64().map(Duration::from_millis).ok_or_else(|| {
            StepError::Permanent(format!("input {key:?}: {n} is not whole milliseconds"))
        }),
        Some(other) => Err(StepError::Permanent(format!(
            "input {key:?}: expected a duration such as \"30d\", found {other}"
        ))),
    }
}

fn batch_arg(input: &Value) -> Result<i64, StepError> {
    match input.get("batch_size") {
        None | Some(Value::Null) => Ok(1000),
        Some(v) => v
            .as_i64()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| {
                StepError::Permanent(format!(
                    "input \"batch_size\": {v} is not a whole number from 1 to 100000"
                ))
            }),
    }
}

/// Which part of the cleanup a run is in; carried between steps in `vars.cursor`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
enum Cursor {
    /// Not started: the finished instances of the first campaign come first.
    #[default]
    Instances,
    /// Finished instances of the campaign of id `campaign` (or the next one), after `after`.
    InstancesOf {
        campaign: i64,
        after: Option<FinishedCursor>,
    },
    Outbox,
    Nodes,
    Done,
}

/// Deletion counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Deleted {
    #[serde(default)]
    instances: u64,
    #[serde(default)]
    journal: u64,
    #[serde(default)]
    signals: u64,
    #[serde(default)]
    events: u64,
    #[serde(default)]
    outbox: u64,
    #[serde(default)]
    nodes: u64,
}

impl Deleted {
    fn add(&mut self, other: &Deleted) {
        self.instances += other.instances;
        self.journal += other.journal;
        self.signals += other.signals;
        self.events += other.events;
        self.outbox += other.outbox;
        self.nodes += other.nodes;
    }
}

/// One `system.cleanup` step: works through the cursor until done or out of its budget.
async fn cleanup(store: &Store, input: &Value) -> Result<Value, StepError> {
    let retention = duration_arg(input, "retention", Duration::from_secs(30 * 86_400))?;
    let batch_size = batch_arg(input)?;
    let batch_pause = duration_arg(input, "batch_pause", Duration::from_millis(20))?;
    let budget = duration_arg(input, "step_budget", Duration::from_secs(10))?;
    let replay_window = duration_arg(input, "outbox_replay_window", Duration::from_secs(3600))?;
    let node_retention = duration_arg(input, "node_retention", Duration::from_secs(7 * 86_400))?;
    let mut totals: Deleted = match input.get("deleted") {
        None | Some(Value::Null) => Deleted::default(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| StepError::Permanent(format!("input \"deleted\": {e}")))?,
    };
    let mut cursor: Cursor = match input.get("cursor") {
        None | Some(Value::Null) => Cursor::default(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| StepError::Permanent(format!("input \"cursor\": {e}")))?,
    };
    let campaigns = store.campaign_retentions().await.map_err(store_error)?;
    let mut pass = Deleted::default();
    let mut kept = 0;
    let clock = Instant::now();
    let mut first = true;
    while cursor != Cursor::Done && (first || clock.elapsed() < budget) {
        if !first && !batch_pause.is_zero() {
            tokio::time::sleep(batch_pause).await;
        }
        first = false;
        cursor = match cursor {
            Cursor::Instances => match campaigns.first() {
                Some(c) => Cursor::InstancesOf {
                    campaign: c.id.0,
                    after: None,
                },
                None => Cursor::Outbox,
            },
            Cursor::InstancesOf { campaign, after } => {
                let Some(c) = campaigns.iter().find(|c| c.id.0 >= campaign) else {
                    cursor = Cursor::Outbox;
                    continue;
                };
                let after = if c.id.0 == campaign { after } else { None };
                let batch = store
                    .delete_finished_batch(
                        c.id,
                        c.retention.unwrap_or(retention),
                        after,
                        batch_size,
                    )
                    .await
                    .map_err(store_error)?;
                pass.instances += batch.instances;
                pass.journal += batch.journal;
                pass.signals += batch.signals;
                pass.events += batch.events;
                kept += batch.kept;
                if batch.scanned < u64::try_from(batch_size).unwrap_or(0) {
                    Cursor::InstancesOf {
                        campaign: c.id.0 + 1,
                        after: None,
                    }
                } else {
                    Cursor::InstancesOf {
                        campaign: c.id.0,
                        after: batch.cursor,
                    }
                }
            }
            Cursor::Outbox => {
                let n = store
                    .purge_relayed(drover_core::definition::millis(replay_window), batch_size)
                    .await
                    .map_err(store_error)?;
                pass.outbox += n;
                if n < u64::try_from(batch_size).unwrap_or(0) {
                    Cursor::Nodes
                } else {
                    Cursor::Outbox
                }
            }
            Cursor::Nodes => {
                let n = store
                    .prune_nodes(drover_core::definition::millis(node_retention), batch_size)
                    .await
                    .map_err(store_error)?;
                pass.nodes += n;
                if n < u64::try_from(batch_size).unwrap_or(0) {
                    Cursor::Done
                } else {
                    Cursor::Nodes
                }
            }
            Cursor::Done => Cursor::Done,
        };
    }
    totals.add(&pass);
    let more = cursor != Cursor::Done;
    if pass != Deleted::default() || !more {
        tracing::info!(
            instances = pass.instances,
            journal = pass.journal,
            signals = pass.signals,
            events = pass.events,
            outbox = pass.outbox,
            nodes = pass.nodes,
            kept,
            more,
            "cleanup deleted"
        );
    }
    Ok(json!({
        "pass": pass,
        "kept": kept,
        "deleted": totals,
        "cursor": if more { serde_json::to_value(&cursor).unwrap_or(Value::Null) } else { Value::Null },
        "more": more,
    }))
}

/// The `system.paused-instances` step.
async fn paused_instances(store: &Store, bus: &Bus, input: &Value) -> Result<Value, StepError> {
    let warn_after = duration_arg(input, "warn_after", Duration::from_secs(7 * 86_400))?;
    let stop_after = duration_arg(input, "stop_after", Duration::from_secs(30 * 86_400))?;
    let batch_size = batch_arg(input)?;
    let reason = format!(
        "paused longer than {} (stop_after of the system-paused-instances workflow)",
        humantime::format_duration(stop_after)
    );
    let mut after = None;
    let (mut warned, mut stopped) = (Vec::new(), Vec::new());
    loop {
        let page = store
            .paused_longer_than(warn_after, after, batch_size)
            .await
            .map_err(store_error)?;
        let Some(last) = page.last() else { break };
        after = Some((last.paused_at, last.id));
        let full = page.len() == usize::try_from(batch_size).unwrap_or(usize::MAX);
        let found: Vec<_> = page
            .into_iter()
            .map(|p| {
                let action =
                    if p.paused_for >= stop_after && p.severity.stopped_when_paused_too_long() {
                        PausedAction::Stop
                    } else {
                        PausedAction::Warn
                    };
                (p, action)
            })
            .collect();
        for (p, action) in &found {
            let paused_for =
                humantime::format_duration(Duration::from_secs(p.paused_for.as_secs()));
            if p.severity == Severity::Critical {
                tracing::error!(instance.id = %p.id, workflow = %p.workflow, campaign = %p.campaign, severity = %p.severity, %paused_for, action = action.as_str(), "instance paused too long");
            } else {
                tracing::warn!(instance.id = %p.id, workflow = %p.workflow, campaign = %p.campaign, severity = %p.severity, %paused_for, action = action.as_str(), "instance paused too long");
            }
        }
        let written = store
            .record_paused_too_long(&found, &reason, PAUSED_ACTOR)
            .await
            .map_err(store_error)?;
        let to_stop: Vec<_> = found
            .iter()
            .filter(|(p, a)| *a == PausedAction::Stop && written.contains(&p.id))
            .map(|(p, _)| p.id)
            .collect();
        warned.extend(
            found
                .iter()
                .filter(|(p, a)| *a == PausedAction::Warn && written.contains(&p.id))
                .map(|(p, _)| p.id),
        );
        if !to_stop.is_empty() {
            let batch = store
                .apply_lifecycle(LifecycleAction::Stop, &to_stop, PAUSED_ACTOR)
                .await
                .map_err(store_error)?;
            let jobs = batch.jobs();
            if !jobs.is_empty()
                && let Err(err) = bus.publish_jobs(&jobs).await
            {
                // The stale-READY sweeper publishes them again.
                tracing::warn!(%err, "publishing the jobs of instances a stop admitted");
            }
            stopped.extend(to_stop);
        }
        if !full {
            break;
        }
    }
    const LISTED: usize = 100;
    Ok(json!({
        "warned": warned.len(),
        "stopped": stopped.len(),
        "warned_ids": warned.iter().take(LISTED).map(ToString::to_string).collect::<Vec<_>>(),
        "stopped_ids": stopped.iter().take(LISTED).map(ToString::to_string).collect::<Vec<_>>(),
        "warn_after": humantime::format_duration(warn_after).to_string(),
        "stop_after": humantime::format_duration(stop_after).to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_workflows_are_valid_and_name_their_handlers() {
        for shipped in TECHNICAL_WORKFLOWS {
            let definition = Definition::parse(shipped.source).expect("valid");
            assert_eq!(definition.name, shipped.name);
            drover_core::schedule::Cadence::cron(shipped.cron, "UTC").expect("a cron");
        }
        assert!(TECHNICAL_WORKFLOWS[0].source.contains(CLEANUP_HANDLER));
        assert!(TECHNICAL_WORKFLOWS[1].source.contains(PAUSED_HANDLER));
    }

    #[test]
    fn durations_are_read_from_text_or_milliseconds() {
        let input = json!({"a": "30d", "b": 250, "c": "soon", "d": null});
        let default = Duration::from_secs(1);
        assert_eq!(
            duration_arg(&input, "a", default),
            Ok(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            duration_arg(&input, "b", default),
            Ok(Duration::from_millis(250))
        );
        assert!(matches!(
            duration_arg(&input, "c", default),
            Err(StepError::Permanent(_))
        ));
        assert_eq!(duration_arg(&input, "d", default), Ok(default));
        assert_eq!(duration_arg(&input, "e", default), Ok(default));
    }

    #[test]
    fn a_cursor_reads_back_as_written() {
        let cursor = Cursor::InstancesOf {
            campaign: 3,
            after: None,
        };
        let json = serde_json::to_value(&cursor).expect("json");
        assert_eq!(json["phase"], "instances_of");
        assert_eq!(
            serde_json::from_value::<Cursor>(json).expect("a cursor"),
            cursor
        );
    }
}
