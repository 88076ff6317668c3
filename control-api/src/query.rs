//! The meter query, `GET /api/v1/meters/{idOrSlug}/query`, with OpenMeter's parameters (`from`,
//! `to`, `windowSize` MINUTE|HOUR|DAY|MONTH, `windowTimeZone`, `subject` (repeatable), `groupBy`
//! (repeatable), `filterGroupBy[name]=value`) and response shape.
//!
//! Windows are computed in the requested time zone (DST-correct: a local day may be 23 or 25
//! hours), then answered from the coarsest stored grain that all window bounds fall on: day rows
//! when every bound is a UTC midnight, hour rows when every bound is a whole UTC hour (any zone
//! with whole-hour offsets), minute rows otherwise. The grains are kept in the same transaction by
//! the aggregator, so every grain gives the same numbers. The first and last window are clipped to
//! `from` and `to`, which must be whole minutes.

use crate::auth::Caller;
use crate::http::{ApiError, AppState};
use axum::extract::{Path, RawQuery, State};
use axum::Json;
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use schemas::meter::Aggregation;
use serde::Serialize;
use std::collections::BTreeMap;

/// Most windows one query may ask for.
pub const MAX_WINDOWS: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
    Month,
}

impl WindowSize {
    fn parse(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "MINUTE" => WindowSize::Minute,
            "HOUR" => WindowSize::Hour,
            "DAY" => WindowSize::Day,
            "MONTH" => WindowSize::Month,
            _ => {
                return Err(ApiError::invalid(
                    "windowSize",
                    "must be MINUTE, HOUR, DAY or MONTH",
                ))
            }
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            WindowSize::Minute => "MINUTE",
            WindowSize::Hour => "HOUR",
            WindowSize::Day => "DAY",
            WindowSize::Month => "MONTH",
        }
    }
}

#[derive(Debug, Default)]
pub struct Params {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub window_size: Option<WindowSize>,
    pub tz: Option<Tz>,
    pub subjects: Vec<String>,
    pub group_by: Vec<String>,
    pub filter_group_by: BTreeMap<String, String>,
}

fn time_param(field: &str, v: &str) -> Result<DateTime<Utc>, ApiError> {
    let t = DateTime::parse_from_rfc3339(v)
        .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 date-time"))?
        .with_timezone(&Utc);
    if t.second() != 0 || t.nanosecond() != 0 {
        return Err(ApiError::invalid(
            field,
            "must be a whole minute (usage is stored per minute)",
        ));
    }
    Ok(t)
}

pub fn parse_params(raw: &str) -> Result<Params, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw).map_err(|e| ApiError::invalid("query", e.to_string()))?;
    let mut p = Params::default();
    for (k, v) in pairs {
        match k.as_str() {
            "from" => p.from = Some(time_param("from", &v)?),
            "to" => p.to = Some(time_param("to", &v)?),
            "windowSize" => p.window_size = Some(WindowSize::parse(&v)?),
            "windowTimeZone" => {
                p.tz = Some(v.parse().map_err(|_| {
                    ApiError::invalid(
                        "windowTimeZone",
                        "must be an IANA time zone, e.g. Europe/Berlin",
                    )
                })?)
            }
            "subject" => p.subjects.push(v),
            "groupBy" => p.group_by.push(v),
            _ if k.starts_with("filterGroupBy[") && k.ends_with(']') => {
                let name = k["filterGroupBy[".len()..k.len() - 1].to_string();
                p.filter_group_by.insert(name, v);
            }
            _ => {
                return Err(ApiError::invalid(
                    k.clone(),
                    "is not a parameter of the meter query",
                ))
            }
        }
    }
    if let (Some(f), Some(t)) = (p.from, p.to) {
        if f >= t {
            return Err(ApiError::invalid("to", "must be after `from`"));
        }
    }
    Ok(p)
}

/// Window bounds in UTC: `from`, every window start strictly inside (from, to), `to`.
pub fn bounds(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    size: Option<WindowSize>,
    tz: Tz,
) -> Result<Vec<DateTime<Utc>>, ApiError> {
    let mut b = vec![from];
    let too_many = || {
        ApiError::invalid(
            "windowSize",
            format!("the range holds more than {MAX_WINDOWS} windows"),
        )
    };
    let push = |b: &mut Vec<DateTime<Utc>>, t: DateTime<Utc>| -> Result<(), ApiError> {
        if t > from && t < to && b.last().is_some_and(|l| *l < t) {
            b.push(t);
            if b.len() > MAX_WINDOWS {
                return Err(too_many());
            }
        }
        Ok(())
    };
    match size {
        None => {}
        Some(WindowSize::Minute) => {
            // Every zone in use today has whole-minute offsets: local minutes are UTC minutes.
            let mut t = from + Duration::minutes(1);
            while t < to {
                push(&mut b, t)?;
                t += Duration::minutes(1);
            }
        }
        Some(WindowSize::Hour) => {
            // Local hour starts, found on the quarter-hour grid (offsets are multiples of 15 min).
            let q = 15 * 60;
            let mut t =
                DateTime::from_timestamp((from.timestamp().div_euclid(q) + 1) * q, 0).unwrap_or(to);
            while t < to {
                let local = t.with_timezone(&tz);
                if local.minute() == 0 {
                    push(&mut b, t)?;
                }
                t += Duration::seconds(q);
            }
        }
        Some(WindowSize::Day) | Some(WindowSize::Month) => {
            let month = size == Some(WindowSize::Month);
            let mut d = from.with_timezone(&tz).date_naive();
            loop {
                d = if month {
                    let (y, m) = if d.month() == 12 {
                        (d.year() + 1, 1)
                    } else {
                        (d.year(), d.month() + 1)
                    };
                    NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(d)
                } else {
                    d.succ_opt().unwrap_or(d)
                };
                let t = local_start(tz, d);
                if t >= to {
                    break;
                }
                push(&mut b, t)?;
            }
        }
    }
    b.push(to);
    Ok(b)
}

