//! The subscription lifecycle over HTTP and in time, on billing-core's state machine
//! ([`billing_core::lifecycle`]): cancel now or at period end, resume, auto-renew on/off, plan
//! changes now (with proration) or at period end, payments failing and succeeding, and
//! [`advance`], which applies what time decides (trial ends, period ends, scheduled changes,
//! grace periods running out). Every transition is one transaction that also writes a domain
//! event (`subscription_events`); a refused one is a 409 `invalid_transition` naming the status
//! and the event.
//!
//! "The current period" is the customer's billing period (anchor day, time zone) containing the
//! moment of the request; billing_core::period computes it exactly as the rater does.

use crate::auth::Caller;
use crate::http::{body, optional_body, ApiError, AppState};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use billing_core::lifecycle::{next, Event, Status};
use billing_core::period;
use billing_core::proration::{change, Span};
use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_postgres::Transaction;
use uuid::Uuid;

/// A subscription row as the lifecycle needs it, locked.
#[derive(Debug)]
pub struct Sub {
    pub id: Uuid,
    pub tenant: Uuid,
    pub customer: Uuid,
    pub plan_version: Uuid,
    pub status: Status,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub auto_renew: bool,
    pub cancel_at_period_end: bool,
    pub trial_ends_at: Option<DateTime<Utc>>,
    pub scheduled: Option<(Uuid, DateTime<Utc>)>,
    pub anchor: u32,
    pub tz: chrono_tz::Tz,
    pub fee: Decimal,
    pub currency: String,
}

const SUB_SQL: &str = "SELECT s.id, s.tenant_id, s.customer_id, s.plan_version_id, s.status,
        s.started_at, s.ended_at, s.auto_renew, s.cancel_at_period_end, s.trial_ends_at,
        s.scheduled_plan_version_id, s.scheduled_change_at, c.billing_anchor_day, c.timezone,
        v.recurring_fee, v.currency
   FROM subscriptions s JOIN customers c ON c.id = s.customer_id
   JOIN plan_versions v ON v.id = s.plan_version_id";

fn sub_of(r: &tokio_postgres::Row) -> Result<Sub, ApiError> {
    let status: String = r.get(4);
    let tz: String = r.get(13);
    let sched: (Option<Uuid>, Option<DateTime<Utc>>) = (r.get(10), r.get(11));
    Ok(Sub {
        id: r.get(0),
        tenant: r.get(1),
        customer: r.get(2),
        plan_version: r.get(3),
        status: Status::parse(&status).ok_or_else(|| ApiError::internal("unknown status"))?,
        started_at: r.get(5),
        ended_at: r.get(6),
        auto_renew: r.get(7),
        cancel_at_period_end: r.get(8),
        trial_ends_at: r.get(9),
        scheduled: match sched {
            (Some(v), Some(t)) => Some((v, t)),
            _ => None,
        },
        anchor: r.get::<_, i32>(12).clamp(1, 31) as u32,
        tz: tz
            .parse()
            .map_err(|_| ApiError::internal("bad time zone"))?,
        fee: r.get(14),
        currency: r.get(15),
    })
}

async fn lock(tx: &Transaction<'_>, tenant: Uuid, id: &str) -> Result<Sub, ApiError> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::not_found("subscription"))?;
    let r = tx
        .query_opt(
            &format!("{SUB_SQL} WHERE s.tenant_id = $1 AND s.id = $2 FOR UPDATE OF s"),
            &[&tenant, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("subscription"))?;
    sub_of(&r)
}

impl Sub {
    /// The billing period containing `t` (or the first one, before the start).
    pub fn period_at(&self, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        period::containing(t.max(self.started_at), self.anchor, self.tz)
    }
}

fn refused(e: billing_core::lifecycle::Refused) -> ApiError {
    ApiError::conflict("invalid_transition", e.to_string())
}

/// Applies `event` to `sub` (status and domain event), or refuses it.
async fn transition(
    tx: &Transaction<'_>,
    sub: &Sub,
    event: Event,
    data: Value,
) -> Result<Status, ApiError> {
    let to = next(sub.status, event).map_err(refused)?;
    tx.execute(
        "UPDATE subscriptions SET status = $2 WHERE id = $1",
        &[&sub.id, &to.as_str()],
    )
    .await?;
    record(
        tx,
        sub.tenant,
        sub.id,
        event.name(),
        Some(sub.status),
        to,
        data,
    )
    .await?;
    Ok(to)
}

/// Writes a domain event.
pub async fn record(
    tx: &Transaction<'_>,
    tenant: Uuid,
    sub: Uuid,
    event: &str,
    from: Option<Status>,
    to: Status,
    data: Value,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO subscription_events (tenant_id, subscription_id, event, from_status, to_status, data)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&tenant, &sub, &event, &from.map(Status::as_str), &to.as_str(), &data],
    )
    .await?;
    Ok(())
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

