//! Credit notes, payments through the sandbox provider (its deterministic cards), refunds and
//! reconcile, against the real PostgreSQL.

mod common;

use common::billing::Fx;
use serde_json::{json, Value};
use std::time::Duration;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_partial_payments_past_due_and_back() {
    let fx = Fx::new(|_| {}).await;
    let inv = fx.issued("2026-01").await;

    // Bad requests name their field; nothing is recorded for them.
    for (body, field) in [
        (json!({}), "card"),
        (
            json!({"card": "4242424242424242", "amount": "abc"}),
            "amount",
        ),
        (
            json!({"card": "4242424242424242", "amount": "61.30"}),
            "amount",
        ),
        (
            json!({"card": "4242424242424242", "amount": "-1"}),
            "amount",
        ),
        (json!({"provider": "paypal", "card": "4242"}), "provider"),
        (
            json!({"provider": "stripe", "paymentMethod": "pm_x"}),
            "provider",
        ),
        (json!({"card": "4242424242424242", "cvc": "1"}), "cvc"),
    ] {
        let r = fx.pay(&inv, body.clone()).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(s(&r.json["field"]), field, "{body}: {}", r.text);
    }
    let none = fx
        .call("GET", &format!("/api/v1/payments?invoice={inv}"), None)
        .await;
    assert_eq!(none.json["items"], json!([]));
    let r = fx
        .pay(
            "00000000-0000-0000-0000-000000000000",
            json!({"card": "4242424242424242"}),
        )
        .await;
    assert_eq!(r.status, 404);

    // Declines: the payment is recorded failed, the subscription goes past due.
    let r = fx.pay(&inv, json!({"card": "4000 0000 0000 0002"})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["status"]), "failed");
    assert_eq!(s(&r.json["failureCode"]), "card_declined");
    assert_eq!(s(&r.json["invoiceStatus"]), "issued");
    assert_eq!(fx.sub_status().await, "past_due");
    let r = fx.pay(&inv, json!({"card": "4000000000009995"})).await;
    assert_eq!(s(&r.json["failureCode"]), "insufficient_funds");
    let r = fx.pay(&inv, json!({"card": "1234123412341234"})).await;
    assert_eq!(s(&r.json["failureCode"]), "incorrect_number");

    // A partial payment leaves the invoice issued and the subscription past due.
    let r = fx
        .pay(&inv, json!({"card": "4242424242424242", "amount": "20.00"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["status"]), "succeeded");
    assert_eq!(s(&r.json["amount"]), "20");
    assert!(s(&r.json["providerRef"]).starts_with("sbx_ch_"));
    assert_eq!(s(&r.json["invoiceStatus"]), "issued");
    assert_eq!(fx.sub_status().await, "past_due");

    // The rest (the default amount is what is due): paid, and the subscription is active.
    let r = fx.pay(&inv, json!({"card": "4242424242424242"})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["amount"]), "41.29");
    assert_eq!(s(&r.json["invoiceStatus"]), "paid");
    assert_eq!(fx.sub_status().await, "active");
    let r = fx.pay(&inv, json!({"card": "4242424242424242"})).await;
    assert_eq!(r.status, 409, "{}", r.text);

    let list = fx
        .call(
            "GET",
            &format!("/api/v1/payments?invoice={inv}&status=succeeded"),
            None,
        )
        .await;
    let amounts: Vec<&str> = list.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| s(&p["amount"]))
        .collect();
    assert_eq!(amounts, ["20", "41.29"]);
    let events = fx
        .call(
            "GET",
            &format!("/api/v1/subscriptions/{}/events", fx.sub),
            None,
        )
        .await;
    let names: Vec<&str> = events.json["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| s(&e["event"]))
        .collect();
    assert_eq!(
        names,
        [
            "created",
            "payment_failed",
            "payment_failed",
            "payment_failed",
            "payment_succeeded"
        ]
    );
    // The other tenant sees none of it.
    let other = fx.api.api_key(fx.api.b, &["admin"]).await;
    let pid = s(&list.json["items"][0]["id"]).to_string();
    let r = fx
        .api
        .call("GET", &format!("/api/v1/payments/{pid}"), &other, None)
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_confirmation_settles_on_refresh() {
    let fx = Fx::new(|s| s.payments.sandbox_confirm_delay = Duration::from_secs(3)).await;
    let inv = fx.issued("2026-02").await;
    let r = fx.pay(&inv, json!({"card": "4000000000000077"})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["status"]), "pending");
    let pid = s(&r.json["id"]).to_string();
    // What is pending counts as collected: no second charge, no manual mark-paid.
    let r = fx.pay(&inv, json!({"card": "4242424242424242"})).await;
    assert_eq!((r.status, r.code()), (409, "nothing_due"), "{}", r.text);
    let r = fx
        .call("POST", &format!("/api/v1/invoices/{inv}/mark-paid"), None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (409, "payments_pending"),
        "{}",
        r.text
    );
    let refresh = format!("/api/v1/payments/{pid}/refresh");
    let r = fx.call("POST", &refresh, None).await;
    assert_eq!(
        s(&r.json["status"]),
        "pending",
        "not settled yet: {}",
        r.text
    );
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = fx.call("POST", &refresh, None).await;
    assert_eq!(s(&r.json["status"]), "succeeded", "{}", r.text);
    assert_eq!(s(&r.json["invoiceStatus"]), "paid");

    // A delayed decline: pending first, then failed, and the subscription past due.
    let inv2 = fx.issued("2026-03").await;
    let r = fx.pay(&inv2, json!({"card": "4000000000000341"})).await;
    assert_eq!(s(&r.json["status"]), "pending");
    assert_eq!(r.json["failureCode"], Value::Null);
    let pid = s(&r.json["id"]).to_string();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = fx
        .call("POST", &format!("/api/v1/payments/{pid}/refresh"), None)
        .await;
    assert_eq!(s(&r.json["status"]), "failed", "{}", r.text);
    assert_eq!(s(&r.json["failureCode"]), "card_declined");
    assert_eq!(fx.sub_status().await, "past_due");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_full_and_partial_and_void_refused() {
    let fx = Fx::new(|_| {}).await;
    let inv = fx.issued("2026-04").await;
    let r = fx.pay(&inv, json!({"card": "4242424242424242"})).await;
    let pid = s(&r.json["id"]).to_string();
    let refunds = format!("/api/v1/payments/{pid}/refunds");
    let r = fx
        .call(
            "POST",
            &refunds,
            Some(json!({"amount": "10", "reason": "goodwill"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["refunded"]), "10");
    assert_eq!(s(&r.json["refunds"][0]["status"]), "succeeded");
    assert!(s(&r.json["refunds"][0]["providerRef"]).starts_with("sbx_re_"));
    let r = fx
        .call("POST", &refunds, Some(json!({"amount": "60"})))
        .await;
    assert_eq!(
        (r.status, s(&r.json["field"])),
        (400, "amount"),
        "{}",
        r.text
    );
    assert!(r.text.contains("51.29"), "{}", r.text);
    // The rest, by default.
    let r = fx.call("POST", &refunds, None).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(s(&r.json["refunded"]), "61.29");
    let r = fx.call("POST", &refunds, None).await;
    assert_eq!(r.status, 400, "nothing left: {}", r.text);
    // The provider's books agree.
    let sum: rust_decimal::Decimal = fx
        .api
        .db
        .query_one(
            "SELECT sum(r.amount) FROM sandbox_refunds r JOIN sandbox_charges c ON c.id = r.charge_id
              WHERE c.idempotency_key = $1",
            &[&pid],
        )
        .await
        .expect("sum")
        .get(0);
    assert_eq!(sum.to_string(), "61.29");

    // A failed payment cannot be refunded; an issued invoice holding money cannot be voided.
    let inv2 = fx.issued("2026-05").await;
    let r = fx.pay(&inv2, json!({"card": "4000000000000002"})).await;
    let failed = s(&r.json["id"]).to_string();
    let r = fx
        .call("POST", &format!("/api/v1/payments/{failed}/refunds"), None)
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    fx.pay(&inv2, json!({"card": "4242424242424242", "amount": "5"}))
        .await;
    let r = fx
        .call("POST", &format!("/api/v1/invoices/{inv2}/void"), None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (409, "invoice_has_payments"),
        "{}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_notes_per_line_and_full() {
    let fx = Fx::new(|_| {}).await;
    let inv = fx.issued("2026-06").await;
    let path = format!("/api/v1/invoices/{inv}/credit-notes");
    for (body, field) in [
        (json!({"lines": [{"line": 2, "amount": "1"}]}), "reason"),
        (json!({"reason": "x"}), "lines"),
        (
            json!({"reason": "x", "lines": [{"line": 9, "amount": "1"}]}),
            "lines[0].line",
        ),
        (
            json!({"reason": "x", "lines": [{"line": 2, "amount": "z"}]}),
            "lines[0].amount",
        ),
        (
            json!({"reason": "x", "lines": [{"line": 2, "amount": "2.99"}]}),
            "lines.amount",
        ),
    ] {
        let r = fx.call("POST", &path, Some(body.clone())).await;
        assert_eq!(
            (r.status, s(&r.json["field"])),
            (400, field),
            "{body}: {}",
            r.text
        );
    }
    // 1.00 of the usage line (2.98 gross, 0.48 tax): the tax part is 1.00 × 0.48 / 2.98 = 0.16.
    let r = fx
        .call(
            "POST",
            &path,
            Some(json!({"reason": "usage billed twice", "lines": [{"line": 2, "amount": "1.00"}]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["number"], 1);
    assert_eq!(s(&r.json["total"]), "-1");
    assert_eq!(s(&r.json["tax"]), "-0.16");
    assert_eq!(s(&r.json["net"]), "-0.84");
    // What is due drops by the credit: the default payment is 60.29.
    let list = fx.call("GET", &path, None).await;
    assert_eq!(s(&list.json["due"]), "60.29");
    let r = fx
        .pay(&inv, json!({"card": "4242424242424242", "amount": "30"}))
        .await;
    assert_eq!(s(&r.json["invoiceStatus"]), "issued");
    // Crediting everything left (30.29 of payments are not needed any more): paid.
    let r = fx
        .call(
            "POST",
            &path,
            Some(json!({"reason": "contract ended", "full": true})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["number"], 2);
    assert_eq!(s(&r.json["total"]), "-60.29");
    assert_eq!(s(&fx.invoice(&inv).await["status"]), "paid");
    let r = fx
        .call(
            "POST",
            &path,
            Some(json!({"reason": "again", "full": true})),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (409, "nothing_to_credit"),
        "{}",
        r.text
    );
    let list = fx.call("GET", &path, None).await;
    assert_eq!(list.json["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(s(&list.json["credited"]), "61.29");
    // A draft cannot be credited.
    let draft = fx.issued("2026-07").await;
    fx.api
        .db
        .execute(
            "UPDATE invoices SET status = 'draft', number = NULL WHERE id = $1::text::uuid",
            &[&draft],
        )
        .await
        .expect("draft");
    let r = fx
        .call(
            "POST",
            &format!("/api/v1/invoices/{draft}/credit-notes"),
            Some(json!({"reason": "x", "full": true})),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "invalid_state"), "{}", r.text);
}

/// Every kind of mismatch reconcile knows, each planted once in the ledger or in the sandbox
/// provider's books, beside clean payments that must not be reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_every_planted_mismatch() {
    let fx = Fx::new(|_| {}).await;
    let db = &fx.api.db;
    let mut paid = Vec::new();
    for m in 1..=12 {
        let inv = fx.issued(&format!("2025-{m:02}")).await;
        let r = fx.pay(&inv, json!({"card": "4242424242424242"})).await;
        assert_eq!(s(&r.json["status"]), "succeeded", "{}", r.text);
        paid.push((
            inv,
            s(&r.json["id"]).to_string(),
            s(&r.json["providerRef"]).to_string(),
        ));
    }
    let exec = |sql: &'static str, a: String| async move {
        let n = db.execute(sql, &[&a]).await.expect(sql);
        assert!(n >= 1, "{sql}");
    };
    let refund = |pid: String, amount: &'static str| {
        let path = format!("/api/v1/payments/{pid}/refunds");
        let fx = &fx;
        async move {
            let r = fx
                .call("POST", &path, Some(json!({"amount": amount})))
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
            s(&r.json["refunds"][0]["providerRef"]).to_string()
        }
    };
    // 0 and 1 stay clean (1 with a matching partial refund).
    refund(paid[1].1.clone(), "5").await;
    exec(
        "UPDATE sandbox_charges SET amount = amount + 1 WHERE id = $1",
        paid[2].2.clone(),
    )
    .await;
    exec(
        "UPDATE sandbox_charges SET currency = 'USD' WHERE id = $1",
        paid[3].2.clone(),
    )
    .await;
    exec(
        "UPDATE sandbox_charges SET status = 'failed' WHERE id = $1",
        paid[4].2.clone(),
    )
    .await;
    exec(
        "DELETE FROM sandbox_charges WHERE id = $1",
        paid[5].2.clone(),
    )
    .await;
    exec(
        "INSERT INTO sandbox_refunds (id, charge_id, idempotency_key, amount, status)
         VALUES ('sbx_re_planted', $1, 'planted', 3, 'succeeded')",
        paid[6].2.clone(),
    )
    .await;
    let gone = refund(paid[7].1.clone(), "4").await;
    exec("DELETE FROM sandbox_refunds WHERE id = $1", gone).await;
    let changed = refund(paid[8].1.clone(), "4").await;
    exec(
        "UPDATE sandbox_refunds SET amount = 2 WHERE id = $1",
        changed,
    )
    .await;
    exec(
        "UPDATE sandbox_charges SET metadata = jsonb_set(metadata, '{payment}', '\"00000000-0000-0000-0000-000000000001\"')
          WHERE id = $1",
        paid[9].2.clone(),
    )
    .await;
    // Invoices against payments.
    exec(
        "UPDATE invoices SET status = 'issued' WHERE id = $1::text::uuid",
        paid[10].0.clone(),
    )
    .await;
    exec(
        "INSERT INTO payments (tenant_id, invoice_id, provider, amount, currency, status)
         SELECT tenant_id, id, 'manual', 7, 'USD', 'succeeded' FROM invoices WHERE id = $1::text::uuid",
        paid[11].0.clone(),
    )
    .await;
    let unpaid = fx.issued("2024-01").await;
    exec(
        "UPDATE invoices SET status = 'paid' WHERE id = $1::text::uuid",
        unpaid.clone(),
    )
    .await;
    // A charge at the provider that no payment of ours records.
    exec(
        "INSERT INTO sandbox_charges (id, tenant_id, idempotency_key, amount, currency, card_last4, status)
         VALUES ('sbx_ch_stray', $1::text::uuid, 'stray', 12, 'EUR', '4242', 'succeeded')",
        fx.api.a.to_string(),
    )
    .await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_control-api"))
        .args(["payments", "reconcile", "--tenant", &fx.api.a.to_string()])
        .env("DATABASE_URL", &fx.api.url)
        .output()
        .expect("run control-api");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
    let found: Vec<(String, String, String)> = report["mismatches"]
        .as_array()
        .expect("mismatches")
        .iter()
        .map(|m| {
            (
                s(&m["kind"]).to_string(),
                s(&m["payment"]).to_string(),
                s(&m["invoice"]).to_string(),
            )
        })
        .collect();
    let has = |kind: &str, payment: Option<&str>, invoice: Option<&str>| {
        found.iter().any(|(k, p, i)| {
            k == kind && payment.is_none_or(|x| x == p) && invoice.is_none_or(|x| x == i)
        })
    };
    let p = |i: usize| Some(paid[i].1.as_str());
    let inv = |i: usize| Some(paid[i].0.as_str());
    for (kind, payment, invoice) in [
        ("amount_mismatch", p(2), None),
        ("currency_mismatch", p(3), None),
        ("status_mismatch", p(4), None),
        ("payment_missing_at_provider", p(5), None),
        ("refund_missing_in_ledger", p(6), None),
        ("refund_amount_mismatch", p(6), None),
        ("refund_missing_at_provider", p(7), None),
        ("refund_amount_mismatch", p(8), None),
        ("metadata_mismatch", p(9), None),
        ("invoice_unpaid_but_covered", None, inv(10)),
        ("invoice_overpaid", None, inv(11)),
        ("payment_currency_differs_from_invoice", None, inv(11)),
        ("invoice_paid_without_payment", None, Some(unpaid.as_str())),
        ("charge_missing_in_ledger", None, None),
    ] {
        assert!(
            has(kind, payment, invoice),
            "{kind} {payment:?} {invoice:?} not in {found:#?}"
        );
    }
    // Nothing is said of the clean payments.
    for i in [0, 1] {
        assert!(
            !found
                .iter()
                .any(|(_, pp, ii)| pp == &paid[i].1 || ii == &paid[i].0),
            "clean payment {i} reported: {found:#?}"
        );
    }
    assert_eq!(report["payments"], 13);
    // The other tenant has nothing to reconcile: exit 0.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_control-api"))
        .args(["payments", "reconcile", "--tenant", &fx.api.b.to_string()])
        .env("DATABASE_URL", &fx.api.url)
        .output()
        .expect("run control-api");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
