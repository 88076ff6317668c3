//! Rater: prices stored usage with billing-core and writes rated lines and invoices.
//!
//! - [`quote`]: the price of a quantity (`rater quote`).
//! - [`period`]: billing periods per customer (anchor day, time zone, DST-correct).
//! - [`usage`]: a tenant's rollups → Arrow record batches → DataFusion, per subscription span.
//! - [`run`]: the rating job (draft invoices, corrections, idempotence), issuing with gapless
//!   numbers, and reconciliation.
//! - [`show`]: invoices as text for billing ops.
//! - [`analysis`]: costs by group-by dimension, what-if under another plan, current spend.

pub mod analysis;
/// Billing periods live in billing-core (control-api needs them too).
pub use billing_core::period;
pub mod run;
pub mod show;
pub mod usage;

use billing_core::{Price, PriceError};
use rust_decimal::Decimal;

/// The price of `quantity` units, or of the next `quantity` after `already_billed` units
/// billed in the period; unrounded (rounding belongs to invoice lines).
pub fn quote(
    price_json: &str,
    quantity: Decimal,
    already_billed: Option<Decimal>,
) -> Result<Decimal, PriceError> {
    let price = Price::from_json(price_json)?;
    price.incremental(already_billed, quantity)
}

/// Connects to PostgreSQL (the connection runs on the current tokio runtime).
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", schemas::redact_url(url)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::error!(error = %e, "database connection failed");
        }
    });
    Ok(client)
}
