//! Proration of a recurring amount for part of a period, for mid-period subscription changes.
//!
//! `prorated = amount × used / period`, unrounded (the invoice line rounds, once), where `used`
//! is the overlap of the used interval with the period and both are measured in
//! - [`Unit::Day`]: whole calendar days of the customer's billing calendar (dates, half-open:
//!   a period from 1 March to 1 April has 31 days; a change on 11 March leaves 21 days), or
//! - [`Unit::Second`]: seconds between instants.
//!
//! An upgrade or downgrade at `at` credits the unused part of the old amount and charges the
//! remaining part of the new one ([`change`]); both lines are shown on the invoice.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use crate::price::PriceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Day,
    Second,
}

/// An interval in one of the units: dates for days, instants for seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Days(NaiveDate, NaiveDate),
    Seconds(DateTime<Utc>, DateTime<Utc>),
}

impl Span {
    fn bounds(&self) -> (i64, i64) {
        match *self {
            Span::Days(a, b) => (
                a.signed_duration_since(NaiveDate::MIN).num_days(),
                b.signed_duration_since(NaiveDate::MIN).num_days(),
            ),
            Span::Seconds(a, b) => (a.timestamp(), b.timestamp()),
        }
    }
    pub fn unit(&self) -> Unit {
        match self {
            Span::Days(..) => Unit::Day,
            Span::Seconds(..) => Unit::Second,
        }
    }
}

/// `amount` for the part of `period` covered by `used` (both in the same unit).
pub fn prorate(amount: Decimal, period: Span, used: Span) -> Result<Decimal, PriceError> {
    if period.unit() != used.unit() {
        return Err(PriceError::Invalid {
            field: "used",
            reason: "must be measured in the period's unit".into(),
        });
    }
    let (ps, pe) = period.bounds();
    let (us, ue) = used.bounds();
    if pe <= ps {
        return Err(PriceError::Invalid {
            field: "period",
            reason: "must end after it starts".into(),
        });
    }
    let overlap = (ue.min(pe) - us.max(ps)).max(0);
    amount
        .checked_mul(Decimal::from(overlap))
        .ok_or(PriceError::Overflow)?
        .checked_div(Decimal::from(pe - ps))
        .ok_or(PriceError::Overflow)
}

/// A plan change inside `period` at the start of `rest` (the remainder of the period): the
/// credit (negative) for the old amount's unused part and the charge for the new amount's.
pub fn change(
    old: Decimal,
    new: Decimal,
    period: Span,
    rest: Span,
) -> Result<(Decimal, Decimal), PriceError> {
    Ok((-prorate(old, period, rest)?, prorate(new, period, rest)?))
}
