//! A seeded generator of usage streams and the reference the pipeline must agree with,
//! computed here directly from the generated events (no code shared with the aggregator or the
//! query beyond chrono-tz).

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// The meters every generated tenant has: (slug, aggregation, value property).
pub const METERS: &[(&str, &str, Option<&str>)] = &[
    ("g_sum", "SUM", Some("$.v")),
    ("g_count", "COUNT", None),
    ("g_avg", "AVG", Some("$.v")),
    ("g_min", "MIN", Some("$.v")),
    ("g_max", "MAX", Some("$.v")),
    ("g_latest", "LATEST", Some("$.v")),
    ("g_users", "UNIQUE_COUNT", Some("$.user")),
];

pub fn meter_json(slug: &str, agg: &str, value: Option<&str>) -> Value {
    let mut m = json!({"slug": slug, "eventType": "gen", "aggregation": agg,
                       "groupBy": {"model": "$.model", "region": "$.region"}});
    if let Some(v) = value {
        m["valueProperty"] = json!(v);
    }
    m
}

#[derive(Debug, Clone)]
pub struct Accepted {
    pub subject: String,
    pub time: DateTime<Utc>,
    pub model: String,
    pub region: Option<String>,
    pub value: Decimal,
    pub user: String,
}

#[derive(Debug, Default)]
pub struct Stream {
    /// Events in send order (duplicates included), as JSON.
    pub events: Vec<Value>,
    /// The events that must be counted, once each.
    pub accepted: Vec<Accepted>,
    /// outcome[:reason] → events.
    pub outcomes: BTreeMap<String, i64>,
}

