//! Configuration: defaults in code, then an optional TOML file (`--config` or `INGEST_CONFIG`),
//! then environment variables prefixed `INGEST_` (nested fields joined by `__`, e.g.
//! `INGEST_LIMITS__MAX_BODY_BYTES=1048576`). Validated once at start-up.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server binds (port 0 picks a free port, for tests).
    pub listen: SocketAddr,
    /// PostgreSQL holding the API keys. May carry a password: never logged.
    pub database_url: String,
    /// Base URL of control-api; other `/api/v1/*` paths are forwarded there.
    pub control_api_url: String,
    pub kafka: KafkaConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    /// Grace period for in-flight requests and the producer flush at shutdown, in ms.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    /// `none` (default), `lz4` or `zstd`.
    pub compression: String,
    /// Coalescing of requests into records: a (tenant, partition) record leaves when it holds
    /// `record_max_bytes`, or at the latest `coalesce_linger_us` after its first event.
    pub coalesce_linger_us: u64,
    pub record_max_bytes: usize,
    /// Group commit: a partition with fewer records than this in flight takes a waiting record
    /// at once; otherwise events gather until one is answered for (or the linger passes).
    pub max_records_in_flight_per_partition: usize,
    /// librdkafka's own batching of records into produce requests: a batch leaves when it holds
    /// `batch_size` bytes or after `linger_ms`, whichever comes first.
    pub linger_ms: u64,
    pub batch_size: u64,
    /// A request whose records are not all acknowledged by the broker within this time gets 503
    /// (the client resends; duplicates are dropped downstream by id).
    pub produce_timeout_ms: u64,
    /// Upper bound of events being produced at once across all requests; beyond it requests get
    /// 503 at once instead of queueing (bounded memory).
    pub max_in_flight_events: u32,
    /// librdkafka's own queue bound (messages); a full queue answers 503 too.
    pub queue_max_messages: u32,
    /// `partition`: one protobuf record per (request, partition), the default; `event`: one
    /// record per event (kept for the comparison in BENCHMARKS.md).
    pub packing: crate::producer::Packing,
    /// Extra librdkafka settings, passed through verbatim.
    pub extra: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body as sent (413 above).
    pub max_body_bytes: usize,
    /// Largest body after gzip decompression (413 above: gzip bombs).
    pub max_decompressed_bytes: usize,
    /// Most events in one request (413 above).
    pub max_events_per_request: usize,
    /// Largest single event, as JSON text (400 for that event above).
    pub max_event_bytes: usize,
    /// Time a client has to send its request headers.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send its whole body.
    pub body_read_timeout_ms: u64,
    /// Seconds suggested in Retry-After when answering 429 or 503.
    pub retry_after_secs: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Longest time a changed key (revoked, new scopes) may still be served from the cache.
    pub key_cache_staleness_ms: u64,
    /// Requests per second per key when the key sets no limit of its own.
    pub default_rate_limit_rps: u32,
    /// Events per second per key when the key sets no limit of its own.
    pub default_rate_limit_eps: u32,
    /// Trust `X-Forwarded-For` for the client address (only behind a trusted proxy).
    pub trust_forwarded_for: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: "postgres://postgres@127.0.0.1:5432/metering".into(),
            control_api_url: "http://127.0.0.1:8081".into(),
            kafka: KafkaConfig::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: schemas::kafka::USAGE_TOPIC.into(),
            // Measured (BENCHMARKS.md): with the broker on the same machine, lz4 costs 3.5x the
            // events/s of large batches; over a network to a real Kafka, lz4 or zstd pays.
            compression: "none".into(),
            coalesce_linger_us: 1_000,
            record_max_bytes: 512 << 10,
            max_records_in_flight_per_partition: 1,
            linger_ms: 0,
            batch_size: 1_000_000,
            produce_timeout_ms: 5_000,
            max_in_flight_events: 500_000,
            queue_max_messages: 100_000,
            packing: crate::producer::Packing::Partition,
            extra: Default::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_decompressed_bytes: 16 << 20,
            max_events_per_request: 10_000,
            max_event_bytes: 64 << 10,
            header_read_timeout_ms: 5_000,
            body_read_timeout_ms: 30_000,
            retry_after_secs: 1,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            key_cache_staleness_ms: 10_000,
            default_rate_limit_rps: 10_000,
            default_rate_limit_eps: 1_000_000,
            trust_forwarded_for: false,
        }
    }
}

/// What is wrong with a configuration, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {field} {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl Config {
    /// Defaults, then `file` (if any), then `INGEST_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        let cfg: Config = fig
            .merge(
                Env::prefixed("INGEST_")
                    .ignore(&["port", "config"])
                    .split("__"),
            )
            .extract()
            .map_err(Box::new)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that would make the service misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if !matches!(self.kafka.compression.as_str(), "lz4" | "zstd" | "none") {
            return bad("kafka.compression", "must be lz4, zstd or none");
        }
        if self.kafka.record_max_bytes > 900_000 {
            return bad(
                "kafka.record_max_bytes",
                "must be at most 900000 (the broker's message.max.bytes is 1000000)",
            );
        }
        if self.kafka.record_max_bytes < 2 * self.limits.max_event_bytes + 1024 {
            return bad(
                "kafka.record_max_bytes",
                "must be at least twice limits.max_event_bytes plus 1024",
            );
        }
        if self.kafka.produce_timeout_ms < 100 {
            return bad("kafka.produce_timeout_ms", "must be at least 100");
        }
        if self.kafka.max_in_flight_events < self.limits.max_events_per_request as u32 {
            return bad(
                "kafka.max_in_flight_events",
                "must be at least limits.max_events_per_request",
            );
        }
        if self.limits.max_decompressed_bytes < self.limits.max_body_bytes {
            return bad(
                "limits.max_decompressed_bytes",
                "must be at least limits.max_body_bytes",
            );
        }
        if self.limits.max_events_per_request == 0 || self.limits.max_event_bytes == 0 {
            return bad("limits", "event limits must be positive");
        }
        if self.auth.key_cache_staleness_ms < 100 {
            return bad("auth.key_cache_staleness_ms", "must be at least 100");
        }
        if !self.control_api_url.starts_with("http://") {
            return bad("control_api_url", "must be an http:// URL");
        }
        Ok(())
    }

    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.kafka.produce_timeout_ms)
    }
}