async fn answer(
    st: &AppState,
    tenant: Uuid,
    id: Uuid,
    extra: Option<Value>,
) -> Result<Json<Value>, ApiError> {
    let db = st.pool.get().await?;
    let mut v = crate::catalog::find_subscription(&db, tenant, id).await?;
    if let (Some(o), Some(Value::Object(e))) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    Ok(Json(v))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct When {
    /// `now` (default) or `period_end`.
    pub at: Option<String>,
}

fn at_period_end(at: Option<&str>) -> Result<bool, ApiError> {
    match at.unwrap_or("now") {
        "now" => Ok(false),
        "period_end" => Ok(true),
        _ => Err(ApiError::invalid("at", "must be `now` or `period_end`")),
    }
}

/// `POST /api/v1/subscriptions/{id}/cancel` `{"at": "now" | "period_end"}`.
pub async fn cancel(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let end_of_period = at_period_end(optional_body::<When>(&raw)?.at.as_deref())?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let sub = lock(&tx, caller.tenant, &id).await?;
    let now = Utc::now();
    if end_of_period {
        let (_, pe) = sub.period_at(now);
        transition(&tx, &sub, Event::ScheduleCancel, json!({"at": ts(pe)})).await?;
        tx.execute(
            "UPDATE subscriptions SET cancel_at_period_end = true,
                    ended_at = LEAST(COALESCE(ended_at, 'infinity'), $2) WHERE id = $1",
            &[&sub.id, &pe],
        )
        .await?;
    } else {
        transition(&tx, &sub, Event::CancelNow, json!({})).await?;
        end_now(&tx, &sub, now).await?;
    }
    tx.commit().await?;
    answer(&st, caller.tenant, sub.id, None).await
}

/// Ends a subscription's billing now (or, before it started, makes its span empty).
async fn end_now(
    tx: &Transaction<'_>,
    sub: &Sub,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE subscriptions SET canceled_at = $2, scheduled_plan_version_id = NULL,
                scheduled_change_at = NULL, past_due_since = NULL,
                ended_at = LEAST(COALESCE(ended_at, 'infinity'),
                                 GREATEST($2, started_at + interval '1 microsecond'))
          WHERE id = $1",
        &[&sub.id, &now],
    )
    .await?;
    Ok(())
}

