//! `GET /api/v1/usage/outcomes`: how the aggregator accounted for the caller's events, per day
//! (UTC, by reception), outcome and reason — received = accepted + duplicate + unmetered +
//! rejected. Parameters: `from`, `to` (dates, `YYYY-MM-DD`, `to` exclusive; default: the last
//! 31 days).

use crate::auth::Caller;
use crate::http::{ApiError, AppState};
use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::NaiveDate;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct OutcomeRow {
    pub day: String,
    pub outcome: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub events: i64,
}

#[derive(Debug, Serialize)]
pub struct Outcomes {
    pub from: String,
    pub to: String,
    pub received: i64,
    pub accepted: i64,
    pub duplicate: i64,
    pub unmetered: i64,
    pub rejected: i64,
    pub data: Vec<OutcomeRow>,
}

fn date(field: &str, v: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| ApiError::invalid(field, "must be a date, YYYY-MM-DD"))
}

pub async fn outcomes(
    State(st): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Outcomes>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::invalid("query", e.to_string()))?;
    let today = chrono::Utc::now().date_naive();
    let (mut from, mut to) = (today - chrono::Days::new(30), today + chrono::Days::new(1));
    for (k, v) in pairs {
        match k.as_str() {
            "from" => from = date("from", &v)?,
            "to" => to = date("to", &v)?,
            _ => return Err(ApiError::invalid(k, "is not a parameter of this query")),
        }
    }
    if from >= to {
        return Err(ApiError::invalid("to", "must be after `from`"));
    }
    let db = st.pool.get().await?;
    let rows = db
        .query(
            "SELECT day::text, outcome, reason, events FROM event_outcomes
              WHERE tenant_id = $1 AND day >= $2 AND day < $3 ORDER BY day, outcome, reason",
            &[&caller.tenant, &from, &to],
        )
        .await?;
    let data: Vec<OutcomeRow> = rows
        .iter()
        .map(|r| OutcomeRow {
            day: r.get(0),
            outcome: r.get(1),
            reason: r.get(2),
            events: r.get(3),
        })
        .collect();
    let sum = |o: &str| {
        data.iter()
            .filter(|r| r.outcome == o)
            .map(|r| r.events)
            .sum::<i64>()
    };
    let (accepted, duplicate, unmetered, rejected) = (
        sum("accepted"),
        sum("duplicate"),
        sum("unmetered"),
        sum("rejected"),
    );
    Ok(Json(Outcomes {
        from: from.to_string(),
        to: to.to_string(),
        received: accepted + duplicate + unmetered + rejected,
        accepted,
        duplicate,
        unmetered,
        rejected,
        data,
    }))
}
