//! Payment providers: the [`PaymentProvider`] trait, and [`Sandbox`], a provider with
//! deterministic test cards that keeps its own books (tables `sandbox_charges`,
//! `sandbox_refunds`: what a real provider would hold on its side, which reconcile compares with
//! ours). The Stripe-shaped adapter is in [`crate::stripe`].
//!
//! Sandbox cards (the numbers Stripe's test mode uses for the same outcomes):
//!
//! | card | outcome |
//! |---|---|
//! | `4242424242424242` | succeeds at once |
//! | `4000000000000002` | declined: `card_declined` |
//! | `4000000000009995` | declined: `insufficient_funds` |
//! | `4000000000000077` | pending; succeeds once `confirm_delay` has passed (delayed confirmation) |
//! | `4000000000000341` | pending; then declined (`card_declined`) once `confirm_delay` has passed |
//! | anything else | declined: `incorrect_number` |
//!
//! Every call carries an idempotency key (our payment or refund id): a retried call answers the
//! record the first one made, never a second charge.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use std::time::Duration;
use uuid::Uuid;

/// A charge or refund as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderStatus {
    Pending,
    Succeeded,
    Failed,
}

impl ProviderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderStatus::Pending => "pending",
            ProviderStatus::Succeeded => "succeeded",
            ProviderStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(ProviderStatus::Pending),
            "succeeded" => Some(ProviderStatus::Succeeded),
            "failed" => Some(ProviderStatus::Failed),
            _ => None,
        }
    }
}

/// What to charge.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub tenant: Uuid,
    /// Our payment id: the idempotency key and the charge's metadata.
    pub payment: Uuid,
    pub invoice: Uuid,
    pub amount: Decimal,
    pub currency: String,
    /// A card number (sandbox) or a provider payment method id (Stripe `pm_…`).
    pub method: String,
}

/// A charge on the provider's side.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub id: String,
    pub amount: Decimal,
    pub currency: String,
    pub status: ProviderStatus,
    pub failure_code: Option<String>,
    /// Our payment id, from the charge's metadata.
    pub payment: Option<Uuid>,
    /// Refunded so far (succeeded refunds).
    pub refunded: Decimal,
}

/// A refund on the provider's side.
#[derive(Debug, Clone, PartialEq)]
pub struct Refund {
    pub id: String,
    pub charge: String,
    pub amount: Decimal,
    pub status: ProviderStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the request itself (not a decline): the reason, for a 4xx.
    #[error("{0}")]
    Refused(String),
    /// The provider could not be reached or failed: retry later.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
}

impl From<tokio_postgres::Error> for ProviderError {
    fn from(e: tokio_postgres::Error) -> Self {
        ProviderError::Unavailable(e.to_string())
    }
}
impl From<deadpool_postgres::PoolError> for ProviderError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ProviderError::Unavailable(e.to_string())
    }
}

/// A payment provider. Implementations must be idempotent on the keys they are given.
#[async_trait]
pub trait PaymentProvider: Send + Sync + std::fmt::Debug {
    /// `sandbox` or `stripe`: what `payments.provider` records.
    fn name(&self) -> &'static str;
    /// Charges `req.method`; a decline is a `Failed` charge, not an error.
    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, ProviderError>;
    /// The charge as it is now (a pending one may have settled).
    async fn retrieve(&self, id: &str) -> Result<Charge, ProviderError>;
    /// Refunds `amount` of charge `id`; `key` is our refund id.
    async fn refund(&self, id: &str, amount: Decimal, key: Uuid) -> Result<Refund, ProviderError>;
    /// Every charge of `tenant` created in `[from, to)`, with its refunds: what reconcile
    /// compares with our records.
    async fn list(
        &self,
        tenant: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(Charge, Vec<Refund>)>, ProviderError>;
}

/// The sandbox provider.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pool: deadpool_postgres::Pool,
    /// How long a delayed-confirmation card stays pending.
    pub confirm_delay: Duration,
}