/// `POST /api/v1/subscriptions/{id}/resume`: undoes a scheduled cancel or plan change.
pub async fn resume(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let sub = lock(&tx, caller.tenant, &id).await?;
    if !sub.cancel_at_period_end && sub.scheduled.is_none() {
        // Check the machine first so a final status gets its own message.
        next(sub.status, Event::Resume).map_err(refused)?;
        return Err(ApiError::conflict(
            "nothing_scheduled",
            "no cancel or plan change is scheduled",
        ));
    }
    transition(&tx, &sub, Event::Resume, json!({})).await?;
    let (_, pe) = sub.period_at(Utc::now());
    tx.execute(
        "UPDATE subscriptions SET cancel_at_period_end = false, scheduled_plan_version_id = NULL,
                scheduled_change_at = NULL,
                ended_at = CASE WHEN auto_renew THEN NULL ELSE $2::timestamptz END
          WHERE id = $1",
        &[&sub.id, &pe],
    )
    .await?;
    tx.commit().await?;
    answer(&st, caller.tenant, sub.id, None).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoRenew {
    pub auto_renew: bool,
}

/// `POST /api/v1/subscriptions/{id}/auto-renew` `{"autoRenew": bool}`: off, the subscription
/// expires at the end of the current period; on again, it renews.
pub async fn auto_renew(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    b: Result<Json<AutoRenew>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let on = body(b)?.auto_renew;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let sub = lock(&tx, caller.tenant, &id).await?;
    transition(&tx, &sub, Event::SetAutoRenew, json!({ "autoRenew": on })).await?;
    let (_, pe) = sub.period_at(Utc::now());
    tx.execute(
        "UPDATE subscriptions SET auto_renew = $2,
                ended_at = CASE WHEN cancel_at_period_end THEN ended_at
                                WHEN $2 THEN NULL ELSE $3::timestamptz END
          WHERE id = $1",
        &[&sub.id, &on, &pe],
    )
    .await?;
    tx.commit().await?;
    answer(&st, caller.tenant, sub.id, None).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlanChange {
    /// Plan id or key.
    pub plan: String,
    /// Plan version; the latest when absent.
    pub version: Option<i32>,
    /// `now` (default), `period_end`, or an RFC 3339 time not in the past.
    pub at: Option<String>,
}

/// `POST /api/v1/subscriptions/{id}/change-plan`: upgrade or downgrade. Now (or at a given
/// time): this subscription ends `canceled` and a new one on the new plan version starts at the
/// same instant; the answer holds the proration of the recurring fees for the rest of the period
/// (credit of the old fee's unused part, charge of the new fee's), which is what the rater bills
/// (each subscription's fee prorated by the second over its span). At period end: scheduled, and
/// applied by [`advance`] when the period ends.
pub async fn change_plan(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    b: Result<Json<PlanChange>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body(b)?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let sub = lock(&tx, caller.tenant, &id).await?;
    // Now or later, a plan change needs a trialing or active subscription.
    next(sub.status, Event::ScheduleChange).map_err(refused)?;
    let customer =
        crate::catalog::find_customer(&*tx, caller.tenant, &sub.customer.to_string()).await?;
    let (vid, version) =
        crate::catalog::plan_version_for(&*tx, caller.tenant, &customer, &req.plan, req.version)
            .await?;
    if vid == sub.plan_version {
        return Err(ApiError::conflict(
            "same_plan",
            "the subscription is already on this plan version",
        ));
    }
    let now = Utc::now();
    let at = match req.at.as_deref() {
        None | Some("now") => None,
        Some("period_end") => {
            let (_, pe) = sub.period_at(now);
            transition(
                &tx,
                &sub,
                Event::ScheduleChange,
                json!({"planVersion": vid, "at": ts(pe)}),
            )
            .await?;
            tx.execute(
                "UPDATE subscriptions SET scheduled_plan_version_id = $2, scheduled_change_at = $3
                  WHERE id = $1",
                &[&sub.id, &vid, &pe],
            )
            .await?;
            tx.commit().await?;
            let out = answer(&st, caller.tenant, sub.id, None).await?;
            return Ok((StatusCode::OK, out));
        }
        Some(t) => {
            let t = DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::invalid("at", "must be `now`, `period_end` or an RFC 3339 time")
                })?;
            if t < now - chrono::Duration::seconds(5) {
                return Err(ApiError::invalid("at", "must not be in the past"));
            }
            Some(t)
        }
    };
    let t = at.unwrap_or(now).max(sub.started_at);
    if sub.ended_at.is_some_and(|e| t >= e) {
        return Err(ApiError::invalid(
            "at",
            "the subscription has ended by then",
        ));
    }
    let fee_new: Decimal = version["recurringFee"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let (new_id, proration) = switch(&tx, &sub, vid, fee_new, t).await?;
    tx.commit().await?;
    let out = answer(
        &st,
        caller.tenant,
        new_id,
        Some(json!({ "replaces": sub.id, "proration": proration })),
    )
    .await?;
    Ok((StatusCode::CREATED, out))
}

/// Ends `sub` at `t` (canceled, replaced) and starts its successor on `vid` at `t`; returns the
/// successor's id and the proration of the fees over the rest of the period.
async fn switch(
    tx: &Transaction<'_>,
    sub: &Sub,
    vid: Uuid,
    fee_new: Decimal,
    t: DateTime<Utc>,
) -> Result<(Uuid, Value), ApiError> {
    let to = next(sub.status, Event::ChangePlanNow).map_err(refused)?;
    let (ps, pe) = sub.period_at(t);
    let (credit, charge) = change(
        sub.fee,
        fee_new,
        Span::Seconds(ps, pe),
        Span::Seconds(t, pe),
    )
    .map_err(ApiError::internal)?;
    let new_id: Uuid = tx
        .query_one(
            "INSERT INTO subscriptions (tenant_id, customer_id, plan_version_id, status, started_at,
                                        ended_at, auto_renew, cancel_at_period_end, trial_ends_at)
             SELECT tenant_id, customer_id, $2, status, $3, ended_at, auto_renew,
                    cancel_at_period_end, trial_ends_at
               FROM subscriptions WHERE id = $1
             RETURNING id",
            &[&sub.id, &vid, &t],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE subscriptions SET status = $2, ended_at = $3, canceled_at = now(),
                replaced_by = $4, scheduled_plan_version_id = NULL, scheduled_change_at = NULL
          WHERE id = $1",
        &[&sub.id, &to.as_str(), &t, &new_id],
    )
    .await?;
    let round = |d: Decimal| d.round_dp(2).normalize().to_string();
    let proration = json!({
        "currency": sub.currency,
        "periodStart": ts(ps),
        "periodEnd": ts(pe),
        "effectiveAt": ts(t),
        "credit": round(credit),
        "charge": round(charge),
        "net": round(credit + charge),
    });
    record(
        tx,
        sub.tenant,
        sub.id,
        Event::ChangePlanNow.name(),
        Some(sub.status),
        to,
        json!({"replacedBy": new_id, "proration": proration}),
    )
    .await?;
    record(
        tx,
        sub.tenant,
        new_id,
        "created",
        None,
        sub.status,
        json!({"replaces": sub.id}),
    )
    .await?;
    Ok((new_id, proration))
}

