//! Catalog and customers: plans with versions and prices, tax rates, customers with their event
//! subjects, subscriptions; and the invoices the rater writes (read-only here).
//!
//! - `POST /api/v1/plans` creates a plan and its version 1; `POST /api/v1/plans/{key}/versions`
//!   adds the next version (a subscription keeps the version it was created with).
//!   `GET /api/v1/plans`, `GET /api/v1/plans/{idOrKey}` (with every version).
//! - `PUT /api/v1/tax-rates/{region}`, `GET /api/v1/tax-rates`.
//! - `POST/GET /api/v1/customers`, `GET /api/v1/customers/{idOrKey}`.
//! - `POST/GET /api/v1/subscriptions`, `GET /api/v1/subscriptions/{id}`.
//! - `GET /api/v1/invoices?period=YYYY-MM`, `GET /api/v1/invoices/{id}` (with lines),
//!   `POST /api/v1/invoices/{id}/issue[?early=true]`, `POST /api/v1/invoices/{id}/void`,
//!   `POST /api/v1/invoices/{id}/mark-paid`,
//!   `GET /api/v1/invoices/{id}/html`. Invoices are written by the rater.
//!
//! Writing needs the `admin` scope, reading `read`. Another tenant's objects are "not found".

use crate::auth::Caller;
use crate::http::{ApiError, AppState};
use crate::page;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use billing_core::{Currency, Price};
use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::str::FromStr;
use uuid::Uuid;

const PLAN_TIERS: [&str; 5] = ["free", "basic", "pro", "enterprise", "custom"];

use crate::http::{body, conflict};

pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

fn currency(field: &str, code: &str) -> Result<Currency, ApiError> {
    Currency::from_code(code).map_err(|e| ApiError::invalid(field, e.to_string()))
}

