//! Schedules: `/v1/schedules` (admin scope to change, viewer to read). A schedule starts an
//! instance of a workflow at each fire time of a cron expression (optional seconds field, in
//! an IANA time zone, DST-correct) or of a fixed interval; the leader coordinator fires them
//! exactly once each (see the store's `schedules` module). Trigger and backfill start
//! instances here, at once, and publish their jobs after the store's commit.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use drover_core::InstanceId;
use drover_core::StepJob;
use drover_core::schedule::OverlapPolicy;
use drover_store::{
    CadenceSpec, DEFAULT_CATCHUP_WINDOW, ManualFires, NewSchedule, Schedule, ScheduleFire,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiJson, ApiPath, Slug};

/// Fire times shown ahead by `GET /v1/schedules/{name}`.
const NEXT_FIRES: usize = 5;
/// Recent fires shown by `GET /v1/schedules/{name}`.
const RECENT_FIRES: i64 = 20;

/// Create a schedule: `cron` (with an optional `timezone`) or `every`, not both.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// A slug (`[a-z0-9][a-z0-9_-]{0,62}`).
    #[schema(pattern = "^[a-z0-9][a-z0-9_-]{0,62}$")]
    pub name: String,
    #[serde(flatten)]
    pub spec: ScheduleSpec,
}

/// What a schedule does. On update, absent fields keep their value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// The workflow started (its latest version at each fire). Required on create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// A cron expression: 5 fields, or 6 with a leading seconds field (`*/2 * * * * *`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The IANA time zone the cron expression is read in; `UTC` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// An interval instead of `cron` (`30s`, `5m`; at least `1s`), counted from the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// Overrides of the workflow's `vars` (an object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub vars: Option<Value>,
    /// The campaign the instances join; `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// `skip` (default), `buffer_one`, `allow_all`, `cancel_other` or `terminate_other`: what
    /// a fire does while the schedule's previous run is still live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<String>,
    /// Fires missed (no leader running) are still run when at most this late (`1m` when
    /// absent); older ones are recorded `skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catchup_window: Option<String>,
    /// Delay each fire by up to this long (deterministic per fire); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    /// No fire before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    /// No fire after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_at: Option<DateTime<Utc>>,
}

/// Pause a schedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseSchedule {
    /// Why, for the next person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Run a schedule for each of its fire times in `[from, to]` not run yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backfill {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// One fire time and what became of it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct FireRecord {
    pub fire_at: DateTime<Utc>,
    /// `fired`, `skipped` or `buffered`.
    pub outcome: String,
    /// fired: `on_time`, `catch_up`, `buffered`, `trigger`, `backfill`; skipped: `missed`,
    /// `overlap`, `error`.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub instance: Option<InstanceId>,
    pub recorded_at: DateTime<Utc>,
}

impl From<ScheduleFire> for FireRecord {
    fn from(f: ScheduleFire) -> Self {
        Self {
            fire_at: f.fire_at,
            outcome: f.outcome.as_str().to_owned(),
            reason: f.reason,
            instance: f.instance,
            recorded_at: f.recorded_at,
        }
    }
}