/// A payment for an invoice of `sub` failed (→ past_due) or succeeded (→ active).
pub async fn payment(
    tx: &Transaction<'_>,
    tenant: Uuid,
    sub: Uuid,
    ok: bool,
    invoice: Uuid,
) -> Result<Option<Status>, ApiError> {
    let sub = lock(tx, tenant, &sub.to_string()).await?;
    let event = if ok {
        Event::PaymentSucceeded
    } else {
        Event::PaymentFailed
    };
    if ok && sub.status != Status::PastDue {
        return Ok(None);
    }
    let to = transition(tx, &sub, event, json!({ "invoice": invoice })).await?;
    tx.execute(
        "UPDATE subscriptions SET past_due_since = CASE WHEN $2 THEN NULL
                ELSE COALESCE(past_due_since, now()) END WHERE id = $1",
        &[&sub.id, &ok],
    )
    .await?;
    Ok(Some(to))
}

/// [`payment`], except that a subscription the event does not apply to (canceled, expired,
/// trialing) is left as it is: a payment is recorded whatever its subscription became.
pub async fn payment_quietly(
    tx: &Transaction<'_>,
    tenant: Uuid,
    sub: Uuid,
    ok: bool,
    invoice: Uuid,
) -> Result<Option<Status>, ApiError> {
    let status: String = tx
        .query_one("SELECT status FROM subscriptions WHERE id = $1", &[&sub])
        .await?
        .get(0);
    let event = if ok {
        Event::PaymentSucceeded
    } else {
        Event::PaymentFailed
    };
    match Status::parse(&status) {
        Some(s) if next(s, event).is_ok() => payment(tx, tenant, sub, ok, invoice).await,
        _ => Ok(None),
    }
}

/// What [`advance`] did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Advanced {
    pub trials_ended: u32,
    pub plan_changes: u32,
    pub canceled: u32,
    pub expired: u32,
    pub grace_expired: u32,
}