pub(crate) fn decimal(field: &str, s: &str) -> Result<Decimal, ApiError> {
    Decimal::from_str(s.trim())
        .map_err(|_| ApiError::invalid(field, "must be a decimal number written as a string"))
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, ApiError> {
    v.ok_or_else(|| ApiError::invalid(field, "is required"))
}

// ---------------------------------------------------------------- plans

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewPlanPrice {
    /// Meter id or slug.
    pub meter: Option<String>,
    /// A price in DESIGN.md's format (`{"type": "unit", "amount": "0.002"}`, tiered, package, …).
    #[schema(value_type = Option<Object>)]
    pub price: Option<Value>,
    pub entitlement: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewVersion {
    pub currency: Option<String>,
    pub recurring_fee: Option<String>,
    #[serde(default)]
    #[schema(inline)]
    pub prices: Vec<NewPlanPrice>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewPlan {
    pub key: Option<String>,
    pub name: Option<String>,
    pub tier: Option<String>,
    pub currency: Option<String>,
    pub recurring_fee: Option<String>,
    #[serde(default)]
    #[schema(inline)]
    pub prices: Vec<NewPlanPrice>,
}

struct CheckedPrice {
    meter_id: Uuid,
    price: Value,
    entitlement: Option<Decimal>,
}

async fn check_version(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    v: &NewVersion,
) -> Result<(String, Decimal, Vec<CheckedPrice>), ApiError> {
    let code = required(v.currency.as_deref(), "currency")?;
    currency("currency", code)?;
    let fee = match &v.recurring_fee {
        Some(f) => decimal("recurringFee", f)?,
        None => Decimal::ZERO,
    };
    if fee < Decimal::ZERO {
        return Err(ApiError::invalid("recurringFee", "must not be negative"));
    }
    let mut out = Vec::with_capacity(v.prices.len());
    for (i, p) in v.prices.iter().enumerate() {
        let meter = required(p.meter.as_deref(), &format!("prices[{i}].meter"))?;
        let m = crate::meters::find(db, tenant, meter)
            .await
            .map_err(|_| ApiError::invalid(format!("prices[{i}].meter"), "no such meter"))?;
        if out.iter().any(|c: &CheckedPrice| c.meter_id == m.id) {
            return Err(ApiError::invalid(
                format!("prices[{i}].meter"),
                "has a price already in this version",
            ));
        }
        let price = required(p.price.clone(), &format!("prices[{i}].price"))?;
        Price::from_json(&price.to_string())
            .map_err(|e| ApiError::invalid(format!("prices[{i}].price"), e.to_string()))?;
        let entitlement = p
            .entitlement
            .as_deref()
            .map(|e| decimal(&format!("prices[{i}].entitlement"), e))
            .transpose()?;
        if entitlement.is_some_and(|e| e < Decimal::ZERO) {
            return Err(ApiError::invalid(
                format!("prices[{i}].entitlement"),
                "must not be negative",
            ));
        }
        out.push(CheckedPrice {
            meter_id: m.id,
            price,
            entitlement,
        });
    }
    Ok((code.to_string(), fee, out))
}

async fn insert_version(
    tx: &tokio_postgres::Transaction<'_>,
    tenant: Uuid,
    plan: Uuid,
    checked: (String, Decimal, Vec<CheckedPrice>),
) -> Result<i32, ApiError> {
    let (cur, fee, prices) = checked;
    let row = tx
        .query_one(
            "INSERT INTO plan_versions (tenant_id, plan_id, version, currency, recurring_fee)
             SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4 FROM plan_versions WHERE plan_id = $2
             RETURNING id, version",
            &[&tenant, &plan, &cur, &fee],
        )
        .await?;
    let vid: Uuid = row.get(0);
    for p in prices {
        tx.execute(
            "INSERT INTO plan_prices (tenant_id, plan_version_id, meter_id, price, entitlement)
             VALUES ($1, $2, $3, $4, $5)",
            &[&tenant, &vid, &p.meter_id, &p.price, &p.entitlement],
        )
        .await?;
    }
    Ok(row.get(1))
}

async fn plan_view<C: tokio_postgres::GenericClient>(
    db: &C,
    tenant: Uuid,
    key: &str,
) -> Result<Value, ApiError> {
    let id = Uuid::parse_str(key).ok();
    let plan = db
        .query_opt(
            "SELECT id, key, name, tier, created_at FROM plans
              WHERE tenant_id = $1 AND (id = $2 OR key = $3)",
            &[&tenant, &id, &key],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("plan"))?;
    let pid: Uuid = plan.get(0);
    let versions = db
        .query(
            "SELECT v.id, v.version, v.currency, v.recurring_fee, v.created_at,
                    coalesce(jsonb_agg(jsonb_build_object(
                        'meter', m.slug, 'meterId', p.meter_id, 'price', p.price,
                        'entitlement', p.entitlement::text) ORDER BY m.slug)
                        FILTER (WHERE p.meter_id IS NOT NULL), '[]')
               FROM plan_versions v
               LEFT JOIN plan_prices p ON p.plan_version_id = v.id
               LEFT JOIN meters m ON m.id = p.meter_id
              WHERE v.tenant_id = $1 AND v.plan_id = $2
              GROUP BY v.id ORDER BY v.version",
            &[&tenant, &pid],
        )
        .await?;
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!({
                "id": v.get::<_, Uuid>(0),
                "version": v.get::<_, i32>(1),
                "currency": v.get::<_, String>(2),
                "recurringFee": dec(v.get(3)),
                "createdAt": ts(v.get(4)),
                "prices": v.get::<_, Value>(5),
            })
        })
        .collect();
    Ok(json!({
        "id": pid,
        "key": plan.get::<_, String>(1),
        "name": plan.get::<_, String>(2),
        "tier": plan.get::<_, String>(3),
        "createdAt": ts(plan.get(4)),
        "versions": versions,
    }))
}

pub async fn create_plan(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<NewPlan>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let p = body(b)?;
    let key = required(p.key.clone(), "key")?;
    if !schemas::meter::valid_slug(&key) {
        return Err(ApiError::invalid(
            "key",
            "must be lower-case letters and digits, words joined by `_` or `-`, at most 63 characters",
        ));
    }
    let tier = p.tier.clone().unwrap_or_else(|| "custom".into());
    if !PLAN_TIERS.contains(&tier.as_str()) {
        return Err(ApiError::invalid(
            "tier",
            "must be free, basic, pro, enterprise or custom",
        ));
    }
    let mut db = st.pool.get().await?;
    let version = NewVersion {
        currency: p.currency,
        recurring_fee: p.recurring_fee,
        prices: p.prices,
    };
    let checked = check_version(&db, caller.tenant, &version).await?;
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO plans (tenant_id, key, name, tier) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, key) DO NOTHING RETURNING id",
            &[
                &caller.tenant,
                &key,
                &p.name.unwrap_or_else(|| key.clone()),
                &tier,
            ],
        )
        .await?
        .ok_or_else(|| conflict("key", format!("a plan with key `{key}` already exists")))?;
    insert_version(&tx, caller.tenant, row.get(0), checked).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(plan_view(&**db, caller.tenant, &key).await?),
    ))
}

pub async fn create_version(
    State(st): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    b: Result<Json<NewVersion>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let v = body(b)?;
    let mut db = st.pool.get().await?;
    let plan = plan_view(&**db, caller.tenant, &key).await?;
    let pid = Uuid::parse_str(plan["id"].as_str().unwrap_or_default())
        .map_err(|_| ApiError::not_found("plan"))?;
    let checked = check_version(&db, caller.tenant, &v).await?;
    let tx = db.transaction().await?;
    // Serialise version numbering per plan.
    tx.execute("SELECT 1 FROM plans WHERE id = $1 FOR UPDATE", &[&pid])
        .await?;
    insert_version(&tx, caller.tenant, pid, checked).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(plan_view(&**db, caller.tenant, &key).await?),
    ))
}

