//! Billing-ops analysis without writing anything: cost breakdowns by a meter's group-by
//! dimension, what-if rating under another plan, and a customer's spend so far.

use anyhow::Context;
use billing_core::invoice::allocate;
use billing_core::Currency;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

use crate::period::{bounds, YearMonth};
use crate::run::{
    load_prices, load_subjects, load_subs, priced_meters, rate_tenant, PlanOverride, Rated, Scope,
};
use crate::usage::{aggregate, Agg, LoadStats, SpanSubject};

/// One customer's rated amount for one meter and one value of the dimension.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CostRow {
    pub customer: String,
    pub meter: String,
    /// The dimension's value; `(none)` for usage without it, `(no usage)` for an amount with no
    /// usage behind it (a minimum commitment).
    pub value: String,
    pub quantity: Decimal,
    pub amount: Decimal,
    pub currency: String,
}

fn dimension(group_json: &str, by: &str) -> String {
    match serde_json::from_str::<Value>(group_json)
        .ok()
        .as_ref()
        .and_then(|v| v.get(by))
    {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "(none)".into(),
    }
}

/// The period's rated usage amounts broken down by the group-by dimension `by`.
///
/// Each usage line's amount (as rated, rounded) is split over the dimension's values in
/// proportion to their quantities, by largest remainder, so the parts add up to the line to
/// the cent. For SUM and COUNT meters that is exact attribution; for the others (AVG, MIN, MAX,
/// LATEST, UNIQUE_COUNT, whose period quantity is not the sum of the groups') it is a
/// proportional share.
pub async fn costs(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    ym: YearMonth,
    customer: Option<&str>,
    by: &str,
) -> anyhow::Result<Vec<CostRow>> {
    let mut stats = LoadStats::default();
    let scope = Scope {
        customer,
        plan: None,
    };
    let rated = rate_tenant(db, &[], tenant, ym, scope, &mut stats).await?;
    let by_sub: HashMap<Uuid, &Rated> = rated.iter().map(|r| (r.subscription, r)).collect();
    let subs = load_subs(db, tenant, customer).await?;
    let customers: Vec<Uuid> = subs.iter().map(|s| s.customer_id).collect();
    let subjects = load_subjects(db, tenant, Some(&customers)).await?;
    let mut versions: Vec<Uuid> = subs.iter().map(|s| s.plan_version).collect();
    versions.sort();
    versions.dedup();
    let prices = load_prices(db, tenant, &versions).await?;
    let mut spans = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        if let Some((_, _, from, to)) = s.span(ym) {
            for subject in subjects.get(&s.customer_id).into_iter().flatten() {
                spans.push(SpanSubject {
                    span: i as u32,
                    subject: subject.clone(),
                    from,
                    to,
                });
            }
        }
    }
    let meters = priced_meters(&prices);
    let aggs = aggregate(db, &[], tenant, &meters, &spans, true, &mut stats).await?;
    let mut groups: HashMap<(u32, Uuid), Vec<(String, &Agg)>> = HashMap::new();
    for ((span, meter, grp), a) in &aggs {
        groups
            .entry((*span, *meter))
            .or_default()
            .push((grp.clone().unwrap_or_default(), a));
    }
    let mut out = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let Some(r) = by_sub.get(&s.id) else {
            continue;
        };
        let currency = Currency::from_code(&r.currency)?;
        for l in r.lines.iter().filter(|l| l.kind == "usage") {
            let Some(meter) = l.meter else { continue };
            let mp = prices
                .get(&s.plan_version)
                .and_then(|ps| ps.iter().find(|p| p.meter == meter))
                .context("a rated meter has no price")?;
            let mut by_value: BTreeMap<String, Decimal> = BTreeMap::new();
            for (grp, a) in groups.get(&(i as u32, meter)).into_iter().flatten() {
                *by_value.entry(dimension(grp, by)).or_default() += a.quantity(mp.aggregation);
            }
            let weights: Vec<Decimal> = by_value.values().copied().collect();
            if weights.iter().all(|w| w.is_zero()) {
                if !l.amount.is_zero() {
                    out.push(CostRow {
                        customer: r.customer_key.clone(),
                        meter: mp.slug.clone(),
                        value: "(no usage)".into(),
                        quantity: Decimal::ZERO,
                        amount: l.amount,
                        currency: r.currency.clone(),
                    });
                }
                continue;
            }
            let parts = allocate(l.amount, &weights, currency);
            for ((value, q), amount) in by_value.into_iter().zip(parts) {
                out.push(CostRow {
                    customer: r.customer_key.clone(),
                    meter: mp.slug.clone(),
                    value,
                    quantity: q.normalize(),
                    amount,
                    currency: r.currency.clone(),
                });
            }
        }
    }
    Ok(out)
}

