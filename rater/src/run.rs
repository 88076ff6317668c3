//! The rating job: for one billing period, every subscription's usage is aggregated (see
//! [`crate::usage`]), priced with billing-core and written as a draft invoice.
//!
//! - **Spans.** A subscription is billed for its share of the customer's period
//!   ([`crate::period`]): `[max(period start, started_at), min(period end, ended_at))`. Periods
//!   are half-open and meet exactly, so no minute is billed twice across a boundary or missed.
//! - **Lines.** The plan version's recurring fee, prorated by the second for a partial span (none
//!   before a free trial ends: `subscriptions.trial_ends_at`); one
//!   usage line per priced meter (tiers, minimum true-up and cap in its breakdown); corrections.
//! - **Corrections.** For the two periods before, when an issued (or paid) invoice exists, the
//!   usage is aggregated again; where the quantity differs from the last one billed for that
//!   period, a correction line (naming the corrected period) prices the difference:
//!   `price(now) − price(billed)`. Issued invoices never change.
//! - **Idempotent.** A draft is rewritten only when its content (SHA-256 of the rated lines)
//!   changed; an issued invoice is never touched. Re-running the same job writes nothing.
//! - **Numbering.** [`issue`] freezes drafts and numbers them per tenant, gapless: the counter
//!   moves in the transaction that issues, so a failure leaves no hole.

use anyhow::{bail, Context};
use billing_core::invoice::{self, LineInput, TaxRate, TaxRounding};
use billing_core::price::TierLine;
use billing_core::proration::{prorate, Span};
use billing_core::{Currency, Price};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use schemas::meter::Aggregation;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use crate::period::{bounds, YearMonth};
use crate::usage::{aggregate, Agg, LoadStats, SpanSubject};

/// How many periods back a run looks for corrections (the lateness horizon is 35 days).
pub const CORRECTION_PERIODS: usize = 2;

#[derive(Debug, Clone)]
pub struct Options {
    pub period: YearMonth,
    pub tenant: Option<Uuid>,
    /// Customer key or id.
    pub customer: Option<String>,
    pub dry_run: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub tenants: usize,
    pub customers: usize,
    pub invoices_written: usize,
    pub invoices_unchanged: usize,
    /// Invoices of the period already issued (left as they are).
    pub invoices_frozen: usize,
    pub lines: usize,
    pub corrections: usize,
    pub usage_rows: u64,
    /// Time reading usage into Arrow, in DataFusion, and writing invoices.
    pub load: Duration,
    pub query: Duration,
    pub write: Duration,
    /// Invoice totals per currency (of the invoices rated in this run, written or not).
    pub totals: BTreeMap<String, Decimal>,
    pub elapsed: Duration,
    /// The rated invoices (for `--dry-run` output and tests).
    pub invoices: Vec<Rated>,
}

/// (period start, period end, span from, span to).
pub type SpanBounds = (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>);

/// A subscription as the rater needs it.
#[derive(Debug, Clone)]
pub struct Sub {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub customer_key: String,
    pub tz: Tz,
    pub anchor_day: u32,
    pub tax_region: Option<String>,
    pub currency: Currency,
    pub plan_version: Uuid,
    pub plan: String,
    pub recurring_fee: Decimal,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    /// A free trial: no recurring fee before this instant (usage is rated as usual).
    pub trial_ends_at: Option<DateTime<Utc>>,
}

impl Sub {
    /// The subscription's share of its customer's period `ym`, if any.
    pub fn span(&self, ym: YearMonth) -> Option<SpanBounds> {
        let (ps, pe) = bounds(ym, self.anchor_day, self.tz);
        let from = ps.max(self.started_at);
        let to = self.ended_at.map_or(pe, |e| e.min(pe));
        (from < to).then_some((ps, pe, from, to))
    }
}

/// A priced meter of a plan version.
#[derive(Debug, Clone)]
pub struct MeterPrice {
    pub meter: Uuid,
    pub slug: String,
    pub name: String,
    pub aggregation: Aggregation,
    pub price: Price,
}

/// One rated line.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RatedLine {
    pub kind: &'static str,
    pub meter: Option<Uuid>,
    pub description: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub quantity: Decimal,
    pub previous_quantity: Option<Decimal>,
    pub price: Option<Arc<Value>>,
    pub unit_price: Option<Decimal>,
    pub tiers: Details,
    pub amount: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
}

/// How a usage line's amount was reached (stored as the line's `tiers` JSON).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub billable_quantity: Option<Decimal>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierLine>,
    #[serde(skip_serializing_if = "Decimal::is_zero")]
    pub minimum_true_up: Decimal,
    #[serde(skip_serializing_if = "Decimal::is_zero")]
    pub maximum_reduction: Decimal,
}

