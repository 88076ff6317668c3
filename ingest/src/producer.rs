//! The Kafka producer: coalesces the events of concurrent requests into one `EventBatch` record
//! per (tenant, partition), produces with acks=all and idempotence on librdkafka's hot-path API
//! (a delivery callback, no future per message), and answers each request once every record
//! holding one of its events is acknowledged.
//!
//! Batching on size or time: a (tenant, partition) slot is produced as soon as it holds
//! `record_max_bytes`, and otherwise by the flusher every `coalesce_linger_ms`. The broker's
//! cost is per record, so at high request rates many requests share one record; at low rates a
//! request waits at most the linger.
//!
//! Bounded memory: an in-flight budget of events (a semaphore) is taken before producing and
//! released only when the broker has answered for every record holding the request's events, so a
//! slow or absent broker turns into prompt 503s instead of growing queues.

use crate::config::KafkaConfig;
use crate::event::Event;
use crate::metrics as m;
use crate::record::{encode_batch, event_entry_len, partition_for, put_batch_header, put_event};
use parking_lot::{Mutex, RwLock};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// How a request's events become records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// One `EventBatch` record per (tenant, partition) per linger window, shared by concurrent
    /// requests: the default (see BENCHMARKS.md).
    Partition,
    /// One record per event, keyed by tenant + subject.
    Event,
}

/// The result of producing one request's events.
#[derive(Debug, PartialEq, Eq)]
pub enum ProduceOutcome {
    /// Every record acknowledged by the broker (acks=all).
    Acked,
    /// The in-flight budget or librdkafka's queue is full: retry later.
    Overloaded(&'static str),
    /// The broker refused or lost a record, or did not answer in time: retry later (resending
    /// the same ids is safe).
    Failed(String),
}

/// Tracks one request's records until the broker has answered for all of them.
struct Pending {
    remaining: AtomicUsize,
    error: Mutex<Option<String>>,
    tx: Mutex<Option<oneshot::Sender<Option<String>>>>,
    /// Released when the last record is answered for (the Arc drops).
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn finish_one(&self, err: Option<String>) {
        if let Some(e) = err {
            self.error.lock().get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(tx) = self.tx.lock().take() {
                let _ = tx.send(self.error.lock().take());
            }
        }
    }
}

/// Asks for the producer to be replaced before the next record: after a fatal error, when every
/// broker went away, or after a delivery the broker refused. A refused delivery can leave the
/// idempotent producer's sequence state at odds with the broker's (seen with tansu restarted:
/// every later produce failed with an unknown broker error); a new producer gets a new producer
/// id and starts clean.
struct Ctx {
    shared: Arc<Shared>,
}

/// State shared by the producer and its delivery callback.
struct Shared {
    /// See [`Ctx`].
    reset: AtomicBool,
    coalesce: Mutex<Coalesce>,
    /// Wakes the flusher when a record is answered for (its partition may take the next one).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Coalesce {
    slots: HashMap<(i32, Arc<str>), Slot>,
    /// Records produced and not yet answered for, per partition.
    in_flight: HashMap<i32, usize>,
}

impl Shared {
    /// A record of `partition` was answered for (or never queued).
    fn record_done(&self, partition: i32) {
        let mut c = self.coalesce.lock();
        if let Some(n) = c.in_flight.get_mut(&partition) {
            *n = n.saturating_sub(1);
        }
        let waiting = !c.slots.is_empty();
        drop(c);
        if waiting {
            self.wake.notify_one();
        }
    }
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Fatal) => self.shared.reset.store(true, Ordering::Release),
            // The broker went away: when it comes back, this producer would resend its queued
            // records under its old producer id, and tansu 0.6 (SQLite storage) panics on a
            // producer id it no longer knows, leaving its storage dead until restarted. Replace
            // the producer right away (the flusher does it) so nothing is sent under the old id.
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.shared.reset.store(true, Ordering::Release);
                self.shared.wake.notify_one();
            }
            _ => {}
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

/// The requests waiting on one record, and the record's partition when it was coalesced.
struct Waiters {
    partition: Option<i32>,
    list: Vec<Arc<Pending>>,
}

impl Waiters {
    fn finish(self, err: Option<String>, shared: &Shared) {
        for w in self.list {
            w.finish_one(err.clone());
        }
        if let Some(p) = self.partition {
            shared.record_done(p);
        }
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<Waiters>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiters: Box<Waiters>) {
        match result {
            Ok(msg) => {
                let _ = msg.offset();
                waiters.finish(None, &self.shared);
            }
            Err((e, _)) => {
                // Timeouts are librdkafka's own to recover from (it re-initialises the producer
                // id itself); replacing the producer on them would restart its slow start after
                // a broker restart again and again. Purges are ours.
                if !matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::PurgeQueue
                            | RDKafkaErrorCode::PurgeInflight
                            | RDKafkaErrorCode::MessageTimedOut
                    )
                ) {
                    self.shared.reset.store(true, Ordering::Release);
                }
                waiters.finish(Some(e.to_string()), &self.shared);
            }
        }
    }
}

