//! The audit log: every successful mutation (POST, PUT, PATCH, DELETE answered 2xx) by a user or
//! an API key is recorded with who (actor kind and id), what (`METHOD /route/{template}` and the
//! object's kind and id), when, the request id, and the object before (when the handler states
//! it with [`set_before`]) and after (the answer's body). Secrets are redacted from both: any
//! property whose name says secret, password, token, code, hash or otpauth is replaced, and so
//! is any string shaped like one of our credentials (`mk_…` API keys, `mat_…`/`mrt_…` tokens).
//!
//! Sign-in, token refresh and password reset are anonymous calls; they are recorded in
//! `login_history` and in the user rows' own timestamps, not here.

use crate::auth::Caller;
use crate::http::{request_id, ApiError, AppState};
use crate::page;
use axum::body::Body;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use uuid::Uuid;

tokio::task_local! {
    static BEFORE: RefCell<Option<Value>>;
}

/// States the object as it was before this request changed it.
pub fn set_before(v: Value) {
    let _ = BEFORE.try_with(|b| *b.borrow_mut() = Some(v));
}

const SECRET_NAMES: [&str; 6] = ["secret", "password", "token", "code", "hash", "otpauth"];
const SECRET_PREFIXES: [&str; 6] = ["mk_", "mat_", "mrt_", "mfa_", "mvt_", "mrs_"];

/// Replaces secrets in `v`, recursively.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let name = k.to_ascii_lowercase();
                let secretish = SECRET_NAMES.iter().any(|s| name.contains(s));
                if name == "prefix" {
                    // The displayed start of a key: not a secret.
                } else if secretish && !x.is_null() && !x.is_boolean() {
                    *x = json!("<redacted>");
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        Value::String(s) if SECRET_PREFIXES.iter().any(|p| s.starts_with(p)) => {
            *s = "<redacted>".into();
        }
        _ => {}
    }
}

/// `/api/v1/api-keys/{id}/rotate` → (`api-keys`, the `{id}` segment of the request path).
fn object_of(route: &str, path: &str) -> (String, Option<String>) {
    let r: Vec<&str> = route.trim_start_matches("/api/v1/").split('/').collect();
    let p: Vec<&str> = path.trim_start_matches("/api/v1/").split('/').collect();
    let kind = r.first().copied().unwrap_or("").to_string();
    let id = r
        .iter()
        .position(|s| s.starts_with('{'))
        .and_then(|i| p.get(i))
        .map(|s| s.to_string());
    (kind, id)
}

const MAX_BODY: usize = 4 << 20;

/// The middleware.
pub async fn record(
    State(st): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let mutation = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let caller = req.extensions().get::<Caller>().cloned();
    let (Some(route), true, Some(caller)) = (matched, mutation, caller) else {
        return next.run(req).await;
    };
    let action = format!("{} {}", req.method(), route.as_str());
    let path = req.uri().path().to_string();
    let (resp, before) = BEFORE
        .scope(RefCell::new(None), async {
            let r = next.run(req).await;
            (r, BEFORE.with(|b| b.borrow_mut().take()))
        })
        .await;
    if !resp.status().is_success() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let mut after: Option<Value> = serde_json::from_slice(&bytes).ok();
    let mut before = before;
    if let Some(a) = after.as_mut() {
        redact(a);
    }
    if let Some(b) = before.as_mut() {
        redact(b);
    }
    let (kind, mut id) = object_of(route.as_str(), &path);
    if let Some(oid) = after
        .as_ref()
        .and_then(|a| a.get("id"))
        .and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    {
        id.get_or_insert(oid);
    }
    let write = async {
        let db = st.pool.get().await?;
        db.execute(
            "INSERT INTO audit_log (tenant_id, actor_kind, actor_id, action, object_kind,
                                    object_id, status, request_id, before, after)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &caller.tenant,
                &caller.actor_kind(),
                &caller.actor_id(),
                &action,
                &kind,
                &id,
                &(parts.status.as_u16() as i32),
                &request_id().unwrap_or_default(),
                &before,
                &after,
            ],
        )
        .await?;
        Ok::<_, ApiError>(())
    };
    if let Err(e) = write.await {
        // The change is made; losing its audit row is logged loudly rather than hidden.
        tracing::error!(code = e.code, action, "audit row not written");
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn time_filter(q: &HashMap<String, String>, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    q.get(name)
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::invalid(name, "must be an RFC 3339 time"))
        })
        .transpose()
}

