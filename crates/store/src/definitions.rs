//! Workflow definitions: versions deployed, listed, read.

use serde_json::Value;

use crate::model::*;
use crate::{Result, Store};

impl Store {
    /// Stores `body` as the next version of workflow `name`, unless it equals the latest
    /// version, which is then returned unchanged. A deleted version's number is never reused:
    /// deploying after a delete creates a new version, whatever its content.
    pub async fn deploy_definition(
        &self,
        name: &str,
        body: &Value,
        source: &str,
    ) -> Result<Deployed> {
        loop {
            let latest: Option<(i32, Value, bool)> = sqlx::query_as(
                "SELECT version, body, deleted_at IS NOT NULL FROM workflow_definition \
                 WHERE name = $1 ORDER BY version DESC LIMIT 1",
            )
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
            let version = match latest {
                Some((version, latest, false)) if &latest == body => {
                    return Ok(Deployed {
                        name: name.to_owned(),
                        version,
                        created: false,
                    });
                }
                Some((version, _, _)) => version + 1,
                None => 1,
            };
            let inserted = sqlx::query(
                "INSERT INTO workflow_definition (name, version, body, source, severity) \
                 VALUES ($1, $2, $3, $4, coalesce($3->>'severity', 'normal')) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(name)
            .bind(version)
            .bind(body)
            .bind(source)
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(Deployed {
                    name: name.to_owned(),
                    version,
                    created: true,
                });
            }
            // A concurrent deploy took this version number: look again.
        }
    }

    /// The latest version of every workflow, by name: no source, no body, the description's
    /// first [`SUMMARY_DESCRIPTION_CHARS`] characters. Deleted versions are left out.
    pub async fn list_definitions(&self) -> Result<Vec<DefinitionSummary>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (name) name, version, left(body->>'description', $1) AS description,
                    coalesce(jsonb_array_length(body->'steps'), 0)::bigint AS steps, created_at
             FROM workflow_definition WHERE deleted_at IS NULL ORDER BY name, version DESC",
        )
        .bind(SUMMARY_DESCRIPTION_CHARS)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A version of a workflow; the latest that is not deleted when `version` is `None`. A
    /// deleted version asked for by number is returned (with its `deleted_at`): the instances
    /// that ran it still read it.
    pub async fn get_definition(
        &self,
        name: &str,
        version: Option<i32>,
    ) -> Result<Option<StoredDefinition>> {
        Ok(sqlx::query_as(
            "SELECT name, version, body, source, created_at, deleted_at FROM workflow_definition \
             WHERE name = $1 AND ($2::int IS NULL OR version = $2) \
               AND ($2::int IS NOT NULL OR deleted_at IS NULL) \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(name)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }
}
