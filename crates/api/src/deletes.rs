//! Deleting workflows and campaigns, pausing campaigns: `DELETE /v1/workflows/{name}`,
//! `DELETE /v1/campaigns/{name}`, `POST /v1/campaigns/{name}/{pause,unpause}` (admin scope).
//!
//! The store decides and refuses under its locks (see `drover_store`'s `deletes` module);
//! this module maps its refusals to 409s that name what is in the way, and publishes the jobs
//! of instances an unpause admitted or a `--stop-instances` kill woke (after the commit).

use axum::extract::State;
use axum::{Extension, Json};
use drover_core::InstanceId;
use drover_store::WorkflowDelete;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::auth::Principal;
use crate::campaigns::{campaign_error, publish_admitted};
use crate::dto::Campaign;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiPath, ApiQuery, Slug};

/// `?version=N&stop_instances=true` on `DELETE /v1/workflows/{name}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteWorkflowQuery {
    /// Delete this version only; every version when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(nullable = false)]
    pub version: Option<i32>,
    /// Kill the live instances that use it first (each kill audited with the delete as its
    /// reason) instead of refusing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_instances: bool,
}

/// What a workflow delete did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WorkflowDeletedView {
    pub workflow: String,
    /// The versions deleted.
    pub versions: Vec<i32>,
    /// Live instances killed first (`stop_instances`).
    #[schema(value_type = Vec<String>)]
    pub stopped: Vec<InstanceId>,
}

/// A deleted campaign.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CampaignDeletedView {
    pub deleted: String,
}

/// What a campaign pause or unpause did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct CampaignPauseView {
    pub campaign: Campaign,
    /// False when it was paused (unpaused) already: nothing was done.
    pub changed: bool,
    /// The queued instances an unpause admitted, in queue order.
    #[schema(value_type = Vec<String>)]
    pub admitted: Vec<InstanceId>,
}

/// Delete a workflow, or one version of it. The versions are kept for the instances that ran
/// them (their history stays readable) but start nothing more and are not listed; a new deploy
/// takes the next version number.
#[utoipa::path(
    delete,
    path = "/v1/workflows/{name}",
    tag = "workflows",
    params(
        ("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The workflow's name"),
        DeleteWorkflowQuery
    ),
    responses(
        (status = 200, description = "Deleted", body = WorkflowDeletedView),
        (status = 404, description = "`unknown_workflow`: no such workflow or version (or deleted already)", body = ErrorBody),
        (status = 409, description = "`workflow_in_use`: live instances use it (without \
            `stop_instances`), or a schedule starts it; the message names them", body = ErrorBody),
    )
)]
pub(crate) async fn delete_workflow(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
    ApiQuery(query): ApiQuery<DeleteWorkflowQuery>,
) -> Result<Json<WorkflowDeletedView>> {
    let deleted = state
        .store
        .delete_workflow(&WorkflowDelete {
            workflow: name.clone(),
            version: query.version,
            stop_instances: query.stop_instances,
            actor: actor.clone(),
        })
        .await
        .map_err(delete_error)?;
    tracing::info!(
        workflow = %name,
        versions = ?deleted.versions,
        stopped = deleted.stopped.len(),
        %actor,
        "workflow deleted"
    );
    if !deleted.jobs.is_empty()
        && let Err(err) = state.bus.publish_jobs(&deleted.jobs).await
    {
        tracing::warn!(%err, "publishing jobs after a workflow delete failed; the sweeper re-dispatches them");
    }
    Ok(Json(WorkflowDeletedView {
        workflow: deleted.workflow,
        versions: deleted.versions,
        stopped: deleted.stopped,
    }))
}

/// Delete an empty campaign (nothing live or queued, no schedule starting into it; never
/// `default`). Its finished instances stay readable; creating a campaign of the same name
/// revives it.
#[utoipa::path(
    delete,
    path = "/v1/campaigns/{name}",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    responses(
        (status = 200, description = "Deleted", body = CampaignDeletedView),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`campaign_in_use`: instances live or queued, or schedules \
            start into it; `default_campaign`", body = ErrorBody),
    )
)]
pub(crate) async fn delete_campaign(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<CampaignDeletedView>> {
    state
        .store
        .delete_campaign(&name, &actor)
        .await
        .map_err(delete_error)?;
    tracing::info!(campaign = %name, %actor, "campaign deleted");
    Ok(Json(CampaignDeletedView { deleted: name }))
}

/// Pause a campaign: it admits nothing (new instances and those a freed permit would admit
/// stay queued) until unpaused; instances holding a permit run on.
#[utoipa::path(
    post,
    path = "/v1/campaigns/{name}/pause",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    responses(
        (status = 200, description = "Paused (or paused already: `changed` false)", body = CampaignPauseView),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`unlimited_campaign`: only a campaign with a limit has a \
            queue to hold its instances in", body = ErrorBody),
    )
)]
pub(crate) async fn pause_campaign(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<CampaignPauseView>> {
    let change = state
        .store
        .pause_campaign(&name, &actor)
        .await
        .map_err(pause_error)?;
    tracing::info!(campaign = %name, changed = change.changed, %actor, "campaign paused");
    Ok(Json(pause_view(change)))
}

/// Unpause a campaign: the head of its queue is admitted at once, in FIFO order, up to its
/// limit.
#[utoipa::path(
    post,
    path = "/v1/campaigns/{name}/unpause",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    responses(
        (status = 200, description = "Unpaused (or not paused: `changed` false)", body = CampaignPauseView),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`unlimited_campaign`", body = ErrorBody),
    )
)]
pub(crate) async fn unpause_campaign(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<CampaignPauseView>> {
    let change = state
        .store
        .unpause_campaign(&name, &actor)
        .await
        .map_err(pause_error)?;
    tracing::info!(
        campaign = %name,
        changed = change.changed,
        admitted = change.admitted.len(),
        %actor,
        "campaign unpaused"
    );
    publish_admitted(&state.bus, &change.admitted).await;
    Ok(Json(pause_view(change)))
}

fn pause_view(change: drover_store::CampaignPauseChange) -> CampaignPauseView {
    CampaignPauseView {
        campaign: change.campaign.into(),
        changed: change.changed,
        admitted: change.admitted.iter().map(|a| a.id).collect(),
    }
}

fn pause_error(err: drover_store::Error) -> ApiError {
    match err {
        drover_store::Error::UnlimitedCampaign(name) => ApiError::Conflict {
            code: "unlimited_campaign",
            message: format!(
                "campaign {name:?} has no limit, so it has no queue to hold instances in and \
                 cannot be paused; pause its instances (`drover pause --campaign {name}`) or use \
                 a campaign created with --max-running"
            ),
        },
        other => campaign_error(other),
    }
}

/// The store's delete refusals as API errors.
fn delete_error(err: drover_store::Error) -> ApiError {
    use drover_store::Error;
    match err {
        Error::UnknownWorkflow(_) | Error::UnknownVersion { .. } => {
            ApiError::not_found("unknown_workflow", err.to_string())
        }
        Error::WorkflowLive { .. } | Error::WorkflowScheduled { .. } => ApiError::Conflict {
            code: "workflow_in_use",
            message: err.to_string(),
        },
        Error::CampaignNotEmpty { .. } | Error::CampaignScheduled { .. } => ApiError::Conflict {
            code: "campaign_in_use",
            message: err.to_string(),
        },
        Error::DefaultCampaign => ApiError::Conflict {
            code: "default_campaign",
            message: err.to_string(),
        },
        other => campaign_error(other),
    }
}