/// One request's encoded events for one partition (a request may have several per partition).
struct Chunk {
    partition: i32,
    bytes: Vec<u8>,
    events: usize,
    /// Index of the chunk's first event (its subject keys a new record).
    first: usize,
}

/// Events of one (tenant, partition) waiting for the next record.
struct Slot {
    /// `EventBatch` bytes so far: header, then event entries.
    buf: Vec<u8>,
    /// Record key: tenant + subject of the slot's first event.
    key: Vec<u8>,
    events: usize,
    waiters: Vec<Arc<Pending>>,
    opened: Instant,
}

pub struct Producer {
    cfg: KafkaConfig,
    packing: Packing,
    inner: RwLock<Arc<ThreadedProducer<Ctx>>>,
    shared: Arc<Shared>,
    partitions: AtomicU32,
    budget: Arc<Semaphore>,
    timeout: Duration,
    linger: Duration,
    headers: OwnedHeaders,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.cfg.topic)
            .field("partitions", &self.partitions.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why the producer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error("cannot create the Kafka producer: {0}")]
    Create(#[source] Box<KafkaError>),
    #[error("cannot read metadata of topic {topic:?} from {brokers}: {source}")]
    Metadata {
        topic: String,
        brokers: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error(
        "topic {0:?} does not exist or has no partitions; create it (scripts/stack.sh up does)"
    )]
    NoTopic(String),
}

impl Producer {
    /// Creates the producer and reads the topic's partition count.
    pub async fn start(cfg: KafkaConfig) -> Result<Arc<Self>, ProducerError> {
        let packing = cfg.packing;
        let shared = Arc::new(Shared {
            reset: AtomicBool::new(false),
            coalesce: Mutex::new(Coalesce::default()),
            wake: tokio::sync::Notify::new(),
        });
        let inner = Arc::new(Self::create(&cfg, shared.clone())?);
        let timeout = Duration::from_millis(cfg.produce_timeout_ms);
        let p = Arc::new(Self {
            budget: Arc::new(Semaphore::new(cfg.max_in_flight_events as usize)),
            packing,
            inner: RwLock::new(inner),
            linger: Duration::from_micros(cfg.coalesce_linger_us.max(100)),
            cfg,
            shared,
            partitions: AtomicU32::new(0),
            timeout,
            headers: OwnedHeaders::new().insert(Header {
                key: schemas::kafka::CONTENT_TYPE_HEADER,
                value: Some(schemas::kafka::EVENT_BATCH_V1),
            }),
        });
        let n = p.refresh_partitions(Duration::from_secs(10)).await?;
        if n == 0 {
            return Err(ProducerError::NoTopic(p.cfg.topic.clone()));
        }
        tokio::spawn(flusher(Arc::downgrade(&p)));
        Ok(p)
    }

