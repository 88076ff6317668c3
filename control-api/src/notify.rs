//! Notifications: templates, fan-out to a tenant's channels through the outbox, and the usage
//! threshold alerts.
//!
//! **Templates.** Each kind of notification has a built-in subject and body ([`DEFAULTS`]); a
//! tenant may replace them (`PUT /api/v1/notification-templates/{kind}`). `{{name}}` is replaced
//! by the variable `name` of the notification (unknown names are left as they are).
//!
//! **Fan-out.** [`fan_out`] writes one outbox row per enabled channel of the tenant, in the
//! caller's transaction, with the rendered subject and body and the variables as `data`,
//! sealed with the server key like every outbox payload; [`crate::delivery`] sends them.
//!
//! **Thresholds.** [`evaluate`] computes, for every live subscription and every meter its plan
//! version gives an entitlement, the meter's usage in the subscription's current billing period
//! from the rollups (whole hours from `usage_hour`, the partial hours at the period's edges from
//! `usage_minute`; the same numbers the meter query and the rater use) and fires 80, 90 and
//! 100 % once each per period and channel: `threshold_firings`' primary key makes a second
//! firing impossible, across restarts and concurrent evaluators. Late events are in the
//! aggregates as soon as the aggregator flushed them, so the next evaluation sees them.
//! Only the current period is evaluated: late events for a period that has ended do not
//! alert (the invoice's correction lines carry them).

use crate::crypto::ServerKey;
use chrono::{DateTime, DurationRound, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use tokio_postgres::{GenericClient, Transaction};
use uuid::Uuid;

/// Built-in templates: (kind, category, subject, body).
pub const DEFAULTS: &[(&str, &str, &str, &str)] = &[
    (
        "usage.threshold",
        "usage",
        "{{customer}} used {{percent}}% of {{meter}}",
        "Customer {{customer}} has used {{usage}} of the {{entitlement}} {{meter}} included in \
         plan {{plan}} for the period starting {{periodStart}} ({{percent}}%).",
    ),
    (
        "payment.failed",
        "billing",
        "Payment failed for invoice {{invoiceNumber}}",
        "A payment of {{amount}} {{currency}} for invoice {{invoiceNumber}} of {{customer}} \
         failed: {{failureCode}}. The subscription is past due until a payment succeeds.",
    ),
    (
        "verify_email",
        "account",
        "Confirm your email address",
        "Confirm {{email}} with this link: {{publicUrl}}/verify-email?token={{token}}\n\
         The link expires; ask for a new one if it has.",
    ),
    (
        "reset_password",
        "account",
        "Reset your password",
        "Someone asked to reset the password of {{email}}. If it was you, use this link: \
         {{publicUrl}}/reset-password?token={{token}}\nOtherwise ignore this message.",
    ),
];

/// The kinds of notification there are templates for.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    DEFAULTS.iter().map(|d| d.0)
}

pub fn category(kind: &str) -> &'static str {
    DEFAULTS
        .iter()
        .find(|d| d.0 == kind)
        .map_or("general", |d| d.1)
}

