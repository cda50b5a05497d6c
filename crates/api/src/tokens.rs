//! API tokens: `POST /v1/tokens` (create; the only time a token is shown), `GET /v1/tokens`,
//! `DELETE /v1/tokens/{name}` (revoke). All need the `admin` scope.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use drover_core::Scope;
use drover_store::{ApiToken, BOOTSTRAP_TOKEN, NewToken};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::{Principal, Secret};
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiJson, ApiPath};

/// The longest lifetime a token may be given.
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Create a token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// A slug (`[a-z0-9][a-z0-9_-]{0,62}`), not `bootstrap`: the actor of everything done
    /// with the token.
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub name: String,
    #[schema(value_type = ScopeSchema)]
    pub scope: Scope,
    /// How long the token is valid, e.g. `30d`, `12h`; never expires when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
}

/// A token's scope.
#[derive(ToSchema)]
#[schema(as = Scope)]
#[allow(dead_code)] // documentation only: the wire form is drover_core::Scope's
pub(crate) enum ScopeSchema {
    #[schema(rename = "viewer")]
    Viewer,
    #[schema(rename = "operator")]
    Operator,
    #[schema(rename = "admin")]
    Admin,
}

/// A created token: `token` is shown this once and stored nowhere.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub name: String,
    #[schema(value_type = ScopeSchema)]
    pub scope: Scope,
    pub token: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A token's facts (never the token).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub name: String,
    #[schema(value_type = ScopeSchema)]
    pub scope: Scope,
    /// `active`, `expired` or `revoked`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    /// The token that created it.
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiToken> for TokenInfo {
    fn from(t: ApiToken) -> Self {
        let status = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at.is_some_and(|at| at <= Utc::now()) {
            "expired"
        } else {
            "active"
        };
        Self {
            name: t.name,
            scope: t.scope,
            status: status.to_owned(),
            created_at: t.created_at,
            created_by: t.created_by,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// Create a token; the answer is the only time it is shown.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "cluster",
    request_body = CreateToken,
    responses(
        (status = 201, body = CreatedToken),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "A live token has this name (`token_exists`)", body = ErrorBody),
        (status = 422, description = "A bad name, scope or `expires_in`", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    ApiJson(request): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>)> {
    let expires_at = request.expires_in.as_deref().map(expiry).transpose()?;
    let token = Secret::generate()?;
    let created = state
        .store
        .create_token(&NewToken {
            name: request.name,
            scope: request.scope,
            hash: token.hash(),
            expires_at,
            actor: principal.name.clone(),
        })
        .await
        .map_err(token_error)?;
    tracing::info!(token = %created.name, scope = %created.scope, actor = %principal.name, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            name: created.name,
            scope: created.scope,
            token: token.expose().to_owned(),
            expires_at: created.expires_at,
        }),
    ))
}

fn expiry(text: &str) -> Result<DateTime<Utc>> {
    let invalid = |why: String| ApiError::invalid("invalid_request", why);
    let lifetime = humantime::parse_duration(text)
        .map_err(|err| invalid(format!("expires_in {text:?} is not a duration: {err}")))?;
    if lifetime.is_zero() || lifetime > MAX_LIFETIME {
        return Err(invalid(format!(
            "expires_in must be more than 0 and at most 10 years, not {text:?}"
        )));
    }
    let lifetime = chrono::Duration::from_std(lifetime)
        .map_err(|err| invalid(format!("expires_in {text:?}: {err}")))?;
    Ok(Utc::now() + lifetime)
}

fn token_error(err: drover_store::Error) -> ApiError {
    use drover_store::Error;
    match err {
        Error::TokenExists(_) => ApiError::Conflict {
            code: "token_exists",
            message: err.to_string(),
        },
        Error::InvalidTokenName(_) => ApiError::invalid("invalid_request", err.to_string()),
        other => other.into(),
    }
}

/// List tokens (never the tokens themselves).
#[utoipa::path(get, path = "/v1/tokens", tag = "cluster", responses((status = 200, body = TokenList)))]
pub(crate) async fn list(State(state): State<ApiState>) -> Result<Json<TokenList>> {
    let tokens = state.store.list_tokens().await?;
    Ok(Json(TokenList {
        tokens: tokens.into_iter().map(Into::into).collect(),
    }))
}

/// Revoke a token: it is refused from now on (on other API nodes within 5 s).
#[utoipa::path(
    delete,
    path = "/v1/tokens/{name}",
    tag = "cluster",
    params(("name" = String, Path, description = "The token's name")),
    responses(
        (status = 200, body = TokenInfo),
        (status = 404, description = "Unknown token", body = ErrorBody),
        (status = 409, description = "The bootstrap token lives in the nodes' configuration", body = ErrorBody),
    )
)]
pub(crate) async fn revoke(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<TokenInfo>> {
    if name == BOOTSTRAP_TOKEN {
        return Err(ApiError::Conflict {
            code: "bootstrap_token",
            message: "the bootstrap token is configured on the nodes, not stored: remove \
                      DROVER_ADMIN_TOKEN (or --admin-token-file) from their configuration"
                .to_owned(),
        });
    }
    let revoked = state.store.revoke_token(&name, &principal.name).await?;
    let Some(revoked) = revoked else {
        return Err(ApiError::not_found(
            "not_found",
            format!("unknown token {name:?}"),
        ));
    };
    state.auth.forget(&name);
    tracing::info!(token = %name, actor = %principal.name, "token revoked");
    Ok(Json(revoked.into()))
}
