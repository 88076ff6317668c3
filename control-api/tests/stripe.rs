//! The Stripe-shaped provider against a local stand-in of Stripe's REST API (PaymentIntents and
//! Refunds, form-encoded, amounts in minor units, idempotency keys), and Stripe's webhooks:
//! valid, tampered, replayed, outside the tolerance, signed with another secret.

mod common;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use common::billing::Fx;
use control_api::stripe::{sign, StripeSettings};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Books {
    intents: Vec<Value>,
    refunds: Vec<Value>,
    seen_keys: HashMap<String, Value>,
}

type Shared = Arc<Mutex<Books>>;

fn authorized(h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer sk_test_local")
}

async fn create_intent(
    State(b): State<Shared>,
    h: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&h) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "bad key"}})),
        );
    }
    let mut b = b.lock().expect("lock");
    let key = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if let Some(v) = b.seen_keys.get(&key) {
        return (StatusCode::OK, Json(v.clone()));
    }
    let pm = f.get("payment_method").cloned().unwrap_or_default();
    let (status, err) = match pm.as_str() {
        "pm_card_visa" => ("succeeded", Value::Null),
        "pm_card_delayed" => ("processing", Value::Null),
        _ => (
            "requires_payment_method",
            json!({"code": "card_declined", "decline_code": "generic_decline"}),
        ),
    };
    let pi = json!({
        "id": format!("pi_{}", b.intents.len() + 1),
        "object": "payment_intent",
        "amount": f["amount"].parse::<i64>().expect("minor units"),
        "currency": f["currency"],
        "status": status,
        "created": chrono::Utc::now().timestamp(),
        "last_payment_error": err,
        "metadata": {
            "payment_id": f["metadata[payment_id]"],
            "invoice_id": f["metadata[invoice_id]"],
            "tenant_id": f["metadata[tenant_id]"],
        },
    });
    b.intents.push(pi.clone());
    b.seen_keys.insert(key, pi.clone());
    if status == "requires_payment_method" {
        let e =
            json!({"error": {"type": "card_error", "code": "card_declined", "payment_intent": pi}});
        return (StatusCode::PAYMENT_REQUIRED, Json(e));
    }
    (StatusCode::OK, Json(pi))
}

async fn get_intent(State(b): State<Shared>, Path(id): Path<String>) -> (StatusCode, Json<Value>) {
    let b = b.lock().expect("lock");
    match b.intents.iter().find(|p| p["id"] == id.as_str()) {
        Some(p) => (StatusCode::OK, Json(p.clone())),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"message": "no such intent"}})),
        ),
    }
}

async fn list_intents(
    State(b): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    let b = b.lock().expect("lock");
    let gte: i64 = q["created[gte]"].parse().expect("gte");
    let lt: i64 = q["created[lt]"].parse().expect("lt");
    let data: Vec<Value> = b
        .intents
        .iter()
        .filter(|p| (gte..lt).contains(&p["created"].as_i64().unwrap_or(0)))
        .cloned()
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false}))
}

async fn create_refund(
    State(b): State<Shared>,
    h: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let mut b = b.lock().expect("lock");
    let key = h
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if let Some(v) = b.seen_keys.get(&key) {
        return (StatusCode::OK, Json(v.clone()));
    }
    let r = json!({
        "id": format!("re_{}", b.refunds.len() + 1),
        "object": "refund",
        "amount": f["amount"].parse::<i64>().expect("amount"),
        "currency": "eur",
        "payment_intent": f["payment_intent"],
        "status": "succeeded",
    });
    b.refunds.push(r.clone());
    b.seen_keys.insert(key, r.clone());
    (StatusCode::OK, Json(r))
}

async fn list_refunds(
    State(b): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    let b = b.lock().expect("lock");
    let data: Vec<Value> = b
        .refunds
        .iter()
        .filter(|r| r["payment_intent"] == q["payment_intent"].as_str())
        .cloned()
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false}))
}

async fn stand_in() -> (String, Shared) {
    let books: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/payment_intents", post(create_intent).get(list_intents))
        .route("/v1/payment_intents/{id}", get(get_intent))
        .route("/v1/refunds", post(create_refund).get(list_refunds))
        .with_state(books.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, books)
}