    fn create(
        cfg: &KafkaConfig,
        shared: Arc<Shared>,
    ) -> Result<ThreadedProducer<Ctx>, ProducerError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("broker.address.family", "v4")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &cfg.compression)
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("batch.size", cfg.batch_size.to_string())
            .set("message.timeout.ms", cfg.produce_timeout_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.queue_max_messages.to_string(),
            )
            .set("partitioner", "murmur2");
        for (k, v) in &cfg.extra {
            c.set(k, v);
        }
        c.create_with_context(Ctx { shared })
            .map_err(|e| ProducerError::Create(Box::new(e)))
    }

    /// Re-reads the topic's partition count; returns it.
    pub async fn refresh_partitions(&self, timeout: Duration) -> Result<u32, ProducerError> {
        let producer = self.inner.read().clone();
        let topic = self.cfg.topic.clone();
        let md = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map(|md| {
                    md.topics()
                        .first()
                        .filter(|t| t.error().is_none())
                        .map_or(0, |t| t.partitions().len() as u32)
                })
        })
        .await
        .expect("metadata task panicked")
        .map_err(|source| ProducerError::Metadata {
            topic: self.cfg.topic.clone(),
            brokers: self.cfg.brokers.clone(),
            source: Box::new(source),
        })?;
        if md > 0 {
            self.partitions.store(md, Ordering::Release);
        }
        Ok(md)
    }

    /// Whether the broker answers a metadata request within `timeout`.
    pub async fn broker_reachable(&self, timeout: Duration) -> bool {
        matches!(self.refresh_partitions(timeout).await, Ok(n) if n > 0)
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.load(Ordering::Acquire)
    }

    /// Events currently being produced.
    pub fn in_flight(&self) -> usize {
        self.cfg.max_in_flight_events as usize - self.budget.available_permits()
    }

    /// The current producer, replaced first if a failure asked for it (see [`Ctx`]). The old
    /// one's queued records are purged, which fails their requests (503, resend) and releases
    /// their share of the in-flight budget; it is dropped off the async workers.
    fn producer(&self) -> Arc<ThreadedProducer<Ctx>> {
        if self.shared.reset.swap(false, Ordering::AcqRel) {
            match Self::create(&self.cfg, self.shared.clone()) {
                Ok(p) => {
                    tracing::warn!("kafka producer replaced after a failed delivery");
                    let old = std::mem::replace(&mut *self.inner.write(), Arc::new(p));
                    tokio::task::spawn_blocking(move || {
                        old.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                        let _ = old.flush(Duration::from_secs(1));
                        drop(old);
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot replace the kafka producer");
                    self.shared.reset.store(true, Ordering::Release);
                }
            }
        }
        self.inner.read().clone()
    }

    /// Produces `events` of `tenant` and waits until the broker acknowledged every record
    /// holding them, or the produce timeout passed.
    pub async fn send(
        &self,
        tenant: &Arc<str>,
        request_id: &str,
        events: &[Event<'_>],
    ) -> ProduceOutcome {
        let n = events.len() as u32;
        let Ok(permit) = self.budget.clone().try_acquire_many_owned(n) else {
            return ProduceOutcome::Overloaded("in-flight event budget is full");
        };
        let partitions = self.partitions().max(1);
        // Partition of each event (the partition of tenant + subject).
        let mut key = Vec::with_capacity(64);
        let parts: Vec<i32> = events
            .iter()
            .map(|e| {
                key.clear();
                key.extend_from_slice(tenant.as_bytes());
                key.push(0);
                key.extend_from_slice(e.subject.as_bytes());
                partition_for(&key, partitions)
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        match self.packing {
            Packing::Partition => self.coalesce(tenant, events, &parts, permit, tx),
            Packing::Event => self.per_event(tenant, request_id, events, &parts, permit, tx),
        }
        let outcome = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(None)) => ProduceOutcome::Acked,
            Ok(Ok(Some(e))) => {
                ProduceOutcome::Failed(format!("broker did not take the events: {e}"))
            }
            Ok(Err(_)) => ProduceOutcome::Failed("delivery report lost".into()),
            Err(_) => ProduceOutcome::Failed(format!(
                "broker did not acknowledge within {} ms",
                self.timeout.as_millis()
            )),
        };
        m::record_produce_latency(started.elapsed());
        outcome
    }

    /// Appends the request's events to the (tenant, partition) slots; produces slots that
    /// reached the size bound at once, the rest is left to the flusher.
    fn coalesce(
        &self,
        tenant: &Arc<str>,
        events: &[Event<'_>],
        parts: &[i32],
        permit: OwnedSemaphorePermit,
        tx: oneshot::Sender<Option<String>>,
    ) {
        // Encode outside the lock, one buffer per touched partition.
        // Encode outside the lock into chunks per partition, each at most half a record, so that
        // no record ever exceeds `record_max_bytes` (the broker refuses oversized records).
        let chunk_max = self.cfg.record_max_bytes / 2;
        let mut groups: Vec<Chunk> = Vec::new();
        for (i, (e, &p)) in events.iter().zip(parts).enumerate() {
            let len = event_entry_len(e);
            let open = groups
                .iter()
                .rposition(|g| g.partition == p && g.bytes.len() + len <= chunk_max.max(len));
            let g = match open {
                Some(g) => &mut groups[g],
                None => {
                    groups.push(Chunk {
                        partition: p,
                        bytes: Vec::with_capacity(len * 4),
                        events: 0,
                        first: i,
                    });
                    groups.last_mut().expect("just pushed")
                }
            };
            put_event(e, &mut g.bytes);
            g.events += 1;
        }
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(groups.len()),
            error: Mutex::new(None),
            tx: Mutex::new(Some(tx)),
            _permit: permit,
        });
        let received = now_unix_nanos();
        let limit = self.cfg.max_records_in_flight_per_partition.max(1);
        let mut ready = Vec::new();
        {
            let mut guard = self.shared.coalesce.lock();
            let c = &mut *guard;
            for Chunk {
                partition: p,
                bytes,
                events: count,
                first,
            } in groups
            {
                let key = (p, tenant.clone());
                // A chunk that would overflow the waiting record closes it first.
                if c.slots
                    .get(&key)
                    .is_some_and(|s| s.buf.len() + bytes.len() > self.cfg.record_max_bytes)
                {
                    if let Some(s) = c.slots.remove(&key) {
                        *c.in_flight.entry(p).or_default() += 1;
                        ready.push((p, s));
                    }
                }
                let slot = c.slots.entry(key.clone()).or_insert_with(|| {
                    let mut buf = Vec::with_capacity(bytes.len().max(4096) + 64);
                    put_batch_header(tenant, "", received, &mut buf);
                    Slot {
                        buf,
                        key: schemas::kafka::record_key(tenant, &events[first].subject),
                        events: 0,
                        waiters: Vec::new(),
                        opened: Instant::now(),
                    }
                });
                slot.buf.extend_from_slice(&bytes);
                slot.events += count;
                slot.waiters.push(pending.clone());
                // Group commit: a partition with room in flight takes the record now; otherwise
                // events gather until a record of the partition is answered for, the linger
                // passes or the record is full.
                let in_flight = c.in_flight.entry(p).or_default();
                if *in_flight < limit || slot.buf.len() >= self.cfg.record_max_bytes {
                    if let Some(s) = c.slots.remove(&key) {
                        *in_flight += 1;
                        ready.push((p, s));
                    }
                }
            }
        }
        for (p, slot) in ready {
            self.produce_slot(p, slot);
        }
    }

    /// Produces the slots whose partition has room in flight or that waited the linger; with
    /// `all`, every slot (shutdown).
    pub fn flush_slots(&self, all: bool) {
        let limit = self.cfg.max_records_in_flight_per_partition.max(1);
        let mut ready = Vec::new();
        {
            let mut guard = self.shared.coalesce.lock();
            let c = &mut *guard;
            let keys: Vec<(i32, Arc<str>)> = c
                .slots
                .iter()
                .filter(|((p, _), slot)| {
                    all || slot.opened.elapsed() >= self.linger
                        || c.in_flight.get(p).copied().unwrap_or(0) < limit
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                if let Some(slot) = c.slots.remove(&k) {
                    *c.in_flight.entry(k.0).or_default() += 1;
                    ready.push((k.0, slot));
                }
            }
        }
        for (p, slot) in ready {
            self.produce_slot(p, slot);
        }
    }

    fn produce_slot(&self, partition: i32, slot: Slot) {
        m::record_produced(slot.events, slot.buf.len());
        let producer = self.producer();
        let waiters = Box::new(Waiters {
            partition: (self.packing == Packing::Partition).then_some(partition),
            list: slot.waiters,
        });
        let record = BaseRecord::with_opaque_to(&self.cfg.topic, waiters)
            .partition(partition)
            .key(&slot.key)
            .payload(&slot.buf)
            .headers(self.headers.clone());
        if let Err((e, record)) = producer.send(record) {
            let why = if matches!(
                e,
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
            ) {
                "producer queue is full".to_string()
            } else {
                format!("cannot queue the record: {e}")
            };
            record.delivery_opaque.finish(Some(why), &self.shared);
        }
    }

    /// One record per event (the comparison mode of BENCHMARKS.md).
    fn per_event(
        &self,
        tenant: &str,
        request_id: &str,
        events: &[Event<'_>],
        parts: &[i32],
        permit: OwnedSemaphorePermit,
        tx: oneshot::Sender<Option<String>>,
    ) {
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(events.len()),
            error: Mutex::new(None),
            tx: Mutex::new(Some(tx)),
            _permit: permit,
        });
        let received = now_unix_nanos();
        for (e, &p) in events.iter().zip(parts) {
            let buf = encode_batch(tenant, request_id, received, std::iter::once(e));
            let slot = Slot {
                key: schemas::kafka::record_key(tenant, &e.subject),
                buf,
                events: 1,
                waiters: vec![pending.clone()],
                opened: Instant::now(),
            };
            self.produce_slot(p, slot);
        }
    }

    /// Waits until every queued record is answered for, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.read().flush(timeout)
    }
}

fn now_unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Produces waiting slots when a record is answered for (group commit) and at least every
/// linger, until the producer is dropped.
async fn flusher(producer: Weak<Producer>) {
    let (linger, shared) = match producer.upgrade() {
        Some(p) => (p.linger, p.shared.clone()),
        None => return,
    };
    loop {
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(linger) => {}
        }
        let Some(p) = producer.upgrade() else { return };
        if p.shared.reset.load(Ordering::Acquire) {
            let _ = p.producer();
        }
        p.flush_slots(false);
    }
}
