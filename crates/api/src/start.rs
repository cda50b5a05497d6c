//! Starting instances: shared by `POST /v1/instances` and, later, the NATS start handler and
//! the scheduler.
//!
//! Instances are created at their entry step, with journal entry 0 and a `started` event, in
//! transactions of [`START_CHUNK`]; only after each commit are the step jobs of the READY ones
//! published. In a campaign with a limit, each chunk is admitted in its transaction under the
//! campaign's row lock: instances beyond the limit are created QUEUED (with a `queued` event)
//! and start in FIFO order as permits free. A publish that fails after the commit is logged
//! and otherwise ignored: the rows are the truth, and the sweeper re-dispatches READY
//! instances whose job went missing.
//!
//! A small start (up to [`LOCAL_START_MAX`] instances) on a node that also runs a worker with
//! free capacity ([`LocalWorker`]) is created already claimed by that node, which runs the
//! first steps at once: no job round trip through NATS, no claim statement. What does not fit
//! is published as usual.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use drover_bus::Bus;
use drover_core::{Definition, InstanceId, NodeId};
use drover_store::{Claimed, LocalClaim, NewInstance, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{ApiError, Result};
use crate::extract::check_storable;

/// The campaign instances join when the request names none.
pub const DEFAULT_CAMPAIGN: &str = "default";
/// The most instances one request may start.
pub const MAX_START_COUNT: u32 = 10_000;
/// Instances created per transaction (and published per batch).
pub const START_CHUNK: usize = 1_000;

/// The most instances of one start that its node runs itself ([`LocalWorker`]): a larger
/// start is spread over the cluster's workers through NATS.
pub const LOCAL_START_MAX: usize = 16;

/// The worker of this process, as a start sees it: room to run the first step of instances
/// claimed for its node as they are created.
pub trait LocalWorker: Send + Sync + std::fmt::Debug {
    /// Room for up to `max` steps now, if the worker runs, can claim and has any free.
    fn reserve(&self, max: usize) -> Option<Box<dyn LocalRoom>>;
}

/// Room on the local worker, given back when dropped unless used.
pub trait LocalRoom: Send {
    /// The node to claim the instances for.
    fn node(&self) -> NodeId;
    /// How many steps it has room for.
    fn room(&self) -> usize;
    /// Runs the first step of each of `claimed`.
    fn start(self: Box<Self>, claimed: Vec<Claimed>);
}

/// Start `count` instances of a workflow.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The workflow's name.
    pub workflow: String,
    /// A version number; the latest when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::dto::optional_integral"
    )]
    pub version: Option<i32>,
    /// A campaign name; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// Overrides the definition's `vars`, key by key. Must be a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub vars: Option<Value>,
    /// How many instances to start (1 to 10000); 1 when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::dto::optional_integral"
    )]
    #[schema(minimum = 1, maximum = 10000)]
    pub count: Option<u32>,
}

/// What [`start_instances`] started.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Started {
    /// One per instance, in creation order.
    #[schema(value_type = Vec<String>)]
    pub ids: Vec<InstanceId>,
    /// How many of them are `queued` behind the campaign's limit (they start as permits
    /// free, oldest first).
    pub queued: usize,
    pub workflow: String,
    /// The version the instances are pinned to.
    pub version: i32,
    pub campaign: String,
    /// With `?wait=`: the instance as the wait left it (ended, or still on its way when the
    /// wait lapsed: see `ended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<WaitResult>,
}

/// How a waited-for instance stands when the answer is given.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct WaitResult {
    /// Whether it ended (`completed`, `failed`, `stopped`, or `in_error`, which needs an
    /// operator); `false`: the wait lapsed first.
    pub ended: bool,
    pub instance: crate::dto::Instance,
}

/// Query parameters of `POST /v1/instances`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StartQuery {
    /// Answer when the (single) instance ends or after this long (e.g. `30s`, at most `5m`),
    /// with the instance as it is then, in `result`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(nullable = false, example = "30s")]
    pub wait: Option<String>,
}

