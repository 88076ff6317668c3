//! Reconcile: every mismatch between a provider's records, our payments and refunds, and the
//! invoices they pay, for one tenant over a time range (payments and provider charges created
//! in it; invoices with a payment or a paid status in it).
//!
//! | kind | meaning |
//! |---|---|
//! | `charge_missing_in_ledger` | the provider holds a charge no payment of ours names |
//! | `payment_missing_at_provider` | a payment names a charge the provider does not hold |
//! | `amount_mismatch` | payment and charge amounts differ |
//! | `currency_mismatch` | payment and charge currencies differ |
//! | `status_mismatch` | payment and charge statuses differ |
//! | `metadata_mismatch` | the charge's metadata names another payment than the one holding it |
//! | `refund_missing_in_ledger` | the provider holds a refund we have no record of |
//! | `refund_missing_at_provider` | a succeeded refund of ours the provider does not hold |
//! | `refund_amount_mismatch` | refund amounts differ, or the payment's refunded total differs from the provider's |
//! | `invoice_paid_without_payment` | a paid invoice whose credits and succeeded payments do not cover it |
//! | `invoice_unpaid_but_covered` | an issued invoice whose credits and payments cover it |
//! | `invoice_overpaid` | succeeded payments exceed what the invoice asks after credits |
//! | `payment_currency_differs_from_invoice` | a payment in another currency than its invoice |
//!
//! Pending payments without a provider id (the provider was never reached, or answered after a
//! crash) are matched by the payment id in the charge's metadata.

use crate::payments::Providers;
use crate::provider::{Charge, Refund};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mismatch {
    pub kind: &'static str,
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invoice: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_ref: Option<String>,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub tenant: Uuid,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub payments: usize,
    pub provider_charges: usize,
    pub invoices: usize,
    pub mismatches: Vec<Mismatch>,
}

struct Ours {
    id: Uuid,
    invoice: Uuid,
    provider: String,
    pref: Option<String>,
    amount: Decimal,
    currency: String,
    status: String,
    refunded: Decimal,
}

fn m(
    kind: &'static str,
    provider: &str,
    payment: Option<Uuid>,
    invoice: Option<Uuid>,
    pref: Option<&str>,
    detail: String,
) -> Mismatch {
    Mismatch {
        kind,
        provider: provider.to_string(),
        payment,
        invoice,
        provider_ref: pref.map(str::to_string),
        detail,
    }
}

