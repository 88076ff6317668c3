//! Credit notes: documents that reduce what an issued (or paid) invoice asks for, numbered per
//! tenant without gaps. Amounts come from billing-core's [`credit_note`]: each invoice line can
//! be credited at most its total minus what earlier notes credited, and the tax part of a credit
//! is the line's tax share of it (rounded to the minor unit). An issued invoice whose credits
//! and payments cover its total is paid.
//!
//! `POST /api/v1/invoices/{id}/credit-notes` takes `{"reason": "…", "lines": [{"line": 2,
//! "amount": "5.00"}]}` (gross amounts per invoice line position) or `{"reason": "…", "full":
//! true}` (everything left to credit).

use crate::auth::Caller;
use crate::catalog::{dec, decimal, invoice_id, ts};
use crate::http::{body, ApiError, AppState};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use billing_core::invoice::{credit_note, InvoiceError, Line, Totals};
use billing_core::money::Currency;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use tokio_postgres::{GenericClient, Transaction};
use uuid::Uuid;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCreditNote {
    pub reason: Option<String>,
    /// Gross amounts to credit, per invoice line.
    pub lines: Option<Vec<CreditLine>>,
    /// Credit everything not yet credited.
    #[serde(default)]
    pub full: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditLine {
    /// The invoice line's `position`.
    pub line: i32,
    /// Gross amount (tax included), a decimal string.
    pub amount: String,
}

/// What an invoice asks for and what covers it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Balance {
    pub total: Decimal,
    /// Credited by credit notes (positive).
    pub credited: Decimal,
    /// Paid by succeeded payments.
    pub paid: Decimal,
    /// Held by pending payments.
    pub pending: Decimal,
}

impl Balance {
    /// What is left to collect, pending payments counted as collected.
    pub fn due(&self) -> Decimal {
        (self.total - self.credited - self.paid - self.pending).max(Decimal::ZERO)
    }
    /// Credits and succeeded payments cover the total.
    pub fn settled(&self) -> bool {
        self.credited + self.paid >= self.total
    }
}

pub async fn balance<C: GenericClient>(db: &C, invoice: Uuid) -> Result<Balance, ApiError> {
    let r = db
        .query_one(
            "SELECT i.total,
                    coalesce((SELECT -sum(total) FROM credit_notes WHERE invoice_id = i.id), 0),
                    coalesce((SELECT sum(amount) FROM payments
                               WHERE invoice_id = i.id AND status = 'succeeded'), 0),
                    coalesce((SELECT sum(amount) FROM payments
                               WHERE invoice_id = i.id AND status = 'pending'), 0)
               FROM invoices i WHERE i.id = $1",
            &[&invoice],
        )
        .await?;
    Ok(Balance {
        total: r.get(0),
        credited: r.get(1),
        paid: r.get(2),
        pending: r.get(3),
    })
}

