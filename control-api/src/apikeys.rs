//! API keys over HTTP: create (the secret is in that answer only; the database holds its
//! SHA-256), list, get, update, rotate (a new key with the same settings; the old one keeps
//! working for a grace period, then expires), revoke. Every change bumps `updated_at`, which the
//! ingest edge's key cache reloads by, so changes reach the edge within its staleness bound
//! (10 s by default).

use crate::auth::Caller;
use crate::http::{body, optional_body, ApiError, AppState};
use crate::keys::{create_key, validate, KeyError, NewKey};
use crate::page;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use uuid::Uuid;

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Invalid { field, reason } => ApiError::invalid(field, reason),
            KeyError::UnknownTenant(_) => ApiError::not_found("tenant"),
            KeyError::Db(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    #[serde(default)]
    pub name: String,
    /// Any of `ingest`, `read`, `admin` (default `ingest`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Addresses or CIDR blocks allowed to use the key; omitted: any.
    pub allowed_cidrs: Option<Vec<String>>,
    /// Requests per second at the ingest edge; omitted: the edge's default.
    pub rate_limit_rps: Option<i32>,
    /// Events per second at the ingest edge; omitted: the edge's default.
    pub rate_limit_eps: Option<i32>,
    /// Events per UTC calendar month the ingest edge accepts; omitted: no quota.
    pub monthly_event_quota: Option<i64>,
    /// RFC 3339; omitted: never.
    pub expires_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, prefix, scopes, allowed_cidrs::text[], rate_limit_rps,
    rate_limit_eps, monthly_event_quota, expires_at, revoked_at, created_at, rotated_to,
    (SELECT events FROM api_key_usage u
      WHERE u.key_id = api_keys.id AND u.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date)";

fn ts(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn view(r: &tokio_postgres::Row) -> Value {
    let expires: Option<DateTime<Utc>> = r.get(8);
    let revoked: Option<DateTime<Utc>> = r.get(9);
    let status = if revoked.is_some() {
        "revoked"
    } else if expires.is_some_and(|e| e <= Utc::now()) {
        "expired"
    } else {
        "active"
    };
    json!({
        "id": r.get::<_, Uuid>(0),
        "name": r.get::<_, String>(1),
        "prefix": r.get::<_, String>(2),
        "scopes": r.get::<_, Vec<String>>(3),
        "allowed_cidrs": r.get::<_, Option<Vec<String>>>(4),
        "rate_limit_rps": r.get::<_, Option<i32>>(5),
        "rate_limit_eps": r.get::<_, Option<i32>>(6),
        "monthly_event_quota": r.get::<_, Option<i64>>(7),
        "events_this_month": r.get::<_, Option<i64>>(12).unwrap_or(0),
        "expires_at": ts(expires),
        "revoked_at": ts(revoked),
        "created_at": ts(Some(r.get(10))),
        "rotated_to": r.get::<_, Option<Uuid>>(11),
        "status": status,
    })
}

async fn find(db: &tokio_postgres::Client, tenant: Uuid, id: &str) -> Result<Value, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("API key"))?;
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 AND tenant_id = $2"),
            &[&id, &tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    Ok(view(&row))
}

/// A new key as answered: the stored view plus the secret, once.
async fn created(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    spec: NewKey,
) -> Result<Value, ApiError> {
    let k = create_key(db, tenant, spec).await?;
    let mut v = find(db, tenant, &k.id.to_string()).await?;
    v["key"] = json!(k.key);
    Ok(v)
}

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<KeySpec>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let s = body(b)?;
    let db = st.pool.get().await?;
    let v = created(
        &db,
        caller.tenant,
        NewKey {
            name: s.name,
            scopes: s.scopes,
            allowed_cidrs: s.allowed_cidrs,
            rate_limit_rps: s.rate_limit_rps,
            rate_limit_eps: s.rate_limit_eps,
            monthly_event_quota: s.monthly_event_quota,
            expires_at: s.expires_at,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let after = page::time_id(q.get("cursor").map(String::as_str))?;
    let (t, id) = after.map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let status = q.get("status").map(String::as_str);
    if let Some(s) = status {
        if !["active", "revoked", "expired"].contains(&s) {
            return Err(ApiError::invalid(
                "status",
                "must be active, revoked or expired",
            ));
        }
    }
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM api_keys
                  WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
                    AND CASE $4::text
                          WHEN 'revoked' THEN revoked_at IS NOT NULL
                          WHEN 'expired' THEN revoked_at IS NULL AND expires_at <= now()
                          WHEN 'active' THEN revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())
                          ELSE true END
                  ORDER BY created_at, id LIMIT $5"
            ),
            &[&caller.tenant, &t, &id, &status, &(limit + 1)],
        )
        .await?;
    Ok(Json(page::page(rows, limit, view, |r| {
        page::time_id_cursor(r.get(10), r.get(0))
    })))
}

pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    Ok(Json(find(&db, caller.tenant, &id).await?))
}

