//! The shard: one Kafka consumer for the partitions this process holds leases for, the
//! unflushed events, and the loop that consumes, flushes and rebalances.

use crate::config::Config;
use crate::flush::{self, FlushError, FlushInput, PartitionCommit};
use crate::lease::{Leases, Taken};
use crate::meters::MeterCache;
use crate::metrics as m;
use crate::process::{BadRecord, Pending};
use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schemas::proto::usage::v1::EventBatch;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
struct Owned {
    generation: i64,
    committed_offset: Option<i64>,
    next_offset: Option<i64>,
    watermark: i64,
    last_record: Instant,
}

pub struct Shard {
    cfg: Config,
    leases: Leases,
    consumer: Arc<StreamConsumer>,
    db: Option<Client>,
    /// The flush side (own connection, meter cache); away while a flush is in flight.
    flusher: Option<Flusher>,
    inflight: Option<JoinHandle<FlushOutcome>>,
    owned: BTreeMap<i32, Owned>,
    pending: Vec<Pending>,
    bad: Vec<BadRecord>,
    oldest_pending: Option<Instant>,
    partitions: i32,
    ticks: u64,
    /// A flush was abandoned (shutdown while the database was away): do not release leases.
    unclean: bool,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("member", &self.leases.member)
            .field("owned", &self.owned.keys().collect::<Vec<_>>())
            .field("pending", &self.pending.len())
            .finish()
    }
}

fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

/// Connects to PostgreSQL; the connection task ends (and the client reports closed) on error.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

