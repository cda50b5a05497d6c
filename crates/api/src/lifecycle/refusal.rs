//! What a command the instance's state does not allow answers: a 409 naming why, and what to
//! do instead.

use drover_core::InstanceId;
use drover_core::InstanceState;
use drover_store::Refusal;

use super::dto::LifecycleCommand;
use crate::error::ApiError;

/// The 409 of a command the instance's state does not allow.
pub(super) fn refused(
    command: LifecycleCommand,
    id: InstanceId,
    state: InstanceState,
    refusal: &Refusal,
) -> ApiError {
    let action = command.as_str();
    let (code, message) = match refusal {
        Refusal::Finished => (
            "finished",
            format!(
                "cannot {action} instance {id}: it has finished ({state}); only restart applies \
                 to a finished instance (`drover restart {id}`)"
            ),
        ),
        Refusal::InError => (
            "in_error",
            format!(
                "cannot {action} instance {id}: it is in_error and waits for an operator \
                 already; resume it (`drover resume {id} --current-step` or `--next-step`), or \
                 end it (`drover kill {id}`)"
            ),
        ),
        Refusal::Running => (
            "running",
            format!(
                "cannot unpause instance {id}: it is running and no pause is requested \
                 (only a paused instance, or a running one asked to pause, is unpaused)"
            ),
        ),
        Refusal::Stopping { by } => (
            "stopping",
            format!(
                "cannot {action} instance {id}: {by} asked it to stop, which it does when its \
                 step finishes; `drover kill {id}` stops it now"
            ),
        ),
        Refusal::NotFinished => (
            "not_finished",
            format!(
                "cannot restart instance {id}: it is {state}, and only a finished instance is \
                 restarted; stop it first (`drover stop {id}` or `drover kill {id}`)"
            ),
        ),
        Refusal::Child { parent } => (
            "child_instance",
            format!(
                "cannot restart instance {id}: it is a child of instance {parent}, whose \
                 subworkflow step decides about it; restart or resume the parent instead"
            ),
        ),
    };
    ApiError::Conflict { code, message }
}
