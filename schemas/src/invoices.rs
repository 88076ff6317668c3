//! Invoice state changes shared by the rater (`rater issue`) and control-api (the invoices
//! API): draft → issued (numbered) → paid, and draft or issued → void. A paid invoice is final
//! here; refunds and credit notes come with payments (issue 6).
//!
//! Numbers are per tenant and gapless: the counter row is taken in the caller's transaction, so
//! a rollback returns the number with it, and concurrent issuers serialise on that row.

use tokio_postgres::Transaction;
use uuid::Uuid;

/// What a state change found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Done; for an issue, the number given.
    Done(Option<i64>),
    /// No such invoice for the tenant.
    NotFound,
    /// The invoice is in a state that does not allow the change (its state).
    Refused(String),
}

/// Locks the tenant's `invoice` for the transaction: its status and number.
async fn lock(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<Option<(String, Option<i64>)>, tokio_postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT status, number FROM invoices WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            &[&invoice, &tenant],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// Issues the tenant's draft `invoice`, giving it the tenant's next number.
pub async fn issue(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<Change, tokio_postgres::Error> {
    let Some((status, _)) = lock(tx, tenant, invoice).await? else {
        return Ok(Change::NotFound);
    };
    if status != "draft" {
        return Ok(Change::Refused(status));
    }
    let n: i64 = tx
        .query_one(
            "INSERT INTO invoice_counters (tenant_id, last_number) VALUES ($1, 1)
             ON CONFLICT (tenant_id) DO UPDATE SET last_number = invoice_counters.last_number + 1
             RETURNING last_number",
            &[&tenant],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE invoices SET status = 'issued', number = $2, issued_at = now(), updated_at = now()
          WHERE id = $1",
        &[&invoice, &n],
    )
    .await?;
    Ok(Change::Done(Some(n)))
}

/// Moves the tenant's `invoice` from one of the states `from` to `to`.
async fn set_status(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
    from: &[&str],
    to: &str,
) -> Result<Change, tokio_postgres::Error> {
    let Some((status, number)) = lock(tx, tenant, invoice).await? else {
        return Ok(Change::NotFound);
    };
    if !from.contains(&status.as_str()) {
        return Ok(Change::Refused(status));
    }
    tx.execute(
        "UPDATE invoices SET status = $2, updated_at = now() WHERE id = $1",
        &[&invoice, &to],
    )
    .await?;
    Ok(Change::Done(number))
}

/// Voids the tenant's draft or issued `invoice` (a paid one needs a refund first). A voided
/// draft never gets a number; a voided issued invoice keeps its number (no gap).
pub async fn void(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<Change, tokio_postgres::Error> {
    set_status(tx, tenant, invoice, &["draft", "issued"], "void").await
}

/// Marks the tenant's issued `invoice` paid (a payment recorded outside a provider, e.g. a bank
/// transfer). Only an issued invoice can be paid.
pub async fn mark_paid(
    tx: &Transaction<'_>,
    tenant: Uuid,
    invoice: Uuid,
) -> Result<Change, tokio_postgres::Error> {
    set_status(tx, tenant, invoice, &["issued"], "paid").await
}
