//! Delivery of the outbox: signed webhooks, email through an SMTP relay, and the in-app inbox.
//!
//! A due message (`next_attempt_at <= now`, not sent, not dead) is claimed with `FOR UPDATE
//! SKIP LOCKED` by moving its `next_attempt_at` a lease ahead, so several workers never send
//! the same message at once; then it is delivered and the attempt is written to
//! `notification_deliveries` (the delivery log). A failure is retried after
//! `backoff_base × 2^(attempt−1)` (capped at `backoff_max`); after `max_attempts` the message is
//! dead. Delivery is at least once: a crash after sending and before recording sends again, with
//! the same `webhook-id`, which receivers use to drop duplicates.
//!
//! **Webhooks** follow the Standard Webhooks scheme: `POST` of
//! `{"id", "type", "timestamp", "data": {"subject", "body", "category", "data"}}` with headers
//! `webhook-id` (the outbox id as `msg_<id>`), `webhook-timestamp` (unix seconds) and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` under the channel's
//! secret (`whsec_<base64>`, shown once when the channel is made). A 2xx is a delivery; anything
//! else, or no answer within the timeout, is a failure.
//!
//! **Email** goes through the configured relay (`smtp://host:port` plain, `smtps://…` TLS,
//! `smtp://…?tls=required` STARTTLS), as text/plain. Without a relay, emails wait in the outbox.
//!
//! **Inbox** messages become `inbox_items` of the channel's user, and a `NOTIFY inbox` tells
//! the WebSocket streams ([`crate::inbox`]).

use crate::crypto::ServerKey;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Whether `ip` is an address on the public internet: not loopback, private, link-local (cloud
/// metadata endpoints live there), carrier-grade NAT, unique-local, multicast or unspecified.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80)
            }
        },
    }
}

/// Whether a webhook URL names a host that is not public (an IP literal outside the public
/// internet, or `localhost`). Names are checked again when they are resolved ([`PublicOnly`]).
pub fn names_private_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => !is_public(ip.into()),
        Some(url::Host::Ipv6(ip)) => !is_public(ip.into()),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        None => true,
    }
}

/// A resolver that only answers public addresses, so a webhook cannot be pointed at the
/// internal network through DNS.
#[derive(Debug, Clone, Copy)]
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub key: ServerKey,
    pub smtp_url: Option<String>,
    pub mail_from: String,
    pub public_url: String,
    pub max_attempts: i32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    /// Allow webhooks to loopback and private addresses (tests, closed networks).
    pub allow_private_targets: bool,
}

/// The signature header value for a webhook.
pub fn sign_webhook(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let raw = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = B64.decode(raw).unwrap_or_else(|_| raw.as_bytes().to_vec());
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The delay before attempt `attempt + 1` after `attempt` failed ones.
pub fn backoff(d: &Delivery, attempt: i32) -> Duration {
    let exp = attempt.clamp(1, 30) as u32 - 1;
    d.backoff_base
        .checked_mul(2u32.saturating_pow(exp))
        .unwrap_or(d.backoff_max)
        .min(d.backoff_max)
}

struct Claimed {
    id: i64,
    tenant: Option<Uuid>,
    user: Option<Uuid>,
    kind: String,
    channel: String,
    recipient: String,
    payload: Vec<u8>,
    attempts: i32,
    secret: Option<Vec<u8>>,
    created: chrono::DateTime<Utc>,
}

/// What one pass did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Pass {
    pub sent: usize,
    pub failed: usize,
    pub dead: usize,
}