const WHSEC: &str = "whsec_local_test_secret";

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_payments_webhooks_refunds_and_reconcile() {
    let (base, books) = stand_in().await;
    let fx = Fx::new(|st| {
        st.payments.stripe = Some(StripeSettings {
            api_base: base.clone(),
            secret_key: "sk_test_local".into(),
            webhook_secret: WHSEC.into(),
            tolerance: Duration::from_secs(300),
        });
        st.payments.default_provider = "stripe";
    })
    .await;

    // Success at once; amounts travel in minor units.
    let inv = fx.issued("2026-01").await;
    let r = fx.pay(&inv, json!({"paymentMethod": "pm_card_visa"})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        (s(&r.json["status"]), s(&r.json["provider"])),
        ("succeeded", "stripe")
    );
    assert_eq!(s(&r.json["invoiceStatus"]), "paid");
    assert_eq!(books.lock().expect("lock").intents[0]["amount"], 6129);
    let first = s(&r.json["id"]).to_string();

    // A decline (Stripe answers 402 with the PaymentIntent).
    let inv2 = fx.issued("2026-02").await;
    let r = fx
        .pay(&inv2, json!({"paymentMethod": "pm_card_chargeDeclined"}))
        .await;
    assert_eq!(s(&r.json["status"]), "failed", "{}", r.text);
    assert_eq!(s(&r.json["failureCode"]), "generic_decline");
    assert_eq!(fx.sub_status().await, "past_due");

    // Processing → pending; the webhook settles it.
    let r = fx
        .pay(&inv2, json!({"paymentMethod": "pm_card_delayed"}))
        .await;
    assert_eq!(s(&r.json["status"]), "pending", "{}", r.text);
    let intent = s(&r.json["providerRef"]).to_string();
    let pid = s(&r.json["id"]).to_string();
    let obj = {
        let mut b = books.lock().expect("lock");
        let p = b
            .intents
            .iter_mut()
            .find(|p| p["id"] == intent.as_str())
            .expect("intent");
        p["status"] = json!("succeeded");
        p.clone()
    };
    let event = json!({"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": obj}});
    let body = event.to_string();
    let post = |body: String, sig: String| {
        let addr = fx.api.addr;
        async move {
            common::send(
                addr,
                "POST",
                "/api/v1/webhooks/stripe",
                "",
                &[("stripe-signature", &sig)],
                Some(&serde_json::from_str::<Value>(&body).expect("json")),
            )
            .await
        }
    };
    let now = chrono::Utc::now().timestamp();
    // The body is sent as serde_json writes it, so sign exactly that text.
    let canon = serde_json::from_str::<Value>(&body)
        .expect("json")
        .to_string();
    let good = format!("t={now},v1={}", sign(WHSEC, now, canon.as_bytes()));
    // Tampered: the signature of another body.
    let tampered_body = canon.replace("6129", "1");
    let r = post(tampered_body.clone(), good.clone()).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_signature"),
        "{}",
        r.text
    );
    // Signed with another secret.
    let other = format!("t={now},v1={}", sign("whsec_other", now, canon.as_bytes()));
    let r = post(canon.clone(), other).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_signature"),
        "{}",
        r.text
    );
    // Outside the tolerance (an old delivery replayed).
    let old = now - 301;
    let stale = format!("t={old},v1={}", sign(WHSEC, old, canon.as_bytes()));
    let r = post(canon.clone(), stale).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_signature"),
        "{}",
        r.text
    );
    // No header.
    let r = post(canon.clone(), String::new()).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // Nothing of those changed the payment.
    let p = fx
        .call("GET", &format!("/api/v1/payments/{pid}"), None)
        .await;
    assert_eq!(s(&p.json["status"]), "pending");
    // Valid: applied once.
    let r = post(canon.clone(), good.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["applied"], true);
    let p = fx
        .call("GET", &format!("/api/v1/payments/{pid}"), None)
        .await;
    assert_eq!(s(&p.json["status"]), "succeeded");
    assert_eq!(s(&p.json["invoiceStatus"]), "paid");
    assert_eq!(fx.sub_status().await, "active");
    // The same event again (freshly signed, as Stripe retries): 200, nothing changes.
    let later = now + 1;
    let again = format!("t={later},v1={}", sign(WHSEC, later, canon.as_bytes()));
    let r = post(canon.clone(), again).await;
    assert_eq!(
        (r.status, r.json["duplicate"].clone()),
        (200, json!(true)),
        "{}",
        r.text
    );
    let events: i64 = fx
        .api
        .db
        .query_one(
            "SELECT count(*) FROM subscription_events WHERE event = 'payment_succeeded'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(events, 1, "the replay did not apply twice");

    // Refunds go to Stripe with the amount in minor units.
    let r = fx
        .call(
            "POST",
            &format!("/api/v1/payments/{first}/refunds"),
            Some(json!({"amount": "1.29"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["refunded"]), "1.29");
    assert_eq!(books.lock().expect("lock").refunds[0]["amount"], 129);

    // Reconcile against Stripe's records: clean, then a refund made on Stripe's side only.
    let run = |args: Vec<String>| {
        let url = fx.api.url.clone();
        let base = base.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_control-api"))
                    .args(&args)
                    .env("DATABASE_URL", url)
                    .env("STRIPE_SECRET_KEY", "sk_test_local")
                    .env("STRIPE_WEBHOOK_SECRET", WHSEC)
                    .env("STRIPE_API_BASE", base)
                    .output()
                    .expect("run")
            })
            .await
            .expect("join")
        }
    };
    let args = vec![
        "payments".to_string(),
        "reconcile".into(),
        "--tenant".into(),
        fx.api.a.to_string(),
    ];
    // The CLI reads Stripe's settings like serve does.
    let out = run(args.clone()).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    {
        let mut b = books.lock().expect("lock");
        let pi = b.intents[0]["id"].clone();
        b.refunds.push(json!({
            "id": "re_dashboard", "object": "refund", "amount": 500, "currency": "eur",
            "payment_intent": pi, "status": "succeeded",
        }));
    }
    let out = run(args).await;
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).expect("report");
    let kinds: Vec<&str> = report["mismatches"]
        .as_array()
        .expect("mismatches")
        .iter()
        .map(|m| s(&m["kind"]))
        .collect();
    assert!(kinds.contains(&"refund_missing_in_ledger"), "{kinds:?}");
}
