//! One flush = one PostgreSQL transaction per shard: fence check, dedup ids, aggregate deltas
//! at three grains, distinct values, corrections, dead letters, outcome tallies and the consumed
//! offsets with the watermarks. Either all of it commits or none of it does; nothing else decides
//! what was counted.

use crate::process::{self, BadRecord, Deltas, Outcome, Pending};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Client;
use uuid::Uuid;

/// The state of one owned partition at flush time.
#[derive(Debug, Clone)]
pub struct PartitionCommit {
    pub partition: i32,
    pub generation: i64,
    /// `next_offset` as stored when this shard took the partition or last committed it (None:
    /// no row yet). The flush refuses to commit if the stored value moved meanwhile.
    pub committed_offset: Option<i64>,
    /// The offset after the last record consumed.
    pub next_offset: Option<i64>,
    pub watermark: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The shard lost a partition (its lease was taken over) or the stored offset moved: it
    /// must drop its unflushed state and re-read its assignment. Nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What a committed flush did, for metrics and logs.
#[derive(Debug, Default)]
pub struct FlushReport {
    pub events: usize,
    pub accepted: u64,
    pub duplicates: u64,
    pub unmetered: u64,
    pub rejected: u64,
    pub late: u64,
    pub corrections: usize,
    pub dead_letters: usize,
    pub window_rows: usize,
    /// Newest reception time among the flushed events (for freshness).
    pub received_min: Option<i64>,
    pub received_max: Option<i64>,
    /// Watermarks after the flush, per partition.
    pub watermarks: HashMap<i32, i64>,
}

pub struct FlushInput<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub member: &'a str,
    pub partitions: &'a [PartitionCommit],
    pub events: &'a [Pending],
    pub bad: &'a [BadRecord],
    pub meters: &'a crate::meters::MeterSet,
    pub lateness: &'a crate::config::LatenessConfig,
    pub dedup_window_secs: u64,
}

impl std::fmt::Debug for FlushInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushInput")
            .field("partitions", &self.partitions)
            .field("events", &self.events.len())
            .finish()
    }
}

