//! The API's one error type and the JSON every error response carries:
//! `{"error": {"code", "message", "details"?}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use drover_core::{DefinitionErrors, InstanceId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// Everything a request can fail with. Mapped to a response (and logged) in one place, its
/// [`IntoResponse`] impl; callers that are not HTTP handlers (a NATS start handler, the
/// scheduler) match on the variant or ask [`ApiError::status`] / [`ApiError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, a malformed id, a bad query parameter).
    /// `details`, when present, names the field: `[{field, message}]`.
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    /// 401: no token, or one that is unknown, revoked or expired.
    #[error("{message}")]
    Unauthorized { message: String },
    /// 403: the token's scope does not allow the request.
    #[error("{message}")]
    Forbidden { message: String },
    /// 404: the resource in the path, or one the request names, does not exist.
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// 405: the path exists, the method does not.
    #[error("{message}")]
    MethodNotAllowed { message: String },
    /// 409: the request conflicts with the current state of the resource.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// 413: the body exceeds `limit` bytes.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 415: a JSON body without a JSON content type (`application/json` or `…+json`).
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    /// 422: well-formed but invalid (a definition that does not validate, a count out of
    /// range). `details` is machine-readable, e.g. one `{step, field, message}` per problem.
    #[error("{message}")]
    Invalid {
        code: &'static str,
        message: String,
        details: Option<Value>,
    },
    /// 503 when transient, else 500.
    #[error("store: {0}")]
    Store(#[from] drover_store::Error),
    /// 503 when transient, else 500.
    #[error("bus: {0}")]
    Bus(#[from] drover_bus::Error),
    /// 500: a bug or corrupt stored data. The message is shown to the client, so it must not
    /// carry secrets.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// 400 `code` for a path or query parameter (`location`) whose value cannot be used: the
    /// message names it, and `details: [{field, message}]` has its name as `field`.
    pub fn bad_parameter(code: &'static str, location: &str, name: &str, problem: &str) -> Self {
        Self::BadRequest {
            code,
            message: format!("{location} parameter {name:?}: {problem}"),
            details: Some(field_details(name, problem)),
        }
    }

    /// 422 `code` for a request field whose value is well-formed but invalid: the message and
    /// `details: [{field, message}]` name it.
    pub fn invalid_field(code: &'static str, field: &str, problem: &str) -> Self {
        Self::Invalid {
            code,
            message: format!("{field}: {problem}"),
            details: Some(field_details(field, problem)),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized {
            message: message.into(),
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::Forbidden {
            message: message.into(),
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// 422 `invalid_definition`: every problem, one per line, and as `details`.
    pub fn invalid_definition(errors: &DefinitionErrors) -> Self {
        Self::Invalid {
            code: "invalid_definition",
            message: errors.to_string(),
            details: serde_json::to_value(&errors.0).ok(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Store(err) => Self::infra_status(err.is_transient()),
            Self::Bus(err) => Self::infra_status(err.is_transient()),
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn infra_status(transient: bool) -> StatusCode {
        if transient {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }

    /// The stable, machine-readable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. }
            | Self::NotFound { code, .. }
            | Self::Conflict { code, .. }
            | Self::Invalid { code, .. } => code,
            Self::Unauthorized { .. } => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::Store(drover_store::Error::UnknownCampaign(_)) => "unknown_campaign",
            Self::Store(drover_store::Error::UnknownWorkflow(_)) => "unknown_workflow",
            Self::Store(drover_store::Error::UnknownInstance(_)) => "not_found",
            Self::Store(_) | Self::Bus(_) if self.status() == StatusCode::SERVICE_UNAVAILABLE => {
                "unavailable"
            }
            Self::Store(_) | Self::Bus(_) | Self::Internal(_) => "internal",
        }
    }

    /// What the client is told. Infrastructure failures are described in the log only.
    pub(crate) fn public_message(&self) -> String {
        match self {
            Self::Store(
                err @ (drover_store::Error::UnknownCampaign(_)
                | drover_store::Error::UnknownWorkflow(_)
                | drover_store::Error::UnknownInstance(_)),
            ) => err.to_string(),
            Self::Store(_) if self.status() == StatusCode::SERVICE_UNAVAILABLE => {
                "the database is unavailable; try again".to_owned()
            }
            Self::Bus(_) if self.status() == StatusCode::SERVICE_UNAVAILABLE => {
                "the message bus is unavailable; try again".to_owned()
            }
            Self::Store(_) | Self::Bus(_) => {
                "internal error; the server log has the details".to_owned()
            }
            other => other.to_string(),
        }
    }

    fn details(&self) -> Option<&Value> {
        match self {
            Self::BadRequest { details, .. } | Self::Invalid { details, .. } => details.as_ref(),
            _ => None,
        }
    }

    /// The response body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.public_message(),
                details: self.details().cloned(),
            },
        }
    }
}

/// The 404 of an instance id nothing is stored under.
pub(crate) fn unknown_instance(id: InstanceId) -> ApiError {
    ApiError::not_found("not_found", format!("unknown instance {id}"))
}

fn field_details(field: &str, problem: &str) -> Value {
    serde_json::json!([{ "field": field, "message": problem }])
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), code, error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), code, error = %self, "request rejected");
        }
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"drover\""),
            );
        }
        response
    }
}

/// The body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: 400 `invalid_json`, `invalid_id`, `invalid_query`,
    /// `invalid_path`, `invalid_body`, `invalid_event_name`; 401 `unauthorized`; 403
    /// `forbidden`; 404 `not_found`,
    /// `unknown_workflow`, `unknown_campaign`; 405 `method_not_allowed`; 409 `not_in_error`,
    /// `not_deepest`, `end_step`, `no_transition`, `transition_error`, `conflict`,
    /// `instance_finished`, `token_exists`, `bootstrap_token`, `campaign_exists`, `unlimited_campaign`, `not_finished`,
    /// `child_instance`, `in_error`, `stopping`, `finished`, `running`; 413
    /// `payload_too_large`; 415 `unsupported_media_type`; 422 `invalid_request`,
    /// `invalid_definition`; 500 `internal`; 503 `unavailable`.
    pub code: String,
    /// For people; an invalid definition has one problem per line.
    pub message: String,
    /// The fields at fault, when known: `[{field, message}]`, and `step` for
    /// `invalid_definition`. A field is a path into the request (`vars.customer.name`,
    /// `vars.items[2]`) or the name of a path or query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<DefinitionProblem>>)]
    pub details: Option<Value>,
}

/// One problem with a request field, or in a definition (then the schema of
/// `drover_core::DefinitionError`).
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only: the wire form is built where the error is
pub(crate) struct DefinitionProblem {
    /// A definition's step, by id, when the problem is in a step that has one.
    #[schema(required = false)]
    step: Option<String>,
    /// The field: a path into the request body or definition, or a parameter's name.
    field: String,
    message: String,
}
