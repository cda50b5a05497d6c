//! Extractors whose rejections are [`ApiError`]s, so a malformed request gets the same JSON
//! error body as every other failure instead of axum's plain-text default.
//!
//! They are also where input Postgres cannot store is refused, once for every route: a NUL
//! character (U+0000) is refused by `text` and, escaped as `\u0000`, by `jsonb`, so a string
//! holding one anywhere — a path segment, a query parameter, a JSON string or object key at
//! any depth — is answered 400 (path, query) or 422 (body) naming the field, before a handler
//! runs. JSON numbers need no check: serde_json refuses those no `f64` holds (`1e400`) and
//! every finite `f64` fits `jsonb`'s numeric; lone surrogates (`"\ud800"`) are refused by
//! serde_json as malformed JSON.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use drover_core::ids::is_slug;
use drover_core::{DefinitionError, DefinitionErrors, InstanceId};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::MAX_BODY_BYTES;
use crate::error::ApiError;

/// What a field holding a NUL character is told.
pub(crate) const NUL_PROBLEM: &str =
    "contains a NUL character (U+0000), which cannot be stored; remove it";

/// An instance id from a path or query: 400 `invalid_id` when it is not one.
pub(crate) fn parse_id(id: &str) -> Result<InstanceId, ApiError> {
    id.parse().map_err(|err| {
        ApiError::bad_request("invalid_id", format!("malformed instance id {id:?}: {err}"))
    })
}

/// A JSON body, `Content-Type: application/json` (or `application/…+json`): 415
/// `unsupported_media_type` without one, 413 when too large, 400 `invalid_json` when it does
/// not decode, 422 `invalid_request` when a string in it cannot be stored.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType {
                message: "expected a JSON body with `Content-Type: application/json`".to_owned(),
            });
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| bytes_rejection(&r))?;
        decode_json(&bytes).map(Self)
    }
}

/// Whether the request says its body is JSON: `application/json` or `application/<x>+json`,
/// parameters (`; charset=utf-8`) allowed — what axum's `Json` accepts.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype
                .get(subtype.len().saturating_sub(5)..)
                .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json")))
}

/// Decodes a JSON body into `T`: 400 `invalid_json` when it is not a JSON object or not a `T`
/// (naming the field), 422 `invalid_request` when a string or key in it holds a NUL character.
pub(crate) fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    decode_object(parse_json(body)?)
}

/// A JSON body that may be absent: an empty (or blank) body, or JSON `null`, is
/// `T::default()`; anything else is decoded as [`decode_json`] does, whatever the content
/// type.
pub(crate) fn decode_optional_json<T: DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    match parse_json(body)? {
        Value::Null => Ok(T::default()),
        value => decode_object(value),
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request("invalid_json", format!("invalid JSON body: {err}")))
}

/// Every JSON request body is an object; serde would also fill a struct from an array.
fn decode_object<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_json",
            format!(
                "invalid JSON body: expected an object, not {}",
                kind(&value)
            ),
        ));
    }
    check_storable(&value, "")?;
    serde_path_to_error::deserialize(value).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." {
            ApiError::bad_request("invalid_json", format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(
                "invalid_json",
                format!("invalid JSON body: {path}: {inner}"),
            )
        }
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// 422 `invalid_request` naming the first string or object key under `value` that Postgres
/// cannot store (one holding a NUL character). `root` names `value` itself (`payload`), or is
/// empty for a request body, whose fields are then named from its top (`vars.customer.name`).
pub(crate) fn check_storable(value: &Value, root: &str) -> Result<(), ApiError> {
    match unstorable(value, root) {
        None => Ok(()),
        Some((field, problem)) => Err(ApiError::invalid_field("invalid_request", &field, &problem)),
    }
}

/// The path of the first string or key holding a NUL under `value`, and what is wrong with
/// it; `None` when all of it can be stored.
pub(crate) fn unstorable(value: &Value, root: &str) -> Option<(String, String)> {
    let mut path = root.to_owned();
    find_nul(value, &mut path)
}

