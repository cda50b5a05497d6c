//! Deleting workflows and campaigns, and pausing campaigns (issue 13): operator actions, each
//! one transaction that checks under a lock what it refuses on, and writes its audit row and
//! its campaign event with its effect.
//!
//! # What a delete keeps
//! Deletes are soft (`deleted_at`, migration 0015). The rows stay because finished instances
//! point at them: their journal, events and `why` stay readable, and so does the deleted
//! definition version itself (`GET /v1/workflows/{name}?version=N`). A deleted version starts
//! nothing again (a start or a schedule reads only versions not deleted) and is not listed; a
//! new deploy of the workflow takes the next version number. A deleted campaign is not listed
//! and starts nothing; creating a campaign of the same name revives the row.
//!
//! # Refusals
//! - A workflow (or version) with live instances (any state but completed, failed, stopped) is
//!   refused, unless the caller kills them first ([`WorkflowDelete::stop_instances`]: each kill
//!   is audited with the delete as its reason). Deleting a workflow, or its latest version,
//!   while a schedule starts it is refused: delete or re-point the schedule first.
//! - A campaign with live or queued instances, or that schedules start into, is refused;
//!   `default` always is.
//!
//! The delete locks the definition (or campaign) rows `FOR UPDATE`, which waits for starts
//! that inserted instances of them to commit (their foreign-key check holds a key-share lock),
//! so it counts every instance committed before it. A start that read the definition before
//! the delete committed and inserts after it still lands (its foreign key finds the row): it
//! runs an instance of a deleted version, which works, and shows in the listing.
//!
//! # Pausing a campaign
//! Only a campaign with a limit can be paused: the semaphore's admission reads the pause under
//! the campaign lock it takes anyway (`LockedCampaign::paused`), so a paused campaign queues
//! new instances and passes no released permit on, while unlimited campaigns keep their
//! lock-free start. Unpausing admits the head of the queue at once, in FIFO order, up to the
//! limit (the admission a raised limit makes).

use chrono::{DateTime, Utc};
use drover_core::event::EventKind;
use drover_core::{InstanceId, StepJob};
use serde_json::json;
use uuid::Uuid;

use crate::audit::insert_audit;
use crate::facts::insert_campaign_fact;
use crate::lifecycle::{Acted, LifecycleAction};
use crate::model::Campaign;
use crate::semaphore::{Admitted, LockedCampaign, SEMAPHORE_ACTOR, admit, write_counters};
use crate::{Error, Result, Store};

/// The campaign that workflow events belong to (a workflow has none of its own).
const WORKFLOW_EVENTS_CAMPAIGN: &str = "default";

/// The states in which an instance has not ended (it is live), as SQL (uses the
/// `instance_by_state` index).
const LIVE_STATES: &str = "('queued', 'ready', 'running', 'waiting', 'paused', 'in_error')";

/// How many live instances one kill transaction of a `--stop-instances` delete takes.
const KILL_BATCH: i64 = 500;

/// How many times a `--stop-instances` delete kills and tries again when instances keep
/// appearing (started meanwhile).
const STOP_ROUNDS: usize = 5;

/// How many live instances a refusal names.
const EXAMPLES: i64 = 5;

/// A workflow delete as the operator asked for it.
#[derive(Clone, Debug)]
pub struct WorkflowDelete {
    pub workflow: String,
    /// One version; `None`: every version.
    pub version: Option<i32>,
    /// Kill its live instances first (each kill audited with the delete as its reason),
    /// instead of refusing.
    pub stop_instances: bool,
    /// Who deletes: the audit rows' actor.
    pub actor: String,
}

/// What a workflow delete did.
#[derive(Clone, Debug, Default)]
pub struct WorkflowDeleted {
    pub workflow: String,
    /// The versions deleted now.
    pub versions: Vec<i32>,
    /// The live instances killed first.
    pub stopped: Vec<InstanceId>,
    /// Jobs to publish now that it committed: instances the kills woke or admitted.
    pub jobs: Vec<StepJob>,
}

