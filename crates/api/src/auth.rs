//! Bearer-token authentication and scopes.
//!
//! Every `/v1` route but the documents (`/v1/openapi.json`, `/v1/asyncapi.json`,
//! `/v1/schemas/events/{type}`) needs `Authorization: Bearer <token>`; `/healthz` and `/readyz`
//! need nothing. A token is 256 random bits (`drv_` + 43 base64url characters),
//! shown once when created; the store keeps only its SHA-256. The bootstrap admin token comes
//! from the node's configuration and is never stored. A request's scope need is decided from
//! its method and route ([`required_scope`]): `viewer` reads, `operator` runs things, `admin`
//! changes what runs. The authenticated token's name is the actor of everything the request
//! does (journal and audit rows).
//!
//! Valid tokens are cached for [`CACHE_TTL`], so a revocation takes effect at once on the node
//! that revoked and within that time on the others.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use drover_core::Scope;
use drover_store::{BOOTSTRAP_TOKEN, Store};
use rand::TryRngCore as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// How long a token found valid is believed without asking the database again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// The shortest bootstrap token accepted from configuration.
pub const MIN_BOOTSTRAP_CHARS: usize = 32;
/// Every generated token starts with this, so secret scanners can find leaked ones.
pub const TOKEN_PREFIX: &str = "drv_";
/// The actor recorded for requests while authentication is off.
pub const ANONYMOUS: &str = "anonymous";
/// Valid tokens cached at most; past this the cache starts over.
const MAX_CACHED: usize = 10_000;

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// A fresh token: [`TOKEN_PREFIX`] and 256 bits from the operating system's generator.
    pub fn generate() -> Result<Self, ApiError> {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|err| ApiError::Internal(format!("no randomness for a token: {err}")))?;
        Ok(Self(format!(
            "{TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    /// The token itself, to send or to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps instead of the token.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Who a request acts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's name: the actor of journal and audit rows.
    pub name: String,
    pub scope: Scope,
}

/// Whether the API checks tokens.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// Every request needs a token. `bootstrap` is the configured admin token, if any.
    On { bootstrap: Option<Secret> },
    /// Anyone who reaches the API is an admin named [`ANONYMOUS`]. For a laptop only.
    Off,
}

impl AuthMode {
    /// Checks the bootstrap token's strength.
    pub fn on(bootstrap: Option<Secret>) -> Result<Self, String> {
        if let Some(token) = &bootstrap
            && token.expose().chars().count() < MIN_BOOTSTRAP_CHARS
        {
            return Err(format!(
                "the admin token must have at least {MIN_BOOTSTRAP_CHARS} characters \
                 (generate one with: openssl rand -hex 32)"
            ));
        }
        Ok(Self::On { bootstrap })
    }
}

/// Decides who a request is. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    bootstrap: Option<[u8; 32]>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

struct Cached {
    principal: Principal,
    expires_at: Option<DateTime<Utc>>,
    fetched: Instant,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.inner.enabled)
            .field("bootstrap", &self.inner.bootstrap.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(mode: AuthMode) -> Self {
        let (enabled, bootstrap) = match mode {
            AuthMode::On { bootstrap } => (true, bootstrap.map(|token| token.hash())),
            AuthMode::Off => (false, None),
        };
        Self {
            inner: Arc::new(Inner {
                enabled,
                bootstrap,
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Who presents `authorization` (the header's value, if any).
    pub async fn authenticate(
        &self,
        store: &Store,
        authorization: Option<&str>,
    ) -> Result<Principal, ApiError> {
        if !self.inner.enabled {
            return Ok(Principal {
                name: ANONYMOUS.to_owned(),
                scope: Scope::Admin,
            });
        }
        let token = bearer(authorization)?;
        let hash = token.hash();
        if let Some(bootstrap) = &self.inner.bootstrap
            && bool::from(bootstrap.ct_eq(&hash))
        {
            return Ok(Principal {
                name: BOOTSTRAP_TOKEN.to_owned(),
                scope: Scope::Admin,
            });
        }
        if let Some(principal) = self.cached(&hash)? {
            return Ok(principal);
        }
        let Some(stored) = store.token_by_hash(&hash).await? else {
            return Err(ApiError::unauthorized("unknown or revoked token"));
        };
        if stored.revoked_at.is_some() {
            return Err(ApiError::unauthorized("unknown or revoked token"));
        }
        if let Some(expired) = stored.expires_at.filter(|at| *at <= Utc::now()) {
            return Err(expired_error(&stored.name, expired));
        }
        let principal = Principal {
            name: stored.name,
            scope: stored.scope,
        };
        if let Ok(mut cache) = self.inner.cache.lock() {
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(
                hash,
                Cached {
                    principal: principal.clone(),
                    expires_at: stored.expires_at,
                    fetched: Instant::now(),
                },
            );
        }
        Ok(principal)
    }

    fn cached(&self, hash: &[u8; 32]) -> Result<Option<Principal>, ApiError> {
        let Ok(mut cache) = self.inner.cache.lock() else {
            return Ok(None);
        };
        let Some(entry) = cache.get(hash) else {
            return Ok(None);
        };
        if entry.fetched.elapsed() > CACHE_TTL {
            cache.remove(hash);
            return Ok(None);
        }
        if let Some(expired) = entry.expires_at.filter(|at| *at <= Utc::now()) {
            let err = expired_error(&entry.principal.name, expired);
            cache.remove(hash);
            return Err(err);
        }
        Ok(Some(entry.principal.clone()))
    }

    /// Forgets the cached token `name` (it was revoked here).
    pub fn forget(&self, name: &str) {
        if let Ok(mut cache) = self.inner.cache.lock() {
            cache.retain(|_, entry| entry.principal.name != name);
        }
    }
}

fn expired_error(name: &str, at: DateTime<Utc>) -> ApiError {
    ApiError::unauthorized(format!(
        "token {name:?} expired at {}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ))
}

/// The token of an `Authorization: Bearer <token>` header value.
fn bearer(authorization: Option<&str>) -> Result<Secret, ApiError> {
    let Some(value) = authorization else {
        return Err(ApiError::unauthorized(
            "this request needs an API token: send `Authorization: Bearer <token>` \
             (the CLI sends DROVER_TOKEN)",
        ));
    };
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
        })?;
    Ok(Secret::new(token))
}

/// The scope a request needs: reads need `viewer` (`POST /v1/instances/states` is a read);
/// starting, lifecycle commands (and their operations), resume,
/// events and campaign limits need `operator`; everything else that writes (deploying,
/// creating campaigns, tokens, and any route not listed here) needs `admin`. Token listings
/// are `admin` too.
pub fn required_scope(method: &Method, route: &str) -> Scope {
    if route.starts_with("/v1/tokens") {
        return Scope::Admin;
    }
    // Reading the states of many instances takes a body, so it is a POST.
    if method == Method::GET || method == Method::HEAD || route == "/v1/instances/states" {
        return Scope::Viewer;
    }
    let operator = (method == Method::POST
        && (route.starts_with("/v1/instances") || route.starts_with("/v1/operations")))
        || (method == Method::PUT && route == "/v1/campaigns/{name}/limit");
    if operator {
        Scope::Operator
    } else {
        Scope::Admin
    }
}

/// Middleware on the `/v1` routes: authenticates, checks the scope, and hands the handlers
/// the [`Principal`] as a request extension.
pub(crate) async fn require_token(
    State(state): State<crate::ApiState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or_default());
    let principal = state.auth.authenticate(&state.store, authorization).await?;
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());
    let needed = required_scope(request.method(), &route);
    if !principal.scope.allows(needed) {
        return Err(ApiError::forbidden(format!(
            "{} {route} needs the {needed} scope; token {:?} has {}",
            request.method(),
            principal.name,
            principal.scope
        )));
    }
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}

/// Adds the bearer scheme to the OpenAPI document and requires it on every operation that
/// does not opt out with `security(())`, and documents their 401 and 403 answers.
pub(crate) struct BearerSecurity;

impl utoipa::Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{Ref, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`drover token create`), or the nodes' bootstrap admin \
                         token",
                    ))
                    .build(),
            ),
        );
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                (Method::GET, item.get.as_mut()),
                (Method::POST, item.post.as_mut()),
                (Method::PUT, item.put.as_mut()),
                (Method::DELETE, item.delete.as_mut()),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                if operation.security.is_some() {
                    continue; // public: `security(())`
                }
                let needed = required_scope(&method, path);
                operation.security =
                    Some(vec![utoipa::openapi::security::SecurityRequirement::new::<
                        _,
                        _,
                        &str,
                    >("bearer", [])]);
                let responses = &mut operation.responses.responses;
                responses.insert(
                    "401".to_owned(),
                    error("No token, or an unknown, revoked or expired one (`unauthorized`)")
                        .into(),
                );
                responses.insert(
                    "403".to_owned(),
                    error(&format!(
                        "The token's scope is below `{needed}` (`forbidden`)"
                    ))
                    .into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_carry_256_random_bits_and_differ() {
        let a = Secret::generate().expect("randomness");
        let b = Secret::generate().expect("randomness");
        assert_ne!(a, b);
        let body = a.expose().strip_prefix(TOKEN_PREFIX).expect("prefixed");
        assert_eq!(URL_SAFE_NO_PAD.decode(body).map(|b| b.len()).ok(), Some(32));
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("drv_very-secret-value");
        assert!(!format!("{secret:?}").contains("very-secret"));
        let mode = AuthMode::On {
            bootstrap: Some(secret),
        };
        assert!(!format!("{mode:?}").contains("very-secret"));
        let auth = Authenticator::new(mode);
        assert!(!format!("{auth:?}").contains("very-secret"));
    }

    #[test]
    fn short_bootstrap_tokens_are_refused() {
        assert!(AuthMode::on(Some(Secret::new("short"))).is_err());
        assert!(AuthMode::on(Some(Secret::new("x".repeat(MIN_BOOTSTRAP_CHARS)))).is_ok());
        assert!(AuthMode::on(None).is_ok());
    }

    #[test]
    fn bearer_headers_parse_strictly() {
        assert!(bearer(None).is_err());
        assert!(bearer(Some("Basic abc")).is_err());
        assert!(bearer(Some("Bearer ")).is_err());
        assert!(bearer(Some("drv_abc")).is_err());
        assert_eq!(
            bearer(Some("bearer drv_abc"))
                .ok()
                .map(|s| s.expose().to_owned()),
            Some("drv_abc".to_owned())
        );
    }
}
