//! Long bulk commands as server-side operations: `POST /v1/operations` starts a lifecycle
//! command on the instances of a filter and answers at once (202) with the operation's id;
//! `GET /v1/operations/{id}` reads its progress and, once done, its result;
//! `POST /v1/operations/{id}/cancel` stops it between two batches (what is done stays done).
//!
//! The work is the same as `POST /v1/instances/{command}` with a filter — one transaction per
//! batch of [`LIFECYCLE_BATCH`](crate::LIFECYCLE_BATCH) — run by a task of the API node that
//! accepted it, so no request waits on thousands of instances. Its record is in Postgres
//! (the `operation` table): any API node reads it and cancels it (a flag the running task
//! reads with each progress write, after every batch). One whose node stopped or died before
//! it was done reads as `interrupted`: it did its batches so far, and running the command
//! again finishes it (each command is idempotent). A finished operation is deleted
//! [`KEEP_FINISHED`] after it ended, when a later operation is created.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use drover_core::NodeId;
use drover_store::{NewOperation, OperationEnd, OperationRecord};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiPath, decode_json};
use crate::lifecycle::apply::{Progress, by_filter, prepare};
use crate::{ApiState, LifecycleCommand, LifecycleFilterRequest, LifecycleSummary};

/// How long a finished operation can still be read.
pub const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// Start a lifecycle command on the instances of a filter, as an operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartOperation {
    /// `pause`, `unpause`, `stop`, `kill` or `restart`.
    pub command: String,
    /// Which instances: as the body of `POST /v1/instances/{command}`.
    #[serde(flatten)]
    pub filter: LifecycleFilterRequest,
}

/// An operation as it stands.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Operation {
    #[schema(value_type = String, format = Uuid)]
    pub id: Uuid,
    pub command: String,
    /// The instances it applies to, as given.
    pub filter: LifecycleFilterRequest,
    /// `running`, `completed`, `cancelled` (stopped between batches by a cancel), `failed`
    /// (see `error`) or `interrupted` (its API node stopped or died before it was done: what
    /// it did stays done; run the command again to finish).
    pub state: String,
    /// The counts so far; once it ended, its result.
    pub progress: LifecycleSummary,
    /// Why it failed or was interrupted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A cancel was asked for: it stops after its current batch.
    pub cancel_requested: bool,
    /// The token that started it.
    pub actor: String,
    /// The node whose API runs it (none for an API not run by a node).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub node: Option<Uuid>,
    pub started_at: DateTime<Utc>,
    /// When it last wrote its progress (after every batch).
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl TryFrom<OperationRecord> for Operation {
    type Error = ApiError;
    fn try_from(r: OperationRecord) -> Result<Self> {
        let unreadable = |what: &str, err: serde_json::Error| {
            ApiError::Internal(format!(
                "operation {}: its stored {what} is unreadable: {err}",
                r.id
            ))
        };
        let progress = serde_json::from_value(r.progress.clone())
            .map_err(|err| unreadable("progress", err))?;
        let filter =
            serde_json::from_value(r.filter.clone()).map_err(|err| unreadable("filter", err))?;
        let error = match (&r.error, r.state.as_str()) {
            (None, "interrupted") => Some(format!(
                "the API node that ran it ({}) is gone; the batches it did stay done — run the \
                 command again to finish it (commands are idempotent)",
                r.owner
                    .map_or_else(|| "unknown".to_owned(), |node| node.to_string())
            )),
            (error, _) => error.clone(),
        };
        Ok(Self {
            id: r.id,
            command: r.command,
            filter,
            state: r.state,
            progress,
            error,
            cancel_requested: r.cancel_requested,
            actor: r.actor,
            node: r.owner.map(|node| node.0),
            started_at: r.created_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
        })
    }
}

/// The tasks of this API node running operations. Cheap to clone.
#[derive(Clone, Default)]
pub struct Operations {
    /// The running operations' tasks; [`Operations::stop`] cancels and awaits them.
    tasks: TaskTracker,
    /// Cancelled when the node stops: every running operation stops between two batches.
    shutdown: CancellationToken,
    /// The node this API runs in, once registered (a node registering again gets a new id).
    node: Arc<Mutex<Option<NodeId>>>,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations")
            .field("tasks", &self.tasks.len())
            .field("node", &self.node())
            .finish_non_exhaustive()
    }
}

impl Operations {
    /// Says which node runs this API: the operations it starts from now on are owned by
    /// `node` (and those running move to it with their next progress write), so they read as
    /// `interrupted` once that node is gone.
    pub fn set_node(&self, node: NodeId) {
        *self.node.lock().unwrap_or_else(PoisonError::into_inner) = Some(node);
    }

    fn node(&self) -> Option<NodeId> {
        *self.node.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops every running operation between two batches (they end `interrupted`) and waits
    /// for their tasks.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn parse_command(command: &str) -> Result<LifecycleCommand> {
    use LifecycleCommand as C;
    [C::Pause, C::Unpause, C::Stop, C::Kill, C::Restart]
        .into_iter()
        .find(|known| known.as_str() == command)
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_request",
                format!(
                    "unknown command {command:?}; expected pause, unpause, stop, kill or restart"
                ),
            )
        })
}

fn unknown_operation(id: &str) -> ApiError {
    ApiError::not_found(
        "not_found",
        format!("unknown operation {id} (operations are kept for an hour after they end)"),
    )
}

fn parse_operation_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| unknown_operation(id))
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value)
        .map_err(|err| ApiError::Internal(format!("encoding an operation's record: {err}")))
}

