//! The Stripe-shaped provider: [`Stripe`] speaks Stripe's REST API (PaymentIntents, Refunds;
//! form-encoded requests, amounts in minor units, `Idempotency-Key` on every POST) to a
//! configurable base URL, and [`webhook`] takes Stripe's webhook events.
//!
//! A webhook is taken only when its `Stripe-Signature` header (`t=<unix seconds>,v1=<hex>`) holds
//! an HMAC-SHA256, under the endpoint's signing secret, of `"{t}.{raw body}"`, and `t` is within
//! the tolerance (default 300 s) of now: a tampered body, a wrong secret or an old (replayed)
//! delivery answers 400 `invalid_signature`. An event id already taken answers 200 and changes
//! nothing (Stripe delivers at least once).

use crate::http::{ApiError, AppState};
use crate::provider::{
    Charge, ChargeRequest, PaymentProvider, ProviderError, ProviderStatus, Refund,
};
use async_trait::async_trait;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use billing_core::money::Currency;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::Sha256;
use std::time::Duration;
use uuid::Uuid;

/// Where and how to reach Stripe.
#[derive(Clone)]
pub struct StripeSettings {
    /// `https://api.stripe.com` in production.
    pub api_base: String,
    pub secret_key: String,
    /// The webhook endpoint's signing secret (`whsec_…`).
    pub webhook_secret: String,
    pub tolerance: Duration,
}

impl std::fmt::Debug for StripeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSettings")
            .field("api_base", &self.api_base)
            .field("secret_key", &"<redacted>")
            .field("webhook_secret", &"<redacted>")
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Stripe {
    settings: StripeSettings,
    http: reqwest::Client,
}

fn minor(amount: Decimal, currency: &str) -> Result<i64, ProviderError> {
    let c = Currency::from_code(currency).map_err(|e| ProviderError::Refused(e.to_string()))?;
    let scaled = amount * Decimal::from(10i64.pow(c.minor_units()));
    if !scaled.fract().is_zero() {
        return Err(ProviderError::Refused(format!(
            "{amount} {currency} is not a whole number of minor units"
        )));
    }
    i64::try_from(scaled).map_err(|_| ProviderError::Refused("amount too large".into()))
}

fn major(amount: i64, currency: &str) -> Decimal {
    let units = Currency::from_code(currency)
        .map(|c| c.minor_units())
        .unwrap_or(2);
    Decimal::new(amount, units)
}

/// A PaymentIntent object as our [`Charge`].
fn intent(v: &Value) -> Result<Charge, ProviderError> {
    let id = v["id"]
        .as_str()
        .ok_or_else(|| ProviderError::Unavailable(format!("not a PaymentIntent: {v}")))?;
    let currency = v["currency"].as_str().unwrap_or_default().to_uppercase();
    let status = match v["status"].as_str().unwrap_or_default() {
        "succeeded" => ProviderStatus::Succeeded,
        "requires_payment_method" | "canceled" => ProviderStatus::Failed,
        _ => ProviderStatus::Pending,
    };
    let err = &v["last_payment_error"];
    let failure_code = (status == ProviderStatus::Failed).then(|| {
        err["decline_code"]
            .as_str()
            .or(err["code"].as_str())
            .unwrap_or("payment_failed")
            .to_string()
    });
    Ok(Charge {
        id: id.to_string(),
        amount: major(v["amount"].as_i64().unwrap_or(0), &currency),
        refunded: Decimal::ZERO,
        payment: v["metadata"]["payment_id"]
            .as_str()
            .and_then(|s| s.parse().ok()),
        currency,
        status,
        failure_code,
    })
}

impl Stripe {
    pub fn new(settings: StripeSettings) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Stripe { settings, http }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value), ProviderError> {
        let resp = req
            .bearer_auth(&self.settings.secret_key)
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        if status >= 500 || status == 429 {
            return Err(ProviderError::Unavailable(format!(
                "stripe answered {status}"
            )));
        }
        Ok((status, body))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.api_base.trim_end_matches('/'))
    }

    async fn refunds_of(&self, intent_id: &str) -> Result<Vec<Refund>, ProviderError> {
        let (s, v) = self
            .send(
                self.http
                    .get(self.url("/v1/refunds"))
                    .query(&[("payment_intent", intent_id), ("limit", "100")]),
            )
            .await?;
        if s != 200 {
            return Err(ProviderError::Refused(v["error"]["message"].to_string()));
        }
        Ok(v["data"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|r| refund_of(r, intent_id))
            .collect())
    }
}

