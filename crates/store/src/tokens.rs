//! API tokens. The store sees only SHA-256 hashes, never a token; creating and revoking one
//! writes an audit row in the same statement.

use chrono::{DateTime, Utc};
use drover_core::Scope;
use drover_core::ids::is_slug;

use crate::{Error, Result, Store};

/// A token's stored facts (never the token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A token to create: `hash` is the SHA-256 of the token the caller generated.
#[derive(Clone)]
pub struct NewToken {
    pub name: String,
    pub scope: Scope,
    pub hash: [u8; 32],
    pub expires_at: Option<DateTime<Utc>>,
    /// Who creates it, for the audit row.
    pub actor: String,
}

/// The name of the admin token a node is configured with; no stored token may take it.
pub const BOOTSTRAP_TOKEN: &str = "bootstrap";

#[derive(sqlx::FromRow)]
struct Row {
    name: String,
    scope: String,
    created_at: DateTime<Utc>,
    created_by: String,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<Row> for ApiToken {
    type Error = Error;
    fn try_from(row: Row) -> Result<Self> {
        let scope = row
            .scope
            .parse()
            .map_err(|err| Error::Corrupt(format!("token {:?}: {err}", row.name)))?;
        Ok(Self {
            name: row.name,
            scope,
            created_at: row.created_at,
            created_by: row.created_by,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
        })
    }
}

const COLUMNS: &str = "name, scope, created_at, created_by, expires_at, revoked_at";

impl Store {
    /// Stores a new token. A name may be reused once its token is revoked or expired (the new
    /// token replaces the old row); while the old one is live the name is taken.
    pub async fn create_token(&self, new: &NewToken) -> Result<ApiToken> {
        if !is_slug(&new.name) || new.name == BOOTSTRAP_TOKEN {
            return Err(Error::InvalidTokenName(new.name.clone()));
        }
        let row: Option<Row> = sqlx::query_as(&format!(
            "WITH t AS (
                INSERT INTO api_token AS t (name, scope, hash, created_by, expires_at)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (name) DO UPDATE
                    SET scope = EXCLUDED.scope, hash = EXCLUDED.hash,
                        created_by = EXCLUDED.created_by, expires_at = EXCLUDED.expires_at,
                        created_at = clock_timestamp(), revoked_at = NULL
                    WHERE t.revoked_at IS NOT NULL OR t.expires_at <= clock_timestamp()
                RETURNING {COLUMNS}
             ), a AS (
                INSERT INTO audit (actor, action, target, details)
                SELECT $4, 'token.create', $1,
                       jsonb_build_object('scope', $2::text, 'expires_at', $5::timestamptz)
                FROM t
             )
             SELECT {COLUMNS} FROM t"
        ))
        .bind(&new.name)
        .bind(new.scope.as_str())
        .bind(&new.hash[..])
        .bind(&new.actor)
        .bind(new.expires_at)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or_else(|| Error::TokenExists(new.name.clone()))?
            .try_into()
    }

    /// Every stored token, revoked and expired ones too, by name.
    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows: Vec<Row> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_token ORDER BY name"))
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    /// Revokes the token `name`; `None` when there is no such token. Revoking a revoked token
    /// changes nothing and answers it as it is.
    pub async fn revoke_token(&self, name: &str, actor: &str) -> Result<Option<ApiToken>> {
        let row: Option<Row> = sqlx::query_as(&format!(
            "WITH t AS (
                UPDATE api_token SET revoked_at = coalesce(revoked_at, clock_timestamp())
                WHERE name = $1
                RETURNING {COLUMNS}
             ), a AS (
                INSERT INTO audit (actor, action, target)
                SELECT $2, 'token.revoke', $1 FROM t
             )
             SELECT {COLUMNS} FROM t"
        ))
        .bind(name)
        .bind(actor)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    /// The token whose hash is `hash`, revoked and expired ones too (the caller decides).
    pub async fn token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiToken>> {
        let row: Option<Row> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_token WHERE hash = $1"))
                .bind(&hash[..])
                .fetch_optional(&self.pool)
                .await?;
        row.map(TryInto::try_into).transpose()
    }
}
