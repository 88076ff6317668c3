//! Prices in DESIGN.md's format (OpenMeter v1 price objects, amounts as decimal strings), with
//! this project's extension `freeQuantity` (a free allowance) on every usage price.
//!
//! Every model is a function `total(q)` of the period's cumulative quantity `q` (an exact
//! decimal), computed without rounding:
//!
//! | model | formula |
//! |---|---|
//! | `flat` | `amount`, whatever the quantity |
//! | `unit` | `amount × q'` |
//! | `tiered`, `graduated` | `Σ_tiers (units of q' inside the tier × unitPrice + flatPrice if q' enters the tier)` |
//! | `tiered`, `volume` | `q' × unitPrice(T) + flatPrice(T)`, `T` = the tier `q'` reaches |
//! | `package` | `amount × ⌈q' / quantityPerPackage⌉` |
//! | `dynamic` | `q' × multiplier` (q is a cost, e.g. an upstream model's price) |
//!
//! where `q' = max(0, q − freeQuantity)` (free units come first). Then the period total is
//! clamped: at least `minimumAmount` (a commitment: the difference is a true-up), at most
//! `maximumAmount` (a cap).
//!
//! Tier bounds: `upToAmount` is the inclusive upper bound of a tier on the exact quantity, and
//! the tier's lower bound is the previous tier's `upToAmount` (exclusive); the last tier has no
//! bound. A fractional quantity belongs to the first tier whose bound it does not exceed
//! (tiers up to 5 and up to 10: 5 is in the first, 5.5 in the second). A quantity of zero enters
//! no tier and costs nothing under tiered prices (use `minimumAmount` for a commitment).
//!
//! Incremental pricing ([`Price::incremental`]) prices the next `q` units after `b` already
//! billed in the period as `total(b + q) − total(b)`: a sum of increments telescopes to the
//! one-shot total, exactly. Under volume tiers or a minimum commitment an increment can be
//! negative (more usage reached a cheaper tier): a credit, by design.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Why a price is invalid or cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("invalid price: {field} {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("quantity {0} is negative")]
    NegativeQuantity(Decimal),
    #[error("amount out of range")]
    Overflow,
}

fn invalid<T>(field: &'static str, reason: impl Into<String>) -> Result<T, PriceError> {
    Err(PriceError::Invalid {
        field,
        reason: reason.into(),
    })
}

/// How tiers apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierMode {
    Graduated,
    Volume,
}

/// `{"type":"flat","amount":"…"}` inside a tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TierFlat {
    Flat {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
}

/// `{"type":"unit","amount":"…"}` inside a tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TierUnit {
    Unit {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tier {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub up_to_amount: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_price: Option<TierFlat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<TierUnit>,
}

impl Tier {
    fn flat(&self) -> Decimal {
        match &self.flat_price {
            Some(TierFlat::Flat { amount }) => *amount,
            None => Decimal::ZERO,
        }
    }
    fn unit(&self) -> Decimal {
        match &self.unit_price {
            Some(TierUnit::Unit { amount }) => *amount,
            None => Decimal::ZERO,
        }
    }
}

/// The price model (the `type` of a price object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Model {
    Flat {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
    Unit {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
    Tiered {
        mode: TierMode,
        tiers: Vec<Tier>,
    },
    #[serde(rename_all = "camelCase")]
    Package {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        quantity_per_package: Decimal,
    },
    Dynamic {
        #[serde(with = "rust_decimal::serde::str")]
        multiplier: Decimal,
    },
}

/// A price object: a model plus the optional period minimum, maximum and free allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Price {
    #[serde(flatten)]
    pub model: Model,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub minimum_amount: Option<Decimal>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub maximum_amount: Option<Decimal>,
    /// Extension: units free each period before the model applies.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub free_quantity: Option<Decimal>,
}

/// One tier's share of a tiered total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TierLine {
    /// 0-based index of the tier in the price.
    pub tier: usize,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub flat_price: Decimal,
    pub total: Decimal,
}

/// A period total and how it was reached (for invoice lines), unrounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Breakdown {
    /// Quantity after the free allowance.
    pub billable_quantity: Decimal,
    /// The model's amount before minimum and maximum.
    pub usage_amount: Decimal,
    pub tiers: Vec<TierLine>,
    /// Added to reach `minimumAmount` (a true-up line), else zero.
    pub minimum_true_up: Decimal,
    /// Removed by `maximumAmount` (the cap), else zero.
    pub maximum_reduction: Decimal,
    pub total: Decimal,
}

fn add(a: Decimal, b: Decimal) -> Result<Decimal, PriceError> {
    a.checked_add(b).ok_or(PriceError::Overflow)
}
fn sub(a: Decimal, b: Decimal) -> Result<Decimal, PriceError> {
    a.checked_sub(b).ok_or(PriceError::Overflow)
}
fn mul(a: Decimal, b: Decimal) -> Result<Decimal, PriceError> {
    a.checked_mul(b).ok_or(PriceError::Overflow)
}

impl Price {
    /// Parses and validates a price object.
    pub fn from_json(json: &str) -> Result<Price, PriceError> {
        let p: Price = serde_json::from_str(json).map_err(|e| PriceError::Invalid {
            field: "price",
            reason: format!("is not a valid price object: {e}"),
        })?;
        p.validate()?;
        Ok(p)
    }

