//! The handlers of `/v1` and their OpenAPI description.

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::{Extension, Json};
use drover_core::ids::is_slug;
use drover_core::{Definition, DefinitionError, DefinitionErrors, InstanceState, StepSeq};
use drover_store::InstanceFilter;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, ArrayBuilder, Object, ObjectBuilder, Schema,
    SchemaType, Type,
};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{Modify, OpenApi};

use crate::ApiState;
use crate::auth::{BearerSecurity, Principal};
use crate::dto::*;
use crate::error::{ApiError, ErrorBody, Result, unknown_instance};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Slug, Source, parse_id, unstorable};
use crate::start::{StartQuery, StartRequest, Started, WaitResult, start_instances};

/// Instances listed when the query gives no `limit`.
const DEFAULT_LIST_LIMIT: i64 = 100;
/// The most instances one listing returns; a larger `limit` is capped.
const MAX_LIST_LIMIT: i64 = 1_000;
/// With `include=vars`, a listing stops before its instances' vars exceed this many bytes of
/// JSON (the first instance is listed whatever its size): a page of 1000 instances with 1 MB
/// of vars each would be a 1 GB response.
pub(crate) const MAX_LIST_VARS_BYTES: usize = 4 * 1024 * 1024;
/// Journal entries given when the query gives no `limit`.
const DEFAULT_JOURNAL_LIMIT: i64 = 100;
/// The most journal entries one page gives; a larger `limit` is capped.
const MAX_JOURNAL_LIMIT: i64 = 1_000;
/// A journal page stops before its entries' outputs and errors exceed this many bytes (the
/// first entry is given whatever its size).
pub(crate) const MAX_JOURNAL_PAGE_BYTES: usize = 4 * 1024 * 1024;

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
        crate::states::states,
        crate::operator::resume,
        crate::lifecycle::handlers::pause,
        crate::lifecycle::handlers::unpause,
        crate::lifecycle::handlers::stop,
        crate::lifecycle::handlers::kill,
        crate::lifecycle::handlers::restart,
        crate::lifecycle::handlers::pause_many,
        crate::lifecycle::handlers::unpause_many,
        crate::lifecycle::handlers::stop_many,
        crate::lifecycle::handlers::kill_many,
        crate::lifecycle::handlers::restart_many,
        crate::operations::start,
        crate::operations::show,
        crate::operations::cancel,
        crate::diagnosis::diagnosis,
        crate::signal::send_event,
        campaigns,
        crate::campaigns::create,
        crate::campaigns::show,
        crate::campaigns::set_limit,
        crate::retention::show,
        crate::retention::set,
        crate::deletes::delete_workflow,
        crate::deletes::delete_campaign,
        crate::deletes::pause_campaign,
        crate::deletes::unpause_campaign,
        nodes,
        crate::operator::leader,
        stats,
        crate::tokens::create,
        crate::tokens::list,
        crate::tokens::revoke,
        crate::schedules::list,
        crate::schedules::create,
        crate::schedules::show,
        crate::schedules::update,
        crate::schedules::delete,
        crate::schedules::pause,
        crate::schedules::unpause,
        crate::schedules::trigger,
        crate::schedules::backfill,
        openapi,
        crate::contract::asyncapi,
        crate::contract::event_schema,
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
        InstanceSummary,
        ListInclude,
        Instance,
        InstanceStateSchema,
        Journal,
        CampaignList,
        Campaign,
        crate::campaigns::CreateCampaign,
        crate::campaigns::SetLimit,
        crate::deletes::WorkflowDeletedView,
        crate::deletes::CampaignDeletedView,
        crate::deletes::CampaignPauseView,
        crate::campaigns::LimitChanged,
        crate::retention::SetRetention,
        crate::retention::Retention,
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
        crate::operations::StartOperation,
        crate::operations::Operation,
        crate::states::StatesRequest,
        crate::states::InstanceStates,
        crate::states::InstanceAt,
        crate::diagnosis::Diagnosis,
        crate::signal::EventDelivered,
        crate::signal::Delivered,
        crate::tokens::CreateToken,
        crate::tokens::CreatedToken,
        crate::tokens::TokenInfo,
        crate::tokens::TokenList,
        crate::tokens::ScopeSchema,
        crate::schedules::CreateSchedule,
        crate::schedules::ScheduleSpec,
        crate::schedules::PauseSchedule,
        crate::schedules::Backfill,
        crate::schedules::FireRecord,
        crate::schedules::ScheduleView,
        crate::schedules::ScheduleDetail,
        crate::schedules::ScheduleList,
        crate::schedules::ManualFired,
        crate::schedules::ManualFireView,
        crate::schedules::DeletedSchedule,
        Readiness,
        ReadinessChecks
    )),
    modifiers(&CommonResponses, &BearerSecurity),
    tags(
        (name = "workflows", description = "Workflow definitions and their versions"),
        (name = "instances", description = "Starting and inspecting workflow instances"),
        (name = "cluster", description = "Campaigns, nodes and counts"),
        (name = "schedules", description = "Workflows started on a cron or interval schedule")
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
    check_subworkflows(&state, &definition).await?;
    let body = definition.to_json();
    // A YAML `"\0"` or JSON `"\u0000"` escape decodes to a NUL, which `jsonb` refuses.
    if let Some((field, message)) = unstorable(&body, "") {
        return Err(ApiError::invalid_definition(&DefinitionErrors(vec![
            DefinitionError {
                step: None,
                field,
                message,
            },
        ])));
    }
    let deployed = state
        .store
        .deploy_definition(&definition.name, &body, &source)
        .await?;
    let status = if deployed.created {
        tracing::info!(workflow = %deployed.name, version = deployed.version, "workflow deployed");
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(deployed.into())))
}

