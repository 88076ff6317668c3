//! Notifications against the real PostgreSQL, a local SMTP sink and local webhook receivers:
//! usage thresholds at 80/90/100 % fire once per period and channel while the evaluator runs
//! continuously, when late usage pushes past a threshold and across a restart; signed webhooks
//! with retries, backoff and a dead state, the delivery log; email through SMTP (threshold
//! alerts and the verification email of a new user); templates; the inbox and its WebSocket.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::billing::Fx;
use common::sinks::{eventually, Receiver, SmtpSink};
use control_api::http::Settings;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn tune(smtp: String) -> impl Fn(&mut Settings) + Clone {
    move |s: &mut Settings| {
        s.notify.workers = true;
        s.notify.smtp_url = Some(smtp.clone());
        s.notify.mail_from = "alerts@metering.test".into();
        s.notify.public_url = "https://metering.test".into();
        s.notify.deliver_every = Duration::from_millis(100);
        s.notify.evaluate_every = Duration::from_millis(300);
        s.notify.backoff_base = Duration::from_millis(200);
        s.notify.backoff_max = Duration::from_secs(2);
        s.notify.max_attempts = 3;
        s.notify.timeout = Duration::from_secs(5);
        // The receivers of these tests are on 127.0.0.1.
        s.notify.allow_private_webhooks = true;
    }
}

/// Adds `n` tokens of subject acme-1 to the hour starting `hours_ago` hours before this one
/// (clamped to the current month), as the aggregator's rollup holds them.
async fn usage(fx: &Fx, n: i64, hours_ago: i64) {
    fx.api
        .db
        .execute(
            "INSERT INTO usage_hour (tenant_id, meter_id, window_start, subject, sum_value, event_count)
             SELECT m.tenant_id, m.id,
                    greatest(date_trunc('hour', now()) - make_interval(hours => $2::int),
                             date_trunc('month', now())),
                    'acme-1', $1, 1
               FROM meters m WHERE m.slug = 'tokens'
             ON CONFLICT (tenant_id, meter_id, window_start, subject, group_values)
             DO UPDATE SET sum_value = usage_hour.sum_value + EXCLUDED.sum_value,
                           event_count = usage_hour.event_count + 1",
            &[&rust_decimal::Decimal::from(n), &(hours_ago as i32)],
        )
        .await
        .expect("usage");
}