/// A rated invoice.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rated {
    pub tenant: Uuid,
    pub subscription: Uuid,
    pub customer: Uuid,
    pub customer_key: String,
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    pub lines: Vec<RatedLine>,
    pub subtotal: Decimal,
    pub discount: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    #[serde(skip)]
    pub sha256: Vec<u8>,
}

/// Progress reporting: a bar on a terminal, plain lines otherwise.
#[derive(Debug)]
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {pos}/{len} subscriptions ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        Progress { bar }
    }
    fn tenant(&self, tenant: Uuid, subs: usize, quiet: bool) {
        match &self.bar {
            Some(b) => {
                b.inc_length(subs as u64);
                b.set_message(format!("tenant {tenant}"));
            }
            None if !quiet => eprintln!("rating tenant {tenant}: {subs} subscriptions"),
            None => {}
        }
    }
    fn done(&self, n: usize) {
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

pub async fn load_subs(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    customer: Option<&str>,
) -> anyhow::Result<Vec<Sub>> {
    let cid = customer.and_then(|c| Uuid::parse_str(c).ok());
    let rows = db
        .query(
            "SELECT s.id, c.id, c.key, c.timezone, c.billing_anchor_day, c.tax_region, c.currency,
                    s.plan_version_id, p.key || ' v' || v.version, v.recurring_fee, s.started_at, s.ended_at,
                    s.trial_ends_at
               FROM subscriptions s JOIN customers c ON c.id = s.customer_id
               JOIN plan_versions v ON v.id = s.plan_version_id JOIN plans p ON p.id = v.plan_id
              WHERE s.tenant_id = $1 AND ($2::text IS NULL OR c.key = $2 OR c.id = $3)
              ORDER BY c.key, s.started_at",
            &[&tenant, &customer, &cid],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let tz: String = r.get(3);
            let cur: String = r.get(6);
            Ok(Sub {
                id: r.get(0),
                customer_id: r.get(1),
                customer_key: r.get(2),
                tz: tz
                    .parse()
                    .map_err(|_| anyhow::anyhow!("customer time zone {tz:?} is unknown"))?,
                anchor_day: r.get::<_, i32>(4) as u32,
                tax_region: r.get(5),
                currency: Currency::from_code(&cur)?,
                plan_version: r.get(7),
                plan: r.get(8),
                recurring_fee: r.get(9),
                started_at: r.get(10),
                ended_at: r.get(11),
                trial_ends_at: r.get(12),
            })
        })
        .collect()
}

pub async fn load_prices(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    versions: &[Uuid],
) -> anyhow::Result<HashMap<Uuid, Vec<MeterPrice>>> {
    let rows = db
        .query(
            "SELECT pp.plan_version_id, pp.meter_id, m.slug, m.name, m.aggregation, pp.price
               FROM plan_prices pp JOIN meters m ON m.id = pp.meter_id
              WHERE pp.tenant_id = $1 AND pp.plan_version_id = ANY($2)
              ORDER BY m.slug",
            &[&tenant, &versions],
        )
        .await?;
    let mut out: HashMap<Uuid, Vec<MeterPrice>> = HashMap::new();
    for r in rows {
        let price_json: Value = r.get(5);
        let slug: String = r.get(2);
        let agg: String = r.get(4);
        out.entry(r.get(0)).or_default().push(MeterPrice {
            meter: r.get(1),
            name: r.get(3),
            aggregation: agg
                .parse()
                .map_err(|e: String| anyhow::anyhow!("meter {slug}: {e}"))?,
            price: Price::from_json(&price_json.to_string())
                .with_context(|| format!("the stored price of meter {slug}"))?,
            slug,
        });
    }
    Ok(out)
}

async fn load_tax(
    db: &tokio_postgres::Client,
    tenant: Uuid,
) -> anyhow::Result<HashMap<String, TaxRate>> {
    let rows = db
        .query(
            "SELECT region, rate, inclusive FROM tax_rates WHERE tenant_id = $1",
            &[&tenant],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let region: String = r.get(0);
            (
                region.clone(),
                TaxRate {
                    region,
                    rate: r.get(1),
                    inclusive: r.get(2),
                },
            )
        })
        .collect())
}

/// Every meter priced by one of the versions, once, with its aggregation.
pub fn priced_meters(prices: &HashMap<Uuid, Vec<MeterPrice>>) -> Vec<(Uuid, Aggregation)> {
    let mut meters: Vec<(Uuid, Aggregation)> = prices
        .values()
        .flatten()
        .map(|m| (m.meter, m.aggregation))
        .collect();
    meters.sort_by_key(|(m, _)| *m);
    meters.dedup_by_key(|(m, _)| *m);
    meters
}

/// A span of one subscription in one period, as aggregated.
#[derive(Debug, Clone)]
struct SpanDef {
    sub: usize,
    period: YearMonth,
}

