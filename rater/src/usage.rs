//! Usage per span: loads a tenant's stored rollups from PostgreSQL into Arrow record batches and
//! aggregates them per (span, meter[, group]) with DataFusion.
//!
//! A span is a subscription's share of a billing period, `[from, to)`, on the subjects that
//! belong to its customer. Each minute of usage is counted once, from the coarsest stored grain
//! that lies wholly inside the span: whole UTC days from `usage_day`, the remaining whole hours
//! of a span's first and last day from `usage_hour`, the remaining minutes of its first and last
//! hour from `usage_minute` (only those days and hours are loaded at the finer grains). The same
//! rule serves UNIQUE_COUNT from the `usage_unique_*` tables, counting distinct values over the
//! whole span — exact over any range.
//!
//! Quantities are exact decimals: Arrow `Decimal128(38, 16)` on the way through DataFusion
//! (a stored value with more than 16 decimal places is refused, never rounded).
//!
//! The query runs while the rows are read: each reading connection feeds one partition of a
//! streaming DataFusion table, so PostgreSQL's side of the read overlaps the join and the
//! aggregation. Subjects and meters travel as small integer ids (joins and groups on integers,
//! not strings); rows of subjects that no span bills are dropped as they are read.

use anyhow::{bail, Context};
use arrow::array::{
    Array, ArrayRef, Decimal128Array, Decimal128Builder, Int64Array, Int64Builder, StringArray,
    StringBuilder, UInt32Array, UInt32Builder,
};
use arrow::datatypes::SchemaRef;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::prelude::SessionContext;
use futures_util::StreamExt;
use rust_decimal::Decimal;
use schemas::meter::Aggregation;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::period::ceil_minute;

/// Which optional columns a load needs.
#[derive(Debug, Clone, Copy)]
struct Need {
    /// min, max and latest (MIN, MAX, LATEST meters).
    extremes: bool,
    /// group-by values (cost breakdowns).
    groups: bool,
}

/// Scale of quantities inside Arrow/DataFusion.
pub const SCALE: i8 = 16;
const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;
const MINUTE: i64 = 60;
/// Rows per Arrow batch.
const BATCH: usize = 65_536;

/// A span to aggregate: the caller's index, one subject, `[from, to)`.
#[derive(Debug, Clone)]
pub struct SpanSubject {
    pub span: u32,
    pub subject: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// What the rollups hold for one (span, meter, group) over the span.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agg {
    pub sum: Decimal,
    pub count: i64,
    pub min: Option<Decimal>,
    pub max: Option<Decimal>,
    pub latest: Option<Decimal>,
    pub unique: i64,
}

impl Agg {
    /// The billable quantity under `aggregation` (AVG of nothing is zero).
    pub fn quantity(&self, aggregation: Aggregation) -> Decimal {
        match aggregation {
            Aggregation::Sum => self.sum,
            Aggregation::Count => Decimal::from(self.count),
            Aggregation::Avg => {
                if self.count == 0 {
                    Decimal::ZERO
                } else {
                    self.sum / Decimal::from(self.count)
                }
            }
            Aggregation::Min => self.min.unwrap_or_default(),
            Aggregation::Max => self.max.unwrap_or_default(),
            Aggregation::Latest => self.latest.unwrap_or_default(),
            Aggregation::UniqueCount => Decimal::from(self.unique),
        }
    }
}

/// Key of an aggregate: (span, meter, group values as JSON text when grouped).
pub type AggKey = (u32, Uuid, Option<String>);

/// Aggregates by key (aHash: half a million keys for 100 k customers × 5 meters).
pub type Aggs = HashMap<AggKey, Agg, ahash::RandomState>;

/// Counters of one aggregation, for the job summary and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadStats {
    pub rows: u64,
    /// Time spent reading PostgreSQL rows into Arrow batches.
    pub load: std::time::Duration,
    /// Time spent in DataFusion (join, aggregation, collecting results).
    pub query: std::time::Duration,
}

