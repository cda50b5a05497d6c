//! Events as JSON CloudEvents (structured mode).

use chrono::Utc;
use drover_core::event::PermitEventKind;
use drover_core::{InstanceId, OutboxEvent};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Subjects;

/// The instance an event is about.
#[derive(Clone, Copy, Debug)]
pub struct InstanceRef<'a> {
    pub id: InstanceId,
    pub campaign: &'a str,
    pub workflow: &'a str,
    pub version: i32,
}

/// What happened; the last subject token and the CloudEvent `type` suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Started,
    StepCompleted,
    StepRetry,
    Completed,
    Failed,
    InError,
    /// Taken back from a dead node (or a stuck one) and made READY again.
    Requeued,
    /// An operator resumed an `in_error` instance (retrying or skipping its step): READY again.
    Resumed,
    /// Parked WAITING at a `sleep`, `wait_event` or `subworkflow` step (no worker held).
    Waiting,
    /// WAITING no more: its timer came, its event arrived or its child finished; READY again.
    Woken,
    /// An operator paused it (PAUSED, keeping its permit), or a requested pause took effect.
    Paused,
    /// An operator asked a RUNNING instance to pause once its step finishes.
    PauseRequested,
    /// An operator unpaused it (READY, QUEUED or WAITING again), or withdrew a pause request.
    Unpaused,
    /// An operator asked a RUNNING instance to stop once its step finishes.
    StopRequested,
    /// STOPPED: by an operator (`stop`, or `kill`: data `mode`), or a requested stop took
    /// effect. Its permit, if it held one, is released.
    Stopped,
    /// An operator restarted a finished instance: a new instance was started from it (this
    /// event is the old instance's; the new one has its own `started`).
    Restarted,
    /// Started (or resumed) while its campaign was at its limit: QUEUED (data `queue_seq`).
    Queued,
    /// Given a campaign permit: READY (out of the queue, or on resume).
    Admitted,
    /// Gave its campaign permit back (finished, stopped, or `in_error` under
    /// `on_error_permit: release`).
    PermitReleased,
    /// The campaign reconciler found a semaphore invariant broken (a campaign event: see
    /// [`Subjects::campaign_event`](crate::Subjects::campaign_event)).
    PermitDrift,
}

impl From<PermitEventKind> for EventKind {
    fn from(kind: PermitEventKind) -> Self {
        match kind {
            PermitEventKind::Queued => EventKind::Queued,
            PermitEventKind::Admitted => EventKind::Admitted,
            PermitEventKind::PermitReleased => EventKind::PermitReleased,
            PermitEventKind::Stopped => EventKind::Stopped,
            PermitEventKind::Paused => EventKind::Paused,
        }
    }
}

impl EventKind {
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
        }
    }
}

pub(crate) fn build(
    subjects: &Subjects,
    instance: &InstanceRef<'_>,
    kind: EventKind,
    data: Value,
) -> OutboxEvent {
    let id = Uuid::now_v7();
    let instance_id = instance.id.to_string();
    let subject = subjects.event(
        instance.campaign,
        instance.workflow,
        &instance_id,
        kind.as_str(),
    );
    let mut data = match data {
        Value::Object(map) => map,
        other => {
            let mut map = serde_json::Map::new();
            map.insert("value".to_owned(), other);
            map
        }
    };
    data.insert("instance".to_owned(), Value::String(instance_id.clone()));
    data.insert(
        "workflow".to_owned(),
        Value::String(instance.workflow.to_owned()),
    );
    data.insert("version".to_owned(), Value::from(instance.version));
    data.insert(
        "campaign".to_owned(),
        Value::String(instance.campaign.to_owned()),
    );
    let payload = json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("drover/{}", subjects.prefix()),
        "type": format!("drover.instance.{}", kind.as_str()),
        "subject": instance_id,
        "time": Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    });
    OutboxEvent {
        id,
        subject,
        payload,
    }
}

/// The CloudEvent of something that happened to a campaign (not to one instance).
pub(crate) fn build_campaign(
    subjects: &Subjects,
    campaign: &str,
    kind: EventKind,
    data: Value,
) -> OutboxEvent {
    let id = Uuid::now_v7();
    let mut data = match data {
        Value::Object(map) => map,
        other => {
            let mut map = serde_json::Map::new();
            map.insert("value".to_owned(), other);
            map
        }
    };
    data.insert("campaign".to_owned(), Value::String(campaign.to_owned()));
    let payload = json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("drover/{}", subjects.prefix()),
        "type": format!("drover.campaign.{}", kind.as_str()),
        "subject": campaign,
        "time": Utc::now().to_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    });
    OutboxEvent {
        id,
        subject: subjects.campaign_event(campaign, kind.as_str()),
        payload,
    }
}
