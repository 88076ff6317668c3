//! Ingest edge: authenticated, bounded, durable intake of CloudEvents into Kafka.
//!
//! `run(config, shutdown)` is the whole service; `main.rs` only parses arguments and sets up
//! telemetry, and tests call [`start`] on port 0 against the real broker and PostgreSQL.
//!
//! Stages, one module each: [`config`] → [`server`] (routing, limits, answers) → [`auth`] (keys,
//! scopes, addresses, rates) → [`event`] (decode and validate) → [`record`] (partition and
//! encode) → [`producer`] (Kafka, acks=all, idempotent) ; [`proxy`] forwards the rest of
//! `/api/v1` to control-api; [`metrics`] names every metric.

pub mod auth;
pub mod config;
pub mod event;
pub mod metrics;
pub mod producer;
pub mod proxy;
pub mod record;
pub mod server;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use producer::Packing;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load API keys from PostgreSQL: {0}")]
    Keys(#[from] auth::KeyStoreError),
    #[error(transparent)]
    Producer(#[from] producer::ProducerError),
}

/// A started service.
#[derive(Debug)]
pub struct Running {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    pub state: Arc<server::State>,
    /// Ends after shutdown: intake stopped, in-flight requests done, producer flushed.
    pub done: JoinHandle<()>,
}

/// Starts the service: loads keys, connects the producer, binds, serves until `shutdown`.
pub async fn start(cfg: Config, shutdown: CancellationToken) -> Result<Running, StartError> {
    let prometheus = metrics::install();
    let keys = auth::KeyCache::new(cfg.auth.clone(), cfg.database_url.clone());
    let n = keys.reload().await?;
    metrics::set_key_cache_keys(n);
    let producer = producer::Producer::start(cfg.kafka.clone()).await?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    tracing::info!(%addr, partitions = producer.partitions(), keys = n, "ingest listening");
    let state = Arc::new(server::State::new(cfg, keys.clone(), producer, prometheus));
    tokio::spawn(auth::refresh_loop(keys, shutdown.clone()));
    tokio::spawn(partition_refresh(state.clone(), shutdown.clone()));
    let done = tokio::spawn(serve(listener, state.clone(), shutdown));
    Ok(Running { addr, state, done })
}

/// Runs until `shutdown`, then drains (see [`start`]).
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let running = start(cfg, shutdown).await?;
    let _ = running.done.await;
    Ok(())
}

async fn partition_refresh(state: Arc<server::State>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {
                if let Err(e) = state.producer.refresh_partitions(Duration::from_secs(5)).await {
                    tracing::warn!(error = %e, "partition refresh failed");
                }
            }
        }
    }
}

/// Accept loop with ordered shutdown: stop accepting → let in-flight requests finish (bounded
/// by the grace period) → flush the producer.
async fn serve(listener: TcpListener, state: Arc<server::State>, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            state.cfg.limits.header_read_timeout_ms,
        ))
        .keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        let svc = service_fn(move |req| server::handle(st.clone(), peer, req));
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_millis(state.cfg.shutdown_grace_ms);
    tracing::info!("ingest draining");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "connections still open after the grace period"
        );
    }
    let producer = state.producer.clone();
    producer.flush_slots(true);
    let flushed = tokio::task::spawn_blocking(move || producer.flush(grace)).await;
    match flushed {
        Ok(Ok(())) => tracing::info!("ingest stopped; producer flushed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete at shutdown"),
        Err(e) => tracing::warn!(error = %e, "producer flush task failed"),
    }
    if let Err(e) = state.keys.flush().await {
        tracing::warn!(error = %e, "monthly event counts not stored at shutdown");
    }
}