/// Decimal → i128 at [`SCALE`], refusing values that would need rounding.
pub fn to_scaled(d: Decimal) -> anyhow::Result<i128> {
    let scale = d.scale() as i32;
    let m = d.mantissa();
    if scale <= SCALE as i32 {
        m.checked_mul(10i128.pow((SCALE as i32 - scale) as u32))
            .context("quantity too large")
    } else {
        let div = 10i128.pow((scale - SCALE as i32) as u32);
        if m % div != 0 {
            bail!("stored value {d} has more than {SCALE} decimal places");
        }
        Ok(m / div)
    }
}

/// A PostgreSQL `numeric` read straight from its binary form into an i128 at [`SCALE`]
/// (no `Decimal` in between: this runs once per usage row). Refuses NaN, infinities, values
/// with more than [`SCALE`] decimal places and values beyond i128, as [`to_scaled`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scaled(i128);

impl<'a> tokio_postgres::types::FromSql<'a> for Scaled {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        numeric_scaled(raw).map(Scaled).map_err(Into::into)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::NUMERIC
    }
}

/// Decodes PostgreSQL's binary `numeric` (ndigits, weight, sign, dscale, then base-10000
/// digits: value = Σ digit[i] × 10000^(weight − i)) into value × 10^[`SCALE`].
fn numeric_scaled(raw: &[u8]) -> Result<i128, String> {
    const _: () = assert!(SCALE % 4 == 0, "digits are whole base-10000 places");
    let word = |i: usize| -> Result<u16, String> {
        raw.get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated numeric".to_string())
    };
    let ndigits = word(0)? as usize;
    let weight = word(2)? as i16 as i32;
    let sign = word(4)?;
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        0xC000 => return Err("a stored value is NaN".into()),
        _ => return Err("a stored value is infinite".into()),
    };
    let mut v: i128 = 0;
    for i in 0..ndigits {
        let d = i128::from(word(8 + 2 * i)?);
        // Power of ten of this digit once scaled by 10^SCALE.
        let e = 4 * (weight - i as i32) + SCALE as i32;
        if e < 0 {
            if d != 0 {
                return Err(format!(
                    "a stored value has more than {SCALE} decimal places"
                ));
            }
            continue;
        }
        let term = 10i128
            .checked_pow(e as u32)
            .and_then(|p| d.checked_mul(p))
            .ok_or("a stored value is too large")?;
        v = v.checked_add(term).ok_or("a stored value is too large")?;
    }
    Ok(if negative { -v } else { v })
}

