//! A typed client of the API. Methods return the API's JSON as-is, so the CLI can print
//! exactly what the server said.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Url};
use serde_json::Value;

use crate::auth::Secret;
use crate::campaigns::{CreateCampaign, SetLimit};
use crate::dto::{JournalQuery, ListQuery, VersionQuery};
use crate::error::ErrorBody;
use crate::lifecycle::{LifecycleCommand, LifecycleFilterRequest, LifecycleRequest};
use crate::operations::StartOperation;
use crate::operator::ResumeRequest;
use crate::schedules::{Backfill, CreateSchedule, PauseSchedule, ScheduleSpec};
use crate::start::StartRequest;
use crate::states::StatesRequest;
use crate::tokens::CreateToken;

/// How long to wait for a TCP connection to the API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take in all, unless [`ApiClient::with_timeout`] says otherwise;
/// starting 10,000 instances takes a few seconds.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        /// The API's error code (`not_found`, `invalid_definition`, …), or `http_error` when
        /// the answer was not the API's JSON (a proxy's error page).
        code: String,
        message: String,
        /// `[{step, field, message}, …]` for `invalid_definition`.
        details: Option<Value>,
    },
    /// The API took longer than the request timeout to answer.
    #[error(
        "the Drover API at {url} did not answer within {after} (is it overloaded or stuck? \
         raise --timeout or DROVER_TIMEOUT to wait longer)"
    )]
    Timeout { url: String, after: String },
    /// No connection could be made.
    #[error(
        "could not reach the Drover API at {url}: {reason} (check --api-url or DROVER_API_URL)"
    )]
    Unreachable { url: String, reason: String },
    /// The connection was made but the exchange failed (timeout, reset).
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    /// A success status whose body is not JSON: probably not a Drover API at that URL.
    #[error(
        "the answer of {url} (HTTP {status}) is not JSON: {reason} (check --api-url or DROVER_API_URL)"
    )]
    NotJson {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("invalid API URL {url:?}: {reason} (check --api-url or DROVER_API_URL)")]
    InvalidUrl { url: String, reason: String },
    /// The token cannot be sent in a header (it is never shown).
    #[error(
        "the API token holds characters an HTTP header cannot carry (check --token or DROVER_TOKEN)"
    )]
    InvalidToken,
}

impl ClientError {
    /// The HTTP status, when the API answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::NotJson { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code, when the API answered with an error.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The error as the API's error JSON: what the API answered, or, when it did not, the
    /// same shape with a code saying why (`unreachable`, `timeout`, `transport`, `not_json`,
    /// `invalid_url`, `invalid_token`).
    pub fn to_json(&self) -> Value {
        if let Self::Api {
            code,
            message,
            details,
            ..
        } = self
        {
            // The API's error JSON, field by field (`ErrorBody`).
            let mut error = serde_json::json!({ "code": code, "message": message });
            if let Some(details) = details {
                error["details"] = details.clone();
            }
            return serde_json::json!({ "error": error });
        }
        let code = match self {
            Self::Api { code, .. } => code.as_str(),
            Self::Timeout { .. } => "timeout",
            Self::Unreachable { .. } => "unreachable",
            Self::Transport { .. } => "transport",
            Self::NotJson { .. } => "not_json",
            Self::InvalidUrl { .. } => "invalid_url",
            Self::InvalidToken => "invalid_token",
        };
        serde_json::json!({ "error": { "code": code, "message": self.to_string() } })
    }
}

/// A client of one API base URL (e.g. `http://127.0.0.1:8080`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    /// How long one request may take in all.
    timeout: Duration,
    base: Url,
    /// Sent as `Authorization: Bearer …` with every request; `Secret` never prints it.
    token: Option<Secret>,
}

