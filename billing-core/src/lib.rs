//! billing-core: exact money and prices; a pure library (no I/O).
//!
//! - [`money`]: [`Money`] = `rust_decimal` amount + ISO 4217 [`Currency`]; arithmetic across
//!   currencies is an error; the one rounding rule of the project.
//! - [`price`]: the price models in DESIGN.md's (OpenMeter v1) JSON format, each with its
//!   formula, totals per period and incremental pricing of a delta.
//! - [`percentage`]: percentage of a value and graduated percentage (extensions of the format).
//! - [`proration`]: by the day or the second, and plan changes (credit + charge).
//! - [`invoice`]: discounts, taxes by region (inclusive or exclusive, rounded per line or per
//!   invoice), credit notes; lines and totals reconcile to the cent.
//!
//! Rounding happens only where [`money::round_line`] is called: once per invoice line total, to
//! the currency's minor unit, half away from zero, and at the documented points of [`invoice`]
//! (discount, tax). Unit prices and intermediate sums are never
//! rounded, so an invoice total (the sum of rounded line totals) always reconciles to the cent
//! with the lines it shows.

pub mod invoice;
pub mod lifecycle;
pub mod money;
pub mod percentage;
pub mod period;
pub mod price;
pub mod proration;

pub use money::{Currency, Money, MoneyError};
pub use price::{Price, PriceError, Tier, TierMode};