/// i128 at `scale` → Decimal (trailing zeros dropped when the mantissa is too wide).
pub fn from_scaled(mut v: i128, mut scale: u32) -> anyhow::Result<Decimal> {
    const MAX: i128 = 79_228_162_514_264_337_593_543_950_335;
    // Whole quantities (most of them): one division instead of `normalize`'s one per digit.
    if let Some(unit) = 10i128.checked_pow(scale) {
        if v % unit == 0 {
            return Decimal::try_from_i128_with_scale(v / unit, 0)
                .map_err(|_| anyhow::anyhow!("quantity {v}e-{scale} exceeds the decimal range"));
        }
    }
    while v.abs() > MAX && scale > 0 && v % 10 == 0 {
        v /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(v, scale)
        .map(|d| d.normalize())
        .map_err(|_| anyhow::anyhow!("quantity {v}e-{scale} exceeds the decimal range"))
}

fn secs(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn ts(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(s, 0).unwrap_or_default()
}

/// Which days and hours must be read at the finer grains.
fn edges(spans: &[SpanSubject]) -> (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) {
    let mut days = BTreeSet::new();
    let mut hours = BTreeSet::new();
    for s in spans {
        for b in [secs(ceil_minute(s.from)), secs(ceil_minute(s.to))] {
            if b.rem_euclid(DAY) != 0 {
                days.insert(b - b.rem_euclid(DAY));
            }
            if b.rem_euclid(HOUR) != 0 {
                hours.insert(b - b.rem_euclid(HOUR));
            }
        }
    }
    (
        days.into_iter().map(ts).collect(),
        hours.into_iter().map(ts).collect(),
    )
}

struct Builders {
    subject: UInt32Builder,
    meter: UInt32Builder,
    group: StringBuilder,
    ws: Int64Builder,
    grain: Int64Builder,
    sum: Decimal128Builder,
    count: Int64Builder,
    min: Decimal128Builder,
    max: Decimal128Builder,
    latest: Decimal128Builder,
    latest_t: Int64Builder,
    value: StringBuilder,
    len: usize,
}

fn dec_builder() -> Decimal128Builder {
    Decimal128Builder::new()
        .with_precision_and_scale(38, SCALE)
        .expect("valid decimal type")
}

impl Builders {
    fn new() -> Self {
        Builders {
            subject: UInt32Builder::new(),
            meter: UInt32Builder::new(),
            group: StringBuilder::new(),
            ws: Int64Builder::new(),
            grain: Int64Builder::new(),
            sum: dec_builder(),
            count: Int64Builder::new(),
            min: dec_builder(),
            max: dec_builder(),
            latest: dec_builder(),
            latest_t: Int64Builder::new(),
            value: StringBuilder::new(),
            len: 0,
        }
    }

    /// Appends a row; a row of a subject no span bills is skipped (it would join nothing).
    /// A value that cannot be read exactly (NaN, too many decimal places) is an error naming
    /// the column, the meter and the subject. The row holds subject, meter, window start, then
    /// the group-by values if `need.groups`, then the value (distinct values) or sum and count,
    /// then min, max, latest value and time if `need.extremes` (see [`load`]); a column not
    /// read is empty (group) or NULL.
    fn push(
        &mut self,
        r: &tokio_postgres::Row,
        ids: &Ids<'_>,
        grain: i64,
        unique: bool,
        need: Need,
    ) -> anyhow::Result<()> {
        let subject = r.try_get::<_, &str>(0)?;
        let Some(&sid) = ids.subjects.get(subject) else {
            return Ok(());
        };
        let meter = r.try_get::<_, Uuid>(1)?;
        let mid = ids
            .meters
            .iter()
            .position(|m| *m == meter)
            .context("a row of a meter that was not asked for")? as u32;
        let value = |i: usize, name: &str| {
            r.try_get::<_, Option<Scaled>>(i)
                .map(|v| v.map(|v| v.0))
                .with_context(|| format!("usage {name} of meter {meter}, subject {subject:?}"))
        };
        self.subject.append_value(sid);
        self.meter.append_value(mid);
        self.ws
            .append_value(r.try_get::<_, DateTime<Utc>>(2)?.timestamp());
        let mut i = 3;
        if need.groups {
            self.group.append_value(r.try_get::<_, &str>(i)?);
            i += 1;
        } else {
            self.group.append_value("");
        }
        self.grain.append_value(grain);
        if unique {
            self.value.append_value(r.try_get::<_, &str>(i)?);
        } else {
            self.sum
                .append_value(value(i, "sum_value")?.context("sum_value is NULL")?);
            self.count.append_value(r.try_get(i + 1)?);
            if need.extremes {
                self.min.append_option(value(i + 2, "min_value")?);
                self.max.append_option(value(i + 3, "max_value")?);
                self.latest.append_option(value(i + 4, "latest_value")?);
                self.latest_t.append_option(
                    r.try_get::<_, Option<DateTime<Utc>>>(i + 5)?.map(|t| {
                        t.timestamp() * 1_000_000 + i64::from(t.timestamp_subsec_micros())
                    }),
                );
            } else {
                self.min.append_null();
                self.max.append_null();
                self.latest.append_null();
                self.latest_t.append_null();
            }
        }
        self.len += 1;
        Ok(())
    }

    fn finish(&mut self, schema: &Arc<Schema>, unique: bool) -> anyhow::Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.subject.finish()),
            Arc::new(self.meter.finish()),
            Arc::new(self.group.finish()),
            Arc::new(self.ws.finish()),
            Arc::new(self.grain.finish()),
        ];
        if unique {
            cols.push(Arc::new(self.value.finish()));
        } else {
            cols.push(Arc::new(
                self.sum.finish().with_precision_and_scale(38, SCALE)?,
            ));
            cols.push(Arc::new(self.count.finish()));
            cols.push(Arc::new(
                self.min.finish().with_precision_and_scale(38, SCALE)?,
            ));
            cols.push(Arc::new(
                self.max.finish().with_precision_and_scale(38, SCALE)?,
            ));
            cols.push(Arc::new(
                self.latest.finish().with_precision_and_scale(38, SCALE)?,
            ));
            cols.push(Arc::new(self.latest_t.finish()));
        }
        self.len = 0;
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

fn usage_schema(unique: bool) -> Arc<Schema> {
    let dec = DataType::Decimal128(38, SCALE);
    let mut f = vec![
        Field::new("subject", DataType::UInt32, false),
        Field::new("meter", DataType::UInt32, false),
        Field::new("grp", DataType::Utf8, false),
        Field::new("ws", DataType::Int64, false),
        Field::new("grain", DataType::Int64, false),
    ];
    if unique {
        f.push(Field::new("value", DataType::Utf8, false));
    } else {
        f.push(Field::new("sum_value", dec.clone(), false));
        f.push(Field::new("event_count", DataType::Int64, false));
        f.push(Field::new("min_value", dec.clone(), true));
        f.push(Field::new("max_value", dec.clone(), true));
        f.push(Field::new("latest_value", dec, true));
        f.push(Field::new("latest_t", DataType::Int64, true));
    }
    Arc::new(Schema::new(f))
}

/// Reads the rows of one table kind (aggregates or distinct values) at all three grains.
/// Where to read: the tenant, its subjects (all when `None`), the whole range and the days and
/// hours to read at finer grains.
#[derive(Debug, Clone, Copy)]
struct Reach<'a> {
    tenant: Uuid,
    subjects: Option<&'a [String]>,
    range: (DateTime<Utc>, DateTime<Utc>),
    edge_days: &'a [DateTime<Utc>],
    edge_hours: &'a [DateTime<Utc>],
}