/// The first instant of local date `d` in `tz` (when midnight does not exist, the first minute
/// after the gap).
pub fn local_start(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    let mut naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    for _ in 0..(24 * 4) {
        if let Some(t) = tz.from_local_datetime(&naive).earliest() {
            return t.with_timezone(&Utc);
        }
        naive += Duration::minutes(15);
    }
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub value: serde_json::Value,
    pub window_start: String,
    pub window_end: String,
    pub subject: Option<String>,
    pub group_by: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryResult {
    pub from: String,
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_size: Option<&'static str>,
    pub data: Vec<Row>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn number(d: Decimal) -> serde_json::Value {
    let text = d.normalize().to_string();
    text.parse::<serde_json::Number>()
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::String(text))
}

pub async fn query(
    State(st): State<AppState>,
    caller: Caller,
    Path(id_or_slug): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<QueryResult>, ApiError> {
    let p = parse_params(raw.as_deref().unwrap_or(""))?;
    let db = st.pool.get().await?;
    let meter = crate::meters::find(&db, caller.tenant, &id_or_slug).await?;
    let aggregation: Aggregation = meter
        .aggregation
        .parse()
        .map_err(|e: String| ApiError::invalid("aggregation", e))?;
    for g in &p.group_by {
        if g != "subject" && !meter.group_by.contains_key(g) {
            return Err(ApiError::invalid(
                "groupBy",
                format!("`{g}` is not a groupBy of meter {}", meter.slug),
            ));
        }
    }
    for g in p.filter_group_by.keys() {
        if !meter.group_by.contains_key(g) {
            return Err(ApiError::invalid(
                format!("filterGroupBy[{g}]"),
                format!("`{g}` is not a groupBy of meter {}", meter.slug),
            ));
        }
    }
    let now = Utc::now();
    let to = p.to.unwrap_or_else(|| {
        DateTime::from_timestamp((now.timestamp().div_euclid(60) + 1) * 60, 0).unwrap_or(now)
    });
    let from = match p.from {
        Some(f) => f,
        None => {
            let first: Option<DateTime<Utc>> = db
                .query_one(
                    "SELECT min(window_start) FROM usage_minute WHERE tenant_id = $1 AND meter_id = $2",
                    &[&caller.tenant, &meter.id],
                )
                .await?
                .get(0);
            first
                .unwrap_or(to - Duration::minutes(1))
                .min(to - Duration::minutes(1))
        }
    };
    if from >= to {
        return Err(ApiError::invalid("from", "must be before `to`"));
    }
    let tz = p.tz.unwrap_or(chrono_tz::UTC);
    let b = bounds(from, to, p.window_size, tz)?;
    let grain = if b.iter().all(|t| t.timestamp() % 86_400 == 0) {
        "day"
    } else if b.iter().all(|t| t.timestamp() % 3_600 == 0) {
        "hour"
    } else {
        "minute"
    };
    let by_subject = !p.subjects.is_empty() || p.group_by.iter().any(|g| g == "subject");
    let requested: Vec<String> = p
        .group_by
        .iter()
        .filter(|g| *g != "subject")
        .cloned()
        .collect();
    let dropped: Vec<String> = meter
        .group_by
        .keys()
        .filter(|k| !requested.contains(k))
        .cloned()
        .collect();
    let filter = serde_json::to_value(&p.filter_group_by).unwrap_or_default();
    let subjects: Option<Vec<String>> = (!p.subjects.is_empty()).then(|| p.subjects.clone());
    let common =
        "WHERE tenant_id = $1 AND meter_id = $2 AND window_start >= $3 AND window_start < $4
                    AND ($5::text[] IS NULL OR subject = ANY($5)) AND group_values @> $6::jsonb";
    let sql = if aggregation == Aggregation::UniqueCount {
        format!(
            "SELECT width_bucket(window_start, $7::timestamptz[]), CASE WHEN $8 THEN subject END,
                    (group_values - $9::text[]), count(DISTINCT value)::numeric, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric
               FROM usage_unique_{grain} {common} GROUP BY 1, 2, 3"
        )
    } else {
        format!(
            "SELECT width_bucket(window_start, $7::timestamptz[]), CASE WHEN $8 THEN subject END,
                    (group_values - $9::text[]), sum(event_count)::numeric, sum(sum_value), min(min_value), max(max_value),
                    (array_agg(latest_value ORDER BY latest_time DESC NULLS LAST, latest_value DESC NULLS LAST))[1]
               FROM usage_{grain} {common} GROUP BY 1, 2, 3"
        )
    };
    let rows = db
        .query(
            &sql,
            &[
                &caller.tenant,
                &meter.id,
                &from,
                &to,
                &subjects,
                &filter,
                &b,
                &by_subject,
                &dropped,
            ],
        )
        .await?;
    let mut data = Vec::with_capacity(rows.len());
    for r in rows {
        let bucket: i32 = r.get(0);
        let i = usize::try_from(bucket - 1).unwrap_or(0);
        let (Some(ws), Some(we)) = (b.get(i), b.get(i + 1)) else {
            continue;
        };
        let subject: Option<String> = r.get(1);
        let groups: serde_json::Value = r.get(2);
        let count: Decimal = r.get(3);
        let sum: Option<Decimal> = r.get(4);
        let value = match aggregation {
            Aggregation::Count | Aggregation::UniqueCount => Some(count),
            Aggregation::Sum => sum,
            Aggregation::Avg => match sum {
                Some(s) if !count.is_zero() => s.checked_div(count),
                _ => None,
            },
            Aggregation::Min => r.get(5),
            Aggregation::Max => r.get(6),
            Aggregation::Latest => r.get(7),
        };
        let Some(value) = value else { continue };
        let group_by = requested
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    groups.get(k).and_then(|v| v.as_str()).map(str::to_string),
                )
            })
            .collect();
        data.push((
            *ws,
            subject.clone(),
            Row {
                value: number(value),
                window_start: rfc3339(*ws),
                window_end: rfc3339(*we),
                subject,
                group_by,
            },
        ));
    }
    data.sort_by(|a, b| (a.0, &a.1, &a.2.group_by).cmp(&(b.0, &b.1, &b.2.group_by)));
    Ok(Json(QueryResult {
        from: rfc3339(from),
        to: rfc3339(to),
        window_size: p.window_size.map(WindowSize::as_str),
        data: data.into_iter().map(|d| d.2).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn days_across_dst_are_23_and_25_hours() {
        let tz: Tz = "America/New_York".parse().expect("tz");
        // 2026-03-08: spring forward; 2026-11-01: fall back.
        let b = bounds(
            t("2026-03-07T05:00:00Z"),
            t("2026-03-10T04:00:00Z"),
            Some(WindowSize::Day),
            tz,
        )
        .expect("bounds");
        let hours: Vec<i64> = b.windows(2).map(|w| (w[1] - w[0]).num_hours()).collect();
        assert_eq!(hours, vec![24, 23, 24]);
        let b = bounds(
            t("2026-10-31T04:00:00Z"),
            t("2026-11-02T05:00:00Z"),
            Some(WindowSize::Day),
            tz,
        )
        .expect("bounds");
        let hours: Vec<i64> = b.windows(2).map(|w| (w[1] - w[0]).num_hours()).collect();
        assert_eq!(hours, vec![24, 25]);
    }

    #[test]
    fn hours_in_half_hour_zones_and_months() {
        let tz: Tz = "Asia/Kolkata".parse().expect("tz");
        let b = bounds(
            t("2026-01-01T00:00:00Z"),
            t("2026-01-01T03:00:00Z"),
            Some(WindowSize::Hour),
            tz,
        )
        .expect("bounds");
        assert_eq!(b[1], t("2026-01-01T00:30:00Z"));
        assert_eq!(b.len(), 5);
        let b = bounds(
            t("2026-01-15T00:00:00Z"),
            t("2026-04-01T00:00:00Z"),
            Some(WindowSize::Month),
            chrono_tz::UTC,
        )
        .expect("bounds");
        assert_eq!(
            b,
            vec![
                t("2026-01-15T00:00:00Z"),
                t("2026-02-01T00:00:00Z"),
                t("2026-03-01T00:00:00Z"),
                t("2026-04-01T00:00:00Z")
            ]
        );
    }

    #[test]
    fn parameters_are_checked_by_name() {
        assert!(parse_params("from=2026-01-01T00:00:30Z").is_err());
        let e = parse_params("windowSize=WEEK").expect_err("refused");
        assert_eq!(e.field.as_deref(), Some("windowSize"));
        let p = parse_params("subject=a&subject=b&groupBy=model&filterGroupBy%5Bregion%5D=eu")
            .expect("parsed");
        assert_eq!(p.subjects, vec!["a", "b"]);
        assert_eq!(
            p.filter_group_by.get("region").map(String::as_str),
            Some("eu")
        );
        assert!(parse_params("bogus=1").is_err());
    }
}
