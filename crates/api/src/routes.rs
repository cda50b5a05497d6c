//! The handlers of `/v1` and their OpenAPI description.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::{Extension, Json};
use drover_core::{Definition, InstanceId, InstanceState};
use drover_store::InstanceFilter;
use utoipa::OpenApi;

use crate::ApiState;
use crate::auth::{BearerSecurity, Principal};
use crate::dto::*;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Source};
use crate::start::{StartRequest, Started, start_instances};

/// Instances listed when the query gives no `limit`.
const DEFAULT_LIST_LIMIT: i64 = 100;
/// The most instances one listing returns; a larger `limit` is capped.
const MAX_LIST_LIMIT: i64 = 1_000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Drover API",
        description = "Deploy workflow definitions, start instances and inspect them. Every \
                       error is `{\"error\": {\"code\", \"message\", \"details\"?}}`."
    ),
    paths(
        deploy,
        list_workflows,
        show_workflow,
        start,
        list_instances,
        show_instance,
        journal,
        crate::operator::resume,
        crate::lifecycle::pause,
        crate::lifecycle::unpause,
        crate::lifecycle::stop,
        crate::lifecycle::kill,
        crate::lifecycle::restart,
        crate::lifecycle::pause_many,
        crate::lifecycle::unpause_many,
        crate::lifecycle::stop_many,
        crate::lifecycle::kill_many,
        crate::lifecycle::restart_many,
        crate::diagnosis::diagnosis,
        crate::signal::send_event,
        campaigns,
        crate::campaigns::create,
        crate::campaigns::show,
        crate::campaigns::set_limit,
        nodes,
        crate::operator::leader,
        stats,
        crate::tokens::create,
        crate::tokens::list,
        crate::tokens::revoke,
        openapi,
        healthz,
        readyz
    ),
    components(schemas(
        ErrorBody,
        Deployment,
        WorkflowList,
        Workflow,
        StartRequest,
        Started,
        InstanceList,
        Instance,
        InstanceStateSchema,
        Journal,
        CampaignList,
        Campaign,
        crate::campaigns::CreateCampaign,
        crate::campaigns::SetLimit,
        crate::campaigns::LimitChanged,
        NodeList,
        Stats,
        crate::operator::ResumeRequest,
        crate::operator::ResumeMode,
        crate::operator::Leader,
        crate::lifecycle::LifecycleRequest,
        crate::lifecycle::LifecycleFilterRequest,
        crate::lifecycle::LifecycleResult,
        crate::lifecycle::LifecycleSummary,
        crate::lifecycle::Cascaded,
        crate::lifecycle::RefusalEntry,
        crate::diagnosis::Diagnosis,
        crate::signal::EventDelivered,
        crate::signal::Delivered,
        crate::tokens::CreateToken,
        crate::tokens::CreatedToken,
        crate::tokens::TokenInfo,
        crate::tokens::TokenList,
        crate::tokens::ScopeSchema,
        Readiness,
        ReadinessChecks
    )),
    modifiers(&BearerSecurity),
    tags(
        (name = "workflows", description = "Workflow definitions and their versions"),
        (name = "instances", description = "Starting and inspecting workflow instances"),
        (name = "cluster", description = "Campaigns, nodes and counts")
    )
)]
pub(crate) struct ApiDoc;

/// Deploy a definition.
///
/// The body is the definition source, YAML or JSON, with any content type. A definition
/// identical to the latest version stores nothing and answers 200 with `created: false`.
#[utoipa::path(
    post,
    path = "/v1/workflows",
    tag = "workflows",
    request_body(
        description = "The definition source (YAML or JSON), at most 1 MiB",
        content((String = "application/yaml"), (String = "application/json"), (String = "text/plain"))
    ),
    responses(
        (status = 201, description = "A new version was stored", body = Deployment),
        (status = 200, description = "Identical to the latest version: nothing stored", body = Deployment),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Invalid definition; `details` names each step and field", body = ErrorBody),
    )
)]
pub(crate) async fn deploy(
    State(state): State<ApiState>,
    Source(source): Source,
) -> Result<(StatusCode, Json<Deployment>)> {
    let definition =
        Definition::parse(&source).map_err(|errors| ApiError::invalid_definition(&errors))?;
    definition
        .check_publish(&state.publish)
        .map_err(|errors| ApiError::invalid_definition(&errors))?;
    let deployed = state
        .store
        .deploy_definition(&definition.name, &definition.to_json(), &source)
        .await?;
    let status = if deployed.created {
        tracing::info!(workflow = %deployed.name, version = deployed.version, "workflow deployed");
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(deployed.into())))
}

