//! Rater: prices stored usage with billing-core and writes rated lines and invoices (issue #7).
//! Today: [`quote`], the price of a quantity, used by `rater quote`.

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
