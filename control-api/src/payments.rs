//! Payments and refunds of invoices through a [`PaymentProvider`].
//!
//! - `POST /api/v1/invoices/{id}/payments` `{"provider"?, "card"? | "paymentMethod"?, "amount"?}`
//!   charges an issued invoice (by default what is left to collect). The payment row is written
//!   `pending` before the provider is called (its id is the provider's idempotency key), then
//!   updated with the provider's answer: succeeded → once credits and payments cover the
//!   invoice it is paid and a past-due subscription is active again; failed → the subscription
//!   goes past due (grace period); pending (delayed confirmation) → settled later by
//!   `POST /api/v1/payments/{id}/refresh`, the provider's webhook, or the background worker.
//! - `POST /api/v1/payments/{id}/refunds` `{"amount"?, "reason"?}`: full (default) or partial
//!   refunds of a succeeded payment, never more than what is left of it.
//! - `mark-paid` records a `manual` payment (a bank transfer), so reconcile sees every paid
//!   invoice's money.
//!
//! A declined card is not an error of the request: the answer is 201 with the payment `failed`
//! and its `failureCode`.

use crate::auth::Caller;
use crate::catalog::{dec, decimal, invoice_id, ts};
use crate::credit_notes::{balance, settle_if_covered};
use crate::crypto::ServerKey;
use crate::http::{optional_body, ApiError, AppState};
use crate::provider::{Charge, ChargeRequest, PaymentProvider, ProviderError, ProviderStatus};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio_postgres::{GenericClient, Transaction};
use uuid::Uuid;

/// The configured providers.
#[derive(Debug, Clone)]
pub struct Providers {
    pub sandbox: Arc<dyn PaymentProvider>,
    pub stripe: Option<Arc<dyn PaymentProvider>>,
    /// The provider used when a payment names none.
    pub default: &'static str,
}

impl Providers {
    pub fn get(&self, name: &str) -> Result<Arc<dyn PaymentProvider>, ApiError> {
        match name {
            "sandbox" => Ok(self.sandbox.clone()),
            "stripe" => self.stripe.clone().ok_or_else(|| {
                ApiError::invalid("provider", "stripe is not configured on this server")
            }),
            _ => Err(ApiError::invalid("provider", "must be sandbox or stripe")),
        }
    }
}

fn provider_error(e: ProviderError) -> ApiError {
    match e {
        ProviderError::Refused(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "provider_refused", m)
        }
        ProviderError::Unavailable(m) => {
            tracing::warn!(error = %m, "payment provider unavailable");
            ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "provider_unavailable",
                    "the payment provider could not be reached; the payment stays pending and is settled later",
                )
            }
        }
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewPayment {
    /// `sandbox` or `stripe` (default: the server's default provider).
    pub provider: Option<String>,
    /// A card number (sandbox test cards).
    pub card: Option<String>,
    /// A provider payment method id (Stripe `pm_…`).
    pub payment_method: Option<String>,
    /// Decimal string; default: what is left to collect.
    pub amount: Option<String>,
}

const PAYMENT_COLUMNS: &str = "p.id, p.invoice_id, p.provider, p.provider_ref, p.amount,
    p.currency, p.status, p.failure_code, p.refunded, p.created_at, p.updated_at";

fn payment_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "invoice": r.get::<_, Uuid>(1),
        "provider": r.get::<_, String>(2),
        "providerRef": r.get::<_, Option<String>>(3),
        "amount": dec(r.get(4)),
        "currency": r.get::<_, String>(5),
        "status": r.get::<_, String>(6),
        "failureCode": r.get::<_, Option<String>>(7),
        "refunded": dec(r.get(8)),
        "createdAt": ts(r.get(9)),
        "updatedAt": ts(r.get(10)),
    })
}

async fn payment_json<C: GenericClient>(db: &C, tenant: Uuid, id: Uuid) -> Result<Value, ApiError> {
    let r = db
        .query_opt(
            &format!(
                "SELECT {PAYMENT_COLUMNS} FROM payments p WHERE p.tenant_id = $1 AND p.id = $2"
            ),
            &[&tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("payment"))?;
    let mut v = payment_view(&r);
    let st = db
        .query_one(
            "SELECT i.status, s.status FROM invoices i JOIN subscriptions s ON s.id = i.subscription_id
              WHERE i.id = $1",
            &[&r.get::<_, Uuid>(1)],
        )
        .await?;
    v["invoiceStatus"] = json!(st.get::<_, String>(0));
    v["subscriptionStatus"] = json!(st.get::<_, String>(1));
    let refunds = db
        .query(
            "SELECT id, amount, status, reason, provider_ref, created_at FROM refunds
              WHERE payment_id = $1 ORDER BY created_at",
            &[&id],
        )
        .await?;
    v["refunds"] = refunds
        .iter()
        .map(|f| {
            json!({
                "id": f.get::<_, Uuid>(0),
                "amount": dec(f.get(1)),
                "status": f.get::<_, String>(2),
                "reason": f.get::<_, String>(3),
                "providerRef": f.get::<_, Option<String>>(4),
                "createdAt": ts(f.get(5)),
            })
        })
        .collect();
    Ok(v)
}

fn payment_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("payment"))
}

