//! The Kafka producer: packs a request's events into one record per partition (or one per
//! event, by configuration), produces with acks=all and idempotence on librdkafka's hot-path API
//! (a delivery callback, no future per message), and tells the request when every record is
//! acknowledged.
//!
//! Bounded memory: an in-flight budget of events (a semaphore) is taken before producing and
//! released only when the broker has answered for every record of the request, so a slow or
//! absent broker turns into prompt 503s instead of growing queues.

use crate::config::KafkaConfig;
use crate::event::Event;
use crate::metrics as m;
use crate::record::{encode_batch, partition_for};
use parking_lot::{Mutex, RwLock};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Message};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// How a request's events become records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// One `EventBatch` record per (request, partition): the default (see BENCHMARKS.md).
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

/// Set when the producer must be replaced before the next request: after a fatal error, or
/// after a failed delivery. A failed delivery leaves the idempotent producer's sequence state at
/// odds with the broker's (seen with tansu restarted: every later produce fails with an unknown
/// broker error); a new producer gets a new producer id and starts clean.
struct Ctx {
    reset: Arc<AtomicBool>,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
            self.reset.store(true, Ordering::Release);
        }
        tracing::warn!(error = %error, reason, "kafka client error");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Arc<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Arc<Pending>) {
        match result {
            Ok(msg) => {
                let _ = msg.offset();
                pending.finish_one(None);
            }
            Err((e, _)) => {
                if !matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) {
                    self.reset.store(true, Ordering::Release);
                }
                pending.finish_one(Some(e.to_string()));
            }
        }
    }
}

pub struct Producer {
    cfg: KafkaConfig,
    packing: Packing,
    inner: RwLock<Arc<ThreadedProducer<Ctx>>>,
    reset: Arc<AtomicBool>,
    partitions: AtomicU32,
    budget: Arc<Semaphore>,
    timeout: Duration,
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
        let reset = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Self::create(&cfg, reset.clone())?);
        let timeout = Duration::from_millis(cfg.produce_timeout_ms);
        let p = Arc::new(Self {
            budget: Arc::new(Semaphore::new(cfg.max_in_flight_events as usize)),
            cfg,
            packing,
            inner: RwLock::new(inner),
            reset,
            partitions: AtomicU32::new(0),
            timeout,
        });
        let n = p.refresh_partitions(Duration::from_secs(10)).await?;
        if n == 0 {
            return Err(ProducerError::NoTopic(p.cfg.topic.clone()));
        }
        Ok(p)
    }

    fn create(
        cfg: &KafkaConfig,
        reset: Arc<AtomicBool>,
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
        c.create_with_context(Ctx { reset })
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
        if self.reset.swap(false, Ordering::AcqRel) {
            match Self::create(&self.cfg, self.reset.clone()) {
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
                    self.reset.store(true, Ordering::Release);
                }
            }
        }
        self.inner.read().clone()
    }

    /// Produces `events` of `tenant` and waits until the broker acknowledged all of them, or the
    /// produce timeout passed.
    pub async fn send(
        &self,
        tenant: &str,
        request_id: &str,
        events: &[Event<'_>],
    ) -> ProduceOutcome {
        let n = events.len() as u32;
        let Ok(permit) = self.budget.clone().try_acquire_many_owned(n) else {
            return ProduceOutcome::Overloaded("in-flight event budget is full");
        };
        let partitions = self.partitions().max(1);
        let received = now_unix_nanos();
        // Group event indexes by partition (the partition of tenant + subject).
        let mut groups: Vec<Vec<&Event<'_>>> = vec![Vec::new(); partitions as usize];
        let mut key = Vec::with_capacity(64);
        for e in events {
            key.clear();
            key.extend_from_slice(tenant.as_bytes());
            key.push(0);
            key.extend_from_slice(e.subject.as_bytes());
            groups[partition_for(&key, partitions) as usize].push(e);
        }
        let records: Vec<(i32, Vec<&Event<'_>>)> = match self.packing {
            Packing::Partition => groups
                .into_iter()
                .enumerate()
                .filter(|(_, g)| !g.is_empty())
                .map(|(p, g)| (p as i32, g))
                .collect(),
            Packing::Event => groups
                .into_iter()
                .enumerate()
                .flat_map(|(p, g)| g.into_iter().map(move |e| (p as i32, vec![e])))
                .collect(),
        };
        let (tx, rx) = oneshot::channel();
        let pending = Arc::new(Pending {
            remaining: AtomicUsize::new(records.len()),
            error: Mutex::new(None),
            tx: Mutex::new(Some(tx)),
            _permit: permit,
        });
        let producer = self.producer();
        let started = Instant::now();
        let headers = OwnedHeaders::new().insert(Header {
            key: schemas::kafka::CONTENT_TYPE_HEADER,
            value: Some(schemas::kafka::EVENT_BATCH_V1),
        });
        let count = records.len();
        for (i, (partition, group)) in records.into_iter().enumerate() {
            let payload = encode_batch(tenant, request_id, received, group.iter().copied());
            let key = schemas::kafka::record_key(tenant, &group[0].subject);
            m::record_produced(group.len(), payload.len());
            let record = BaseRecord::with_opaque_to(&self.cfg.topic, pending.clone())
                .partition(partition)
                .key(&key)
                .payload(&payload)
                .headers(headers.clone());
            if let Err((e, _)) = producer.send(record) {
                // This record and the ones after it were never queued: count them as answered.
                for _ in i..count {
                    pending.finish_one(Some(e.to_string()));
                }
                if matches!(
                    e,
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                ) {
                    return ProduceOutcome::Overloaded("producer queue is full");
                }
                return ProduceOutcome::Failed(format!("cannot queue the record: {e}"));
            }
        }
        drop(pending);
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
