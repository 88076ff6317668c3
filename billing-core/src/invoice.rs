//! Invoice totals: discounts, taxes by region and credit notes, reconciled to the cent.
//!
//! Rounding points (the only ones, all with [`round_line`], half away from zero):
//! 1. each line's base (its priced amount, unrounded until here);
//! 2. the discount: a percentage of the subtotal, rounded once, then allocated to lines in
//!    proportion to their bases by the largest-remainder method, so the lines' discounts sum to
//!    it exactly; an amount discount is capped at the subtotal;
//! 3. taxes: per line ([`TaxRounding::Line`]) or once per tax rate over the invoice
//!    ([`TaxRounding::Invoice`]) and then allocated to its lines by largest remainder.
//!
//! A line is `net + tax = gross`; for tax-exclusive prices the discounted base is the net, for
//! tax-inclusive prices it is the gross and the tax is the part `rate / (100 + rate)` of it.
//! Invoice totals are sums of the displayed line figures, so they always reconcile.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{round_line, Currency};

/// A tax rate of a region, in percent; `inclusive` when prices already contain the tax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaxRate {
    pub region: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub rate: Decimal,
    pub inclusive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaxRounding {
    Line,
    Invoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Discount {
    /// Percent of the subtotal.
    Percentage {
        #[serde(with = "rust_decimal::serde::str")]
        rate: Decimal,
    },
    /// A fixed amount, at most the subtotal.
    Amount {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineInput {
    pub description: String,
    /// The priced amount, unrounded (may be negative: a correction or a proration credit).
    pub amount: Decimal,
    pub tax: Option<TaxRate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub description: String,
    pub base: Decimal,
    pub discount: Decimal,
    pub net: Decimal,
    pub tax: Decimal,
    pub gross: Decimal,
    pub tax_region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub currency: Currency,
    pub lines: Vec<Line>,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid<T>(field: &'static str, reason: &str) -> Result<T, InvoiceError> {
    Err(InvoiceError::Invalid {
        field,
        reason: reason.into(),
    })
}

/// Splits `total` (a multiple of the minor unit) over `weights` in proportion, each share a
/// multiple of the minor unit, the shares summing to `total` exactly (largest remainder).
pub fn allocate(total: Decimal, weights: &[Decimal], currency: Currency) -> Vec<Decimal> {
    let unit = Decimal::new(1, currency.minor_units());
    let sum: Decimal = weights.iter().copied().sum();
    if weights.is_empty() || sum.is_zero() {
        return vec![Decimal::ZERO; weights.len()];
    }
    let exact: Vec<Decimal> = weights.iter().map(|w| total * *w / sum).collect();
    let mut shares: Vec<Decimal> = exact.iter().map(|e| (e / unit).trunc() * unit).collect();
    let mut left = ((total - shares.iter().copied().sum::<Decimal>()) / unit).round();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    let sign = if left < Decimal::ZERO {
        -Decimal::ONE
    } else {
        Decimal::ONE
    };
    order.sort_by(|&a, &b| {
        let ra = (exact[a] - shares[a]) * sign;
        let rb = (exact[b] - shares[b]) * sign;
        rb.cmp(&ra).then(a.cmp(&b))
    });
    let mut i = 0;
    while !left.is_zero() && !order.is_empty() {
        shares[order[i % order.len()]] += unit * sign;
        left -= sign;
        i += 1;
    }
    shares
}

/// Computes an invoice's lines and totals.
pub fn compute(
    currency: Currency,
    inputs: &[LineInput],
    discount: Option<Discount>,
    rounding: TaxRounding,
) -> Result<Totals, InvoiceError> {
    let r = |d: Decimal| round_line(d, currency);
    let bases: Vec<Decimal> = inputs.iter().map(|l| r(l.amount)).collect();
    for l in inputs {
        if let Some(t) = &l.tax {
            if t.rate < Decimal::ZERO || t.rate > Decimal::ONE_HUNDRED {
                return invalid("tax.rate", "must be a percentage between 0 and 100");
            }
        }
    }
    let subtotal: Decimal = bases.iter().copied().sum();
    // Discounts apply to what is owed: positive lines only.
    let discountable: Vec<Decimal> = bases.iter().map(|b| (*b).max(Decimal::ZERO)).collect();
    let owed: Decimal = discountable.iter().copied().sum();
    let discount_total = match discount {
        None => Decimal::ZERO,
        Some(Discount::Percentage { rate }) => {
            if rate < Decimal::ZERO || rate > Decimal::ONE_HUNDRED {
                return invalid("discount.rate", "must be a percentage between 0 and 100");
            }
            r(owed * rate / Decimal::ONE_HUNDRED)
        }
        Some(Discount::Amount { amount }) => {
            if amount < Decimal::ZERO {
                return invalid("discount.amount", "must not be negative");
            }
            r(amount).min(owed)
        }
    };
    let discounts = allocate(discount_total, &discountable, currency);
    let discounted: Vec<Decimal> = bases.iter().zip(&discounts).map(|(b, d)| b - d).collect();

    // Unrounded tax per line, then rounded per line or per rate and allocated.
    let exact_tax: Vec<Decimal> = inputs
        .iter()
        .zip(&discounted)
        .map(|(l, b)| match &l.tax {
            None => Decimal::ZERO,
            Some(t) if t.inclusive => *b * t.rate / (Decimal::ONE_HUNDRED + t.rate),
            Some(t) => *b * t.rate / Decimal::ONE_HUNDRED,
        })
        .collect();
    let mut tax = vec![Decimal::ZERO; inputs.len()];
    match rounding {
        TaxRounding::Line => {
            for (t, e) in tax.iter_mut().zip(&exact_tax) {
                *t = r(*e);
            }
        }
        TaxRounding::Invoice => {
            let mut rates: Vec<(String, Decimal, bool)> = Vec::new();
            for l in inputs {
                if let Some(t) = &l.tax {
                    let k = (t.region.clone(), t.rate, t.inclusive);
                    if !rates.contains(&k) {
                        rates.push(k);
                    }
                }
            }
            for k in rates {
                let idx: Vec<usize> = (0..inputs.len())
                    .filter(|&i| {
                        inputs[i]
                            .tax
                            .as_ref()
                            .is_some_and(|t| (t.region.clone(), t.rate, t.inclusive) == k)
                    })
                    .collect();
                let total = r(idx.iter().map(|&i| exact_tax[i]).sum());
                let weights: Vec<Decimal> = idx.iter().map(|&i| exact_tax[i]).collect();
                for (&i, share) in idx.iter().zip(allocate(total, &weights, currency)) {
                    tax[i] = share;
                }
            }
        }
    }
    let lines: Vec<Line> = inputs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let inclusive = l.tax.as_ref().is_some_and(|t| t.inclusive);
            let (net, gross) = if inclusive {
                (discounted[i] - tax[i], discounted[i])
            } else {
                (discounted[i], discounted[i] + tax[i])
            };
            Line {
                description: l.description.clone(),
                base: bases[i],
                discount: discounts[i],
                net,
                tax: tax[i],
                gross,
                tax_region: l.tax.as_ref().map(|t| t.region.clone()),
            }
        })
        .collect();
    Ok(Totals {
        currency,
        subtotal,
        discount: lines.iter().map(|l| l.discount).sum(),
        net: lines.iter().map(|l| l.net).sum(),
        tax: lines.iter().map(|l| l.tax).sum(),
        total: lines.iter().map(|l| l.gross).sum(),
        lines,
    })
}

/// A credit note against an issued invoice: `credits` are (line index, gross amount to credit).
/// Each line can be credited at most its gross minus what earlier notes (`already`, per line)
/// credited. The tax part of a credit is the line's tax share of it, rounded; amounts are
/// returned negative (credits), with the same line shape as invoices.
pub fn credit_note(
    invoice: &Totals,
    already: &[Decimal],
    credits: &[(usize, Decimal)],
) -> Result<Totals, InvoiceError> {
    let r = |d: Decimal| round_line(d, invoice.currency);
    let mut lines = Vec::new();
    for &(i, amount) in credits {
        let Some(line) = invoice.lines.get(i) else {
            return invalid("line", "no such line on the invoice");
        };
        let amount = r(amount);
        let left = line.gross - already.get(i).copied().unwrap_or_default();
        if amount <= Decimal::ZERO || amount > left {
            return invalid(
                "amount",
                "must be positive and at most what is left to credit on the line",
            );
        }
        let tax = if line.gross.is_zero() {
            Decimal::ZERO
        } else {
            r(amount * line.tax / line.gross)
        };
        lines.push(Line {
            description: format!("Credit: {}", line.description),
            base: -amount,
            discount: Decimal::ZERO,
            net: -(amount - tax),
            tax: -tax,
            gross: -amount,
            tax_region: line.tax_region.clone(),
        });
    }
    Ok(Totals {
        currency: invoice.currency,
        subtotal: lines.iter().map(|l| l.base).sum(),
        discount: Decimal::ZERO,
        net: lines.iter().map(|l| l.net).sum(),
        tax: lines.iter().map(|l| l.tax).sum(),
        total: lines.iter().map(|l| l.gross).sum(),
        lines,
    })
}