/// `GET /api/v1/audit-log`: the tenant's audit rows, newest first.
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let before_id = page::seq(q.get("cursor").map(String::as_str))?;
    let actor: Option<Uuid> = q
        .get("actor_id")
        .map(|s| {
            s.parse()
                .map_err(|_| ApiError::invalid("actor_id", "must be a UUID"))
        })
        .transpose()?;
    let since = time_filter(&q, "since")?;
    let until = time_filter(&q, "until")?;
    let db = st.pool.get().await?;
    let rows = db
        .query(
            "SELECT id, at, actor_kind, actor_id, action, object_kind, object_id, status,
                    request_id, before, after
               FROM audit_log
              WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2)
                AND ($3::uuid IS NULL OR actor_id = $3)
                AND ($4::text IS NULL OR action = $4)
                AND ($5::text IS NULL OR object_kind = $5)
                AND ($6::text IS NULL OR object_id = $6)
                AND ($7::timestamptz IS NULL OR at >= $7)
                AND ($8::timestamptz IS NULL OR at < $8)
              ORDER BY id DESC LIMIT $9",
            &[
                &caller.tenant,
                &before_id,
                &actor,
                &q.get("action"),
                &q.get("object_kind"),
                &q.get("object_id"),
                &since,
                &until,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(Json(page::page(
        rows,
        limit,
        |r| {
            json!({
                "id": r.get::<_, i64>(0),
                "at": ts(r.get(1)),
                "actor_kind": r.get::<_, String>(2),
                "actor_id": r.get::<_, Option<Uuid>>(3),
                "action": r.get::<_, String>(4),
                "object_kind": r.get::<_, String>(5),
                "object_id": r.get::<_, Option<String>>(6),
                "status": r.get::<_, i32>(7),
                "request_id": r.get::<_, String>(8),
                "before": r.get::<_, Option<Value>>(9),
                "after": r.get::<_, Option<Value>>(10),
            })
        },
        |r| page::seq_cursor(r.get(0)),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_wherever_they_sit() {
        let mut v = json!({
            "id": "x", "key": "mk_abc", "prefix": "mk_abcdefgh", "plan": {"key": "pro"},
            "nested": [{"password": "hunter2hunter2", "name": "n"}],
            "recovery_codes": ["a", "b"], "note": "mat_xyz", "totp_enabled": true,
            "otpauth_uri": "otpauth://totp/x?secret=ABC"
        });
        redact(&mut v);
        assert_eq!(v["key"], "<redacted>");
        assert_eq!(v["prefix"], "mk_abcdefgh", "a key's displayed prefix stays");
        assert_eq!(v["plan"]["key"], "pro", "catalog keys are not secrets");
        assert_eq!(v["nested"][0]["password"], "<redacted>");
        assert_eq!(v["nested"][0]["name"], "n");
        assert_eq!(v["recovery_codes"], "<redacted>");
        assert_eq!(v["note"], "<redacted>");
        assert_eq!(v["totp_enabled"], true);
        assert_eq!(v["otpauth_uri"], "<redacted>");
        assert_eq!(v["id"], "x");
    }

    #[test]
    fn objects_are_named_from_the_route() {
        assert_eq!(
            object_of(
                "/api/v1/api-keys/{id}/rotate",
                "/api/v1/api-keys/abc/rotate"
            ),
            ("api-keys".to_string(), Some("abc".to_string()))
        );
        assert_eq!(
            object_of("/api/v1/users", "/api/v1/users"),
            ("users".to_string(), None)
        );
    }
}
