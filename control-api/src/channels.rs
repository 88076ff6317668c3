//! Notification channels, templates and the delivery log over HTTP.
//!
//! - `POST /api/v1/notification-channels` `{"kind": "webhook", "url": "https://…"}`,
//!   `{"kind": "email", "email": "ops@…"}` or `{"kind": "inbox", "user": "<user id>"}`; a
//!   webhook channel's signing secret (`whsec_…`) is in this answer only (stored sealed).
//! - `GET /api/v1/notification-channels`, `DELETE /api/v1/notification-channels/{id}` (disables:
//!   the delivery log stays).
//! - `GET /api/v1/notification-channels/{id}/deliveries`: messages of the channel with their
//!   state (pending, sent, dead) and every attempt.
//! - `GET /api/v1/notification-templates`, `PUT /api/v1/notification-templates/{kind}`
//!   `{"subject", "body"}`.

use crate::auth::Caller;
use crate::catalog::ts;
use crate::crypto::random_bytes;
use crate::http::{body, ApiError, AppState};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    /// webhook, email or inbox.
    pub kind: Option<String>,
    #[serde(default)]
    pub name: String,
    /// For a webhook: where to POST (http or https).
    pub url: Option<String>,
    /// For email: the address.
    pub email: Option<String>,
    /// For the inbox: a user of the tenant.
    pub user: Option<String>,
}

fn channel_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "kind": r.get::<_, String>(1),
        "name": r.get::<_, String>(2),
        "target": r.get::<_, String>(3),
        "disabled": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(4).is_some(),
        "createdAt": ts(r.get(5)),
    })
}

const CHANNEL_COLUMNS: &str = "id, kind, name, target, disabled_at, created_at";

fn required(v: Option<String>, field: &str) -> Result<String, ApiError> {
    v.map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::invalid(field, "is required"))
}

/// `POST /api/v1/notification-channels`.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    req: Result<Json<NewChannel>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body(req)?;
    let kind = required(req.kind, "kind")?;
    let db = st.pool.get().await?;
    let (target, secret) = match kind.as_str() {
        "webhook" => {
            let url = required(req.url, "url")?;
            let parsed = reqwest::Url::parse(&url)
                .map_err(|e| ApiError::invalid("url", format!("is not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                return Err(ApiError::invalid(
                    "url",
                    "must be an http or https URL with a host",
                ));
            }
            if !st.settings.notify.allow_private_webhooks
                && crate::delivery::names_private_host(&parsed)
            {
                return Err(ApiError::invalid(
                    "url",
                    "must name a public host (not localhost, a loopback or a private address)",
                ));
            }
            if url.len() > 2048 {
                return Err(ApiError::invalid("url", "must be at most 2048 characters"));
            }
            let secret = format!("whsec_{}", B64.encode(random_bytes::<24>()));
            (url, Some(secret))
        }
        "email" => {
            let email = required(req.email, "email")?;
            email
                .parse::<lettre::Address>()
                .map_err(|e| ApiError::invalid("email", format!("is not an email address: {e}")))?;
            (email, None)
        }
        "inbox" => {
            let user = required(req.user, "user")?;
            let id: Uuid = user
                .parse()
                .map_err(|_| ApiError::invalid("user", "must be a user id"))?;
            db.query_opt(
                "SELECT 1 FROM users WHERE id = $1 AND tenant_id = $2",
                &[&id, &caller.tenant],
            )
            .await?
            .ok_or_else(|| ApiError::invalid("user", "no such user in the tenant"))?;
            (id.to_string(), None)
        }
        _ => return Err(ApiError::invalid("kind", "must be webhook, email or inbox")),
    };
    let sealed = secret.as_ref().map(|s| st.settings.key.seal(s.as_bytes()));
    let r = db
        .query_one(
            &format!(
                "INSERT INTO notification_channels (tenant_id, kind, name, target, secret_sealed)
                 VALUES ($1, $2, $3, $4, $5) RETURNING {CHANNEL_COLUMNS}"
            ),
            &[&caller.tenant, &kind, &req.name, &target, &sealed],
        )
        .await?;
    let mut v = channel_view(&r);
    if let Some(s) = secret {
        v["secret"] = json!(s);
    }
    Ok((StatusCode::CREATED, Json(v)))
}

