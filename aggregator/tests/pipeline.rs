//! Meters API and the path of events from ingest through the aggregator to the meter query,
//! against the real broker and PostgreSQL.

mod common;

use common::{event, Pipeline};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn meters_api_follows_openmeter_and_isolates_tenants() {
    let p = Pipeline::new(2).await;
    let m = p
        .create_meter(
            json!({"slug": "tokens", "eventType": "prompt", "aggregation": "SUM",
                             "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}),
        )
        .await;
    assert_eq!(m["slug"], "tokens");
    assert_eq!(m["aggregation"], "SUM");
    assert_eq!(m["groupBy"]["model"], "$.model");
    let id = m["id"].as_str().expect("id").to_string();

    // Same slug again: 409 naming the field.
    let r = p
        .api(
            "POST",
            "/api/v1/meters",
            &p.key,
            Some(json!({"slug": "tokens", "eventType": "x", "aggregation": "COUNT"})),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["field"], "slug");

    // Each invalid field is named.
    for (body, field) in [
        (
            json!({"slug": "Bad Slug", "eventType": "x", "aggregation": "COUNT"}),
            "slug",
        ),
        (json!({"slug": "a", "aggregation": "COUNT"}), "eventType"),
        (
            json!({"slug": "a", "eventType": "x", "aggregation": "MEDIAN"}),
            "aggregation",
        ),
        (
            json!({"slug": "a", "eventType": "x", "aggregation": "SUM"}),
            "valueProperty",
        ),
        (
            json!({"slug": "a", "eventType": "x", "aggregation": "SUM", "valueProperty": "tokens"}),
            "valueProperty",
        ),
        (
            json!({"slug": "a", "eventType": "x", "aggregation": "COUNT", "groupBy": {"m": "$..m"}}),
            "groupBy.m",
        ),
    ] {
        let r = p
            .api("POST", "/api/v1/meters", &p.key, Some(body.clone()))
            .await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.json()["field"], field, "{body}: {}", r.body);
    }
    let r = p
        .api(
            "POST",
            "/api/v1/meters",
            &p.key,
            Some(json!({"slug": "a", "eventType": "x", "aggregation": "COUNT", "extra": 1})),
        )
        .await;
    assert_eq!(r.status, 400, "unknown fields are refused: {}", r.body);

    for path in [
        "/api/v1/meters/tokens".to_string(),
        format!("/api/v1/meters/{id}"),
    ] {
        let r = p.api("GET", &path, &p.key, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.json()["id"], id.as_str());
    }
    let r = p.api("GET", "/api/v1/meters", &p.key, None).await;
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));

    // Another tenant sees nothing of it, by slug or id, and cannot delete or query it.
    let (_, other) = p.other_tenant().await;
    for (method, path) in [
        ("GET", "/api/v1/meters/tokens".to_string()),
        ("GET", format!("/api/v1/meters/{id}")),
        ("DELETE", format!("/api/v1/meters/{id}")),
        ("GET", format!("/api/v1/meters/{id}/query")),
    ] {
        let r = p.api(method, &path, &other, None).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    let r = p.api("GET", "/api/v1/meters", &other, None).await;
    assert_eq!(r.json(), json!([]));

    // No key, a wrong key, a key without the scope.
    let r = p.api("GET", "/api/v1/meters", "mk_nope", None).await;
    assert_eq!(r.status, 401);
    let ingest_only = control_api::keys::create_key(&p.db, p.tenant, Default::default())
        .await
        .expect("key");
    let r = p.api("GET", "/api/v1/meters", &ingest_only.key, None).await;
    assert_eq!(r.status, 403, "{}", r.body);

    // The same API through ingest's base URL (forwarded).
    let auth = format!("Bearer {}", p.key);
    let r = common::send(
        p.ingest,
        "GET",
        "/api/v1/meters/tokens",
        &[("authorization", &auth)],
        Default::default(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = p.api("DELETE", "/api/v1/meters/tokens", &p.key, None).await;
    assert_eq!(r.status, 204);
    let r = p.api("GET", "/api/v1/meters/tokens", &p.key, None).await;
    assert_eq!(r.status, 404);
    // The slug is free again.
    p.create_meter(json!({"slug": "tokens", "eventType": "prompt", "aggregation": "COUNT"}))
        .await;
}

#[tokio::test]
async fn every_event_is_counted_once_or_accounted_for() {
    let p = Pipeline::new(4).await;
    for (slug, agg, value) in [
        ("t_sum", "SUM", Some("$.tokens")),
        ("t_count", "COUNT", None),
        ("t_avg", "AVG", Some("$.tokens")),
        ("t_min", "MIN", Some("$.tokens")),
        ("t_max", "MAX", Some("$.tokens")),
        ("t_latest", "LATEST", Some("$.tokens")),
        ("t_users", "UNIQUE_COUNT", Some("$.user")),
    ] {
        let mut m = json!({"slug": slug, "eventType": "prompt", "aggregation": agg, "groupBy": {"model": "$.model"}});
        if let Some(v) = value {
            m["valueProperty"] = json!(v);
        }
        p.create_meter(m).await;
    }
    let (stop, task) = p.spawn_aggregator("a1");
    let now = chrono::Utc::now();
    let minute = |back: i64| {
        let t = now - chrono::Duration::minutes(back);
        t.format("%Y-%m-%dT%H:%M:30Z").to_string()
    };
    let events = vec![
        event(
            "e1",
            "prompt",
            "cust-1",
            &minute(3),
            json!({"tokens": 10, "model": "a", "user": "u1"}),
        ),
        event(
            "e2",
            "prompt",
            "cust-1",
            &minute(3),
            json!({"tokens": "2.5", "model": "a", "user": "u2"}),
        ),
        event(
            "e3",
            "prompt",
            "cust-1",
            &minute(2),
            json!({"tokens": 0.1, "model": "b", "user": "u1"}),
        ),
        event(
            "e4",
            "prompt",
            "cust-2",
            &minute(2),
            json!({"tokens": 1e2, "model": "b", "user": "u3"}),
        ),
        // Duplicates of e1 (same tenant, source, id): counted once.
        event(
            "e1",
            "prompt",
            "cust-1",
            &minute(3),
            json!({"tokens": 10, "model": "a", "user": "u1"}),
        ),
        // No meter for this type: unmetered, not an error.
        event("e5", "other", "cust-1", &minute(2), json!({})),
        // Unmeterable values: rejected with a reason, dead-lettered, nothing of them counted.
        event(
            "e6",
            "prompt",
            "cust-1",
            &minute(2),
            json!({"model": "a", "user": "u9"}),
        ),
        event(
            "e7",
            "prompt",
            "cust-1",
            &minute(2),
            json!({"tokens": "many", "model": "a", "user": "u9"}),
        ),
        // Beyond the 35-day horizon.
        event(
            "e8",
            "prompt",
            "cust-1",
            &(now - chrono::Duration::days(40))
                .format("%Y-%m-%dT%H:%M:00Z")
                .to_string(),
            json!({"tokens": 1, "model": "a", "user": "u1"}),
        ),
    ];
    p.post_events(&p.key, &events).await;
    p.post_events(&p.key, &events[..1]).await; // one more duplicate, in another request
    p.wait_accounted(p.tenant, events.len() as i64 + 1, WAIT)
        .await;

    let o = p.outcomes(p.tenant).await;
    assert_eq!(o.get("accepted"), Some(&4), "{o:?}");
    assert_eq!(o.get("duplicate"), Some(&2), "{o:?}");
    assert_eq!(o.get("unmetered"), Some(&1), "{o:?}");
    assert_eq!(o.get("rejected:value_missing"), Some(&1), "{o:?}");
    assert_eq!(o.get("rejected:value_not_a_number"), Some(&1), "{o:?}");
    assert_eq!(o.get("rejected:beyond_lateness_horizon"), Some(&1), "{o:?}");
    let dl: Vec<(String, String)> =
        p.db.query(
            "SELECT event_id, reason FROM dead_letters WHERE tenant_id = $1 ORDER BY event_id",
            &[&p.tenant],
        )
        .await
        .expect("dead letters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        dl,
        vec![
            ("e6".into(), "value_missing".into()),
            ("e7".into(), "value_not_a_number".into()),
            ("e8".into(), "beyond_lateness_horizon".into()),
        ]
    );

    let from = (now - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:00Z")
        .to_string();
    let to = (now + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:00Z")
        .to_string();
    let total = |v: serde_json::Value| v["data"][0]["value"].clone();
    let q = |slug: &'static str, extra: &'static str| {
        let params = format!("from={from}&to={to}{extra}");
        let p = &p;
        async move { p.query(slug, &params).await }
    };
    assert_eq!(total(q("t_sum", "").await), json!(112.6));
    assert_eq!(total(q("t_count", "").await), json!(4));
    assert_eq!(total(q("t_avg", "").await), json!(28.15));
    assert_eq!(total(q("t_min", "").await), json!(0.1));
    assert_eq!(total(q("t_max", "").await), json!(100));
    assert_eq!(total(q("t_users", "").await), json!(3));
    // LATEST by event time: e3 and e4 share the latest minute... and second: the larger wins.
    assert_eq!(total(q("t_latest", "").await), json!(100));

    // By subject and model.
    let r = q("t_sum", "&groupBy=subject&groupBy=model").await;
    let rows: Vec<(String, String, serde_json::Value)> = r["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|d| {
            (
                d["subject"].as_str().unwrap_or("").to_string(),
                d["groupBy"]["model"].as_str().unwrap_or("").to_string(),
                d["value"].clone(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("cust-1".into(), "a".into(), json!(12.5)),
            ("cust-1".into(), "b".into(), json!(0.1)),
            ("cust-2".into(), "b".into(), json!(100)),
        ]
    );
    let r = q("t_sum", "&subject=cust-1&filterGroupBy%5Bmodel%5D=a").await;
    assert_eq!(total(r), json!(12.5));
    let r = q("t_sum", "&windowSize=MINUTE").await;
    let values: Vec<serde_json::Value> = r["data"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|d| d["value"].clone())
        .collect();
    assert_eq!(values, vec![json!(12.5), json!(100.1)]);

    // A meter created now applies to events received from now on; one deleted stops counting.
    p.create_meter(json!({"slug": "late_meter", "eventType": "prompt", "aggregation": "COUNT"}))
        .await;
    let r = p
        .api("DELETE", "/api/v1/meters/t_count", &p.key, None)
        .await;
    assert_eq!(r.status, 204);
    p.post_events(
        &p.key,
        &[event(
            "e9",
            "prompt",
            "cust-1",
            &minute(1),
            json!({"tokens": 1, "model": "a", "user": "u1"}),
        )],
    )
    .await;
    p.wait_accounted(p.tenant, events.len() as i64 + 2, WAIT)
        .await;
    assert_eq!(total(q("late_meter", "").await), json!(1));
    assert_eq!(total(q("t_sum", "").await), json!(113.6));
    let count: i64 = p.db.query_one(
        "SELECT sum(event_count)::int8 FROM usage_minute u JOIN meters m ON m.id = u.meter_id WHERE m.slug = 't_count'", &[])
        .await.expect("count").get(0);
    assert_eq!(count, 4, "a deleted meter counts no new events");

    stop.cancel();
    task.await.expect("aggregator stops");
}

#[tokio::test]
async fn dedup_survives_a_restart_and_ids_are_per_tenant() {
    let p = Pipeline::new(2).await;
    let (other, other_key) = p.other_tenant().await;
    p.create_meter(json!({"slug": "calls", "eventType": "call", "aggregation": "COUNT"}))
        .await;
    let r = p
        .api(
            "POST",
            "/api/v1/meters",
            &other_key,
            Some(json!({"slug": "calls", "eventType": "call", "aggregation": "COUNT"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let t = chrono::Utc::now().format("%Y-%m-%dT%H:%M:00Z").to_string();
    let e = event("same-id", "call", "s", &t, json!({}));

    let (stop, task) = p.spawn_aggregator("first");
    p.post_events(&p.key, std::slice::from_ref(&e)).await;
    p.wait_accounted(p.tenant, 1, WAIT).await;
    stop.cancel();
    task.await.expect("stopped");

    // Same id again after a restart: a duplicate. The same id from another tenant: its own event.
    let (stop, task) = p.spawn_aggregator("second");
    p.post_events(&p.key, std::slice::from_ref(&e)).await;
    p.post_events(&other_key, std::slice::from_ref(&e)).await;
    p.wait_accounted(p.tenant, 2, WAIT).await;
    p.wait_accounted(other, 1, WAIT).await;
    assert_eq!(p.outcomes(p.tenant).await.get("duplicate"), Some(&1));
    assert_eq!(p.outcomes(other).await.get("accepted"), Some(&1));

    // The same (source, id) under other subjects (other partitions, other shards' keys): still
    // the same event, counted once.
    for subject in ["s2", "s3", "s4"] {
        let again = event("same-id", "call", subject, &t, json!({}));
        p.post_events(&p.key, std::slice::from_ref(&again)).await;
    }
    p.wait_accounted(p.tenant, 5, WAIT).await;
    assert_eq!(p.outcomes(p.tenant).await.get("duplicate"), Some(&4));
    assert_eq!(p.outcomes(p.tenant).await.get("accepted"), Some(&1));
    stop.cancel();
    task.await.expect("stopped");

    // What is stored is the key both sides compute: the flush in Rust, operators in SQL
    // (`metering_dedup_key`), one per (tenant, source, id).
    let stored: Vec<uuid::Uuid> =
        p.db.query("SELECT key FROM dedup_keys ORDER BY key", &[])
            .await
            .expect("keys")
            .iter()
            .map(|r| r.get(0))
            .collect();
    let mut expected = Vec::new();
    for tenant in [p.tenant, other] {
        let sql: uuid::Uuid =
            p.db.query_one(
                "SELECT metering_dedup_key($1, 'test', 'same-id')",
                &[&tenant],
            )
            .await
            .expect("sql key")
            .get(0);
        assert_eq!(
            sql,
            aggregator::process::dedup_key(&tenant, "test", "same-id")
        );
        expected.push(sql);
    }
    expected.sort();
    assert_eq!(stored, expected);
}

#[tokio::test]
async fn metrics_show_outcomes_partitions_and_freshness() {
    let p = Pipeline::new(2).await;
    p.create_meter(json!({"slug": "calls", "eventType": "call", "aggregation": "COUNT"}))
        .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = p.child_aggregator_with("metrics", &[("AGGREGATOR_METRICS_LISTEN", &listen)]);
    let t = chrono::Utc::now().format("%Y-%m-%dT%H:%M:00Z").to_string();
    let events = vec![
        event("m1", "call", "a", &t, json!({})),
        event("m2", "call", "b", &t, json!({})),
        event("m1", "call", "a", &t, json!({})),
        event("m3", "other", "a", &t, json!({})),
    ];
    p.post_events(&p.key, &events).await;
    p.wait_accounted(p.tenant, 4, WAIT).await;
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    let value = |body: &str, name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    // The flush's metrics are recorded right after its commit: poll briefly.
    let mut body = String::new();
    for _ in 0..50 {
        body = common::send(addr, "GET", "/metrics", &[], Default::default())
            .await
            .body;
        if value(&body, "aggregator_events_total{outcome=\"unmetered\"}") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        value(&body, "aggregator_events_total{outcome=\"accepted\"}"),
        2.0,
        "{body}"
    );
    assert_eq!(
        value(&body, "aggregator_events_total{outcome=\"duplicate\"}"),
        1.0,
        "{body}"
    );
    assert_eq!(
        value(&body, "aggregator_events_total{outcome=\"unmetered\"}"),
        1.0,
        "{body}"
    );
    assert_eq!(value(&body, "aggregator_dedup_hits_total"), 1.0, "{body}");
    assert_eq!(value(&body, "aggregator_owned_partitions"), 2.0, "{body}");
    assert!(
        value(&body, "aggregator_freshness_seconds_count") >= 1.0,
        "{body}"
    );
    assert!(
        value(&body, "aggregator_flush_seconds_count") >= 1.0,
        "{body}"
    );
    common::kill9(&mut child);
}
