//! Usage threshold alerts on the real pipeline: events through ingest, the broker and the
//! aggregator into the rollups, then control-api's evaluator. 80 % fires once however often it
//! runs; a late event (behind the watermark, stored as a correction) pushes usage past 90 %.

mod common;

use common::{event, Pipeline};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

async fn firings(db: &tokio_postgres::Client) -> Vec<i32> {
    db.query(
        "SELECT percent FROM threshold_firings ORDER BY percent",
        &[],
    )
    .await
    .expect("firings")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn late_events_push_usage_over_a_threshold_once() {
    let p = Pipeline::new(2).await;
    let ok = |r: common::Resp| {
        assert!(r.status == 200 || r.status == 201, "{}", r.body);
        r.json()
    };
    p.create_meter(json!({"slug": "tokens", "eventType": "tokens", "aggregation": "SUM", "valueProperty": "$.n"}))
        .await;
    ok(p
        .api(
            "POST",
            "/api/v1/plans",
            &p.key,
            Some(json!({"key": "pro", "name": "Pro", "tier": "pro", "currency": "EUR", "recurringFee": "10",
                        "prices": [{"meter": "tokens", "price": {"type": "unit", "amount": "0.01"}, "entitlement": "1000"}]})),
        )
        .await);
    ok(p.api(
        "POST",
        "/api/v1/customers",
        &p.key,
        Some(json!({"key": "acme", "currency": "EUR", "timezone": "UTC", "subjects": ["acme-1"]})),
    )
    .await);
    let now = chrono::Utc::now();
    let month = now.format("%Y-%m-01T00:00:00Z").to_string();
    ok(p.api(
        "POST",
        "/api/v1/subscriptions",
        &p.key,
        Some(json!({"customer": "acme", "plan": "pro", "startedAt": month})),
    )
    .await);
    ok(p.api(
        "POST",
        "/api/v1/notification-channels",
        &p.key,
        Some(json!({"kind": "email", "email": "ops@acme.test"})),
    )
    .await);

    let (stop, task) = p.spawn_aggregator("a");
    let t = |d: chrono::Duration| {
        let month_start = chrono::DateTime::parse_from_rfc3339(&month)
            .expect("month")
            .with_timezone(&chrono::Utc);
        (now - d)
            .max(month_start + chrono::Duration::minutes(1))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let batch: Vec<_> = (0..17)
        .map(|i| {
            event(
                &format!("e{i}"),
                "tokens",
                "acme-1",
                &t(chrono::Duration::zero()),
                json!({"n": 50}),
            )
        })
        .collect();
    p.post_events(&p.key, &batch).await;
    p.wait_accounted(p.tenant, 17, WAIT).await;

    let key = control_api::crypto::ServerKey::ephemeral();
    let mut db = control_api::db::connect(&p.db_url).await.expect("db");
    for _ in 0..3 {
        control_api::notify::evaluate(&mut db, &key, chrono::Utc::now())
            .await
            .expect("evaluate");
    }
    assert_eq!(firings(&p.db).await, [80], "850 of 1000, fired once");

    // Two hours late (behind the watermark): stored as a correction, 850 + 60 = 910.
    let late = event(
        "late",
        "tokens",
        "acme-1",
        &t(chrono::Duration::hours(2)),
        json!({"n": 60}),
    );
    p.post_events(&p.key, &[late]).await;
    p.wait_accounted(p.tenant, 18, WAIT).await;
    for _ in 0..2 {
        control_api::notify::evaluate(&mut db, &key, chrono::Utc::now())
            .await
            .expect("evaluate");
    }
    assert_eq!(firings(&p.db).await, [80, 90]);
    let usage: rust_decimal::Decimal =
        p.db.query_one(
            "SELECT usage FROM threshold_firings WHERE percent = 90",
            &[],
        )
        .await
        .expect("usage")
        .get(0);
    assert_eq!(usage, rust_decimal::Decimal::from(910));
    stop.cancel();
    task.await.expect("stopped");
}
