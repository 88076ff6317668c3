//! Meters, the OpenMeter v1 resource: `POST/GET /api/v1/meters`, `GET/DELETE
//! /api/v1/meters/{idOrSlug}`, per tenant.
//!
//! A meter counts the events ingest receives from the moment it is created (its `createdAt`)
//! until it is deleted; earlier events are not re-read. Deleting a meter keeps its stored usage
//! (for invoices already issued) but hides it from the API, and frees its slug.

use crate::auth::Caller;
use crate::http::{ApiError, AppState};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use schemas::meter::{Aggregation, JsonPath};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use uuid::Uuid;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewMeter {
    pub slug: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub event_type: Option<String>,
    pub aggregation: Option<String>,
    pub value_property: Option<String>,
    #[serde(default)]
    pub group_by: BTreeMap<String, String>,
    /// Accepted for compatibility; storage is per minute with hour and day rollups.
    pub window_size: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeterView {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    pub description: String,
    pub event_type: String,
    pub aggregation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    pub group_by: BTreeMap<String, String>,
    pub window_size: &'static str,
    pub created_at: String,
}

const COLUMNS: &str =
    "id, slug, name, description, event_type, aggregation, value_property, group_by, created_at";

fn view(r: &tokio_postgres::Row) -> MeterView {
    let gb: serde_json::Value = r.get(7);
    let group_by = gb
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let created: chrono::DateTime<chrono::Utc> = r.get(8);
    MeterView {
        id: r.get(0),
        slug: r.get(1),
        name: r.get(2),
        description: r.get(3),
        event_type: r.get(4),
        aggregation: r.get(5),
        value_property: r.get(6),
        group_by,
        window_size: "MINUTE",
        created_at: created.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

/// Checks a new meter and returns it in storage form.
pub fn validate(m: &NewMeter) -> Result<(String, String, Aggregation), ApiError> {
    let slug = m
        .slug
        .clone()
        .ok_or_else(|| ApiError::invalid("slug", "is required"))?;
    if !schemas::meter::valid_slug(&slug) {
        return Err(ApiError::invalid(
            "slug",
            "must be lower-case letters and digits, words joined by `_` or `-`, at most 63 characters",
        ));
    }
    let event_type = m
        .event_type
        .clone()
        .ok_or_else(|| ApiError::invalid("eventType", "is required"))?;
    if event_type.is_empty() || event_type.len() > 256 {
        return Err(ApiError::invalid(
            "eventType",
            "must be 1 to 256 characters",
        ));
    }
    let aggregation: Aggregation = m
        .aggregation
        .as_deref()
        .ok_or_else(|| ApiError::invalid("aggregation", "is required"))?
        .parse()
        .map_err(|e: String| ApiError::invalid("aggregation", e))?;
    match (&m.value_property, aggregation.needs_value()) {
        (None, true) => {
            return Err(ApiError::invalid(
                "valueProperty",
                format!("is required for {aggregation}"),
            ))
        }
        (Some(p), _) => {
            JsonPath::parse(p).map_err(|e| ApiError::invalid("valueProperty", e))?;
        }
        (None, false) => {}
    }
    for (name, path) in &m.group_by {
        if name.is_empty() || name == "subject" || name.len() > 63 {
            return Err(ApiError::invalid(
                format!("groupBy.{name}"),
                "names must be 1 to 63 characters and not `subject`",
            ));
        }
        JsonPath::parse(path).map_err(|e| ApiError::invalid(format!("groupBy.{name}"), e))?;
    }
    if let Some(w) = &m.window_size {
        if !matches!(w.as_str(), "MINUTE" | "HOUR" | "DAY") {
            return Err(ApiError::invalid(
                "windowSize",
                "must be MINUTE, HOUR or DAY",
            ));
        }
    }
    Ok((slug, event_type, aggregation))
}

pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    body: Result<Json<NewMeter>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(m) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.body_text()))?;
    let (slug, event_type, aggregation) = validate(&m)?;
    let db = st.pool.get().await?;
    let gb = serde_json::to_value(&m.group_by).unwrap_or_default();
    let row = db
        .query_opt(
            &format!(
                "INSERT INTO meters (tenant_id, slug, name, description, event_type, aggregation, value_property, group_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (tenant_id, slug) WHERE deleted_at IS NULL DO NOTHING
                 RETURNING {COLUMNS}"
            ),
            &[
                &caller.tenant,
                &slug,
                &m.name.clone().unwrap_or_else(|| slug.clone()),
                &m.description.clone().unwrap_or_default(),
                &event_type,
                &aggregation.as_str(),
                &m.value_property.as_deref().filter(|_| aggregation.needs_value()),
                &gb,
            ],
        )
        .await?;
    match row {
        Some(r) => Ok((StatusCode::CREATED, Json(view(&r)))),
        None => Err(crate::http::conflict(
            "slug",
            format!("a meter with slug `{slug}` already exists"),
        )),
    }
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<MeterView>>, ApiError> {
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!("SELECT {COLUMNS} FROM meters WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY created_at, slug"),
            &[&caller.tenant],
        )
        .await?;
    Ok(Json(rows.iter().map(view).collect()))
}

/// The live meter `id_or_slug` of the caller's tenant (another tenant's meter is "not found").
pub async fn find(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    id_or_slug: &str,
) -> Result<MeterView, ApiError> {
    let id = Uuid::parse_str(id_or_slug).ok();
    let row = db
        .query_opt(
            &format!(
                "SELECT {COLUMNS} FROM meters
                  WHERE tenant_id = $1 AND deleted_at IS NULL AND (id = $2 OR slug = $3)
                  ORDER BY (id = $2) DESC NULLS LAST LIMIT 1"
            ),
            &[&tenant, &id, &id_or_slug],
        )
        .await?;
    row.map(|r| view(&r))
        .ok_or_else(|| ApiError::not_found("meter"))
}

pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id_or_slug): Path<String>,
) -> Result<Json<MeterView>, ApiError> {
    let db = st.pool.get().await?;
    Ok(Json(find(&db, caller.tenant, &id_or_slug).await?))
}

pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(id_or_slug): Path<String>,
) -> Result<StatusCode, ApiError> {
    let db = st.pool.get().await?;
    let m = find(&db, caller.tenant, &id_or_slug).await?;
    crate::audit::set_before(json!({"id": m.id, "slug": m.slug, "deleted": false}));
    db.execute(
        "UPDATE meters SET deleted_at = now(), updated_at = now() WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL",
        &[&caller.tenant, &m.id],
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
