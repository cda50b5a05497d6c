//! Campaign retention: `GET` and `PUT /v1/campaigns/{name}/retention` (admin scope to change).
//!
//! How long a campaign's finished instances are kept before the `system-cleanup` technical
//! workflow deletes them; without one, the cluster default (that workflow's `retention`
//! variable, `30d` as shipped) applies.

use std::time::Duration;

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiJson, ApiPath, Slug};

/// The longest retention accepted: ten years.
const MAX_RETENTION: Duration = Duration::from_secs(10 * 366 * 86_400);

/// Set (or clear) a campaign's retention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRetention {
    /// How long its finished instances are kept, e.g. `30d`, `12h`; `null`: the cluster
    /// default.
    pub retention: Option<String>,
}

/// A campaign's retention.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Retention {
    pub campaign: String,
    /// `null`: the cluster default (the `system-cleanup` workflow's `retention` variable).
    pub retention: Option<String>,
    pub retention_ms: Option<i64>,
}

impl From<drover_store::CampaignRetention> for Retention {
    fn from(r: drover_store::CampaignRetention) -> Self {
        Retention {
            campaign: r.name,
            retention: r
                .retention
                .map(|d| humantime::format_duration(d).to_string()),
            retention_ms: r.retention.map(drover_core::definition::millis),
        }
    }
}

fn unknown_campaign(name: &str) -> ApiError {
    ApiError::not_found("unknown_campaign", format!("unknown campaign {name:?}"))
}

/// Show how long a campaign's finished instances are kept.
#[utoipa::path(
    get,
    path = "/v1/campaigns/{name}/retention",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    responses(
        (status = 200, body = Retention),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<ApiState>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<Retention>> {
    let all = state.store.campaign_retentions().await?;
    all.into_iter()
        .find(|r| r.name == name)
        .map(|r| Json(r.into()))
        .ok_or_else(|| unknown_campaign(&name))
}

/// Set how long a campaign's finished instances are kept (audited as
/// `campaign.set_retention`); the next `system-cleanup` run applies it.
#[utoipa::path(
    put,
    path = "/v1/campaigns/{name}/retention",
    tag = "cluster",
    params(("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The campaign's name")),
    request_body = SetRetention,
    responses(
        (status = 200, description = "Changed", body = Retention),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "`unknown_campaign`", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "A retention that is not a duration, or over ten years", body = ErrorBody),
    )
)]
pub(crate) async fn set(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
    ApiJson(request): ApiJson<SetRetention>,
) -> Result<Json<Retention>> {
    let retention = match request.retention.as_deref() {
        None => None,
        Some(text) => {
            let d = humantime::parse_duration(text.trim()).map_err(|e| {
                ApiError::invalid(
                    "invalid_request",
                    format!("retention {text:?} is not a duration such as \"30d\": {e}"),
                )
            })?;
            if d > MAX_RETENTION {
                return Err(ApiError::invalid(
                    "invalid_request",
                    format!("retention {text:?} is over ten years"),
                ));
            }
            Some(d)
        }
    };
    let set = state
        .store
        .set_campaign_retention(&name, retention, &actor)
        .await
        .map_err(|err| match err {
            drover_store::Error::UnknownCampaign(name) => unknown_campaign(&name),
            other => other.into(),
        })?;
    tracing::info!(campaign = %name, retention = ?retention, %actor, "campaign retention changed");
    Ok(Json(set.into()))
}
