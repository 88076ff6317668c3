//! Configuration: defaults in code, then an optional TOML file (`--config` or
//! `AGGREGATOR_CONFIG`), then environment variables prefixed `AGGREGATOR_` (nested fields joined
//! by `__`, e.g. `AGGREGATOR_FLUSH__MAX_EVENTS=100000`). Validated once at start-up.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL holding meters, aggregates and the pipeline state. Never logged in clear.
    pub database_url: String,
    /// This process's name among the aggregators of its group; empty: host, pid and a random
    /// suffix. Two running processes must never share a name.
    pub member: String,
    /// Aggregators sharing a group split the topic's partitions between them.
    pub consumer_group: String,
    pub kafka: KafkaConfig,
    pub flush: FlushConfig,
    pub lease: LeaseConfig,
    pub lateness: LatenessConfig,
    pub dedup: DedupConfig,
    /// How often meter definitions are re-read (new and deleted meters apply without restart).
    pub meters_refresh_ms: u64,
    /// Address of the Prometheus `/metrics` endpoint (port 0: disabled).
    pub metrics_listen: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    /// Extra librdkafka consumer settings, passed through verbatim.
    pub extra: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// A shard flushes when it holds this many unflushed events...
    pub max_events: usize,
    /// ...or when its oldest unflushed event is this old, whichever comes first.
    pub interval_ms: u64,
    /// A flush is split by partition (p mod n) into this many transactions on as many
    /// connections, run at once; each carries its own fence and offsets, so each is exactly-once
    /// on its own, and PostgreSQL works on several cores.
    pub parallelism: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// A partition lease (and a member's heartbeat) not renewed for this long may be taken over.
    pub ttl_ms: u64,
    /// How often members heartbeat, renew leases and rebalance.
    pub tick_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatenessConfig {
    /// Oldest event time accepted, relative to when ingest received the event (default 35 days).
    pub horizon_back_secs: u64,
    /// Furthest event time ahead of reception accepted (default 5 minutes).
    pub horizon_ahead_secs: u64,
    /// A minute window closes when the partition's watermark passes its end plus this grace;
    /// events for a closed window are recorded as corrections.
    pub grace_secs: u64,
    /// A partition without records for this long has its watermark advanced by the wall clock.
    pub idle_partition_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Events with the same (tenant, source, id) within this window count once (default 24 h).
    pub window_secs: u64,
    /// How often ids older than the window are deleted.
    pub housekeeping_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/metering".into(),
            member: String::new(),
            consumer_group: "aggregator".into(),
            kafka: KafkaConfig {
                brokers: "127.0.0.1:9092".into(),
                topic: schemas::kafka::USAGE_TOPIC.into(),
                extra: Default::default(),
            },
            flush: FlushConfig {
                max_events: 50_000,
                interval_ms: 100,
                parallelism: 2,
            },
            lease: LeaseConfig {
                ttl_ms: 10_000,
                tick_ms: 1_000,
            },
            lateness: LatenessConfig {
                horizon_back_secs: 35 * 86_400,
                horizon_ahead_secs: 300,
                grace_secs: 60,
                idle_partition_ms: 10_000,
            },
            dedup: DedupConfig {
                window_secs: 86_400,
                housekeeping_interval_secs: 60,
            },
            meters_refresh_ms: 1_000,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9181)),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Config::default().kafka
    }
}
impl Default for FlushConfig {
    fn default() -> Self {
        Config::default().flush
    }
}
impl Default for LeaseConfig {
    fn default() -> Self {
        Config::default().lease
    }
}
impl Default for LatenessConfig {
    fn default() -> Self {
        Config::default().lateness
    }
}
impl Default for DedupConfig {
    fn default() -> Self {
        Config::default().dedup
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
    /// Defaults, then `file` (if any), then `AGGREGATOR_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        let mut cfg: Config = fig
            .merge(
                Env::prefixed("AGGREGATOR_")
                    .ignore(&["config", "metrics_port"])
                    .split("__"),
            )
            .extract()
            .map_err(Box::new)?;
        cfg.validate()?;
        if cfg.member.is_empty() {
            cfg.member = default_member();
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if self.flush.max_events == 0 {
            return bad("flush.max_events", "must be positive");
        }
        if self.flush.parallelism == 0 || self.flush.parallelism > 64 {
            return bad("flush.parallelism", "must be between 1 and 64");
        }
        if self.flush.interval_ms == 0 {
            return bad("flush.interval_ms", "must be positive");
        }
        if self.lease.tick_ms == 0 || self.lease.ttl_ms < 3 * self.lease.tick_ms {
            return bad("lease.ttl_ms", "must be at least three times lease.tick_ms");
        }
        if self.lateness.horizon_back_secs < 60 {
            return bad("lateness.horizon_back_secs", "must be at least 60");
        }
        if self.dedup.window_secs == 0 {
            return bad("dedup.window_secs", "must be positive");
        }
        if self.consumer_group.is_empty() {
            return bad("consumer_group", "must not be empty");
        }
        Ok(())
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease.ttl_ms)
    }
}

/// `host-pid-xxxx`: unique per process, readable in `aggregator_members`.
pub fn default_member() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "aggregator".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