    /// Checks the rules every price must follow.
    pub fn validate(&self) -> Result<(), PriceError> {
        let nonneg = |field, v: Decimal| {
            if v.is_sign_negative() && !v.is_zero() {
                invalid(field, format!("must not be negative, got {v}"))
            } else {
                Ok(())
            }
        };
        match &self.model {
            Model::Flat { amount } | Model::Unit { amount } => nonneg("amount", *amount)?,
            Model::Dynamic { multiplier } => nonneg("multiplier", *multiplier)?,
            Model::Package {
                amount,
                quantity_per_package,
            } => {
                nonneg("amount", *amount)?;
                if *quantity_per_package <= Decimal::ZERO {
                    return invalid("quantityPerPackage", "must be positive");
                }
            }
            Model::Tiered { tiers, .. } => {
                if tiers.is_empty() {
                    return invalid("tiers", "must not be empty");
                }
                let mut prev: Option<Decimal> = None;
                for (i, t) in tiers.iter().enumerate() {
                    let last = i + 1 == tiers.len();
                    match (t.up_to_amount, last) {
                        (Some(_), true) => {
                            return invalid("tiers", "the last tier must have no upToAmount")
                        }
                        (None, false) => {
                            return invalid(
                                "tiers",
                                format!(
                                    "tier {i} needs an upToAmount (only the last tier has none)"
                                ),
                            )
                        }
                        (Some(up), false) => {
                            if up <= Decimal::ZERO || prev.is_some_and(|p| up <= p) {
                                return invalid("tiers", format!("upToAmount of tier {i} must be positive and above the previous tier's"));
                            }
                            prev = Some(up);
                        }
                        (None, true) => {}
                    }
                    if t.flat_price.is_none() && t.unit_price.is_none() {
                        return invalid(
                            "tiers",
                            format!("tier {i} needs a flatPrice or a unitPrice"),
                        );
                    }
                    nonneg("tiers.flatPrice", t.flat())?;
                    nonneg("tiers.unitPrice", t.unit())?;
                }
            }
        }
        if let Some(m) = self.minimum_amount {
            nonneg("minimumAmount", m)?;
        }
        if let Some(m) = self.maximum_amount {
            nonneg("maximumAmount", m)?;
        }
        if let (Some(lo), Some(hi)) = (self.minimum_amount, self.maximum_amount) {
            if lo > hi {
                return invalid("minimumAmount", "must not exceed maximumAmount");
            }
        }
        if let Some(f) = self.free_quantity {
            nonneg("freeQuantity", f)?;
        }
        Ok(())
    }

    /// The period total for cumulative quantity `q`, unrounded.
    pub fn total(&self, q: Decimal) -> Result<Decimal, PriceError> {
        Ok(self.breakdown(q)?.total)
    }

    /// The price of the next `q` units after `already` units billed in the period (`None`:
    /// nothing billed yet this period). See the module doc.
    pub fn incremental(&self, already: Option<Decimal>, q: Decimal) -> Result<Decimal, PriceError> {
        match already {
            None => self.total(q),
            Some(b) => sub(self.total(add(b, q)?)?, self.total(b)?),
        }
    }

    /// The period total for `q` with its parts.
    pub fn breakdown(&self, q: Decimal) -> Result<Breakdown, PriceError> {
        if q.is_sign_negative() && !q.is_zero() {
            return Err(PriceError::NegativeQuantity(q));
        }
        let free = self.free_quantity.unwrap_or(Decimal::ZERO);
        let billable = if q > free {
            sub(q, free)?
        } else {
            Decimal::ZERO
        };
        let mut tiers = Vec::new();
        let usage = match &self.model {
            Model::Flat { amount } => *amount,
            Model::Unit { amount } => mul(*amount, billable)?,
            Model::Dynamic { multiplier } => mul(*multiplier, billable)?,
            Model::Package {
                amount,
                quantity_per_package,
            } => {
                let packs = billable
                    .checked_div(*quantity_per_package)
                    .ok_or(PriceError::Overflow)?
                    .ceil();
                mul(*amount, packs)?
            }
            Model::Tiered {
                mode: TierMode::Graduated,
                tiers: ts,
            } => {
                let mut total = Decimal::ZERO;
                let mut lower = Decimal::ZERO;
                for (i, t) in ts.iter().enumerate() {
                    if billable <= lower {
                        break;
                    }
                    let upper = t.up_to_amount.map_or(billable, |u| u.min(billable));
                    let units = sub(upper, lower)?;
                    let line = add(mul(units, t.unit())?, t.flat())?;
                    tiers.push(TierLine {
                        tier: i,
                        quantity: units,
                        unit_price: t.unit(),
                        flat_price: t.flat(),
                        total: line,
                    });
                    total = add(total, line)?;
                    lower = t.up_to_amount.unwrap_or(billable);
                }
                total
            }
            Model::Tiered {
                mode: TierMode::Volume,
                tiers: ts,
            } => {
                if billable.is_zero() {
                    Decimal::ZERO
                } else {
                    let (i, t) = ts
                        .iter()
                        .enumerate()
                        .find(|(_, t)| t.up_to_amount.is_none_or(|u| billable <= u))
                        .ok_or_else(|| PriceError::Invalid {
                            field: "tiers",
                            reason: "the last tier must have no upToAmount".into(),
                        })?;
                    let line = add(mul(billable, t.unit())?, t.flat())?;
                    tiers.push(TierLine {
                        tier: i,
                        quantity: billable,
                        unit_price: t.unit(),
                        flat_price: t.flat(),
                        total: line,
                    });
                    line
                }
            }
        };
        let mut total = usage;
        let mut minimum_true_up = Decimal::ZERO;
        let mut maximum_reduction = Decimal::ZERO;
        if let Some(min) = self.minimum_amount {
            if total < min {
                minimum_true_up = sub(min, total)?;
                total = min;
            }
        }
        if let Some(max) = self.maximum_amount {
            if total > max {
                maximum_reduction = sub(total, max)?;
                total = max;
            }
        }
        Ok(Breakdown {
            billable_quantity: billable,
            usage_amount: usage,
            tiers,
            minimum_true_up,
            maximum_reduction,
            total,
        })
    }
}
