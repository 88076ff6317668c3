//! API key authentication and admission: a key cache with bounded staleness, scope and address
//! checks, and per-key rate limits (GCRA token buckets for requests/s and events/s).
//!
//! The cache holds every live key, keyed by the SHA-256 of the key (the database never sees or
//! stores the key itself). It is reloaded whole every half staleness bound, so a revoked or
//! changed key stops working within the bound. A key missing from the cache is looked up once
//! in PostgreSQL (new keys work at once), and remembered as unknown for half the bound. If the
//! database cannot be reached for longer than the bound, the edge fails closed (503) rather than
//! serving keys it can no longer vouch for.
//!
//! Monthly event quotas: each key's accepted events are counted per UTC month in
//! `api_key_usage`, summed over every ingest instance. An instance reserves a request's events
//! against `stored total + its own not-yet-flushed count` before producing (released again if
//! the broker refuses them) and flushes its count at each reload. A request that would pass the
//! quota gets 429 with `Retry-After` until the next month. With N instances the quota can be
//! overshot by at most what the other N−1 instances accept between two reloads (half the
//! staleness bound); with one instance it is exact. Events accepted in the last reload period
//! of a month may be counted in the next one.

use crate::config::AuthConfig;
use dashmap::DashMap;
use ipnet::IpNet;
use parking_lot::Mutex;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

/// Scope needed to post events.
pub const SCOPE_INGEST: &str = "ingest";

/// A live key as the edge needs it.
#[derive(Debug)]
pub struct KeyEntry {
    pub id: Uuid,
    pub tenant_id: Uuid,
    /// `tenant_id` as text, the form it takes in every Kafka record.
    pub tenant: Arc<str>,
    pub scopes: Vec<String>,
    pub allowed: Option<Vec<IpNet>>,
    pub rps: u32,
    pub eps: u32,
    /// Events per UTC month; `None`: no quota.
    pub quota: Option<u64>,
}

/// One key's count for the current month.
#[derive(Debug, Default)]
struct Usage {
    /// The stored total (all instances) as of the last reload.
    stored: AtomicU64,
    /// Accepted (or reserved) here and not yet flushed.
    pending: AtomicU64,
}

/// The outcome of checking a request's credentials.
#[derive(Debug)]
pub enum Admission {
    Allowed(Arc<KeyEntry>),
    /// 401: no key, unknown or revoked key.
    Unauthenticated(&'static str),
    /// 403: wrong scope or address.
    Forbidden(String),
    /// 429: over the key's rate; retry after this many seconds.
    RateLimited {
        retry_after_secs: u32,
        what: &'static str,
    },
    /// 503: the key store is unreachable beyond the staleness bound.
    Unavailable,
}

/// GCRA state of one limit: the theoretical arrival time, in ns since the cache's epoch.
#[derive(Debug, Default)]
struct Gcra {
    tat: u64,
}

impl Gcra {
    /// Takes `n` units at `rate`/s with a burst of one second's worth. A request larger than one
    /// second's worth passes when the bucket is full and leaves it in debt.
    fn take(&mut self, now: u64, n: u64, rate: u32) -> Result<(), u32> {
        let interval = 1_000_000_000 / u64::from(rate.max(1));
        let start = self.tat.max(now);
        let new_tat = start.saturating_add(n.saturating_mul(interval));
        let window = 1_000_000_000u64;
        if new_tat - now <= window || self.tat <= now {
            self.tat = new_tat;
            Ok(())
        } else {
            let wait = new_tat - now - window;
            Err(wait.div_ceil(1_000_000_000).max(1) as u32)
        }
    }
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Gcra,
    events: Gcra,
}

pub struct KeyCache {
    cfg: AuthConfig,
    database_url: String,
    keys: DashMap<[u8; 32], Arc<KeyEntry>>,
    unknown: DashMap<[u8; 32], Instant>,
    buckets: DashMap<Uuid, Mutex<Buckets>>,
    usage: DashMap<Uuid, Arc<Usage>>,
    db: tokio::sync::Mutex<Option<Client>>,
    epoch: Instant,
    /// ns since epoch of the last successful reload.
    last_reload: AtomicU64,
    loaded: AtomicBool,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("keys", &self.keys.len())
            .field("loaded", &self.loaded.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why the key store could not be read.
#[derive(Debug, thiserror::Error)]
#[error("key store: {0}")]
pub struct KeyStoreError(#[from] tokio_postgres::Error);

const SELECT_KEYS: &str = "SELECT id, tenant_id, secret_sha256, scopes, allowed_cidrs::text[],
        rate_limit_rps, rate_limit_eps, monthly_event_quota,
        (SELECT events FROM api_key_usage u WHERE u.key_id = api_keys.id
            AND u.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date)
    FROM api_keys
    WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())";

impl KeyCache {
    pub fn new(cfg: AuthConfig, database_url: String) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            database_url,
            keys: DashMap::new(),
            unknown: DashMap::new(),
            buckets: DashMap::new(),
            usage: DashMap::new(),
            db: tokio::sync::Mutex::new(None),
            epoch: Instant::now(),
            last_reload: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Ready once the first full load succeeded and the last one is within the bound.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire) && !self.stale()
    }