/// Records the provider's answer for payment `id` and what follows from it, in one
/// transaction. Idempotent: an answer that changes nothing does nothing.
pub async fn apply(
    tx: &Transaction<'_>,
    key: &ServerKey,
    tenant: Uuid,
    id: Uuid,
    charge: &Charge,
) -> Result<(), ApiError> {
    let r = tx
        .query_one(
            "SELECT status, invoice_id, amount, currency FROM payments WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    let (before, invoice): (String, Uuid) = (r.get(0), r.get(1));
    let (amount, currency): (Decimal, String) = (r.get(2), r.get(3));
    tx.execute(
        "UPDATE payments SET provider_ref = $2, status = $3, failure_code = $4, updated_at = now()
          WHERE id = $1",
        &[
            &id,
            &charge.id,
            &charge.status.as_str(),
            &charge.failure_code,
        ],
    )
    .await?;
    if before != "pending" || charge.status == ProviderStatus::Pending {
        return Ok(());
    }
    let sub: Uuid = tx
        .query_one(
            "SELECT subscription_id FROM invoices WHERE id = $1",
            &[&invoice],
        )
        .await?
        .get(0);
    match charge.status {
        ProviderStatus::Succeeded => {
            settle_if_covered(tx, tenant, invoice).await?;
        }
        ProviderStatus::Failed => {
            crate::subscriptions::payment_quietly(tx, tenant, sub, false, invoice).await?;
            let code = charge.failure_code.as_deref();
            let p = (id, amount, currency.as_str(), code);
            crate::notify::payment_failed(tx, key, tenant, invoice, p).await?;
        }
        ProviderStatus::Pending => {}
    }
    Ok(())
}

/// `POST /api/v1/invoices/{id}/payments`.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: NewPayment = optional_body(&raw)?;
    let inv = invoice_id(&id)?;
    let name = req.provider.as_deref().unwrap_or(st.providers.default);
    let provider = st.providers.get(name)?;
    let method = match (req.card, req.payment_method) {
        (Some(c), None) if name == "sandbox" => c,
        (None, Some(m)) if name == "stripe" => m,
        (None, None) => {
            return Err(ApiError::invalid(
                if name == "sandbox" {
                    "card"
                } else {
                    "paymentMethod"
                },
                "is required",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "card",
                "give `card` for the sandbox provider or `paymentMethod` for stripe, not both",
            ))
        }
    };
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT status, currency FROM invoices WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            &[&inv, &caller.tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    let (status, currency): (String, String) = (row.get(0), row.get(1));
    if status != "issued" {
        return Err(crate::catalog::state_conflict("paid", &status));
    }
    let due = balance(&*tx, inv).await?.due();
    if due <= Decimal::ZERO {
        return Err(ApiError::conflict(
            "nothing_due",
            "nothing is left to collect on this invoice (pending payments count)",
        ));
    }
    let amount = match req.amount.as_deref() {
        Some(a) => decimal("amount", a)?,
        None => due,
    };
    if amount <= Decimal::ZERO || amount > due {
        return Err(ApiError::invalid(
            "amount",
            format!("must be positive and at most what is due ({})", dec(due)),
        ));
    }
    let pid: Uuid = tx
        .query_one(
            "INSERT INTO payments (tenant_id, invoice_id, provider, amount, currency, status)
             VALUES ($1, $2, $3, $4, $5, 'pending') RETURNING id",
            &[&caller.tenant, &inv, &provider.name(), &amount, &currency],
        )
        .await?
        .get(0);
    tx.commit().await?;
    let req = ChargeRequest {
        tenant: caller.tenant,
        payment: pid,
        invoice: inv,
        amount,
        currency,
        method,
    };
    let charge = match provider.charge(&req).await {
        Ok(c) => c,
        Err(ProviderError::Refused(m)) => {
            // The provider refused the request itself: nothing was charged.
            db.execute(
                "UPDATE payments SET status = 'failed', failure_code = 'provider_refused',
                        updated_at = now() WHERE id = $1",
                &[&pid],
            )
            .await?;
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "provider_refused",
                m,
            ));
        }
        Err(e) => return Err(provider_error(e)),
    };
    let tx = db.transaction().await?;
    apply(&tx, &st.settings.key, caller.tenant, pid, &charge).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(payment_json(&**db, caller.tenant, pid).await?),
    ))
}