fn ts(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

pub async fn flush(db: &mut Client, inp: FlushInput<'_>) -> Result<FlushReport, FlushError> {
    let t0 = std::time::Instant::now();
    let mut phases: Vec<(&str, std::time::Duration)> = Vec::new();
    // Classify in consumption order from the committed watermarks, and dedup within the flush,
    // before the transaction opens: neither needs the database.
    let mut wms: HashMap<i32, i64> = inp
        .partitions
        .iter()
        .map(|p| (p.partition, p.watermark))
        .collect();
    let outcomes = process::classify(inp.events, inp.meters, inp.lateness, &mut wms);
    let (claim, mut duplicate) = process::dedup_within(inp.events, &outcomes);
    phases.push(("classify", t0.elapsed()));
    let tx = db.transaction().await?;

    // 1. Fence: every partition written must still be leased to this member under the same
    //    generation, and its stored offset must be the one this shard started from.
    let parts: Vec<i32> = inp.partitions.iter().map(|p| p.partition).collect();
    let rows = tx
        .query(
            "SELECT l.partition, l.owner, l.generation, o.next_offset
               FROM partition_leases l
               LEFT JOIN consumer_offsets o USING (consumer_group, topic, partition)
              WHERE l.consumer_group = $1 AND l.topic = $2 AND l.partition = ANY($3)
                FOR UPDATE OF l",
            &[&inp.group, &inp.topic, &parts],
        )
        .await?;
    let held: HashMap<i32, (String, i64, Option<i64>)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    for p in inp.partitions {
        match held.get(&p.partition) {
            Some((owner, generation, stored))
                if owner == inp.member
                    && *generation == p.generation
                    && *stored == p.committed_offset => {}
            other => {
                return Err(FlushError::Fenced(format!(
                    "partition {} (generation {}, from offset {:?}) is now {:?}",
                    p.partition, p.generation, p.committed_offset, other
                )))
            }
        }
    }

    phases.push(("fence", t0.elapsed()));
    // 2. Dedup: within the flush (above), then against every key claimed before (any shard, any
    //    earlier flush) inside the dedup window. One statement claims the keys: a new key is
    //    inserted, a key seen longer ago than the window is claimed anew (refreshed); both come
    //    back from RETURNING. A key not returned is a duplicate. A key another shard's open
    //    transaction claims (the same id under another subject) makes this insert wait for it:
    //    if it commits, the key is a duplicate here; if it rolls back, the key is ours. Exact.
    if !claim.is_empty() {
        let keys: Vec<Uuid> = claim.iter().map(|c| c.1).collect();
        let seen: Vec<DateTime<Utc>> = claim.iter().map(|c| ts(inp.events[c.0].received)).collect();
        let window = format!("{} seconds", inp.dedup_window_secs);
        let claimed: HashSet<Uuid> = tx
            .query(
                "INSERT INTO dedup_keys AS d (key, seen_at)
                 SELECT * FROM unnest($1::uuid[], $2::timestamptz[])
                 ON CONFLICT (key) DO UPDATE SET seen_at = EXCLUDED.seen_at
                  WHERE d.seen_at < EXCLUDED.seen_at - $3::text::interval
                 RETURNING key",
                &[&keys, &seen, &window],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (i, key) in &claim {
            if !claimed.contains(key) {
                duplicate[*i] = true;
            }
        }
    }
    phases.push(("dedup", t0.elapsed()));
    // 3. Fold the survivors into deltas and merge them at the three grains.
    let deltas = Deltas::build(inp.events, &outcomes, &duplicate);
    phases.push(("fold", t0.elapsed()));
    for (grain, table) in [(0usize, "minute"), (1, "hour"), (2, "day")] {
        let rows = &deltas.windows[grain];
        if rows.is_empty() {
            continue;
        }
        let tenant: Vec<Uuid> = rows.iter().map(|(k, _)| k.tenant).collect();
        let meter: Vec<Uuid> = rows.iter().map(|(k, _)| k.meter).collect();
        let start: Vec<DateTime<Utc>> = rows.iter().map(|(k, _)| ts(k.window_start)).collect();
        let subject: Vec<&str> = rows.iter().map(|(k, _)| &*k.subject).collect();
        let group: Vec<&str> = rows.iter().map(|(k, _)| &*k.group).collect();
        let sum: Vec<Decimal> = rows.iter().map(|(_, a)| a.sum).collect();
        let count: Vec<i64> = rows.iter().map(|(_, a)| a.count).collect();
        let min: Vec<Option<Decimal>> = rows.iter().map(|(_, a)| a.min).collect();
        let max: Vec<Option<Decimal>> = rows.iter().map(|(_, a)| a.max).collect();
        let lv: Vec<Option<Decimal>> = rows.iter().map(|(_, a)| a.latest.map(|l| l.1)).collect();
        let lt: Vec<Option<DateTime<Utc>>> = rows
            .iter()
            .map(|(_, a)| a.latest.map(|l| ts(l.0)))
            .collect();
        let sql = format!(
            "INSERT INTO usage_{table} AS t (tenant_id, meter_id, window_start, subject, group_values,
                    sum_value, event_count, min_value, max_value, latest_value, latest_time)
             SELECT a, b, c, d, e::jsonb, f, g, h, i, j, k
               FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[],
                           $6::numeric[], $7::int8[], $8::numeric[], $9::numeric[], $10::numeric[],
                           $11::timestamptz[]) AS s(a, b, c, d, e, f, g, h, i, j, k)
             ON CONFLICT (tenant_id, meter_id, window_start, subject, group_values) DO UPDATE SET
                sum_value = t.sum_value + EXCLUDED.sum_value,
                event_count = t.event_count + EXCLUDED.event_count,
                min_value = LEAST(t.min_value, EXCLUDED.min_value),
                max_value = GREATEST(t.max_value, EXCLUDED.max_value),
                latest_value = CASE
                    WHEN EXCLUDED.latest_time IS NULL THEN t.latest_value
                    WHEN t.latest_time IS NULL
                      OR (EXCLUDED.latest_time, EXCLUDED.latest_value) > (t.latest_time, t.latest_value)
                    THEN EXCLUDED.latest_value ELSE t.latest_value END,
                latest_time = GREATEST(t.latest_time, EXCLUDED.latest_time),
                updated_at = now()"
        );
        tx.execute(
            &sql,
            &[
                &tenant, &meter, &start, &subject, &group, &sum, &count, &min, &max, &lv, &lt,
            ],
        )
        .await?;
        let uniq = &deltas.uniques[grain];
        if !uniq.is_empty() {
            let tenant: Vec<Uuid> = uniq.iter().map(|(k, _)| k.tenant).collect();
            let meter: Vec<Uuid> = uniq.iter().map(|(k, _)| k.meter).collect();
            let start: Vec<DateTime<Utc>> = uniq.iter().map(|(k, _)| ts(k.window_start)).collect();
            let subject: Vec<&str> = uniq.iter().map(|(k, _)| &*k.subject).collect();
            let group: Vec<&str> = uniq.iter().map(|(k, _)| &*k.group).collect();
            let value: Vec<&str> = uniq.iter().map(|(_, v)| v.as_str()).collect();
            let sql = format!(
                "INSERT INTO usage_unique_{table} (tenant_id, meter_id, window_start, subject, group_values, value)
                 SELECT a, b, c, d, e::jsonb, f
                   FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::text[])
                        AS s(a, b, c, d, e, f)
                 ON CONFLICT DO NOTHING"
            );
            tx.execute(&sql, &[&tenant, &meter, &start, &subject, &group, &value])
                .await?;
        }
    }

    phases.push(("merge", t0.elapsed()));
    // 4. Corrections: late deltas of windows the watermark had already closed.
    if !deltas.corrections.is_empty() {
        let c = &deltas.corrections;
        let tenant: Vec<Uuid> = c.iter().map(|(k, _)| k.tenant).collect();
        let meter: Vec<Uuid> = c.iter().map(|(k, _)| k.meter).collect();
        let subject: Vec<&str> = c.iter().map(|(k, _)| &*k.subject).collect();
        let group: Vec<&str> = c.iter().map(|(k, _)| &*k.group).collect();
        let start: Vec<DateTime<Utc>> = c.iter().map(|(k, _)| ts(k.window_start)).collect();
        let sum: Vec<Decimal> = c.iter().map(|(_, a)| a.sum).collect();
        let count: Vec<i64> = c.iter().map(|(_, a)| a.count).collect();
        tx.execute(
            "INSERT INTO usage_corrections (tenant_id, meter_id, subject, group_values, window_start, delta_sum, delta_count)
             SELECT a, b, c, d::jsonb, e, f, g
               FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::numeric[], $7::int8[])
                    AS s(a, b, c, d, e, f, g)",
            &[&tenant, &meter, &subject, &group, &start, &sum, &count],
        )
        .await?;
    }

    // 5. Dead letters: rejected events, whole, with the reason; unreadable records.
    let mut dl = DeadLetters::default();
    for (p, o) in inp.events.iter().zip(&outcomes) {
        if let Outcome::Rejected { reason, detail } = o {
            dl.push_event(inp.topic, p, reason, detail);
        }
    }
    for b in inp.bad {
        dl.push_record(inp.topic, b);
    }
    let dead_letters = dl.len();
    dl.write(&tx, inp.topic).await?;

    // 6. Outcome tallies per tenant, day and reason.
    if !deltas.outcomes.is_empty() {
        let o: Vec<_> = deltas.outcomes.iter().collect();
        let tenant: Vec<Uuid> = o.iter().map(|(k, _)| k.0).collect();
        let day: Vec<i32> = o.iter().map(|(k, _)| k.1 as i32).collect();
        let outcome: Vec<&str> = o.iter().map(|(k, _)| k.2).collect();
        let reason: Vec<&str> = o.iter().map(|(k, _)| k.3).collect();
        let n: Vec<i64> = o.iter().map(|(_, n)| **n).collect();
        tx.execute(
            "INSERT INTO event_outcomes AS t (tenant_id, day, outcome, reason, events)
             SELECT a, date '1970-01-01' + b, c, d, e
               FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::int8[]) AS s(a, b, c, d, e)
             ON CONFLICT (tenant_id, day, outcome, reason) DO UPDATE SET events = t.events + EXCLUDED.events",
            &[&tenant, &day, &outcome, &reason, &n],
        )
        .await?;
    }

    // 7. Offsets and watermarks.
    let commits: Vec<&PartitionCommit> = inp
        .partitions
        .iter()
        .filter(|p| p.next_offset.is_some())
        .collect();
    if !commits.is_empty() {
        let part: Vec<i32> = commits.iter().map(|p| p.partition).collect();
        let off: Vec<i64> = commits.iter().map(|p| p.next_offset.unwrap_or(0)).collect();
        let generation: Vec<i64> = commits.iter().map(|p| p.generation).collect();
        let wm: Vec<i64> = commits
            .iter()
            .map(|p| {
                wms.get(&p.partition)
                    .copied()
                    .unwrap_or(p.watermark)
                    .max(p.watermark)
            })
            .collect();
        tx.execute(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset, generation, watermark_unix_nanos)
             SELECT $1, $2, p, o, g, w FROM unnest($3::int4[], $4::int8[], $5::int8[], $6::int8[]) AS s(p, o, g, w)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET
                next_offset = EXCLUDED.next_offset, generation = EXCLUDED.generation,
                watermark_unix_nanos = EXCLUDED.watermark_unix_nanos, updated_at = now()",
            &[&inp.group, &inp.topic, &part, &off, &generation, &wm],
        )
        .await?;
    }
    phases.push(("rest", t0.elapsed()));
    tx.commit().await?;
    phases.push(("commit", t0.elapsed()));
    tracing::debug!(
        events = inp.events.len(),
        ?phases,
        "flush phases (cumulative)"
    );

    let mut watermarks = HashMap::new();
    for p in inp.partitions {
        let w = wms
            .get(&p.partition)
            .copied()
            .unwrap_or(p.watermark)
            .max(p.watermark);
        watermarks.insert(p.partition, w);
    }
    Ok(FlushReport {
        events: inp.events.len(),
        accepted: deltas.accepted,
        duplicates: deltas.duplicates,
        unmetered: deltas.unmetered,
        rejected: deltas.rejected,
        late: deltas.late,
        corrections: deltas.corrections.len(),
        dead_letters,
        window_rows: deltas.window_rows(),
        received_min: inp.events.iter().map(|p| p.received).min(),
        received_max: inp.events.iter().map(|p| p.received).max(),
        watermarks,
    })
}