/// List workflows (the latest version of each).
#[utoipa::path(
    get,
    path = "/v1/workflows",
    tag = "workflows",
    responses((status = 200, body = WorkflowList))
)]
pub(crate) async fn list_workflows(State(state): State<ApiState>) -> Result<Json<WorkflowList>> {
    let workflows = state.store.list_definitions().await?;
    Ok(Json(WorkflowList {
        workflows: workflows.into_iter().map(Into::into).collect(),
    }))
}

/// Show a workflow version: its canonical definition and its source.
#[utoipa::path(
    get,
    path = "/v1/workflows/{name}",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name"), VersionQuery),
    responses(
        (status = 200, body = Workflow),
        (status = 404, description = "Unknown workflow or version", body = ErrorBody),
    )
)]
pub(crate) async fn show_workflow(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<VersionQuery>,
) -> Result<Json<Workflow>> {
    match state.store.get_definition(&name, query.version).await? {
        Some(stored) => Ok(Json(stored.into())),
        None => Err(match query.version {
            Some(version) => ApiError::not_found(
                "not_found",
                format!("workflow {name:?} has no version {version}"),
            ),
            None => ApiError::not_found("not_found", format!("unknown workflow {name:?}")),
        }),
    }
}

/// Start instances of a workflow.
///
/// Each starts READY at the definition's entry step, with the definition's `vars` overridden
/// key by key by the request's.
#[utoipa::path(
    post,
    path = "/v1/instances",
    tag = "instances",
    request_body = StartRequest,
    responses(
        (status = 201, description = "The instances were created and their jobs dispatched", body = Started),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "Unknown workflow, version or campaign", body = ErrorBody),
        (status = 422, description = "Count out of range, or vars not an object", body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    ApiJson(request): ApiJson<StartRequest>,
) -> Result<(StatusCode, Json<Started>)> {
    let started = start_instances(
        &state.store,
        &state.bus,
        &state.definitions,
        &principal.name,
        request,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(started)))
}

/// List instances, newest first.
#[utoipa::path(
    get,
    path = "/v1/instances",
    tag = "instances",
    params(ListQuery),
    responses(
        (status = 200, body = InstanceList),
        (status = 400, description = "An unknown state, a malformed `before` or a bad `limit`", body = ErrorBody),
    )
)]
pub(crate) async fn list_instances(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<InstanceList>> {
    let filter = instance_filter(query)?;
    let instances = state.store.list_instances(&filter).await?;
    Ok(Json(InstanceList {
        instances: instances.into_iter().map(Into::into).collect(),
    }))
}

fn instance_filter(query: ListQuery) -> Result<InstanceFilter> {
    let state = query
        .state
        .as_deref()
        .map(str::parse::<InstanceState>)
        .transpose()
        .map_err(|err| ApiError::bad_request("invalid_query", err.to_string()))?;
    let limit = match query.limit {
        None => DEFAULT_LIST_LIMIT,
        Some(limit) if limit < 1 => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("limit must be at least 1, not {limit}"),
            ));
        }
        Some(limit) => limit.min(MAX_LIST_LIMIT),
    };
    let before = query.before.as_deref().map(parse_id).transpose()?;
    Ok(InstanceFilter {
        state,
        campaign: query.campaign,
        workflow: query.workflow,
        before,
        limit,
    })
}

pub(crate) fn parse_id(id: &str) -> Result<InstanceId> {
    id.parse().map_err(|err| {
        ApiError::bad_request("invalid_id", format!("malformed instance id {id:?}: {err}"))
    })
}