/// `GET /api/v1/plans?limit&cursor&tier`: by key, cursor-paginated.
pub async fn list_plans(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let after = page::key(q.get("cursor").map(String::as_str))?;
    let db = st.pool.get().await?;
    let keys = db
        .query(
            "SELECT key FROM plans WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2)
                AND ($3::text IS NULL OR tier = $3)
              ORDER BY key LIMIT $4",
            &[&caller.tenant, &after, &q.get("tier"), &(limit + 1)],
        )
        .await?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        out.push(plan_view(&**db, caller.tenant, k.get(0)).await?);
    }
    Ok(Json(page::page(out, limit, Value::clone, |p| {
        page::key_cursor(p["key"].as_str().unwrap_or_default())
    })))
}

pub async fn get_plan(
    State(st): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    Ok(Json(plan_view(&**db, caller.tenant, &key).await?))
}

// ---------------------------------------------------------------- tax rates

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewTaxRate {
    pub rate: Option<String>,
    #[serde(default)]
    pub inclusive: bool,
}

pub async fn put_tax_rate(
    State(st): State<AppState>,
    caller: Caller,
    Path(region): Path<String>,
    b: Result<Json<NewTaxRate>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let t = body(b)?;
    if region.is_empty() || region.len() > 32 {
        return Err(ApiError::invalid("region", "must be 1 to 32 characters"));
    }
    let rate = decimal("rate", required(t.rate.as_deref(), "rate")?)?;
    if rate < Decimal::ZERO || rate > Decimal::ONE_HUNDRED {
        return Err(ApiError::invalid(
            "rate",
            "must be a percentage between 0 and 100",
        ));
    }
    let db = st.pool.get().await?;
    db.execute(
        "INSERT INTO tax_rates (tenant_id, region, rate, inclusive) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant_id, region) DO UPDATE SET rate = excluded.rate, inclusive = excluded.inclusive",
        &[&caller.tenant, &region, &rate, &t.inclusive],
    )
    .await?;
    Ok(Json(
        json!({"region": region, "rate": dec(rate), "inclusive": t.inclusive}),
    ))
}

/// `GET /api/v1/tax-rates?limit&cursor`: by region, cursor-paginated.
pub async fn list_tax_rates(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let after = page::key(q.get("cursor").map(String::as_str))?;
    let db = st.pool.get().await?;
    let rows = db
        .query(
            "SELECT region, rate, inclusive FROM tax_rates
              WHERE tenant_id = $1 AND ($2::text IS NULL OR region > $2)
              ORDER BY region LIMIT $3",
            &[&caller.tenant, &after, &(limit + 1)],
        )
        .await?;
    Ok(Json(page::page(
        rows,
        limit,
        |r| json!({"region": r.get::<_, String>(0), "rate": dec(r.get(1)), "inclusive": r.get::<_, bool>(2)}),
        |r| page::key_cursor(r.get(0)),
    )))
}

// ---------------------------------------------------------------- customers

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewCustomer {
    pub key: Option<String>,
    pub name: Option<String>,
    pub currency: Option<String>,
    pub timezone: Option<String>,
    pub billing_anchor_day: Option<i32>,
    pub tax_region: Option<String>,
    #[serde(default)]
    pub subjects: Vec<String>,
}

const CUSTOMER_COLUMNS: &str = "c.id, c.key, c.name, c.currency, c.timezone, c.billing_anchor_day, c.tax_region, c.created_at,
    coalesce((SELECT array_agg(s.subject ORDER BY s.subject) FROM customer_subjects s WHERE s.customer_id = c.id), '{}')";

fn customer_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "key": r.get::<_, String>(1),
        "name": r.get::<_, String>(2),
        "currency": r.get::<_, String>(3),
        "timezone": r.get::<_, String>(4),
        "billingAnchorDay": r.get::<_, i32>(5),
        "taxRegion": r.get::<_, Option<String>>(6),
        "createdAt": ts(r.get(7)),
        "subjects": r.get::<_, Vec<String>>(8),
    })
}

pub(crate) async fn find_customer<C: tokio_postgres::GenericClient>(
    db: &C,
    tenant: Uuid,
    key: &str,
) -> Result<Value, ApiError> {
    let id = Uuid::parse_str(key).ok();
    let r = db
        .query_opt(
            &format!(
                "SELECT {CUSTOMER_COLUMNS} FROM customers c
                  WHERE c.tenant_id = $1 AND (c.id = $2 OR c.key = $3)
                  ORDER BY (c.id = $2) DESC NULLS LAST LIMIT 1"
            ),
            &[&tenant, &id, &key],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("customer"))?;
    Ok(customer_view(&r))
}

