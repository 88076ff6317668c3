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
use std::sync::{Arc, LazyLock};
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
            let applicable = || candidates.iter().filter(|m| m.applies_at(p.received));
            if applicable().next().is_none() {
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
            let mut contributions = Vec::with_capacity(1);
            for m in applicable() {
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
    let group = if m.group_by.is_empty() {
        EMPTY_GROUP.clone()
    } else {
        group_values(m, data)?
    };
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

/// The group-by values of every meter without dimensions: one shared `{}`.
static EMPTY_GROUP: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("{}"));

/// Canonical JSON of a meter's group-by values (keys sorted; absent paths left out).
fn group_values(m: &Meter, data: &serde_json::Value) -> Result<Arc<str>, (ValueError, String)> {
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
    Ok(Arc::from(serde_json::Value::Object(group).to_string()))
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

    /// Adds another window's deltas (the same rules as adding its events one by one).
    fn merge(&mut self, o: &Acc) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = match (self.min, o.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, o.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.latest = self.latest.max(o.latest);
    }
}

/// How a flush tallies an event: (outcome, reason) as stored in `event_outcomes`.
pub fn tally(o: &Outcome, duplicate: bool) -> (&'static str, &'static str) {
    match (o, duplicate) {
        (_, true) => ("duplicate", ""),
        (Outcome::Unmetered, _) => ("unmetered", ""),
        (Outcome::Rejected { reason, .. }, _) => ("rejected", *reason),
        (Outcome::Accepted { .. }, _) => ("accepted", ""),
    }
}

/// What an event adds to the windows: its contributions and whether it is late, if it is
/// accepted and not a duplicate.
pub fn counted(o: &Outcome, duplicate: bool) -> Option<(&[Contribution], bool)> {
    match o {
        Outcome::Accepted {
            contributions,
            late,
        } if !duplicate => Some((contributions, *late)),
        _ => None,
    }
}

/// The hour and day windows a minute window rolls up into.
pub fn rollups(minute: &WindowKey) -> [WindowKey; 2] {
    [(1, HOUR), (2, DAY)].map(|(grain, unit)| WindowKey {
        grain,
        window_start: floor(minute.window_start, unit),
        ..minute.clone()
    })
}

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;
type FastSet<K> = HashSet<K, ahash::RandomState>;

/// A minute window while folding: borrows the flush's events and outcomes, so folding an event
/// allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MinuteKey<'a> {
    tenant: Uuid,
    meter: Uuid,
    start: i64,
    subject: &'a str,
    group: &'a Arc<str>,
}

/// (tenant, day of reception as Unix days, outcome, reason) → events.
pub type Tallies = BTreeMap<(Uuid, i64, &'static str, &'static str), i64>;

/// Everything a flush writes besides offsets, dedup ids and dead letters. Every list is sorted
/// by key, so that concurrent flushes touch shared rows in one order.
#[derive(Debug, Default)]
pub struct Deltas {
    /// Per grain (the index of [`GRAINS`]): window deltas.
    pub windows: [Vec<(WindowKey, Acc)>; 3],
    /// Per grain: distinct values seen in a window.
    pub uniques: [Vec<(WindowKey, String)>; 3],
    /// Late deltas per minute window: what the rater turns into correction lines.
    pub corrections: Vec<(WindowKey, Acc)>,
    pub outcomes: Tallies,
    pub accepted: u64,
    pub duplicates: u64,
    pub unmetered: u64,
    pub rejected: u64,
    pub late: u64,
}