/// Asks the provider about a pending payment and applies the answer. A payment whose charge
/// never reached the provider (no provider id) is looked up by its id in the provider's records;
/// not found an hour after it was made, it failed.
pub async fn refresh_one(
    db: &mut tokio_postgres::Client,
    key: &ServerKey,
    providers: &Providers,
    tenant: Uuid,
    id: Uuid,
) -> Result<(), ApiError> {
    let r = db
        .query_opt(
            "SELECT provider, provider_ref, status, created_at FROM payments
              WHERE tenant_id = $1 AND id = $2",
            &[&tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("payment"))?;
    let (name, pref, status, created): (String, Option<String>, String, DateTime<Utc>) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    if status != "pending" || name == "manual" {
        return Ok(());
    }
    let provider = providers.get(&name)?;
    let charge = match pref {
        Some(p) => provider.retrieve(&p).await.map_err(provider_error)?,
        None => {
            let found = provider
                .list(tenant, created - chrono::Duration::minutes(5), Utc::now())
                .await
                .map_err(provider_error)?
                .into_iter()
                .find(|(c, _)| c.payment == Some(id));
            match found {
                Some((c, _)) => c,
                None if Utc::now() - created > chrono::Duration::hours(1) => {
                    db.execute(
                        "UPDATE payments SET status = 'failed', failure_code = 'not_at_provider',
                                updated_at = now() WHERE id = $1 AND status = 'pending'",
                        &[&id],
                    )
                    .await?;
                    return Ok(());
                }
                None => return Ok(()),
            }
        }
    };
    let tx = db.transaction().await?;
    apply(&tx, key, tenant, id, &charge).await?;
    tx.commit().await?;
    Ok(())
}

/// Refreshes every pending payment (the background worker's job). Returns how many it asked.
pub async fn refresh_pending(
    db: &mut tokio_postgres::Client,
    key: &ServerKey,
    providers: &Providers,
) -> Result<usize, ApiError> {
    let rows = db
        .query(
            "SELECT tenant_id, id FROM payments WHERE status = 'pending' AND provider <> 'manual'
              ORDER BY created_at LIMIT 500",
            &[],
        )
        .await?;
    for r in &rows {
        if let Err(e) = refresh_one(db, key, providers, r.get(0), r.get(1)).await {
            tracing::warn!(payment = %r.get::<_, Uuid>(1), error = %e.message, "refreshing a payment failed");
        }
    }
    Ok(rows.len())
}

/// `POST /api/v1/payments/{id}/refresh`.
pub async fn refresh(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = payment_id(&id)?;
    let mut db = st.pool.get().await?;
    refresh_one(&mut db, &st.settings.key, &st.providers, caller.tenant, id).await?;
    Ok(Json(payment_json(&**db, caller.tenant, id).await?))
}

/// `GET /api/v1/payments/{id}`.
pub async fn get_one(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    Ok(Json(
        payment_json(&**db, caller.tenant, payment_id(&id)?).await?,
    ))
}

#[derive(Debug, Deserialize)]
pub struct PaymentFilter {
    pub invoice: Option<String>,
    pub status: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// `GET /api/v1/payments?invoice&status&limit&cursor`: oldest first.
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(f): Query<PaymentFilter>,
) -> Result<Json<Value>, ApiError> {
    let limit = crate::page::limit(f.limit.as_deref())?;
    let (t, id) = crate::page::time_id(f.cursor.as_deref())?
        .map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let invoice: Option<Uuid> = match f.invoice.as_deref() {
        Some(s) => Some(
            s.parse()
                .map_err(|_| ApiError::invalid("invoice", "must be an invoice id"))?,
        ),
        None => None,
    };
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {PAYMENT_COLUMNS}, p.created_at, p.id FROM payments p
                  WHERE p.tenant_id = $1 AND ($2::uuid IS NULL OR p.invoice_id = $2)
                    AND ($3::text IS NULL OR p.status = $3)
                    AND ($4::timestamptz IS NULL OR (p.created_at, p.id) > ($4, $5))
                  ORDER BY p.created_at, p.id LIMIT $6"
            ),
            &[&caller.tenant, &invoice, &f.status, &t, &id, &(limit + 1)],
        )
        .await?;
    Ok(Json(crate::page::page(rows, limit, payment_view, |r| {
        let n = r.len();
        crate::page::time_id_cursor(r.get(n - 2), r.get(n - 1))
    })))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRefund {
    /// Decimal string; default: everything left of the payment.
    pub amount: Option<String>,
    pub reason: Option<String>,
}

