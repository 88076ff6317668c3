//! A tenant with a metered plan, a customer, a live subscription and issued invoices, made
//! through the API (invoices as the rater writes and issues them).
#![allow(dead_code)]

use super::{Api, Resp};
use control_api::http::Settings;
use serde_json::{json, Value};

pub struct Fx {
    pub api: Api,
    pub key: String,
    pub sub: String,
    pub customer: String,
}

impl Fx {
    /// Plan `pro` (EUR, fee 49, meter `tokens` with an entitlement of 1000 per period),
    /// customer `acme` (UTC, subject `acme-1`), subscribed since the start of this month.
    pub async fn new(tune: impl FnOnce(&mut Settings)) -> Fx {
        let api = Api::start_with(tune).await;
        let key = api.api_key(api.a, &["admin"]).await;
        let mut fx = Fx {
            api,
            key,
            sub: String::new(),
            customer: "acme".into(),
        };
        fx.ok(
            "POST",
            "/api/v1/meters",
            json!({"slug": "tokens", "eventType": "tokens", "aggregation": "SUM", "valueProperty": "$.n"}),
        )
        .await;
        fx.ok(
            "POST",
            "/api/v1/plans",
            json!({"key": "pro", "name": "Pro", "tier": "pro", "currency": "EUR", "recurringFee": "49",
                   "prices": [{"meter": "tokens", "price": {"type": "unit", "amount": "0.002"}, "entitlement": "1000"}]}),
        )
        .await;
        fx.ok(
            "POST",
            "/api/v1/customers",
            json!({"key": "acme", "name": "Acme", "currency": "EUR", "timezone": "UTC", "subjects": ["acme-1"]}),
        )
        .await;
        let month = chrono::Utc::now().format("%Y-%m-01T00:00:00Z").to_string();
        let s = fx
            .ok(
                "POST",
                "/api/v1/subscriptions",
                json!({"customer": "acme", "plan": "pro", "startedAt": month}),
            )
            .await;
        fx.sub = s["id"].as_str().expect("id").to_string();
        fx
    }

    /// Stops the server and starts a new one on the same database and server key.
    pub async fn restart(self, tune: impl FnOnce(&mut Settings)) -> Fx {
        Fx {
            api: self.api.restart(tune).await,
            ..self
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.api.call(method, path, &self.key, body).await
    }

    pub async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self.call(method, path, Some(body)).await;
        assert!(
            r.status == 200 || r.status == 201,
            "{method} {path}: {} {}",
            r.status,
            r.text
        );
        r.json
    }

    /// An issued invoice of the subscription for `period` (YYYY-MM): a recurring line 49.00 +
    /// 9.31 tax and a usage line 2.50 + 0.48 tax, total 61.29 EUR.
    pub async fn issued(&self, period: &str) -> String {
        let db = &self.api.db;
        let row = db
            .query_one(
                "INSERT INTO invoices (tenant_id, customer_id, subscription_id, period, period_start,
                        period_end, currency, status, number, subtotal, tax, total, content_sha256, issued_at)
                 SELECT s.tenant_id, s.customer_id, s.id, $2, s.started_at, s.started_at + interval '1 month',
                        'EUR', 'issued', (SELECT coalesce(max(number), 0) + 1 FROM invoices WHERE tenant_id = s.tenant_id),
                        51.50, 9.79, 61.29, '\\x00', now()
                   FROM subscriptions s WHERE s.id = $1::text::uuid
                 RETURNING id::text",
                &[&self.sub, &period],
            )
            .await
            .expect("invoice");
        let id: String = row.get(0);
        db.execute(
            "INSERT INTO invoice_lines (invoice_id, position, tenant_id, kind, description, period_start,
                    period_end, quantity, amount, tax, total)
             SELECT i.id, p, i.tenant_id, k, d, i.period_start, i.period_end, q, a, t, a + t
               FROM invoices i, (VALUES (1, 'recurring', 'Pro monthly', 1, 49.00, 9.31),
                                        (2, 'usage', 'tokens', 1250, 2.50, 0.48)) AS v(p, k, d, q, a, t)
              WHERE i.id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("lines");
        id
    }

    pub async fn invoice(&self, id: &str) -> Value {
        self.call("GET", &format!("/api/v1/invoices/{id}"), None)
            .await
            .json
    }

    pub async fn sub_status(&self) -> String {
        let r = self
            .call("GET", &format!("/api/v1/subscriptions/{}", self.sub), None)
            .await;
        r.json["status"].as_str().expect("status").to_string()
    }

    /// `POST /api/v1/invoices/{id}/payments`.
    pub async fn pay(&self, invoice: &str, body: Value) -> Resp {
        self.call(
            "POST",
            &format!("/api/v1/invoices/{invoice}/payments"),
            Some(body),
        )
        .await
    }
}
