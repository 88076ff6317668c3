//! `aggregator` binary: `aggregator serve` runs the service; `aggregator config` prints the
//! effective configuration (database URL password redacted).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "aggregator",
    version,
    about = "Exactly-once windowed usage from Kafka into PostgreSQL"
)]
struct Cli {
    /// TOML configuration file (then AGGREGATOR_* environment variables override it).
    #[arg(long, env = "AGGREGATOR_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the aggregator (the default).
    Serve,
    /// Print the effective configuration as JSON.
    Config,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .init();
    let mut cfg = aggregator::Config::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => {
            cfg.database_url = schemas::redact_url(&cfg.database_url);
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            Ok(())
        }
        Command::Serve => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let s = shutdown.clone();
                tokio::spawn(async move {
                    wait_signal().await;
                    tracing::info!("stopping: flushing and releasing partitions");
                    s.cancel();
                    wait_signal().await;
                    tracing::warn!("second signal: exiting at once");
                    std::process::exit(130);
                });
                aggregator::run(cfg, shutdown).await
            })
        }
    }
}

async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