    fn stale(&self) -> bool {
        let age = self.now_ns() - self.last_reload.load(Ordering::Acquire);
        age > self.cfg.key_cache_staleness_ms * 1_000_000
    }

    /// Reload period: half the staleness bound.
    pub fn refresh_every(&self) -> Duration {
        Duration::from_millis(self.cfg.key_cache_staleness_ms / 2)
    }

    async fn with_db<T>(
        &self,
        f: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, KeyStoreError> {
        let mut guard = self.db.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = tokio_postgres::connect(&self.database_url, NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "key store connection closed");
                }
            });
            *guard = Some(client);
        }
        let client = guard.as_ref().expect("connected above");
        Ok(f(client).await?)
    }

    /// Adds what this instance accepted since the last flush to the stored monthly counts.
    async fn flush_usage(&self) -> Result<(), KeyStoreError> {
        let mut ids = Vec::new();
        let mut counts = Vec::new();
        for e in self.usage.iter() {
            // Move the count from pending to stored (stored first: for a moment it is counted
            // twice, never zero times, so a reservation racing with the flush cannot pass the
            // quota).
            let n = e.pending.load(Ordering::Acquire);
            if n > 0 {
                e.stored.fetch_add(n, Ordering::AcqRel);
                e.pending.fetch_sub(n, Ordering::AcqRel);
                ids.push(*e.key());
                counts.push(n as i64);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let r = self
            .with_db(async |c| {
                c.execute(
                    "INSERT INTO api_key_usage (key_id, month, events)
                     SELECT k, date_trunc('month', now() AT TIME ZONE 'UTC')::date, n
                       FROM unnest($1::uuid[], $2::int8[]) AS t(k, n)
                      WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = k)
                     ON CONFLICT (key_id, month) DO UPDATE
                       SET events = api_key_usage.events + EXCLUDED.events",
                    &[&ids, &counts],
                )
                .await
            })
            .await;
        if r.is_err() {
            // Not stored: count them again next time.
            for (id, n) in ids.iter().zip(&counts) {
                if let Some(u) = self.usage.get(id) {
                    u.pending.fetch_add(*n as u64, Ordering::AcqRel);
                    u.stored.fetch_sub(*n as u64, Ordering::AcqRel);
                }
            }
        }
        r.map(|_| ())
    }

    /// Loads every live key, replacing the cache's contents.
    pub async fn reload(&self) -> Result<usize, KeyStoreError> {
        self.flush_usage().await?;
        let rows = self
            .with_db(async |c| c.query(SELECT_KEYS, &[]).await)
            .await?;
        let mut live = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            if let Some((hash, entry)) = self.entry(row) {
                live.insert(hash);
                self.keys.insert(hash, Arc::new(entry));
            }
        }
        self.keys.retain(|h, _| live.contains(h));
        let ids: std::collections::HashSet<Uuid> = self.keys.iter().map(|e| e.id).collect();
        self.buckets.retain(|id, _| ids.contains(id));
        self.usage
            .retain(|id, u| ids.contains(id) || u.pending.load(Ordering::Acquire) > 0);
        self.unknown.clear();
        self.last_reload.store(self.now_ns(), Ordering::Release);
        self.loaded.store(true, Ordering::Release);
        Ok(rows.len())
    }

    fn entry(&self, row: &tokio_postgres::Row) -> Option<([u8; 32], KeyEntry)> {
        let hash: Vec<u8> = row.get(2);
        let hash: [u8; 32] = hash.try_into().ok()?;
        let tenant_id: Uuid = row.get(1);
        let cidrs: Option<Vec<String>> = row.get(4);
        let allowed = cidrs.map(|v| {
            v.iter()
                .filter_map(|c| {
                    c.parse::<IpNet>()
                        .ok()
                        .or_else(|| c.parse::<IpAddr>().ok().map(IpNet::from))
                })
                .collect()
        });
        let rps: Option<i32> = row.get(5);
        let eps: Option<i32> = row.get(6);
        let quota: Option<i64> = row.get(7);
        let stored: Option<i64> = row.get(8);
        let id: Uuid = row.get(0);
        self.usage
            .entry(id)
            .or_default()
            .stored
            .store(stored.unwrap_or(0).max(0) as u64, Ordering::Release);
        Some((
            hash,
            KeyEntry {
                id: row.get(0),
                tenant_id,
                tenant: Arc::from(tenant_id.to_string()),
                scopes: row.get(3),
                allowed,
                rps: rps.map_or(self.cfg.default_rate_limit_rps, |v| v.max(1) as u32),
                eps: eps.map_or(self.cfg.default_rate_limit_eps, |v| v.max(1) as u32),
                quota: quota.map(|q| q.max(0) as u64),
            },
        ))
    }

    async fn lookup(&self, hash: [u8; 32]) -> Result<Option<Arc<KeyEntry>>, KeyStoreError> {
        if let Some(e) = self.keys.get(&hash) {
            return Ok(Some(e.clone()));
        }
        if let Some(t) = self.unknown.get(&hash) {
            if t.elapsed() < self.refresh_every() {
                return Ok(None);
            }
        }
        let sql = format!("{SELECT_KEYS} AND secret_sha256 = $1");
        let hv = hash.to_vec();
        let row = self
            .with_db(async |c| c.query_opt(&sql, &[&hv]).await)
            .await?;
        match row.and_then(|r| self.entry(&r)) {
            Some((h, entry)) => {
                let entry = Arc::new(entry);
                self.keys.insert(h, entry.clone());
                Ok(Some(entry))
            }
            None => {
                if self.unknown.len() > 100_000 {
                    self.unknown.clear();
                }
                self.unknown.insert(hash, Instant::now());
                Ok(None)
            }
        }
    }

    /// Checks a request's credentials: `authorization` header value, client address, scope, and
    /// one request against the key's request rate. Events are charged later with
    /// [`KeyCache::charge_events`], once the body is decoded.
    pub async fn admit(
        &self,
        authorization: Option<&str>,
        client: IpAddr,
        scope: &str,
    ) -> Admission {
        let Some(key) = authorization.and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        }) else {
            return Admission::Unauthenticated("missing Authorization: Bearer <key> header");
        };
        let key = key.trim();
        if !schemas::apikey::well_formed(key) {
            return Admission::Unauthenticated("unknown or revoked API key");
        }
        if self.stale() {
            // Reloads have failed for longer than the bound: a revocation may be unseen.
            return Admission::Unavailable;
        }
        let entry = match self.lookup(schemas::apikey::hash(key)).await {
            Ok(Some(e)) => e,
            Ok(None) => return Admission::Unauthenticated("unknown or revoked API key"),
            Err(e) => {
                tracing::warn!(error = %e, "key lookup failed");
                return Admission::Unavailable;
            }
        };
        if !entry.scopes.iter().any(|s| s == scope) {
            return Admission::Forbidden(format!("this API key lacks the {scope:?} scope"));
        }
        if let Some(allowed) = &entry.allowed {
            if !allowed.iter().any(|n| n.contains(&client)) {
                return Admission::Forbidden(format!(
                    "address {client} is not in this API key's allowlist"
                ));
            }
        }
        let now = self.now_ns();
        let bucket = self.buckets.entry(entry.id).or_default();
        let mut b = bucket.lock();
        if let Err(secs) = b.requests.take(now, 1, entry.rps) {
            return Admission::RateLimited {
                retry_after_secs: secs,
                what: "requests per second",
            };
        }
        drop(b);
        Admission::Allowed(entry)
    }

    /// Charges `events` against the key's event rate; `Err(seconds to wait)` when over it.
    pub fn charge_events(&self, key: &KeyEntry, events: u64) -> Result<(), u32> {
        let now = self.now_ns();
        let bucket = self.buckets.entry(key.id).or_default();
        let mut b = bucket.lock();
        b.events.take(now, events, key.eps)
    }

    /// Reserves `events` against the key's monthly quota (and counts them for the month);
    /// `Err(seconds until the next UTC month)` when they would pass it.
    pub fn reserve_quota(&self, key: &KeyEntry, events: u64) -> Result<(), u32> {
        // A shared (read) lock on the hot path; the write lock only for a key's first request.
        let usage = match self.usage.get(&key.id) {
            Some(u) => u.clone(),
            None => self.usage.entry(key.id).or_default().clone(),
        };
        let before = usage.pending.fetch_add(events, Ordering::AcqRel);
        if let Some(q) = key.quota {
            let used = usage.stored.load(Ordering::Acquire) + before;
            if used + events > q {
                usage.pending.fetch_sub(events, Ordering::AcqRel);
                return Err(secs_to_next_month());
            }
        }
        Ok(())
    }

    /// Gives back a reservation whose events were not accepted.
    pub fn release_quota(&self, key: &KeyEntry, events: u64) {
        if let Some(u) = self.usage.get(&key.id) {
            let _ = u
                .pending
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.saturating_sub(events))
                });
        }
    }

    /// Stores the counts accepted so far (on shutdown; reloads do it periodically).
    pub async fn flush(&self) -> Result<(), KeyStoreError> {
        self.flush_usage().await
    }

    /// Live keys in the cache.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn secs_to_next_month() -> u32 {
    use chrono::{Datelike, TimeZone, Utc};
    let now = Utc::now();
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .map_or(3600, |t| {
            (t - now).num_seconds().clamp(1, i64::from(u32::MAX)) as u32
        })
}