/// Compares everything of `tenant` in `[from, to)`.
pub async fn run(
    db: &tokio_postgres::Client,
    providers: &Providers,
    tenant: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Report> {
    let ours: Vec<Ours> = db
        .query(
            "SELECT id, invoice_id, provider, provider_ref, amount, currency, status, refunded
               FROM payments WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3
              ORDER BY created_at",
            &[&tenant, &from, &to],
        )
        .await?
        .iter()
        .map(|r| Ours {
            id: r.get(0),
            invoice: r.get(1),
            provider: r.get(2),
            pref: r.get(3),
            amount: r.get(4),
            currency: r.get(5),
            status: r.get(6),
            refunded: r.get(7),
        })
        .collect();
    let mut out = Vec::new();
    let mut charges_seen = 0;
    let mut names: Vec<&str> = vec!["sandbox"];
    if providers.stripe.is_some() {
        names.push("stripe");
    }
    for name in names {
        let provider = providers
            .get(name)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        // Charges a little outside the range can belong to payments inside it.
        let slack = chrono::Duration::hours(1);
        let theirs: Vec<(Charge, Vec<Refund>)> = provider
            .list(tenant, from - slack, to + slack)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        charges_seen += theirs.len();
        let by_ref: HashMap<&str, &(Charge, Vec<Refund>)> =
            theirs.iter().map(|t| (t.0.id.as_str(), t)).collect();
        let by_payment: HashMap<Uuid, &(Charge, Vec<Refund>)> = theirs
            .iter()
            .filter_map(|t| t.0.payment.map(|p| (p, t)))
            .collect();
        let mut matched: HashSet<&str> = HashSet::new();
        for p in ours.iter().filter(|p| p.provider == name) {
            let found = match &p.pref {
                Some(r) => by_ref.get(r.as_str()).copied(),
                None => by_payment.get(&p.id).copied(),
            };
            let Some((c, refunds)) = found else {
                if p.pref.is_some() || p.status != "failed" {
                    out.push(m(
                        "payment_missing_at_provider",
                        name,
                        Some(p.id),
                        Some(p.invoice),
                        p.pref.as_deref(),
                        format!(
                            "our {} payment of {} {} has no charge at the provider",
                            p.status, p.amount, p.currency
                        ),
                    ));
                }
                continue;
            };
            matched.insert(c.id.as_str());
            let here =
                |kind, detail| m(kind, name, Some(p.id), Some(p.invoice), Some(&c.id), detail);
            if c.amount != p.amount {
                out.push(here(
                    "amount_mismatch",
                    format!(
                        "we recorded {}, the provider charged {}",
                        p.amount, c.amount
                    ),
                ));
            }
            if !c.currency.eq_ignore_ascii_case(&p.currency) {
                out.push(here(
                    "currency_mismatch",
                    format!(
                        "we recorded {}, the provider charged {}",
                        p.currency, c.currency
                    ),
                ));
            }
            if c.status.as_str() != p.status {
                out.push(here(
                    "status_mismatch",
                    format!(
                        "ours is {}, the provider's is {}",
                        p.status,
                        c.status.as_str()
                    ),
                ));
            }
            if c.payment.is_some_and(|cp| cp != p.id) {
                out.push(here(
                    "metadata_mismatch",
                    format!(
                        "the charge's metadata names another payment ({:?})",
                        c.payment
                    ),
                ));
            }
            // Refunds of this payment, ours against theirs.
            let our_refunds = db
                .query(
                    "SELECT id, provider_ref, amount, status FROM refunds WHERE payment_id = $1",
                    &[&p.id],
                )
                .await?;
            let their_ids: HashMap<&str, &Refund> =
                refunds.iter().map(|f| (f.id.as_str(), f)).collect();
            let mut our_ids = HashSet::new();
            for r in &our_refunds {
                let (rid, rref, amount, status): (Uuid, Option<String>, Decimal, String) =
                    (r.get(0), r.get(1), r.get(2), r.get(3));
                if let Some(x) = &rref {
                    our_ids.insert(x.clone());
                }
                match rref.as_deref().and_then(|x| their_ids.get(x)) {
                    Some(f) if f.amount != amount => out.push(here(
                        "refund_amount_mismatch",
                        format!(
                            "refund {rid}: we recorded {amount}, the provider refunded {}",
                            f.amount
                        ),
                    )),
                    Some(_) => {}
                    None if status == "succeeded" => out.push(here(
                        "refund_missing_at_provider",
                        format!("refund {rid} of {amount} is not at the provider"),
                    )),
                    None => {}
                }
            }
            for f in refunds {
                if !our_ids.contains(&f.id) {
                    out.push(here(
                        "refund_missing_in_ledger",
                        format!(
                            "the provider refunded {} ({}) with no record of ours",
                            f.amount, f.id
                        ),
                    ));
                }
            }
            if c.refunded != p.refunded {
                out.push(here(
                    "refund_amount_mismatch",
                    format!(
                        "we recorded {} refunded, the provider {}",
                        p.refunded, c.refunded
                    ),
                ));
            }
        }
        for (c, _) in &theirs {
            if matched.contains(c.id.as_str()) {
                continue;
            }
            // A charge of one of our payments made outside the range is not judged here.
            let ours_outside = match c.payment {
                Some(pid) if ours.iter().all(|p| p.id != pid) => db
                    .query_opt(
                        "SELECT 1 FROM payments WHERE id = $1 AND (provider_ref = $2 OR provider_ref IS NULL)",
                        &[&pid, &c.id],
                    )
                    .await?
                    .is_some(),
                _ => false,
            };
            if !ours_outside {
                out.push(m(
                    "charge_missing_in_ledger",
                    name,
                    c.payment,
                    None,
                    Some(&c.id),
                    format!(
                        "the provider holds a {} charge of {} {} that no payment records",
                        c.status.as_str(),
                        c.amount,
                        c.currency
                    ),
                ));
            }
        }
    }
    // Invoices against their payments.
    let invoices = db
        .query(
            "SELECT i.id, i.status, i.total, i.currency,
                    coalesce((SELECT -sum(total) FROM credit_notes WHERE invoice_id = i.id), 0),
                    coalesce((SELECT sum(amount) FROM payments
                               WHERE invoice_id = i.id AND status = 'succeeded'), 0),
                    coalesce((SELECT sum(amount) FROM payments
                               WHERE invoice_id = i.id AND status = 'pending'), 0),
                    (SELECT array_agg(DISTINCT currency) FROM payments WHERE invoice_id = i.id)
               FROM invoices i
              WHERE i.tenant_id = $1 AND i.status IN ('issued', 'paid')
                AND (EXISTS (SELECT 1 FROM payments p WHERE p.invoice_id = i.id
                              AND p.created_at >= $2 AND p.created_at < $3)
                     OR (i.status = 'paid' AND i.updated_at >= $2 AND i.updated_at < $3))",
            &[&tenant, &from, &to],
        )
        .await?;
    for r in &invoices {
        let (id, status, total, currency): (Uuid, String, Decimal, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let (credited, paid, pending): (Decimal, Decimal, Decimal) = (r.get(4), r.get(5), r.get(6));
        let currencies: Option<Vec<String>> = r.get(7);
        let inv = |kind, detail| m(kind, "ledger", None, Some(id), None, detail);
        let asked = total - credited;
        if status == "paid" && paid < asked {
            out.push(inv(
                "invoice_paid_without_payment",
                format!("paid, but payments cover {paid} of {asked}"),
            ));
        }
        if status == "issued" && paid >= asked && pending.is_zero() {
            out.push(inv(
                "invoice_unpaid_but_covered",
                format!("issued, but payments of {paid} cover {asked}"),
            ));
        }
        if paid > asked {
            out.push(inv(
                "invoice_overpaid",
                format!("payments of {paid} exceed the {asked} asked"),
            ));
        }
        for c in currencies.unwrap_or_default() {
            if c != currency {
                out.push(inv(
                    "payment_currency_differs_from_invoice",
                    format!("a payment in {c} for an invoice in {currency}"),
                ));
            }
        }
    }
    Ok(Report {
        tenant,
        from,
        to,
        payments: ours.len(),
        provider_charges: charges_seen,
        invoices: invoices.len(),
        mismatches: out,
    })
}