fn usage_line(
    mp: &MeterPrice,
    q: Decimal,
    ps: DateTime<Utc>,
    pe: DateTime<Utc>,
) -> anyhow::Result<RatedLine> {
    let b = mp
        .price
        .breakdown(q)
        .with_context(|| format!("pricing meter {}", mp.slug))?;
    let unit_price = (!b.billable_quantity.is_zero()).then(|| {
        (b.usage_amount / b.billable_quantity)
            .round_dp(8)
            .normalize()
    });
    Ok(RatedLine {
        kind: "usage",
        meter: Some(mp.meter),
        description: if mp.name.is_empty() {
            mp.slug.clone()
        } else {
            mp.name.clone()
        },
        period_start: ps,
        period_end: pe,
        quantity: q.normalize(),
        previous_quantity: None,
        price: None,
        unit_price,
        tiers: Details {
            billable_quantity: Some(b.billable_quantity.normalize()),
            tiers: b.tiers,
            minimum_true_up: b.minimum_true_up.normalize(),
            maximum_reduction: b.maximum_reduction.normalize(),
        },
        amount: b.total,
        discount: Decimal::ZERO,
        tax: Decimal::ZERO,
        total: Decimal::ZERO,
    })
}

/// Prices the lines and computes totals (tax by the customer's region, rounded per line).
fn finish(
    tenant: Uuid,
    sub: &Sub,
    ym: YearMonth,
    mut lines: Vec<RatedLine>,
    tax: Option<&TaxRate>,
) -> anyhow::Result<Rated> {
    let inputs: Vec<LineInput> = lines
        .iter()
        .map(|l| LineInput {
            description: l.description.clone(),
            amount: l.amount,
            tax: tax.cloned(),
        })
        .collect();
    let t = invoice::compute(sub.currency, &inputs, None, TaxRounding::Line)?;
    for (l, c) in lines.iter_mut().zip(&t.lines) {
        l.amount = c.base;
        l.discount = c.discount;
        l.tax = c.tax;
        l.total = c.gross;
    }
    let (ps, pe) = bounds(ym, sub.anchor_day, sub.tz);
    // The content hash covers every stored figure of the lines and totals (tier details and
    // prices follow from quantities and the plan version, which never changes).
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.kind.as_bytes());
        h.update(l.meter.unwrap_or_default().as_bytes());
        h.update(l.description.as_bytes());
        h.update(l.period_start.timestamp_micros().to_le_bytes());
        h.update(l.period_end.timestamp_micros().to_le_bytes());
        for d in [
            Some(l.quantity),
            l.previous_quantity,
            l.unit_price,
            Some(l.amount),
            Some(l.discount),
            Some(l.tax),
            Some(l.total),
        ] {
            match d {
                Some(d) => h.update(d.normalize().serialize()),
                None => h.update([0xff]),
            }
        }
    }
    for d in [t.subtotal, t.discount, t.tax, t.total] {
        h.update(d.normalize().serialize());
    }
    Ok(Rated {
        tenant,
        subscription: sub.id,
        customer: sub.customer_id,
        customer_key: sub.customer_key.clone(),
        period: ym.to_string(),
        period_start: ps,
        period_end: pe,
        currency: sub.currency.code().to_string(),
        lines,
        subtotal: t.subtotal,
        discount: t.discount,
        tax: t.tax,
        total: t.total,
        sha256: h.finalize().to_vec(),
    })
}

/// The last quantity billed per (subscription, meter, period start) on issued or paid invoices.
/// `subs`: these subscriptions, or all of the tenant's.
async fn billed(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    subs: Option<&[Uuid]>,
) -> anyhow::Result<HashMap<(Uuid, Uuid, DateTime<Utc>), Decimal>> {
    let rows = db
        .query(
            "SELECT i.subscription_id, l.meter_id, l.period_start, l.quantity
               FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id
              WHERE i.tenant_id = $1 AND ($2::uuid[] IS NULL OR i.subscription_id = ANY($2))
                AND i.status IN ('issued', 'paid') AND l.kind IN ('usage', 'correction')
              ORDER BY i.issued_at, i.number, l.position",
            &[&tenant, &subs],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
        .collect())
}

/// Another plan version to rate with (simulation).
#[derive(Debug, Clone)]
pub struct PlanOverride {
    pub version: Uuid,
    /// Shown on recurring lines, e.g. `pro v2`.
    pub label: String,
    pub recurring_fee: Decimal,
    pub currency: Currency,
}

/// What a rating covers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope<'a> {
    /// One customer (key or id).
    pub customer: Option<&'a str>,
    /// Rate every subscription as if it were on this plan version (subscriptions in another
    /// currency are left out); no corrections are looked for.
    pub plan: Option<&'a PlanOverride>,
}