pub(crate) fn unknown_instance(id: InstanceId) -> ApiError {
    ApiError::not_found("not_found", format!("unknown instance {id}"))
}

/// Show an instance.
#[utoipa::path(
    get,
    path = "/v1/instances/{id}",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The instance id")),
    responses(
        (status = 200, body = Instance),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown instance", body = ErrorBody),
    )
)]
pub(crate) async fn show_instance(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Instance>> {
    let id = parse_id(&id)?;
    match state.store.get_instance(id).await? {
        Some(instance) => Ok(Json(instance.into())),
        None => Err(unknown_instance(id)),
    }
}

/// An instance's journal: every transition in checkpoint order.
#[utoipa::path(
    get,
    path = "/v1/instances/{id}/journal",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The instance id")),
    responses(
        (status = 200, body = Journal),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "Unknown instance", body = ErrorBody),
    )
)]
pub(crate) async fn journal(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Journal>> {
    let id = parse_id(&id)?;
    match state.store.journal(id).await? {
        Some(entries) => Ok(Json(Journal {
            instance: id,
            entries: entries.into_iter().map(Into::into).collect(),
        })),
        None => Err(unknown_instance(id)),
    }
}

/// List campaigns with their limits, current counts and queue ages.
#[utoipa::path(get, path = "/v1/campaigns", tag = "cluster", responses((status = 200, body = CampaignList)))]
pub(crate) async fn campaigns(State(state): State<ApiState>) -> Result<Json<CampaignList>> {
    let campaigns = state.store.campaign_statuses().await?;
    Ok(Json(CampaignList {
        campaigns: campaigns.into_iter().map(Into::into).collect(),
    }))
}

/// List the cluster's nodes, newest first.
#[utoipa::path(get, path = "/v1/nodes", tag = "cluster", responses((status = 200, body = NodeList)))]
pub(crate) async fn nodes(State(state): State<ApiState>) -> Result<Json<NodeList>> {
    let nodes = state.store.list_nodes().await?;
    Ok(Json(NodeList {
        nodes: nodes.into_iter().map(Into::into).collect(),
    }))
}

/// Count instances by state.
#[utoipa::path(get, path = "/v1/stats", tag = "cluster", responses((status = 200, body = Stats)))]
pub(crate) async fn stats(State(state): State<ApiState>) -> Result<Json<Stats>> {
    let counts = state.store.count_by_state().await?;
    Ok(Json(Stats {
        instances: StateCounts(counts),
    }))
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "cluster",
    security(()),
    responses((status = 200, description = "The OpenAPI 3 document of this API", content_type = "application/json"))
)]
pub(crate) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Liveness: 200 `ok` while the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "cluster",
    security(()),
    responses((status = 200, description = "The process serves HTTP", body = String, content_type = "text/plain"))
)]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: 200 when Postgres answers and NATS is connected, else 503; either way the body
/// says what was checked, and warns when authentication is off.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "cluster",
    security(()),
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "A dependency is unreachable; `checks` says which", body = Readiness),
    )
)]
pub(crate) async fn readyz(State(state): State<ApiState>) -> (StatusCode, Json<Readiness>) {
    let postgres = match tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(err)) => format!("unreachable: {err}"),
        Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
    };
    let nats = if state.bus.is_connected() {
        "ok".to_owned()
    } else {
        "disconnected (reconnecting)".to_owned()
    };
    let ready = postgres == "ok" && nats == "ok";
    let auth = if state.auth.enabled() { "on" } else { "off" };
    let mut warnings = Vec::new();
    if !state.auth.enabled() {
        warnings.push(
            "authentication is off (--auth off): anyone who reaches this API is an admin"
                .to_owned(),
        );
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            checks: ReadinessChecks { postgres, nats },
            auth: auth.to_owned(),
            warnings,
        }),
    )
}

/// How long `/readyz` waits for Postgres.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found("not_found", format!("no route for {method} {}", uri.path()))
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        message: format!("{} does not support {method}", uri.path()),
    }
}
