//! Plans, tax rates, customers, subscriptions and invoices through the HTTP API, against the real
//! PostgreSQL: shapes, validation naming the field, conflicts, scopes and tenant isolation.

use control_api::keys::{create_key, create_tenant, NewKey};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Api {
    addr: std::net::SocketAddr,
    db: tokio_postgres::Client,
    tenant: uuid::Uuid,
    admin: String,
    reader: String,
    other: String,
    _stop: tokio_util::sync::DropGuard,
}

async fn key(db: &tokio_postgres::Client, tenant: uuid::Uuid, scopes: &[&str]) -> String {
    create_key(
        db,
        tenant,
        NewKey {
            name: "test".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            allowed_cidrs: None,
            rate_limit_rps: None,
            ..Default::default()
        },
    )
    .await
    .expect("key")
    .key
}

impl Api {
    async fn start() -> Api {
        let (url, db) = schemas::testing::fresh_database().await;
        let t = create_tenant(&db, "catalog").await.expect("tenant");
        let o = create_tenant(&db, "other").await.expect("tenant");
        let stop = CancellationToken::new();
        let run =
            control_api::http::start("127.0.0.1:0".parse().expect("addr"), &url, stop.clone())
                .await
                .expect("control-api");
        Api {
            addr: run.addr,
            tenant: t.id,
            admin: key(&db, t.id, &["admin"]).await,
            reader: key(&db, t.id, &["read"]).await,
            other: key(&db, o.id, &["admin"]).await,
            db,
            _stop: stop.drop_guard(),
        }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let (status, payload) = self.raw(method, path, key, body).await;
        // Chunked or not: the JSON is the part between the first `{`/`[` and the last `}`/`]`.
        let json = match (payload.find(['{', '[']), payload.rfind(['}', ']'])) {
            (Some(a), Some(b)) => serde_json::from_str(&payload[a..=b]).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        (status, json)
    }

    /// Status and body text.
    async fn raw(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, String) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).to_string();
        let status: u16 = text[9..12].parse().expect("status");
        let (_, payload) = text.split_once("\r\n\r\n").expect("head");
        (status, payload.to_string())
    }
}

/// POSTs `body` with the admin key and expects 201; returns the created object.
async fn created(api: &Api, path: &str, body: Value) -> Value {
    let (s, b) = api.call("POST", path, &api.admin, Some(body)).await;
    assert_eq!(s, 201, "{path}: {b}");
    b
}

