//! Metric names of the aggregator, in one place. Labels come from bounded sets (outcome, reason,
//! partition number).

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;

pub const EVENTS_TOTAL: &str = "aggregator_events_total";
pub const DEDUP_HITS_TOTAL: &str = "aggregator_dedup_hits_total";
pub const CORRECTIONS_TOTAL: &str = "aggregator_corrections_total";
pub const LATE_EVENTS_TOTAL: &str = "aggregator_late_events_total";
pub const DEAD_LETTERS_TOTAL: &str = "aggregator_dead_letters_total";
pub const FLUSH_EVENTS: &str = "aggregator_flush_events";
pub const FLUSH_ROWS: &str = "aggregator_flush_window_rows";
pub const FLUSH_SECONDS: &str = "aggregator_flush_seconds";
pub const FLUSH_FAILURES_TOTAL: &str = "aggregator_flush_failures_total";
pub const FENCED_TOTAL: &str = "aggregator_fenced_total";
pub const FRESHNESS_SECONDS: &str = "aggregator_freshness_seconds";
pub const CONSUMER_LAG: &str = "aggregator_consumer_lag_records";
pub const WATERMARK_DELAY_SECONDS: &str = "aggregator_watermark_delay_seconds";
pub const OWNED_PARTITIONS: &str = "aggregator_owned_partitions";
pub const PENDING_EVENTS: &str = "aggregator_pending_events";

/// Installs the Prometheus recorder (once per process) and, when `listen` has a port, its
/// `/metrics` HTTP listener.
pub fn install(listen: SocketAddr) {
    let buckets_s = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
    ];
    let buckets_n = [
        1.0, 10.0, 100.0, 1_000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0,
    ];
    let mut b = PrometheusBuilder::new();
    if listen.port() != 0 {
        b = b.with_http_listener(listen);
    }
    let b = b
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets_s)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FLUSH_EVENTS.into()), &buckets_n))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FLUSH_ROWS.into()), &buckets_n));
    match b {
        Ok(b) => {
            if let Err(e) = b.install() {
                tracing::debug!(error = %e, "metrics recorder already installed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics not installed"),
    }
}

pub fn flushed(r: &crate::flush::FlushReport, seconds: f64, now_nanos: i64) {
    for (outcome, n) in [
        ("accepted", r.accepted),
        ("duplicate", r.duplicates),
        ("unmetered", r.unmetered),
        ("rejected", r.rejected),
    ] {
        if n > 0 {
            counter!(EVENTS_TOTAL, "outcome" => outcome).increment(n);
        }
    }
    counter!(DEDUP_HITS_TOTAL).increment(r.duplicates);
    counter!(LATE_EVENTS_TOTAL).increment(r.late);
    counter!(CORRECTIONS_TOTAL).increment(r.corrections as u64);
    counter!(DEAD_LETTERS_TOTAL).increment(r.dead_letters as u64);
    histogram!(FLUSH_EVENTS).record(r.events as f64);
    histogram!(FLUSH_ROWS).record(r.window_rows as f64);
    histogram!(FLUSH_SECONDS).record(seconds);
    // Freshness: from reception at the edge to queryable (this commit), for the oldest and
    // newest event of the flush.
    for rec in [r.received_min, r.received_max].into_iter().flatten() {
        histogram!(FRESHNESS_SECONDS).record(nanos_to_secs(now_nanos - rec));
    }
    for (p, wm) in &r.watermarks {
        if *wm > 0 {
            gauge!(WATERMARK_DELAY_SECONDS, "partition" => p.to_string())
                .set(nanos_to_secs(now_nanos - wm));
        }
    }
}

#[allow(clippy::float_arithmetic)]
pub fn nanos_to_secs(n: i64) -> f64 {
    n as f64 / 1e9
}
