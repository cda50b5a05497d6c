//! Drover's HTTP API: an axum router over the store and the bus, its DTOs and OpenAPI
//! document, and [`ApiClient`], the typed client the operator CLI uses.
//!
//! Every `/v1` route but the documents (`/v1/openapi.json`, `/v1/asyncapi.json`,
//! `/v1/schemas/events/{type}`) needs a bearer token whose scope allows it
//! ([`auth`]). Every route answers JSON; every error is one [`ApiError`] rendered as
//! `{"error": {"code", "message", "details"?}}` and logged once, where it is mapped (4xx at
//! debug, 5xx at error). Input Postgres cannot store (a NUL character in any string) is
//! refused by the extractors, naming the field; every listing is bounded in size.
//!
//! | route | |
//! | --- | --- |
//! | `POST /v1/workflows` | deploy a definition (raw YAML/JSON body) |
//! | `GET /v1/workflows`, `GET /v1/workflows/{name}?version=N` | list, show |
//! | `DELETE /v1/workflows/{name}?version=N&stop_instances=true` | delete a workflow or a version (admin; refused while live instances or schedules use it) |
//! | `POST /v1/instances` | start instances ([`start_instances`]) |
//! | `GET /v1/instances?state=&campaign=&workflow=&limit=&before=&include=vars` | list summaries, newest first, a page at a time (`next`) |
//! | `GET /v1/instances/{id}`, `GET /v1/instances/{id}/journal?limit=&after=` | show, journal (a page at a time) |
//! | `POST /v1/instances/states` | where up to 10000 instances stand ([`StatesRequest`]; a read) |
//! | `POST /v1/instances/{id}/resume` | resume an `in_error` instance ([`ResumeRequest`]) |
//! | `POST /v1/instances/{id}/{pause,unpause,stop,kill,restart}` | lifecycle commands ([`LifecycleRequest`]) |
//! | `POST /v1/instances/{pause,unpause,stop,kill,restart}` | the same by filter ([`LifecycleFilterRequest`]) |
//! | `POST /v1/operations`, `GET /v1/operations/{id}`, `POST /v1/operations/{id}/cancel` | the same as a background operation, kept in Postgres ([`StartOperation`]) |
//! | `GET /v1/instances/{id}/diagnosis` | why it is not running ([`Diagnosis`]) |
//! | `POST /v1/instances/{id}/events/{name}` | deliver an event ([`deliver_event`]; NATS: [`SignalListener`]) |
//! | `POST /v1/campaigns`, `GET /v1/campaigns/{name}`, `PUT /v1/campaigns/{name}/limit` | campaigns and their limits ([`CreateCampaign`], [`SetLimit`]) |
//! | `GET`, `PUT /v1/campaigns/{name}/retention` | how long finished instances are kept ([`SetRetention`]) |
//! | `DELETE /v1/campaigns/{name}`, `POST /v1/campaigns/{name}/{pause,unpause}` | delete an empty campaign; pause its admissions (admin) |
//! | `GET /v1/campaigns`, `GET /v1/nodes`, `GET /v1/leader`, `GET /v1/stats` | cluster |
//! | `GET, POST /v1/schedules`, `GET, PATCH, DELETE /v1/schedules/{name}`, `POST …/{pause,unpause,trigger,backfill}` | schedules (admin to change, viewer to read) |
//! | `POST /v1/tokens`, `GET /v1/tokens`, `DELETE /v1/tokens/{name}` | API tokens (admin) |
//! | `GET /v1/openapi.json`, `GET /healthz`, `GET /readyz` | this API's description, liveness, readiness (no token) |
//! | `GET /v1/asyncapi.json`, `GET /v1/schemas/events/{type}` | the events' AsyncAPI document and JSON Schemas ([`drover_bus::contract`]; no token) |
//! | `/ui/…` | the web console (HTML; a login form sets a cookie holding the token) |

pub mod auth;
mod campaigns;
mod client;
mod console;
mod contract;
mod deletes;
mod diagnosis;
pub mod dto;
mod error;
mod extract;
mod lifecycle;
mod operations;
mod operator;
mod retention;
mod routes;
mod schedules;
mod signal;
mod start;
mod states;
mod tokens;
pub mod wait;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use drover_bus::Bus;
use drover_core::{PublishPolicy, SubjectAllowList};
use drover_store::Store;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