async fn meter(api: &Api, slug: &str, agg: &str) {
    let mut m = json!({"slug": slug, "eventType": slug, "aggregation": agg});
    if agg != "COUNT" {
        m["valueProperty"] = json!("$.value");
    }
    let (s, b) = api
        .call("POST", "/api/v1/meters", &api.admin, Some(m))
        .await;
    assert_eq!(s, 201, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_customers_and_subscriptions() {
    let api = Api::start().await;
    meter(&api, "tokens", "SUM").await;
    meter(&api, "requests", "COUNT").await;
    let plan = json!({
        "key": "pro", "name": "Pro", "tier": "pro", "currency": "EUR", "recurringFee": "49",
        "prices": [
            {"meter": "tokens", "price": {"type": "tiered", "mode": "graduated", "tiers": [
                {"upToAmount": "1000000", "unitPrice": {"type": "unit", "amount": "0.000002"}},
                {"unitPrice": {"type": "unit", "amount": "0.000001"}}]}, "entitlement": "5000000"},
            {"meter": "requests", "price": {"type": "unit", "amount": "0.001"}}
        ]
    });
    let (s, p) = api
        .call("POST", "/api/v1/plans", &api.admin, Some(plan.clone()))
        .await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["key"], "pro");
    assert_eq!(p["versions"][0]["version"], 1);
    assert_eq!(p["versions"][0]["recurringFee"], "49");
    assert_eq!(p["versions"][0]["prices"].as_array().map(Vec::len), Some(2));
    let (s, b) = api
        .call("POST", "/api/v1/plans", &api.admin, Some(plan))
        .await;
    assert_eq!((s, b["code"].as_str()), (409, Some("conflict")), "{b}");

    // Bad input names the field.
    for (body, field) in [
        (json!({"currency": "EUR"}), "key"),
        (json!({"key": "x", "currency": "EURO"}), "currency"),
        (
            json!({"key": "x", "tier": "gold", "currency": "EUR"}),
            "tier",
        ),
        (
            json!({"key": "x", "currency": "EUR", "recurringFee": "-1"}),
            "recurringFee",
        ),
        (
            json!({"key": "x", "currency": "EUR", "prices": [{"meter": "nope", "price": {"type": "unit", "amount": "1"}}]}),
            "prices[0].meter",
        ),
        (
            json!({"key": "x", "currency": "EUR", "prices": [{"meter": "tokens", "price": {"type": "unit"}}]}),
            "prices[0].price",
        ),
        (
            json!({"key": "x", "currency": "EUR", "prices": [{"meter": "tokens", "price": {"type": "tiered", "mode": "volume", "tiers": [
            {"upToAmount": "10", "unitPrice": {"type": "unit", "amount": "1"}},
            {"upToAmount": "5", "unitPrice": {"type": "unit", "amount": "1"}}]}}]}),
            "prices[0].price",
        ),
    ] {
        let (s, b) = api
            .call("POST", "/api/v1/plans", &api.admin, Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body} → {b}");
        assert_eq!(b["field"], field, "{body} → {b}");
    }

    // A new version; the first stays.
    let p = created(
        &api,
        "/api/v1/plans/pro/versions",
        json!({"currency": "EUR", "recurringFee": "59", "prices": []}),
    )
    .await;
    assert_eq!(p["versions"].as_array().map(Vec::len), Some(2));
    assert_eq!(p["versions"][1]["recurringFee"], "59");

    let (s, b) = api
        .call(
            "PUT",
            "/api/v1/tax-rates/DE",
            &api.admin,
            Some(json!({"rate": "19"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api
        .call(
            "PUT",
            "/api/v1/tax-rates/XX",
            &api.admin,
            Some(json!({"rate": "101"})),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("rate")));

    let cust = json!({"key": "acme", "name": "Acme", "currency": "EUR", "timezone": "Europe/Berlin",
                      "billingAnchorDay": 15, "taxRegion": "DE", "subjects": ["acme-1", "acme-2"]});
    let (s, c) = api
        .call("POST", "/api/v1/customers", &api.admin, Some(cust))
        .await;
    assert_eq!(s, 201, "{c}");
    assert_eq!(c["subjects"], json!(["acme-1", "acme-2"]));
    for (body, field, status) in [
        (
            json!({"key": "b", "currency": "EUR", "timezone": "Mars/Olympus"}),
            "timezone",
            400,
        ),
        (
            json!({"key": "b", "currency": "EUR", "billingAnchorDay": 32}),
            "billingAnchorDay",
            400,
        ),
        (json!({"key": "b"}), "currency", 400),
        (
            json!({"key": "b", "currency": "EUR", "subjects": ["acme-1"]}),
            "subjects[0]",
            409,
        ),
        (json!({"key": "acme", "currency": "EUR"}), "key", 409),
    ] {
        let (s, b) = api
            .call("POST", "/api/v1/customers", &api.admin, Some(body.clone()))
            .await;
        assert_eq!(
            (s, b["field"].as_str()),
            (status, Some(field)),
            "{body} → {b}"
        );
    }
    // A refused customer left nothing behind.
    let (_, list) = api
        .call("GET", "/api/v1/customers", &api.reader, None)
        .await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");

    let sub = created(&api, "/api/v1/subscriptions", json!({"customer": "acme", "plan": "pro", "version": 1, "startedAt": "2026-03-16T00:00:00+01:00"})).await;
    assert_eq!(
        (sub["plan"].as_str(), sub["version"].as_i64()),
        (Some("pro"), Some(1))
    );
    assert_eq!(sub["startedAt"], "2026-03-15T23:00:00.000Z");
    let (s, b) = api
        .call(
            "POST",
            "/api/v1/subscriptions",
            &api.admin,
            Some(json!({"customer": "acme", "plan": "pro", "startedAt": "2026-05-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(
        (s, b["field"].as_str()),
        (409, Some("customer")),
        "overlap: {b}"
    );
    for (body, field) in [
        (json!({"customer": "nobody", "plan": "pro"}), "customer"),
        (json!({"customer": "acme", "plan": "nope"}), "plan"),
        (
            json!({"customer": "acme", "plan": "pro", "version": 9}),
            "version",
        ),
        (
            json!({"customer": "acme", "plan": "pro", "startedAt": "yesterday"}),
            "startedAt",
        ),
    ] {
        let (s, b) = api
            .call(
                "POST",
                "/api/v1/subscriptions",
                &api.admin,
                Some(body.clone()),
            )
            .await;
        assert_eq!((s, b["field"].as_str()), (400, Some(field)), "{body} → {b}");
    }
    // Currency mismatch.
    created(
        &api,
        "/api/v1/plans",
        json!({"key": "usd", "currency": "USD"}),
    )
    .await;
    created(
        &api,
        "/api/v1/customers",
        json!({"key": "e2", "currency": "EUR"}),
    )
    .await;
    let (s, b) = api
        .call(
            "POST",
            "/api/v1/subscriptions",
            &api.admin,
            Some(json!({"customer": "e2", "plan": "usd"})),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("plan")), "{b}");

    // Scopes: a read key reads but cannot write.
    let (s, _) = api
        .call("GET", "/api/v1/plans/pro", &api.reader, None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/customers",
            &api.reader,
            Some(json!({"key": "r", "currency": "EUR"})),
        )
        .await;
    assert_eq!(s, 403);

    // Another tenant sees none of it, not even by id.
    let sid = sub["id"].as_str().expect("id").to_string();
    let cid = c["id"].as_str().expect("id").to_string();
    for path in [
        "/api/v1/plans/pro".to_string(),
        format!("/api/v1/customers/{cid}"),
        "/api/v1/customers/acme".to_string(),
        format!("/api/v1/subscriptions/{sid}"),
    ] {
        let (s, _) = api.call("GET", &path, &api.other, None).await;
        assert_eq!(s, 404, "{path}");
    }
    for path in [
        "/api/v1/plans",
        "/api/v1/customers",
        "/api/v1/subscriptions",
        "/api/v1/invoices",
        "/api/v1/tax-rates",
    ] {
        let (s, b) = api.call("GET", path, &api.other, None).await;
        let items = b.as_array().or_else(|| b["items"].as_array());
        assert_eq!((s, items.map(Vec::len)), (200, Some(0)), "{path}: {b}");
    }
    let (s, b) = api
        .call(
            "POST",
            "/api/v1/subscriptions",
            &api.other,
            Some(json!({"customer": "acme", "plan": "pro"})),
        )
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("customer")));
    // Without a key: 401.
    let (s, _) = api.call("GET", "/api/v1/plans", "nope", None).await;
    assert_eq!(s, 401);
}

/// Inserts a draft invoice as the rater writes one: two lines, one with a tier breakdown.
async fn draft(api: &Api, customer: &str, sub: &str, period: &str, end: &str) -> String {
    let row = api
        .db
        .query_one(
            "INSERT INTO invoices (tenant_id, customer_id, subscription_id, period, period_start, period_end,
                    currency, subtotal, tax, total, content_sha256)
             SELECT $1, c.id, $3::text::uuid, $4, $5::text::timestamptz - interval '30 days', $5::text::timestamptz,
                    'EUR', 51.5, 9.79, 61.29, '\\x00'
               FROM customers c WHERE c.tenant_id = $1 AND c.key = $2
             RETURNING id::text",
            &[&api.tenant, &customer, &sub, &period, &end],
        )
        .await
        .expect("draft");
    let id: String = row.get(0);
    api.db
        .execute(
            "INSERT INTO invoice_lines (invoice_id, position, tenant_id, kind, description, period_start,
                    period_end, quantity, amount, tax, total, tiers, price)
             SELECT i.id, p, i.tenant_id, k, d, i.period_start, i.period_end, q, a, t, a + t, tiers::jsonb, pr::jsonb
               FROM invoices i, (VALUES
                 (1, 'recurring', 'Pro <b>monthly</b>', 1, 49.00, 9.31, '{}', '{\"type\":\"flat\",\"amount\":\"49\"}'),
                 (2, 'usage', 'tokens', 1250000, 2.50, 0.48,
                  '{\"tiers\":[{\"tier\":0,\"quantity\":\"1000000\",\"unitPrice\":\"0.000002\",\"flatPrice\":\"0\",\"total\":\"2\"},{\"tier\":1,\"quantity\":\"250000\",\"unitPrice\":\"0.000002\",\"flatPrice\":\"0\",\"total\":\"0.5\"}]}',
                  NULL)) AS v(p, k, d, q, a, t, tiers, pr)
              WHERE i.id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("lines");
    id
}

/// `POST /api/v1/invoices/{id}/{action}` (action may carry a query string).
async fn act(api: &Api, id: &str, action: &str, key: &str) -> (u16, Value) {
    api.call(
        "POST",
        &format!("/api/v1/invoices/{id}/{action}"),
        key,
        None,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_issue_void_and_html() {
    let api = Api::start().await;
    meter(&api, "tokens", "SUM").await;
    created(
        &api,
        "/api/v1/plans",
        json!({"key": "pro", "currency": "EUR"}),
    )
    .await;
    created(
        &api,
        "/api/v1/customers",
        json!({"key": "acme", "name": "Acme <script>", "currency": "EUR"}),
    )
    .await;
    let sub = created(
        &api,
        "/api/v1/subscriptions",
        json!({"customer": "acme", "plan": "pro", "startedAt": "2026-01-01T00:00:00Z"}),
    )
    .await;
    let sub = sub["id"].as_str().expect("id").to_string();
    let oct = draft(&api, "acme", &sub, "2026-10", "2026-11-01T00:00:00Z").await;
    let sep = draft(&api, "acme", &sub, "2026-09", "2026-10-01T00:00:00Z").await;
    let open = draft(&api, "acme", &sub, "2099-01", "2099-02-01T00:00:00Z").await;

    let (s, inv) = api
        .call("GET", &format!("/api/v1/invoices/{oct}"), &api.reader, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (inv["status"].as_str(), inv["number"].as_i64()),
        (Some("draft"), None)
    );
    assert_eq!(inv["lines"].as_array().map(Vec::len), Some(2));

    // A read key cannot issue; another tenant cannot see or issue.
    let (s, _) = act(&api, &oct, "issue", &api.reader).await;
    assert_eq!(s, 403);
    let (s, _) = act(&api, &oct, "issue", &api.other).await;
    assert_eq!(s, 404);
    let (s, _) = api
        .call(
            "GET",
            &format!("/api/v1/invoices/{oct}/html"),
            &api.other,
            None,
        )
        .await;
    assert_eq!(s, 404);

    // Issue numbers in issuing order, gapless; issuing twice is refused.
    let (s, inv) = act(&api, &oct, "issue", &api.admin).await;
    assert_eq!(
        (s, inv["number"].as_i64(), inv["status"].as_str()),
        (200, Some(1), Some("issued")),
        "{inv}"
    );
    let (s, b) = act(&api, &oct, "issue", &api.admin).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("invalid_state")));
    let (s, b) = act(&api, &open, "issue", &api.admin).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("period_open")), "{b}");
    let (s, inv) = act(&api, &sep, "issue", &api.admin).await;
    assert_eq!((s, inv["number"].as_i64()), (200, Some(2)));
    let (s, inv) = act(&api, &open, "issue?early=true", &api.admin).await;
    assert_eq!((s, inv["number"].as_i64()), (200, Some(3)));

    // Void: an issued invoice keeps its number; voiding twice is refused.
    let (s, inv) = act(&api, &sep, "void", &api.admin).await;
    assert_eq!(
        (s, inv["status"].as_str(), inv["number"].as_i64()),
        (200, Some("void"), Some(2))
    );
    let (s, b) = act(&api, &sep, "void", &api.admin).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("invalid_state")));
    let (s, _) = api
        .call("POST", "/api/v1/invoices/not-a-uuid/void", &api.admin, None)
        .await;
    assert_eq!(s, 404);
    // Paid: only from issued; a paid invoice cannot be voided.
    let (s, b) = act(&api, &oct, "mark-paid", &api.reader).await;
    assert_eq!(s, 403, "{b}");
    let (s, inv) = act(&api, &oct, "mark-paid", &api.admin).await;
    assert_eq!(
        (s, inv["status"].as_str(), inv["number"].as_i64()),
        (200, Some("paid"), Some(1))
    );
    let (s, b) = act(&api, &oct, "void", &api.admin).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("invalid_state")), "{b}");
    let (s, b) = act(&api, &sep, "mark-paid", &api.admin).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (409, Some("invalid_state")),
        "void cannot be paid: {b}"
    );
    // A draft voided never gets a number.
    let nov = draft(&api, "acme", &sub, "2026-08", "2026-09-01T00:00:00Z").await;
    let (s, inv) = act(&api, &nov, "void", &api.admin).await;
    assert_eq!(
        (s, inv["status"].as_str(), inv["number"].as_i64()),
        (200, Some("void"), None)
    );

    // HTML: lines, tiers, totals; stored text escaped.
    let (s, html) = api
        .raw(
            "GET",
            &format!("/api/v1/invoices/{oct}/html"),
            &api.reader,
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert!(html.contains("Invoice No. 1"), "{html}");
    assert!(
        html.contains("Acme &lt;script&gt;") && !html.contains("<script>"),
        "{html}"
    );
    assert!(html.contains("Pro &lt;b&gt;monthly&lt;/b&gt;"), "{html}");
    assert!(html.contains("tier 2") && html.contains("250000"), "{html}");
    assert!(html.contains("Total 61.29 EUR"), "{html}");
}