/// Reads rows into Arrow batches and sends each full batch to `feed` (the query reads them as
/// they come); returns the rows read.
async fn load(
    db: &tokio_postgres::Client,
    ids: &Ids<'_>,
    reach: Reach<'_>,
    meters: &[Uuid],
    unique: bool,
    need: Need,
    feed: mpsc::Sender<DfResult<RecordBatch>>,
) -> anyhow::Result<u64> {
    let Reach {
        tenant,
        subjects,
        range,
        edge_days,
        edge_hours,
    } = reach;
    let schema = usage_schema(unique);
    // Only the columns the meters' aggregations read travel: PostgreSQL's output is most of
    // the cost (placeholder NULL and '' columns for 5 M rows cost its backend ~0.4 s).
    let (table, cols) = if unique {
        ("usage_unique", "value")
    } else if need.extremes {
        (
            "usage",
            "sum_value, event_count, min_value, max_value, latest_value, latest_time",
        )
    } else {
        ("usage", "sum_value, event_count")
    };
    let group = if need.groups {
        "u.group_values::text, "
    } else {
        ""
    };
    let subjects: Option<Vec<String>> = subjects.map(<[String]>::to_vec);
    let mut read = 0u64;
    let mut b = Builders::new();
    let send = |batch: RecordBatch| {
        let feed = feed.clone();
        async move {
            feed.send(Ok(batch))
                .await
                .map_err(|_| anyhow::anyhow!("the usage query stopped reading"))
        }
    };
    let base = format!("SELECT u.subject, u.meter_id, u.window_start, {group}{cols} FROM {table}_");
    let filter =
        "u.tenant_id = $1 AND u.meter_id = ANY($2) AND ($3::text[] IS NULL OR u.subject = ANY($3))";
    let queries: [(String, i64, &[DateTime<Utc>]); 3] = [
        (
            format!("{base}day u WHERE {filter} AND u.window_start >= $4 AND u.window_start < $5"),
            DAY,
            &[],
        ),
        (
            format!(
                "{base}hour u JOIN unnest($4::timestamptz[]) e(t)
                   ON u.window_start >= e.t AND u.window_start < e.t + interval '24 hours' WHERE {filter}"
            ),
            HOUR,
            edge_days,
        ),
        (
            format!(
                "{base}minute u JOIN unnest($4::timestamptz[]) e(t)
                   ON u.window_start >= e.t AND u.window_start < e.t + interval '1 hour' WHERE {filter}"
            ),
            MINUTE,
            edge_hours,
        ),
    ];
    for (sql, grain, edges) in queries {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if grain == DAY {
            vec![&tenant, &meters, &subjects, &range.0, &range.1]
        } else {
            if edges.is_empty() {
                continue;
            }
            vec![&tenant, &meters, &subjects, &edges]
        };
        // Streamed: rows go into the Arrow builders as they arrive, never all held as rows.
        let rows = db
            .query_raw(&sql, params)
            .await
            .with_context(|| format!("reading {table} rows at grain {grain}s"))?;
        futures_util::pin_mut!(rows);
        while let Some(r) = rows.next().await {
            let r = r.with_context(|| format!("reading {table} rows at grain {grain}s"))?;
            b.push(&r, ids, grain, unique, need)?;
            read += 1;
            if b.len == BATCH {
                send(b.finish(&schema, unique)?).await?;
            }
        }
    }
    if b.len > 0 {
        send(b.finish(&schema, unique)?).await?;
    }
    Ok(read)
}