impl Shard {
    pub fn new(cfg: Config) -> anyhow::Result<Self> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.kafka.brokers)
            .set("broker.address.family", "v4")
            .set("group.id", &cfg.consumer_group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .set("enable.partition.eof", "false");
        for (k, v) in &cfg.kafka.extra {
            cc.set(k, v);
        }
        let consumer: StreamConsumer = cc.create()?;
        let leases = Leases {
            group: cfg.consumer_group.clone(),
            topic: cfg.kafka.topic.clone(),
            member: cfg.member.clone(),
            ttl: cfg.lease_ttl(),
        };
        Ok(Shard {
            cfg: cfg.clone(),
            leases,
            consumer: Arc::new(consumer),
            db: None,
            flusher: Some(Flusher::new(&cfg)),
            inflight: None,
            owned: BTreeMap::new(),
            pending: Vec::new(),
            bad: Vec::new(),
            oldest_pending: None,
            partitions: 0,
            ticks: 0,
            unclean: false,
        })
    }

    async fn db(&mut self) -> Result<&mut Client, tokio_postgres::Error> {
        if self.db.as_ref().is_none_or(|c| c.is_closed()) {
            self.db = Some(connect(&self.cfg.database_url).await?);
        }
        Ok(self.db.as_mut().expect("just connected"))
    }

    /// Consumes until `shutdown`, then flushes, releases its leases and leaves the group.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.lease.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let interval = Duration::from_millis(self.cfg.flush.interval_ms);
        let consumer = self.consumer.clone();
        loop {
            let deadline = self
                .oldest_pending
                .map(|t| t + interval)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.tick().await {
                        tracing::warn!(error = %e, "lease tick failed");
                    }
                }
                done = wait_inflight(&mut self.inflight), if self.inflight.is_some() => {
                    self.inflight = None;
                    self.apply(done);
                }
                _ = tokio::time::sleep_until(deadline.into()),
                    if self.oldest_pending.is_some() && self.inflight.is_none() => {
                    self.start_flush(&shutdown).await;
                }
                msg = consumer.recv(), if !self.owned.is_empty() => match msg {
                    Ok(msg) => {
                        self.take(&msg);
                        if self.pending.len() + self.bad.len() >= self.cfg.flush.max_events {
                            // Waits for the flush in flight, if any: at most two batches in memory.
                            self.start_flush(&shutdown).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "consume failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.stop(&shutdown).await;
    }

    async fn stop(&mut self, shutdown: &CancellationToken) {
        let clean = self.flush_all(shutdown).await;
        let leases = self.leases.clone();
        let owned: Vec<(i32, i64)> = self.owned.iter().map(|(p, o)| (*p, o.generation)).collect();
        if let Ok(db) = self.db().await {
            let db: &Client = db;
            if clean {
                for (p, g) in owned {
                    let _ = leases.release(db, p, g).await;
                }
            }
            let _ = leases.leave(db).await;
        }
        tracing::info!(member = %self.leases.member, clean, "aggregator shard stopped");
    }

    /// Takes one record into the pending state (decoding it; unreadable records become dead
    /// letters, never a stop).
    fn take(&mut self, msg: &BorrowedMessage<'_>) {
        let p = msg.partition();
        let off = msg.offset();
        let Some(st) = self.owned.get_mut(&p) else {
            return;
        };
        if st.next_offset.is_some_and(|n| off < n) {
            return; // delivered again after a re-assignment: already taken
        }
        st.next_offset = Some(off + 1);
        st.last_record = Instant::now();
        if self.oldest_pending.is_none() {
            self.oldest_pending = Some(Instant::now());
        }
        let bad = |reason, detail: String| BadRecord {
            partition: p,
            offset: off,
            reason,
            detail,
        };
        let ct = msg.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == schemas::kafka::CONTENT_TYPE_HEADER)
                .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
        });
        if ct.as_deref() != Some(schemas::kafka::EVENT_BATCH_V1) {
            self.bad.push(bad(
                "unknown_record_schema",
                format!("content-type header {ct:?}"),
            ));
            return;
        }
        let batch = match EventBatch::decode(msg.payload().unwrap_or_default()) {
            Ok(b) => b,
            Err(e) => {
                self.bad.push(bad("undecodable_record", e.to_string()));
                return;
            }
        };
        let Ok(tenant) = uuid::Uuid::parse_str(&batch.tenant_id) else {
            self.bad.push(bad(
                "bad_tenant",
                format!("tenant_id {:?}", batch.tenant_id),
            ));
            return;
        };
        let received = batch.received_unix_nanos;
        self.pending
            .extend(batch.events.into_iter().map(|event| Pending {
                partition: p,
                offset: off,
                tenant,
                received,
                event,
            }));
        metrics::gauge!(m::PENDING_EVENTS).set(self.pending.len() as f64);
    }

    /// Waits for the flush in flight (if any) and applies its outcome.
    async fn finish_inflight(&mut self) {
        if let Some(h) = self.inflight.take() {
            let done = h.await;
            self.apply(done);
        }
    }

    /// Starts flushing what is pending (after the flush in flight, if any, is done), so that
    /// consumption goes on while PostgreSQL works.
    async fn start_flush(&mut self, shutdown: &CancellationToken) {
        self.finish_inflight().await;
        if self.pending.is_empty() && self.bad.is_empty() {
            self.oldest_pending = None;
            return;
        }
        let Some(flusher) = self.flusher.take() else {
            return;
        };
        let commits = self
            .owned
            .iter()
            .map(|(p, o)| PartitionCommit {
                partition: *p,
                generation: o.generation,
                committed_offset: o.committed_offset,
                next_offset: o.next_offset,
                watermark: o.watermark,
            })
            .collect();
        let batch = Batch::split(
            std::mem::take(&mut self.pending),
            std::mem::take(&mut self.bad),
            commits,
            self.cfg.flush.parallelism,
        );
        // The next batch starts from what this one will have committed.
        for o in self.owned.values_mut() {
            o.committed_offset = o.next_offset;
        }
        self.oldest_pending = None;
        metrics::gauge!(m::PENDING_EVENTS).set(0.0);
        self.inflight = Some(tokio::spawn(flusher.run(batch, shutdown.clone())));
    }

    /// Flushes everything taken so far; true when it all committed.
    async fn flush_all(&mut self, shutdown: &CancellationToken) -> bool {
        self.start_flush(shutdown).await;
        self.finish_inflight().await;
        self.pending.is_empty() && self.bad.is_empty() && self.flusher.is_some() && !self.unclean
    }

    fn apply(&mut self, done: Result<FlushOutcome, tokio::task::JoinError>) {
        let (flusher, batch, result) = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "flush task failed; dropping unflushed state");
                self.flusher = Some(Flusher::new(&self.cfg));
                self.drop_all();
                return;
            }
        };
        self.flusher = Some(flusher);
        match result {
            Ok(report) => {
                for c in batch.commits() {
                    if let Some(o) = self.owned.get_mut(&c.partition) {
                        if o.generation == c.generation {
                            if let Some(w) = report.watermarks.get(&c.partition) {
                                o.watermark = o.watermark.max(*w);
                            }
                        }
                    }
                }
                m::flushed(&report, batch.started.elapsed().as_secs_f64(), now_nanos());
                let commits: Vec<PartitionCommit> = batch.commits().cloned().collect();
                self.commit_to_kafka(&commits);
                tracing::debug!(events = report.events, rows = report.window_rows, "flushed");
            }
            Err(FlushError::Fenced(why)) => {
                tracing::warn!(%why, "fenced: dropping unflushed state and re-reading leases");
                metrics::counter!(m::FENCED_TOTAL).increment(1);
                self.drop_all();
            }
            Err(FlushError::Db(e)) => {
                // Only at shutdown (the task retries otherwise): nothing of it was committed, so
                // the next owner of these partitions consumes them again.
                tracing::warn!(error = %e, "flush abandoned at shutdown");
                self.unclean = true;
            }
        }
    }

    /// Kafka's committed offsets mirror PostgreSQL's for monitoring tools only.
    fn commit_to_kafka(&self, commits: &[PartitionCommit]) {
        let mut tpl = TopicPartitionList::new();
        for c in commits {
            if let Some(n) = c.next_offset {
                let _ =
                    tpl.add_partition_offset(&self.cfg.kafka.topic, c.partition, Offset::Offset(n));
            }
        }
        if tpl.count() > 0 {
            let _ = self.consumer.commit(&tpl, CommitMode::Async);
        }
    }

    /// Forgets everything unflushed and every lease; the next tick takes leases again and
    /// resumes from the stored offsets.
    fn drop_all(&mut self) {
        self.pending.clear();
        self.bad.clear();
        self.oldest_pending = None;
        self.owned.clear();
        let _ = self.consumer.unassign();
        metrics::gauge!(m::OWNED_PARTITIONS).set(0.0);
    }

    async fn refresh_partitions(&mut self) {
        let c = self.consumer.clone();
        let topic = self.cfg.kafka.topic.clone();
        let md = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map(|md| {
                    md.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len() as i32)
                        .unwrap_or(0)
                })
        })
        .await;
        match md {
            Ok(Ok(n)) if n > 0 => self.partitions = n,
            Ok(Ok(_)) => tracing::warn!(topic = %self.cfg.kafka.topic, "topic not found yet"),
            Ok(Err(e)) => tracing::warn!(error = %e, "metadata request failed"),
            Err(e) => tracing::warn!(error = %e, "metadata task failed"),
        }
    }

    /// Heartbeat, renew, rebalance; re-assigns the consumer when ownership changed.
    async fn tick(&mut self) -> anyhow::Result<()> {
        self.ticks += 1;
        if self.partitions == 0 || self.ticks.is_multiple_of(30) {
            self.refresh_partitions().await;
        }
        if self.partitions == 0 {
            return Ok(());
        }
        let leases = self.leases.clone();
        let members = leases.heartbeat(self.db().await?).await?;
        let desired: HashSet<i32> = leases
            .desired(&members, self.partitions)
            .into_iter()
            .collect();
        let mut changed = false;

        // Lost leases (taken over while this process stalled): drop their unflushed events.
        let held: BTreeMap<i32, i64> = self.owned.iter().map(|(p, o)| (*p, o.generation)).collect();
        let lost = leases.renew(self.db().await?, &held).await?;
        if !lost.is_empty() {
            tracing::warn!(?lost, "leases lost; their unflushed events are dropped");
            metrics::counter!(m::FENCED_TOTAL).increment(lost.len() as u64);
            self.pending.retain(|e| !lost.contains(&e.partition));
            self.bad.retain(|e| !lost.contains(&e.partition));
            for p in &lost {
                self.owned.remove(p);
            }
            changed = true;
        }

        // Partitions meant for another member: flush, then hand over.
        let surplus: Vec<i32> = self
            .owned
            .keys()
            .filter(|p| !desired.contains(p))
            .copied()
            .collect();
        if !surplus.is_empty() && self.flush_all(&CancellationToken::new()).await {
            for p in surplus {
                if let Some(o) = self.owned.remove(&p) {
                    leases.release(self.db().await?, p, o.generation).await?;
                    tracing::info!(partition = p, "partition released");
                }
            }
            changed = true;
        }

        // Partitions meant for this member: take the free ones.
        let mut wanted: Vec<i32> = desired
            .iter()
            .filter(|p| !self.owned.contains_key(p))
            .copied()
            .collect();
        wanted.sort_unstable();
        for p in wanted {
            if let Some(Taken {
                generation,
                next_offset,
                watermark,
            }) = leases.acquire(self.db().await?, p).await?
            {
                tracing::info!(partition = p, generation, ?next_offset, "partition taken");
                self.owned.insert(
                    p,
                    Owned {
                        generation,
                        committed_offset: next_offset,
                        next_offset,
                        watermark,
                        last_record: Instant::now(),
                    },
                );
                changed = true;
            }
        }

        // Idle partitions: let the watermark follow the wall clock so windows close.
        let idle = Duration::from_millis(self.cfg.lateness.idle_partition_ms);
        let idle_nanos =
            i64::try_from(self.cfg.lateness.idle_partition_ms).unwrap_or(0) * 1_000_000;
        for o in self.owned.values_mut() {
            if o.last_record.elapsed() >= idle {
                o.watermark = o.watermark.max(now_nanos() - idle_nanos);
            }
        }

        if changed {
            self.assign()?;
        }
        metrics::gauge!(m::OWNED_PARTITIONS).set(self.owned.len() as f64);
        if self.ticks.is_multiple_of(5) {
            self.report_lag().await;
        }
        Ok(())
    }

    fn assign(&mut self) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.owned {
            let off = o
                .next_offset
                .map(Offset::Offset)
                .unwrap_or(Offset::Beginning);
            tpl.add_partition_offset(&self.cfg.kafka.topic, *p, off)?;
        }
        self.consumer.assign(&tpl)?;
        Ok(())
    }

    /// Consumer lag per owned partition, from the broker's high watermark (approximate on tansu,
    /// whose reported high watermarks the design says not to trust for anything but display).
    async fn report_lag(&self) {
        let c = self.consumer.clone();
        let topic = self.cfg.kafka.topic.clone();
        let owned: Vec<(i32, Option<i64>)> = self
            .owned
            .iter()
            .map(|(p, o)| (*p, o.next_offset))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for (p, next) in owned {
                if let Ok((_, high)) = c.fetch_watermarks(&topic, p, Duration::from_secs(1)) {
                    let lag = (high - next.unwrap_or(0)).max(0);
                    metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
                }
            }
        })
        .await;
    }
}