/// Every `subworkflow` must name a deployed workflow (and version, when it gives one): the
/// rule is core's ([`Definition::check_subworkflows`]); this reads what the store holds of the
/// workflows it names.
async fn check_subworkflows(state: &ApiState, definition: &Definition) -> Result<()> {
    let mut deployed = std::collections::HashMap::new();
    for (_, workflow, _) in definition.subworkflows() {
        if deployed.contains_key(workflow) {
            continue;
        }
        if let Some(latest) = state.store.get_definition(workflow, None).await? {
            deployed.insert(workflow.to_owned(), latest.version);
        }
    }
    definition
        .check_subworkflows(&deployed)
        .map_err(|errors| ApiError::invalid_definition(&errors))
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
    params(
        ("name" = String, Path, pattern = "^[a-z0-9][a-z0-9_-]{0,62}$", description = "The workflow's name"),
        VersionQuery
    ),
    responses(
        (status = 200, body = Workflow),
        (status = 404, description = "Unknown workflow or version", body = ErrorBody),
    )
)]
pub(crate) async fn show_workflow(
    State(state): State<ApiState>,
    ApiPath(Slug(name)): ApiPath<Slug>,
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
    params(StartQuery),
    responses(
        (status = 201, description = "The instances were created and their jobs dispatched (with `wait`: answered once the instance ended or the wait lapsed, `result` saying which)", body = Started),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "Unknown workflow, version or campaign", body = ErrorBody),
        (status = 415, description = "No `Content-Type: application/json` (`unsupported_media_type`)", body = ErrorBody),
        (status = 422, description = "Count out of range, vars not an object, or `wait` with a count other than 1", body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(query): ApiQuery<StartQuery>,
    ApiJson(request): ApiJson<StartRequest>,
) -> Result<(StatusCode, Json<Started>)> {
    let wait = query.wait(request.count.unwrap_or(1))?;
    let mut started = start_instances(
        &state.store,
        &state.bus,
        &state.definitions,
        &principal.name,
        request,
        wait.is_some(),
        state.local.as_deref(),
    )
    .await?;
    if let (Some(wait), [id]) = (wait, started.ids.as_slice()) {
        let instance = state
            .ends
            .wait_for_end(&state.store, *id, wait)
            .await?
            .ok_or_else(|| ApiError::not_found("not_found", format!("unknown instance {id}")))?;
        started.result = Some(WaitResult {
            ended: crate::wait::has_ended(instance.state),
            instance: instance.into(),
        });
    }
    Ok((StatusCode::CREATED, Json(started)))
}

/// List instances, newest first, as summaries.
///
/// Without `include=vars` no instance's `vars` are listed (nor read). A page holds at most
/// `limit` instances and, with `include=vars`, stops once their vars reach 4 MiB of JSON
/// (at least one instance is listed); `next` is then the `before` of the next page.
#[utoipa::path(
    get,
    path = "/v1/instances",
    tag = "instances",
    params(ListQuery),
    responses(
        (status = 200, body = InstanceList),
        (status = 400, description = "`invalid_query`: an unknown state or `include`, a name that is not a slug, a bad `limit`; `invalid_id`: a malformed `before`", body = ErrorBody),
    )
)]
pub(crate) async fn list_instances(
    State(state): State<ApiState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<InstanceList>> {
    let filter = instance_filter(query)?;
    let page = state.store.list_instances(&filter).await?;
    let next = if page.more {
        page.instances.last().map(|i| i.id)
    } else {
        None
    };
    Ok(Json(InstanceList {
        instances: page.instances.into_iter().map(Into::into).collect(),
        next,
    }))
}

fn instance_filter(query: ListQuery) -> Result<InstanceFilter> {
    let state = query
        .state
        .as_deref()
        .map(str::parse::<InstanceState>)
        .transpose()
        .map_err(|err| ApiError::bad_request("invalid_query", err.to_string()))?;
    let limit = page_limit(query.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    for (parameter, name) in [("campaign", &query.campaign), ("workflow", &query.workflow)] {
        if let Some(name) = name
            && !is_slug(name)
        {
            return Err(ApiError::bad_parameter(
                "invalid_query",
                "query",
                parameter,
                &format!("{name:?} is not a slug ([a-z0-9][a-z0-9_-], at most 63 characters)"),
            ));
        }
    }
    let before = query.before.as_deref().map(parse_id).transpose()?;
    let parent = query.parent.as_deref().map(parse_id).transpose()?;
    Ok(InstanceFilter {
        state,
        campaign: query.campaign,
        workflow: query.workflow,
        parent,
        before,
        limit,
        vars_budget: (query.include == Some(ListInclude::Vars)).then_some(MAX_LIST_VARS_BYTES),
    })
}

/// A page size from `limit`: `default` when absent, at most `max`, 400 below 1.
fn page_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64> {
    match limit {
        None => Ok(default),
        Some(limit) if limit < 1 => Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be at least 1, not {limit}"),
        )),
        Some(limit) => Ok(limit.min(max)),
    }
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

/// A page of an instance's journal: its transitions in checkpoint order.
///
/// A page holds at most `limit` entries and stops once their outputs and errors reach 4 MiB
/// (at least one entry is given); `next` is then the `after` of the next page.
#[utoipa::path(
    get,
    path = "/v1/instances/{id}/journal",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The instance id"), JournalQuery),
    responses(
        (status = 200, body = Journal),
        (status = 400, description = "`invalid_id`: a malformed id; `invalid_query`: a bad `limit` or `after`", body = ErrorBody),
        (status = 404, description = "Unknown instance", body = ErrorBody),
    )
)]
pub(crate) async fn journal(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<JournalQuery>,
) -> Result<Json<Journal>> {
    let id = parse_id(&id)?;
    let limit = page_limit(query.limit, DEFAULT_JOURNAL_LIMIT, MAX_JOURNAL_LIMIT)?;
    let after = match query.after {
        Some(after) if after < 0 => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("after must be a checkpoint (0 or more), not {after}"),
            ));
        }
        after => after.map(StepSeq),
    };
    match state
        .store
        .journal_page(id, after, limit, MAX_JOURNAL_PAGE_BYTES)
        .await?
    {
        Some(page) => {
            let next = if page.more {
                page.entries.last().map(|e| e.step_seq)
            } else {
                None
            };
            Ok(Json(Journal {
                instance: id,
                entries: page.entries.into_iter().map(Into::into).collect(),
                next,
            }))
        }
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

/// Completes the document with what every route shares, so each route's own description need
/// not repeat it and none can forget it:
///
/// - 500 `internal` and 503 `unavailable` on every route that reads the store;
/// - 400 on every route with path or query parameters (`invalid_path`, `invalid_query`,
///   `invalid_id`: a malformed value, or one holding a NUL character);
/// - 413 and 422 (`invalid_request`: a string holding a NUL character, named in `details`) on
///   every route with a body;
/// - the rule of a lifecycle filter: at least one of `campaign`, `workflow` and `state`.
pub(crate) struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut request_schemas = Vec::new();
        for (path, item) in openapi.paths.paths.iter_mut() {
            let local = matches!(
                path.as_str(),
                "/healthz"
                    | "/readyz"
                    | "/v1/openapi.json"
                    | "/v1/asyncapi.json"
                    | "/v1/schemas/events/{type}"
            );
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                complete_operation(operation, local);
                request_schemas.extend(request_schema_names(operation));
            }
        }
        if let Some(components) = openapi.components.as_mut() {
            for name in &request_schemas {
                if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) {
                    for property in object.properties.values_mut() {
                        if let RefOr::T(Schema::Object(property)) = property {
                            storable_only(property);
                        }
                    }
                }
            }
            components
                .schemas
                .insert("StorableJson".to_owned(), RefOr::T(storable_json()));
            if let Some(filter) = components.schemas.get_mut("LifecycleFilterRequest") {
                let original = std::mem::replace(filter, RefOr::T(Schema::default()));
                let one_of_them = ["campaign", "workflow", "state"]
                    .into_iter()
                    .fold(AnyOfBuilder::new(), |any, field| {
                        any.item(
                            ObjectBuilder::new()
                                .required(field)
                                .property(field, ObjectBuilder::new().schema_type(Type::String)),
                        )
                    })
                    .build();
                *filter = RefOr::T(Schema::AllOf(
                    AllOfBuilder::new()
                        .item(original)
                        .item(RefOr::T(Schema::AnyOf(one_of_them)))
                        .description(Some(
                            "At least one of `campaign`, `workflow` and `state` (not null).",
                        ))
                        .build(),
                ));
            }
        }
    }
}