/// Start a lifecycle command on the instances of a filter; answers at once.
#[utoipa::path(
    post,
    path = "/v1/operations",
    tag = "instances",
    request_body = StartOperation,
    responses(
        (status = 202, description = "Started: read its progress at /v1/operations/{id}", body = Operation),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 404, description = "Unknown campaign", body = ErrorBody),
        (status = 422, description = "Unknown command, no filter given, or an unknown state", body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<(StatusCode, Json<Operation>)> {
    let request: StartOperation = decode_json(&body)?;
    let command = parse_command(&request.command)?;
    let filter_given = to_json(&request.filter)?;
    let filter = prepare(&state, command, request.filter).await?;
    let operations = state.operations.clone();
    let id = Uuid::now_v7();
    let keep_ms = i64::try_from(KEEP_FINISHED.as_millis()).unwrap_or(i64::MAX);
    let pruned = state
        .store
        .create_operation(
            &NewOperation {
                id,
                command: command.as_str().to_owned(),
                filter: filter_given,
                actor: principal.name.clone(),
                progress: to_json(&LifecycleSummary {
                    action: command.as_str().to_owned(),
                    ..Default::default()
                })?,
                owner: operations.node(),
            },
            keep_ms,
        )
        .await?;
    if pruned > 0 {
        tracing::debug!(pruned, "deleted operations finished over an hour ago");
    }
    let answer = state
        .store
        .operation(id)
        .await?
        .ok_or_else(|| unknown_operation(&id.to_string()))?
        .try_into()?;
    let actor = principal.name;
    let stop = operations.shutdown.child_token();
    operations
        .tasks
        .spawn(run(state, id, command, filter, actor, stop));
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// Writes a running operation's progress after each batch, and reads whether it was
/// cancelled (from any API node) in the same statement.
struct Recorder {
    state: ApiState,
    id: Uuid,
    cancelled: bool,
}

impl Progress for Recorder {
    async fn after_batch(&mut self, summary: &LifecycleSummary) -> bool {
        let id = self.id;
        let progress = match serde_json::to_value(summary) {
            Ok(progress) => progress,
            Err(err) => {
                tracing::warn!(operation.id = %id, %err, "cannot encode an operation's progress");
                return true;
            }
        };
        let node = self.state.operations.node();
        match self
            .state
            .store
            .operation_progress(id, &progress, node)
            .await
        {
            Ok(Some(false)) => true,
            Ok(Some(true)) => {
                self.cancelled = true;
                false
            }
            // Not running any more: ended elsewhere, or deleted.
            Ok(None) => false,
            Err(err) => {
                // The record lags; the work goes on (a cancel is seen after the next batch).
                tracing::warn!(operation.id = %id, %err, "cannot record an operation's progress");
                true
            }
        }
    }
}

/// Runs operation `id` to its end, writing its progress after every batch and its end.
async fn run(
    state: ApiState,
    id: Uuid,
    command: LifecycleCommand,
    filter: drover_store::LifecycleFilter,
    actor: String,
    stop: CancellationToken,
) {
    let mut recorder = Recorder {
        state: state.clone(),
        id,
        cancelled: false,
    };
    let result = by_filter(&state, command, &filter, &actor, &mut recorder, &stop).await;
    let (end, summary, error) = match result {
        Ok((summary, true)) => (OperationEnd::Completed, summary, None),
        Ok((summary, false)) if recorder.cancelled => (OperationEnd::Cancelled, summary, None),
        Ok((summary, false)) => (
            OperationEnd::Interrupted,
            summary,
            Some(
                "its API node stopped before it was done; the batches it did stay done — run \
                 the command again to finish it (commands are idempotent)"
                    .to_owned(),
            ),
        ),
        Err(err) => (
            OperationEnd::Failed,
            LifecycleSummary::default(),
            Some(err.to_string()),
        ),
    };
    // A failed one keeps the progress it recorded last.
    let progress = match end {
        OperationEnd::Failed => None,
        _ => serde_json::to_value(&summary).ok(),
    };
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=5 {
        match state
            .store
            .finish_operation(id, end, progress.as_ref(), error.as_deref())
            .await
        {
            Ok(()) => return,
            Err(err) if attempt == 5 => {
                tracing::error!(operation.id = %id, %err, end = end.as_str(), "cannot record an operation's end; it reads as running until this node is gone");
            }
            Err(err) => {
                tracing::warn!(operation.id = %id, %err, "cannot record an operation's end yet; trying again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// An operation's progress, and its result once it ended.
#[utoipa::path(
    get,
    path = "/v1/operations/{id}",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The operation id")),
    responses(
        (status = 200, body = Operation),
        (status = 404, description = "Unknown, or ended over an hour ago", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Operation>> {
    let record = state
        .store
        .operation(parse_operation_id(&id)?)
        .await?
        .ok_or_else(|| unknown_operation(&id))?;
    Ok(Json(record.try_into()?))
}

/// Cancel an operation: it stops after its current batch (what is done stays done).
#[utoipa::path(
    post,
    path = "/v1/operations/{id}/cancel",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The operation id")),
    responses(
        (status = 200, description = "Cancelling (or ended already): as it stands", body = Operation),
        (status = 404, description = "Unknown, or ended over an hour ago", body = ErrorBody),
    )
)]
pub(crate) async fn cancel(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Operation>> {
    let record = state
        .store
        .request_operation_cancel(parse_operation_id(&id)?)
        .await?
        .ok_or_else(|| unknown_operation(&id))?;
    Ok(Json(record.try_into()?))
}