/// What a sandbox card does: (status now, status it settles to later, failure code).
fn card_outcome(card: &str) -> (ProviderStatus, Option<ProviderStatus>, Option<&'static str>) {
    use ProviderStatus::*;
    match card.replace([' ', '-'], "").as_str() {
        "4242424242424242" => (Succeeded, None, None),
        "4000000000000002" => (Failed, None, Some("card_declined")),
        "4000000000009995" => (Failed, None, Some("insufficient_funds")),
        "4000000000000077" => (Pending, Some(Succeeded), None),
        "4000000000000341" => (Pending, Some(Failed), Some("card_declined")),
        _ => (Failed, None, Some("incorrect_number")),
    }
}

const CHARGE_SQL: &str = "SELECT c.id, c.amount, c.currency, c.status, c.failure_code, c.metadata,
        coalesce((SELECT sum(r.amount) FROM sandbox_refunds r
                   WHERE r.charge_id = c.id AND r.status = 'succeeded'), 0)
   FROM sandbox_charges c";

fn charge_of(r: &tokio_postgres::Row) -> Charge {
    let meta: Value = r.get(5);
    Charge {
        id: r.get(0),
        amount: r.get(1),
        currency: r.get(2),
        status: ProviderStatus::parse(r.get(3)).unwrap_or(ProviderStatus::Failed),
        failure_code: r.get(4),
        payment: meta["payment"].as_str().and_then(|s| s.parse().ok()),
        refunded: r.get(6),
    }
}

impl Sandbox {
    pub fn new(pool: deadpool_postgres::Pool, confirm_delay: Duration) -> Self {
        Sandbox {
            pool,
            confirm_delay,
        }
    }

    fn new_id(prefix: &str) -> String {
        format!("{prefix}_{}", Uuid::new_v4().simple())
    }

    /// Settles a pending charge whose time has come (what the provider does on its own).
    async fn settle(&self, db: &tokio_postgres::Client, id: &str) -> Result<(), ProviderError> {
        db.execute(
            "UPDATE sandbox_charges SET status = settles_to,
                    failure_code = CASE WHEN settles_to = 'failed' THEN failure_code END
              WHERE id = $1 AND status = 'pending' AND settles_at <= now()",
            &[&id],
        )
        .await?;
        Ok(())
    }

    async fn get(&self, db: &tokio_postgres::Client, id: &str) -> Result<Charge, ProviderError> {
        self.settle(db, id).await?;
        db.query_opt(&format!("{CHARGE_SQL} WHERE c.id = $1"), &[&id])
            .await?
            .map(|r| charge_of(&r))
            .ok_or_else(|| ProviderError::Refused(format!("no such charge: {id}")))
    }
}

