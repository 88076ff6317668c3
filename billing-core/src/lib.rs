//! billing-core: exact money and prices; a pure library (no I/O).
//!
//! - [`money`]: [`Money`] = `rust_decimal` amount + ISO 4217 [`Currency`]; arithmetic across
//!   currencies is an error; the one rounding rule of the project.
//! - [`price`]: the price models in DESIGN.md's (OpenMeter v1) JSON format, each with its
//!   formula, totals per period and incremental pricing of a delta.
//!
//! Rounding happens only where [`money::round_line`] is called: once per invoice line total, to
//! the currency's minor unit, half away from zero. Unit prices and intermediate sums are never
//! rounded, so an invoice total (the sum of rounded line totals) always reconciles to the cent
//! with the lines it shows.

pub mod money;
pub mod price;

pub use money::{Currency, Money, MoneyError};
pub use price::{Price, PriceError, Tier, TierMode};