/// What a campaign pause or unpause did.
#[derive(Clone, Debug)]
pub struct CampaignPauseChange {
    /// The campaign afterwards.
    pub campaign: Campaign,
    /// False when it was in that state already (nothing written).
    pub changed: bool,
    /// Queued instances an unpause admitted, in queue order: publish their jobs.
    pub admitted: Vec<Admitted>,
}

impl Store {
    /// Deletes a workflow, or one version of it (see the module docs for what is kept and what
    /// is refused). Audited as `workflow.delete` (target the workflow's name), announced by a
    /// `workflow_deleted` event of the `default` campaign.
    ///
    /// Errors: [`Error::UnknownWorkflow`], [`Error::UnknownVersion`],
    /// [`Error::WorkflowLive`], [`Error::WorkflowScheduled`].
    pub async fn delete_workflow(&self, delete: &WorkflowDelete) -> Result<WorkflowDeleted> {
        let mut done = WorkflowDeleted {
            workflow: delete.workflow.clone(),
            ..WorkflowDeleted::default()
        };
        let reason = match delete.version {
            Some(v) => format!("workflow.delete {} version {v}", delete.workflow),
            None => format!("workflow.delete {}", delete.workflow),
        };
        let mut round = 0;
        loop {
            match self.try_delete_workflow(delete, done.stopped.len()).await {
                Err(Error::WorkflowLive { .. }) if delete.stop_instances && round < STOP_ROUNDS => {
                    round += 1;
                    self.kill_live(delete, &reason, &mut done).await?;
                }
                Ok(versions) => {
                    done.versions = versions;
                    return Ok(done);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Kills every live instance of the workflow (version) `delete` names, in batches.
    async fn kill_live(
        &self,
        delete: &WorkflowDelete,
        reason: &str,
        done: &mut WorkflowDeleted,
    ) -> Result<()> {
        loop {
            let rows: Vec<(Uuid,)> = sqlx::query_as(&format!(
                "SELECT id FROM instance
                 WHERE workflow = $1 AND ($2::int IS NULL OR version = $2)
                   AND state IN {LIVE_STATES}
                 ORDER BY id LIMIT $3"
            ))
            .bind(&delete.workflow)
            .bind(delete.version)
            .bind(KILL_BATCH)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                return Ok(());
            }
            let ids: Vec<InstanceId> = rows.into_iter().map(|(id,)| InstanceId(id)).collect();
            let batch = self
                .apply_lifecycle_for(LifecycleAction::Kill, &ids, &delete.actor, Some(reason))
                .await?;
            let killed: Vec<InstanceId> = batch
                .results
                .iter()
                .filter(|(_, acted)| matches!(acted, Acted::Changed(_)))
                .map(|(id, _)| *id)
                .collect();
            done.jobs.extend(batch.jobs());
            if killed.is_empty() {
                // Nothing it could kill (each ended meanwhile): the delete looks again.
                return Ok(());
            }
            done.stopped.extend(killed);
        }
    }

    /// One attempt: the delete, or its refusal. Returns the versions deleted.
    async fn try_delete_workflow(
        &self,
        delete: &WorkflowDelete,
        stopped: usize,
    ) -> Result<Vec<i32>> {
        let mut tx = self.pool.begin().await?;
        let versions: Vec<(i32,)> = sqlx::query_as(
            "SELECT version FROM workflow_definition
             WHERE name = $1 AND ($2::int IS NULL OR version = $2) AND deleted_at IS NULL
             ORDER BY version FOR UPDATE",
        )
        .bind(&delete.workflow)
        .bind(delete.version)
        .fetch_all(&mut *tx)
        .await?;
        let versions: Vec<i32> = versions.into_iter().map(|(v,)| v).collect();
        if versions.is_empty() {
            return Err(match delete.version {
                Some(version) => Error::UnknownVersion {
                    workflow: delete.workflow.clone(),
                    version,
                },
                None => Error::UnknownWorkflow(delete.workflow.clone()),
            });
        }
        let (latest,): (Option<i32>,) = sqlx::query_as(
            "SELECT max(version) FROM workflow_definition WHERE name = $1 AND deleted_at IS NULL",
        )
        .bind(&delete.workflow)
        .fetch_one(&mut *tx)
        .await?;
        if latest.is_some_and(|latest| versions.contains(&latest)) {
            let schedules: Vec<(String,)> =
                sqlx::query_as("SELECT name FROM schedule WHERE workflow = $1 ORDER BY name")
                    .bind(&delete.workflow)
                    .fetch_all(&mut *tx)
                    .await?;
            if !schedules.is_empty() {
                return Err(Error::WorkflowScheduled {
                    workflow: delete.workflow.clone(),
                    schedules: schedules.into_iter().map(|(s,)| s).collect(),
                });
            }
        }
        let (live, examples): (i64, Vec<Uuid>) = sqlx::query_as(&format!(
            "SELECT count(*), (array_agg(id ORDER BY id))[1:$3::int]
             FROM instance
             WHERE workflow = $1 AND version = ANY($2) AND state IN {LIVE_STATES}"
        ))
        .bind(&delete.workflow)
        .bind(&versions)
        .bind(EXAMPLES)
        .fetch_one(&mut *tx)
        .await
        .map(|(live, examples): (i64, Option<Vec<Uuid>>)| (live, examples.unwrap_or_default()))?;
        if live > 0 {
            return Err(Error::WorkflowLive {
                workflow: delete.workflow.clone(),
                live,
                examples: examples.into_iter().map(InstanceId).collect(),
            });
        }
        sqlx::query(
            "UPDATE workflow_definition SET deleted_at = clock_timestamp(), deleted_by = $3
             WHERE name = $1 AND version = ANY($2)",
        )
        .bind(&delete.workflow)
        .bind(&versions)
        .bind(&delete.actor)
        .execute(&mut *tx)
        .await?;
        insert_audit(
            &mut tx,
            &delete.actor,
            "workflow.delete",
            &delete.workflow,
            json!({ "versions": versions, "all_versions": delete.version.is_none(),
                    "stopped_instances": stopped }),
        )
        .await?;
        insert_campaign_fact(
            &mut tx,
            WORKFLOW_EVENTS_CAMPAIGN,
            EventKind::WorkflowDeleted,
            json!({ "workflow": delete.workflow, "versions": versions, "actor": delete.actor,
                    "stopped": stopped }),
        )
        .await?;
        tx.commit().await?;
        Ok(versions)
    }

    /// Deletes an empty campaign: refused while it has live or queued instances, while a
    /// schedule starts into it, and for `default`. Audited as `campaign.delete`; its last event
    /// is `campaign_deleted`.
    ///
    /// Errors: [`Error::UnknownCampaign`], [`Error::DefaultCampaign`],
    /// [`Error::CampaignScheduled`], [`Error::CampaignNotEmpty`].
    pub async fn delete_campaign(&self, name: &str, actor: &str) -> Result<()> {
        if name == WORKFLOW_EVENTS_CAMPAIGN {
            return Err(Error::DefaultCampaign);
        }
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE, not the semaphore's NO KEY UPDATE: it also waits for the inserts of
        // instances into it (their foreign-key check) to commit, so the count sees them.
        let campaign: Option<(i64,)> = sqlx::query_as(
            "SELECT id FROM campaign WHERE name = $1 AND deleted_at IS NULL FOR UPDATE",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let (id,) = campaign.ok_or_else(|| Error::UnknownCampaign(name.to_owned()))?;
        let schedules: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM schedule WHERE campaign_id = $1 ORDER BY name")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        if !schedules.is_empty() {
            return Err(Error::CampaignScheduled {
                campaign: name.to_owned(),
                schedules: schedules.into_iter().map(|(s,)| s).collect(),
            });
        }
        let (live, queued): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE state = 'queued') FROM instance
             WHERE campaign_id = $1 AND state IN {LIVE_STATES}"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if live > 0 {
            return Err(Error::CampaignNotEmpty {
                campaign: name.to_owned(),
                live,
                queued,
            });
        }
        insert_campaign_fact(
            &mut tx,
            name,
            EventKind::CampaignDeleted,
            json!({ "actor": actor }),
        )
        .await?;
        sqlx::query(
            "UPDATE campaign SET deleted_at = clock_timestamp(), deleted_by = $2,
                    paused_at = NULL, paused_by = NULL
             WHERE id = $1",
        )
        .bind(id)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, actor, "campaign.delete", name, json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Pauses a limited campaign: from its commit on, the campaign admits nothing (new
    /// instances and those a freed permit would admit stay QUEUED); instances holding a permit
    /// run on. Audited as `campaign.pause`, announced by `campaign_paused`. Pausing a paused
    /// campaign changes nothing.
    ///
    /// Errors: [`Error::UnknownCampaign`], [`Error::UnlimitedCampaign`].
    pub async fn pause_campaign(&self, name: &str, actor: &str) -> Result<CampaignPauseChange> {
        let mut tx = self.pool.begin().await?;
        let (campaign, _) = lock_campaign(&mut tx, name).await?;
        let changed = !campaign.paused;
        if changed {
            sqlx::query(
                "UPDATE campaign SET paused_at = clock_timestamp(), paused_by = $2 WHERE id = $1",
            )
            .bind(campaign.id)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
            let details = json!({ "running": campaign.running, "queued": campaign.queued });
            insert_audit(&mut tx, actor, "campaign.pause", name, details.clone()).await?;
            let mut data = details;
            data["actor"] = json!(actor);
            insert_campaign_fact(&mut tx, name, EventKind::CampaignPaused, data).await?;
        }
        tx.commit().await?;
        Ok(CampaignPauseChange {
            campaign: self.campaign_after(name).await?,
            changed,
            admitted: Vec::new(),
        })
    }

    /// Unpauses a campaign and, in the same transaction under its lock, admits the head of its
    /// queue in FIFO order up to its limit (returned: publish their jobs). Audited as
    /// `campaign.unpause`, announced by `campaign_unpaused` (then each admission's `admitted`).
    /// Unpausing a campaign that is not paused changes nothing.
    ///
    /// Errors: [`Error::UnknownCampaign`], [`Error::UnlimitedCampaign`].
    pub async fn unpause_campaign(&self, name: &str, actor: &str) -> Result<CampaignPauseChange> {
        let mut tx = self.pool.begin().await?;
        let (mut campaign, paused_at) = lock_campaign(&mut tx, name).await?;
        let changed = campaign.paused;
        let mut admitted = Vec::new();
        if changed {
            sqlx::query("UPDATE campaign SET paused_at = NULL, paused_by = NULL WHERE id = $1")
                .bind(campaign.id)
                .execute(&mut *tx)
                .await?;
            campaign.paused = false;
            let mut facts = Vec::new();
            let by = format!("unpause:{actor}");
            admitted = admit(&mut tx, &mut campaign, SEMAPHORE_ACTOR, &by, &mut facts).await?;
            let details = json!({ "admitted": admitted.len(), "paused_at": paused_at });
            insert_audit(&mut tx, actor, "campaign.unpause", name, details.clone()).await?;
            let mut data = details;
            data["actor"] = json!(actor);
            insert_campaign_fact(&mut tx, name, EventKind::CampaignUnpaused, data).await?;
            write_counters(&mut tx, std::slice::from_ref(&campaign), &facts).await?;
        }
        tx.commit().await?;
        Ok(CampaignPauseChange {
            campaign: self.campaign_after(name).await?,
            changed,
            admitted,
        })
    }

    async fn campaign_after(&self, name: &str) -> Result<Campaign> {
        self.campaign_by_name(name)
            .await?
            .ok_or_else(|| Error::UnknownCampaign(name.to_owned()))
    }
}

/// Locks a live (not deleted) limited campaign by name, as the semaphore does, and reads when
/// it was paused.
async fn lock_campaign(
    tx: &mut sqlx::PgConnection,
    name: &str,
) -> Result<(LockedCampaign, Option<DateTime<Utc>>)> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        locked: LockedCampaign,
        paused_at: Option<DateTime<Utc>>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, name, max_running, running, queued, paused_at IS NOT NULL AS paused,
                paused_at
         FROM campaign WHERE name = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let row = row.ok_or_else(|| Error::UnknownCampaign(name.to_owned()))?;
    if row.locked.max_running.is_none() {
        return Err(Error::UnlimitedCampaign(name.to_owned()));
    }
    Ok((row.locked, row.paused_at))
}
