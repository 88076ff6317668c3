//! Tenants and API keys: the rows a first user needs (issue 3's CLI; the HTTP API of issue 5
//! builds on the same functions).

use serde::Serialize;
use tokio_postgres::Client;
use uuid::Uuid;

pub use crate::rbac::SCOPES;

/// Why a tenant or key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("tenant {0} does not exist")]
    UnknownTenant(Uuid),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct Tenant {
    pub id: Uuid,
    pub name: String,
}

/// A key as created: `key` is the secret, returned once and never stored.
#[derive(Serialize)]
pub struct CreatedKey {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub key: String,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub allowed_cidrs: Option<Vec<String>>,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("key", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Options of a new key.
#[derive(Debug, Default, Clone)]
pub struct NewKey {
    pub name: String,
    pub scopes: Vec<String>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub rate_limit_rps: Option<i32>,
    pub rate_limit_eps: Option<i32>,
    pub monthly_event_quota: Option<i64>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn create_tenant(db: &Client, name: &str) -> Result<Tenant, KeyError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(KeyError::Invalid {
            field: "name",
            reason: "must be 1 to 200 characters".into(),
        });
    }
    let row = db
        .query_one(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id",
            &[&name],
        )
        .await?;
    Ok(Tenant {
        id: row.get(0),
        name: name.to_string(),
    })
}

/// Checks a key's settings; each error names its field.
pub fn validate(
    name: &str,
    scopes: Option<&[String]>,
    cidrs: Option<&[String]>,
    limits: [Option<i64>; 3],
) -> Result<(), KeyError> {
    if name.chars().count() > 200 {
        return Err(KeyError::Invalid {
            field: "name",
            reason: "must be at most 200 characters".into(),
        });
    }
    if let Some(scopes) = scopes {
        if scopes.is_empty() {
            return Err(KeyError::Invalid {
                field: "scopes",
                reason: format!("must name at least one of {}", SCOPES.join(", ")),
            });
        }
        if let Some(bad) = scopes.iter().find(|s| !SCOPES.contains(&s.as_str())) {
            return Err(KeyError::Invalid {
                field: "scopes",
                reason: format!("unknown scope {bad:?}; known: {}", SCOPES.join(", ")),
            });
        }
    }
    for c in cidrs.unwrap_or_default() {
        if c.parse::<ipnet::IpNet>().is_err() && c.parse::<std::net::IpAddr>().is_err() {
            return Err(KeyError::Invalid {
                field: "allowed_cidrs",
                reason: format!("{c:?} is not an address or CIDR block"),
            });
        }
    }
    for (field, v) in ["rate_limit_rps", "rate_limit_eps", "monthly_event_quota"]
        .into_iter()
        .zip(limits)
    {
        if v.is_some_and(|v| v <= 0) {
            return Err(KeyError::Invalid {
                field,
                reason: "must be positive (omit it for no limit)".into(),
            });
        }
    }
    Ok(())
}

pub async fn create_key(
    db: &impl tokio_postgres::GenericClient,
    tenant: Uuid,
    opts: NewKey,
) -> Result<CreatedKey, KeyError> {
    let scopes = if opts.scopes.is_empty() {
        vec!["ingest".to_string()]
    } else {
        opts.scopes
    };
    validate(
        &opts.name,
        Some(&scopes),
        opts.allowed_cidrs.as_deref(),
        [
            opts.rate_limit_rps.map(i64::from),
            opts.rate_limit_eps.map(i64::from),
            opts.monthly_event_quota,
        ],
    )?;
    let exists = db
        .query_opt("SELECT 1 FROM tenants WHERE id = $1", &[&tenant])
        .await?;
    if exists.is_none() {
        return Err(KeyError::UnknownTenant(tenant));
    }
    let key = schemas::apikey::generate();
    let prefix = schemas::apikey::display_prefix(&key).to_string();
    let hash = schemas::apikey::hash(&key).to_vec();
    let row = db
        .query_one(
            "INSERT INTO api_keys (tenant_id, name, prefix, secret_sha256, scopes, allowed_cidrs,
                                   rate_limit_rps, rate_limit_eps, monthly_event_quota, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6::text[]::cidr[], $7, $8, $9, $10) RETURNING id",
            &[
                &tenant,
                &opts.name,
                &prefix,
                &hash,
                &scopes,
                &opts.allowed_cidrs,
                &opts.rate_limit_rps,
                &opts.rate_limit_eps,
                &opts.monthly_event_quota,
                &opts.expires_at,
            ],
        )
        .await?;
    Ok(CreatedKey {
        id: row.get(0),
        tenant_id: tenant,
        key,
        prefix,
        scopes,
        allowed_cidrs: opts.allowed_cidrs,
    })
}

/// Revokes a key of `tenant`; returns false when no such live key exists.
pub async fn revoke_key(db: &Client, tenant: Uuid, key_id: Uuid) -> Result<bool, KeyError> {
    let n = db
        .execute(
            "UPDATE api_keys SET revoked_at = now(), updated_at = clock_timestamp()
             WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL",
            &[&key_id, &tenant],
        )
        .await?;
    Ok(n == 1)
}