/// A string without NUL characters: what Postgres can store.
const NO_NUL_PATTERN: &str = r"^[^\u0000]*$";

/// Narrows a request schema to what can be stored: strings without NUL characters; free-form
/// JSON objects (`vars`, `set`) to [`storable_json`] members under keys without NUL.
fn storable_only(schema: &mut Object) {
    let is = |wanted: Type| match &schema.schema_type {
        SchemaType::Type(t) => *t == wanted,
        SchemaType::Array(types) => types.contains(&wanted),
        SchemaType::AnyValue => false,
    };
    if is(Type::String) && schema.pattern.is_none() && schema.enum_values.is_none() {
        schema.pattern = Some(NO_NUL_PATTERN.to_owned());
    }
    if is(Type::Object) && schema.properties.is_empty() && schema.additional_properties.is_none() {
        schema.additional_properties = Some(Box::new(AdditionalProperties::RefOr(
            Ref::from_schema_name("StorableJson").into(),
        )));
        schema.property_names = Some(Box::new(no_nul_string().into()));
    }
}

fn no_nul_string() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(NO_NUL_PATTERN))
        .build()
}

/// Any JSON Postgres can store: no string or key holds a NUL character.
fn storable_json() -> Schema {
    let json = || RefOr::Ref(Ref::from_schema_name("StorableJson"));
    Schema::AnyOf(
        AnyOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(SchemaType::Array(vec![
                Type::Null,
                Type::Boolean,
                Type::Number,
            ])))
            .item(no_nul_string())
            .item(ArrayBuilder::new().items(json()))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .additional_properties(Some(json()))
                    .property_names(Some(no_nul_string())),
            )
            .description(Some(
                "Any JSON whose strings and keys hold no NUL character (U+0000): Postgres \
                 cannot store one.",
            ))
            .build(),
    )
}