pub async fn create_customer(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<NewCustomer>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = body(b)?;
    let key = required(c.key.clone(), "key")?;
    if key.is_empty() || key.len() > 256 {
        return Err(ApiError::invalid("key", "must be 1 to 256 characters"));
    }
    let cur = required(c.currency.as_deref(), "currency")?;
    currency("currency", cur)?;
    let tz = c.timezone.clone().unwrap_or_else(|| "UTC".into());
    tz.parse::<chrono_tz::Tz>()
        .map_err(|_| ApiError::invalid("timezone", "is not an IANA time zone name"))?;
    let anchor = c.billing_anchor_day.unwrap_or(1);
    if !(1..=31).contains(&anchor) {
        return Err(ApiError::invalid("billingAnchorDay", "must be 1 to 31"));
    }
    for (i, s) in c.subjects.iter().enumerate() {
        if s.is_empty() {
            return Err(ApiError::invalid(
                format!("subjects[{i}]"),
                "must not be empty",
            ));
        }
    }
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO customers (tenant_id, key, name, currency, timezone, billing_anchor_day, tax_region)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, key) DO NOTHING RETURNING id",
            &[
                &caller.tenant,
                &key,
                &c.name.clone().unwrap_or_else(|| key.clone()),
                &cur,
                &tz,
                &anchor,
                &c.tax_region,
            ],
        )
        .await?
        .ok_or_else(|| conflict("key", format!("a customer with key `{key}` already exists")))?;
    let id: Uuid = row.get(0);
    for (i, s) in c.subjects.iter().enumerate() {
        let n = tx
            .execute(
                "INSERT INTO customer_subjects (tenant_id, subject, customer_id) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&caller.tenant, s, &id],
            )
            .await?;
        if n == 0 {
            return Err(conflict(
                &format!("subjects[{i}]"),
                format!("subject `{s}` already belongs to a customer"),
            ));
        }
    }
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(find_customer(&**db, caller.tenant, &id.to_string()).await?),
    ))
}

/// `GET /api/v1/customers?limit&cursor&currency&subject`: cursor-paginated, oldest first.
pub async fn list_customers(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let (t, id) = page::time_id(q.get("cursor").map(String::as_str))?
        .map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {CUSTOMER_COLUMNS}, c.created_at, c.id FROM customers c
                  WHERE c.tenant_id = $1 AND ($2::timestamptz IS NULL OR (c.created_at, c.id) > ($2, $3))
                    AND ($4::text IS NULL OR c.currency = $4)
                    AND ($5::text IS NULL OR EXISTS (SELECT 1 FROM customer_subjects s
                                                     WHERE s.customer_id = c.id AND s.subject = $5))
                  ORDER BY c.created_at, c.id LIMIT $6"
            ),
            &[&caller.tenant, &t, &id, &q.get("currency"), &q.get("subject"), &(limit + 1)],
        )
        .await?;
    Ok(Json(page::page(rows, limit, customer_view, |r| {
        let n = r.len();
        page::time_id_cursor(r.get(n - 2), r.get(n - 1))
    })))
}

pub async fn get_customer(
    State(st): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    Ok(Json(find_customer(&**db, caller.tenant, &key).await?))
}

// ---------------------------------------------------------------- subscriptions

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewSubscription {
    /// Customer id or key.
    pub customer: Option<String>,
    /// Plan id or key.
    pub plan: Option<String>,
    /// Plan version; the latest when absent.
    pub version: Option<i32>,
    /// RFC 3339; now when absent.
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// A free trial of this many days (1 to 365): the subscription starts `trialing`.
    pub trial_days: Option<i32>,
}

const SUB_COLUMNS: &str =
    "s.id, c.key, p.key, v.version, s.status, s.started_at, s.ended_at, s.auto_renew, v.currency,
     s.trial_ends_at, s.cancel_at_period_end, s.past_due_since, s.replaced_by, s.scheduled_change_at,
     (SELECT p2.key || ' v' || v2.version FROM plan_versions v2 JOIN plans p2 ON p2.id = v2.plan_id
       WHERE v2.id = s.scheduled_plan_version_id)";