/// Which of the `periods` each subscription (of `subs`, or all of the tenant's) has an issued or
/// paid invoice for: those periods get correction lines.
async fn issued(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    subs: Option<&[Uuid]>,
    periods: &[String],
) -> anyhow::Result<std::collections::HashSet<(Uuid, String)>> {
    if periods.is_empty() {
        return Ok(Default::default());
    }
    Ok(db
        .query(
            "SELECT subscription_id, period FROM invoices
              WHERE tenant_id = $1 AND ($2::uuid[] IS NULL OR subscription_id = ANY($2))
                AND period = ANY($3) AND status IN ('issued', 'paid')",
            &[&tenant, &subs, &periods],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The event subjects of each customer (of `customers`, or of every customer of the tenant).
pub async fn load_subjects(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    customers: Option<&[Uuid]>,
) -> anyhow::Result<HashMap<Uuid, Vec<String>>> {
    let mut subjects: HashMap<Uuid, Vec<String>> = HashMap::new();
    for r in db
        .query(
            "SELECT customer_id, subject FROM customer_subjects
              WHERE tenant_id = $1 AND ($2::uuid[] IS NULL OR customer_id = ANY($2))",
            &[&tenant, &customers],
        )
        .await?
    {
        subjects.entry(r.get(0)).or_default().push(r.get(1));
    }
    Ok(subjects)
}

/// What pricing a tenant's subscriptions needs, shared by the pricing threads.
struct PriceInputs<'a> {
    tenant: Uuid,
    ym: YearMonth,
    subs: &'a [Sub],
    defs: &'a [SpanDef],
    prices: &'a HashMap<Uuid, Vec<MeterPrice>>,
    taxes: &'a HashMap<String, TaxRate>,
    billed: &'a HashMap<(Uuid, Uuid, DateTime<Utc>), Decimal>,
    aggs: &'a crate::usage::Aggs,
}

/// Prices one subscription: its spans are `defs[first..last]` (span `k` is `defs[k]`); `None`
/// when it has no span in the period.
fn price_sub(
    x: &PriceInputs<'_>,
    sub: usize,
    spans: std::ops::Range<usize>,
) -> anyhow::Result<Option<Rated>> {
    let s = &x.subs[sub];
    let (ym, prices, billed, aggs) = (x.ym, x.prices, x.billed, x.aggs);
    let zero = Agg::default();
    let mut lines: Vec<RatedLine> = Vec::new();
    let mut has_span = false;
    for k in spans {
        let d = &x.defs[k];
        let Some((ps, pe, from, to)) = s.span(d.period) else {
            continue;
        };
        let no_prices = Vec::new();
        let mps = prices.get(&s.plan_version).unwrap_or(&no_prices);
        if d.period == ym {
            has_span = true;
            // The fee runs from the end of a free trial, if one covers part of the span.
            let fee_from = s.trial_ends_at.map_or(from, |t| t.clamp(from, to));
            if !s.recurring_fee.is_zero() && fee_from < to {
                let from = fee_from;
                let amount = prorate(
                    s.recurring_fee,
                    Span::Seconds(ps, pe),
                    Span::Seconds(from, to),
                )?;
                let partial = from != ps || to != pe;
                lines.push(RatedLine {
                    kind: "recurring",
                    meter: None,
                    description: format!("{}{}", s.plan, if partial { " (prorated)" } else { "" }),
                    period_start: from,
                    period_end: to,
                    quantity: Decimal::ONE,
                    previous_quantity: None,
                    price: Some(Arc::new(
                        json!({"type": "flat", "amount": s.recurring_fee.normalize().to_string()}),
                    )),
                    unit_price: Some(amount),
                    tiers: Details::default(),
                    amount,
                    discount: Decimal::ZERO,
                    tax: Decimal::ZERO,
                    total: Decimal::ZERO,
                });
            }
            for mp in mps {
                let a = aggs.get(&(k as u32, mp.meter, None)).unwrap_or(&zero);
                lines.push(usage_line(mp, a.quantity(mp.aggregation), from, to)?);
            }
        } else {
            for mp in mps {
                let now = aggs
                    .get(&(k as u32, mp.meter, None))
                    .unwrap_or(&zero)
                    .quantity(mp.aggregation)
                    .normalize();
                // Lines name the span start of the period they bill.
                let before = billed
                    .get(&(s.id, mp.meter, from))
                    .copied()
                    .unwrap_or_default()
                    .normalize();
                if now == before {
                    continue;
                }
                let mut l = usage_line(mp, now, from, to)?;
                let delta = mp.price.total(now)? - mp.price.total(before)?;
                l.kind = "correction";
                l.description = format!("{} — correction for {}", l.description, d.period);
                l.previous_quantity = Some(before);
                l.unit_price = None;
                l.amount = delta;
                lines.push(l);
            }
        }
    }
    if !has_span {
        return Ok(None);
    }
    // Corrections after the period's own lines.
    lines.sort_by_key(|l| l.kind == "correction");
    let tax = s.tax_region.as_ref().and_then(|r| x.taxes.get(r));
    finish(x.tenant, s, ym, lines, tax).map(Some)
}

/// Rates one tenant's subscriptions for `ym` (and corrections of the periods before).
pub async fn rate_tenant(
    db: &tokio_postgres::Client,
    extra: &[tokio_postgres::Client],
    tenant: Uuid,
    ym: YearMonth,
    scope: Scope<'_>,
    stats: &mut LoadStats,
) -> anyhow::Result<Vec<Rated>> {
    let t0 = Instant::now();
    let mut priors = Vec::new();
    let mut p = ym;
    let corrections = if scope.plan.is_some() {
        0
    } else {
        CORRECTION_PERIODS
    };
    for _ in 0..corrections {
        p = p.prev();
        priors.push(p);
    }
    let prior_labels: Vec<String> = priors.iter().map(ToString::to_string).collect();
    // Rating a whole tenant, what does not depend on the subscriptions is read at the same
    // time as they are (the queries pipeline on the one connection); for one customer, it
    // is read for their subscriptions once they are known.
    let tenant_wide = scope.customer.is_none();
    let (mut subs, taxes, pre) = futures_util::future::try_join3(
        load_subs(db, tenant, scope.customer),
        load_tax(db, tenant),
        async {
            if !tenant_wide {
                return Ok(None);
            }
            futures_util::future::try_join3(
                billed(db, tenant, None),
                issued(db, tenant, None, &prior_labels),
                load_subjects(db, tenant, None),
            )
            .await
            .map(Some)
        },
    )
    .await?;
    if let Some(o) = scope.plan {
        subs.retain(|s| s.currency == o.currency);
        for s in &mut subs {
            s.plan_version = o.version;
            s.plan = o.label.clone();
            s.recurring_fee = o.recurring_fee;
        }
    }
    tracing::debug!(
        seconds = t0.elapsed().as_secs_f64(),
        n = subs.len(),
        "subscriptions loaded"
    );
    if subs.is_empty() {
        return Ok(Vec::new());
    }
    let mut versions: Vec<Uuid> = subs.iter().map(|s| s.plan_version).collect();
    versions.sort();
    versions.dedup();
    let prices = load_prices(db, tenant, &versions).await?;
    let (billed, issued, subjects) = match pre {
        Some(pre) => pre,
        None => {
            let sub_ids: Vec<Uuid> = subs.iter().map(|s| s.id).collect();
            let customers: Vec<Uuid> = subs.iter().map(|s| s.customer_id).collect();
            futures_util::future::try_join3(
                billed(db, tenant, Some(&sub_ids)),
                issued(db, tenant, Some(&sub_ids), &prior_labels),
                load_subjects(db, tenant, Some(&customers)),
            )
            .await?
        }
    };

    tracing::debug!(
        seconds = t0.elapsed().as_secs_f64(),
        "catalog, billed, subjects loaded"
    );
    let mut defs: Vec<SpanDef> = Vec::new();
    let mut rows: Vec<SpanSubject> = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let periods = std::iter::once(ym).chain(
            priors
                .iter()
                .copied()
                .filter(|p| issued.contains(&(s.id, p.to_string()))),
        );
        for p in periods {
            let Some((_, _, from, to)) = s.span(p) else {
                continue;
            };
            let span = defs.len() as u32;
            defs.push(SpanDef { sub: i, period: p });
            for subject in subjects.get(&s.customer_id).into_iter().flatten() {
                rows.push(SpanSubject {
                    span,
                    subject: subject.clone(),
                    from,
                    to,
                });
            }
        }
    }
    let meters = priced_meters(&prices);
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "spans built");
    let aggs = aggregate(db, extra, tenant, &meters, &rows, false, stats).await?;
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "usage aggregated");
    let x = PriceInputs {
        tenant,
        ym,
        subs: &subs,
        defs: &defs,
        prices: &prices,
        taxes: &taxes,
        billed: &billed,
        aggs: &aggs,
    };
    // Each subscription's spans, in order (defs were built subscription by subscription).
    let mut ranges: Vec<(usize, std::ops::Range<usize>)> = Vec::with_capacity(subs.len());
    let mut k = 0;
    for i in 0..subs.len() {
        let first = k;
        while k < defs.len() && defs[k].sub == i {
            k += 1;
        }
        ranges.push((i, first..k));
    }
    // Pricing is CPU work with PostgreSQL idle: one share of the subscriptions per core, in
    // subscription order.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let share = ranges.len().div_ceil(threads).max(1);
    let priced: Vec<anyhow::Result<Vec<Rated>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .chunks(share)
            .map(|chunk| {
                let x = &x;
                scope.spawn(move || {
                    let mut out = Vec::with_capacity(chunk.len());
                    for (i, r) in chunk {
                        out.extend(price_sub(x, *i, r.clone())?);
                    }
                    anyhow::Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a pricing thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(subs.len());
    for p in priced {
        out.extend(p?);
    }
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "invoices computed");
    Ok(out)
}

/// Writes rated invoices as drafts in one transaction, in bulk (a chunk of invoices at a time:
/// UNNEST arrays for changed drafts, binary COPY for new ones and for lines); returns (written, unchanged, frozen).
pub async fn write(
    db: &mut tokio_postgres::Client,
    rated: &[Rated],
) -> anyhow::Result<(usize, usize, usize)> {
    const CHUNK: usize = 5_000;
    let tx = db.transaction().await?;
    let (mut written, mut unchanged, mut frozen) = (0, 0, 0);
    for chunk in rated.chunks(CHUNK) {
        let subs: Vec<Uuid> = chunk.iter().map(|r| r.subscription).collect();
        let periods: Vec<&str> = chunk.iter().map(|r| r.period.as_str()).collect();
        let existing: HashMap<(Uuid, String), (Uuid, String, Vec<u8>)> = tx
            .query(
                "SELECT i.subscription_id, i.period, i.id, i.status, i.content_sha256
                   FROM invoices i JOIN unnest($1::uuid[], $2::text[]) k(s, p)
                     ON i.subscription_id = k.s AND i.period = k.p
                  FOR UPDATE OF i",
                &[&subs, &periods],
            )
            .await?
            .into_iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4))))
            .collect();
        tracing::debug!("existing read");
        let mut fresh: Vec<&Rated> = Vec::new();
        let mut changed: Vec<(Uuid, &Rated)> = Vec::new();
        for r in chunk {
            match existing.get(&(r.subscription, r.period.clone())) {
                None => fresh.push(r),
                Some((_, status, _)) if status != "draft" => frozen += 1,
                Some((_, _, sha)) if *sha == r.sha256 => unchanged += 1,
                Some((id, _, _)) => changed.push((*id, r)),
            }
        }
        // Changed drafts: new totals, lines replaced.
        if !changed.is_empty() {
            let ids: Vec<Uuid> = changed.iter().map(|c| c.0).collect();
            let col = |f: fn(&Rated) -> Decimal| changed.iter().map(|c| f(c.1)).collect::<Vec<_>>();
            let shas: Vec<&[u8]> = changed.iter().map(|c| c.1.sha256.as_slice()).collect();
            tx.execute(
                "UPDATE invoices i SET subtotal = v.subtotal, discount = v.discount, tax = v.tax,
                        total = v.total, content_sha256 = v.sha, updated_at = now()
                   FROM unnest($1::uuid[], $2::numeric[], $3::numeric[], $4::numeric[], $5::numeric[], $6::bytea[])
                        AS v(id, subtotal, discount, tax, total, sha)
                  WHERE i.id = v.id",
                &[&ids, &col(|r| r.subtotal), &col(|r| r.discount), &col(|r| r.tax), &col(|r| r.total), &shas],
            )
            .await?;
            tx.execute(
                "DELETE FROM invoice_lines WHERE invoice_id = ANY($1)",
                &[&ids],
            )
            .await?;
        }
        let mut targets: Vec<(Uuid, &Rated)> = changed;
        if !fresh.is_empty() {
            // Ids made here (time-ordered v7, so the primary key index grows at its end) let the
            // rows go in by binary COPY, several times faster than INSERT … RETURNING.
            let base = targets.len();
            targets.extend(fresh.into_iter().map(|r| (Uuid::now_v7(), r)));
            let t0 = Instant::now();
            copy_invoices(&tx, &targets[base..]).await?;
            tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "invoices copied");
        }
        written += targets.len();
        let t0 = Instant::now();
        insert_lines(&tx, &targets).await?;
        tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "lines copied");
    }
    tx.commit().await?;
    Ok((written, unchanged, frozen))
}

