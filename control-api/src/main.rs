//! `control-api` binary: operator CLI (`migrate`, …) and, with later issues, the HTTP server.

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "control-api",
    version,
    about = "Control plane and operator CLI of the metering pipeline"
)]
struct Cli {
    /// PostgreSQL URL of the project's database.
    #[arg(long, env = "DATABASE_URL", default_value = control_api::db::DEFAULT_DATABASE_URL, global = true)]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending SQL migrations (safe to run twice); prints the applied ones as JSON.
    Migrate,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate => {
            let mut client = control_api::db::connect(&cli.database_url).await?;
            let applied = schemas::migrate::run(&mut client)
                .await
                .context("failed to apply migrations")?;
            let out = serde_json::json!({
                "applied": applied.iter().map(|m| serde_json::json!({"version": m.version, "name": m.name})).collect::<Vec<_>>(),
                "known": schemas::migrate::known().len(),
            });
            println!("{out}");
        }
    }
    Ok(())
}