/// `null` → `Some(None)` (clear), absent → `None` (keep; with `#[serde(default)]`).
fn double<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A change to a key; omitted fields stay. `null` clears an allowlist, limit or quota.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_cidrs: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<i32>)]
    pub rate_limit_rps: Option<Option<i32>>,
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<i32>)]
    pub rate_limit_eps: Option<Option<i32>>,
    #[serde(default, deserialize_with = "double")]
    #[schema(value_type = Option<i64>)]
    pub monthly_event_quota: Option<Option<i64>>,
}

pub async fn update(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    b: Result<Json<KeyPatch>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let p = body(b)?;
    validate(
        p.name.as_deref().unwrap_or(""),
        p.scopes.as_deref(),
        p.allowed_cidrs.clone().flatten().as_deref(),
        [
            p.rate_limit_rps.flatten().map(i64::from),
            p.rate_limit_eps.flatten().map(i64::from),
            p.monthly_event_quota.flatten(),
        ],
    )?;
    let db = st.pool.get().await?;
    let before = find(&db, caller.tenant, &id).await?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("API key"))?;
    let set = |o: &Option<Option<i32>>| o.is_some();
    db.execute(
        "UPDATE api_keys SET
            name = COALESCE($3, name),
            scopes = COALESCE($4, scopes),
            allowed_cidrs = CASE WHEN $5 THEN $6::text[]::cidr[] ELSE allowed_cidrs END,
            rate_limit_rps = CASE WHEN $7 THEN $8 ELSE rate_limit_rps END,
            rate_limit_eps = CASE WHEN $9 THEN $10 ELSE rate_limit_eps END,
            monthly_event_quota = CASE WHEN $11 THEN $12 ELSE monthly_event_quota END,
            updated_at = clock_timestamp()
          WHERE id = $1 AND tenant_id = $2",
        &[
            &id,
            &caller.tenant,
            &p.name,
            &p.scopes,
            &p.allowed_cidrs.is_some(),
            &p.allowed_cidrs.clone().flatten(),
            &set(&p.rate_limit_rps),
            &p.rate_limit_rps.flatten(),
            &set(&p.rate_limit_eps),
            &p.rate_limit_eps.flatten(),
            &p.monthly_event_quota.is_some(),
            &p.monthly_event_quota.flatten(),
        ],
    )
    .await?;
    crate::audit::set_before(before);
    Ok(Json(find(&db, caller.tenant, &id.to_string()).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// How long the old key keeps working, in seconds (0 to 30 days; default 24 h).
    pub grace_seconds: Option<i64>,
}

pub async fn rotate(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let r: Rotate = optional_body(&raw)?;
    let grace = r
        .grace_seconds
        .unwrap_or(st.settings.key_rotation_grace.as_secs() as i64);
    if !(0..=30 * 86_400).contains(&grace) {
        return Err(ApiError::invalid(
            "grace_seconds",
            "must be 0 to 2592000 (30 days)",
        ));
    }
    let mut db = st.pool.get().await?;
    let old_id: Uuid = id.parse().map_err(|_| ApiError::not_found("API key"))?;
    let tx = db.transaction().await?;
    let old = tx
        .query_opt(
            "SELECT name, scopes, allowed_cidrs::text[], rate_limit_rps, rate_limit_eps,
                    monthly_event_quota, expires_at,
                    revoked_at IS NULL AND rotated_to IS NULL
                      AND (expires_at IS NULL OR expires_at > now())
               FROM api_keys WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            &[&old_id, &caller.tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("API key"))?;
    if !old.get::<_, bool>(7) {
        return Err(ApiError::conflict(
            "not_rotatable",
            "the key is revoked, expired or already rotated",
        ));
    }
    let spec = NewKey {
        name: old.get(0),
        scopes: old.get(1),
        allowed_cidrs: old.get(2),
        rate_limit_rps: old.get(3),
        rate_limit_eps: old.get(4),
        monthly_event_quota: old.get(5),
        expires_at: old.get(6),
    };
    let k = create_key(&*tx, caller.tenant, spec).await?;
    tx.execute(
        "UPDATE api_keys SET rotated_to = $2,
                expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + make_interval(secs => $3)),
                updated_at = clock_timestamp()
          WHERE id = $1",
        &[&old_id, &k.id, &(grace as f64)],
    )
    .await?;
    tx.commit().await?;
    let mut v = find(&db, caller.tenant, &k.id.to_string()).await?;
    v["key"] = json!(k.key);
    v["rotated_from"] = json!(old_id);
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn revoke(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    let before = find(&db, caller.tenant, &id).await?;
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("API key"))?;
    if !crate::keys::revoke_key(&db, caller.tenant, id).await? {
        return Err(ApiError::conflict(
            "already_revoked",
            "the key is already revoked",
        ));
    }
    crate::audit::set_before(before);
    Ok(Json(find(&db, caller.tenant, &id.to_string()).await?))
}
