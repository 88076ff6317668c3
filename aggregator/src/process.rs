//! What a flush does with the events it holds, before (and apart from) PostgreSQL: classify each
//! event (horizon, meters, values), fold the survivors of dedup into per-window deltas at three
//! grains, and tally outcomes. Pure and deterministic: the same events, meters and starting
//! watermarks give the same deltas, which is what makes replay after a crash exact.

use crate::config::LatenessConfig;
use crate::meters::{Meter, MeterSet};
use rust_decimal::Decimal;
use schemas::meter::{self, Aggregation, ValueError};
use schemas::proto::usage::v1::UsageEvent;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use uuid::Uuid;

pub const NANOS_PER_SEC: i64 = 1_000_000_000;
pub const MINUTE: i64 = 60 * NANOS_PER_SEC;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;
/// Largest magnitude of one value (1e18): sums of up to 10^10 such values stay exact in a
/// 96-bit decimal; larger values are rejected as `value_out_of_range`.
const MAX_VALUE_ABS: Decimal = Decimal::from_parts(0xA764_0000, 0x0DE0_B6B3, 0, false, 0);

/// One consumed event with where it came from.
#[derive(Debug, Clone)]
pub struct Pending {
    pub partition: i32,
    pub offset: i64,
    pub tenant: Uuid,
    /// When ingest received it (Unix nanoseconds): the reference for horizon, meter validity
    /// and the dedup window, so that processing time never changes an answer.
    pub received: i64,
    pub event: UsageEvent,
}

/// A record that could not be read at all (unknown schema, broken protobuf, bad tenant).
#[derive(Debug, Clone)]
pub struct BadRecord {
    pub partition: i32,
    pub offset: i64,
    pub reason: &'static str,
    pub detail: String,
}

/// What one event contributes to one meter.
#[derive(Debug, Clone)]
pub struct Contribution {
    pub meter: Arc<Meter>,
    /// Canonical JSON of the group-by values (keys sorted; absent paths left out).
    pub group: Arc<str>,
    pub value: Option<Decimal>,
    pub unique: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted {
        contributions: Vec<Contribution>,
        late: bool,
    },
    Unmetered,
    Rejected {
        reason: &'static str,
        detail: String,
    },
}

impl Outcome {
    /// Accepted and unmetered events claim their id for dedup; a rejected one does not, so a
    /// corrected resend with the same id is still counted.
    pub fn claims_id(&self) -> bool {
        !matches!(self, Outcome::Rejected { .. })
    }
}