async fn firings(db: &tokio_postgres::Client) -> Vec<(String, i32)> {
    db.query(
        "SELECT c.kind, f.percent FROM threshold_firings f
           JOIN notification_channels c ON c.id = f.channel_id ORDER BY c.kind, f.percent",
        &[],
    )
    .await
    .expect("firings")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn verify(secret: &str, h: &common::sinks::Hit) -> bool {
    let key = B64
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret is base64");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("key");
    mac.update(
        format!(
            "{}.{}.{}",
            h.headers["webhook-id"], h.headers["webhook-timestamp"], h.body
        )
        .as_bytes(),
    );
    let want = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    h.headers["webhook-signature"] == want
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_fire_once_per_period_and_channel_across_restarts() {
    let smtp = SmtpSink::start().await;
    // The good receiver fails each message twice before it takes it; the bad one always fails.
    let good = Receiver::start(&[500, 503]).await;
    let bad = Receiver::start(&[500; 100]).await;
    let settings = tune(smtp.url());
    let fx = Fx::new(settings.clone()).await;
    let admin = fx.api.user(fx.api.a, "ops@acme.test", "org_admin").await;
    let token = {
        let r = fx.api.login("ops@acme.test", common::PASSWORD).await;
        r.json["access_token"].as_str().expect("token").to_string()
    };

    // Channels; bad input names the field.
    for (body, field) in [
        (json!({"kind": "sms", "target": "x"}), "target"),
        (json!({"kind": "sms"}), "kind"),
        (json!({"kind": "webhook", "url": "ftp://x"}), "url"),
        (json!({"kind": "email", "email": "not an address"}), "email"),
        (
            json!({"kind": "inbox", "user": "00000000-0000-0000-0000-000000000000"}),
            "user",
        ),
    ] {
        let r = fx
            .call("POST", "/api/v1/notification-channels", Some(body.clone()))
            .await;
        assert_eq!(
            (r.status, r.json["field"].as_str().unwrap_or("")),
            (400, field),
            "{body}: {}",
            r.text
        );
    }
    let hook = fx
        .ok(
            "POST",
            "/api/v1/notification-channels",
            json!({"kind": "webhook", "url": good.url("/hook")}),
        )
        .await;
    let secret = hook["secret"]
        .as_str()
        .expect("secret shown once")
        .to_string();
    let dead = fx
        .ok(
            "POST",
            "/api/v1/notification-channels",
            json!({"kind": "webhook", "url": bad.url("/down")}),
        )
        .await;
    fx.ok(
        "POST",
        "/api/v1/notification-channels",
        json!({"kind": "email", "email": "billing@acme.test"}),
    )
    .await;
    fx.ok(
        "POST",
        "/api/v1/notification-channels",
        json!({"kind": "inbox", "user": admin.to_string()}),
    )
    .await;
    let listed = fx.call("GET", "/api/v1/notification-channels", None).await;
    assert!(
        !listed.text.contains(&secret),
        "the secret is never shown again"
    );
    let stored: Vec<u8> = fx
        .api
        .db
        .query_one(
            "SELECT secret_sealed FROM notification_channels WHERE kind = 'webhook' LIMIT 1",
            &[],
        )
        .await
        .expect("secret")
        .get(0);
    assert!(
        !String::from_utf8_lossy(&stored).contains(&secret),
        "stored sealed"
    );

    // The inbox stream of the admin.
    let mut req = format!("ws://{}/api/v1/me/notifications/stream", fx.api.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket");

    // 850 of 1000: 80 % fires on each of the four channels, and only once however often the
    // evaluator runs.
    usage(&fx, 850, 0).await;
    let db = &fx.api.db;
    eventually(15, "80 % fired", || async {
        (firings(db).await.len() == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        firings(db).await,
        [
            ("email".into(), 80),
            ("inbox".into(), 80),
            ("webhook".into(), 80),
            ("webhook".into(), 80)
        ]
    );
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a message on the stream")
        .expect("open")
        .expect("frame");
    let item: Value = serde_json::from_str(msg.to_text().expect("text")).expect("json");
    assert_eq!(item["category"], "usage");
    assert!(
        item["title"].as_str().expect("title").contains("80%"),
        "{item}"
    );
    assert_eq!(item["data"]["usage"], "850");

    // Late usage (an earlier hour of the period) takes it to 910: 90 % fires, 100 % does not.
    usage(&fx, 60, 3).await;
    eventually(15, "90 % fired", || async {
        (firings(db).await.len() == 8).then_some(())
    })
    .await;

    // The good webhook: each message fails twice (500, 503) and is taken the third time; every
    // attempt is signed, and a retry is the same message (same webhook-id).
    let hits = eventually(15, "webhooks delivered", || async {
        let h = good.hits();
        (h.len() == 6).then_some(h)
    })
    .await;
    assert!(
        hits.iter().all(|h| verify(&secret, h)),
        "every delivery is signed"
    );
    let mut by_id: std::collections::BTreeMap<String, Vec<&common::sinks::Hit>> =
        Default::default();
    for h in &hits {
        by_id
            .entry(h.headers["webhook-id"].clone())
            .or_default()
            .push(h);
    }
    assert_eq!(by_id.len(), 2, "two messages (80 and 90 %)");
    let mut percents = Vec::new();
    for attempts in by_id.values() {
        assert_eq!(attempts.len(), 3);
        assert!(
            attempts.iter().all(|a| a.body == attempts[0].body),
            "a retry sends the same body"
        );
        let doc: Value = serde_json::from_str(&attempts[0].body).expect("json");
        assert_eq!(doc["type"], "usage.threshold");
        percents.push(doc["data"]["data"]["percent"].as_i64().expect("percent"));
    }
    percents.sort();
    assert_eq!(percents, [80, 90]);
    let log = fx
        .call(
            "GET",
            &format!(
                "/api/v1/notification-channels/{}/deliveries",
                hook["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    let oldest = log.json["items"]
        .as_array()
        .expect("items")
        .last()
        .expect("a message")
        .clone();
    assert_eq!(oldest["state"], "sent");
    let codes: Vec<i64> = oldest["log"]
        .as_array()
        .expect("log")
        .iter()
        .map(|a| a["statusCode"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(codes, [500, 503, 200]);

    // The always-failing receiver: dead after max_attempts (3), every attempt logged.
    let dead_log = eventually(15, "dead letters", || async {
        let r = fx
            .call(
                "GET",
                &format!(
                    "/api/v1/notification-channels/{}/deliveries",
                    dead["id"].as_str().expect("id")
                ),
                None,
            )
            .await;
        let items = r.json["items"].as_array().cloned().unwrap_or_default();
        (items.len() == 2 && items.iter().all(|i| i["state"] == "dead")).then_some(items)
    })
    .await;
    for m in &dead_log {
        assert_eq!(m["attempts"], 3);
        assert_eq!(m["log"].as_array().map(Vec::len), Some(3));
    }

    // Email through the relay.
    let mails = eventually(15, "two alert emails", || async {
        let m: Vec<_> = smtp
            .mails()
            .into_iter()
            .filter(|m| m.to.iter().any(|t| t.contains("billing@acme.test")))
            .collect();
        (m.len() == 2).then_some(m)
    })
    .await;
    assert!(
        mails[0].data.contains("acme used 80% of tokens"),
        "{}",
        mails[0].data
    );
    assert!(
        mails[1].data.contains("acme used 90% of tokens"),
        "{}",
        mails[1].data
    );
    assert!(mails[0].from.contains("alerts@metering.test"));

    // Restart: a new server on the same database and key evaluates the same usage again and
    // fires nothing more; then 100 % fires once, with the tenant's own template.
    drop(ws);
    let fx = fx.restart(settings.clone()).await;
    let db = &fx.api.db;
    fx.ok(
        "PUT",
        "/api/v1/notification-templates/usage.threshold",
        json!({"subject": "ALERT {{percent}} {{meter}} {{customer}}", "body": "Usage {{usage}} of {{entitlement}}."}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        firings(db).await.len(),
        8,
        "nothing fires twice after a restart"
    );
    usage(&fx, 100, 1).await;
    eventually(15, "100 % fired", || async {
        (firings(db).await.len() == 12).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let all = firings(db).await;
    for kind in ["email", "inbox"] {
        let p: Vec<i32> = all.iter().filter(|f| f.0 == kind).map(|f| f.1).collect();
        assert_eq!(p, [80, 90, 100], "{kind}");
    }
    assert_eq!(all.len(), 12, "{all:?}");
    let mail = eventually(15, "the 100 % email", || async {
        smtp.mails()
            .into_iter()
            .find(|m| m.data.contains("ALERT 100 tokens acme"))
    })
    .await;
    assert!(mail.data.contains("Usage 1010 of 1000."), "{}", mail.data);

    // The inbox: three alerts, newest first; read, unread, archive, filters.
    let me = |path: &str| {
        let (addr, token, path) = (fx.api.addr, token.clone(), path.to_string());
        async move { common::send(addr, "GET", &path, &token, &[], None).await }
    };
    let post = |path: String| {
        let (addr, token) = (fx.api.addr, token.clone());
        async move { common::send(addr, "POST", &path, &token, &[], None).await }
    };
    let inbox = eventually(15, "three inbox items", || async {
        let r = me("/api/v1/me/notifications").await;
        (r.json["items"].as_array().map(Vec::len) == Some(3)).then_some(r.json)
    })
    .await;
    assert_eq!(inbox["unread"], 3);
    let titles: Vec<&str> = inbox["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["title"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(titles[0], "ALERT 100 tokens acme");
    assert!(titles[2].contains("80%"));
    let newest = inbox["items"][0]["id"].as_i64().expect("id");
    let oldest = inbox["items"][2]["id"].as_i64().expect("id");
    let r = post(format!("/api/v1/me/notifications/{newest}/read")).await;
    assert_eq!(r.json["read"], true, "{}", r.text);
    assert_eq!(
        me("/api/v1/me/notifications?state=unread").await.json["items"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    post(format!("/api/v1/me/notifications/{newest}/unread")).await;
    post(format!("/api/v1/me/notifications/{oldest}/archive")).await;
    let r = me("/api/v1/me/notifications").await;
    assert_eq!(
        (
            r.json["items"].as_array().map(Vec::len),
            r.json["unread"].clone()
        ),
        (Some(2), json!(2))
    );
    let r = me("/api/v1/me/notifications?state=archived&category=usage").await;
    assert_eq!(r.json["items"][0]["id"], oldest);
    assert_eq!(
        me("/api/v1/me/notifications?category=billing").await.json["items"],
        json!([])
    );
    assert_eq!(me("/api/v1/me/notifications?state=bogus").await.status, 400);
    let r = post("/api/v1/me/notifications/read-all".into()).await;
    assert_eq!(r.json["marked"], 2);
    // Not a person's: an API key has no inbox; another person sees nothing of it.
    let r = fx.call("GET", "/api/v1/me/notifications", None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let other = fx.api.person(fx.api.a, "someone@acme.test", "user").await;
    let r = common::send(
        fx.api.addr,
        "GET",
        "/api/v1/me/notifications?state=all",
        &other,
        &[],
        None,
    )
    .await;
    assert_eq!(r.json["items"], json!([]));
    let r = common::send(
        fx.api.addr,
        "POST",
        &format!("/api/v1/me/notifications/{newest}/read"),
        &other,
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 404);

    // The outbox of the identity layer goes out too: a new user's verification email.
    let body =
        json!({"email": "new@acme.test", "role": "user", "password": "a long enough password"});
    let r = common::send(
        fx.api.addr,
        "POST",
        "/api/v1/users",
        &token,
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mail = eventually(15, "the verification email", || async {
        smtp.mails()
            .into_iter()
            .find(|m| m.to.iter().any(|t| t.contains("new@acme.test")))
    })
    .await;
    assert!(
        mail.text()
            .contains("https://metering.test/verify-email?token=mvt_"),
        "{}",
        mail.data
    );
    assert!(mail.data.contains("Confirm your email address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_internal_addresses_are_refused_by_default() {
    let fx = Fx::new(|_| {}).await;
    for url in [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://10.0.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
    ] {
        let r = fx
            .call(
                "POST",
                "/api/v1/notification-channels",
                Some(json!({"kind": "webhook", "url": url})),
            )
            .await;
        assert_eq!(
            (r.status, r.json["field"].as_str()),
            (400, Some("url")),
            "{url}: {}",
            r.text
        );
    }
    let r = fx
        .call(
            "POST",
            "/api/v1/notification-channels",
            Some(json!({"kind": "webhook", "url": "https://hooks.example.com/metering"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}
