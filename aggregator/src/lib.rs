//! Aggregator: sharded, exactly-once windowed usage from Kafka into PostgreSQL.
//!
//! Stages, one module each: [`config`] → [`lease`] (which partitions this process owns, with a
//! generation fence in PostgreSQL) → [`shard`] (consume, hold, flush, rebalance) → [`process`]
//! (classify events against [`meters`], dedup within a flush, fold into deltas) → [`flush`] (one
//! transaction: fence, dedup ids, deltas at three grains, corrections, dead letters, outcomes,
//! offsets). [`metrics`] names every metric.

pub mod config;
pub mod flush;
pub mod lease;
pub mod meters;
pub mod metrics;
pub mod process;
pub mod shard;

pub use config::Config;

use tokio_util::sync::CancellationToken;

/// Runs one aggregator process until `shutdown`: a shard, and the dedup housekeeping.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    metrics::install(cfg.metrics_listen);
    let shard = shard::Shard::new(cfg.clone())?;
    let hk = tokio::spawn(housekeeping(cfg.clone(), shutdown.clone()));
    tracing::info!(member = %cfg.member, topic = %cfg.kafka.topic, "aggregator started");
    shard.run(shutdown).await;
    hk.abort();
    Ok(())
}

/// At start and then every `dedup.housekeeping_interval_secs`: creates monthly partitions ahead,
/// deletes dedup ids well past the dedup window, in bounded batches. The flush treats an id
/// older than the window as new whether or not its row is gone yet, so this only bounds storage;
/// the extra slack (6 h) keeps ids while a lagging shard might still need them.
async fn housekeeping(cfg: Config, shutdown: CancellationToken) {
    let every = std::time::Duration::from_secs(cfg.dedup.housekeeping_interval_secs.max(1));
    let keep = format!("{} seconds", cfg.dedup.window_secs + 6 * 3600);
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
        first = false;
        let Ok(db) = shard::connect(&cfg.database_url).await else {
            continue;
        };
        // Monthly partitions of the minute tables ahead of time (a no-op with TimescaleDB); rows
        // of a month without its partition land in the DEFAULT one, so this is never urgent.
        if let Err(e) = db
            .execute(
                "SELECT metering_ensure_partitions((now() - interval '2 months')::date,
                                                   (now() + interval '3 months')::date)",
                &[],
            )
            .await
        {
            tracing::warn!(error = %e, "creating monthly partitions failed");
        }
        loop {
            match db
                .execute(
                    "DELETE FROM dedup_keys WHERE ctid IN (
                        SELECT ctid FROM dedup_keys WHERE seen_at < now() - $1::text::interval LIMIT 50000)",
                    &[&keep],
                )
                .await
            {
                Ok(n) if n > 0 => tracing::debug!(deleted = n, "dedup ids expired"),
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "dedup housekeeping failed");
                    break;
                }
            }
        }
        let _ = db
            .execute(
                "DELETE FROM aggregator_members WHERE heartbeat_at < now() - interval '1 day'",
                &[],
            )
            .await;
    }
}
