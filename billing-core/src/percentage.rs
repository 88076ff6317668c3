//! Percentage models, extending DESIGN.md's price format in OpenMeter's style (rates are
//! percentages as decimal strings: `"2.9"` is 2.9 %).
//!
//! **Percentage of a value** — `{"type":"percentage","rate":"2.9","fixedAmount":"0.30",
//! "freeEvents":3,"freeAmount":"500","perTransactionMinAmount":"0.50",
//! "perTransactionMaxAmount":"10"}` — priced per transaction `v_i` of the period, in order:
//!
//! ```text
//! rated_i = the part of v_i beyond the period's first `freeAmount` of cumulative value
//! fee_i   = rated_i × rate / 100  +  (fixedAmount unless i ≤ freeEvents)
//! fee_i   = clamp(fee_i, perTransactionMinAmount, perTransactionMaxAmount)   when fee_i > 0
//! total   = Σ fee_i          (a transaction that owes nothing stays free: no minimum applies)
//! ```
//!
//! **Graduated percentage** — `{"type":"graduatedPercentage","tiers":[{"upToAmount":"1000",
//! "rate":"1","flatAmount":"200"},{"rate":"2"}]}` — on the period's cumulative value `q`:
//! `Σ_tiers (value of q inside the tier × rate / 100 + flatAmount if q enters the tier)`, tier
//! bounds as in [`crate::price`] (inclusive upper bound on the exact value).
//!
//! Both are incremental: the fee of the next transactions depends only on what came before
//! (count and cumulative value), so pricing a period in pieces gives the one-shot total exactly.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::price::PriceError;

const HUNDRED: Decimal = Decimal::ONE_HUNDRED;

fn invalid<T>(field: &'static str, reason: &str) -> Result<T, PriceError> {
    Err(PriceError::Invalid {
        field,
        reason: reason.to_string(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percentage {
    #[serde(with = "rust_decimal::serde::str")]
    pub rate: Decimal,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub fixed_amount: Option<Decimal>,
    #[serde(default)]
    pub free_events: u64,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub free_amount: Option<Decimal>,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_transaction_min_amount: Option<Decimal>,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_transaction_max_amount: Option<Decimal>,
}

/// What came before in the period: transactions priced and their cumulative value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    pub transactions: u64,
    pub value: Decimal,
}

impl Percentage {
    pub fn validate(&self) -> Result<(), PriceError> {
        if self.rate < Decimal::ZERO || self.rate > HUNDRED {
            return invalid("rate", "must be a percentage between 0 and 100");
        }
        for (field, v) in [
            ("fixedAmount", self.fixed_amount),
            ("freeAmount", self.free_amount),
            ("perTransactionMinAmount", self.per_transaction_min_amount),
            ("perTransactionMaxAmount", self.per_transaction_max_amount),
        ] {
            if v.is_some_and(|v| v < Decimal::ZERO) {
                return invalid(field, "must not be negative");
            }
        }
        if let (Some(lo), Some(hi)) = (
            self.per_transaction_min_amount,
            self.per_transaction_max_amount,
        ) {
            if lo > hi {
                return invalid(
                    "perTransactionMinAmount",
                    "must not exceed perTransactionMaxAmount",
                );
            }
        }
        Ok(())
    }

    /// The fees of `transactions` (values, in order) after `before`; returns the total and what
    /// has been seen after them. Unrounded.
    pub fn charge(
        &self,
        before: Seen,
        transactions: &[Decimal],
    ) -> Result<(Decimal, Seen), PriceError> {
        self.validate()?;
        let free = self.free_amount.unwrap_or_default();
        let mut seen = before;
        let mut total = Decimal::ZERO;
        for &v in transactions {
            if v < Decimal::ZERO {
                return Err(PriceError::NegativeQuantity(v));
            }
            let after = seen.value.checked_add(v).ok_or(PriceError::Overflow)?;
            // The part of this transaction beyond the free amount.
            let rated = (after - free.max(seen.value)).max(Decimal::ZERO).min(v);
            seen.transactions += 1;
            seen.value = after;
            let mut fee = rated.checked_mul(self.rate).ok_or(PriceError::Overflow)? / HUNDRED;
            if seen.transactions > self.free_events {
                fee += self.fixed_amount.unwrap_or_default();
            }
            if fee > Decimal::ZERO {
                if let Some(lo) = self.per_transaction_min_amount {
                    fee = fee.max(lo);
                }
                if let Some(hi) = self.per_transaction_max_amount {
                    fee = fee.min(hi);
                }
            }
            total = total.checked_add(fee).ok_or(PriceError::Overflow)?;
        }
        Ok((total, seen))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PercentageTier {
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub up_to_amount: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub rate: Decimal,
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub flat_amount: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GraduatedPercentage {
    pub tiers: Vec<PercentageTier>,
}

impl GraduatedPercentage {
    pub fn validate(&self) -> Result<(), PriceError> {
        let Some(last) = self.tiers.last() else {
            return invalid("tiers", "must not be empty");
        };
        if last.up_to_amount.is_some() {
            return invalid("tiers", "the last tier must have no upToAmount");
        }
        let mut prev = Decimal::ZERO;
        for (i, t) in self.tiers.iter().enumerate() {
            if t.rate < Decimal::ZERO || t.rate > HUNDRED {
                return invalid("tiers.rate", "must be a percentage between 0 and 100");
            }
            if t.flat_amount.is_some_and(|f| f < Decimal::ZERO) {
                return invalid("tiers.flatAmount", "must not be negative");
            }
            if let Some(up) = t.up_to_amount {
                if up <= prev && i > 0 || up <= Decimal::ZERO {
                    return invalid("tiers.upToAmount", "must increase and be positive");
                }
                prev = up;
            } else if i + 1 != self.tiers.len() {
                return invalid("tiers.upToAmount", "only the last tier may have none");
            }
        }
        Ok(())
    }

    /// The period total for a cumulative value `q`. Unrounded.
    pub fn total(&self, q: Decimal) -> Result<Decimal, PriceError> {
        self.validate()?;
        if q < Decimal::ZERO {
            return Err(PriceError::NegativeQuantity(q));
        }
        let mut total = Decimal::ZERO;
        let mut lower = Decimal::ZERO;
        for t in &self.tiers {
            let upper = t.up_to_amount.map_or(q, |u| u.min(q));
            let inside = upper - lower;
            if inside > Decimal::ZERO {
                total += inside.checked_mul(t.rate).ok_or(PriceError::Overflow)? / HUNDRED;
                total += t.flat_amount.unwrap_or_default();
            }
            match t.up_to_amount {
                Some(u) if u < q => lower = u,
                _ => break,
            }
        }
        Ok(total)
    }

    /// The next `q` of value after `already` in the period.
    pub fn incremental(&self, already: Decimal, q: Decimal) -> Result<Decimal, PriceError> {
        Ok(self.total(already + q)? - self.total(already)?)
    }
}