/// Classifies events in consumption order, advancing each partition's watermark (`wms`, event
/// time in Unix nanoseconds) as it goes.
pub fn classify(
    events: &[Pending],
    meters: &MeterSet,
    lateness: &LatenessConfig,
    wms: &mut HashMap<i32, i64>,
) -> Vec<Outcome> {
    let back = i64::try_from(lateness.horizon_back_secs).unwrap_or(i64::MAX / 2) * NANOS_PER_SEC;
    let ahead = i64::try_from(lateness.horizon_ahead_secs).unwrap_or(0) * NANOS_PER_SEC;
    let grace = i64::try_from(lateness.grace_secs).unwrap_or(0) * NANOS_PER_SEC;
    events
        .iter()
        .map(|p| {
            let t = p.event.time_unix_nanos;
            if t < p.received.saturating_sub(back) {
                return Outcome::Rejected {
                    reason: "beyond_lateness_horizon",
                    detail: format!(
                        "event time is more than {} s before reception",
                        lateness.horizon_back_secs
                    ),
                };
            }
            if t > p.received.saturating_add(ahead) {
                return Outcome::Rejected {
                    reason: "too_far_ahead",
                    detail: format!(
                        "event time is more than {} s after reception",
                        lateness.horizon_ahead_secs
                    ),
                };
            }
            let wm = wms.entry(p.partition).or_insert(0);
            let late = floor(t, MINUTE) + MINUTE + grace <= *wm;
            *wm = (*wm).max(t);
            let candidates = meters.for_event(p.tenant, &p.event.r#type);
            let applicable: Vec<&Arc<Meter>> = candidates
                .iter()
                .filter(|m| m.applies_at(p.received))
                .collect();
            if applicable.is_empty() {
                return Outcome::Unmetered;
            }
            let data = if p.event.data_json.is_empty() {
                serde_json::Value::Null
            } else {
                match serde_json::from_slice(&p.event.data_json) {
                    Ok(v) => v,
                    Err(e) => {
                        return Outcome::Rejected {
                            reason: "data_not_json",
                            detail: e.to_string(),
                        }
                    }
                }
            };
            let mut contributions = Vec::with_capacity(applicable.len());
            for m in applicable {
                match contribution(m, &data) {
                    Ok(c) => contributions.push(c),
                    Err((e, path)) => {
                        return Outcome::Rejected {
                            reason: e.reason(),
                            detail: format!("meter {}: {path}", m.slug),
                        }
                    }
                }
            }
            Outcome::Accepted {
                contributions,
                late,
            }
        })
        .collect()
}

fn contribution(
    m: &Arc<Meter>,
    data: &serde_json::Value,
) -> Result<Contribution, (ValueError, String)> {
    let mut group = serde_json::Map::new();
    for (name, path) in &m.group_by {
        if let Some(v) = path.get(data) {
            let text = match v {
                serde_json::Value::Null => continue,
                serde_json::Value::Object(_) | serde_json::Value::Array(_) => v.to_string(),
                _ => meter::scalar_text(v).map_err(|e| (e, path.as_str().to_string()))?,
            };
            group.insert(name.clone(), serde_json::Value::String(text));
        }
    }
    let group: Arc<str> = Arc::from(serde_json::Value::Object(group).to_string());
    let (mut value, mut unique) = (None, None);
    if let (true, Some(path)) = (m.aggregation.needs_value(), &m.value_property) {
        let err = |e: ValueError| (e, path.as_str().to_string());
        let v = path.get(data).ok_or(err(ValueError::Missing))?;
        if m.aggregation == Aggregation::UniqueCount {
            unique = Some(meter::scalar_text(v).map_err(err)?);
        } else {
            let d = meter::decimal(v).map_err(err)?;
            if d.abs() > MAX_VALUE_ABS {
                return Err(err(ValueError::OutOfRange));
            }
            value = Some(d);
        }
    }
    Ok(Contribution {
        meter: m.clone(),
        group,
        value,
        unique,
    })
}

pub fn floor(t: i64, unit: i64) -> i64 {
    t.div_euclid(unit) * unit
}

/// The storage grains: minute rows and the hour and day rollups, all in UTC.
pub const GRAINS: [(usize, i64); 3] = [(0, MINUTE), (1, HOUR), (2, DAY)];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowKey {
    pub grain: usize,
    pub tenant: Uuid,
    pub meter: Uuid,
    pub window_start: i64,
    pub subject: Arc<str>,
    pub group: Arc<str>,
}

/// Deltas of one window (any aggregation; unused columns stay empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Acc {
    pub sum: Decimal,
    pub count: i64,
    pub min: Option<Decimal>,
    pub max: Option<Decimal>,
    /// (event time, value); ties on time keep the larger value, so order never matters.
    pub latest: Option<(i64, Decimal)>,
}

impl Acc {
    fn add(&mut self, time: i64, v: Option<Decimal>) {
        self.count += 1;
        if let Some(v) = v {
            self.sum += v;
            self.min = Some(self.min.map_or(v, |m| m.min(v)));
            self.max = Some(self.max.map_or(v, |m| m.max(v)));
            self.latest = Some(match self.latest {
                Some(l) if l >= (time, v) => l,
                _ => (time, v),
            });
        }
    }
}

/// Everything a flush writes besides offsets, dedup ids and dead letters.
#[derive(Debug, Default)]
pub struct Deltas {
    pub windows: BTreeMap<WindowKey, Acc>,
    pub uniques: HashSet<(WindowKey, String)>,
    /// Late deltas per minute window: what the rater turns into correction lines.
    pub corrections: BTreeMap<WindowKey, Acc>,
    /// (tenant, day of reception as Unix days, outcome, reason) → events.
    pub outcomes: BTreeMap<(Uuid, i64, &'static str, &'static str), i64>,
    pub accepted: u64,
    pub duplicates: u64,
    pub unmetered: u64,
    pub rejected: u64,
    pub late: u64,
}

