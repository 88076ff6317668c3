//! Business metrics for Grafana on `GET /metrics` (Prometheus text format), computed from the
//! database at each scrape into a fresh recorder, so a series that no longer exists disappears
//! instead of keeping its last value:
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `billing_active_subscriptions` | tenant, plan, status | live subscriptions (trialing, active, past_due) whose span covers now |
//! | `billing_mrr` | tenant, plan, currency | monthly recurring revenue: the plan versions' recurring fees of those subscriptions |
//! | `billing_arpu` | tenant, plan, currency | MRR ÷ live subscriptions of the plan |
//! | `billing_invoices` | tenant, status | invoices by status (draft, issued, paid, void) |
//! | `billing_payment_failures` | tenant | failed payments (provider declines and failed manual collections) |
//! | `notifications` | kind, state | outbox messages: sent, failed (retrying), dead (gave up), pending |
//!
//! Amounts are decimals converted to floating point only here, for Prometheus; they are never
//! used for billing. The endpoint is public like the ingest edge's `/metrics`: bind the control
//! API to an internal network, or put it behind the proxy that guards the rest.

use crate::http::{ApiError, AppState};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::PrometheusBuilder;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use uuid::Uuid;

pub async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let db = st.pool.get().await?;
    let subs = db
        .query(
            "SELECT s.tenant_id, p.key, s.status, v.currency, count(*), sum(v.recurring_fee)
               FROM subscriptions s JOIN plan_versions v ON v.id = s.plan_version_id
               JOIN plans p ON p.id = v.plan_id
              WHERE s.status IN ('trialing', 'active', 'past_due')
                AND s.started_at <= now() AND (s.ended_at IS NULL OR s.ended_at > now())
              GROUP BY 1, 2, 3, 4",
            &[],
        )
        .await?;
    let invoices = db
        .query(
            "SELECT tenant_id, status, count(*) FROM invoices GROUP BY 1, 2",
            &[],
        )
        .await?;
    let failures = db
        .query(
            "SELECT tenant_id, count(*) FROM payments WHERE status = 'failed' GROUP BY 1",
            &[],
        )
        .await?;
    let outbox = db
        .query(
            "SELECT kind, CASE WHEN sent_at IS NOT NULL THEN 'sent'
                               WHEN dead_at IS NOT NULL THEN 'dead'
                               WHEN last_error IS NOT NULL THEN 'failed' ELSE 'pending' END,
                    count(*)
               FROM notification_outbox GROUP BY 1, 2",
            &[],
        )
        .await?;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let mut mrr: std::collections::BTreeMap<(Uuid, String, String), (Decimal, i64)> =
            Default::default();
        for r in &subs {
            let (tenant, plan, status, currency): (Uuid, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let (n, fees): (i64, Decimal) = (r.get(4), r.get(5));
            metrics::gauge!("billing_active_subscriptions",
                "tenant" => tenant.to_string(), "plan" => plan.clone(), "status" => status)
            .set(n as f64);
            let e = mrr.entry((tenant, plan, currency)).or_default();
            e.0 += fees;
            e.1 += n;
        }
        for ((tenant, plan, currency), (fees, n)) in mrr {
            let labels = [
                ("tenant", tenant.to_string()),
                ("plan", plan),
                ("currency", currency),
            ];
            metrics::gauge!("billing_mrr", &labels).set(fees.to_f64().unwrap_or(0.0));
            let arpu = if n > 0 {
                fees / Decimal::from(n)
            } else {
                Decimal::ZERO
            };
            metrics::gauge!("billing_arpu", &labels).set(arpu.to_f64().unwrap_or(0.0));
        }
        for r in &invoices {
            let tenant: Uuid = r.get(0);
            let status: String = r.get(1);
            metrics::gauge!("billing_invoices", "tenant" => tenant.to_string(), "status" => status)
                .set(r.get::<_, i64>(2) as f64);
        }
        for r in &failures {
            let tenant: Uuid = r.get(0);
            metrics::gauge!("billing_payment_failures", "tenant" => tenant.to_string())
                .set(r.get::<_, i64>(1) as f64);
        }
        for r in &outbox {
            let (kind, state): (String, String) = (r.get(0), r.get(1));
            metrics::gauge!("notifications", "kind" => kind, "state" => state)
                .set(r.get::<_, i64>(2) as f64);
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    ))
}