/// Replaces `{{name}}` by `vars[name]` (strings as they are, other values as JSON).
pub fn render(template: &str, vars: &Map<String, Value>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find("}}") {
            Some(j) => {
                let name = after[..j].trim();
                match vars.get(name) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(v) => out.push_str(&v.to_string()),
                    None => out.push_str(&rest[i..i + 2 + j + 2]),
                }
                rest = &after[j + 2..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The tenant's template for `kind`, or the built-in one: (subject, body).
pub async fn template<C: GenericClient>(
    db: &C,
    tenant: Option<Uuid>,
    kind: &str,
) -> Result<(String, String), tokio_postgres::Error> {
    if let Some(t) = tenant {
        if let Some(r) = db
            .query_opt(
                "SELECT subject, body FROM notification_templates WHERE tenant_id = $1 AND kind = $2",
                &[&t, &kind],
            )
            .await?
        {
            return Ok((r.get(0), r.get(1)));
        }
    }
    Ok(DEFAULTS
        .iter()
        .find(|d| d.0 == kind)
        .map(|d| (d.2.to_string(), d.3.to_string()))
        .unwrap_or_else(|| (kind.to_string(), "{{data}}".to_string())))
}

/// Queues `kind` with `vars` for one channel; the outbox id.
pub async fn enqueue_for_channel(
    tx: &Transaction<'_>,
    key: &ServerKey,
    tenant: Uuid,
    channel: (Uuid, &str, &str),
    kind: &str,
    vars: &Map<String, Value>,
) -> Result<i64, tokio_postgres::Error> {
    let (channel_id, channel_kind, target) = channel;
    let (subject, body) = template(tx, Some(tenant), kind).await?;
    let payload = json!({
        "subject": render(&subject, vars),
        "body": render(&body, vars),
        "category": category(kind),
        "data": vars,
    });
    let sealed = key.seal(payload.to_string().as_bytes());
    Ok(tx
        .query_one(
            "INSERT INTO notification_outbox (tenant_id, kind, channel, recipient, payload_sealed, channel_id)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[&tenant, &kind, &channel_kind, &target, &sealed, &channel_id],
        )
        .await?
        .get(0))
}

/// The tenant's enabled channels: (id, kind, target).
pub async fn channels<C: GenericClient>(
    db: &C,
    tenant: Uuid,
) -> Result<Vec<(Uuid, String, String)>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT id, kind, target FROM notification_channels
              WHERE tenant_id = $1 AND disabled_at IS NULL ORDER BY created_at",
            &[&tenant],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Queues `kind` for every enabled channel of the tenant.
pub async fn fan_out(
    tx: &Transaction<'_>,
    key: &ServerKey,
    tenant: Uuid,
    kind: &str,
    vars: &Map<String, Value>,
) -> Result<usize, tokio_postgres::Error> {
    let chans = channels(tx, tenant).await?;
    for (id, k, target) in &chans {
        enqueue_for_channel(tx, key, tenant, (*id, k, target), kind, vars).await?;
    }
    Ok(chans.len())
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A failed payment: tells the tenant's channels.
pub async fn payment_failed(
    tx: &Transaction<'_>,
    key: &ServerKey,
    tenant: Uuid,
    invoice: Uuid,
    (payment, amount, currency, failure_code): (Uuid, Decimal, &str, Option<&str>),
) -> Result<(), tokio_postgres::Error> {
    let r = tx
        .query_one(
            "SELECT i.number, c.key FROM invoices i JOIN customers c ON c.id = i.customer_id
              WHERE i.id = $1",
            &[&invoice],
        )
        .await?;
    let vars = obj(json!({
        "invoice": invoice,
        "invoiceNumber": r.get::<_, Option<i64>>(0),
        "customer": r.get::<_, String>(1),
        "payment": payment,
        "amount": amount.normalize().to_string(),
        "currency": currency,
        "failureCode": failure_code.unwrap_or("unknown"),
    }));
    fan_out(tx, key, tenant, "payment.failed", &vars).await?;
    Ok(())
}

/// The percentages that alert.
pub const THRESHOLDS: [i32; 3] = [80, 90, 100];

/// A meter's usage for `subjects` in `[start, end)`, from the rollups, by its aggregation
/// (SUM, COUNT, MIN, MAX, AVG, LATEST, UNIQUE_COUNT). Whole hours come from `usage_hour`, the
/// partial hours at either edge from `usage_minute`.
pub async fn period_usage<C: GenericClient>(
    db: &C,
    tenant: Uuid,
    meter: Uuid,
    aggregation: &str,
    subjects: &[String],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Decimal, tokio_postgres::Error> {
    let hour = chrono::Duration::hours(1);
    let floor = |t: DateTime<Utc>| t.duration_trunc(hour).unwrap_or(t);
    let mut hs = floor(start);
    if hs < start {
        hs += hour;
    }
    let mut he = floor(end);
    if hs >= he {
        hs = start;
        he = start;
    }
    let unique = aggregation == "UNIQUE_COUNT";
    let (cols, tables) = if unique {
        ("value", ("usage_unique_hour", "usage_unique_minute"))
    } else {
        (
            "sum_value, event_count, min_value, max_value, latest_value, latest_time",
            ("usage_hour", "usage_minute"),
        )
    };
    let rows_sql = format!(
        "SELECT {cols} FROM {h} WHERE tenant_id = $1 AND meter_id = $2 AND subject = ANY($3)
            AND window_start >= $4 AND window_start < $5
         UNION ALL
         SELECT {cols} FROM {m} WHERE tenant_id = $1 AND meter_id = $2 AND subject = ANY($3)
            AND ((window_start >= $6 AND window_start < $4) OR (window_start >= $5 AND window_start < $7))",
        h = tables.0,
        m = tables.1
    );
    let sql = if unique {
        format!("SELECT count(DISTINCT value)::numeric FROM ({rows_sql}) r")
    } else {
        let pick = match aggregation {
            "COUNT" => "coalesce(sum(event_count), 0)::numeric",
            "MIN" => "coalesce(min(min_value), 0)",
            "MAX" => "coalesce(max(max_value), 0)",
            "AVG" => "coalesce(sum(sum_value) / nullif(sum(event_count), 0), 0)",
            "LATEST" => {
                "coalesce((array_agg(latest_value ORDER BY latest_time DESC NULLS LAST))[1], 0)"
            }
            _ => "coalesce(sum(sum_value), 0)",
        };
        format!("SELECT {pick} FROM ({rows_sql}) r")
    };
    Ok(db
        .query_one(&sql, &[&tenant, &meter, &subjects, &hs, &he, &start, &end])
        .await?
        .get(0))
}

/// What [`evaluate`] did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Evaluated {
    /// (subscription, meter) pairs looked at.
    pub checked: usize,
    /// Firings written (one per threshold and channel).
    pub fired: usize,
}

/// Evaluates every threshold of every live subscription at `now` (see the module doc).
pub async fn evaluate(
    db: &mut tokio_postgres::Client,
    key: &ServerKey,
    now: DateTime<Utc>,
) -> Result<Evaluated, tokio_postgres::Error> {
    let mut out = Evaluated::default();
    let rows = db
        .query(
            "SELECT s.tenant_id, s.id, c.key, c.billing_anchor_day, c.timezone, s.started_at,
                    pp.meter_id, m.slug, m.aggregation, pp.entitlement, p.key,
                    coalesce((SELECT array_agg(cs.subject) FROM customer_subjects cs
                               WHERE cs.tenant_id = c.tenant_id AND cs.customer_id = c.id), '{}')
               FROM subscriptions s
               JOIN customers c ON c.id = s.customer_id
               JOIN plan_versions v ON v.id = s.plan_version_id
               JOIN plans p ON p.id = v.plan_id
               JOIN plan_prices pp ON pp.plan_version_id = s.plan_version_id
               JOIN meters m ON m.id = pp.meter_id AND m.deleted_at IS NULL
              WHERE s.status IN ('trialing', 'active', 'past_due')
                AND s.started_at <= $1 AND (s.ended_at IS NULL OR s.ended_at > $1)
                AND pp.entitlement > 0
                AND EXISTS (SELECT 1 FROM notification_channels ch
                             WHERE ch.tenant_id = s.tenant_id AND ch.disabled_at IS NULL)",
            &[&now],
        )
        .await?;
    for r in rows {
        out.checked += 1;
        let tenant: Uuid = r.get(0);
        let sub: Uuid = r.get(1);
        let customer: String = r.get(2);
        let anchor = r.get::<_, i32>(3).clamp(1, 31) as u32;
        let tz: chrono_tz::Tz = r.get::<_, String>(4).parse().unwrap_or(chrono_tz::UTC);
        let started: DateTime<Utc> = r.get(5);
        let (meter, slug, aggregation): (Uuid, String, String) = (r.get(6), r.get(7), r.get(8));
        let entitlement: Decimal = r.get(9);
        let plan: String = r.get(10);
        let subjects: Vec<String> = r.get(11);
        if subjects.is_empty() {
            continue;
        }
        let (start, end) = billing_core::period::containing(now.max(started), anchor, tz);
        // A subscription that started inside the period counts from its start.
        let from = start.max(started);
        let usage = period_usage(&*db, tenant, meter, &aggregation, &subjects, from, end).await?;
        let pct = usage * Decimal::ONE_HUNDRED / entitlement;
        let crossed: Vec<i32> = THRESHOLDS
            .iter()
            .copied()
            .filter(|t| pct >= Decimal::from(*t))
            .collect();
        if crossed.is_empty() {
            continue;
        }
        let tx = db.transaction().await?;
        for (ch, kind, target) in channels(&tx, tenant).await? {
            for t in &crossed {
                let inserted = tx
                    .execute(
                        "INSERT INTO threshold_firings (tenant_id, subscription_id, meter_id,
                                period_start, percent, channel_id, usage, entitlement)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                        &[&tenant, &sub, &meter, &start, t, &ch, &usage, &entitlement],
                    )
                    .await?;
                if inserted == 0 {
                    continue;
                }
                let vars = obj(json!({
                    "subscription": sub,
                    "customer": customer,
                    "plan": plan,
                    "meter": slug,
                    "percent": t,
                    "usage": usage.normalize().to_string(),
                    "entitlement": entitlement.normalize().to_string(),
                    "periodStart": crate::catalog::ts(start),
                    "periodEnd": crate::catalog::ts(end),
                }));
                let id = enqueue_for_channel(
                    &tx,
                    key,
                    tenant,
                    (ch, &kind, &target),
                    "usage.threshold",
                    &vars,
                )
                .await?;
                tx.execute(
                    "UPDATE threshold_firings SET outbox_id = $6 WHERE subscription_id = $1
                        AND meter_id = $2 AND period_start = $3 AND percent = $4 AND channel_id = $5",
                    &[&sub, &meter, &start, t, &ch, &id],
                )
                .await?;
                out.fired += 1;
            }
        }
        tx.commit().await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_replaces_known_names_only() {
        let vars = obj(json!({"a": "x", "n": 80, "b": null}));
        assert_eq!(render("{{a}}-{{ n }}%", &vars), "x-80%");
        assert_eq!(render("{{missing}} {{a}}", &vars), "{{missing}} x");
        assert_eq!(render("open {{a", &vars), "open {{a");
        assert_eq!(render("{{b}}", &vars), "null");
    }
}