fn refund_of(r: &Value, intent_id: &str) -> Refund {
    let currency = r["currency"].as_str().unwrap_or("usd").to_uppercase();
    Refund {
        id: r["id"].as_str().unwrap_or_default().to_string(),
        charge: r["payment_intent"]
            .as_str()
            .unwrap_or(intent_id)
            .to_string(),
        amount: major(r["amount"].as_i64().unwrap_or(0), &currency),
        status: match r["status"].as_str() {
            Some("succeeded") => ProviderStatus::Succeeded,
            Some("pending") => ProviderStatus::Pending,
            _ => ProviderStatus::Failed,
        },
    }
}

#[async_trait]
impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn charge(&self, req: &ChargeRequest) -> Result<Charge, ProviderError> {
        let amount = minor(req.amount, &req.currency)?.to_string();
        let form = [
            ("amount", amount.as_str()),
            ("currency", &req.currency.to_lowercase()),
            ("payment_method", &req.method),
            ("confirm", "true"),
            ("metadata[payment_id]", &req.payment.to_string()),
            ("metadata[invoice_id]", &req.invoice.to_string()),
            ("metadata[tenant_id]", &req.tenant.to_string()),
        ];
        let (s, v) = self
            .send(
                self.http
                    .post(self.url("/v1/payment_intents"))
                    .header("Idempotency-Key", req.payment.to_string())
                    .form(&form),
            )
            .await?;
        match s {
            200 => intent(&v),
            // A card error carries the PaymentIntent it left behind.
            402 if v["error"]["payment_intent"].is_object() => {
                intent(&v["error"]["payment_intent"])
            }
            _ => Err(ProviderError::Refused(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("refused")
                    .to_string(),
            )),
        }
    }

    async fn retrieve(&self, id: &str) -> Result<Charge, ProviderError> {
        let (s, v) = self
            .send(
                self.http
                    .get(self.url(&format!("/v1/payment_intents/{id}"))),
            )
            .await?;
        if s != 200 {
            return Err(ProviderError::Refused(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("refused")
                    .to_string(),
            ));
        }
        let mut c = intent(&v)?;
        c.refunded = self
            .refunds_of(id)
            .await?
            .iter()
            .filter(|r| r.status == ProviderStatus::Succeeded)
            .map(|r| r.amount)
            .sum();
        Ok(c)
    }

    async fn refund(&self, id: &str, amount: Decimal, key: Uuid) -> Result<Refund, ProviderError> {
        let c = self.retrieve(id).await?;
        let minor_amount = minor(amount, &c.currency)?.to_string();
        let (s, v) = self
            .send(
                self.http
                    .post(self.url("/v1/refunds"))
                    .header("Idempotency-Key", key.to_string())
                    .form(&[("payment_intent", id), ("amount", &minor_amount)]),
            )
            .await?;
        if s != 200 {
            return Err(ProviderError::Refused(
                v["error"]["message"]
                    .as_str()
                    .unwrap_or("refused")
                    .to_string(),
            ));
        }
        Ok(refund_of(&v, id))
    }

    async fn list(
        &self,
        tenant: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<(Charge, Vec<Refund>)>, ProviderError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![
                ("created[gte]", from.timestamp().to_string()),
                ("created[lt]", to.timestamp().to_string()),
                ("limit", "100".to_string()),
            ];
            if let Some(a) = &after {
                q.push(("starting_after", a.clone()));
            }
            let (s, v) = self
                .send(self.http.get(self.url("/v1/payment_intents")).query(&q))
                .await?;
            if s != 200 {
                return Err(ProviderError::Refused(v["error"]["message"].to_string()));
            }
            let data = v["data"].as_array().cloned().unwrap_or_default();
            for pi in &data {
                if pi["metadata"]["tenant_id"].as_str() != Some(&tenant.to_string()) {
                    continue;
                }
                let mut c = intent(pi)?;
                let refunds = self.refunds_of(&c.id).await?;
                c.refunded = refunds
                    .iter()
                    .filter(|r| r.status == ProviderStatus::Succeeded)
                    .map(|r| r.amount)
                    .sum();
                out.push((c, refunds));
            }
            after = data
                .last()
                .and_then(|d| d["id"].as_str())
                .map(str::to_string);
            if !v["has_more"].as_bool().unwrap_or(false) || after.is_none() {
                break;
            }
        }
        Ok(out)
    }
}

/// Why a signature was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing or malformed")]
    Malformed,
    #[error("the signature's timestamp is outside the tolerance (replayed or delayed)")]
    OutsideTolerance,
    #[error("no signature matches the payload")]
    Mismatch,
}