#[derive(Default)]
struct DeadLetters {
    tenant: Vec<Option<Uuid>>,
    source: Vec<Option<String>>,
    event_id: Vec<Option<String>>,
    event_type: Vec<Option<String>>,
    subject: Vec<Option<String>>,
    time: Vec<Option<DateTime<Utc>>>,
    reason: Vec<String>,
    detail: Vec<String>,
    raw: Vec<Option<String>>,
    partition: Vec<i32>,
    offset: Vec<i64>,
}

impl DeadLetters {
    fn len(&self) -> usize {
        self.reason.len()
    }

    fn push_event(&mut self, _topic: &str, p: &Pending, reason: &str, detail: &str) {
        let e = &p.event;
        let data: serde_json::Value = if e.data_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&e.data_json).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.data_json).into_owned())
            })
        };
        let raw = serde_json::json!({
            "specversion": "1.0",
            "id": e.id,
            "source": e.source,
            "type": e.r#type,
            "subject": e.subject,
            "time": ts(e.time_unix_nanos).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "data": data,
        });
        self.tenant.push(Some(p.tenant));
        self.source.push(Some(e.source.clone()));
        self.event_id.push(Some(e.id.clone()));
        self.event_type.push(Some(e.r#type.clone()));
        self.subject.push(Some(e.subject.clone()));
        self.time.push(Some(ts(e.time_unix_nanos)));
        self.reason.push(reason.to_string());
        self.detail.push(detail.to_string());
        self.raw.push(Some(raw.to_string()));
        self.partition.push(p.partition);
        self.offset.push(p.offset);
    }

    fn push_record(&mut self, _topic: &str, b: &BadRecord) {
        self.tenant.push(None);
        self.source.push(None);
        self.event_id.push(None);
        self.event_type.push(None);
        self.subject.push(None);
        self.time.push(None);
        self.reason.push(b.reason.to_string());
        self.detail.push(b.detail.clone());
        self.raw.push(None);
        self.partition.push(b.partition);
        self.offset.push(b.offset);
    }

    async fn write(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        topic: &str,
    ) -> Result<(), tokio_postgres::Error> {
        if self.reason.is_empty() {
            return Ok(());
        }
        tx.execute(
            "INSERT INTO dead_letters (tenant_id, source, event_id, event_type, subject, event_time,
                                       reason, detail, raw_event, topic, partition, kafka_offset)
             SELECT a, b, c, d, e, f, g, h, i::jsonb, $12, k, l
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
                           $7::text[], $8::text[], $9::text[], $10::int4[], $11::int8[])
                    AS s(a, b, c, d, e, f, g, h, i, k, l)",
            &[
                &self.tenant,
                &self.source,
                &self.event_id,
                &self.event_type,
                &self.subject,
                &self.time,
                &self.reason,
                &self.detail,
                &self.raw,
                &self.partition,
                &self.offset,
                &topic,
            ],
        )
        .await?;
        Ok(())
    }
}