fn sub_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "customer": r.get::<_, String>(1),
        "plan": r.get::<_, String>(2),
        "version": r.get::<_, i32>(3),
        "status": r.get::<_, String>(4),
        "startedAt": ts(r.get(5)),
        "endedAt": r.get::<_, Option<DateTime<Utc>>>(6).map(ts),
        "autoRenew": r.get::<_, bool>(7),
        "currency": r.get::<_, String>(8),
        "trialEndsAt": r.get::<_, Option<DateTime<Utc>>>(9).map(ts),
        "cancelAtPeriodEnd": r.get::<_, bool>(10),
        "pastDueSince": r.get::<_, Option<DateTime<Utc>>>(11).map(ts),
        "replacedBy": r.get::<_, Option<Uuid>>(12),
        "scheduledChangeAt": r.get::<_, Option<DateTime<Utc>>>(13).map(ts),
        "scheduledPlan": r.get::<_, Option<String>>(14),
    })
}

const SUB_FROM: &str = "subscriptions s JOIN customers c ON c.id = s.customer_id
    JOIN plan_versions v ON v.id = s.plan_version_id JOIN plans p ON p.id = v.plan_id";

fn time(field: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ApiError::invalid(field, "must be an RFC 3339 time"))
}

pub async fn create_subscription(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<NewSubscription>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let s = body(b)?;
    let db = st.pool.get().await?;
    let customer = find_customer(
        &**db,
        caller.tenant,
        required(s.customer.as_deref(), "customer")?,
    )
    .await
    .map_err(|_| ApiError::invalid("customer", "no such customer"))?;
    let (vid, _) = plan_version_for(
        &**db,
        caller.tenant,
        &customer,
        required(s.plan.as_deref(), "plan")?,
        s.version,
    )
    .await?;
    let started = match &s.started_at {
        Some(t) => time("startedAt", t)?,
        None => Utc::now(),
    };
    let ended = s
        .ended_at
        .as_deref()
        .map(|t| time("endedAt", t))
        .transpose()?;
    if ended.is_some_and(|e| e <= started) {
        return Err(ApiError::invalid("endedAt", "must be after startedAt"));
    }
    if s.trial_days.is_some_and(|d| !(1..=365).contains(&d)) {
        return Err(ApiError::invalid("trialDays", "must be 1 to 365"));
    }
    let trial_ends = s
        .trial_days
        .map(|d| started + chrono::Duration::days(i64::from(d)));
    let status = if trial_ends.is_some() {
        billing_core::lifecycle::Status::Trialing
    } else {
        billing_core::lifecycle::Status::Active
    };
    let cid = Uuid::parse_str(customer["id"].as_str().unwrap_or_default())
        .map_err(|_| ApiError::not_found("customer"))?;
    // One subscription at a time per customer: the rater bills each subscription's span
    // [startedAt, endedAt), whatever its status, so overlapping spans would bill usage twice.
    // The customer row is locked so that two concurrent requests cannot both pass the check.
    let mut db = db;
    let tx = db.transaction().await?;
    tx.execute("SELECT 1 FROM customers WHERE id = $1 FOR UPDATE", &[&cid])
        .await?;
    let overlap = tx
        .query_opt(
            "SELECT id FROM subscriptions WHERE tenant_id = $1 AND customer_id = $2
                AND tstzrange(started_at, ended_at) && tstzrange($3, $4)",
            &[&caller.tenant, &cid, &started, &ended],
        )
        .await?;
    if overlap.is_some() {
        return Err(conflict(
            "customer",
            "the customer already has a subscription over that time".into(),
        ));
    }
    let row = tx
        .query_one(
            "INSERT INTO subscriptions (tenant_id, customer_id, plan_version_id, started_at, ended_at,
                                        status, trial_ends_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[&caller.tenant, &cid, &vid, &started, &ended, &status.as_str(), &trial_ends],
        )
        .await?;
    let id: Uuid = row.get(0);
    crate::subscriptions::record(&tx, caller.tenant, id, "created", None, status, json!({}))
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(find_subscription(&db, caller.tenant, id).await?),
    ))
}

/// The plan version a customer may subscribe to: `version` of `plan` (the latest when `None`),
/// priced in the customer's currency. Errors name the field.
pub(crate) async fn plan_version_for<C: tokio_postgres::GenericClient>(
    db: &C,
    tenant: Uuid,
    customer: &Value,
    plan: &str,
    version: Option<i32>,
) -> Result<(Uuid, Value), ApiError> {
    let plan = plan_view(db, tenant, plan)
        .await
        .map_err(|_| ApiError::invalid("plan", "no such plan"))?;
    let versions = plan["versions"].as_array().cloned().unwrap_or_default();
    let version = match version {
        Some(n) => versions
            .iter()
            .find(|v| v["version"] == n)
            .ok_or_else(|| ApiError::invalid("version", "the plan has no such version"))?,
        None => versions
            .last()
            .ok_or_else(|| ApiError::invalid("plan", "has no version"))?,
    };
    if version["currency"] != customer["currency"] {
        return Err(ApiError::invalid(
            "plan",
            format!(
                "is priced in {} but the customer is billed in {}",
                version["currency"], customer["currency"]
            ),
        ));
    }
    let vid = Uuid::parse_str(version["id"].as_str().unwrap_or_default())
        .map_err(|_| ApiError::not_found("plan version"))?;
    Ok((vid, version.clone()))
}