pub use auth::{AuthMode, Authenticator, Principal, Secret};
pub use campaigns::{CreateCampaign, LimitChanged, SetLimit};
pub use client::{ApiClient, ClientError, DEFAULT_REQUEST_TIMEOUT};
pub use deletes::{
    CampaignDeletedView, CampaignPauseView, DeleteWorkflowQuery, WorkflowDeletedView,
};
pub use diagnosis::{Diagnosis, LIVE_WITHIN_MS, diagnose};
pub use dto::{JournalQuery, ListInclude, ListQuery};
pub use error::{ApiError, ErrorBody, ErrorDetail, Result};
pub use lifecycle::{
    Cascaded, LIFECYCLE_BATCH, LifecycleCommand, LifecycleFilterRequest, LifecycleRequest,
    LifecycleResult, LifecycleSummary, RefusalEntry,
};
pub use operations::{KEEP_FINISHED, Operation, Operations, StartOperation};
pub use operator::{Leader, ResumeMode, ResumeRequest};
pub use retention::{Retention, SetRetention};
pub use schedules::{
    Backfill, CreateSchedule, DeletedSchedule, FireRecord, ManualFireView, ManualFired,
    PauseSchedule, ScheduleDetail, ScheduleList, ScheduleSpec, ScheduleView,
};
pub use signal::{Delivered, EventDelivered, SignalListener, deliver_event};
pub use start::{
    DEFAULT_CAMPAIGN, DefinitionCache, LOCAL_START_MAX, LocalRoom, LocalWorker, MAX_START_COUNT,
    START_CHUNK, StartQuery, StartRequest, Started, WaitResult, start_instances,
};
pub use states::{InstanceAt, InstanceStates, MAX_STATE_IDS, StatesRequest};
pub use tokens::{CreateToken, CreatedToken, TokenInfo, TokenList};

/// The largest request body accepted (a definition source may be 1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub store: Store,
    pub bus: Bus,
    /// Parsed definitions, so starting instances does not re-validate a definition each time.
    pub definitions: DefinitionCache,
    /// Who requests are; authentication is on unless [`ApiState::with_auth`] turns it off.
    pub auth: Authenticator,
    /// Where deployed `publish` steps may publish (the bus's prefix, and the allow-list).
    pub publish: PublishPolicy,
    /// Requests waiting for their instance's end (`POST /v1/instances?wait=`).
    pub ends: wait::EndWatch,
    /// Ends the console's event streams (`/ui/live`) when the API stops, so a graceful
    /// shutdown does not wait for browsers to go away.
    pub live_stop: CancellationToken,
    /// Bulk commands running as operations (`/v1/operations`).
    pub operations: operations::Operations,
    /// The worker of this process, if it runs one: small starts run their first step there.
    pub local: Option<Arc<dyn LocalWorker>>,
}

impl ApiState {
    /// No I/O: `store` and `bus` are already connected. Authentication is on, with no
    /// bootstrap token (only stored tokens are accepted).
    pub fn new(store: Store, bus: Bus) -> Self {
        let publish = PublishPolicy::new(bus.subjects().prefix());
        Self {
            store,
            bus,
            definitions: DefinitionCache::new(),
            auth: Authenticator::new(AuthMode::On { bootstrap: None }),
            publish,
            ends: wait::EndWatch::new(),
            live_stop: CancellationToken::new(),
            operations: operations::Operations::default(),
            local: None,
        }
    }

    /// Small starts run their first step on `local`, this process's worker, when it has room.
    pub fn with_local_worker(mut self, local: Arc<dyn LocalWorker>) -> Self {
        self.local = Some(local);
        self
    }

    pub fn with_auth(mut self, mode: AuthMode) -> Self {
        self.auth = Authenticator::new(mode);
        self
    }

    /// Deploys refuse `publish` subjects outside `allow` (`None` or empty: no allow-list).
    pub fn with_publish_allow(mut self, allow: Option<SubjectAllowList>) -> Self {
        self.publish.allow = allow;
        self
    }
}

