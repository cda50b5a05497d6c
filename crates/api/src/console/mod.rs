//! The web console at `/ui/`: server-rendered HTML (maud) over the same handlers the JSON API
//! runs, with a few lines of embedded JavaScript for confirmations and live updates. No build
//! step: the CSS and JS are `include_str!`ed into the binary.
//!
//! - **Authentication**: the API's tokens and scopes. `/ui/` is a login form that checks the
//!   token like a bearer header would and stores it in an `HttpOnly; SameSite=Strict` cookie
//!   (`Secure` too when the request came through HTTPS, `X-Forwarded-Proto: https`). Every
//!   page authenticates the cookie again (the authenticator caches valid tokens), so a revoked
//!   token logs the console out. An action needs the scope its `/v1` route needs
//!   ([`crate::auth::required_scope`]).
//! - **CSRF**: besides `SameSite=Strict`, every non-GET request must come from this origin:
//!   `Sec-Fetch-Site: same-origin`, or, from a browser that does not send it, an `Origin`
//!   equal to the request's host. A request with neither is refused.
//! - **Confirmation**: an action posted without `confirmed=1` answers a confirmation page; the
//!   script asks with `confirm()` instead and posts `confirmed=1`.
//! - **Live updates**: `/ui/live` is a server-sent event stream fed by the relayed events on
//!   NATS (a plain subscription of the api user: live only), coalesced to one `change` event
//!   per half second; the script then reloads the page's `data-live` regions.

mod graph;
mod html;
mod live;
mod pages;

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderValue, Method, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use drover_core::Scope;

use crate::ApiState;
use crate::auth::{Principal, required_scope};
use crate::error::ApiError;

/// The cookie that carries the API token.
pub(crate) const COOKIE: &str = "drover_token";

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// The console's routes, all under `/ui`.
pub(crate) fn router(state: ApiState) -> Router<ApiState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(pages::home))
        .route("/ui/login", post(pages::login))
        .route("/ui/logout", post(pages::logout))
        .route("/ui/instances", get(pages::instances))
        .route("/ui/instances/{id}", get(pages::instance))
        .route("/ui/instances/{id}/action", post(pages::instance_action))
        .route("/ui/campaigns", get(pages::campaigns))
        .route("/ui/campaigns/{name}/limit", post(pages::set_limit))
        .route("/ui/campaigns/{name}/pause", post(pages::pause_campaign))
        .route("/ui/workflows", get(pages::workflows))
        .route("/ui/workflows/{name}", get(pages::workflow))
        .route("/ui/schedules", get(pages::schedules))
        .route("/ui/nodes", get(pages::nodes))
        .route("/ui/live", get(live::stream))
        .route("/ui/assets/console.css", get(css))
        .route("/ui/assets/console.js", get(js))
        .route("/ui/{*rest}", get(pages::not_found).post(pages::not_found))
        .route_layer(axum::middleware::from_fn_with_state(state, same_origin))
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Who is logged in: the principal of the cookie's token. A page without one redirects to the
/// login form.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub(crate) principal: Principal,
}

impl Session {
    /// Refuses an action whose `/v1` twin (`method route`) needs more than this session's scope.
    pub(crate) fn may(&self, method: &Method, route: &str) -> Result<(), ApiError> {
        let needed = required_scope(method, route);
        if self.principal.scope.allows(needed) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs the {needed} scope; token {:?} has {}",
                self.principal.name, self.principal.scope
            )))
        }
    }

    pub(crate) fn is_operator(&self) -> bool {
        self.principal.scope.allows(Scope::Operator)
    }
}

/// The token in the request's cookie, if any.
pub(crate) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Who the cookie's token is, or why not.
pub(crate) async fn authenticate(
    state: &ApiState,
    headers: &HeaderMap,
) -> Result<Principal, ApiError> {
    let token = cookie_token(headers);
    let authorization = token.map(|token| format!("Bearer {token}"));
    state
        .auth
        .authenticate(&state.store, authorization.as_deref())
        .await
}

impl FromRequestParts<ApiState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Response> {
        match authenticate(state, &parts.headers).await {
            Ok(principal) => Ok(Session { principal }),
            Err(err @ ApiError::Unauthorized { .. }) => {
                tracing::debug!(error = %err, "console: not logged in");
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/ui/", |p| p.as_str())
                    .to_owned();
                if parts.method == Method::GET && next != "/ui/" && next != "/ui/live" {
                    Err(Redirect::to(&format!("/ui/?next={}", encode(&next))).into_response())
                } else {
                    Err(Redirect::to("/ui/").into_response())
                }
            }
            Err(err) => Err(pages::error_page(None, &err)),
        }
    }
}

/// Percent-encodes a query value.
pub(crate) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// CSRF: a request that changes something must come from a page of this origin.
async fn same_origin(request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    match cross_site(request.headers()) {
        None => next.run(request).await,
        Some(why) => {
            tracing::debug!(why, "console: cross-site request refused");
            pages::error_page(
                None,
                &ApiError::forbidden(format!("cross-site request refused: {why}")),
            )
        }
    }
}

/// Why a state-changing request is not same-origin, if it is not.
pub(crate) fn cross_site(headers: &HeaderMap) -> Option<String> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        return (site != "same-origin").then(|| format!("Sec-Fetch-Site is {site:?}"));
    }
    let Some(origin) = text(header::ORIGIN) else {
        return Some("neither Sec-Fetch-Site nor Origin was sent".to_owned());
    };
    let host = text(header::HOST).unwrap_or_default();
    let bare = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    (bare.is_empty() || bare != host)
        .then(|| format!("Origin {origin:?} is not this host {host:?}"))
}

/// The `Set-Cookie` value that logs `token` in (`None`: logs out).
pub(crate) fn session_cookie(token: Option<&str>, headers: &HeaderMap) -> HeaderValue {
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    let secure = if secure { "; Secure" } else { "" };
    let value = match token {
        Some(token) => format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{COOKIE}=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Can `token` be a cookie value as is (RFC 6265 cookie-octets)?
pub(crate) fn cookie_safe(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; drover_token=drv_x ; c=d"),
        );
        assert_eq!(cookie_token(&headers).as_deref(), Some("drv_x"));
        headers.insert(header::COOKIE, HeaderValue::from_static("drover_token="));
        assert_eq!(cookie_token(&headers), None);
    }

    #[test]
    fn only_same_origin_requests_pass() {
        let mut headers = HeaderMap::new();
        assert!(cross_site(&headers).is_some(), "neither header");
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert_eq!(cross_site(&headers), None);
        headers.insert(header::ORIGIN, HeaderValue::from_static("http://evil.test"));
        assert!(cross_site(&headers).is_some());
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert_eq!(cross_site(&headers), None, "Sec-Fetch-Site decides");
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&headers).is_some());
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(
            cross_site(&headers).is_some(),
            "a sibling subdomain is not this origin"
        );
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let cookie = session_cookie(Some("drv_abc"), &HeaderMap::new());
        let cookie = cookie.to_str().expect("ascii");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(!cookie.contains("Secure"));
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(
            session_cookie(None, &headers)
                .to_str()
                .expect("ascii")
                .contains("Max-Age=0; Secure")
        );
        assert!(cookie_safe("drv_abc-_"));
        assert!(!cookie_safe("a;b") && !cookie_safe("a b") && !cookie_safe(""));
    }
}