fn complete_operation(operation: &mut Operation, local: bool) {
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description));
    };
    if local {
        return;
    }
    let has_params = operation
        .parameters
        .as_ref()
        .is_some_and(|params| !params.is_empty());
    if has_params {
        add(
            "400",
            "A malformed path or query parameter, or one holding a NUL character \
             (`invalid_path`, `invalid_query`, `invalid_id`)",
        );
    }
    if let Some(body) = operation.request_body.as_mut() {
        for content in body.content.values_mut() {
            match &mut content.schema {
                // Free-form JSON (an event's payload): what can be stored.
                Some(RefOr::T(Schema::Object(object)))
                    if object.schema_type == SchemaType::AnyValue =>
                {
                    content.schema = Some(RefOr::Ref(Ref::from_schema_name("StorableJson")));
                }
                Some(RefOr::T(Schema::Object(object))) => storable_only(object),
                _ => {}
            }
        }
        add("413", "Body over 1 MiB (`payload_too_large`)");
        add(
            "422",
            "A string in the body holds a NUL character, which cannot be stored \
             (`invalid_request`; `details` names the field)",
        );
    }
    add("500", "A bug or corrupt stored data (`internal`)");
    add(
        "503",
        "The database or message bus is unavailable; try again (`unavailable`)",
    );
}

/// The component schemas an operation's request body refers to (`T` or `T | null`).
fn request_schema_names(operation: &Operation) -> Vec<String> {
    let Some(body) = &operation.request_body else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut push = |schema: &RefOr<Schema>| {
        if let RefOr::Ref(reference) = schema
            && let Some(name) = reference.ref_location.strip_prefix("#/components/schemas/")
        {
            names.push(name.to_owned());
        }
    };
    for content in body.content.values() {
        match &content.schema {
            Some(RefOr::T(Schema::OneOf(one_of))) => one_of.items.iter().for_each(&mut push),
            Some(schema) => push(schema),
            None => {}
        }
    }
    names
}

fn error_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}
