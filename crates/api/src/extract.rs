//! Extractors whose rejections are [`ApiError`]s, so a malformed request gets the same JSON
//! error body as every other failure instead of axum's plain-text default.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use drover_core::{DefinitionError, DefinitionErrors};
use serde::de::DeserializeOwned;

use crate::MAX_BODY_BYTES;
use crate::error::ApiError;

/// A JSON body; any failure to read or decode it is 400 `invalid_json` (413 when too large).
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        };
    }
    ApiError::bad_request("invalid_json", rejection.body_text())
}

/// A query string; a parameter that does not decode is 400 `invalid_query`.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(&rejection)),
        }
    }
}

fn query_rejection(rejection: &QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", rejection.body_text())
}

/// Path parameters; a segment that does not decode is 400 `invalid_path`.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejection(&rejection)),
        }
    }
}

fn path_rejection(rejection: &PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", rejection.body_text())
}

/// A definition source: the raw body, any content type, UTF-8 text.
pub(crate) struct Source(pub(crate) String);

impl<S> FromRequest<S> for Source
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| bytes_rejection(&r))?;
        match String::from_utf8(bytes.into()) {
            Ok(source) => Ok(Self(source)),
            Err(err) => Err(ApiError::invalid_definition(&DefinitionErrors(vec![
                DefinitionError {
                    step: None,
                    field: "source".to_owned(),
                    message: format!("not UTF-8 text: {}", err.utf8_error()),
                },
            ]))),
        }
    }
}

fn bytes_rejection(rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        };
    }
    ApiError::bad_request("invalid_body", rejection.body_text())
}