/// Applies what time decides, up to `now`: trials that ended, scheduled plan changes, periods
/// that ended with a cancel scheduled or auto-renew off, past-due grace periods that ran out.
/// Safe to run any number of times and from several processes (rows are locked; each change is
/// made once).
pub async fn advance(
    db: &mut tokio_postgres::Client,
    now: DateTime<Utc>,
    grace: Duration,
) -> Result<Advanced, ApiError> {
    let mut out = Advanced::default();
    let due = db
        .query(
            "SELECT id, tenant_id FROM subscriptions
              WHERE status IN ('trialing', 'active', 'past_due')
                AND ((status = 'trialing' AND trial_ends_at <= $1)
                  OR scheduled_change_at <= $1
                  OR (status <> 'past_due' AND ended_at <= $1)
                  OR (status = 'past_due' AND past_due_since + make_interval(secs => $2) <= $1))
              ORDER BY started_at",
            &[&now, &grace.as_secs_f64()],
        )
        .await?;
    for row in due {
        let (id, tenant): (Uuid, Uuid) = (row.get(0), row.get(1));
        let tx = db.transaction().await?;
        let mut sub = lock(&tx, tenant, &id.to_string()).await?;
        if sub.status == Status::Trialing && sub.trial_ends_at.is_some_and(|t| t <= now) {
            sub.status = transition(&tx, &sub, Event::TrialEnded, json!({})).await?;
            out.trials_ended += 1;
        }
        if let Some((vid, at)) = sub.scheduled.filter(|(_, at)| *at <= now) {
            if !sub.status.is_final() && sub.status != Status::PastDue {
                let fee: Decimal = tx
                    .query_one(
                        "SELECT recurring_fee FROM plan_versions WHERE id = $1",
                        &[&vid],
                    )
                    .await?
                    .get(0);
                switch(&tx, &sub, vid, fee, at).await?;
                out.plan_changes += 1;
                tx.commit().await?;
                continue;
            }
        }
        if sub.status != Status::PastDue && sub.ended_at.is_some_and(|e| e <= now) {
            let event = Event::PeriodEnded {
                cancel_at_period_end: sub.cancel_at_period_end,
                auto_renew: false,
            };
            let to = transition(&tx, &sub, event, json!({})).await?;
            if to == Status::Canceled {
                out.canceled += 1;
                tx.execute(
                    "UPDATE subscriptions SET canceled_at = ended_at WHERE id = $1",
                    &[&sub.id],
                )
                .await?;
            } else {
                out.expired += 1;
            }
        } else if sub.status == Status::PastDue {
            let since: Option<DateTime<Utc>> = tx
                .query_one(
                    "SELECT past_due_since FROM subscriptions WHERE id = $1",
                    &[&sub.id],
                )
                .await?
                .get(0);
            let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
            if since.is_some_and(|s| s + grace <= now) {
                transition(&tx, &sub, Event::GraceExpired, json!({})).await?;
                end_now(&tx, &sub, now).await?;
                out.grace_expired += 1;
            }
        }
        tx.commit().await?;
    }
    Ok(out)
}

/// `GET /api/v1/subscriptions/{id}/events`: the domain events of a subscription, oldest first.
pub async fn events(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::not_found("subscription"))?;
    let db = st.pool.get().await?;
    crate::catalog::find_subscription(&db, caller.tenant, id).await?;
    let rows = db
        .query(
            "SELECT id, at, event, from_status, to_status, data FROM subscription_events
              WHERE tenant_id = $1 AND subscription_id = $2 ORDER BY id",
            &[&caller.tenant, &id],
        )
        .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.get::<_, i64>(0),
                "at": ts(r.get(1)),
                "event": r.get::<_, String>(2),
                "from": r.get::<_, Option<String>>(3),
                "to": r.get::<_, String>(4),
                "data": r.get::<_, Value>(5),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// `POST /api/v1/invoices/{id}/payment-failed`: a collection attempt failed; the invoice's
/// subscription goes past due (its grace period starts).
pub async fn invoice_payment_failed(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let inv: Uuid = id.parse().map_err(|_| ApiError::not_found("invoice"))?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT subscription_id, status FROM invoices WHERE tenant_id = $1 AND id = $2",
            &[&caller.tenant, &inv],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    let status: String = row.get(1);
    if status != "issued" {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("a {status} invoice is not being collected"),
        ));
    }
    let b = crate::credit_notes::balance(&*tx, inv).await?;
    let currency: String = tx
        .query_one("SELECT currency FROM invoices WHERE id = $1", &[&inv])
        .await?
        .get(0);
    crate::payments::record_manual_failure(&tx, caller.tenant, inv, b.due(), &currency).await?;
    let to = payment(&tx, caller.tenant, row.get(0), false, inv).await?;
    tx.commit().await?;
    Ok(Json(json!({
        "invoice": inv,
        "subscription": row.get::<_, Uuid>(0),
        "subscriptionStatus": to.map(Status::as_str),
    })))
}