#[tokio::test]
async fn lists_page_with_cursors_and_filters() {
    let api = Api::start().await;
    for i in 0..5 {
        let currency = if i % 2 == 0 { "EUR" } else { "USD" };
        created(
            &api,
            "/api/v1/customers",
            json!({"key": format!("c{i}"), "name": "C", "currency": currency, "timezone": "UTC",
                   "subjects": [format!("subject-{i}")]}),
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/customers?limit=2&cursor={c}"),
            None => "/api/v1/customers?limit=2".to_string(),
        };
        let (s, b) = api.call("GET", &path, &api.reader, None).await;
        assert_eq!(s, 200, "{b}");
        pages += 1;
        for c in b["items"].as_array().expect("items") {
            seen.push(c["key"].as_str().expect("key").to_string());
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        ["c0", "c1", "c2", "c3", "c4"],
        "every row once, in order"
    );
    let (_, eur) = api
        .call("GET", "/api/v1/customers?currency=EUR", &api.reader, None)
        .await;
    assert_eq!(eur["items"].as_array().map(Vec::len), Some(3));
    let (_, one) = api
        .call(
            "GET",
            "/api/v1/customers?subject=subject-3",
            &api.reader,
            None,
        )
        .await;
    assert_eq!(one["items"][0]["key"], "c3");
    let (s, b) = api
        .call("GET", "/api/v1/customers?limit=0", &api.reader, None)
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("limit")));
    let (s, b) = api
        .call("GET", "/api/v1/invoices?cursor=bm9wZQ", &api.reader, None)
        .await;
    assert_eq!((s, b["field"].as_str()), (400, Some("cursor")));
    // Plans by key, tax rates by region.
    for (k, tier) in [("c", "pro"), ("a", "basic"), ("b", "pro")] {
        created(
            &api,
            "/api/v1/plans",
            json!({"key": k, "tier": tier, "currency": "EUR"}),
        )
        .await;
    }
    let (_, p1) = api
        .call("GET", "/api/v1/plans?limit=2", &api.reader, None)
        .await;
    let keys: Vec<&str> = p1["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["key"].as_str())
        .collect();
    assert_eq!(keys, ["a", "b"]);
    let next = p1["next_cursor"].as_str().expect("cursor");
    let (_, p2) = api
        .call(
            "GET",
            &format!("/api/v1/plans?limit=2&cursor={next}"),
            &api.reader,
            None,
        )
        .await;
    assert_eq!(
        (p2["items"][0]["key"].as_str(), p2["next_cursor"].is_null()),
        (Some("c"), true)
    );
    let (_, pro) = api
        .call("GET", "/api/v1/plans?tier=pro", &api.reader, None)
        .await;
    assert_eq!(pro["items"].as_array().map(Vec::len), Some(2));
    for region in ["US-NY", "DE", "FR"] {
        let (s, b) = api
            .call(
                "PUT",
                &format!("/api/v1/tax-rates/{region}"),
                &api.admin,
                Some(json!({"rate": "19"})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (_, t1) = api
        .call("GET", "/api/v1/tax-rates?limit=2", &api.reader, None)
        .await;
    assert_eq!(
        (
            t1["items"][0]["region"].as_str(),
            t1["items"][1]["region"].as_str()
        ),
        (Some("DE"), Some("FR"))
    );
    let next = t1["next_cursor"].as_str().expect("cursor");
    let (_, t2) = api
        .call(
            "GET",
            &format!("/api/v1/tax-rates?cursor={next}"),
            &api.reader,
            None,
        )
        .await;
    assert_eq!(t2["items"][0]["region"], "US-NY");
}