impl Deltas {
    /// Folds classified events; `duplicate[i]` marks events dedup found already counted.
    pub fn build(events: &[Pending], outcomes: &[Outcome], duplicate: &[bool]) -> Deltas {
        let mut d = Deltas::default();
        for ((p, o), dup) in events.iter().zip(outcomes).zip(duplicate) {
            let day = p.received.div_euclid(DAY);
            let (outcome, reason) = match (o, dup) {
                (_, true) => ("duplicate", ""),
                (Outcome::Unmetered, _) => ("unmetered", ""),
                (Outcome::Rejected { reason, .. }, _) => ("rejected", *reason),
                (Outcome::Accepted { .. }, _) => ("accepted", ""),
            };
            *d.outcomes
                .entry((p.tenant, day, outcome, reason))
                .or_default() += 1;
            match outcome {
                "duplicate" => d.duplicates += 1,
                "unmetered" => d.unmetered += 1,
                "rejected" => d.rejected += 1,
                _ => d.accepted += 1,
            }
            let (
                Outcome::Accepted {
                    contributions,
                    late,
                },
                false,
            ) = (o, dup)
            else {
                continue;
            };
            if *late {
                d.late += 1;
            }
            let t = p.event.time_unix_nanos;
            let subject: Arc<str> = Arc::from(p.event.subject.as_str());
            for c in contributions {
                for (grain, unit) in GRAINS {
                    let key = WindowKey {
                        grain,
                        tenant: p.tenant,
                        meter: c.meter.id,
                        window_start: floor(t, unit),
                        subject: subject.clone(),
                        group: c.group.clone(),
                    };
                    if let Some(u) = &c.unique {
                        d.uniques.insert((key.clone(), u.clone()));
                    }
                    if grain == 0 && *late {
                        d.corrections
                            .entry(key.clone())
                            .or_default()
                            .add(t, c.value);
                    }
                    d.windows.entry(key).or_default().add(t, c.value);
                }
            }
        }
        d
    }
}

/// The dedup key of (tenant, source, id): the first 16 bytes of SHA-256(tenant's 16 bytes ‖
/// source's length in bytes, 4 bytes big-endian ‖ source ‖ id), as PostgreSQL's
/// `metering_dedup_key` computes it (migration V13). The length prefix keeps ("ab", "c") and
/// ("a", "bc") apart.
pub fn dedup_key(tenant: &Uuid, source: &str, id: &str) -> Uuid {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(tenant.as_bytes());
    h.update((source.len() as u32).to_be_bytes());
    h.update(source.as_bytes());
    h.update(id.as_bytes());
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(key)
}

/// Accepts a dedup key once per flush: the first claiming event wins, later ones are duplicates
/// (PostgreSQL then settles the keys seen in earlier flushes or by other shards). Returns the
/// claims as (event index, key), sorted by key, and the in-flush duplicates.
pub fn dedup_within(events: &[Pending], outcomes: &[Outcome]) -> (Vec<(usize, Uuid)>, Vec<bool>) {
    let mut seen: HashSet<Uuid> = HashSet::with_capacity(events.len());
    let mut claim = Vec::with_capacity(events.len());
    let mut dup = vec![false; events.len()];
    for (i, (p, o)) in events.iter().zip(outcomes).enumerate() {
        if !o.claims_id() {
            continue;
        }
        let key = dedup_key(&p.tenant, &p.event.source, &p.event.id);
        if seen.insert(key) {
            claim.push((i, key));
        } else {
            dup[i] = true;
        }
    }
    // Every flush claims its keys in key order: concurrent flushes that share keys (the same id
    // under two subjects, so on two partitions) wait for each other instead of deadlocking,
    // and neighbouring keys touch neighbouring index pages.
    claim.sort_unstable_by_key(|c| c.1);
    (claim, dup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keys_separate_their_parts() {
        let t = Uuid::from_u128(0xb1);
        // The value PostgreSQL's metering_dedup_key gives (checked against it in the
        // pipeline tests too).
        assert_eq!(
            dedup_key(&t, "svc", "ev-1").to_string(),
            "04c5651b-c12f-2a50-d681-9af0fec89e51"
        );
        assert_ne!(dedup_key(&t, "ab", "c"), dedup_key(&t, "a", "bc"));
        assert_ne!(
            dedup_key(&t, "s", "1"),
            dedup_key(&Uuid::from_u128(0xb2), "s", "1")
        );
    }
}