impl ApiClient {
    /// Checks `base_url` (http or https); no I/O. Requests time out after
    /// [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::with_timeout(base_url, DEFAULT_REQUEST_TIMEOUT)
    }

    /// As [`ApiClient::new`], each request giving up after `timeout` in all.
    pub fn with_timeout(base_url: &str, timeout: Duration) -> Result<Self, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason,
        };
        let base = Url::parse(base_url).map_err(|err| invalid(err.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("expected an http:// or https:// URL".to_owned()));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .build()
            .map_err(|err| invalid(describe(&err)))?;
        Ok(Self {
            http,
            timeout,
            base,
            token: None,
        })
    }

    /// Authenticates every request with `token`.
    pub fn with_token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// `POST /v1/tokens`: creates a token (the answer is the only time it is shown).
    pub async fn create_token(&self, request: &CreateToken) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "tokens"])?;
        let builder = self.http.request(Method::POST, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `GET /v1/tokens`.
    pub async fn tokens(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "tokens"], None::<&()>).await
    }

    /// `DELETE /v1/tokens/{name}`: revokes a token.
    pub async fn revoke_token(&self, name: &str) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "tokens", name])?;
        let builder = self.http.request(Method::DELETE, url.clone());
        self.send(builder, &url).await
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `POST /v1/workflows`: deploys a definition source (YAML or JSON).
    pub async fn deploy(&self, source: String) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "workflows"])?;
        let request = self
            .http
            .request(Method::POST, url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/yaml")
            .body(source);
        self.send(request, &url).await
    }

    /// `GET /v1/workflows`.
    pub async fn workflows(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "workflows"], None::<&()>).await
    }

    /// `GET /v1/workflows/{name}`: the given version, or the latest.
    pub async fn workflow(&self, name: &str, version: Option<i32>) -> Result<Value, ClientError> {
        self.get(&["v1", "workflows", name], Some(&VersionQuery { version }))
            .await
    }

    /// `POST /v1/instances`; with `wait` (e.g. `30s`), answered once the instance ended or
    /// the wait lapsed.
    pub async fn start(
        &self,
        request: &StartRequest,
        wait: Option<&str>,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "instances"])?;
        let query = crate::StartQuery {
            wait: wait.map(str::to_owned),
        };
        let builder = self
            .http
            .request(Method::POST, url.clone())
            .query(&query)
            .json(request);
        self.send(builder, &url).await
    }

    /// `GET /v1/instances`: one page; its `next`, when present, is the `before` of the next.
    pub async fn instances(&self, query: &ListQuery) -> Result<Value, ClientError> {
        self.get(&["v1", "instances"], Some(query)).await
    }

    /// `GET /v1/instances/{id}`.
    pub async fn instance(&self, id: &str) -> Result<Value, ClientError> {
        self.get(&["v1", "instances", id], None::<&()>).await
    }

    /// The whole journal of an instance: `GET /v1/instances/{id}/journal` page after page,
    /// answered as one `{"instance", "entries"}`.
    pub async fn journal(&self, id: &str) -> Result<Value, ClientError> {
        let mut query = JournalQuery::default();
        let mut journal = self.journal_page(id, &query).await?;
        let mut next = journal.as_object_mut().and_then(|j| j.remove("next"));
        while let Some(after) = next.as_ref().and_then(Value::as_i64) {
            query.after = Some(after);
            let mut page = self.journal_page(id, &query).await?;
            next = page.as_object_mut().and_then(|p| p.remove("next"));
            let entries = match page.get_mut("entries").map(Value::take) {
                Some(Value::Array(entries)) if !entries.is_empty() => entries,
                // A page without entries cannot have a next one: stop rather than loop.
                _ => break,
            };
            if let Some(Value::Array(all)) = journal.get_mut("entries") {
                all.extend(entries);
            }
        }
        Ok(journal)
    }

    /// One page of `GET /v1/instances/{id}/journal`: its `next`, when present, is the `after`
    /// of the next page.
    pub async fn journal_page(&self, id: &str, query: &JournalQuery) -> Result<Value, ClientError> {
        self.get(&["v1", "instances", id, "journal"], Some(query))
            .await
    }

    /// `POST /v1/instances/{id}/resume`: resumes an `in_error` instance; answers the instance.
    pub async fn resume(&self, id: &str, request: &ResumeRequest) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "instances", id, "resume"])?;
        let builder = self.http.request(Method::POST, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `POST /v1/instances/{id}/{pause|unpause|stop|kill|restart}`: answers what the command
    /// did (`outcome`, `changed`, the instance afterwards).
    pub async fn lifecycle(
        &self,
        id: &str,
        command: LifecycleCommand,
        request: &LifecycleRequest,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "instances", id, command.as_str()])?;
        let builder = self.http.request(Method::POST, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `POST /v1/instances/{pause|unpause|stop|kill|restart}` with a filter: answers counts.
    pub async fn lifecycle_many(
        &self,
        command: LifecycleCommand,
        request: &LifecycleFilterRequest,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "instances", command.as_str()])?;
        let builder = self.http.request(Method::POST, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `POST /v1/operations`: starts a lifecycle command on the instances of a filter;
    /// answers the operation at once (its `id`, `state` `running`).
    pub async fn start_operation(&self, request: &StartOperation) -> Result<Value, ClientError> {
        self.send_json(Method::POST, &["v1", "operations"], Some(request))
            .await
    }

    /// `POST /v1/instances/states`: where up to [`MAX_STATE_IDS`](crate::MAX_STATE_IDS)
    /// instances stand.
    pub async fn instance_states(&self, request: &StatesRequest) -> Result<Value, ClientError> {
        self.send_json(Method::POST, &["v1", "instances", "states"], Some(request))
            .await
    }

    /// `GET /v1/operations/{id}`: its progress, and its result once it ended.
    pub async fn operation(&self, id: &str) -> Result<Value, ClientError> {
        self.get(&["v1", "operations", id], None::<&()>).await
    }

    /// `POST /v1/operations/{id}/cancel`: it stops after its current batch.
    pub async fn cancel_operation(&self, id: &str) -> Result<Value, ClientError> {
        self.send_json(
            Method::POST,
            &["v1", "operations", id, "cancel"],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/instances/{id}/diagnosis`: why it is not running.
    pub async fn diagnosis(&self, id: &str) -> Result<Value, ClientError> {
        self.get(&["v1", "instances", id, "diagnosis"], None::<&()>)
            .await
    }

    /// `POST /v1/instances/{id}/events/{name}`: delivers an event (`payload` `None` sends no
    /// body: a `null` payload); answers `{"delivered": "woke"|"kept"}`.
    pub async fn send_event(
        &self,
        id: &str,
        name: &str,
        payload: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "instances", id, "events", name])?;
        let mut builder = self.http.request(Method::POST, url.clone());
        if let Some(payload) = payload {
            builder = builder.json(payload);
        }
        self.send(builder, &url).await
    }

    /// `GET /v1/campaigns`.
    pub async fn campaigns(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "campaigns"], None::<&()>).await
    }

    /// `GET /v1/schedules`.
    pub async fn schedules(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "schedules"], None::<&()>).await
    }

    /// `GET /v1/schedules/{name}`: with the next fire times and recent fires.
    pub async fn schedule(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&["v1", "schedules", name], None::<&()>).await
    }

    /// `POST /v1/schedules`.
    pub async fn create_schedule(&self, request: &CreateSchedule) -> Result<Value, ClientError> {
        self.send_json(Method::POST, &["v1", "schedules"], Some(request))
            .await
    }

    /// `PATCH /v1/schedules/{name}`.
    pub async fn update_schedule(
        &self,
        name: &str,
        request: &ScheduleSpec,
    ) -> Result<Value, ClientError> {
        self.send_json(Method::PATCH, &["v1", "schedules", name], Some(request))
            .await
    }

    /// `DELETE /v1/schedules/{name}`.
    pub async fn delete_schedule(&self, name: &str) -> Result<Value, ClientError> {
        self.send_json(Method::DELETE, &["v1", "schedules", name], None::<&()>)
            .await
    }

    /// `POST /v1/schedules/{name}/pause`.
    pub async fn pause_schedule(
        &self,
        name: &str,
        request: &PauseSchedule,
    ) -> Result<Value, ClientError> {
        self.send_json(
            Method::POST,
            &["v1", "schedules", name, "pause"],
            Some(request),
        )
        .await
    }

    /// `POST /v1/schedules/{name}/unpause`.
    pub async fn unpause_schedule(&self, name: &str) -> Result<Value, ClientError> {
        self.send_json(
            Method::POST,
            &["v1", "schedules", name, "unpause"],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/schedules/{name}/trigger`: runs it now.
    pub async fn trigger_schedule(&self, name: &str) -> Result<Value, ClientError> {
        self.send_json(
            Method::POST,
            &["v1", "schedules", name, "trigger"],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/schedules/{name}/backfill`.
    pub async fn backfill_schedule(
        &self,
        name: &str,
        request: &Backfill,
    ) -> Result<Value, ClientError> {
        self.send_json(
            Method::POST,
            &["v1", "schedules", name, "backfill"],
            Some(request),
        )
        .await
    }

    async fn send_json<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<Value, ClientError> {
        let url = self.url(segments)?;
        let mut builder = self.http.request(method, url.clone());
        if let Some(body) = body {
            builder = builder.json(body);
        }
        self.send(builder, &url).await
    }

    /// `DELETE /v1/workflows/{name}?version=&stop_instances=`.
    pub async fn delete_workflow(
        &self,
        name: &str,
        query: &crate::DeleteWorkflowQuery,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "workflows", name])?;
        let builder = self.http.request(Method::DELETE, url.clone()).query(query);
        self.send(builder, &url).await
    }

    /// `DELETE /v1/campaigns/{name}`.
    pub async fn delete_campaign(&self, name: &str) -> Result<Value, ClientError> {
        self.send_json(Method::DELETE, &["v1", "campaigns", name], None::<&()>)
            .await
    }

    /// `POST /v1/campaigns/{name}/pause` (`paused` true) or `…/unpause`.
    pub async fn pause_campaign(&self, name: &str, paused: bool) -> Result<Value, ClientError> {
        let verb = if paused { "pause" } else { "unpause" };
        self.send_json(Method::POST, &["v1", "campaigns", name, verb], None::<&()>)
            .await
    }

    /// `GET /v1/campaigns/{name}`.
    pub async fn campaign(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&["v1", "campaigns", name], None::<&()>).await
    }

    /// `POST /v1/campaigns`: answers the campaign.
    pub async fn create_campaign(&self, request: &CreateCampaign) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "campaigns"])?;
        let builder = self.http.request(Method::POST, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `PUT /v1/campaigns/{name}/limit`: answers what the change did.
    pub async fn set_campaign_limit(
        &self,
        name: &str,
        request: &SetLimit,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "campaigns", name, "limit"])?;
        let builder = self.http.request(Method::PUT, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `PUT /v1/campaigns/{name}/retention`: answers the campaign's retention.
    pub async fn set_campaign_retention(
        &self,
        name: &str,
        request: &crate::SetRetention,
    ) -> Result<Value, ClientError> {
        let url = self.url(&["v1", "campaigns", name, "retention"])?;
        let builder = self.http.request(Method::PUT, url.clone()).json(request);
        self.send(builder, &url).await
    }

    /// `GET /v1/campaigns/{name}/retention`.
    pub async fn campaign_retention(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&["v1", "campaigns", name, "retention"], None::<&()>)
            .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "nodes"], None::<&()>).await
    }

    /// `GET /v1/leader`: the coordinator's leader lease.
    pub async fn leader(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "leader"], None::<&()>).await
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Result<Value, ClientError> {
        self.get(&["v1", "stats"], None::<&()>).await
    }

    /// The base URL with `segments` appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        url.path_segments_mut()
            .map_err(|()| ClientError::InvalidUrl {
                url: self.base.to_string(),
                reason: "cannot carry a path".to_owned(),
            })?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn get<Q: serde::Serialize + ?Sized>(
        &self,
        segments: &[&str],
        query: Option<&Q>,
    ) -> Result<Value, ClientError> {
        let url = self.url(segments)?;
        let mut request = self.http.request(Method::GET, url.clone());
        if let Some(query) = query {
            request = request.query(query);
        }
        self.send(request, &url).await
    }

    async fn send(&self, mut request: RequestBuilder, url: &Url) -> Result<Value, ClientError> {
        if let Some(token) = &self.token {
            let mut value =
                reqwest::header::HeaderValue::try_from(format!("Bearer {}", token.expose()))
                    .map_err(|_| ClientError::InvalidToken)?;
            // Kept out of reqwest's and hyper's debug output.
            value.set_sensitive(true);
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .map_err(|err| self.transport_error(url, &err))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(url, &err))?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|err| ClientError::NotJson {
                url: url.to_string(),
                status: status.as_u16(),
                reason: err.to_string(),
            });
        }
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(ErrorBody { error }) => ClientError::Api {
                status: status.as_u16(),
                code: error.code,
                message: error.message,
                details: error.details,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                let text = text.trim();
                let message = if text.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    text.chars().take(200).collect()
                };
                ClientError::Api {
                    status: status.as_u16(),
                    code: "http_error".to_owned(),
                    message,
                    details: None,
                }
            }
        })
    }
}

impl ApiClient {
    fn transport_error(&self, url: &Url, err: &reqwest::Error) -> ClientError {
        let url = url.to_string();
        if err.is_timeout() && !err.is_connect() {
            return ClientError::Timeout {
                url,
                after: humantime::format_duration(self.timeout).to_string(),
            };
        }
        let reason = describe(err);
        if err.is_connect() {
            ClientError::Unreachable { url, reason }
        } else {
            ClientError::Transport { url, reason }
        }
    }
}

/// reqwest's own message only says which URL failed; the causes say why.
fn describe(err: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper's "client error (Connect)" wrapper says nothing its own cause does not.
        if !cause_text.starts_with("client error (") {
            causes.push(cause_text);
        }
        source = cause.source();
    }
    if err.is_timeout() {
        causes.push("timed out".to_owned());
    }
    if causes.is_empty() {
        err.to_string()
    } else {
        causes.join(": ")
    }
}