/// A schedule.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ScheduleView {
    pub name: String,
    pub workflow: String,
    pub campaign: String,
    #[schema(value_type = Object)]
    pub vars: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    pub overlap: String,
    pub catchup_window: String,
    pub jitter: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_at: Option<DateTime<Utc>>,
    pub paused: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The next fire time; absent when none is left (past `end_at`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_fire_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fire: Option<FireRecord>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl From<Schedule> for ScheduleView {
    fn from(s: Schedule) -> Self {
        let (cron, timezone, every) = match s.cadence {
            CadenceSpec::Cron { expr, timezone } => (Some(expr), Some(timezone), None),
            CadenceSpec::Every(every) => (None, None, Some(text(every))),
        };
        Self {
            name: s.name,
            workflow: s.workflow,
            campaign: s.campaign,
            vars: s.vars,
            cron,
            timezone,
            every,
            overlap: s.overlap.as_str().to_owned(),
            catchup_window: text(s.catchup_window),
            jitter: text(s.jitter),
            start_at: s.start_at,
            end_at: s.end_at,
            paused: s.paused,
            note: s.note,
            next_fire_at: s.next_fire_at,
            last_fire: s.last_fire.map(Into::into),
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// A schedule with its next fire times and recent fires.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ScheduleDetail {
    #[serde(flatten)]
    pub schedule: ScheduleView,
    /// The next 5 fire times (paused or not).
    pub next_fires: Vec<DateTime<Utc>>,
    /// The latest fires, newest first.
    pub recent_fires: Vec<FireRecord>,
}

/// Every schedule.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleView>,
}

/// What a trigger or backfill started.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ManualFired {
    pub schedule: String,
    pub fires: Vec<ManualFireView>,
}

/// One fire time of a trigger or backfill.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ManualFireView {
    pub fire_at: DateTime<Utc>,
    /// The instance started; absent when that fire time had been run already.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub instance: Option<InstanceId>,
}

fn duration(field: &str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text)
        .map_err(|err| ApiError::invalid("invalid_request", format!("{field} {text:?}: {err}")))
}

/// `spec` laid over `base` (an update) or over the defaults (a create).
fn merge(name: &str, spec: ScheduleSpec, base: Option<&Schedule>) -> Result<NewSchedule> {
    let workflow = spec
        .workflow
        .or_else(|| base.map(|b| b.workflow.clone()))
        .ok_or_else(|| ApiError::invalid("invalid_request", "workflow is required"))?;
    let cadence = match (spec.cron, spec.every) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "invalid_request",
                "give cron or every, not both",
            ));
        }
        (Some(expr), None) => CadenceSpec::Cron {
            expr,
            timezone: spec.timezone.unwrap_or_else(|| "UTC".to_owned()),
        },
        (None, Some(every)) => CadenceSpec::Every(duration("every", &every)?),
        (None, None) => match (base, spec.timezone) {
            (Some(b), Some(tz)) => match &b.cadence {
                CadenceSpec::Cron { expr, .. } => CadenceSpec::Cron {
                    expr: expr.clone(),
                    timezone: tz,
                },
                CadenceSpec::Every(_) => {
                    return Err(ApiError::invalid(
                        "invalid_request",
                        "timezone applies to a cron schedule",
                    ));
                }
            },
            (Some(b), None) => b.cadence.clone(),
            (None, _) => {
                return Err(ApiError::invalid("invalid_request", "give cron or every"));
            }
        },
    };
    let overlap = match spec.overlap {
        Some(text) => text
            .parse::<OverlapPolicy>()
            .map_err(|err| ApiError::invalid("invalid_request", err.to_string()))?,
        None => base.map(|b| b.overlap).unwrap_or_default(),
    };
    let catchup_window = match spec.catchup_window {
        Some(text) => duration("catchup_window", &text)?,
        None => base.map_or(DEFAULT_CATCHUP_WINDOW, |b| b.catchup_window),
    };
    let jitter = match spec.jitter {
        Some(text) => duration("jitter", &text)?,
        None => base.map_or(Duration::ZERO, |b| b.jitter),
    };
    let vars = spec
        .vars
        .or_else(|| base.map(|b| b.vars.clone()))
        .unwrap_or_else(|| Value::Object(Default::default()));
    if !vars.is_object() {
        return Err(ApiError::invalid(
            "invalid_request",
            "vars must be a JSON object",
        ));
    }
    Ok(NewSchedule {
        name: name.to_owned(),
        workflow,
        campaign: spec
            .campaign
            .or_else(|| base.map(|b| b.campaign.clone()))
            .unwrap_or_else(|| crate::start::DEFAULT_CAMPAIGN.to_owned()),
        vars,
        cadence,
        overlap,
        catchup_window,
        jitter,
        start_at: spec.start_at.or_else(|| base.and_then(|b| b.start_at)),
        end_at: spec.end_at.or_else(|| base.and_then(|b| b.end_at)),
    })
}

