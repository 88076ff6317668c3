//! `ingest` binary: parses arguments, sets up logging, runs [`ingest::run`]. SIGTERM or Ctrl-C
//! drains (stop intake, finish in-flight requests, flush the producer); a second signal exits at
//! once.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "ingest",
    version,
    about = "Ingest edge of the metering pipeline"
)]
struct Cli {
    /// TOML configuration file (defaults, then this file, then INGEST_* variables).
    #[arg(long, env = "INGEST_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Print the effective configuration (secrets redacted) and exit.
    Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let mut cfg =
        ingest::Config::load(cli.config.as_deref()).context("failed to load the configuration")?;
    // The stack's port variable, when set, names the listen port.
    if let Some(port) = std::env::var("INGEST_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        cfg.listen.set_port(port);
    }
    // The stack's shared variables apply unless the INGEST_ ones say otherwise.
    if let (Ok(url), Err(_)) = (
        std::env::var("DATABASE_URL"),
        std::env::var("INGEST_DATABASE_URL"),
    ) {
        cfg.database_url = url;
    }
    if let (Ok(b), Err(_)) = (
        std::env::var("KAFKA_BROKERS"),
        std::env::var("INGEST_KAFKA__BROKERS"),
    ) {
        cfg.kafka.brokers = b;
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => {
            let mut shown = cfg.clone();
            shown.database_url = schemas::redact_url(&shown.database_url);
            println!("{}", toml_like(&shown)?);
            Ok(())
        }
        Command::Serve => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                wait_signal().await;
                tracing::info!("shutdown requested; draining (signal again to exit at once)");
                token.cancel();
                wait_signal().await;
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            });
            ingest::run(cfg, shutdown)
                .await
                .context("ingest failed to start")?;
            Ok(())
        }
    }
}

fn toml_like(cfg: &ingest::Config) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(cfg)?)
}

async fn wait_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("cannot install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