impl StartQuery {
    /// The wait asked for, if any, checked against `count`.
    pub fn wait(&self, count: u32) -> Result<Option<std::time::Duration>> {
        let Some(text) = &self.wait else {
            return Ok(None);
        };
        let wait = humantime::parse_duration(text).map_err(|err| {
            ApiError::bad_parameter(
                "invalid_query",
                "query",
                "wait",
                &format!("{err} (e.g. `30s`)"),
            )
        })?;
        if wait > crate::wait::MAX_WAIT {
            return Err(ApiError::bad_parameter(
                "invalid_query",
                "query",
                "wait",
                "at most 5m",
            ));
        }
        if count != 1 {
            return Err(ApiError::invalid(
                "invalid_request",
                format!("wait is for one instance; count is {count}"),
            ));
        }
        Ok(Some(wait))
    }
}

/// Parsed definitions by `(name, version)`. A stored version never changes, so entries never
/// go stale; the cache is emptied when it reaches [`DefinitionCache::CAPACITY`] entries.
/// Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct DefinitionCache {
    parsed: Arc<RwLock<ParsedDefinitions>>,
}

/// `(name, version)` → the parsed definition.
type ParsedDefinitions = HashMap<(String, i32), Arc<Definition>>;

impl DefinitionCache {
    /// If unsure: more than the workflow versions a cluster starts instances of in a day.
    pub const CAPACITY: usize = 1_024;

    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self, name: &str, version: i32) -> Option<Arc<Definition>> {
        // A poisoned lock only means a panic elsewhere while holding it: the map is still a
        // valid cache.
        let parsed = self.parsed.read().unwrap_or_else(PoisonError::into_inner);
        parsed.get(&(name.to_owned(), version)).cloned()
    }

    fn insert(&self, name: &str, version: i32, definition: Arc<Definition>) {
        let mut parsed = self.parsed.write().unwrap_or_else(PoisonError::into_inner);
        if parsed.len() >= Self::CAPACITY {
            parsed.clear();
        }
        parsed.insert((name.to_owned(), version), definition);
    }
}