impl Deltas {
    /// Folds classified events; `duplicate[i]` marks events dedup found already counted. Events
    /// are folded into minute windows only; the hour and day rollups are sums of those.
    pub fn build<'a>(events: &'a [Pending], outcomes: &'a [Outcome], duplicate: &[bool]) -> Deltas {
        let mut d = Deltas::default();
        let mut minutes: FastMap<MinuteKey<'a>, Acc> = FastMap::default();
        let mut uniques: FastSet<(MinuteKey<'a>, &'a str)> = FastSet::default();
        let mut corrections: FastMap<MinuteKey<'a>, Acc> = FastMap::default();
        for ((p, o), dup) in events.iter().zip(outcomes).zip(duplicate) {
            let (outcome, reason) = tally(o, *dup);
            *d.outcomes
                .entry((p.tenant, p.received.div_euclid(DAY), outcome, reason))
                .or_default() += 1;
            match outcome {
                "duplicate" => d.duplicates += 1,
                "unmetered" => d.unmetered += 1,
                "rejected" => d.rejected += 1,
                _ => d.accepted += 1,
            }
            let Some((contributions, late)) = counted(o, *dup) else {
                continue;
            };
            if late {
                d.late += 1;
            }
            let t = p.event.time_unix_nanos;
            for c in contributions {
                let key = MinuteKey {
                    tenant: p.tenant,
                    meter: c.meter.id,
                    start: floor(t, MINUTE),
                    subject: &p.event.subject,
                    group: &c.group,
                };
                if let Some(u) = &c.unique {
                    uniques.insert((key, u.as_str()));
                }
                if late {
                    corrections.entry(key).or_default().add(t, c.value);
                }
                minutes.entry(key).or_default().add(t, c.value);
            }
        }