fn schedule_error(err: drover_store::Error) -> ApiError {
    use drover_store::Error;
    match err {
        Error::ScheduleExists(_) => ApiError::Conflict {
            code: "schedule_exists",
            message: err.to_string(),
        },
        Error::InvalidSchedule(_) | Error::InvalidScheduleName(_) => {
            ApiError::invalid("invalid_request", err.to_string())
        }
        Error::UnknownWorkflow(_) => ApiError::not_found("unknown_workflow", err.to_string()),
        Error::UnknownCampaign(_) => ApiError::not_found("unknown_campaign", err.to_string()),
        other => other.into(),
    }
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found("unknown_schedule", format!("unknown schedule {name:?}"))
}

async fn detail(state: &ApiState, schedule: Schedule) -> Result<ScheduleDetail> {
    let next_fires = match schedule.calendar() {
        Ok(calendar) => match schedule.next_fire_at {
            Some(next) => {
                let mut times = vec![next];
                times.extend(calendar.upcoming(next, NEXT_FIRES - 1));
                times
            }
            None => Vec::new(),
        },
        Err(_) => Vec::new(),
    };
    let recent_fires = state
        .store
        .schedule_fires(&schedule.name, RECENT_FIRES)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(ScheduleDetail {
        schedule: schedule.into(),
        next_fires,
        recent_fires,
    })
}

async fn publish(state: &ApiState, jobs: &[StepJob]) {
    if let Err(err) = state.bus.publish_jobs(jobs).await {
        tracing::warn!(jobs = jobs.len(), %err, "publishing schedule jobs failed; the sweeper will re-dispatch them");
    }
}

/// Create a schedule.
#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    request_body = CreateSchedule,
    responses(
        (status = 201, description = "Created", body = ScheduleDetail),
        (status = 404, description = "`unknown_workflow`, `unknown_campaign`", body = ErrorBody),
        (status = 409, description = "`schedule_exists`", body = ErrorBody),
        (status = 422, description = "A bad name, cron expression, time zone, duration or policy", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiJson(request): ApiJson<CreateSchedule>,
) -> Result<(StatusCode, Json<ScheduleDetail>)> {
    let new = merge(&request.name, request.spec, None)?;
    let created = state
        .store
        .create_schedule(&new, &actor)
        .await
        .map_err(schedule_error)?;
    tracing::info!(schedule = %created.name, workflow = %created.workflow, %actor, "schedule created");
    Ok((StatusCode::CREATED, Json(detail(&state, created).await?)))
}

/// List schedules with their next fire time and last outcome.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", responses((status = 200, body = ScheduleList)))]
pub(crate) async fn list(State(state): State<ApiState>) -> Result<Json<ScheduleList>> {
    let schedules = state.store.list_schedules().await?;
    Ok(Json(ScheduleList {
        schedules: schedules.into_iter().map(Into::into).collect(),
    }))
}

/// Show a schedule: its next 5 fire times and its recent fires with their instances.
#[utoipa::path(
    get,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = ScheduleDetail),
        (status = 404, description = "`unknown_schedule`", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<ApiState>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<ScheduleDetail>> {
    let schedule = state
        .store
        .get_schedule(&name)
        .await?
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(detail(&state, schedule).await?))
}

/// Change a schedule (absent fields keep their value); its next fire is recomputed from now.
#[utoipa::path(
    patch,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body = ScheduleSpec,
    responses(
        (status = 200, body = ScheduleDetail),
        (status = 404, description = "`unknown_schedule`, `unknown_workflow`, `unknown_campaign`", body = ErrorBody),
        (status = 422, description = "A bad cron expression, time zone, duration or policy", body = ErrorBody),
    )
)]
pub(crate) async fn update(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
    ApiJson(spec): ApiJson<ScheduleSpec>,
) -> Result<Json<ScheduleDetail>> {
    let base = state
        .store
        .get_schedule(&name)
        .await?
        .ok_or_else(|| unknown(&name))?;
    let new = merge(&name, spec, Some(&base))?;
    let updated = state
        .store
        .update_schedule(&new, &actor)
        .await
        .map_err(schedule_error)?
        .ok_or_else(|| unknown(&name))?;
    tracing::info!(schedule = %name, %actor, "schedule updated");
    Ok(Json(detail(&state, updated).await?))
}

