//! The subscription state machine over HTTP and in time, against the real PostgreSQL: plan
//! changes with hand-computed proration, cancel now and at period end, resume, auto-renew,
//! trials, past due and back, grace expiry, scheduled changes, refused transitions, domain events.

mod common;

use chrono::{DateTime, Utc};
use common::Api;
use serde_json::{json, Value};
use std::time::Duration;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

struct Fx {
    api: Api,
    key: String,
}

impl Fx {
    async fn new() -> Fx {
        let api = Api::start().await;
        let key = api.api_key(api.a, &["admin"]).await;
        let fx = Fx { api, key };
        for (plan, fee) in [("basic", "30"), ("pro", "60")] {
            fx.ok(
                "POST",
                "/api/v1/plans",
                json!({"key": plan, "name": plan, "tier": "basic", "currency": "EUR", "recurringFee": fee}),
            )
            .await;
        }
        fx
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> common::Resp {
        self.api.call(method, path, &self.key, body).await
    }

    async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self.call(method, path, Some(body)).await;
        assert!(
            r.status == 200 || r.status == 201,
            "{method} {path}: {}",
            r.text
        );
        r.json
    }

    /// A UTC customer (anchor 1) and a subscription to `plan` from `start`.
    async fn sub(&self, customer: &str, plan: &str, start: &str, extra: Value) -> Value {
        self.ok(
            "POST",
            "/api/v1/customers",
            json!({"key": customer, "name": customer, "currency": "EUR", "timezone": "UTC"}),
        )
        .await;
        let mut b = json!({"customer": customer, "plan": plan, "startedAt": start});
        if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
            o.extend(e);
        }
        self.ok("POST", "/api/v1/subscriptions", b).await
    }

    async fn act(&self, id: &str, action: &str, body: Option<Value>) -> common::Resp {
        self.call(
            "POST",
            &format!("/api/v1/subscriptions/{id}/{action}"),
            body,
        )
        .await
    }

    async fn get(&self, id: &str) -> Value {
        self.call("GET", &format!("/api/v1/subscriptions/{id}"), None)
            .await
            .json
    }

    async fn events(&self, id: &str) -> Vec<(String, String)> {
        let r = self
            .call("GET", &format!("/api/v1/subscriptions/{id}/events"), None)
            .await;
        r.json["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|e| {
                (
                    e["event"].as_str().unwrap_or("").to_string(),
                    e["to"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    async fn advance(&self, now: &str) -> Value {
        let mut db = tokio_postgres::connect(&self.api.url, tokio_postgres::NoTls)
            .await
            .map(|(c, conn)| {
                tokio::spawn(conn);
                c
            })
            .expect("db");
        let r =
            control_api::subscriptions::advance(&mut db, t(now), Duration::from_secs(14 * 86_400))
                .await
                .expect("advance");
        serde_json::to_value(r).expect("json")
    }

    /// An issued invoice of `sub` (as the rater would have issued it).
    async fn issued_invoice(&self, sub: &str, period: &str) -> String {
        let row = self
            .api
            .db
            .query_one(
                "INSERT INTO invoices (tenant_id, customer_id, subscription_id, period, period_start,
                        period_end, currency, status, number, subtotal, tax, total, content_sha256, issued_at)
                 SELECT s.tenant_id, s.customer_id, s.id, $2, s.started_at, s.started_at + interval '1 month',
                        'EUR', 'issued', (SELECT coalesce(max(number), 0) + 1 FROM invoices), 30, 0, 30, '\\x00', now()
                   FROM subscriptions s WHERE s.id = $1::text::uuid
                 RETURNING id::text",
                &[&sub, &period],
            )
            .await
            .expect("invoice");
        row.get(0)
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn upgrade_now_prorates_by_the_second_and_replaces_the_subscription() {
    let fx = Fx::new().await;
    let old = fx
        .sub("acme", "basic", "2027-04-01T00:00:00Z", json!({}))
        .await;
    assert_eq!(old["status"], "active");
    // April 2027 has 30 days; from the 11th, 20 are left: credit 30 × 20/30, charge 60 × 20/30.
    let r = fx
        .act(
            &id(&old),
            "change-plan",
            Some(json!({"plan": "pro", "at": "2027-04-11T00:00:00Z"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let p = &r.json["proration"];
    assert_eq!(
        (
            p["credit"].as_str(),
            p["charge"].as_str(),
            p["net"].as_str()
        ),
        (Some("-20"), Some("40"), Some("20"))
    );
    assert_eq!(p["periodStart"], "2027-04-01T00:00:00.000Z");
    assert_eq!(p["periodEnd"], "2027-05-01T00:00:00.000Z");
    assert_eq!(r.json["plan"], "pro");
    assert_eq!(r.json["status"], "active");
    assert_eq!(r.json["startedAt"], "2027-04-11T00:00:00.000Z");
    assert_eq!(r.json["replaces"], json!(id(&old)));
    let before = fx.get(&id(&old)).await;
    assert_eq!(before["status"], "canceled");
    assert_eq!(before["endedAt"], "2027-04-11T00:00:00.000Z");
    assert_eq!(before["replacedBy"], r.json["id"]);
    assert_eq!(
        fx.events(&id(&old)).await,
        [
            ("created".to_string(), "active".to_string()),
            ("change_plan_now".into(), "canceled".into())
        ]
    );
    // A canceled subscription takes nothing more.
    for (action, body) in [
        ("cancel", None),
        ("resume", None),
        ("auto-renew", Some(json!({"autoRenew": false}))),
        ("change-plan", Some(json!({"plan": "basic"}))),
    ] {
        let r = fx.act(&id(&old), action, body).await;
        assert_eq!(
            (r.status, r.code()),
            (409, "invalid_transition"),
            "{action}: {}",
            r.text
        );
        assert!(r.json["detail"]
            .as_str()
            .expect("detail")
            .contains("canceled"));
    }
    let new = r.json.clone();
    let same = fx
        .act(&id(&new), "change-plan", Some(json!({"plan": "pro"})))
        .await;
    assert_eq!(same.code(), "same_plan");
    let past = fx
        .act(
            &id(&new),
            "change-plan",
            Some(json!({"plan": "basic", "at": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(past.json["field"], "at");
    let bad = fx
        .act(&id(&new), "cancel", Some(json!({"at": "tomorrow"})))
        .await;
    assert_eq!(bad.json["field"], "at");
    let nowhere = fx
        .act("00000000-0000-4000-8000-000000000000", "cancel", None)
        .await;
    assert_eq!(nowhere.status, 404);
}

#[tokio::test]
async fn cancel_at_period_end_resume_auto_renew_and_expiry() {
    let fx = Fx::new().await;
    let s = fx
        .sub("acme", "basic", "2027-04-11T00:00:00Z", json!({}))
        .await;
    let sid = id(&s);
    let r = fx.act(&sid, "resume", None).await;
    assert_eq!(r.code(), "nothing_scheduled");
    let r = fx
        .act(&sid, "cancel", Some(json!({"at": "period_end"})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json["status"], "active",
        "still active until the period ends"
    );
    assert_eq!(r.json["cancelAtPeriodEnd"], true);
    assert_eq!(r.json["endedAt"], "2027-05-01T00:00:00.000Z");
    let r = fx.act(&sid, "resume", None).await;
    assert_eq!(
        (
            r.json["cancelAtPeriodEnd"].clone(),
            r.json["endedAt"].clone()
        ),
        (json!(false), Value::Null),
        "{}",
        r.text
    );
    let r = fx
        .act(&sid, "auto-renew", Some(json!({"autoRenew": false})))
        .await;
    assert_eq!(r.json["endedAt"], "2027-05-01T00:00:00.000Z");
    // Nothing happens before the period ends; at its end the subscription expires.
    assert_eq!(fx.advance("2027-04-30T23:59:59Z").await["expired"], 0);
    assert_eq!(fx.get(&sid).await["status"], "active");
    assert_eq!(fx.advance("2027-05-01T00:00:00Z").await["expired"], 1);
    assert_eq!(fx.get(&sid).await["status"], "expired");
    assert_eq!(
        fx.advance("2027-05-02T00:00:00Z").await["expired"],
        0,
        "once"
    );
    let r = fx
        .act(&sid, "auto-renew", Some(json!({"autoRenew": true})))
        .await;
    assert_eq!(r.code(), "invalid_transition");
    let names: Vec<String> = fx.events(&sid).await.into_iter().map(|(e, _)| e).collect();
    assert_eq!(
        names,
        [
            "created",
            "schedule_cancel",
            "resume",
            "set_auto_renew",
            "period_ended"
        ]
    );
    // Cancel at period end, reached: canceled (not expired).
    let s2 = fx
        .sub("beta", "basic", "2027-04-11T00:00:00Z", json!({}))
        .await;
    fx.act(&id(&s2), "cancel", Some(json!({"at": "period_end"})))
        .await;
    assert_eq!(fx.advance("2027-05-01T00:00:00Z").await["canceled"], 1);
    assert_eq!(fx.get(&id(&s2)).await["status"], "canceled");
    // Cancel now: canceled at once; a subscription that has not started bills nothing.
    let s3 = fx
        .sub("gamma", "basic", "2027-04-11T00:00:00Z", json!({}))
        .await;
    let r = fx.act(&id(&s3), "cancel", None).await;
    assert_eq!(r.json["status"], "canceled");
    let span: bool = fx
        .api
        .db
        .query_one(
            "SELECT ended_at - started_at < interval '1 second' FROM subscriptions WHERE id = $1::text::uuid",
            &[&id(&s3)],
        )
        .await
        .expect("row")
        .get(0);
    assert!(span);
}

#[tokio::test]
async fn trials_past_due_payments_grace_and_scheduled_changes() {
    let fx = Fx::new().await;
    // A 14-day trial ends on its own.
    let s = fx
        .sub(
            "acme",
            "basic",
            "2027-04-01T00:00:00Z",
            json!({"trialDays": 14}),
        )
        .await;
    let sid = id(&s);
    assert_eq!(s["status"], "trialing");
    assert_eq!(s["trialEndsAt"], "2027-04-15T00:00:00.000Z");
    assert_eq!(fx.advance("2027-04-14T23:59:59Z").await["trials_ended"], 0);
    assert_eq!(fx.advance("2027-04-15T00:00:00Z").await["trials_ended"], 1);
    assert_eq!(fx.get(&sid).await["status"], "active");

    // A failed payment: past due; no plan change or scheduled cancel then; paid: active again.
    let inv = fx.issued_invoice(&sid, "2027-04").await;
    let r = fx
        .call(
            "POST",
            &format!("/api/v1/invoices/{inv}/payment-failed"),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json["subscriptionStatus"].clone()),
        (200, json!("past_due")),
        "{}",
        r.text
    );
    assert_eq!(fx.get(&sid).await["status"], "past_due");
    let r = fx
        .act(&sid, "change-plan", Some(json!({"plan": "pro"})))
        .await;
    assert_eq!(r.code(), "invalid_transition");
    let r = fx
        .act(&sid, "cancel", Some(json!({"at": "period_end"})))
        .await;
    assert_eq!(r.code(), "invalid_transition");
    let r = fx
        .call("POST", &format!("/api/v1/invoices/{inv}/mark-paid"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(fx.get(&sid).await["status"], "active");
    let r = fx
        .call(
            "POST",
            &format!("/api/v1/invoices/{inv}/payment-failed"),
            None,
        )
        .await;
    assert_eq!(r.code(), "invalid_state", "a paid invoice is not collected");

    // Past due beyond the grace period (14 days): canceled.
    let inv2 = fx.issued_invoice(&sid, "2027-05").await;
    fx.call(
        "POST",
        &format!("/api/v1/invoices/{inv2}/payment-failed"),
        None,
    )
    .await;
    let soon = (Utc::now() + chrono::Duration::days(13)).to_rfc3339();
    assert_eq!(fx.advance(&soon).await["grace_expired"], 0);
    let later = (Utc::now() + chrono::Duration::days(15)).to_rfc3339();
    assert_eq!(fx.advance(&later).await["grace_expired"], 1);
    let gone = fx.get(&sid).await;
    assert_eq!(gone["status"], "canceled");
    assert!(gone["endedAt"].is_string());
    let names: Vec<String> = fx.events(&sid).await.into_iter().map(|(e, _)| e).collect();
    assert_eq!(
        names,
        [
            "created",
            "trial_ended",
            "payment_failed",
            "payment_succeeded",
            "payment_failed",
            "grace_expired"
        ]
    );

    // A downgrade scheduled for the period end happens then, not before.
    let s = fx
        .sub("beta", "pro", "2027-04-01T00:00:00Z", json!({}))
        .await;
    let r = fx
        .act(
            &id(&s),
            "change-plan",
            Some(json!({"plan": "basic", "at": "period_end"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["scheduledChangeAt"], "2027-05-01T00:00:00.000Z");
    assert_eq!(fx.advance("2027-04-30T00:00:00Z").await["plan_changes"], 0);
    assert_eq!(fx.advance("2027-05-01T00:00:00Z").await["plan_changes"], 1);
    let old = fx.get(&id(&s)).await;
    assert_eq!(old["status"], "canceled");
    let new = fx.get(old["replacedBy"].as_str().expect("successor")).await;
    assert_eq!(
        (new["plan"].as_str(), new["startedAt"].as_str()),
        (Some("basic"), Some("2027-05-01T00:00:00.000Z"))
    );
    assert_eq!(new["status"], "active");
}

/// The value of the series `name` whose labels include every `label="value"` of `labels`.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn business_metrics_for_grafana() {
    let fx = Fx::new().await;
    let a = fx
        .sub("acme", "basic", "2026-01-01T00:00:00Z", json!({}))
        .await;
    fx.sub("beta", "pro", "2026-01-01T00:00:00Z", json!({}))
        .await;
    fx.sub("gamma", "basic", "2026-02-01T00:00:00Z", json!({}))
        .await;
    fx.sub("later", "pro", "2099-01-01T00:00:00Z", json!({}))
        .await;
    let inv = fx.issued_invoice(&id(&a), "2026-01").await;
    let r = fx
        .call(
            "POST",
            &format!("/api/v1/invoices/{inv}/payment-failed"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    fx.api.user(fx.api.a, "someone@a.example", "user").await;
    let m = fx.api.call("GET", "/metrics", "", None).await;
    assert_eq!(m.status, 200);
    let t = fx.api.a.to_string();
    let tenant = ("tenant", t.as_str());
    assert_eq!(
        series(
            &m.text,
            "billing_mrr",
            &[tenant, ("plan", "basic"), ("currency", "EUR")]
        ),
        Some(60.0)
    );
    assert_eq!(
        series(&m.text, "billing_mrr", &[tenant, ("plan", "pro")]),
        Some(60.0),
        "the 2099 one is not live"
    );
    assert_eq!(
        series(&m.text, "billing_arpu", &[tenant, ("plan", "basic")]),
        Some(30.0)
    );
    assert_eq!(
        series(
            &m.text,
            "billing_active_subscriptions",
            &[tenant, ("plan", "basic"), ("status", "past_due")]
        ),
        Some(1.0)
    );
    assert_eq!(
        series(
            &m.text,
            "billing_active_subscriptions",
            &[tenant, ("plan", "basic"), ("status", "active")]
        ),
        Some(1.0)
    );
    assert_eq!(
        series(&m.text, "billing_invoices", &[tenant, ("status", "issued")]),
        Some(1.0)
    );
    assert_eq!(
        series(&m.text, "billing_payment_failures", &[tenant]),
        Some(1.0)
    );
    assert_eq!(
        series(
            &m.text,
            "notifications",
            &[("kind", "verify_email"), ("state", "pending")]
        ),
        Some(1.0)
    );
    // Paid: no longer issued; the subscription is active again.
    fx.call("POST", &format!("/api/v1/invoices/{inv}/mark-paid"), None)
        .await;
    let m = fx.api.call("GET", "/metrics", "", None).await;
    assert_eq!(
        series(&m.text, "billing_invoices", &[tenant, ("status", "paid")]),
        Some(1.0)
    );
    assert_eq!(
        series(&m.text, "billing_invoices", &[tenant, ("status", "issued")]),
        None
    );
    assert_eq!(
        series(
            &m.text,
            "billing_active_subscriptions",
            &[tenant, ("status", "past_due")]
        ),
        None
    );
}
