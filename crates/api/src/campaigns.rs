//! Campaigns and their concurrency limits: `POST /v1/campaigns`, `GET /v1/campaigns/{name}`,
//! `PUT /v1/campaigns/{name}/limit` (the listing is `GET /v1/campaigns` in `routes`).
//!
//! A campaign with a limit hands out permits (ARCHITECTURE.md, "Semaphore"): at most
//! `max_running` of its instances hold one, the rest queue in FIFO order. The store does the
//! admitting under the campaign's row lock; this module validates, maps errors, and publishes
//! the jobs of instances a raised limit admitted (after the store's commit).

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use drover_bus::Bus;
use drover_core::ids::is_slug;
use drover_core::{InstanceId, StepJob};
use drover_store::{Admitted, LIMIT_RANGE, NewCampaign, OnErrorPermit};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::dto::Campaign;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiJson, ApiPath, Slug};

/// Create a campaign.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    /// A slug (`[a-z0-9][a-z0-9_-]{0,62}`): it appears in event subjects.
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub name: String,
    /// How many of its instances may run at once (1 to 100000); unlimited when absent. A
    /// campaign created without a limit can never get one (its instances hold no permits).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::dto::optional_integral"
    )]
    #[schema(minimum = 1, maximum = 100000)]
    pub max_running: Option<i64>,
    /// What an instance that goes `in_error` does with its permit: `release` (the default:
    /// the next queued instance starts; the instance re-queues when resumed) or `hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::dto::OnErrorPermitName>)]
    pub on_error_permit: Option<String>,
}

/// Change a campaign's limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLimit {
    /// The new limit (1 to 100000). Raising it admits queued instances at once; lowering it
    /// preempts nobody: no instance is admitted until fewer than the new limit run.
    #[serde(deserialize_with = "crate::dto::integral")]
    #[schema(minimum = 1, maximum = 100000)]
    pub max_running: i64,
}

/// What a limit change did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct LimitChanged {
    pub campaign: Campaign,
    /// The limit before.
    pub previous: i32,
    /// The queued instances the change admitted (a raised limit), in queue order.
    #[schema(value_type = Vec<String>)]
    pub admitted: Vec<InstanceId>,
}

/// Create a campaign, with or without a concurrency limit.
#[utoipa::path(
    post,
    path = "/v1/campaigns",
    tag = "cluster",
    request_body = CreateCampaign,
    responses(
        (status = 201, description = "Created", body = Campaign),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "`campaign_exists`", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "A name that is not a slug, a limit out of range, or an \
            unknown `on_error_permit`", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiJson(request): ApiJson<CreateCampaign>,
) -> Result<(StatusCode, Json<Campaign>)> {
    if !is_slug(&request.name) {
        return Err(ApiError::invalid(
            "invalid_request",
            format!(
                "campaign name {:?} is not a slug ([a-z0-9][a-z0-9_-], at most 63 characters)",
                request.name
            ),
        ));
    }
    let max_running = request.max_running.map(limit).transpose()?;
    let on_error_permit = match request.on_error_permit.as_deref() {
        None => OnErrorPermit::default(),
        Some(policy) => policy
            .parse()
            .map_err(|err: String| ApiError::invalid("invalid_request", err))?,
    };
    let created = state
        .store
        .create_campaign(&NewCampaign {
            name: request.name.clone(),
            max_running,
            on_error_permit,
            actor: actor.clone(),
        })
        .await
        .map_err(campaign_error)?;
    tracing::info!(
        campaign = %created.name,
        max_running = ?created.max_running,
        on_error_permit = %on_error_permit,
        %actor,
        "campaign created"
    );
    Ok((StatusCode::CREATED, Json(created.into())))
}

/// Show a campaign: its limit, how many run and queue, and how long the head of its queue has
/// waited.
#[utoipa::path(
    get,
    path = "/v1/campaigns/{name}",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    responses(
        (status = 200, body = Campaign),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<ApiState>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<Campaign>> {
    match state.store.campaign_status(&name).await? {
        Some(status) => Ok(Json(status.into())),
        None => Err(unknown_campaign(&name)),
    }
}

/// Change a campaign's concurrency limit; takes effect at once.
#[utoipa::path(
    put,
    path = "/v1/campaigns/{name}/limit",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    request_body = SetLimit,
    responses(
        (status = 200, description = "Changed; a raised limit admitted queued instances", body = LimitChanged),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`unlimited_campaign`: created without a limit", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "A limit out of range", body = ErrorBody),
    )
)]
pub(crate) async fn set_limit(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
    ApiJson(request): ApiJson<SetLimit>,
) -> Result<Json<LimitChanged>> {
    let max_running = limit(request.max_running)?;
    let set = state
        .store
        .set_campaign_limit(&name, max_running, &actor)
        .await
        .map_err(campaign_error)?;
    tracing::info!(
        campaign = %name,
        from = set.previous,
        to = max_running,
        admitted = set.admitted.len(),
        %actor,
        "campaign limit changed"
    );
    publish_admitted(&state.bus, &set.admitted).await;
    let status = state
        .store
        .campaign_status(&name)
        .await?
        .ok_or_else(|| unknown_campaign(&name))?;
    Ok(Json(LimitChanged {
        campaign: status.into(),
        previous: set.previous,
        admitted: set.admitted.iter().map(|a| a.id).collect(),
    }))
}

/// A limit from a request: 422 outside [`LIMIT_RANGE`].
fn limit(max_running: i64) -> Result<i32> {
    i32::try_from(max_running)
        .ok()
        .filter(|max| LIMIT_RANGE.contains(max))
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_request",
                format!(
                    "max_running must be between {} and {}, not {max_running}",
                    LIMIT_RANGE.start(),
                    LIMIT_RANGE.end()
                ),
            )
        })
}

pub(crate) fn unknown_campaign(name: &str) -> ApiError {
    ApiError::not_found("unknown_campaign", format!("unknown campaign {name:?}"))
}

/// The store's campaign errors as API errors.
pub(crate) fn campaign_error(err: drover_store::Error) -> ApiError {
    use drover_store::Error;
    match err {
        Error::UnknownCampaign(name) => unknown_campaign(&name),
        Error::CampaignExists(name) => ApiError::Conflict {
            code: "campaign_exists",
            message: format!("campaign {name:?} exists already"),
        },
        Error::UnlimitedCampaign(name) => ApiError::Conflict {
            code: "unlimited_campaign",
            message: format!(
                "campaign {name:?} was created without a limit, so its running instances hold \
                 no permits and a limit cannot be enforced on them; start new instances in a \
                 campaign created with --max-running"
            ),
        },
        err @ (Error::InvalidCampaignName(_) | Error::InvalidLimit(_)) => {
            ApiError::invalid("invalid_request", err.to_string())
        }
        other => other.into(),
    }
}

/// Publishes the jobs of admitted instances (after the admitting commit). A failed publish is
/// logged: the rows are READY, and the sweeper re-dispatches them.
pub(crate) async fn publish_admitted(bus: &Bus, admitted: &[Admitted]) {
    if admitted.is_empty() {
        return;
    }
    let jobs: Vec<StepJob> = admitted.iter().map(Admitted::job).collect();
    if let Err(err) = bus.publish_jobs(&jobs).await {
        tracing::warn!(
            jobs = jobs.len(),
            %err,
            "publishing admitted instances' jobs failed; the sweeper will re-dispatch them"
        );
    }
}
