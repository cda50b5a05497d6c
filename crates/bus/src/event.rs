//! Events as JSON CloudEvents (structured mode).

use chrono::Utc;
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
