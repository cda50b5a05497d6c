//! Events as facts: what happened to an instance (or a campaign), written by the store in the
//! transaction of the transition it describes, numbered per instance, and turned into a
//! CloudEvent on its NATS subject only by the bus when it relays it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::InstanceId;

/// What happened: the CloudEvent `type` suffix and the last token of the event's subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Created at its entry step: READY, or QUEUED behind its campaign's limit.
    Started,
    StepCompleted,
    /// The step failed and is run again after a delay.
    StepRetry,
    Completed,
    Failed,
    InError,
    /// Taken back from a dead node (or a stuck one) and made READY again.
    Requeued,
    /// An operator resumed an `in_error` instance (retrying or skipping its step).
    Resumed,
    /// Parked WAITING at a `sleep`, `wait_event` or `subworkflow` step (no worker held).
    Waiting,
    /// WAITING no more: its timer came, its event arrived or its child finished.
    Woken,
    /// PAUSED (keeping its permit): by an operator, or a requested pause took effect.
    Paused,
    /// An operator asked a RUNNING instance to pause once its step finishes.
    PauseRequested,
    /// Unpaused (READY, QUEUED or WAITING again), or a pause request withdrawn.
    Unpaused,
    /// An operator asked a RUNNING instance to stop once its step finishes.
    StopRequested,
    /// STOPPED: by an operator (`stop`, or `kill`: data `mode`), or a requested stop took
    /// effect.
    Stopped,
    /// An operator restarted a finished instance (the new instance has its own `started`).
    Restarted,
    /// Started (or resumed) while its campaign was at its limit: QUEUED.
    Queued,
    /// Given a campaign permit: READY (out of the queue, or on resume).
    Admitted,
    /// Gave its campaign permit back.
    PermitReleased,
    /// The campaign reconciler found a semaphore invariant broken (a campaign event).
    PermitDrift,
    /// Started by a schedule at one of its fire times (data: `schedule`, `fire_at`, `reason`).
    ScheduleFired,
    /// A schedule's fire time passed without an instance: missed beyond its catch-up window,
    /// or its overlap policy said so (a campaign event).
    ScheduleSkipped,
    /// PAUSED longer than the `system-paused-instances` technical workflow's warning threshold
    /// (data: `paused_at`, `paused_for_ms`, `severity`, `action`: `warn` or `stop`).
    PausedTooLong,
    /// An operator created, updated, deleted, paused or unpaused a schedule (data `action`; a
    /// campaign event of the schedule's campaign).
    ScheduleChanged,
    /// An operator paused a campaign: it admits nothing until unpaused (a campaign event).
    CampaignPaused,
    /// An operator unpaused a campaign: its queue is admitted again (a campaign event).
    CampaignUnpaused,
    /// An operator deleted an empty campaign (a campaign event, its last).
    CampaignDeleted,
    /// An operator deleted a workflow, or one version of it (a campaign event of `default`:
    /// a workflow belongs to no campaign).
    WorkflowDeleted,
}

impl EventKind {
    /// Every kind, in the order the contract lists them.
    pub const ALL: [EventKind; 28] = [
        Self::Started,
        Self::Queued,
        Self::Admitted,
        Self::StepCompleted,
        Self::StepRetry,
        Self::Waiting,
        Self::Woken,
        Self::Completed,
        Self::Failed,
        Self::InError,
        Self::Requeued,
        Self::Resumed,
        Self::PauseRequested,
        Self::Paused,
        Self::Unpaused,
        Self::StopRequested,
        Self::Stopped,
        Self::Restarted,
        Self::PermitReleased,
        Self::PermitDrift,
        Self::ScheduleFired,
        Self::ScheduleSkipped,
        Self::PausedTooLong,
        Self::ScheduleChanged,
        Self::CampaignPaused,
        Self::CampaignUnpaused,
        Self::CampaignDeleted,
        Self::WorkflowDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::StepCompleted => "step_completed",
            Self::StepRetry => "step_retry",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::InError => "in_error",
            Self::Requeued => "requeued",
            Self::Resumed => "resumed",
            Self::Waiting => "waiting",
            Self::Woken => "woken",
            Self::Paused => "paused",
            Self::PauseRequested => "pause_requested",
            Self::Unpaused => "unpaused",
            Self::StopRequested => "stop_requested",
            Self::Stopped => "stopped",
            Self::Restarted => "restarted",
            Self::Queued => "queued",
            Self::Admitted => "admitted",
            Self::PermitReleased => "permit_released",
            Self::PermitDrift => "permit_drift",
            Self::ScheduleFired => "schedule_fired",
            Self::ScheduleSkipped => "schedule_skipped",
            Self::PausedTooLong => "paused_too_long",
            Self::ScheduleChanged => "schedule_changed",
            Self::CampaignPaused => "campaign_paused",
            Self::CampaignUnpaused => "campaign_unpaused",
            Self::CampaignDeleted => "campaign_deleted",
            Self::WorkflowDeleted => "workflow_deleted",
        }
    }

    /// Is this an event about a campaign itself (not one instance)?
    pub fn is_campaign_event(self) -> bool {
        matches!(
            self,
            Self::PermitDrift
                | Self::ScheduleSkipped
                | Self::ScheduleChanged
                | Self::CampaignPaused
                | Self::CampaignUnpaused
                | Self::CampaignDeleted
                | Self::WorkflowDeleted
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown event kind {s:?}"))
    }
}

/// What an event is about.
#[derive(Clone, Debug, PartialEq)]
pub enum FactSubject {
    Instance {
        id: InstanceId,
        workflow: String,
        version: i32,
    },
    /// The campaign itself (the fact's `campaign`).
    Campaign,
}

/// An event as the store wrote it: nothing about subjects or envelopes.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    /// Unique; the CloudEvent `id` and the `Nats-Msg-Id`, so a re-relay is deduplicated.
    pub id: Uuid,
    pub subject: FactSubject,
    pub campaign: String,
    /// Per instance (per campaign for campaign events), from 1, without gaps, in the order the
    /// transitions committed.
    pub seq: i64,
    pub kind: EventKind,
    /// The kind's own fields (an object): `state`, `step`, `step_seq`, `actor`, …
    pub data: Value,
    /// The database time of the transaction that wrote it.
    pub time: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_back_from_its_name() {
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
        }
        assert!("nope".parse::<EventKind>().is_err());
    }
}
