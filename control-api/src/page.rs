//! Cursor pagination for lists: `?limit=N&cursor=C` → `{"items": [...], "next_cursor": C | null}`.
//!
//! A cursor is opaque to callers (base64url of the last item's sort key as JSON). Lists are
//! keyset-paginated, so a page never repeats or skips rows when others are inserted meanwhile.

use crate::http::ApiError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// `limit` as given (1 to 200, default 50).
pub fn limit(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", format!("must be 1 to {MAX_LIMIT}"))),
    }
}

fn decode(raw: &str) -> Result<Value, ApiError> {
    B64.decode(raw)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::invalid("cursor", "is not a cursor this API gave"))
}

pub fn encode(v: &Value) -> String {
    B64.encode(v.to_string())
}

/// A cursor over `(created_at, id)`, ascending.
pub fn time_id(raw: Option<&str>) -> Result<Option<(DateTime<Utc>, Uuid)>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    let v = decode(raw)?;
    let t = v["t"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let id = v["id"].as_str().and_then(|s| s.parse::<Uuid>().ok());
    match (t, id) {
        (Some(t), Some(id)) => Ok(Some((t, id))),
        _ => Err(ApiError::invalid("cursor", "is not a cursor this API gave")),
    }
}

pub fn time_id_cursor(t: DateTime<Utc>, id: Uuid) -> String {
    encode(&json!({"t": t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true), "id": id}))
}

/// A cursor over a unique text key, ascending.
pub fn key(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    decode(raw)?["k"]
        .as_str()
        .map(|k| Some(k.to_string()))
        .ok_or_else(|| ApiError::invalid("cursor", "is not a cursor this API gave"))
}

pub fn key_cursor(k: &str) -> String {
    encode(&json!({ "k": k }))
}

/// A cursor over a descending bigint id.
pub fn seq(raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(raw) = raw else { return Ok(None) };
    decode(raw)?["id"]
        .as_i64()
        .map(Some)
        .ok_or_else(|| ApiError::invalid("cursor", "is not a cursor this API gave"))
}

pub fn seq_cursor(id: i64) -> String {
    encode(&json!({ "id": id }))
}

/// The page: at most `limit` items (the query fetched one more to know whether a next page
/// exists) and the cursor of the next page.
pub fn page<T>(
    mut rows: Vec<T>,
    limit: i64,
    view: impl Fn(&T) -> Value,
    cursor: impl Fn(&T) -> String,
) -> Value {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more { rows.last().map(&cursor) } else { None };
    json!({"items": rows.iter().map(view).collect::<Vec<_>>(), "next_cursor": next})
}