fn find_nul(value: &Value, path: &mut String) -> Option<(String, String)> {
    match value {
        Value::String(s) if s.contains('\0') => Some((field_name(path), NUL_PROBLEM.to_owned())),
        Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            let len = path.len();
            let _ = write!(path, "[{index}]");
            let found = find_nul(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let len = path.len();
            push_key(path, key);
            let found = if key.contains('\0') {
                Some((field_name(path), format!("the key {NUL_PROBLEM}")))
            } else {
                find_nul(item, path)
            };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// `path.key`, or `path["odd key"]` for a key that is not a plain identifier.
fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        // JSON string syntax: quotes, and NUL shown as \u0000.
        let _ = write!(path, "[{}]", Value::String(key.to_owned()));
    }
}

fn field_name(path: &str) -> String {
    if path.is_empty() {
        "body".to_owned()
    } else {
        path.to_owned()
    }
}

/// A query string; a parameter that does not decode, or holds a NUL character, is 400
/// `invalid_query` naming it.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        // Percent-decoded pairs, as `Query` decodes them.
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))?;
        if let Some((name, _)) = pairs
            .iter()
            .find(|(name, value)| name.contains('\0') || value.contains('\0'))
        {
            return Err(ApiError::bad_parameter(
                "invalid_query",
                "query",
                name,
                NUL_PROBLEM,
            ));
        }
        match Query::<T>::try_from_uri(&parts.uri) {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

/// Path parameters; a segment that does not decode, or holds a NUL character, is 400
/// `invalid_path` naming it.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if let Ok(params) = RawPathParams::from_request_parts(parts, state).await
            && let Some((name, _)) = params.iter().find(|(_, value)| value.contains('\0'))
        {
            return Err(ApiError::bad_parameter(
                "invalid_path",
                "path",
                name,
                NUL_PROBLEM,
            ));
        }
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejection(&rejection)),
        }
    }
}

fn path_rejection(rejection: &PathRejection) -> ApiError {
    if let PathRejection::FailedToDeserializePathParams(err) = rejection
        && let ErrorKind::Message(message) = err.kind()
    {
        return ApiError::bad_request("invalid_path", message.clone());
    }
    ApiError::bad_request("invalid_path", rejection.body_text())
}

/// A name in a path (a workflow's, a campaign's): a slug, `[a-z0-9][a-z0-9_-]{0,62}`, or 400
/// `invalid_path`. No stored name is anything else.
#[derive(Clone, Debug)]
pub(crate) struct Slug(pub(crate) String);

impl<'de> serde::Deserialize<'de> for Slug {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if is_slug(&name) {
            Ok(Self(name))
        } else {
            Err(serde::de::Error::custom(format!(
                "name {name:?} is not a slug ([a-z0-9][a-z0-9_-], at most 63 characters)"
            )))
        }
    }
}

/// A definition source: the raw body, any content type, UTF-8 text without NUL characters.
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
        let source = String::from_utf8(bytes.into())
            .map_err(|err| source_error(&format!("not UTF-8 text: {}", err.utf8_error())))?;
        if let Some(at) = source.find('\0') {
            return Err(source_error(&format!("{NUL_PROBLEM} (at byte {at})")));
        }
        Ok(Self(source))
    }
}

fn source_error(message: &str) -> ApiError {
    ApiError::invalid_definition(&DefinitionErrors(vec![DefinitionError {
        step: None,
        field: "source".to_owned(),
        message: message.to_owned(),
    }]))
}

pub(crate) fn bytes_rejection(rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        };
    }
    ApiError::bad_request("invalid_body", rejection.body_text())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_nul_is_found_at_any_depth_and_named_by_its_path() {
        let body = json!({"workflow": "w", "vars": {"customer": {"name": "a\u{0}b"}}});
        assert_eq!(
            unstorable(&body, "").map(|(field, _)| field),
            Some("vars.customer.name".to_owned())
        );
        let body = json!({"vars": {"items": [1, "ok", {"x y": ["\u{0}"]}]}});
        assert_eq!(
            unstorable(&body, "").map(|(field, _)| field),
            Some(r#"vars.items[2]["x y"][0]"#.to_owned())
        );
        let body = json!({"a\u{0}": 1});
        let (field, problem) = unstorable(&body, "payload").expect("a NUL key");
        assert_eq!(field, r#"payload["a\u0000"]"#);
        assert!(problem.starts_with("the key"), "{problem}");
        assert_eq!(
            unstorable(&json!("\u{0}"), "").map(|(field, _)| field),
            Some("body".to_owned())
        );
        assert_eq!(
            unstorable(&json!({"a": ["b", 1.5, null, {"c": true}]}), ""),
            None
        );
    }

    #[test]
    fn json_content_types_are_recognised_with_parameters_and_suffixes() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                value.parse().expect("a valid header value"),
            );
            is_json_content_type(&headers)
        };
        assert!(with("application/json"));
        assert!(with("application/json; charset=utf-8"));
        assert!(with("Application/JSON"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!is_json_content_type(&HeaderMap::new()));
    }
}
