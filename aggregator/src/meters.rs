//! The meters the aggregator applies, read from PostgreSQL and refreshed while it runs.
//!
//! A meter applies to the events that ingest *received* at or after the meter's `created_at`
//! and before its `deleted_at`. Reception time travels in every Kafka record, so the rule gives
//! the same answer however late (or how many times) a record is processed; the aggregator only
//! has to make sure its copy of the meters is at least as new as the records it aggregates
//! (see [`MeterCache::ensure_fresh`]).

use schemas::meter::{Aggregation, JsonPath};
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::Client;
use uuid::Uuid;

#[derive(Debug)]
pub struct Meter {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub slug: String,
    pub event_type: String,
    pub aggregation: Aggregation,
    pub value_property: Option<JsonPath>,
    /// Dimension name → path, sorted by name.
    pub group_by: Vec<(String, JsonPath)>,
    pub created_unix_nanos: i64,
    pub deleted_unix_nanos: Option<i64>,
}

impl Meter {
    /// Whether the meter counts an event ingest received at `received` (Unix nanoseconds).
    pub fn applies_at(&self, received: i64) -> bool {
        received >= self.created_unix_nanos && self.deleted_unix_nanos.is_none_or(|d| received < d)
    }
}

/// All meters (deleted ones included: they still apply to events received before deletion),
/// indexed by (tenant, event type), as of `as_of` (PostgreSQL's clock, Unix nanoseconds).
#[derive(Debug, Default)]
pub struct MeterSet {
    /// Tenant → event type → meters (two levels, so a lookup borrows the event's type).
    by_type: HashMap<Uuid, HashMap<String, Vec<Arc<Meter>>>>,
    pub as_of: i64,
    pub count: usize,
}

impl MeterSet {
    pub fn for_event(&self, tenant: Uuid, event_type: &str) -> &[Arc<Meter>] {
        self.by_type
            .get(&tenant)
            .and_then(|types| types.get(event_type))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Keeps a [`MeterSet`] no older than needed, re-reading the meters only when they changed.
#[derive(Debug, Default)]
pub struct MeterCache {
    pub set: Arc<MeterSet>,
    /// (newest `updated_at`, row count) of `meters` when `set` was read: creating or deleting a
    /// meter changes it.
    version: Option<(Option<i64>, i64)>,
    /// Until when (PostgreSQL's clock, Unix nanoseconds) `set` is known to be current.
    current_at: i64,
}

impl MeterCache {
    /// Makes sure the set is current at least up to `received_max` (the newest reception time
    /// about to be aggregated) and not older than `max_age_nanos`: one small query when nothing
    /// changed, a reload when something did.
    pub async fn ensure_fresh(
        &mut self,
        db: &Client,
        received_max: i64,
        now: i64,
        max_age_nanos: i64,
    ) -> Result<(), tokio_postgres::Error> {
        if self.current_at > received_max && now - self.current_at <= max_age_nanos {
            return Ok(());
        }
        let row = db
            .query_one(
                "SELECT (extract(epoch FROM max(updated_at)) * 1e9)::bigint, count(*),
                        (extract(epoch FROM clock_timestamp()) * 1e9)::bigint
                   FROM meters",
                &[],
            )
            .await?;
        let version = Some((row.get::<_, Option<i64>>(0), row.get::<_, i64>(1)));
        if version != self.version {
            self.set = Arc::new(load(db).await?);
            self.version = version;
            self.current_at = self.set.as_of;
        } else {
            self.current_at = row.get(2);
        }
        Ok(())
    }
}

/// Reads every meter. A definition that no longer parses (changed by hand in SQL) is skipped
/// with an error log rather than stopping every tenant's aggregation.
pub async fn load(db: &Client) -> Result<MeterSet, tokio_postgres::Error> {
    let as_of: i64 = db
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1e9)::bigint",
            &[],
        )
        .await?
        .get(0);
    let rows = db
        .query(
            "SELECT id, tenant_id, slug, event_type, aggregation, value_property, group_by,
                    (extract(epoch FROM created_at) * 1e9)::bigint,
                    (extract(epoch FROM deleted_at) * 1e9)::bigint
               FROM meters",
            &[],
        )
        .await?;
    let mut set = MeterSet {
        as_of,
        ..Default::default()
    };
    for r in rows {
        let slug: String = r.get(2);
        let parsed = (|| -> Result<Meter, String> {
            let aggregation: Aggregation = r.get::<_, String>(4).parse()?;
            let value_property = r
                .get::<_, Option<String>>(5)
                .map(|p| JsonPath::parse(&p))
                .transpose()?;
            let gb: serde_json::Value = r.get(6);
            let mut group_by = Vec::new();
            if let serde_json::Value::Object(m) = gb {
                for (k, v) in m {
                    let p = v.as_str().ok_or("groupBy path is not a string")?;
                    group_by.push((k, JsonPath::parse(p)?));
                }
            }
            group_by.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Meter {
                id: r.get(0),
                tenant_id: r.get(1),
                slug: slug.clone(),
                event_type: r.get(3),
                aggregation,
                value_property,
                group_by,
                created_unix_nanos: r.get(7),
                deleted_unix_nanos: r.get(8),
            })
        })();
        match parsed {
            Ok(m) => {
                set.count += 1;
                set.by_type
                    .entry(m.tenant_id)
                    .or_default()
                    .entry(m.event_type.clone())
                    .or_default()
                    .push(Arc::new(m));
            }
            Err(e) => tracing::error!(meter = %slug, error = %e, "meter definition skipped"),
        }
    }
    Ok(set)
}
