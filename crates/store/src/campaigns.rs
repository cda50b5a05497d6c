//! Campaign rows.

use chrono::{DateTime, Utc};
use drover_core::CampaignId;

use crate::model::*;
use crate::{Result, Store};

#[derive(sqlx::FromRow)]
struct CampaignRow {
    id: i64,
    name: String,
    max_running: Option<i32>,
    running: i32,
    queued: i32,
    on_error_permit: String,
    created_at: DateTime<Utc>,
    paused_at: Option<DateTime<Utc>>,
    paused_by: Option<String>,
}

impl From<CampaignRow> for Campaign {
    fn from(r: CampaignRow) -> Self {
        Campaign {
            id: CampaignId(r.id),
            name: r.name,
            max_running: r.max_running,
            running: r.running,
            queued: r.queued,
            on_error_permit: r.on_error_permit,
            created_at: r.created_at,
            paused_at: r.paused_at,
            paused_by: r.paused_by,
        }
    }
}

impl Store {
    /// A campaign that is not deleted; `None` if unknown (or deleted).
    pub async fn campaign_by_name(&self, name: &str) -> Result<Option<Campaign>> {
        let row: Option<CampaignRow> = sqlx::query_as(
            "SELECT id, name, max_running, running, queued, on_error_permit, created_at, \
                    paused_at, paused_by \
             FROM campaign WHERE name = $1 AND deleted_at IS NULL",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Campaign::from))
    }

    pub async fn list_campaigns(&self) -> Result<Vec<Campaign>> {
        let rows: Vec<CampaignRow> = sqlx::query_as(
            "SELECT id, name, max_running, running, queued, on_error_permit, created_at, \
                    paused_at, paused_by \
             FROM campaign WHERE deleted_at IS NULL ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Campaign::from).collect())
    }
}