/// The hex HMAC-SHA256 Stripe puts in `v1=` for `payload` sent at `t`.
pub fn sign(secret: &str, t: i64, payload: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a `Stripe-Signature` header against `payload` at `now`.
pub fn verify(
    secret: &str,
    header: &str,
    payload: &[u8],
    tolerance: Duration,
    now: DateTime<Utc>,
) -> Result<(), SignatureError> {
    let mut t: Option<i64> = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse().ok(),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now.timestamp() - t).unsigned_abs() > tolerance.as_secs() {
        return Err(SignatureError::OutsideTolerance);
    }
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    let ok = sigs.iter().any(|s| {
        hex::decode(s)
            .ok()
            .is_some_and(|raw| mac.clone().verify_slice(&raw).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// `POST /api/v1/webhooks/stripe`: Stripe's events, verified (see the module doc).
pub async fn webhook(
    State(st): State<AppState>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(cfg) = st.settings.payments.stripe.as_ref() else {
        return Err(ApiError::not_found("stripe webhook endpoint"));
    };
    let header = headers
        .get("stripe-signature")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    verify(&cfg.webhook_secret, header, &raw, cfg.tolerance, Utc::now()).map_err(|e| ApiError {
        field: Some("Stripe-Signature".into()),
        ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_signature", e.to_string())
    })?;
    let event: Value = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()))?;
    let (Some(id), Some(kind)) = (event["id"].as_str(), event["type"].as_str()) else {
        return Err(ApiError::invalid("id", "an event needs `id` and `type`"));
    };
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let fresh = tx
        .execute(
            "INSERT INTO provider_events (provider, event_id, type) VALUES ('stripe', $1, $2)
             ON CONFLICT DO NOTHING",
            &[&id, &kind],
        )
        .await?
        == 1;
    if !fresh {
        return Ok((
            StatusCode::OK,
            Json(json!({"received": true, "duplicate": true})),
        ));
    }
    let mut applied = false;
    if kind.starts_with("payment_intent.") {
        let obj = &event["data"]["object"];
        let charge = intent(obj).map_err(|e| ApiError::invalid("data.object", e.to_string()))?;
        let found = tx
            .query_opt(
                "SELECT id, tenant_id FROM payments WHERE provider = 'stripe'
                  AND (provider_ref = $1 OR ($2::uuid IS NOT NULL AND id = $2))",
                &[&charge.id, &charge.payment],
            )
            .await?;
        if let Some(r) = found {
            crate::payments::apply(&tx, &st.settings.key, r.get(1), r.get(0), &charge).await?;
            applied = true;
        } else {
            tracing::warn!(event = id, intent = %charge.id, "stripe event for a payment we do not hold");
        }
    }
    tx.commit().await?;
    Ok((
        StatusCode::OK,
        Json(json!({"received": true, "applied": applied})),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_valid_tampered_old_and_malformed() {
        let now = Utc::now();
        let t = now.timestamp();
        let body = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
        let tol = Duration::from_secs(300);
        let good = format!("t={t},v1={}", sign("whsec_a", t, body));
        assert_eq!(verify("whsec_a", &good, body, tol, now), Ok(()));
        // Several v1 values (secret rotation): any one matching is enough.
        let two = format!(
            "t={t},v1={},v1={}",
            "00".repeat(32),
            sign("whsec_a", t, body)
        );
        assert_eq!(verify("whsec_a", &two, body, tol, now), Ok(()));
        let tampered = br#"{"id":"evt_1","type":"payment_intent.succeeded "}"#;
        assert_eq!(
            verify("whsec_a", &good, tampered, tol, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_b", &good, body, tol, now),
            Err(SignatureError::Mismatch)
        );
        let old = t - 301;
        let stale = format!("t={old},v1={}", sign("whsec_a", old, body));
        assert_eq!(
            verify("whsec_a", &stale, body, tol, now),
            Err(SignatureError::OutsideTolerance)
        );
        let edge = t - 300;
        let inside = format!("t={edge},v1={}", sign("whsec_a", edge, body));
        assert_eq!(verify("whsec_a", &inside, body, tol, now), Ok(()));
        for bad in ["", "t=abc,v1=00", &format!("t={t}"), "v1=00"] {
            assert_eq!(
                verify("whsec_a", bad, body, tol, now),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn minor_units_per_currency() {
        assert_eq!(minor(Decimal::new(1999, 2), "EUR").ok(), Some(1999));
        assert_eq!(minor(Decimal::new(500, 0), "JPY").ok(), Some(500));
        assert!(minor(Decimal::new(1999, 3), "EUR").is_err());
        assert_eq!(major(1999, "EUR"), Decimal::new(1999, 2));
    }
}