/// One partition of a DataFusion table, fed batch by batch by a loader while the query runs.
#[derive(Debug)]
struct Feed {
    schema: SchemaRef,
    rx: std::sync::Mutex<Option<mpsc::Receiver<DfResult<RecordBatch>>>>,
}

impl PartitionStream for Feed {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rx = self.rx.lock().map(|mut rx| rx.take()).unwrap_or(None);
        // A partition is read once; a second reader would see nothing, so it gets an error
        // rather than an empty (wrong) answer.
        let first = match rx {
            Some(rx) => Ok(rx),
            None => Err(DataFusionError::Internal(
                "a usage partition was read twice".into(),
            )),
        };
        let stream = futures_util::stream::unfold(Some(first), |state| async move {
            match state? {
                Ok(mut rx) => rx.recv().await.map(|b| (b, Some(Ok(rx)))),
                Err(e) => Some((Err(e), None)),
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// Runs `sql` over table `name` while the rows are still being read: each (connection, meters)
/// share feeds one partition of the table, and DataFusion joins and aggregates every batch as
/// it arrives (on 2 cores, PostgreSQL's side of the read and the query overlap instead of
/// running one after the other). The query's answer counts only if every load finished.
#[allow(clippy::too_many_arguments)]
async fn load_and_query(
    ctx: &SessionContext,
    name: &str,
    sql: &str,
    shares: &[(&tokio_postgres::Client, Vec<Uuid>)],
    ids: &Ids<'_>,
    reach: Reach<'_>,
    unique: bool,
    need: Need,
    stats: &mut LoadStats,
) -> anyhow::Result<Vec<RecordBatch>> {
    let t0 = std::time::Instant::now();
    let schema = usage_schema(unique);
    let mut feeds: Vec<Arc<dyn PartitionStream>> = Vec::new();
    let mut loads = Vec::new();
    for (db, meters) in shares {
        let (tx, rx) = mpsc::channel(4);
        feeds.push(Arc::new(Feed {
            schema: schema.clone(),
            rx: std::sync::Mutex::new(Some(rx)),
        }));
        loads.push(async move {
            let rows = load(db, ids, reach, meters, unique, need, tx).await?;
            anyhow::Ok((rows, t0.elapsed()))
        });
    }
    ctx.register_table(name, Arc::new(StreamingTable::try_new(schema, feeds)?))?;
    let df = ctx.sql(sql).await?;
    let query = async { df.collect().await.map_err(anyhow::Error::from) };
    let (loaded, out) =
        futures_util::future::try_join(futures_util::future::try_join_all(loads), query).await?;
    ctx.deregister_table(name)?;
    let load_time = loaded.iter().map(|l| l.1).max().unwrap_or_default();
    stats.rows += loaded.iter().map(|l| l.0).sum::<u64>();
    stats.load += load_time;
    stats.query += t0.elapsed().saturating_sub(load_time);
    Ok(out)
}

fn spans_batch(spans: &[SpanSubject], ids: &Ids<'_>) -> anyhow::Result<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("span", DataType::UInt32, false),
        Field::new("subject", DataType::UInt32, false),
        Field::new("f", DataType::Int64, false),
        Field::new("t", DataType::Int64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(spans.iter().map(|s| s.span))),
        Arc::new(UInt32Array::from_iter_values(
            spans.iter().map(|s| ids.subjects[s.subject.as_str()]),
        )),
        Arc::new(Int64Array::from_iter_values(
            spans.iter().map(|s| secs(ceil_minute(s.from))),
        )),
        Arc::new(Int64Array::from_iter_values(
            spans.iter().map(|s| secs(ceil_minute(s.to))),
        )),
    ];
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// A row counts when its window lies inside the span and no coarser stored window that holds
/// it does (that one counts instead).
const INSIDE: &str = "
       (u.grain = 86400 AND u.ws >= s.f AND u.ws + 86400 <= s.t)
    OR (u.grain = 3600 AND u.ws >= s.f AND u.ws + 3600 <= s.t
        AND NOT (u.ws - (u.ws % 86400) >= s.f AND u.ws - (u.ws % 86400) + 86400 <= s.t))
    OR (u.grain = 60 AND u.ws >= s.f AND u.ws < s.t
        AND NOT (u.ws - (u.ws % 3600) >= s.f AND u.ws - (u.ws % 3600) + 3600 <= s.t))";

fn dec_at(a: &Decimal128Array, i: usize) -> anyhow::Result<Option<Decimal>> {
    if a.is_null(i) {
        return Ok(None);
    }
    from_scaled(a.value(i), a.scale() as u32).map(Some)
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> anyhow::Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .with_context(|| format!("result column {name} has an unexpected type"))
}

/// The (span, meter, group) key of every row of an aggregation result.
fn result_keys(b: &RecordBatch, ids: &Ids<'_>, by_group: bool) -> anyhow::Result<Vec<AggKey>> {
    let span = col::<UInt32Array>(b, "span")?;
    let meter = col::<UInt32Array>(b, "meter")?;
    let grp = col::<StringArray>(b, "grp")?;
    (0..b.num_rows())
        .map(|i| {
            Ok((
                span.value(i),
                *ids.meters
                    .get(meter.value(i) as usize)
                    .context("a result row names an unknown meter")?,
                by_group.then(|| grp.value(i).to_string()),
            ))
        })
        .collect()
}

/// Small integer ids that stand for subjects and meters inside Arrow and DataFusion: joins and
/// groups on integers instead of strings (the rows' subjects are mapped once, at load).
struct Ids<'a> {
    /// Looked up once per usage row: aHash, several times cheaper than SipHash on short keys.
    subjects: HashMap<&'a str, u32, ahash::RandomState>,
    /// Meter id `i` is `meters[i]`.
    meters: Vec<Uuid>,
}

/// Aggregates the usage of `meters` (id, aggregation) over `spans` for one tenant; with
/// `by_group`, per group-by values too. Spans with no usage have no entry. With `extra`
/// connections, the meters are read over all connections at once (one PostgreSQL backend each).
pub async fn aggregate(
    db: &tokio_postgres::Client,
    extra: &[tokio_postgres::Client],
    tenant: Uuid,
    meters: &[(Uuid, Aggregation)],
    spans: &[SpanSubject],
    by_group: bool,
    stats: &mut LoadStats,
) -> anyhow::Result<Aggs> {
    let t0 = std::time::Instant::now();
    let mut out = Aggs::default();
    if spans.is_empty() || meters.is_empty() {
        return Ok(out);
    }
    let from = spans.iter().map(|s| s.from).min().unwrap_or_default();
    let to = spans.iter().map(|s| s.to).max().unwrap_or_default();
    let (edge_days, edge_hours) = edges(spans);
    let distinct: BTreeSet<&str> = spans.iter().map(|s| s.subject.as_str()).collect();
    // A short subject list narrows the scan; a long one costs more to match than to join.
    let subjects: Option<Vec<String>> =
        (distinct.len() <= 1000).then(|| distinct.iter().map(|s| s.to_string()).collect());
    let plain: Vec<Uuid> = meters
        .iter()
        .filter(|(_, a)| *a != Aggregation::UniqueCount)
        .map(|(m, _)| *m)
        .collect();
    let uniq: Vec<Uuid> = meters
        .iter()
        .filter(|(_, a)| *a == Aggregation::UniqueCount)
        .map(|(m, _)| *m)
        .collect();

    let reach = Reach {
        tenant,
        subjects: subjects.as_deref(),
        range: (from, to),
        edge_days: &edge_days,
        edge_hours: &edge_hours,
    };
    let mut subject_ids: HashMap<&str, u32, ahash::RandomState> =
        HashMap::with_capacity_and_hasher(distinct.len(), ahash::RandomState::new());
    for s in &distinct {
        let next = subject_ids.len() as u32;
        subject_ids.insert(s, next);
    }
    let ids = Ids {
        subjects: subject_ids,
        meters: meters.iter().map(|(m, _)| *m).collect(),
    };
    let ids = &ids;
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "aggregation set up");
    let ctx = SessionContext::new();
    let sb = spans_batch(spans, ids)?;
    ctx.register_table(
        "spans",
        Arc::new(MemTable::try_new(sb.schema(), vec![vec![sb]])?),
    )?;
    let group = if by_group { ", u.grp" } else { "" };
    let group_sel = if by_group {
        ", u.grp AS grp"
    } else {
        ", '' AS grp"
    };

    if !plain.is_empty() {
        let need = Need {
            extremes: meters.iter().any(|(_, a)| {
                matches!(a, Aggregation::Min | Aggregation::Max | Aggregation::Latest)
            }),
            groups: by_group,
        };
        let conns: Vec<&tokio_postgres::Client> = std::iter::once(db).chain(extra).collect();
        let n = conns.len().min(plain.len());
        let mut shares: Vec<(&tokio_postgres::Client, Vec<Uuid>)> =
            conns[..n].iter().map(|c| (*c, Vec::new())).collect();
        for (i, m) in plain.iter().enumerate() {
            shares[i % n].1.push(*m);
        }
        // Without MIN, MAX or LATEST meters those columns are NULL: not aggregated at all
        // (the ordered last_value is the costliest aggregate of the query).
        let extremes = if need.extremes {
            "min(u.min_value) AS min_value, max(u.max_value) AS max_value,
             last_value(u.latest_value ORDER BY u.latest_t) AS latest_value"
                .to_string()
        } else {
            let null = format!("CAST(NULL AS DECIMAL(38, {SCALE}))");
            format!("{null} AS min_value, {null} AS max_value, {null} AS latest_value")
        };
        // Spans first: the small side is the join's build side, the usage rows stream past it.
        let sql = format!(
            "SELECT s.span AS span, u.meter AS meter{group_sel},
                    sum(u.sum_value) AS sum_value, sum(u.event_count) AS event_count,
                    {extremes}
               FROM spans s JOIN usage u ON u.subject = s.subject
              WHERE {INSIDE}
              GROUP BY s.span, u.meter{group}"
        );
        let batches =
            load_and_query(&ctx, "usage", &sql, &shares, ids, reach, false, need, stats).await?;
        tracing::debug!(
            seconds = t0.elapsed().as_secs_f64(),
            "usage loaded and queried"
        );
        // One entry per result row: sized once instead of rehashed as it grows.
        out.reserve(batches.iter().map(RecordBatch::num_rows).sum());
        for b in batches {
            let keys = result_keys(&b, ids, by_group)?;
            let sum = col::<Decimal128Array>(&b, "sum_value")?;
            let count = col::<Int64Array>(&b, "event_count")?;
            let min = col::<Decimal128Array>(&b, "min_value")?;
            let max = col::<Decimal128Array>(&b, "max_value")?;
            let latest = col::<Decimal128Array>(&b, "latest_value")?;
            for (i, key) in keys.into_iter().enumerate() {
                let a = out.entry(key).or_default();
                a.sum = dec_at(sum, i)?.unwrap_or_default();
                a.count = count.value(i);
                a.min = dec_at(min, i)?;
                a.max = dec_at(max, i)?;
                a.latest = dec_at(latest, i)?;
            }
        }
    }
    if !uniq.is_empty() {
        let need = Need {
            extremes: false,
            groups: by_group,
        };
        let sql = format!(
            "SELECT s.span AS span, u.meter AS meter{group_sel}, count(DISTINCT u.value) AS n
               FROM spans s JOIN uniq u ON u.subject = s.subject
              WHERE {INSIDE}
              GROUP BY s.span, u.meter{group}"
        );
        let shares = [(db, uniq.clone())];
        let batches =
            load_and_query(&ctx, "uniq", &sql, &shares, ids, reach, true, need, stats).await?;
        for b in batches {
            let n = col::<Int64Array>(&b, "n")?;
            for (i, key) in result_keys(&b, ids, by_group)?.into_iter().enumerate() {
                out.entry(key).or_default().unique = n.value(i);
            }
        }
    }
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "aggregates read");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn scaling_is_exact_or_refused() {
        let d = Decimal::from_str("123.4567").expect("decimal");
        let v = to_scaled(d).expect("fits");
        assert_eq!(from_scaled(v, SCALE as u32).expect("back"), d);
        let fine = Decimal::from_str("0.12345678901234567").expect("decimal");
        assert!(to_scaled(fine).is_err());
        let trailing = Decimal::from_str("1.10000000000000000000").expect("decimal");
        assert_eq!(
            from_scaled(to_scaled(trailing).expect("fits"), SCALE as u32).expect("back"),
            Decimal::from_str("1.1").expect("decimal")
        );
        for (v, d) in [
            (-5 * 10i128.pow(16), "-5"),
            (0, "0"),
            (25 * 10i128.pow(15), "2.5"),
        ] {
            let back = from_scaled(v, SCALE as u32).expect("fits");
            assert_eq!(back, Decimal::from_str(d).expect("decimal"));
            assert_eq!(back.scale(), back.normalize().scale(), "normalized");
        }
        // Wider than rust_decimal at scale 16, but whole: kept exactly.
        let big: i128 = 10i128.pow(13) * 10i128.pow(16);
        assert_eq!(
            from_scaled(big, SCALE as u32).expect("fits"),
            Decimal::from(10u64.pow(13))
        );
    }

    /// Binary `numeric` as PostgreSQL sends it (rust_decimal's encoder writes the same format).
    fn wire(d: Decimal) -> Vec<u8> {
        use tokio_postgres::types::{ToSql, Type};
        let mut b = bytes::BytesMut::new();
        d.to_sql(&Type::NUMERIC, &mut b).expect("encodes");
        b.to_vec()
    }

    #[test]
    fn binary_numeric_reads_as_exactly_scaled() {
        for text in [
            "0",
            "1",
            "-1",
            "9999",
            "10000",
            "123.4567",
            "-0.0001",
            "0.0000000000000001",
            "1234567890123456789012.5",
            "1701411834604.6923173168730371",
            "0.5",
            "100000000",
            "-98765.4321000000000001",
        ] {
            let d = Decimal::from_str(text).expect("decimal");
            assert_eq!(
                numeric_scaled(&wire(d)),
                Ok(to_scaled(d).expect("fits")),
                "{text}"
            );
        }
        // Decimal's largest value is beyond i128 at scale 16: both paths refuse it.
        let huge = Decimal::from_str("79228162514264337593543950335").expect("decimal");
        assert!(to_scaled(huge).is_err());
        assert!(numeric_scaled(&wire(huge))
            .expect_err("refused")
            .contains("too large"));
        let fine = Decimal::from_str("0.12345678901234567").expect("decimal");
        assert!(numeric_scaled(&wire(fine))
            .expect_err("refused")
            .contains("more than 16 decimal places"));
        // NaN: ndigits 0, weight 0, sign 0xC000, dscale 0.
        assert_eq!(
            numeric_scaled(&[0, 0, 0, 0, 0xC0, 0, 0, 0]),
            Err("a stored value is NaN".into())
        );
        assert!(numeric_scaled(&[0, 1, 0, 0]).is_err(), "truncated");
        // 10^40 (weight 10, one digit 1) does not fit i128 at scale 16.
        assert!(numeric_scaled(&[0, 1, 0, 10, 0, 0, 0, 0, 0, 1])
            .expect_err("refused")
            .contains("too large"));
    }
}