/// Delete a schedule and its fire records (instances it started stay).
#[utoipa::path(
    delete,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = DeletedSchedule),
        (status = 404, description = "`unknown_schedule`", body = ErrorBody),
    )
)]
pub(crate) async fn delete(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<DeletedSchedule>> {
    if !state.store.delete_schedule(&name, &actor).await? {
        return Err(unknown(&name));
    }
    tracing::info!(schedule = %name, %actor, "schedule deleted");
    Ok(Json(DeletedSchedule { deleted: name }))
}

/// A deleted schedule.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeletedSchedule {
    pub deleted: String,
}

/// Pause a schedule: fire times pass unrun and unrecorded until it is unpaused.
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/pause",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body = PauseSchedule,
    responses(
        (status = 200, body = ScheduleDetail),
        (status = 404, description = "`unknown_schedule`", body = ErrorBody),
    )
)]
pub(crate) async fn pause(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
    ApiJson(request): ApiJson<PauseSchedule>,
) -> Result<Json<ScheduleDetail>> {
    let schedule = state
        .store
        .set_schedule_paused(&name, true, request.note.as_deref(), &actor)
        .await?
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(detail(&state, schedule).await?))
}

/// Unpause a schedule: it fires again from its next fire time after now.
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/unpause",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = ScheduleDetail),
        (status = 404, description = "`unknown_schedule`", body = ErrorBody),
    )
)]
pub(crate) async fn unpause(
    State(state): State<ApiState>,
    Extension(Principal { name: actor, .. }): Extension<Principal>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<ScheduleDetail>> {
    let schedule = state
        .store
        .set_schedule_paused(&name, false, None, &actor)
        .await?
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(detail(&state, schedule).await?))
}

fn fired(name: String, fires: ManualFires) -> ManualFired {
    ManualFired {
        schedule: name,
        fires: fires
            .fires
            .into_iter()
            .map(|f| ManualFireView {
                fire_at: f.fire_at,
                instance: f.instance,
            })
            .collect(),
    }
}

/// Run a schedule now (whatever its overlap policy or pause).
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/trigger",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    responses(
        (status = 200, body = ManualFired),
        (status = 404, description = "`unknown_schedule`", body = ErrorBody),
    )
)]
pub(crate) async fn trigger(
    State(state): State<ApiState>,
    ApiPath(Slug(name)): ApiPath<Slug>,
) -> Result<Json<ManualFired>> {
    let fires = state
        .store
        .trigger_schedule(&name)
        .await
        .map_err(schedule_error)?
        .ok_or_else(|| unknown(&name))?;
    publish(&state, &fires.ready).await;
    Ok(Json(fired(name, fires)))
}

/// Run a schedule once for each of its fire times in `[from, to]` not run yet (at most 1000).
#[utoipa::path(
    post,
    path = "/v1/schedules/{name}/backfill",
    tag = "schedules",
    params(("name" = String, Path, description = "The schedule's name")),
    request_body = Backfill,
    responses(
        (status = 200, body = ManualFired),
        (status = 404, description = "`unknown_schedule`", body = ErrorBody),
        (status = 422, description = "More than 1000 fire times, or `to` before `from`", body = ErrorBody),
    )
)]
pub(crate) async fn backfill(
    State(state): State<ApiState>,
    ApiPath(Slug(name)): ApiPath<Slug>,
    ApiJson(request): ApiJson<Backfill>,
) -> Result<Json<ManualFired>> {
    if request.to < request.from {
        return Err(ApiError::invalid("invalid_request", "to is before from"));
    }
    let fires = state
        .store
        .backfill_schedule(&name, request.from, request.to)
        .await
        .map_err(schedule_error)?
        .ok_or_else(|| unknown(&name))?;
    publish(&state, &fires.ready).await;
    Ok(Json(fired(name, fires)))
}