        // Own the keys (one allocation per distinct subject) and roll the minutes up.
        let mut subjects: FastMap<&'a str, Arc<str>> = FastMap::default();
        let mut own = |k: &MinuteKey<'a>| WindowKey {
            grain: 0,
            tenant: k.tenant,
            meter: k.meter,
            window_start: k.start,
            subject: subjects
                .entry(k.subject)
                .or_insert_with(|| Arc::from(k.subject))
                .clone(),
            group: k.group.clone(),
        };
        let mut rolled: [FastMap<WindowKey, Acc>; 2] = Default::default();
        d.windows[0].reserve(minutes.len());
        for (k, acc) in minutes {
            let key = own(&k);
            for (map, r) in rolled.iter_mut().zip(rollups(&key)) {
                map.entry(r).or_default().merge(&acc);
            }
            d.windows[0].push((key, acc));
        }
        for (grain, map) in rolled.into_iter().enumerate() {
            d.windows[grain + 1] = map.into_iter().collect();
        }
        let mut rolled: [FastSet<(WindowKey, &str)>; 2] = Default::default();
        for (k, u) in uniques {
            let key = own(&k);
            for (set, r) in rolled.iter_mut().zip(rollups(&key)) {
                set.insert((r, u));
            }
            d.uniques[0].push((key, u.to_string()));
        }
        for (grain, set) in rolled.into_iter().enumerate() {
            d.uniques[grain + 1] = set.into_iter().map(|(k, u)| (k, u.to_string())).collect();
        }
        d.corrections = corrections.into_iter().map(|(k, a)| (own(&k), a)).collect();
        for w in &mut d.windows {
            w.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        for u in &mut d.uniques {
            u.sort_unstable();
        }
        d.corrections.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        d
    }

    /// Window rows written, all grains.
    pub fn window_rows(&self) -> usize {
        self.windows.iter().map(Vec::len).sum()
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

    fn meter(id: u128, aggregation: Aggregation) -> Arc<Meter> {
        Arc::new(Meter {
            id: Uuid::from_u128(id),
            tenant_id: Uuid::from_u128(0xb1),
            slug: format!("m{id}"),
            event_type: "t".into(),
            aggregation,
            value_property: None,
            group_by: Vec::new(),
            created_unix_nanos: 0,
            deleted_unix_nanos: None,
        })
    }

    type Windows = BTreeMap<WindowKey, Acc>;

    /// The fold as it was before rollups: every event added at every grain.
    fn fold_every_grain(
        events: &[Pending],
        outcomes: &[Outcome],
        duplicate: &[bool],
    ) -> (
        Windows,
        std::collections::BTreeSet<(WindowKey, String)>,
        Windows,
        Tallies,
    ) {
        let (mut windows, mut uniques, mut corrections, mut tallies) = (
            BTreeMap::new(),
            std::collections::BTreeSet::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        for ((p, o), dup) in events.iter().zip(outcomes).zip(duplicate) {
            let (outcome, reason) = tally(o, *dup);
            *tallies
                .entry((p.tenant, p.received.div_euclid(DAY), outcome, reason))
                .or_insert(0) += 1;
            let Some((contributions, late)) = counted(o, *dup) else {
                continue;
            };
            let t = p.event.time_unix_nanos;
            for c in contributions {
                for (grain, unit) in GRAINS {
                    let key = WindowKey {
                        grain,
                        tenant: p.tenant,
                        meter: c.meter.id,
                        window_start: floor(t, unit),
                        subject: Arc::from(p.event.subject.as_str()),
                        group: c.group.clone(),
                    };
                    if let Some(u) = &c.unique {
                        uniques.insert((key.clone(), u.clone()));
                    }
                    if grain == 0 && late {
                        corrections
                            .entry(key.clone())
                            .or_insert_with(Acc::default)
                            .add(t, c.value);
                    }
                    windows
                        .entry(key)
                        .or_insert_with(Acc::default)
                        .add(t, c.value);
                }
            }
        }
        (windows, uniques, corrections, tallies)
    }

    #[test]
    fn rollups_equal_folding_every_grain() {
        let sum = meter(1, Aggregation::Sum);
        let uniq = meter(2, Aggregation::UniqueCount);
        let tenants = [Uuid::from_u128(0xb1), Uuid::from_u128(0xb2)];
        let groups: [Arc<str>; 2] = [Arc::from("{}"), Arc::from(r#"{"model":"a"}"#)];
        // A fixed pseudo-random walk over 2 days, 3 subjects, 2 groups and every outcome.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut events, mut outcomes, mut duplicate) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..5_000 {
            let time = 1_800_000_000 * NANOS_PER_SEC + next(2 * DAY as u64) as i64;
            events.push(Pending {
                partition: (i % 4) as i32,
                offset: i,
                tenant: tenants[next(2) as usize],
                received: time + next(3 * DAY as u64) as i64,
                event: UsageEvent {
                    id: format!("e{i}"),
                    subject: format!("s{}", next(3)),
                    // Few distinct times, so that ties on `latest` occur.
                    time_unix_nanos: time - time % (7 * MINUTE),
                    ..Default::default()
                },
            });
            let value = Decimal::new(next(10_000) as i64 - 2_000, next(4) as u32);
            outcomes.push(match next(10) {
                0 => Outcome::Unmetered,
                1 => Outcome::Rejected {
                    reason: "value_not_numeric",
                    detail: String::new(),
                },
                k => Outcome::Accepted {
                    contributions: vec![
                        Contribution {
                            meter: sum.clone(),
                            group: groups[next(2) as usize].clone(),
                            value: Some(value),
                            unique: None,
                        },
                        Contribution {
                            meter: uniq.clone(),
                            group: groups[0].clone(),
                            value: None,
                            unique: Some(format!("u{}", next(20))),
                        },
                    ],
                    late: k == 2,
                },
            });
            duplicate.push(next(20) == 0);
        }
        let d = Deltas::build(&events, &outcomes, &duplicate);
        let (windows, uniques, corrections, tallies) =
            fold_every_grain(&events, &outcomes, &duplicate);
        let got: BTreeMap<WindowKey, Acc> = d.windows.iter().flatten().cloned().collect();
        assert_eq!(got.len(), d.window_rows(), "a window appears twice");
        assert_eq!(got, windows);
        for (grain, w) in d.windows.iter().enumerate() {
            assert!(w.iter().all(|(k, _)| k.grain == grain), "grain {grain}");
            assert!(
                w.windows(2).all(|p| p[0].0 < p[1].0),
                "grain {grain} unsorted"
            );
        }
        let got: std::collections::BTreeSet<_> = d.uniques.iter().flatten().cloned().collect();
        assert_eq!(got, uniques);
        assert_eq!(d.uniques.iter().map(Vec::len).sum::<usize>(), uniques.len());
        let got: BTreeMap<WindowKey, Acc> = d.corrections.iter().cloned().collect();
        assert_eq!(got, corrections);
        assert_eq!(d.outcomes, tallies);
        assert_eq!(
            d.accepted + d.duplicates + d.unmetered + d.rejected,
            events.len() as u64
        );
        assert!(d.late > 0 && !d.corrections.is_empty() && !d.uniques[2].is_empty());
    }

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
