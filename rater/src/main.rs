//! `rater` binary: billing-ops CLI. `quote` prices a quantity; rating jobs (`run`, `reconcile`,
//! `simulate`, `costs`) land with the rest of issue #7.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rust_decimal::Decimal;
use std::str::FromStr;

#[derive(Debug, Parser)]
#[command(
    name = "rater",
    version,
    about = "Rating jobs and price checks for billing operations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Price Q units (or the next Q after B already billed this period); prints {"amount": "…"}.
    Quote {
        /// A price object in DESIGN.md's format, e.g. '{"type":"unit","amount":"0.002"}'.
        #[arg(long)]
        price: String,
        /// Quantity to price (exact decimal).
        #[arg(long)]
        quantity: String,
        /// Quantity already billed in the period.
        #[arg(long)]
        already_billed: Option<String>,
    },
}

fn decimal(field: &str, s: &str) -> anyhow::Result<Decimal> {
    Decimal::from_str(s.trim()).with_context(|| format!("--{field} {s:?} is not a decimal number"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Quote {
            price,
            quantity,
            already_billed,
        } => {
            let q = decimal("quantity", &quantity)?;
            let b = already_billed
                .as_deref()
                .map(|b| decimal("already-billed", b))
                .transpose()?;
            let amount = rater::quote(&price, q, b).context("cannot price")?;
            println!(
                "{}",
                serde_json::json!({ "amount": amount.normalize().to_string() })
            );
            Ok(())
        }
    }
}