/// `POST /api/v1/payments/{id}/refunds`.
pub async fn refund(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: NewRefund = optional_body(&raw)?;
    let id = payment_id(&id)?;
    let reason = req.reason.unwrap_or_default();
    if reason.len() > 500 {
        return Err(ApiError::invalid(
            "reason",
            "must be at most 500 characters",
        ));
    }
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let r = tx
        .query_opt(
            "SELECT provider, provider_ref, status, amount, refunded FROM payments
              WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            &[&caller.tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("payment"))?;
    let (name, pref, status, paid, refunded): (String, Option<String>, String, Decimal, Decimal) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    if status != "succeeded" {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("a {status} payment cannot be refunded"),
        ));
    }
    let pending: Decimal = tx
        .query_one(
            "SELECT coalesce(sum(amount), 0) FROM refunds WHERE payment_id = $1 AND status = 'pending'",
            &[&id],
        )
        .await?
        .get(0);
    let left = paid - refunded - pending;
    let amount = match req.amount.as_deref() {
        Some(a) => decimal("amount", a)?,
        None => left,
    };
    if amount <= Decimal::ZERO || amount > left {
        return Err(ApiError::invalid(
            "amount",
            format!(
                "must be positive and at most what is left of the payment ({})",
                dec(left)
            ),
        ));
    }
    let rid: Uuid = tx
        .query_one(
            "INSERT INTO refunds (tenant_id, payment_id, amount, reason, status)
             VALUES ($1, $2, $3, $4, 'pending') RETURNING id",
            &[&caller.tenant, &id, &amount, &reason],
        )
        .await?
        .get(0);
    tx.commit().await?;
    let done = if name == "manual" {
        // Money returned outside a provider (a bank transfer back).
        Ok((None, ProviderStatus::Succeeded))
    } else {
        let provider = st.providers.get(&name)?;
        let pref =
            pref.ok_or_else(|| ApiError::internal("succeeded payment without provider id"))?;
        provider
            .refund(&pref, amount, rid)
            .await
            .map(|f| (Some(f.id), f.status))
    };
    match done {
        Ok((fref, fstatus)) => {
            let tx = db.transaction().await?;
            tx.execute(
                "UPDATE refunds SET provider_ref = $2, status = $3 WHERE id = $1",
                &[&rid, &fref, &fstatus.as_str()],
            )
            .await?;
            if fstatus == ProviderStatus::Succeeded {
                tx.execute(
                    "UPDATE payments SET refunded = refunded + $2, updated_at = now() WHERE id = $1",
                    &[&id, &amount],
                )
                .await?;
            }
            tx.commit().await?;
        }
        Err(e) => {
            db.execute(
                "UPDATE refunds SET status = 'failed' WHERE id = $1",
                &[&rid],
            )
            .await?;
            return Err(provider_error(e));
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(payment_json(&**db, caller.tenant, id).await?),
    ))
}

/// Records a manual payment of what is left on `invoice` and marks it paid (mark-paid).
pub async fn record_manual(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<(), ApiError> {
    let row = tx
        .query_opt(
            "SELECT status, currency FROM invoices WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            &[&invoice, &tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    let (status, currency): (String, String) = (row.get(0), row.get(1));
    if status != "issued" {
        return Err(crate::catalog::state_conflict("marked paid", &status));
    }
    let b = balance(tx, invoice).await?;
    if b.pending > Decimal::ZERO {
        return Err(ApiError::conflict(
            "payments_pending",
            "a payment of this invoice is pending at the provider; refresh it first",
        ));
    }
    let left = b.due();
    if left > Decimal::ZERO {
        tx.execute(
            "INSERT INTO payments (tenant_id, invoice_id, provider, amount, currency, status)
             VALUES ($1, $2, 'manual', $3, $4, 'succeeded')",
            &[&tenant, &invoice, &left, &currency],
        )
        .await?;
    }
    schemas::invoices::mark_paid(tx, tenant, invoice).await?;
    Ok(())
}

/// Records a failed manual collection attempt (payment-failed).
pub async fn record_manual_failure(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
    amount: Decimal,
    currency: &str,
) -> Result<(), ApiError> {
    if amount > Decimal::ZERO {
        tx.execute(
            "INSERT INTO payments (tenant_id, invoice_id, provider, amount, currency, status, failure_code)
             VALUES ($1, $2, 'manual', $3, $4, 'failed', 'collection_failed')",
            &[&tenant, &invoice, &amount, &currency],
        )
        .await?;
    }
    Ok(())
}
