//! Metric names and handles of the ingest edge, in one place. Handles are created once for every
//! label value (all from bounded sets) and then only incremented; counts are emitted per request
//! or per record, never per event.

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

pub const REQUESTS_TOTAL: &str = "ingest_requests_total";
pub const EVENTS_TOTAL: &str = "ingest_events_total";
pub const REQUEST_BYTES_TOTAL: &str = "ingest_request_bytes_total";
pub const PRODUCE_LATENCY_SECONDS: &str = "ingest_produce_latency_seconds";
pub const IN_FLIGHT_EVENTS: &str = "ingest_in_flight_events";
pub const RECORD_EVENTS: &str = "ingest_record_events";
pub const RECORD_BYTES: &str = "ingest_record_bytes";
pub const KEY_CACHE_KEYS: &str = "ingest_key_cache_keys";

/// HTTP statuses the edge answers with (the label set of REQUESTS_TOTAL).
pub const STATUSES: &[u16] = &[
    200, 204, 400, 401, 403, 404, 405, 408, 413, 415, 429, 502, 503,
];

/// Why events were rejected (the label set of EVENTS_TOTAL{outcome="rejected"}).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    Invalid,
    TooLarge,
    TooMany,
    Unauthenticated,
    Forbidden,
    RateLimited,
    QuotaExceeded,
    Overloaded,
    BrokerError,
    UnsupportedMediaType,
}

impl Reject {
    pub const ALL: [Reject; 10] = [
        Reject::Invalid,
        Reject::TooLarge,
        Reject::TooMany,
        Reject::Unauthenticated,
        Reject::Forbidden,
        Reject::RateLimited,
        Reject::QuotaExceeded,
        Reject::Overloaded,
        Reject::BrokerError,
        Reject::UnsupportedMediaType,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Reject::Invalid => "invalid",
            Reject::TooLarge => "too_large",
            Reject::TooMany => "too_many_events",
            Reject::Unauthenticated => "unauthenticated",
            Reject::Forbidden => "forbidden",
            Reject::QuotaExceeded => "quota_exceeded",
            Reject::RateLimited => "rate_limited",
            Reject::Overloaded => "overloaded",
            Reject::BrokerError => "broker_error",
            Reject::UnsupportedMediaType => "unsupported_media_type",
        }
    }
}

struct Handles {
    requests: Vec<(u16, Counter)>,
    requests_other: Counter,
    accepted: Counter,
    rejected: Vec<Counter>,
    bytes: Counter,
    produce_latency: Histogram,
    in_flight: Gauge,
    record_events: Histogram,
    record_bytes: Histogram,
    key_cache_keys: Gauge,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();
static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and registers every handle.
pub fn install() -> PrometheusHandle {
    let handle = PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PRODUCE_LATENCY_SECONDS.into()),
                    &[
                        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RECORD_EVENTS.into()),
                        &[1.0, 10.0, 100.0, 1000.0, 10000.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(RECORD_BYTES.into()),
                        &[256.0, 1024.0, 16384.0, 131072.0, 1048576.0],
                    )
                })
                .expect("static bucket lists are valid");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several services):
            // then this handle renders nothing of ours, which only affects those tests.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone();
    HANDLES.get_or_init(|| {
        metrics::describe_counter!(REQUESTS_TOTAL, "HTTP requests answered, by status");
        metrics::describe_counter!(EVENTS_TOTAL, "Events received, by outcome and reason");
        metrics::describe_counter!(REQUEST_BYTES_TOTAL, "Request body bytes received (as sent)");
        metrics::describe_histogram!(
            PRODUCE_LATENCY_SECONDS,
            "Time from producing a request's records to the broker's acknowledgement"
        );
        metrics::describe_gauge!(IN_FLIGHT_EVENTS, "Events being produced right now");
        metrics::describe_histogram!(RECORD_EVENTS, "Events per Kafka record");
        metrics::describe_histogram!(RECORD_BYTES, "Bytes per Kafka record payload");
        metrics::describe_gauge!(KEY_CACHE_KEYS, "Live API keys in the cache");
        Handles {
            requests: STATUSES
                .iter()
                .map(|s| (*s, metrics::counter!(REQUESTS_TOTAL, "status" => s.to_string())))
                .collect(),
            requests_other: metrics::counter!(REQUESTS_TOTAL, "status" => "other"),
            accepted: metrics::counter!(EVENTS_TOTAL, "outcome" => "accepted", "reason" => ""),
            rejected: Reject::ALL
                .iter()
                .map(|r| metrics::counter!(EVENTS_TOTAL, "outcome" => "rejected", "reason" => r.label()))
                .collect(),
            bytes: metrics::counter!(REQUEST_BYTES_TOTAL),
            produce_latency: metrics::histogram!(PRODUCE_LATENCY_SECONDS),
            in_flight: metrics::gauge!(IN_FLIGHT_EVENTS),
            record_events: metrics::histogram!(RECORD_EVENTS),
            record_bytes: metrics::histogram!(RECORD_BYTES),
            key_cache_keys: metrics::gauge!(KEY_CACHE_KEYS),
        }
    });
    handle
}

fn h() -> Option<&'static Handles> {
    HANDLES.get()
}

pub fn record_request(status: u16) {
    if let Some(h) = h() {
        match h.requests.iter().find(|(s, _)| *s == status) {
            Some((_, c)) => c.increment(1),
            None => h.requests_other.increment(1),
        }
    }
}

pub fn record_bytes(body_bytes: usize) {
    if let Some(h) = h() {
        h.bytes.increment(body_bytes as u64);
    }
}

pub fn record_accepted(events: usize) {
    if let Some(h) = h() {
        h.accepted.increment(events as u64);
    }
}

/// `events` is the number of events the rejected request held (1 when unknown).
pub fn record_rejected(reason: Reject, events: usize) {
    if let Some(h) = h() {
        let i = Reject::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        h.rejected[i].increment(events.max(1) as u64);
    }
}

pub fn record_produced(events: usize, bytes: usize) {
    if let Some(h) = h() {
        h.record_events.record(events as f64);
        h.record_bytes.record(bytes as f64);
    }
}

pub fn record_produce_latency(d: Duration) {
    if let Some(h) = h() {
        h.produce_latency.record(d);
    }
}

pub fn set_in_flight(events: usize) {
    if let Some(h) = h() {
        h.in_flight.set(events as f64);
    }
}

pub fn set_key_cache_keys(n: usize) {
    if let Some(h) = h() {
        h.key_cache_keys.set(n as f64);
    }
}