/// Delivers what is due, up to `limit` messages.
pub async fn run_once(
    db: &tokio_postgres::Client,
    d: &Delivery,
    http: &reqwest::Client,
    limit: i64,
) -> Result<Pass, tokio_postgres::Error> {
    let lease = d
        .timeout
        .saturating_mul(3)
        .max(Duration::from_secs(30))
        .as_secs_f64();
    let rows = db
        .query(
            "UPDATE notification_outbox o SET next_attempt_at = now() + make_interval(secs => $2)
              WHERE o.id IN (SELECT id FROM notification_outbox
                              WHERE sent_at IS NULL AND dead_at IS NULL AND next_attempt_at <= now()
                                AND ($3 OR channel <> 'email')
                              ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING o.id, o.tenant_id, o.user_id, o.kind, o.channel, o.recipient,
                       o.payload_sealed, o.attempts,
                       (SELECT secret_sealed FROM notification_channels c WHERE c.id = o.channel_id),
                       o.created_at",
            &[&limit, &lease, &d.smtp_url.is_some()],
        )
        .await?;
    let mut pass = Pass::default();
    for r in rows {
        let c = Claimed {
            id: r.get(0),
            tenant: r.get(1),
            user: r.get(2),
            kind: r.get(3),
            channel: r.get(4),
            recipient: r.get(5),
            payload: r.get(6),
            attempts: r.get(7),
            secret: r.get(8),
            created: r.get(9),
        };
        let started = Instant::now();
        let result = deliver(db, d, http, &c).await;
        let ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        let attempt = c.attempts + 1;
        let (ok, code, err) = match &result {
            Ok(code) => (true, *code, None),
            Err((code, e)) => (false, *code, Some(e.clone())),
        };
        db.execute(
            "INSERT INTO notification_deliveries (outbox_id, attempt, ok, status_code, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&c.id, &attempt, &ok, &code, &err, &ms],
        )
        .await?;
        if ok {
            db.execute(
                "UPDATE notification_outbox SET sent_at = now(), attempts = $2, last_error = NULL
                  WHERE id = $1",
                &[&c.id, &attempt],
            )
            .await?;
            pass.sent += 1;
        } else if attempt >= d.max_attempts {
            db.execute(
                "UPDATE notification_outbox SET attempts = $2, last_error = $3, dead_at = now()
                  WHERE id = $1",
                &[&c.id, &attempt, &err],
            )
            .await?;
            tracing::warn!(outbox = c.id, kind = %c.kind, error = ?err, "notification dead after {attempt} attempts");
            pass.dead += 1;
        } else {
            let wait = backoff(d, attempt).as_secs_f64();
            db.execute(
                "UPDATE notification_outbox SET attempts = $2, last_error = $3,
                        next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
                &[&c.id, &attempt, &err, &wait],
            )
            .await?;
            pass.failed += 1;
        }
    }
    Ok(pass)
}

type Failure = (Option<i32>, String);

async fn deliver(
    db: &tokio_postgres::Client,
    d: &Delivery,
    http: &reqwest::Client,
    c: &Claimed,
) -> Result<Option<i32>, Failure> {
    let plain = d.key.open(&c.payload).ok_or((
        None,
        "the payload does not open with the server key".to_string(),
    ))?;
    let payload: Value =
        serde_json::from_slice(&plain).map_err(|e| (None, format!("payload: {e}")))?;
    // Identity emails (verification, reset) carry a token, not a rendered message.
    let (subject, body) = if payload.get("subject").is_some() {
        (
            payload["subject"].as_str().unwrap_or_default().to_string(),
            payload["body"].as_str().unwrap_or_default().to_string(),
        )
    } else {
        let mut vars = payload.as_object().cloned().unwrap_or_default();
        vars.insert("publicUrl".into(), json!(d.public_url));
        let (s, b) = crate::notify::template(db, c.tenant, &c.kind)
            .await
            .map_err(|e| (None, e.to_string()))?;
        (
            crate::notify::render(&s, &vars),
            crate::notify::render(&b, &vars),
        )
    };
    match c.channel.as_str() {
        "webhook" => {
            let sealed = c
                .secret
                .as_ref()
                .ok_or((None, "the channel has no secret".to_string()))?;
            let secret = d
                .key
                .open(sealed)
                .and_then(|s| String::from_utf8(s).ok())
                .ok_or((None, "the channel secret does not open".to_string()))?;
            let url = reqwest::Url::parse(&c.recipient).map_err(|e| (None, format!("url: {e}")))?;
            if !d.allow_private_targets && names_private_host(&url) {
                return Err((None, "the webhook URL names a private address".to_string()));
            }
            let msg_id = format!("msg_{}", c.id);
            let now = Utc::now().timestamp();
            let doc = json!({
                "id": msg_id,
                "type": c.kind,
                // When the event happened: the same in every retry of the message.
                "timestamp": crate::catalog::ts(c.created),
                "data": payload,
            });
            let raw = doc.to_string();
            let resp = http
                .post(url)
                .timeout(d.timeout)
                .header("content-type", "application/json")
                .header("webhook-id", &msg_id)
                .header("webhook-timestamp", now.to_string())
                .header(
                    "webhook-signature",
                    sign_webhook(&secret, &msg_id, now, raw.as_bytes()),
                )
                .body(raw)
                .send()
                .await
                .map_err(|e| (None, e.without_url().to_string()))?;
            let code = i32::from(resp.status().as_u16());
            if resp.status().is_success() {
                Ok(Some(code))
            } else {
                Err((Some(code), format!("the receiver answered {code}")))
            }
        }
        "email" => {
            let url = d
                .smtp_url
                .as_deref()
                .ok_or((None, "no SMTP relay configured".to_string()))?;
            send_mail(url, &d.mail_from, &c.recipient, &subject, &body, d.timeout)
                .await
                .map(|_| None)
                .map_err(|e| (None, e))
        }
        "inbox" => {
            let user: Uuid = c
                .recipient
                .parse()
                .ok()
                .or(c.user)
                .ok_or((None, "the inbox channel names no user".to_string()))?;
            let tenant = c.tenant.ok_or((None, "no tenant".to_string()))?;
            let category = payload["category"]
                .as_str()
                .unwrap_or_else(|| crate::notify::category(&c.kind))
                .to_string();
            let data = payload.get("data").cloned().unwrap_or(json!({}));
            let r = db
                .query_opt(
                    "INSERT INTO inbox_items (tenant_id, user_id, outbox_id, category, title, body, data)
                     SELECT $1, u.id, $3, $4, $5, $6, $7 FROM users u
                      WHERE u.id = $2 AND u.tenant_id = $1
                     ON CONFLICT (outbox_id) DO UPDATE SET outbox_id = EXCLUDED.outbox_id
                     RETURNING id",
                    &[&tenant, &user, &c.id, &category, &subject, &body, &data],
                )
                .await
                .map_err(|e| (None, e.to_string()))?
                .ok_or((None, "the inbox's user no longer exists".to_string()))?;
            let item: i64 = r.get(0);
            db.execute(
                "SELECT pg_notify('inbox', $1)",
                &[&format!("{user}:{item}")],
            )
            .await
            .map_err(|e| (None, e.to_string()))?;
            Ok(None)
        }
        other => Err((None, format!("unknown channel kind {other}"))),
    }
}

/// Sends one text email through the relay at `url`.
pub async fn send_mail(
    url: &str,
    from: &str,
    to: &str,
    subject: &str,
    body: &str,
    timeout: Duration,
) -> Result<(), String> {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let msg = Message::builder()
        .from(from.parse().map_err(|e| format!("from address: {e}"))?)
        .to(to.parse().map_err(|e| format!("recipient address: {e}"))?)
        .subject(subject)
        .header(lettre::message::header::ContentType::TEXT_PLAIN)
        .body(body.to_string())
        .map_err(|e| e.to_string())?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|e| format!("SMTP relay URL: {e}"))?
        .timeout(Some(timeout))
        .build();
    transport
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|e| format!("SMTP: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Delivery {
        Delivery {
            key: ServerKey::ephemeral(),
            smtp_url: None,
            mail_from: "a@b.c".into(),
            public_url: String::new(),
            max_attempts: 5,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            allow_private_targets: false,
        }
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "100.128.0.1"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
        let u = |s: &str| reqwest::Url::parse(s).expect("url");
        assert!(names_private_host(&u("http://localhost:8080/x")));
        assert!(names_private_host(&u("http://[::1]/x")));
        assert!(names_private_host(&u("https://10.0.0.7/hook")));
        assert!(!names_private_host(&u("https://hooks.example.com/x")));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let d = settings();
        let got: Vec<u64> = (1..=7).map(|a| backoff(&d, a).as_secs()).collect();
        assert_eq!(got, [2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn standard_webhooks_signature_example() {
        // The example of the Standard Webhooks specification (its README, "Verifying").
        let sig = sign_webhook(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