/// `n` events over the last 34 days before `now` (so DST changes of late October / early
/// November fall inside), out of order, with about 10 % duplicates, 3 % unmetered, 2 % without
/// a value, 2 % beyond the horizon and 1 % too far ahead.
pub fn stream(seed: u64, n: usize, now: DateTime<Utc>, id_prefix: &str) -> Stream {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Stream::default();
    let mut claimed: HashSet<String> = HashSet::new();
    let mut sent: Vec<(Value, &'static str)> = Vec::new();
    let out = |s: &mut Stream, k: &str| *s.outcomes.entry(k.to_string()).or_default() += 1;
    for i in 0..n {
        if !sent.is_empty() && rng.random_bool(0.10) {
            let (e, kind) = sent[rng.random_range(0..sent.len())].clone();
            let id = e["id"].as_str().unwrap_or_default().to_string();
            match kind {
                "rejected_missing" => out(&mut s, "rejected:value_missing"),
                "rejected_horizon" => out(&mut s, "rejected:beyond_lateness_horizon"),
                "rejected_ahead" => out(&mut s, "rejected:too_far_ahead"),
                _ if claimed.contains(&id) => out(&mut s, "duplicate"),
                _ => unreachable!("claimed on first send"),
            }
            s.events.push(e);
            continue;
        }
        let id = format!("{id_prefix}-{i}");
        let subject = format!("cust-{}", rng.random_range(0..5));
        let back = if rng.random_bool(0.3) {
            Duration::minutes(rng.random_range(1..180))
        } else {
            Duration::seconds(rng.random_range(60..34 * 86_400))
        };
        let mut time = now - back;
        let roll: f64 = rng.random();
        let models = ["gpt-a", "gpt-b", "claude"];
        let model = models[rng.random_range(0..models.len())].to_string();
        let region = match rng.random_range(0..3) {
            0 => None,
            1 => Some("eu".to_string()),
            _ => Some("us".to_string()),
        };
        let value = Decimal::new(rng.random_range(0..100_000), rng.random_range(0..4));
        let user = format!("u{}", rng.random_range(0..40));
        let mut data = json!({"model": model, "user": user});
        if let Some(r) = &region {
            data["region"] = json!(r);
        }
        // Numbers as JSON numbers or numeric strings: both are read exactly.
        data["v"] = if rng.random_bool(0.5) {
            json!(value.to_string())
        } else {
            value
                .to_string()
                .parse::<serde_json::Number>()
                .map(Value::Number)
                .unwrap_or(Value::Null)
        };
        let (ty, kind) = if roll < 0.03 {
            ("noise", "unmetered")
        } else if roll < 0.05 {
            data.as_object_mut().map(|o| o.remove("v"));
            ("gen", "rejected_missing")
        } else if roll < 0.07 {
            time = now - Duration::days(36) - Duration::seconds(rng.random_range(0..86_400 * 3));
            ("gen", "rejected_horizon")
        } else if roll < 0.08 {
            time = now + Duration::hours(1);
            ("gen", "rejected_ahead")
        } else {
            ("gen", "accepted")
        };
        let e = json!({
            "specversion": "1.0", "id": id, "source": "gen", "type": ty, "subject": subject,
            "time": time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "data": data,
        });
        match kind {
            "unmetered" => {
                claimed.insert(id.clone());
                out(&mut s, "unmetered");
            }
            "accepted" => {
                claimed.insert(id.clone());
                out(&mut s, "accepted");
                s.accepted.push(Accepted {
                    subject: subject.clone(),
                    time: DateTime::from_timestamp_millis(time.timestamp_millis()).unwrap_or(time),
                    model: model.clone(),
                    region: region.clone(),
                    value,
                    user: user.clone(),
                });
            }
            "rejected_missing" => out(&mut s, "rejected:value_missing"),
            "rejected_horizon" => out(&mut s, "rejected:beyond_lateness_horizon"),
            _ => out(&mut s, "rejected:too_far_ahead"),
        }
        sent.push((e.clone(), kind));
        s.events.push(e);
    }
    s
}

/// (windowStart, subject, groupBy values) of one answer row.
pub type RowKey = (String, Option<String>, Vec<(String, Option<String>)>);
/// A query answer: row key → value as normalised decimal text.
pub type Answer = BTreeMap<RowKey, String>;

#[derive(Debug, Clone, Copy)]
pub enum Window {
    None,
    Minute,
    Hour,
    Day,
    Month,
}

/// The start of the window holding `t` in `tz`, computed from local calendar fields.
pub fn window_start(t: DateTime<Utc>, w: Window, tz: Tz) -> Option<DateTime<Utc>> {
    let local = t.with_timezone(&tz);
    let midnight = |d: NaiveDate| {
        tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
            .earliest()
            .map(|x| x.with_timezone(&Utc))
    };
    match w {
        Window::None => None,
        Window::Minute => Some(
            t - Duration::seconds(t.second() as i64) - Duration::nanoseconds(t.nanosecond() as i64),
        ),
        Window::Hour => Some(
            t - Duration::minutes(local.minute() as i64)
                - Duration::seconds(local.second() as i64)
                - Duration::nanoseconds(local.nanosecond() as i64),
        ),
        Window::Day => midnight(local.date_naive()),
        Window::Month => {
            midnight(NaiveDate::from_ymd_opt(local.year(), local.month(), 1).expect("first"))
        }
    }
}

/// The expected query answer: (windowStart, subject, groupBy) → value, as normalised decimal text.
#[allow(clippy::too_many_arguments)]
pub fn expected(
    accepted: &[Accepted],
    aggregation: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    w: Window,
    tz: Tz,
    group_subject: bool,
    group_by: &[&str],
    subjects: &[&str],
    filter_region: Option<&str>,
) -> Answer {
    #[derive(Default)]
    struct Agg {
        sum: Decimal,
        count: i64,
        min: Option<Decimal>,
        max: Option<Decimal>,
        latest: Option<(DateTime<Utc>, Decimal)>,
        users: BTreeSet<String>,
    }
    let mut m: BTreeMap<_, Agg> = BTreeMap::new();
    for a in accepted {
        if a.time < from || a.time >= to {
            continue;
        }
        if !subjects.is_empty() && !subjects.contains(&a.subject.as_str()) {
            continue;
        }
        if let Some(r) = filter_region {
            if a.region.as_deref() != Some(r) {
                continue;
            }
        }
        let ws = window_start(a.time, w, tz)
            .map(|s| s.max(from))
            .unwrap_or(from);
        let subject = (group_subject || !subjects.is_empty()).then(|| a.subject.clone());
        let groups: Vec<(String, Option<String>)> = group_by
            .iter()
            .map(|g| {
                let v = match *g {
                    "model" => Some(a.model.clone()),
                    "region" => a.region.clone(),
                    _ => None,
                };
                (g.to_string(), v)
            })
            .collect();
        let e = m
            .entry((
                ws.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                subject,
                groups,
            ))
            .or_default();
        e.sum += a.value;
        e.count += 1;
        e.min = Some(e.min.map_or(a.value, |x| x.min(a.value)));
        e.max = Some(e.max.map_or(a.value, |x| x.max(a.value)));
        e.latest = Some(match e.latest {
            Some(l) if l >= (a.time, a.value) => l,
            _ => (a.time, a.value),
        });
        e.users.insert(a.user.clone());
    }
    m.into_iter()
        .map(|(k, a)| {
            let v = match aggregation {
                "SUM" => a.sum,
                "COUNT" => Decimal::from(a.count),
                "AVG" => a.sum / Decimal::from(a.count),
                "MIN" => a.min.unwrap_or_default(),
                "MAX" => a.max.unwrap_or_default(),
                "LATEST" => a.latest.map(|l| l.1).unwrap_or_default(),
                _ => Decimal::from(a.users.len()),
            };
            (k, v.normalize().to_string())
        })
        .collect()
}

/// A query answer in the same form as [`expected`].
pub fn answer(v: &Value, group_by: &[&str]) -> Answer {
    v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            let groups = group_by
                .iter()
                .map(|g| (g.to_string(), d["groupBy"][g].as_str().map(str::to_string)))
                .collect();
            let value = d["value"]
                .to_string()
                .parse::<Decimal>()
                .or_else(|_| Decimal::from_scientific(&d["value"].to_string()))
                .map(|x| x.normalize().to_string())
                .unwrap_or_else(|_| d["value"].to_string());
            (
                (
                    d["windowStart"].as_str().expect("windowStart").to_string(),
                    d["subject"].as_str().map(str::to_string),
                    groups,
                ),
                value,
            )
        })
        .collect()
}
