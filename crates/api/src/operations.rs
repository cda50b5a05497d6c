//! Long bulk commands as server-side operations: `POST /v1/operations` starts a lifecycle
//! command on the instances of a filter and answers at once (202) with the operation's id;
//! `GET /v1/operations/{id}` reads its progress and, once done, its result;
//! `POST /v1/operations/{id}/cancel` stops it between two batches (what is done stays done).
//!
//! The work is the same as `POST /v1/instances/{command}` with a filter — one transaction per
//! batch of [`LIFECYCLE_BATCH`](crate::LIFECYCLE_BATCH) — run by a task of the API node that
//! accepted it, so no request waits on thousands of instances. Operations live in that node's
//! memory: another API node does not know them (404), a restart forgets them (an interrupted
//! one has done its batches so far; run it again to finish: each command is idempotent), and
//! a finished one is forgotten after [`KEEP_FINISHED`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::error::{ApiError, ErrorBody, Result};
use crate::extract::{ApiPath, decode_json};
use crate::lifecycle::apply::{by_filter, prepare};
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
    /// `running`, `completed`, `cancelled` (stopped between batches by a cancel, or by the
    /// node stopping) or `failed` (see `error`).
    pub state: String,
    /// The counts so far; once it ended, its result.
    pub progress: LifecycleSummary,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The token that started it.
    pub actor: String,
    pub started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

struct Entry {
    operation: Mutex<Operation>,
    cancel: CancellationToken,
}

impl Entry {
    fn snapshot(&self) -> Operation {
        self.operation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Operation)) {
        f(&mut self
            .operation
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }
}

/// The operations of this API node, and the tasks running them. Cheap to clone.
#[derive(Clone, Default)]
pub struct Operations {
    entries: Arc<Mutex<HashMap<Uuid, Arc<Entry>>>>,
    /// The running operations' tasks; [`Operations::stop`] cancels and awaits them.
    tasks: TaskTracker,
    /// Cancelled when the node stops: every running operation stops between two batches.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations")
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Operations {
    fn get(&self, id: Uuid) -> Option<Arc<Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Adds an entry, forgetting the operations finished more than [`KEEP_FINISHED`] ago.
    fn insert(&self, entry: Arc<Entry>) {
        let id = entry.snapshot().id;
        let now = Utc::now();
        let keep = chrono::Duration::from_std(KEEP_FINISHED).unwrap_or(chrono::Duration::MAX);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|_, entry| {
            entry
                .snapshot()
                .finished_at
                .is_none_or(|finished| now - finished < keep)
        });
        entries.insert(id, entry);
    }

    /// Stops every running operation between two batches and waits for their tasks.
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
        format!(
            "unknown operation {id} (operations are kept by the API node that started them, \
             for an hour after they end)"
        ),
    )
}

fn parse_operation_id(id: &str) -> Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| unknown_operation(id))
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
    let filter = prepare(&state, command, request.filter).await?;
    let operations = state.operations.clone();
    let entry = Arc::new(Entry {
        operation: Mutex::new(Operation {
            id: Uuid::now_v7(),
            command: command.as_str().to_owned(),
            state: "running".to_owned(),
            progress: LifecycleSummary {
                action: command.as_str().to_owned(),
                ..Default::default()
            },
            error: None,
            actor: principal.name.clone(),
            started_at: Utc::now(),
            finished_at: None,
        }),
        cancel: operations.shutdown.child_token(),
    });
    operations.insert(Arc::clone(&entry));
    let answer = entry.snapshot();
    let actor = principal.name;
    operations.tasks.spawn(async move {
        let result = by_filter(
            &state,
            command,
            &filter,
            &actor,
            |summary| entry.update(|op| op.progress = summary.clone()),
            &entry.cancel,
        )
        .await;
        let cancelled = entry.cancel.is_cancelled();
        entry.update(|op| {
            op.finished_at = Some(Utc::now());
            match result {
                Ok(summary) => {
                    op.progress = summary;
                    op.state = if cancelled { "cancelled" } else { "completed" }.to_owned();
                }
                Err(err) => {
                    op.state = "failed".to_owned();
                    op.error = Some(err.to_string());
                }
            }
        });
    });
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// An operation's progress, and its result once it ended.
#[utoipa::path(
    get,
    path = "/v1/operations/{id}",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The operation id")),
    responses(
        (status = 200, body = Operation),
        (status = 404, description = "Unknown to this API node", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Operation>> {
    let entry = state
        .operations
        .get(parse_operation_id(&id)?)
        .ok_or_else(|| unknown_operation(&id))?;
    Ok(Json(entry.snapshot()))
}

/// Cancel an operation: it stops after its current batch (what is done stays done).
#[utoipa::path(
    post,
    path = "/v1/operations/{id}/cancel",
    tag = "instances",
    params(("id" = String, Path, format = Uuid, description = "The operation id")),
    responses(
        (status = 200, description = "Cancelling (or ended already): as it stands", body = Operation),
        (status = 404, description = "Unknown to this API node", body = ErrorBody),
    )
)]
pub(crate) async fn cancel(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Operation>> {
    let entry = state
        .operations
        .get(parse_operation_id(&id)?)
        .ok_or_else(|| unknown_operation(&id))?;
    entry.cancel.cancel();
    Ok(Json(entry.snapshot()))
}