/// The whole API: `/v1/…`, `/healthz` and `/readyz`. Unknown routes answer a 404 JSON error.
pub fn router(state: ApiState) -> Router {
    let public = Router::new()
        .route("/v1/openapi.json", get(routes::openapi))
        .route("/v1/asyncapi.json", get(contract::asyncapi))
        .route("/v1/schemas/events/{type}", get(contract::event_schema))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz));
    Router::new()
        .route(
            "/v1/workflows",
            get(routes::list_workflows).post(routes::deploy),
        )
        .route(
            "/v1/workflows/{name}",
            get(routes::show_workflow).delete(deletes::delete_workflow),
        )
        .route(
            "/v1/instances",
            get(routes::list_instances).post(routes::start),
        )
        .route("/v1/instances/states", post(states::states))
        .route("/v1/instances/{id}", get(routes::show_instance))
        .route("/v1/instances/{id}/journal", get(routes::journal))
        .route("/v1/instances/{id}/resume", post(operator::resume))
        .route("/v1/instances/{id}/pause", post(lifecycle::handlers::pause))
        .route(
            "/v1/instances/{id}/unpause",
            post(lifecycle::handlers::unpause),
        )
        .route("/v1/instances/{id}/stop", post(lifecycle::handlers::stop))
        .route("/v1/instances/{id}/kill", post(lifecycle::handlers::kill))
        .route(
            "/v1/instances/{id}/restart",
            post(lifecycle::handlers::restart),
        )
        .route("/v1/instances/pause", post(lifecycle::handlers::pause_many))
        .route(
            "/v1/instances/unpause",
            post(lifecycle::handlers::unpause_many),
        )
        .route("/v1/instances/stop", post(lifecycle::handlers::stop_many))
        .route("/v1/instances/kill", post(lifecycle::handlers::kill_many))
        .route(
            "/v1/instances/restart",
            post(lifecycle::handlers::restart_many),
        )
        .route("/v1/operations", post(operations::start))
        .route("/v1/operations/{id}", get(operations::show))
        .route("/v1/operations/{id}/cancel", post(operations::cancel))
        .route("/v1/instances/{id}/diagnosis", get(diagnosis::diagnosis))
        .route("/v1/instances/{id}/events/{name}", post(signal::send_event))
        .route(
            "/v1/campaigns",
            get(routes::campaigns).post(campaigns::create),
        )
        .route(
            "/v1/campaigns/{name}",
            get(campaigns::show).delete(deletes::delete_campaign),
        )
        .route("/v1/campaigns/{name}/pause", post(deletes::pause_campaign))
        .route(
            "/v1/campaigns/{name}/unpause",
            post(deletes::unpause_campaign),
        )
        .route("/v1/campaigns/{name}/limit", put(campaigns::set_limit))
        .route(
            "/v1/campaigns/{name}/retention",
            get(retention::show).put(retention::set),
        )
        .route("/v1/nodes", get(routes::nodes))
        .route("/v1/leader", get(operator::leader))
        .route("/v1/stats", get(routes::stats))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{name}", delete(tokens::revoke))
        .route(
            "/v1/schedules",
            get(schedules::list).post(schedules::create),
        )
        .route(
            "/v1/schedules/{name}",
            get(schedules::show)
                .patch(schedules::update)
                .delete(schedules::delete),
        )
        .route("/v1/schedules/{name}/pause", post(schedules::pause))
        .route("/v1/schedules/{name}/unpause", post(schedules::unpause))
        .route("/v1/schedules/{name}/trigger", post(schedules::trigger))
        .route("/v1/schedules/{name}/backfill", post(schedules::backfill))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .merge(public)
        .merge(console::router(state.clone()))
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Failures are logged by `ApiError` where they are mapped, not a second time here.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(record_status)
                .on_failure(()),
        )
        .with_state(state)
}

/// One span per API request, named for its route (`POST /v1/instances`), at info so that it
/// is exported with the rest.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("", axum::extract::MatchedPath::as_str);
    tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
        url.path = request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    )
}

fn record_status<B>(
    response: &axum::http::Response<B>,
    _latency: std::time::Duration,
    span: &tracing::Span,
) {
    span.record("http.response.status_code", response.status().as_u16());
}

/// The OpenAPI 3 document served at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::ApiDoc::openapi()
}

/// Serves the API on `listener` until `shutdown` is cancelled, then stops accepting and lets
/// in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    // The caller announces the address; this is for debugging the API alone.
    tracing::debug!(%addr, "api serving");
    let stop_watching = shutdown.child_token();
    let mut state = state;
    state.live_stop = shutdown.child_token();
    let ends = tokio::spawn(
        state
            .ends
            .clone()
            .run(state.store.clone(), stop_watching.clone()),
    );
    let operations = state.operations.clone();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    operations.stop().await;
    stop_watching.cancel();
    let _ = ends.await;
    served?;
    tracing::debug!(%addr, "api stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
