//! Invoices as text for billing ops and the quickstart: lines, tier breakdowns, tax, totals.

use rust_decimal::Decimal;
use serde_json::Value;
use std::fmt::Write;
use std::str::FromStr;
use uuid::Uuid;

use crate::period::YearMonth;

fn d(v: Decimal) -> String {
    v.normalize().to_string()
}

/// A money amount with the currency's minor units (2.50, not 2.5).
fn m(v: Decimal, minor: u32) -> String {
    format!("{:.*}", minor as usize, v)
}

/// A decimal string from a breakdown, without trailing zeros.
fn n(v: &Value) -> String {
    v.as_str()
        .and_then(|s| Decimal::from_str(s).ok())
        .map_or_else(|| "?".into(), d)
}

/// Renders the invoices of `period` (optionally one tenant's, one customer's) as text.
pub async fn invoices(
    db: &tokio_postgres::Client,
    period: YearMonth,
    tenant: Option<Uuid>,
    customer: Option<&str>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let invs = db
        .query(
            "SELECT i.id, c.key, c.name, i.status, i.number, i.period_start, i.period_end, i.currency,
                    i.subtotal, i.discount, i.tax, i.total, c.tax_region
               FROM invoices i JOIN customers c ON c.id = i.customer_id
              WHERE i.period = $1 AND ($2::uuid IS NULL OR i.tenant_id = $2)
                AND ($3::text IS NULL OR c.key = $3)
              ORDER BY i.tenant_id, c.key, i.period_start",
            &[&period.to_string(), &tenant, &customer],
        )
        .await?;
    for i in invs {
        let id: Uuid = i.get(0);
        let number = i
            .get::<_, Option<i64>>(4)
            .map_or_else(|| "(no number yet)".to_string(), |n| format!("#{n}"));
        let start: chrono::DateTime<chrono::Utc> = i.get(5);
        let end: chrono::DateTime<chrono::Utc> = i.get(6);
        let cur: String = i.get(7);
        let minor = billing_core::Currency::from_code(&cur)?.minor_units();
        writeln!(
            out,
            "Invoice {number}, {}, for {} ({}), period {period}: {} – {} UTC, {cur}",
            i.get::<_, String>(3),
            i.get::<_, String>(2),
            i.get::<_, String>(1),
            start.format("%Y-%m-%d %H:%M"),
            end.format("%Y-%m-%d %H:%M"),
        )?;
        writeln!(
            out,
            "  {:<2} {:<44} {:>16} {:>12} {:>11} {:>9} {:>11}",
            "#", "line", "quantity", "unit price", "amount", "tax", "total"
        )?;
        let lines = db
            .query(
                "SELECT position, kind, description, quantity, previous_quantity, unit_price, tiers,
                        amount, tax, total
                   FROM invoice_lines WHERE invoice_id = $1 ORDER BY position",
                &[&id],
            )
            .await?;
        for l in lines {
            let qty = match l.get::<_, Option<Decimal>>(4) {
                Some(p) => format!("{} (was {})", d(l.get(3)), d(p)),
                None => d(l.get(3)),
            };
            writeln!(
                out,
                "  {:<2} {:<44} {:>16} {:>12} {:>11} {:>9} {:>11}",
                l.get::<_, i32>(0),
                l.get::<_, String>(2).chars().take(44).collect::<String>(),
                qty,
                l.get::<_, Option<Decimal>>(5).map(d).unwrap_or_default(),
                m(l.get(7), minor),
                m(l.get(8), minor),
                m(l.get(9), minor),
            )?;
            let tiers: Value = l.get(6);
            for t in tiers["tiers"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "       tier {}: {} × {}{} = {}",
                    t["tier"].as_u64().unwrap_or_default() + 1,
                    n(&t["quantity"]),
                    n(&t["unitPrice"]),
                    match n(&t["flatPrice"]).as_str() {
                        "0" | "?" => String::new(),
                        f => format!(" + {f} flat"),
                    },
                    n(&t["total"]),
                )?;
            }
            for (k, label) in [
                ("minimumTrueUp", "minimum true-up"),
                ("maximumReduction", "cap"),
            ] {
                if let Some(v) = tiers[k].as_str().filter(|v| *v != "0") {
                    writeln!(out, "       {label}: {}", n(&Value::from(v)))?;
                }
            }
        }
        writeln!(
            out,
            "  subtotal {}  discount {}  tax {}{}  total {} {cur}\n",
            m(i.get(8), minor),
            m(i.get(9), minor),
            m(i.get(10), minor),
            i.get::<_, Option<String>>(12)
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            m(i.get(11), minor),
        )?;
    }
    Ok(out)
}