/// Marks an issued invoice paid when its credits and payments cover it, and brings its
/// subscription back from past due. Returns whether it did.
pub async fn settle_if_covered(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<bool, ApiError> {
    let (status, sub): (String, Uuid) = {
        let r = tx
            .query_one(
                "SELECT status, subscription_id FROM invoices WHERE id = $1",
                &[&invoice],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    if status != "issued" || !balance(tx, invoice).await?.settled() {
        return Ok(false);
    }
    schemas::invoices::mark_paid(tx, tenant, invoice).await?;
    crate::subscriptions::payment_quietly(tx, tenant, sub, true, invoice).await?;
    Ok(true)
}

fn credit_error(e: InvoiceError) -> ApiError {
    let InvoiceError::Invalid { field, reason } = e;
    ApiError::invalid(format!("lines.{field}"), reason)
}

/// `POST /api/v1/invoices/{id}/credit-notes`.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    req: Result<Json<NewCreditNote>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body(req)?;
    let inv = invoice_id(&id)?;
    let reason = req
        .reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .ok_or_else(|| ApiError::invalid("reason", "is required"))?;
    if reason.len() > 500 {
        return Err(ApiError::invalid(
            "reason",
            "must be at most 500 characters",
        ));
    }
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT status, currency FROM invoices WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            &[&inv, &caller.tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    let (status, code): (String, String) = (row.get(0), row.get(1));
    if status != "issued" && status != "paid" {
        return Err(crate::catalog::state_conflict("credited", &status));
    }
    let currency = Currency::from_code(&code).map_err(ApiError::internal)?;
    let lines = tx
        .query(
            "SELECT position, description, amount, discount, tax, total FROM invoice_lines
              WHERE invoice_id = $1 ORDER BY position",
            &[&inv],
        )
        .await?;
    let positions: Vec<i32> = lines.iter().map(|l| l.get(0)).collect();
    let totals = Totals {
        currency,
        lines: lines
            .iter()
            .map(|l| {
                let (tax, gross): (Decimal, Decimal) = (l.get(4), l.get(5));
                Line {
                    description: l.get(1),
                    base: l.get(2),
                    discount: l.get(3),
                    net: gross - tax,
                    tax,
                    gross,
                    tax_region: None,
                }
            })
            .collect(),
        subtotal: Decimal::ZERO,
        discount: Decimal::ZERO,
        net: Decimal::ZERO,
        tax: Decimal::ZERO,
        total: Decimal::ZERO,
    };
    let credited: HashMap<i32, Decimal> = tx
        .query(
            "SELECT l.line_position, -sum(l.total) FROM credit_note_lines l
              WHERE l.invoice_id = $1 GROUP BY 1",
            &[&inv],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let already: Vec<Decimal> = positions
        .iter()
        .map(|p| credited.get(p).copied().unwrap_or_default())
        .collect();
    let mut wanted: Vec<(usize, Decimal)> = Vec::new();
    match (req.full, req.lines) {
        (true, None) => {
            for (i, l) in totals.lines.iter().enumerate() {
                let left = l.gross - already[i];
                if left > Decimal::ZERO {
                    wanted.push((i, left));
                }
            }
            if wanted.is_empty() {
                return Err(ApiError::conflict(
                    "nothing_to_credit",
                    "every line of the invoice is already credited",
                ));
            }
        }
        (false, Some(ls)) if !ls.is_empty() => {
            for (n, l) in ls.iter().enumerate() {
                let i = positions.iter().position(|p| *p == l.line).ok_or_else(|| {
                    ApiError::invalid(format!("lines[{n}].line"), "no such line on the invoice")
                })?;
                if wanted.iter().any(|(j, _)| *j == i) {
                    return Err(ApiError::invalid(
                        format!("lines[{n}].line"),
                        "names a line twice",
                    ));
                }
                let amount = decimal(&format!("lines[{n}].amount"), &l.amount)?;
                wanted.push((i, amount));
            }
        }
        _ => {
            return Err(ApiError::invalid(
                "lines",
                "give either `lines` (non-empty) or `full: true`",
            ))
        }
    }
    let note = credit_note(&totals, &already, &wanted).map_err(credit_error)?;
    let number: i64 = tx
        .query_one(
            "INSERT INTO credit_note_counters (tenant_id, last_number) VALUES ($1, 1)
             ON CONFLICT (tenant_id) DO UPDATE SET last_number = credit_note_counters.last_number + 1
             RETURNING last_number",
            &[&caller.tenant],
        )
        .await?
        .get(0);
    let cid: Uuid = tx
        .query_one(
            "INSERT INTO credit_notes (tenant_id, invoice_id, number, reason, currency, net, tax, total)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            &[
                &caller.tenant,
                &inv,
                &number,
                &reason,
                &code,
                &note.net,
                &note.tax,
                &note.total,
            ],
        )
        .await?
        .get(0);
    for (k, ((i, _), l)) in wanted.iter().zip(&note.lines).enumerate() {
        tx.execute(
            "INSERT INTO credit_note_lines (credit_note_id, position, invoice_id, line_position,
                    description, net, tax, total) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &cid,
                &(k as i32 + 1),
                &inv,
                &positions[*i],
                &l.description,
                &l.net,
                &l.tax,
                &l.gross,
            ],
        )
        .await?;
    }
    settle_if_covered(&tx, caller.tenant, inv).await?;
    tx.commit().await?;
    let db = st.pool.get().await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&**db, caller.tenant, cid).await?),
    ))
}

async fn view<C: GenericClient>(db: &C, tenant: Uuid, id: Uuid) -> Result<Value, ApiError> {
    let r = db
        .query_opt(
            "SELECT id, invoice_id, number, reason, currency, net, tax, total, created_at
               FROM credit_notes WHERE tenant_id = $1 AND id = $2",
            &[&tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("credit note"))?;
    let lines = db
        .query(
            "SELECT position, line_position, description, net, tax, total FROM credit_note_lines
              WHERE credit_note_id = $1 ORDER BY position",
            &[&id],
        )
        .await?;
    Ok(json!({
        "id": r.get::<_, Uuid>(0),
        "invoice": r.get::<_, Uuid>(1),
        "number": r.get::<_, i64>(2),
        "reason": r.get::<_, String>(3),
        "currency": r.get::<_, String>(4),
        "net": dec(r.get(5)),
        "tax": dec(r.get(6)),
        "total": dec(r.get(7)),
        "createdAt": ts(r.get(8)),
        "lines": lines.iter().map(|l| json!({
            "position": l.get::<_, i32>(0),
            "invoiceLine": l.get::<_, i32>(1),
            "description": l.get::<_, String>(2),
            "net": dec(l.get(3)),
            "tax": dec(l.get(4)),
            "total": dec(l.get(5)),
        })).collect::<Vec<_>>(),
    }))
}

/// `GET /api/v1/invoices/{id}/credit-notes`: the invoice's credit notes, oldest first.
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let inv = invoice_id(&id)?;
    let db = st.pool.get().await?;
    db.query_opt(
        "SELECT 1 FROM invoices WHERE id = $1 AND tenant_id = $2",
        &[&inv, &caller.tenant],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("invoice"))?;
    let ids: Vec<Uuid> = db
        .query(
            "SELECT id FROM credit_notes WHERE invoice_id = $1 ORDER BY number",
            &[&inv],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut items = Vec::with_capacity(ids.len());
    for id in ids {
        items.push(view(&**db, caller.tenant, id).await?);
    }
    let b = balance(&**db, inv).await?;
    Ok(Json(json!({
        "items": items,
        "credited": dec(b.credited),
        "due": dec(b.due()),
    })))
}

/// `GET /api/v1/credit-notes/{id}`.
pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found("credit note"))?;
    let db = st.pool.get().await?;
    Ok(Json(view(&**db, caller.tenant, id).await?))
}