pub(crate) async fn find_subscription(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    id: Uuid,
) -> Result<Value, ApiError> {
    let r = db
        .query_opt(
            &format!("SELECT {SUB_COLUMNS} FROM {SUB_FROM} WHERE s.tenant_id = $1 AND s.id = $2"),
            &[&tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("subscription"))?;
    Ok(sub_view(&r))
}

/// `GET /api/v1/subscriptions?limit&cursor&customer&plan&status`: cursor-paginated, oldest first.
pub async fn list_subscriptions(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let (t, id) = page::time_id(q.get("cursor").map(String::as_str))?
        .map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {SUB_COLUMNS}, s.created_at, s.id FROM {SUB_FROM}
                  WHERE s.tenant_id = $1 AND ($2::timestamptz IS NULL OR (s.created_at, s.id) > ($2, $3))
                    AND ($4::text IS NULL OR c.key = $4) AND ($5::text IS NULL OR p.key = $5)
                    AND ($6::text IS NULL OR s.status = $6)
                  ORDER BY s.created_at, s.id LIMIT $7"
            ),
            &[
                &caller.tenant,
                &t,
                &id,
                &q.get("customer"),
                &q.get("plan"),
                &q.get("status"),
                &(limit + 1),
            ],
        )
        .await?;
    Ok(Json(page::page(rows, limit, sub_view, |r| {
        let n = r.len();
        page::time_id_cursor(r.get(n - 2), r.get(n - 1))
    })))
}

pub async fn get_subscription(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("subscription"))?;
    let db = st.pool.get().await?;
    Ok(Json(find_subscription(&db, caller.tenant, id).await?))
}

// ---------------------------------------------------------------- invoices (read)

#[derive(Debug, Deserialize)]
pub struct InvoiceFilter {
    pub period: Option<String>,
    pub customer: Option<String>,
    pub status: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

const INVOICE_COLUMNS: &str =
    "i.id, c.key, i.period, i.period_start, i.period_end, i.currency, i.status, i.number,
    i.subtotal, i.discount, i.tax, i.total, i.issued_at, i.subscription_id";

fn invoice_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "customer": r.get::<_, String>(1),
        "period": r.get::<_, String>(2),
        "periodStart": ts(r.get(3)),
        "periodEnd": ts(r.get(4)),
        "currency": r.get::<_, String>(5),
        "status": r.get::<_, String>(6),
        "number": r.get::<_, Option<i64>>(7),
        "subtotal": dec(r.get(8)),
        "discount": dec(r.get(9)),
        "tax": dec(r.get(10)),
        "total": dec(r.get(11)),
        "issuedAt": r.get::<_, Option<DateTime<Utc>>>(12).map(ts),
        "subscription": r.get::<_, Uuid>(13),
    })
}

/// `GET /api/v1/invoices?limit&cursor&period&customer&status`: cursor-paginated, oldest first.
pub async fn list_invoices(
    State(st): State<AppState>,
    caller: Caller,
    Query(f): Query<InvoiceFilter>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(f.limit.as_deref())?;
    let (t, id) =
        page::time_id(f.cursor.as_deref())?.map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {INVOICE_COLUMNS}, i.created_at, i.id
                   FROM invoices i JOIN customers c ON c.id = i.customer_id
                  WHERE i.tenant_id = $1 AND ($2::text IS NULL OR i.period = $2)
                    AND ($3::text IS NULL OR c.key = $3) AND ($4::text IS NULL OR i.status = $4)
                    AND ($5::timestamptz IS NULL OR (i.created_at, i.id) > ($5, $6))
                  ORDER BY i.created_at, i.id LIMIT $7"
            ),
            &[
                &caller.tenant,
                &f.period,
                &f.customer,
                &f.status,
                &t,
                &id,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(Json(page::page(rows, limit, invoice_view, |r| {
        let n = r.len();
        page::time_id_cursor(r.get(n - 2), r.get(n - 1))
    })))
}