#[async_trait]
impl PaymentProvider for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, ProviderError> {
        let db = self.pool.get().await?;
        let digits: String = req.method.chars().filter(char::is_ascii_digit).collect();
        let last4 = digits[digits.len().saturating_sub(4)..].to_string();
        let (status, later, code) = card_outcome(&req.method);
        let settles_at = later.map(|_| {
            Utc::now() + chrono::Duration::from_std(self.confirm_delay).unwrap_or_default()
        });
        let meta = serde_json::json!({"payment": req.payment, "invoice": req.invoice});
        let id: String = db
            .query_one(
                "INSERT INTO sandbox_charges (id, tenant_id, idempotency_key, amount, currency,
                        card_last4, status, failure_code, settles_at, settles_to, metadata)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (idempotency_key) DO UPDATE SET idempotency_key = EXCLUDED.idempotency_key
                 RETURNING id",
                &[
                    &Self::new_id("sbx_ch"),
                    &req.tenant,
                    &req.payment.to_string(),
                    &req.amount,
                    &req.currency,
                    &last4,
                    &status.as_str(),
                    &code,
                    &settles_at,
                    &later.map(ProviderStatus::as_str),
                    &meta,
                ],
            )
            .await?
            .get(0);
        let c = self.get(&db, &id).await?;
        // A pending delayed decline carries no failure code yet.
        Ok(if c.status == ProviderStatus::Pending {
            Charge {
                failure_code: None,
                ..c
            }
        } else {
            c
        })
    }

    async fn retrieve(&self, id: &str) -> Result<Charge, ProviderError> {
        let db = self.pool.get().await?;
        let c = self.get(&db, id).await?;
        Ok(if c.status == ProviderStatus::Pending {
            Charge {
                failure_code: None,
                ..c
            }
        } else {
            c
        })
    }

    async fn refund(&self, id: &str, amount: Decimal, key: Uuid) -> Result<Refund, ProviderError> {
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        if let Some(r) = tx
            .query_opt(
                "SELECT id, charge_id, amount, status FROM sandbox_refunds WHERE idempotency_key = $1",
                &[&key.to_string()],
            )
            .await?
        {
            return Ok(Refund {
                id: r.get(0),
                charge: r.get(1),
                amount: r.get(2),
                status: ProviderStatus::parse(r.get(3)).unwrap_or(ProviderStatus::Failed),
            });
        }
        let row = tx
            .query_opt(
                "SELECT status, amount FROM sandbox_charges WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or_else(|| ProviderError::Refused(format!("no such charge: {id}")))?;
        let (status, charged): (String, Decimal) = (row.get(0), row.get(1));
        if status != "succeeded" {
            return Err(ProviderError::Refused(format!(
                "a {status} charge cannot be refunded"
            )));
        }
        let refunded: Decimal = tx
            .query_one(
                "SELECT coalesce(sum(amount), 0) FROM sandbox_refunds
                  WHERE charge_id = $1 AND status = 'succeeded'",
                &[&id],
            )
            .await?
            .get(0);
        if amount <= Decimal::ZERO || refunded + amount > charged {
            return Err(ProviderError::Refused(format!(
                "the refund exceeds what is left of the charge ({})",
                charged - refunded
            )));
        }
        let rid = Self::new_id("sbx_re");
        tx.execute(
            "INSERT INTO sandbox_refunds (id, charge_id, idempotency_key, amount, status)
             VALUES ($1, $2, $3, $4, 'succeeded')",
            &[&rid, &id, &key.to_string(), &amount],
        )
        .await?;
        tx.commit().await?;
        Ok(Refund {
            id: rid,
            charge: id.to_string(),
            amount,
            status: ProviderStatus::Succeeded,
        })
    }

    async fn list(
        &self,
        tenant: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(Charge, Vec<Refund>)>, ProviderError> {
        let db = self.pool.get().await?;
        db.execute(
            "UPDATE sandbox_charges SET status = settles_to,
                    failure_code = CASE WHEN settles_to = 'failed' THEN failure_code END
              WHERE tenant_id = $1 AND status = 'pending' AND settles_at <= now()",
            &[&tenant],
        )
        .await?;
        let charges = db
            .query(
                &format!(
                    "{CHARGE_SQL} WHERE c.tenant_id = $1 AND c.created_at >= $2
                       AND c.created_at < $3 ORDER BY c.created_at"
                ),
                &[&tenant, &from, &to],
            )
            .await?;
        let mut out = Vec::with_capacity(charges.len());
        for c in &charges {
            let charge = charge_of(c);
            let refunds = db
                .query(
                    "SELECT id, charge_id, amount, status FROM sandbox_refunds
                      WHERE charge_id = $1 ORDER BY created_at",
                    &[&charge.id],
                )
                .await?
                .iter()
                .map(|r| Refund {
                    id: r.get(0),
                    charge: r.get(1),
                    amount: r.get(2),
                    status: ProviderStatus::parse(r.get(3)).unwrap_or(ProviderStatus::Failed),
                })
                .collect();
            out.push((charge, refunds));
        }
        Ok(out)
    }
}