/// Starts the instances `request` asks for, as `actor` (`api`, `scheduler`, …); with
/// `announce_end`, each instance's end is announced (see [`crate::wait`]).
///
/// Errors: 422 `invalid_request` for a count out of range, non-object `vars`, or a string
/// Postgres cannot store (a NUL character) in any field; 404
/// `unknown_workflow` / `unknown_campaign`; store errors (503 when transient). If a later
/// chunk fails, the instances of earlier chunks exist and will run (logged at warn).
pub async fn start_instances(
    store: &Store,
    bus: &Bus,
    definitions: &DefinitionCache,
    actor: &str,
    request: StartRequest,
    announce_end: bool,
    local: Option<&dyn LocalWorker>,
) -> Result<Started> {
    // The API's extractor checked this already; other callers (a NATS start) may not have.
    for (field, text) in [
        ("workflow", Some(&request.workflow)),
        ("campaign", request.campaign.as_ref()),
    ] {
        if text.is_some_and(|text| text.contains('\0')) {
            return Err(ApiError::invalid_field(
                "invalid_request",
                field,
                crate::extract::NUL_PROBLEM,
            ));
        }
    }
    if let Some(vars) = &request.vars {
        check_storable(vars, "vars")?;
    }
    let count = request.count.unwrap_or(1);
    if !(1..=MAX_START_COUNT).contains(&count) {
        return Err(ApiError::invalid(
            "invalid_request",
            format!("count must be between 1 and {MAX_START_COUNT}, not {count}"),
        ));
    }
    let overrides = match request.vars {
        None => serde_json::Map::new(),
        Some(Value::Object(vars)) => vars,
        Some(other) => {
            return Err(ApiError::invalid(
                "invalid_request",
                format!("vars must be a JSON object, not {}", json_kind(&other)),
            ));
        }
    };

    let stored = store
        .get_definition(&request.workflow, request.version)
        .await?
        .ok_or_else(|| match request.version {
            Some(version) => ApiError::not_found(
                "unknown_workflow",
                format!("workflow {:?} has no version {version}", request.workflow),
            ),
            None => ApiError::not_found(
                "unknown_workflow",
                format!("unknown workflow {:?}", request.workflow),
            ),
        })?;
    if stored.deleted_at.is_some() {
        return Err(ApiError::not_found(
            "unknown_workflow",
            format!(
                "version {} of workflow {:?} was deleted; it starts no instances",
                stored.version, stored.name
            ),
        ));
    }
    let definition = match definitions.get(&stored.name, stored.version) {
        Some(definition) => definition,
        None => {
            let definition = Definition::from_json(&stored.body).map_err(|errors| {
                ApiError::Internal(format!(
                    "stored definition {} v{} no longer validates: {errors}",
                    stored.name, stored.version
                ))
            })?;
            let definition = Arc::new(definition);
            definitions.insert(&stored.name, stored.version, Arc::clone(&definition));
            definition
        }
    };

    let campaign_name = request.campaign.as_deref().unwrap_or(DEFAULT_CAMPAIGN);
    let campaign = store
        .campaign_by_name(campaign_name)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "unknown_campaign",
                format!("unknown campaign {campaign_name:?}"),
            )
        })?;

    let mut vars = definition.vars.clone();
    vars.extend(overrides);
    let vars = Value::Object(vars);
    let entry = definition.entry().id.as_str();
    let route = definition.route(definition.entry());

    let count = count as usize;
    let mut ids = Vec::with_capacity(count);
    let mut queued = 0;
    while ids.len() < count {
        let n = (count - ids.len()).min(START_CHUNK);
        let mut instances = Vec::with_capacity(n);
        for _ in 0..n {
            let id = InstanceId::new();
            instances.push(NewInstance {
                id,
                campaign: campaign.id,
                workflow: stored.name.clone(),
                version: stored.version,
                entry_step: entry.to_owned(),
                allow_retry: definition.entry().allow_retry,
                timeout_ms: definition.entry().timeout_ms(),
                route: route.clone(),
                vars: vars.clone(),
                announce_end,
            });
        }
        // Only a small start whose instances all fit one chunk runs here.
        let room = local
            .filter(|_| count <= LOCAL_START_MAX)
            .and_then(|local| local.reserve(n));
        let claim = room.as_ref().map(|room| LocalClaim {
            node: room.node(),
            max: room.room(),
        });
        let created = match store
            .create_instances_claiming(&instances, actor, claim)
            .await
        {
            Ok(created) => created,
            Err(err) => {
                if !ids.is_empty() {
                    tracing::warn!(
                        workflow = %stored.name,
                        campaign = %campaign.name,
                        created = ids.len(),
                        requested = count,
                        %err,
                        "start failed part-way; the instances already created will run"
                    );
                }
                return Err(err.into());
            }
        };
        queued += created.queued.len();
        if let Some(room) = room {
            room.start(created.claimed);
        }
        let jobs = created.ready;
        if let Err(err) = bus.publish_jobs(&jobs).await {
            tracing::warn!(
                workflow = %stored.name,
                campaign = %campaign.name,
                jobs = jobs.len(),
                %err,
                "publishing start jobs failed; the sweeper will re-dispatch them"
            );
        }
        drover_bus::trace::record_instance_roots(
            instances.iter().map(|instance| instance.id),
            &stored.name,
            &campaign.name,
        );
        ids.extend(instances.iter().map(|instance| instance.id));
    }
    tracing::info!(
        workflow = %stored.name,
        version = stored.version,
        campaign = %campaign.name,
        count,
        queued,
        actor,
        "instances started"
    );
    Ok(Started {
        ids,
        queued,
        workflow: stored.name,
        version: stored.version,
        campaign: campaign.name,
        result: None,
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