/// What one flush writes, taken from the shard when the flush starts, split into parts by
/// partition (one transaction each).
#[derive(Debug)]
struct Batch {
    /// Shared with the part's flush task (each part flushes on its own task, so that the CPU
    /// work of the parts can run on different cores).
    parts: Vec<Arc<Part>>,
    started: Instant,
}

#[derive(Debug, Default)]
struct Part {
    pending: Vec<Pending>,
    bad: Vec<BadRecord>,
    commits: Vec<PartitionCommit>,
}

impl Batch {
    fn split(
        pending: Vec<Pending>,
        bad: Vec<BadRecord>,
        commits: Vec<PartitionCommit>,
        n: usize,
    ) -> Batch {
        let n = n.max(1);
        let mut parts: Vec<Part> = (0..n).map(|_| Part::default()).collect();
        let of = |p: i32| (p.unsigned_abs() as usize) % n;
        for e in pending {
            parts[of(e.partition)].pending.push(e);
        }
        for b in bad {
            parts[of(b.partition)].bad.push(b);
        }
        for c in commits {
            parts[of(c.partition)].commits.push(c);
        }
        parts.retain(|p| !p.commits.is_empty());
        Batch {
            parts: parts.into_iter().map(Arc::new).collect(),
            started: Instant::now(),
        }
    }