/// Reloads the cache every half staleness bound until `shutdown`.
pub async fn refresh_loop(cache: Arc<KeyCache>, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(cache.refresh_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match cache.reload().await {
                    Ok(n) => {
                        crate::metrics::set_key_cache_keys(n);
                        tracing::debug!(keys = n, "key cache reloaded");
                    }
                    Err(e) => tracing::warn!(error = %e, "key cache reload failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Gcra;

    #[test]
    fn gcra_allows_a_burst_of_one_second_then_refills() {
        let mut g = Gcra::default();
        let t0 = 10_000_000_000;
        for _ in 0..10 {
            assert!(g.take(t0, 1, 10).is_ok());
        }
        assert_eq!(g.take(t0, 1, 10), Err(1));
        // 100 ms later one more token is there.
        assert!(g.take(t0 + 100_000_000, 1, 10).is_ok());
        assert!(g.take(t0 + 100_000_000, 1, 10).is_err());
    }

    #[test]
    fn gcra_admits_a_large_batch_from_a_full_bucket_then_waits() {
        let mut g = Gcra::default();
        let t0 = 10_000_000_000;
        assert!(g.take(t0, 5_000, 1_000).is_ok());
        assert_eq!(g.take(t0, 1, 1_000), Err(5));
        assert!(g.take(t0 + 5_000_000_000, 1, 1_000).is_ok());
    }
}
