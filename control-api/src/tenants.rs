//! Cross-tenant administration, for `sys_admin` only (permission `tenants:admin`): list and
//! create tenants, and create a user in any tenant (its first `org_admin`, typically).

use crate::auth::Caller;
use crate::http::{body, ApiError, AppState};
use crate::identity::{create_user_for, NewUser};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub name: String,
}

pub async fn list(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    let rows = db
        .query(
            "SELECT t.id, t.name, t.created_at,
                    (SELECT count(*) FROM users u WHERE u.tenant_id = t.id)
               FROM tenants t ORDER BY t.created_at, t.id",
            &[],
        )
        .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, Uuid>(0),
                "name": r.get::<_, String>(1),
                "created_at": r.get::<_, DateTime<Utc>>(2).to_rfc3339_opts(SecondsFormat::Millis, true),
                "users": r.get::<_, i64>(3),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn create(
    State(st): State<AppState>,
    b: Result<Json<NewTenant>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let t = body(b)?;
    let db = st.pool.get().await?;
    let t = crate::keys::create_tenant(&db, &t.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": t.id, "name": t.name})),
    ))
}

pub async fn create_user(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    b: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant: Uuid = id.parse().map_err(|_| ApiError::not_found("tenant"))?;
    let new = body(b)?;
    create_user_for(&st, &caller, tenant, new).await
}
