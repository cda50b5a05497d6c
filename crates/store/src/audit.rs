//! Audit rows for operator actions on things that are not instances (campaigns, workflows,
//! schedules), with their campaign events, written in the action's own transaction.

use drover_core::event::EventKind;
use serde_json::{Value, json};

use crate::Result;
use crate::facts::insert_campaign_fact;

/// Writes an `audit` row: `actor` did `action` to `target`, with `details`.
pub(crate) async fn insert_audit(
    tx: &mut sqlx::PgConnection,
    actor: &str,
    action: &str,
    target: &str,
    details: Value,
) -> Result<()> {
    sqlx::query("INSERT INTO audit (actor, action, target, details) VALUES ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(details)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What an operator did to a schedule: the audit action is `schedule.<verb>`, the
/// `schedule_changed` event's `action` the past tense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScheduleChange {
    Create,
    Update,
    Delete,
    Pause,
    Unpause,
}

impl ScheduleChange {
    fn verb(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Pause => "pause",
            Self::Unpause => "unpause",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Self::Create => "created",
            Self::Update => "updated",
            Self::Delete => "deleted",
            Self::Pause => "paused",
            Self::Unpause => "unpaused",
        }
    }
}

/// The audit row (`schedule.create`, …, target the schedule's name) and the `schedule_changed`
/// event (of `campaign`, the schedule's) of an operator's change to schedule `schedule`.
pub(crate) async fn schedule_changed(
    tx: &mut sqlx::PgConnection,
    change: ScheduleChange,
    actor: &str,
    schedule: &str,
    workflow: &str,
    campaign: &str,
    mut details: Value,
) -> Result<()> {
    if let Value::Object(map) = &mut details {
        map.insert("workflow".to_owned(), json!(workflow));
        map.insert("campaign".to_owned(), json!(campaign));
    }
    let note = details.get("note").cloned();
    insert_audit(
        tx,
        actor,
        &format!("schedule.{}", change.verb()),
        schedule,
        details,
    )
    .await?;
    insert_campaign_fact(
        tx,
        campaign,
        EventKind::ScheduleChanged,
        json!({
            "schedule": schedule,
            "workflow": workflow,
            "action": change.done(),
            "actor": actor,
            "note": note,
        }),
    )
    .await
}