    fn commits(&self) -> impl Iterator<Item = &PartitionCommit> {
        self.parts.iter().flat_map(|p| p.commits.iter())
    }
}

type FlushOutcome = (Flusher, Batch, Result<flush::FlushReport, FlushError>);

async fn wait_inflight(
    slot: &mut Option<JoinHandle<FlushOutcome>>,
) -> Result<FlushOutcome, tokio::task::JoinError> {
    match slot.as_mut() {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// The flush side of a shard: its own connections (one per part) and meter cache, moved into
/// the flush task.
#[derive(Debug)]
struct Flusher {
    cfg: Arc<Config>,
    dbs: Vec<Option<Client>>,
    meters: MeterCache,
}

impl Flusher {
    fn new(cfg: &Config) -> Self {
        Flusher {
            cfg: Arc::new(cfg.clone()),
            dbs: (0..cfg.flush.parallelism.max(1)).map(|_| None).collect(),
            meters: MeterCache::default(),
        }
    }

    /// Flushes `batch`, retrying database errors with back-off until every part committed, one
    /// is fenced, or shutdown is asked for. A part that committed is never written again.
    async fn run(mut self, batch: Batch, shutdown: CancellationToken) -> FlushOutcome {
        let mut backoff = Duration::from_millis(100);
        let mut reports: Vec<Option<flush::FlushReport>> =
            batch.parts.iter().map(|_| None).collect();
        loop {
            match self.once(&batch, &mut reports).await {
                Err(FlushError::Db(e)) if !shutdown.is_cancelled() => {
                    metrics::counter!(m::FLUSH_FAILURES_TOTAL).increment(1);
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "flush failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return (self, batch, Err(e)),
                Ok(()) => {
                    let report = merge(reports.into_iter().flatten());
                    return (self, batch, Ok(report));
                }
            }
        }
    }

    async fn once(
        &mut self,
        b: &Batch,
        reports: &mut [Option<flush::FlushReport>],
    ) -> Result<(), FlushError> {
        for slot in self.dbs.iter_mut() {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                *slot = Some(connect(&self.cfg.database_url).await?);
            }
        }
        let received_max = b
            .parts
            .iter()
            .flat_map(|p| p.pending.iter().map(|e| e.received))
            .max()
            .unwrap_or(0);
        let refresh = i64::try_from(self.cfg.meters_refresh_ms).unwrap_or(1000) * 1_000_000;
        if let Some(Some(db)) = self.dbs.first() {
            self.meters
                .ensure_fresh(db, received_max, now_nanos(), refresh)
                .await?;
        }
        // Every part not yet committed flushes on its own task, with its own connection.
        let mut tasks = Vec::new();
        for (i, part) in b.parts.iter().enumerate() {
            if reports[i].is_some() {
                continue;
            }
            let mut db = self.dbs[i].take().expect("connected above");
            let (cfg, part, meters) = (self.cfg.clone(), part.clone(), self.meters.set.clone());
            let task = tokio::spawn(async move {
                let r = flush::flush(
                    &mut db,
                    FlushInput {
                        group: &cfg.consumer_group,
                        topic: &cfg.kafka.topic,
                        member: &cfg.member,
                        partitions: &part.commits,
                        events: &part.pending,
                        bad: &part.bad,
                        meters: &meters,
                        lateness: &cfg.lateness,
                        dedup_window_secs: cfg.dedup.window_secs,
                    },
                )
                .await;
                (db, r)
            });
            tasks.push((i, task));
        }
        // Every task is awaited before anything is returned: no part is left half-done while
        // the flush is retried. A fence wins over a database error: the state must be re-read
        // either way.
        let (mut fenced, mut first_err, mut panic) = (None, None, None);
        for (i, task) in tasks {
            match task.await {
                Ok((db, r)) => {
                    self.dbs[i] = Some(db);
                    match r {
                        Ok(rep) => reports[i] = Some(rep),
                        Err(FlushError::Fenced(w)) => fenced = fenced.or(Some(w)),
                        Err(e) => first_err = first_err.or(Some(e)),
                    }
                }
                Err(e) if e.is_panic() => panic = panic.or(Some(e.into_panic())),
                // Only when the runtime shuts down: nothing of this part committed.
                Err(e) => fenced = fenced.or(Some(format!("flush task cancelled: {e}"))),
            }
        }
        if let Some(p) = panic {
            // The shard's task then fails and the shard drops its unflushed state.
            std::panic::resume_unwind(p);
        }
        match (fenced, first_err) {
            (Some(w), _) => Err(FlushError::Fenced(w)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(()),
        }
    }
}

/// One report for the parts of a flush.
fn merge(reports: impl Iterator<Item = flush::FlushReport>) -> flush::FlushReport {
    let mut m = flush::FlushReport::default();
    for r in reports {
        m.events += r.events;
        m.accepted += r.accepted;
        m.duplicates += r.duplicates;
        m.unmetered += r.unmetered;
        m.rejected += r.rejected;
        m.late += r.late;
        m.corrections += r.corrections;
        m.dead_letters += r.dead_letters;
        m.window_rows += r.window_rows;
        m.received_min = match (m.received_min, r.received_min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        m.received_max = m.received_max.max(r.received_max);
        m.watermarks.extend(r.watermarks);
    }
    m
}