/// One customer's actual and simulated invoice for one period.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Simulated {
    pub customer: String,
    pub period: String,
    pub currency: String,
    /// Rated now under the subscription's own plan version.
    pub actual: Decimal,
    /// Rated under the simulated plan.
    pub simulated: Decimal,
    pub difference: Decimal,
    pub invoice: Rated,
}

/// The plan `key` of `tenant` (its `version`, or the latest) as an override.
pub async fn plan_override(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    key: &str,
    version: Option<i32>,
) -> anyhow::Result<PlanOverride> {
    let r = db
        .query_opt(
            "SELECT v.id, p.key || ' v' || v.version, v.recurring_fee, v.currency
               FROM plans p JOIN plan_versions v ON v.plan_id = p.id
              WHERE p.tenant_id = $1 AND p.key = $2 AND ($3::int IS NULL OR v.version = $3)
              ORDER BY v.version DESC LIMIT 1",
            &[&tenant, &key, &version],
        )
        .await?
        .with_context(|| {
            format!("--plan: tenant {tenant} has no plan {key:?} (or no such version)")
        })?;
    Ok(PlanOverride {
        version: r.get(0),
        label: r.get(1),
        recurring_fee: r.get(2),
        currency: Currency::from_code(&r.get::<_, String>(3))?,
    })
}

/// What each customer's invoice for each period `from..=to` would have been under `plan`,
/// beside what it is under their own plan, from the usage stored now. Writes nothing.
pub async fn simulate(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    plan: &PlanOverride,
    from: YearMonth,
    to: YearMonth,
    customer: Option<&str>,
) -> anyhow::Result<Vec<Simulated>> {
    let mut out = Vec::new();
    let mut stats = LoadStats::default();
    let mut p = from;
    while p <= to {
        let own = Scope {
            customer,
            plan: None,
        };
        let actual: HashMap<Uuid, Decimal> = rate_tenant(db, &[], tenant, p, own, &mut stats)
            .await?
            .into_iter()
            .map(|r| (r.subscription, r.total))
            .collect();
        let what_if = Scope {
            customer,
            plan: Some(plan),
        };
        for r in rate_tenant(db, &[], tenant, p, what_if, &mut stats).await? {
            let a = actual.get(&r.subscription).copied().unwrap_or_default();
            out.push(Simulated {
                customer: r.customer_key.clone(),
                period: r.period.clone(),
                currency: r.currency.clone(),
                actual: a,
                simulated: r.total,
                difference: r.total - a,
                invoice: r,
            });
        }
        p = p.next();
    }
    Ok(out)
}

/// A customer's invoice so far for the period containing `at` (current-period spend for
/// dashboards and threshold alerts), from the rollups; writes nothing. `None` without an active
/// subscription then.
pub async fn spend(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    customer: &str,
    at: DateTime<Utc>,
) -> anyhow::Result<Option<Rated>> {
    let subs = load_subs(db, tenant, Some(customer)).await?;
    let Some(first) = subs.first() else {
        return Ok(None);
    };
    let mut ym = YearMonth::of(at, first.tz);
    if at < bounds(ym, first.anchor_day, first.tz).0 {
        ym = ym.prev();
    }
    let mut stats = LoadStats::default();
    let scope = Scope {
        customer: Some(customer),
        plan: None,
    };
    let rated = rate_tenant(db, &[], tenant, ym, scope, &mut stats).await?;
    Ok(rated.into_iter().find(|r| {
        subs.iter().any(|s| {
            s.id == r.subscription && s.started_at <= at && s.ended_at.is_none_or(|e| at < e)
        })
    }))
}