/// `GET /api/v1/notification-channels`.
pub async fn list(State(st): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {CHANNEL_COLUMNS} FROM notification_channels WHERE tenant_id = $1
                  ORDER BY created_at, id"
            ),
            &[&caller.tenant],
        )
        .await?;
    Ok(Json(
        json!({ "items": rows.iter().map(channel_view).collect::<Vec<_>>() }),
    ))
}

fn channel_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("channel"))
}

/// `DELETE /api/v1/notification-channels/{id}`: disables the channel.
pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = channel_id(&id)?;
    let db = st.pool.get().await?;
    let n = db
        .execute(
            "UPDATE notification_channels SET disabled_at = coalesce(disabled_at, now())
              WHERE id = $1 AND tenant_id = $2",
            &[&id, &caller.tenant],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("channel"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/notification-channels/{id}/deliveries`: the newest 100 messages and attempts.
pub async fn deliveries(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = channel_id(&id)?;
    let db = st.pool.get().await?;
    db.query_opt(
        "SELECT 1 FROM notification_channels WHERE id = $1 AND tenant_id = $2",
        &[&id, &caller.tenant],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("channel"))?;
    let msgs = db
        .query(
            "SELECT o.id, o.kind, o.created_at, o.sent_at, o.dead_at, o.attempts, o.last_error,
                    o.next_attempt_at,
                    coalesce((SELECT jsonb_agg(jsonb_build_object('attempt', d.attempt, 'at', d.at,
                                  'ok', d.ok, 'statusCode', d.status_code, 'error', d.error,
                                  'durationMs', d.duration_ms) ORDER BY d.id)
                                FROM notification_deliveries d WHERE d.outbox_id = o.id), '[]')
               FROM notification_outbox o WHERE o.channel_id = $1
              ORDER BY o.id DESC LIMIT 100",
            &[&id],
        )
        .await?;
    let items: Vec<Value> = msgs
        .iter()
        .map(|r| {
            let sent: Option<chrono::DateTime<chrono::Utc>> = r.get(3);
            let dead: Option<chrono::DateTime<chrono::Utc>> = r.get(4);
            let state = if sent.is_some() {
                "sent"
            } else if dead.is_some() {
                "dead"
            } else {
                "pending"
            };
            json!({
                "id": r.get::<_, i64>(0),
                "kind": r.get::<_, String>(1),
                "createdAt": ts(r.get(2)),
                "state": state,
                "sentAt": sent.map(ts),
                "attempts": r.get::<_, i32>(5),
                "lastError": r.get::<_, Option<String>>(6),
                "nextAttemptAt": (state == "pending").then(|| ts(r.get(7))),
                "log": r.get::<_, Value>(8),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// `GET /api/v1/notification-templates`: every kind, the tenant's wording or the built-in one.
pub async fn list_templates(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    let mut items = Vec::new();
    for kind in crate::notify::kinds() {
        let own = db
            .query_opt(
                "SELECT 1 FROM notification_templates WHERE tenant_id = $1 AND kind = $2",
                &[&caller.tenant, &kind],
            )
            .await?
            .is_some();
        let (subject, body) = crate::notify::template(&**db, Some(caller.tenant), kind).await?;
        items.push(json!({
            "kind": kind, "category": crate::notify::category(kind),
            "subject": subject, "body": body, "custom": own,
        }));
    }
    Ok(Json(json!({ "items": items })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    pub subject: Option<String>,
    pub body: Option<String>,
}

/// `PUT /api/v1/notification-templates/{kind}`.
pub async fn put_template(
    State(st): State<AppState>,
    caller: Caller,
    Path(kind): Path<String>,
    req: Result<Json<TemplateBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(req)?;
    if !crate::notify::kinds().any(|k| k == kind) {
        return Err(ApiError::not_found("notification kind"));
    }
    let subject = required(req.subject, "subject")?;
    let text = required(req.body, "body")?;
    if subject.len() > 500 {
        return Err(ApiError::invalid(
            "subject",
            "must be at most 500 characters",
        ));
    }
    if text.len() > 20_000 {
        return Err(ApiError::invalid(
            "body",
            "must be at most 20000 characters",
        ));
    }
    let db = st.pool.get().await?;
    db.execute(
        "INSERT INTO notification_templates (tenant_id, kind, subject, body) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, kind) DO UPDATE SET subject = $3, body = $4, updated_at = now()",
        &[&caller.tenant, &kind, &subject, &text],
    )
    .await?;
    Ok(Json(
        json!({"kind": kind, "subject": subject, "body": text, "custom": true}),
    ))
}