/// New draft invoices, with the ids given, by binary COPY.
async fn copy_invoices(
    tx: &tokio_postgres::Transaction<'_>,
    targets: &[(Uuid, &Rated)],
) -> anyhow::Result<()> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    let sink = tx
        .copy_in(
            "COPY invoices (id, tenant_id, customer_id, subscription_id, period, period_start,
                    period_end, currency, subtotal, discount, tax, total, content_sha256)
               FROM STDIN (FORMAT binary)",
        )
        .await?;
    let types = [
        Type::UUID,
        Type::UUID,
        Type::UUID,
        Type::UUID,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::BYTEA,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for (id, r) in targets {
        let sha = r.sha256.as_slice();
        let row: [&(dyn ToSql + Sync); 13] = [
            id,
            &r.tenant,
            &r.customer,
            &r.subscription,
            &r.period,
            &r.period_start,
            &r.period_end,
            &r.currency,
            &r.subtotal,
            &r.discount,
            &r.tax,
            &r.total,
            &sha,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Lines by binary COPY (several times faster than INSERT for the 100 k-invoice case).
async fn insert_lines(
    tx: &tokio_postgres::Transaction<'_>,
    targets: &[(Uuid, &Rated)],
) -> anyhow::Result<()> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{Json, ToSql, Type};
    if targets.iter().all(|t| t.1.lines.is_empty()) {
        return Ok(());
    }
    let sink = tx
        .copy_in(
            "COPY invoice_lines (invoice_id, position, tenant_id, kind, meter_id, description,
                    period_start, period_end, quantity, previous_quantity, price, unit_price, tiers,
                    amount, discount, tax, total) FROM STDIN (FORMAT binary)",
        )
        .await?;
    let types = [
        Type::UUID,
        Type::INT4,
        Type::UUID,
        Type::TEXT,
        Type::UUID,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::JSONB,
        Type::NUMERIC,
        Type::JSON,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::NUMERIC,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for (id, r) in targets {
        for (i, l) in r.lines.iter().enumerate() {
            let position = i as i32 + 1;
            let price = l.price.as_deref().map(Json);
            let tiers = Json(&l.tiers);
            let row: [&(dyn ToSql + Sync); 17] = [
                id,
                &position,
                &r.tenant,
                &l.kind,
                &l.meter,
                &l.description,
                &l.period_start,
                &l.period_end,
                &l.quantity,
                &l.previous_quantity,
                &price,
                &l.unit_price,
                &tiers,
                &l.amount,
                &l.discount,
                &l.tax,
                &l.total,
            ];
            writer.as_mut().write(&row).await?;
        }
    }
    writer.finish().await?;
    Ok(())
}

pub async fn tenants(db: &tokio_postgres::Client, only: Option<Uuid>) -> anyhow::Result<Vec<Uuid>> {
    Ok(db
        .query(
            "SELECT DISTINCT tenant_id FROM subscriptions WHERE ($1::uuid IS NULL OR tenant_id = $1) ORDER BY 1",
            &[&only],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Runs the rating job. `extra` connections (optional) read usage in parallel with `db`.
pub async fn run(
    db: &mut tokio_postgres::Client,
    extra: &[tokio_postgres::Client],
    opts: &Options,
    quiet: bool,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let progress = Progress::new(quiet);
    let mut sum = Summary::default();
    let mut stats = LoadStats::default();
    for tenant in tenants(db, opts.tenant).await? {
        let rated = rate_tenant(
            db,
            extra,
            tenant,
            opts.period,
            Scope {
                customer: opts.customer.as_deref(),
                plan: None,
            },
            &mut stats,
        )
        .await?;
        if rated.is_empty() {
            continue;
        }
        progress.tenant(tenant, rated.len(), quiet);
        sum.tenants += 1;
        let mut cs: Vec<Uuid> = rated.iter().map(|r| r.customer).collect();
        cs.sort();
        cs.dedup();
        sum.customers += cs.len();
        for r in &rated {
            sum.lines += r.lines.len();
            sum.corrections += r.lines.iter().filter(|l| l.kind == "correction").count();
            *sum.totals.entry(r.currency.clone()).or_default() += r.total;
        }
        if !opts.dry_run {
            let t0 = Instant::now();
            let (w, u, f) = write(db, &rated).await?;
            sum.write += t0.elapsed();
            sum.invoices_written += w;
            sum.invoices_unchanged += u;
            sum.invoices_frozen += f;
        }
        progress.done(rated.len());
        sum.invoices.extend(rated);
    }
    progress.finish();
    sum.usage_rows = stats.rows;
    sum.load = stats.load;
    sum.query = stats.query;
    sum.elapsed = started.elapsed();
    Ok(sum)
}

/// Issues the drafts of `period` (whose period has ended, unless `early`), numbering them per
/// tenant without gaps; returns (invoice id, tenant, number).
pub async fn issue(
    db: &mut tokio_postgres::Client,
    period: YearMonth,
    tenant: Option<Uuid>,
    customer: Option<&str>,
    early: bool,
) -> anyhow::Result<Vec<(Uuid, Uuid, i64)>> {
    let tx = db.transaction().await?;
    let drafts = tx
        .query(
            "SELECT i.id, i.tenant_id, i.period_end FROM invoices i JOIN customers c ON c.id = i.customer_id
              WHERE i.period = $1 AND i.status = 'draft' AND ($2::uuid IS NULL OR i.tenant_id = $2)
                AND ($3::text IS NULL OR c.key = $3)
              ORDER BY i.tenant_id, c.key, i.period_start
              FOR UPDATE OF i",
            &[&period.to_string(), &tenant, &customer],
        )
        .await?;
    let mut out = Vec::new();
    for d in drafts {
        let end: DateTime<Utc> = d.get(2);
        if !early && end > Utc::now() {
            bail!(
                "period {period} has not ended for invoice {} (ends {end}); pass --early to issue it anyway",
                d.get::<_, Uuid>(0)
            );
        }
        let tenant: Uuid = d.get(1);
        let id: Uuid = d.get(0);
        let n = match schemas::invoices::issue(&tx, tenant, id).await? {
            schemas::invoices::Change::Done(Some(n)) => n,
            other => bail!("invoice {id} could not be issued: {other:?}"),
        };
        out.push((d.get(0), tenant, n));
    }
    tx.commit().await?;
    Ok(out)
}

/// One difference found by [`reconcile`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    pub invoice: Uuid,
    pub customer: String,
    pub what: String,
    pub expected: String,
    pub found: String,
}

/// Checks every invoice of `period`: total = Σ line totals, subtotal = Σ amounts, tax = Σ taxes;
/// each usage line's amount = its price applied to its quantity, rounded; and each line's
/// quantity = the usage stored now (for an issued invoice, a difference is a pending correction).
pub async fn reconcile(
    db: &tokio_postgres::Client,
    period: YearMonth,
    tenant: Option<Uuid>,
) -> anyhow::Result<(usize, Vec<Difference>)> {
    let mut diffs = Vec::new();
    let mut checked = 0;
    let mut stats = LoadStats::default();
    for t in tenants(db, tenant).await? {
        let rated = rate_tenant(db, &[], t, period, Scope::default(), &mut stats).await?;
        let now: HashMap<Uuid, &Rated> = rated.iter().map(|r| (r.subscription, r)).collect();
        let invoices = db
            .query(
                "SELECT i.id, c.key, i.subscription_id, i.currency, i.subtotal, i.tax, i.total, i.status
                   FROM invoices i JOIN customers c ON c.id = i.customer_id
                  WHERE i.tenant_id = $1 AND i.period = $2 AND i.status <> 'void'",
                &[&t, &period.to_string()],
            )
            .await?;
        // Every line of the tenant's period at once, with its price (one query, not one per
        // invoice), parsed once per distinct price.
        let all_lines = db
            .query(
                "SELECT l.invoice_id, l.kind, l.meter_id, l.quantity, coalesce(l.price, pp.price)::text,
                        l.amount, l.tax, l.total, l.description, l.previous_quantity
                   FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id
                   JOIN subscriptions s ON s.id = i.subscription_id
                   LEFT JOIN plan_prices pp ON pp.plan_version_id = s.plan_version_id AND pp.meter_id = l.meter_id
                  WHERE i.tenant_id = $1 AND i.period = $2 AND i.status <> 'void'
                  ORDER BY l.invoice_id, l.position",
                &[&t, &period.to_string()],
            )
            .await?;
        let mut by_invoice: HashMap<Uuid, Vec<&tokio_postgres::Row>> = HashMap::new();
        for l in &all_lines {
            by_invoice.entry(l.get(0)).or_default().push(l);
        }
        let mut parsed: HashMap<String, Price> = HashMap::new();
        for inv in invoices {
            checked += 1;
            let id: Uuid = inv.get(0);
            let customer: String = inv.get(1);
            let currency = Currency::from_str(&inv.get::<_, String>(3))?;
            let mut diff = |what: String, expected: Decimal, found: Decimal| {
                if expected != found {
                    diffs.push(Difference {
                        invoice: id,
                        customer: customer.clone(),
                        what,
                        expected: expected.normalize().to_string(),
                        found: found.normalize().to_string(),
                    });
                }
            };
            let lines = by_invoice.remove(&id).unwrap_or_default();
            let s = |i: usize| {
                lines
                    .iter()
                    .map(move |l| l.get::<_, Decimal>(i))
                    .sum::<Decimal>()
            };
            diff("total = Σ line totals".into(), s(7), inv.get(6));
            diff("subtotal = Σ line amounts".into(), s(5), inv.get(4));
            diff("tax = Σ line taxes".into(), s(6), inv.get(5));
            let current = now.get(&inv.get::<_, Uuid>(2));
            for l in &lines {
                let kind: String = l.get(1);
                let desc: String = l.get(8);
                if kind != "usage" {
                    continue;
                }
                let q: Decimal = l.get(3);
                let text: Option<String> = l.get(4);
                let text = text.unwrap_or_default();
                if !parsed.contains_key(&text) {
                    let p = Price::from_json(&text)
                        .with_context(|| format!("the price of line {desc:?}"))?;
                    parsed.insert(text.clone(), p);
                }
                let price = &parsed[&text];
                let expected = billing_core::money::round_line(price.total(q)?, currency);
                diff(
                    format!("{desc}: amount = price × quantity"),
                    expected,
                    l.get(5),
                );
                let meter: Option<Uuid> = l.get(2);
                let stored = current
                    .and_then(|r| {
                        r.lines
                            .iter()
                            .find(|x| x.kind == "usage" && x.meter == meter)
                    })
                    .map(|x| x.quantity);
                if let Some(stored) = stored {
                    diff(format!("{desc}: quantity = stored usage"), stored, q);
                }
            }
        }
    }
    Ok((checked, diffs))
}