pub(crate) async fn invoice_json(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    id: Uuid,
) -> Result<Value, ApiError> {
    let r = db
        .query_opt(
            &format!(
                "SELECT {INVOICE_COLUMNS} FROM invoices i JOIN customers c ON c.id = i.customer_id
                  WHERE i.tenant_id = $1 AND i.id = $2"
            ),
            &[&tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    let mut inv = invoice_view(&r);
    let lines = db
        .query(
            "SELECT l.position, l.kind, m.slug, l.description, l.period_start, l.period_end, l.quantity,
                    l.previous_quantity, l.unit_price, l.tiers, l.amount, l.discount, l.tax, l.total,
                    coalesce(l.price, pp.price)
               FROM invoice_lines l LEFT JOIN meters m ON m.id = l.meter_id
               JOIN invoices i ON i.id = l.invoice_id JOIN subscriptions s ON s.id = i.subscription_id
               LEFT JOIN plan_prices pp ON pp.plan_version_id = s.plan_version_id AND pp.meter_id = l.meter_id
              WHERE l.invoice_id = $1 AND l.tenant_id = $2 ORDER BY l.position",
            &[&id, &tenant],
        )
        .await?;
    inv["lines"] = lines
        .iter()
        .map(|l| {
            json!({
                "position": l.get::<_, i32>(0),
                "kind": l.get::<_, String>(1),
                "meter": l.get::<_, Option<String>>(2),
                "description": l.get::<_, String>(3),
                "periodStart": ts(l.get(4)),
                "periodEnd": ts(l.get(5)),
                "quantity": dec(l.get(6)),
                "previousQuantity": l.get::<_, Option<Decimal>>(7).map(dec),
                "unitPrice": l.get::<_, Option<Decimal>>(8).map(dec),
                "tiers": l.get::<_, Value>(9),
                "amount": dec(l.get(10)),
                "discount": dec(l.get(11)),
                "tax": dec(l.get(12)),
                "total": dec(l.get(13)),
                "price": l.get::<_, Option<Value>>(14),
            })
        })
        .collect();
    Ok(inv)
}

pub(crate) fn invoice_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("invoice"))
}

pub async fn get_invoice(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    Ok(Json(
        invoice_json(&db, caller.tenant, invoice_id(&id)?).await?,
    ))
}

#[derive(Debug, Deserialize)]
pub struct IssueParams {
    /// Issue before the invoice's period has ended.
    #[serde(default)]
    pub early: bool,
}

pub(crate) fn state_conflict(what: &str, state: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "invalid_state",
        format!("a {state} invoice cannot be {what}"),
    )
}

/// `POST /api/v1/invoices/{id}/issue[?early=true]`: freezes a draft and gives it the tenant's
/// next number (gapless). 409 when it is not a draft or its period has not ended.
pub async fn issue_invoice(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<IssueParams>,
) -> Result<Json<Value>, ApiError> {
    let id = invoice_id(&id)?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let end: DateTime<Utc> = tx
        .query_opt(
            "SELECT period_end FROM invoices WHERE id = $1 AND tenant_id = $2",
            &[&id, &caller.tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?
        .get(0);
    if !p.early && end > Utc::now() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "period_open",
            format!(
                "the invoice's period ends at {}; pass early=true to issue it now",
                ts(end)
            ),
        ));
    }
    match schemas::invoices::issue(&tx, caller.tenant, id).await? {
        schemas::invoices::Change::Done(_) => tx.commit().await?,
        schemas::invoices::Change::NotFound => return Err(ApiError::not_found("invoice")),
        schemas::invoices::Change::Refused(s) => return Err(state_conflict("issued", &s)),
    }
    Ok(Json(invoice_json(&db, caller.tenant, id).await?))
}

/// `POST /api/v1/invoices/{id}/void`: voids a draft or an issued invoice (an issued one keeps
/// its number). 409 for a paid or already void invoice.
pub async fn void_invoice(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if let Ok(inv) = invoice_id(&id) {
        let db = st.pool.get().await?;
        let held: Decimal = db
            .query_one(
                "SELECT coalesce(sum(p.amount - p.refunded), 0) FROM payments p
                   JOIN invoices i ON i.id = p.invoice_id AND i.status IN ('draft', 'issued')
                  WHERE p.invoice_id = $1 AND p.tenant_id = $2 AND p.status IN ('pending', 'succeeded')",
                &[&inv, &caller.tenant],
            )
            .await?
            .get(0);
        if held > Decimal::ZERO {
            return Err(ApiError::conflict(
                "invoice_has_payments",
                format!(
                    "the invoice holds {} of payments; refund them (or credit the invoice) instead of voiding it",
                    dec(held)
                ),
            ));
        }
    }
    change_invoice(st, caller, id, "voided", schemas::invoices::void).await
}

/// `POST /api/v1/invoices/{id}/mark-paid`: an issued invoice paid outside a payment provider
/// (e.g. a bank transfer): what is left to collect is recorded as a `manual` payment. 409 for
/// any other state, or while a provider payment is pending.
pub async fn mark_paid(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = invoice_id(&id)?;
    let mut db = st.pool.get().await?;
    if let Ok(mut before) = invoice_json(&db, caller.tenant, id).await {
        if let Some(o) = before.as_object_mut() {
            o.remove("lines");
        }
        crate::audit::set_before(before);
    }
    let tx = db.transaction().await?;
    crate::payments::record_manual(&tx, caller.tenant, id).await?;
    let sub: Uuid = tx
        .query_one("SELECT subscription_id FROM invoices WHERE id = $1", &[&id])
        .await?
        .get(0);
    // A past-due subscription is active again once its invoice is paid.
    crate::subscriptions::payment_quietly(&tx, caller.tenant, sub, true, id).await?;
    tx.commit().await?;
    Ok(Json(invoice_json(&db, caller.tenant, id).await?))
}

async fn change_invoice<F>(
    st: AppState,
    caller: Caller,
    id: String,
    what: &str,
    change: F,
) -> Result<Json<Value>, ApiError>
where
    F: for<'a> AsyncFn(
        &'a tokio_postgres::Transaction<'a>,
        Uuid,
        Uuid,
    ) -> Result<schemas::invoices::Change, tokio_postgres::Error>,
{
    let id = invoice_id(&id)?;
    let mut db = st.pool.get().await?;
    if let Ok(before) = invoice_json(&db, caller.tenant, id).await {
        let mut b = before;
        if let Some(o) = b.as_object_mut() {
            o.remove("lines");
        }
        crate::audit::set_before(b);
    }
    let tx = db.transaction().await?;
    match change(&tx, caller.tenant, id).await? {
        schemas::invoices::Change::Done(_) => tx.commit().await?,
        schemas::invoices::Change::NotFound => return Err(ApiError::not_found("invoice")),
        schemas::invoices::Change::Refused(s) => return Err(state_conflict(what, &s)),
    }
    Ok(Json(invoice_json(&db, caller.tenant, id).await?))
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn s(v: &Value) -> String {
    esc(v.as_str().unwrap_or_default())
}

/// `GET /api/v1/invoices/{id}/html`: the invoice as a self-contained HTML page (lines, tier
/// breakdowns, tax, totals) for download. Every stored text is escaped.
pub async fn invoice_html(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use std::fmt::Write;
    let db = st.pool.get().await?;
    let inv = invoice_json(&db, caller.tenant, invoice_id(&id)?).await?;
    let name: String = db
        .query_one(
            "SELECT c.name FROM invoices i JOIN customers c ON c.id = i.customer_id WHERE i.id = $1",
            &[&invoice_id(&id)?],
        )
        .await?
        .get(0);
    let number = inv["number"]
        .as_i64()
        .map_or_else(|| "draft".to_string(), |n| format!("No. {n}"));
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Invoice {number}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}td.n{{text-align:right}}\
         .tier td{{color:#666;font-size:90%}}</style></head><body>\
         <h1>Invoice {number} <small>({status})</small></h1>\
         <p>Customer: <b>{customer}</b> ({key})<br>Period {period}: {from} – {to}<br>Currency: {cur}</p>\
         <table><tr><th>#</th><th>Line</th><th>Period</th><th>Quantity</th><th>Unit price</th>\
         <th>Amount</th><th>Tax</th><th>Total</th></tr>",
        status = s(&inv["status"]),
        customer = esc(&name),
        key = s(&inv["customer"]),
        period = s(&inv["period"]),
        from = s(&inv["periodStart"]),
        to = s(&inv["periodEnd"]),
        cur = s(&inv["currency"]),
    );
    for l in inv["lines"].as_array().into_iter().flatten() {
        let qty = match l["previousQuantity"].as_str() {
            Some(p) => format!("{} (was {})", s(&l["quantity"]), esc(p)),
            None => s(&l["quantity"]),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{} – {}</td><td class=n>{qty}</td><td class=n>{}</td>\
             <td class=n>{}</td><td class=n>{}</td><td class=n>{}</td></tr>",
            l["position"],
            s(&l["description"]),
            s(&l["periodStart"]),
            s(&l["periodEnd"]),
            s(&l["unitPrice"]),
            s(&l["amount"]),
            s(&l["tax"]),
            s(&l["total"]),
        );
        for t in l["tiers"]["tiers"].as_array().into_iter().flatten() {
            let _ = write!(
                h,
                "<tr class=tier><td></td><td>tier {}</td><td></td><td class=n>{}</td><td class=n>{}</td>\
                 <td class=n>{}</td><td></td><td></td></tr>",
                t["tier"].as_u64().unwrap_or_default() + 1,
                s(&t["quantity"]),
                s(&t["unitPrice"]),
                s(&t["total"]),
            );
        }
    }
    let _ = write!(
        h,
        "</table><p>Subtotal {} · Discount {} · Tax {} · <b>Total {} {}</b></p></body></html>",
        s(&inv["subtotal"]),
        s(&inv["discount"]),
        s(&inv["tax"]),
        s(&inv["total"]),
        s(&inv["currency"]),
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        h,
    )
        .into_response())
}
