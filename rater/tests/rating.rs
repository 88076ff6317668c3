//! The rating job against the real PostgreSQL: usage rows as the aggregator stores them (minute,
//! hour and day rollups written together), plans, customers and subscriptions; invoices checked
//! against hand-computed amounts and against quantities computed here from the events.

use chrono::{DateTime, Duration, TimeZone, Timelike, Utc};
use rand::{Rng, SeedableRng};
use rater::analysis::{costs, plan_override, simulate, spend};
use rater::period::{bounds, YearMonth};
use rater::run::{issue, reconcile, run, Options};
use rust_decimal::Decimal;
use schemas::testing::fresh_database;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use tokio_postgres::Client;
use uuid::Uuid;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn ym(s: &str) -> YearMonth {
    s.parse().expect("period")
}

/// One event as the aggregator would have accounted it.
#[derive(Debug, Clone)]
struct Ev {
    meter: &'static str,
    subject: String,
    time: DateTime<Utc>,
    /// The value (SUM), or the distinct value (UNIQUE_COUNT); COUNT ignores it.
    value: String,
    /// The `project` group-by value, if any.
    project: Option<&'static str>,
}

struct Fixture {
    db: Client,
    /// Extra reading connections for rating runs (each feeds its own partition of the query).
    extra: Vec<Client>,
    tenant: Uuid,
    meters: BTreeMap<&'static str, Uuid>,
}

fn trunc(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    let s = t.timestamp();
    Utc.timestamp_opt(s - s.rem_euclid(secs), 0)
        .single()
        .expect("time")
}

impl Fixture {
    async fn new() -> Fixture {
        let (url, db) = fresh_database().await;
        let extra = vec![rater::connect(&url).await.expect("second connection")];
        let tenant: Uuid = db
            .query_one(
                "INSERT INTO tenants (name) VALUES ('rating') RETURNING id",
                &[],
            )
            .await
            .expect("tenant")
            .get(0);
        let mut meters = BTreeMap::new();
        for (slug, agg, prop) in [
            ("tokens", "SUM", Some("$.tokens")),
            ("requests", "COUNT", None),
            ("users", "UNIQUE_COUNT", Some("$.user")),
        ] {
            let id: Uuid = db
                .query_one(
                    "INSERT INTO meters (tenant_id, slug, event_type, aggregation, value_property)
                     VALUES ($1, $2, $2, $3, $4) RETURNING id",
                    &[&tenant, &slug, &agg, &prop],
                )
                .await
                .expect("meter")
                .get(0);
            meters.insert(slug, id);
        }
        Fixture {
            db,
            extra,
            tenant,
            meters,
        }
    }

    /// Writes the events' usage at every grain, as the aggregator's flush does.
    async fn add(&self, evs: &[Ev]) {
        for e in evs {
            let m = self.meters[e.meter];
            let gv = match e.project {
                Some(p) => serde_json::json!({ "project": p }),
                None => serde_json::json!({}),
            };
            for (g, secs) in [("minute", 60), ("hour", 3600), ("day", 86_400)] {
                let w = trunc(e.time, secs);
                if e.meter == "users" {
                    self.db
                        .execute(
                            &format!(
                                "INSERT INTO usage_unique_{g} (tenant_id, meter_id, window_start, subject, value, group_values)
                                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
                            ),
                            &[&self.tenant, &m, &w, &e.subject, &e.value, &gv],
                        )
                        .await
                        .expect("unique row");
                    continue;
                }
                let v = if e.meter == "tokens" {
                    d(&e.value)
                } else {
                    Decimal::ZERO
                };
                self.db
                    .execute(
                        &format!(
                            "INSERT INTO usage_{g} AS u (tenant_id, meter_id, window_start, subject, sum_value,
                                    event_count, min_value, max_value, latest_value, latest_time, group_values)
                             VALUES ($1, $2, $3, $4, $5, 1, $5, $5, $5, $6, $7)
                             ON CONFLICT (tenant_id, meter_id, window_start, subject, group_values) DO UPDATE SET
                               sum_value = u.sum_value + excluded.sum_value,
                               event_count = u.event_count + 1,
                               min_value = least(u.min_value, excluded.min_value),
                               max_value = greatest(u.max_value, excluded.max_value),
                               latest_value = CASE WHEN excluded.latest_time >= u.latest_time
                                              THEN excluded.latest_value ELSE u.latest_value END,
                               latest_time = greatest(u.latest_time, excluded.latest_time)"
                        ),
                        &[&self.tenant, &m, &w, &e.subject, &v, &e.time, &gv],
                    )
                    .await
                    .expect("usage row");
            }
        }
    }

    /// The plan and acme: Europe/Berlin, taxed in DE, subscribed from 16 March local midnight.
    async fn with_acme() -> (Fixture, Uuid) {
        let f = Fixture::new().await;
        let v = f.plan().await;
        f.customer(
            "acme",
            ("Europe/Berlin", 1),
            Some("DE"),
            &["acme-1", "acme-2"],
            v,
            t("2026-03-15T23:00:00Z"),
        )
        .await;
        (f, v)
    }

    async fn plan(&self) -> Uuid {
        let plan: Uuid = self
            .db
            .query_one(
                "INSERT INTO plans (tenant_id, key, name, tier) VALUES ($1, 'pro', 'Pro', 'pro') RETURNING id",
                &[&self.tenant],
            )
            .await
            .expect("plan")
            .get(0);
        let version: Uuid = self
            .db
            .query_one(
                "INSERT INTO plan_versions (tenant_id, plan_id, version, currency, recurring_fee)
                 VALUES ($1, $2, 1, 'USD', 30) RETURNING id",
                &[&self.tenant, &plan],
            )
            .await
            .expect("version")
            .get(0);
        let prices = [
            (
                "tokens",
                serde_json::json!({"type": "tiered", "mode": "graduated", "tiers": [
                    {"upToAmount": "1000", "unitPrice": {"type": "unit", "amount": "0.01"}},
                    {"unitPrice": {"type": "unit", "amount": "0.005"}}]}),
            ),
            (
                "requests",
                serde_json::json!({"type": "tiered", "mode": "volume", "tiers": [
                    {"upToAmount": "10", "unitPrice": {"type": "unit", "amount": "1"}},
                    {"upToAmount": "100", "unitPrice": {"type": "unit", "amount": "0.5"}},
                    {"unitPrice": {"type": "unit", "amount": "0.25"}}]}),
            ),
            ("users", serde_json::json!({"type": "unit", "amount": "2"})),
        ];
        for (m, p) in prices {
            self.db
                .execute(
                    "INSERT INTO plan_prices (tenant_id, plan_version_id, meter_id, price) VALUES ($1, $2, $3, $4)",
                    &[&self.tenant, &version, &self.meters[m], &p],
                )
                .await
                .expect("price");
        }
        self.db
            .execute(
                "INSERT INTO tax_rates (tenant_id, region, rate, inclusive) VALUES ($1, 'DE', 19, false)",
                &[&self.tenant],
            )
            .await
            .expect("tax");
        version
    }

    async fn customer(
        &self,
        key: &str,
        (tz, anchor): (&str, i32),
        tax: Option<&str>,
        subjects: &[&str],
        version: Uuid,
        started: DateTime<Utc>,
    ) -> Uuid {
        let c: Uuid = self
            .db
            .query_one(
                "INSERT INTO customers (tenant_id, key, name, currency, timezone, billing_anchor_day, tax_region)
                 VALUES ($1, $2, $2, 'USD', $3, $4, $5) RETURNING id",
                &[&self.tenant, &key, &tz, &anchor, &tax],
            )
            .await
            .expect("customer")
            .get(0);
        for s in subjects {
            self.db
                .execute(
                    "INSERT INTO customer_subjects (tenant_id, subject, customer_id) VALUES ($1, $2, $3)",
                    &[&self.tenant, s, &c],
                )
                .await
                .expect("subject");
        }
        self.db
            .query_one(
                "INSERT INTO subscriptions (tenant_id, customer_id, plan_version_id, started_at)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                &[&self.tenant, &c, &version, &started],
            )
            .await
            .expect("subscription")
            .get(0)
    }

    async fn run(&mut self, period: &str) -> rater::run::Summary {
        self.run_with(period, 0).await
    }

    /// A run reading usage over `extra` more connections.
    async fn run_with(&mut self, period: &str, extra: usize) -> rater::run::Summary {
        run(
            &mut self.db,
            &self.extra[..extra],
            &Options {
                period: ym(period),
                tenant: Some(self.tenant),
                customer: None,
                dry_run: false,
            },
            true,
        )
        .await
        .expect("rating run")
    }

    /// (kind, description, quantity, previous, amount, tax, total) per line of an invoice.
    async fn lines(
        &self,
        customer: &str,
        period: &str,
    ) -> Vec<(String, Decimal, Option<Decimal>, Decimal, Decimal)> {
        self.db
            .query(
                "SELECT l.kind, l.quantity, l.previous_quantity, l.amount, l.tax
                   FROM invoice_lines l JOIN invoices i ON i.id = l.invoice_id
                   JOIN customers c ON c.id = i.customer_id
                  WHERE c.key = $1 AND i.period = $2 ORDER BY l.position",
                &[&customer, &period],
            )
            .await
            .expect("lines")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect()
    }

    async fn invoice(
        &self,
        customer: &str,
        period: &str,
    ) -> (String, Option<i64>, Decimal, Decimal, Decimal) {
        let r = self
            .db
            .query_one(
                "SELECT i.status, i.number, i.subtotal, i.tax, i.total FROM invoices i
                   JOIN customers c ON c.id = i.customer_id WHERE c.key = $1 AND i.period = $2",
                &[&customer, &period],
            )
            .await
            .expect("invoice");
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    }
}

/// Every invoice's id, update time and total, and the number of lines.
async fn stamp(db: &Client) -> (String, i64) {
    let r = db
        .query_one(
            "SELECT string_agg(id::text || updated_at::text || total::text, ',' ORDER BY id),
                    (SELECT count(*) FROM invoice_lines) FROM invoices",
            &[],
        )
        .await
        .expect("stamp");
    (r.get(0), r.get(1))
}

fn ev(meter: &'static str, subject: &str, time: &str, value: &str) -> Ev {
    Ev {
        meter,
        subject: subject.into(),
        time: t(time),
        value: value.into(),
        project: None,
    }
}

/// acme: Europe/Berlin, taxed in DE, subscribed from 16 March local midnight.
fn acme_events() -> Vec<Ev> {
    let mut v = vec![
        ev("tokens", "acme-1", "2026-03-15T22:59:59Z", "900"), // before the subscription
        ev("tokens", "acme-1", "2026-03-15T23:00:00Z", "500"),
        ev("tokens", "acme-2", "2026-03-20T12:34:56Z", "700"),
        ev("tokens", "acme-1", "2026-03-31T21:59:30Z", "300"), // last minute of March in Berlin
        ev("tokens", "acme-1", "2026-03-31T22:00:00Z", "800"), // April in Berlin
        ev("users", "acme-1", "2026-03-16T08:00:00Z", "u1"),
        ev("users", "acme-2", "2026-03-17T08:00:00Z", "u2"),
        ev("users", "acme-1", "2026-03-30T08:00:00Z", "u1"),
        ev("users", "acme-1", "2026-03-31T21:00:00Z", "u3"),
        ev("users", "acme-1", "2026-04-01T08:00:00Z", "u4"), // April
    ];
    for i in 0..12 {
        v.push(Ev {
            meter: "requests",
            subject: "acme-2".into(),
            time: t("2026-03-18T00:00:00Z") + Duration::hours(i * 7),
            value: String::new(),
            project: None,
        });
    }
    v.push(ev("requests", "acme-2", "2026-03-10T00:00:00Z", "")); // before the subscription
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_is_rated_into_draft_invoices_with_hand_checked_amounts() {
    let (mut f, _) = Fixture::with_acme().await;
    f.add(&acme_events()).await;
    let s = f.run("2026-03").await;
    assert_eq!((s.invoices.len(), s.invoices_written), (1, 1));

    // Recurring 30 × 383 h / 743 h (March in Berlin is an hour short) = 15.4643… → 15.46.
    // tokens 1500: 1000 × 0.01 + 500 × 0.005 = 12.50 (graduated).
    // requests 12: all at the second tier's 0.5 = 6.00 (volume).
    // users {u1, u2, u3} × 2 = 6.00. Tax 19 % per line, half away from zero.
    let lines = f.lines("acme", "2026-03").await;
    let expect = [
        ("recurring", "1", "15.46", "2.94"),
        ("usage", "12", "6", "1.14"),
        ("usage", "1500", "12.5", "2.38"),
        ("usage", "3", "6", "1.14"),
    ];
    assert_eq!(lines.len(), expect.len(), "{lines:?}");
    for (l, e) in lines.iter().zip(expect) {
        assert_eq!(
            (l.0.as_str(), l.1, l.3, l.4),
            (e.0, d(e.1), d(e.2), d(e.3)),
            "{l:?}"
        );
    }
    let (status, number, subtotal, tax, total) = f.invoice("acme", "2026-03").await;
    assert_eq!(status, "draft");
    assert_eq!(number, None);
    assert_eq!((subtotal, tax, total), (d("39.96"), d("7.60"), d("47.56")));
    // The graduated line's tier breakdown is stored whole (json) and reads back.
    let tiers: serde_json::Value =
        f.db.query_one(
            "SELECT l.tiers FROM invoice_lines l WHERE l.kind = 'usage' AND l.quantity = 1500",
            &[],
        )
        .await
        .expect("tiers")
        .get(0);
    assert_eq!(tiers["tiers"].as_array().map(Vec::len), Some(2), "{tiers}");
    // An invoiced subscription cannot be deleted (invoices keep naming it).
    let refused =
        f.db.execute("DELETE FROM subscriptions", &[])
            .await
            .expect_err("an invoiced subscription is kept");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{refused}"
    );

    // A dry run writes nothing and rates the same.
    let before: i64 =
        f.db.query_one("SELECT count(*) FROM invoice_lines", &[])
            .await
            .expect("count")
            .get(0);
    let dry = run(
        &mut f.db,
        &[],
        &Options {
            period: ym("2026-04"),
            tenant: None,
            customer: Some("acme".into()),
            dry_run: true,
        },
        true,
    )
    .await
    .expect("dry run");
    assert_eq!(dry.invoices.len(), 1);
    assert_eq!(dry.invoices_written, 0);
    let after: i64 =
        f.db.query_one("SELECT count(*) FROM invoice_lines", &[])
            .await
            .expect("count")
            .get(0);
    assert_eq!(before, after);
    // April's usage so far: the 800 tokens of the first Berlin minute of April, user u4.
    let april = &dry.invoices[0];
    let q: Vec<String> = april.lines.iter().map(|l| l.quantity.to_string()).collect();
    assert_eq!(q, ["1", "0", "800", "1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_trial_waives_the_recurring_fee_until_it_ends() {
    let (mut f, _) = Fixture::with_acme().await;
    // Trial until 11 April, Berlin midnight (22:00 UTC on the 10th).
    f.db.execute(
        "UPDATE subscriptions SET status = 'trialing', trial_ends_at = '2026-04-10T22:00:00Z'",
        &[],
    )
    .await
    .expect("trial");
    f.add(&acme_events()).await;
    f.run("2026-03").await;
    let march = f.lines("acme", "2026-03").await;
    assert!(march.iter().all(|l| l.0 != "recurring"), "{march:?}");
    assert_eq!(march.len(), 3, "usage is rated as usual: {march:?}");
    // April in Berlin is 720 h; the fee runs for the last 480: 30 × 480 / 720 = 20.00.
    f.run("2026-04").await;
    let april = f.lines("acme", "2026-04").await;
    let fee: Vec<_> = april.iter().filter(|l| l.0 == "recurring").collect();
    assert_eq!(fee.len(), 1, "{april:?}");
    assert_eq!(fee[0].3, d("20"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerunning_changes_nothing_and_late_usage_becomes_a_correction_on_the_next_invoice() {
    let (mut f, v) = Fixture::with_acme().await;
    f.customer(
        "beta",
        ("UTC", 1),
        None,
        &["beta-1"],
        v,
        t("2026-01-01T00:00:00Z"),
    )
    .await;
    f.add(&acme_events()).await;
    f.add(&[ev("tokens", "beta-1", "2026-03-03T03:03:03Z", "2000")])
        .await;
    let first = f.run("2026-03").await;
    assert_eq!(first.invoices_written, 2);
    let before = stamp(&f.db).await;
    let again = f.run("2026-03").await;
    assert_eq!((again.invoices_written, again.invoices_unchanged), (0, 2));
    assert_eq!(
        stamp(&f.db).await,
        before,
        "a re-run changed stored invoices"
    );

    // Reconcile: everything agrees.
    let (n, diffs) = reconcile(&f.db, ym("2026-03"), Some(f.tenant))
        .await
        .expect("reconcile");
    assert_eq!((n, diffs.len()), (2, 0), "{diffs:?}");

    // Issue March: numbers 1 and 2, in customer order, no gaps.
    let issued = issue(&mut f.db, ym("2026-03"), Some(f.tenant), None, false)
        .await
        .expect("issue");
    assert_eq!(issued.iter().map(|i| i.2).collect::<Vec<_>>(), [1, 2]);
    let frozen = f.invoice("acme", "2026-03").await;
    assert_eq!((frozen.0.as_str(), frozen.1), ("issued", Some(1)));

    // Late usage for March arrives after the invoice was issued.
    f.add(&[ev("tokens", "acme-2", "2026-03-25T10:00:00Z", "600")])
        .await;
    let s = f.run("2026-03").await;
    assert_eq!((s.invoices_frozen, s.invoices_written), (2, 0));
    assert_eq!(
        f.invoice("acme", "2026-03").await,
        frozen,
        "issued invoices never change"
    );
    let (_, diffs) = reconcile(&f.db, ym("2026-03"), Some(f.tenant))
        .await
        .expect("reconcile");
    assert_eq!(
        diffs.len(),
        1,
        "the pending correction is reported: {diffs:?}"
    );

    // April carries the correction: 2100 tokens now, 1500 billed: (10 + 1100 × 0.005) − 12.5 = 3.
    let april = f.run("2026-04").await;
    assert_eq!(april.corrections, 1);
    let lines = f.lines("acme", "2026-04").await;
    let corr: Vec<_> = lines.iter().filter(|l| l.0 == "correction").collect();
    assert_eq!(corr.len(), 1, "{lines:?}");
    assert_eq!(
        (corr[0].1, corr[0].2, corr[0].3),
        (d("2100"), Some(d("1500")), d("3"))
    );
    let named: (DateTime<Utc>, String) =
        f.db.query_one(
            "SELECT l.period_start, l.description FROM invoice_lines l WHERE l.kind = 'correction'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("correction line");
    assert_eq!(
        named.0,
        t("2026-03-15T23:00:00Z"),
        "the line names the corrected period"
    );
    assert!(named.1.contains("2026-03"), "{}", named.1);
    // Rerun: nothing changes; beta (no late usage) has no correction.
    let again = f.run("2026-04").await;
    assert_eq!((again.invoices_written, again.invoices_unchanged), (0, 2));
    assert!(f
        .lines("beta", "2026-04")
        .await
        .iter()
        .all(|l| l.0 != "correction"));

    // Once April is issued, May has nothing left to correct for March.
    let issued = issue(&mut f.db, ym("2026-04"), Some(f.tenant), None, false)
        .await
        .expect("issue");
    assert_eq!(issued.iter().map(|i| i.2).collect::<Vec<_>>(), [3, 4]);
    let may = f.run("2026-05").await;
    assert_eq!(may.corrections, 0);

    // A planted error is found by reconcile.
    f.db.execute(
        "UPDATE invoice_lines SET amount = amount + 0.01
          WHERE kind = 'usage' AND invoice_id = (SELECT i.id FROM invoices i JOIN customers c ON c.id = i.customer_id
                                                 WHERE c.key = 'beta' AND i.period = '2026-05')
            AND position = 3",
        &[],
    )
    .await
    .expect("plant");
    let (_, diffs) = reconcile(&f.db, ym("2026-05"), Some(f.tenant))
        .await
        .expect("reconcile");
    let what: BTreeSet<String> = diffs.iter().map(|d| d.what.clone()).collect();
    assert!(
        what.iter().any(|w| w.contains("amount = price × quantity")),
        "{what:?}"
    );
    assert!(what.contains("subtotal = Σ line amounts"), "{what:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuing_an_open_period_is_refused_and_leaves_no_gap() {
    let mut f = Fixture::new().await;
    let v = f.plan().await;
    f.customer(
        "acme",
        ("UTC", 1),
        None,
        &["acme-1"],
        v,
        t("2026-01-01T00:00:00Z"),
    )
    .await;
    f.run("2026-02").await;
    let now = Utc::now();
    let current = YearMonth::of(now, chrono_tz::UTC).to_string();
    f.run(&current).await;
    let err = issue(&mut f.db, ym(&current), Some(f.tenant), None, false)
        .await
        .expect_err("the period has not ended");
    assert!(err.to_string().contains("--early"), "{err}");
    let issued = issue(&mut f.db, ym("2026-02"), Some(f.tenant), None, false)
        .await
        .expect("issue");
    assert_eq!(issued.iter().map(|i| i.2).collect::<Vec<_>>(), [1]);
    let early = issue(&mut f.db, ym(&current), Some(f.tenant), None, true)
        .await
        .expect("issue early");
    assert_eq!(early.iter().map(|i| i.2).collect::<Vec<_>>(), [2]);
}

/// A customer in Asia/Kolkata (+05:30, so periods start mid-hour) with an anchor on the 15th
/// beside one in UTC: random usage over four months; each period's quantities equal the events
/// counted here, and consecutive periods together count every event once. (The UTC customer's
/// whole hours and days overlap the Kolkata customer's edge hours and days, which are loaded at
/// the finer grains: each minute must still count once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periods_across_zones_and_grains_count_every_minute_once() {
    let mut f = Fixture::new().await;
    let v = f.plan().await;
    let customers = [
        ("kol", chrono_tz::Asia::Kolkata, 15u32, ["k1", "k2"]),
        ("utc", chrono_tz::UTC, 1u32, ["x1", "x2"]),
    ];
    for (key, tz, anchor, subjects) in &customers {
        f.customer(
            key,
            (tz.name(), *anchor as i32),
            None,
            subjects,
            v,
            t("2026-01-01T00:00:00Z"),
        )
        .await;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let start = t("2026-02-01T00:00:00Z");
    let mut evs = Vec::new();
    for i in 0..3000 {
        // Dense around the Kolkata period boundaries (18:30 UTC on the 14th), sparse elsewhere.
        let time = if i % 3 == 0 {
            let (b, _) = bounds(
                ym(["2026-02", "2026-03", "2026-04"][i % 9 / 3]),
                15,
                chrono_tz::Asia::Kolkata,
            );
            b + Duration::seconds(rng.random_range(-7200..7200))
        } else {
            start + Duration::seconds(rng.random_range(0..(120 * 86_400)))
        };
        let meter = ["tokens", "requests", "users"][rng.random_range(0..3)];
        evs.push(Ev {
            meter,
            subject: ["k1", "k2", "x1", "x2"][rng.random_range(0..4)].into(),
            time,
            value: if meter == "users" {
                format!("u{}", rng.random_range(0..40))
            } else {
                format!("{}.{}", rng.random_range(0..500), rng.random_range(0..100))
            },
            project: None,
        });
    }
    f.add(&evs).await;
    for (key, tz, anchor, subjects) in &customers {
        let mine: Vec<&Ev> = evs
            .iter()
            .filter(|e| subjects.contains(&e.subject.as_str()))
            .collect();
        let mut total_tokens = Decimal::ZERO;
        let mut total_requests = 0;
        for p in ["2026-02", "2026-03", "2026-04"] {
            // Usage read over two connections, each feeding its own partition of the query.
            f.run_with(p, 1).await;
            let (from, to) = bounds(ym(p), *anchor, *tz);
            if *key == "kol" {
                assert_ne!(from.minute(), 0, "Kolkata periods start mid-hour");
            }
            let inside: Vec<&&Ev> = mine
                .iter()
                .filter(|e| trunc(e.time, 60) >= from && trunc(e.time, 60) < to)
                .collect();
            let tokens: Decimal = inside
                .iter()
                .filter(|e| e.meter == "tokens")
                .map(|e| d(&e.value))
                .sum();
            let requests = inside.iter().filter(|e| e.meter == "requests").count();
            let users: BTreeSet<&str> = inside
                .iter()
                .filter(|e| e.meter == "users")
                .map(|e| e.value.as_str())
                .collect();
            let lines = f.lines(key, p).await;
            let q: Vec<Decimal> = lines.iter().map(|l| l.1).collect();
            assert_eq!(
                q,
                [
                    Decimal::ONE,
                    Decimal::from(requests),
                    tokens.normalize(),
                    Decimal::from(users.len())
                ],
                "{key} period {p}"
            );
            total_tokens += tokens;
            total_requests += requests;
        }
        let (from, _) = bounds(ym("2026-02"), *anchor, *tz);
        let (_, to) = bounds(ym("2026-04"), *anchor, *tz);
        let all: Vec<&&Ev> = mine
            .iter()
            .filter(|e| e.time >= from && e.time < to)
            .collect();
        assert_eq!(
            total_requests,
            all.iter().filter(|e| e.meter == "requests").count()
        );
        assert_eq!(
            total_tokens,
            all.iter()
                .filter(|e| e.meter == "tokens")
                .map(|e| d(&e.value))
                .sum::<Decimal>()
        );
    }
}

/// Costs by project split each usage line by quantity, to the cent; simulate rates the same
/// usage under another plan; spend answers the period containing a given instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_by_dimension_simulation_and_spend() {
    let (mut f, _) = Fixture::with_acme().await;
    // The same 1500 tokens as acme_events(), now 1000 for project "alpha", 500 for "beta".
    let mut evs: Vec<Ev> = acme_events()
        .into_iter()
        .filter(|e| e.meter != "tokens")
        .collect();
    for (time, value, project) in [
        ("2026-03-15T23:00:00Z", "500", "alpha"),
        ("2026-03-20T12:34:56Z", "500", "alpha"),
        ("2026-03-31T21:59:30Z", "500", "beta"),
        ("2026-03-31T22:00:00Z", "800", "beta"), // April
    ] {
        let mut e = ev("tokens", "acme-1", time, value);
        e.project = Some(project);
        evs.push(e);
    }
    f.add(&evs).await;
    f.run("2026-03").await;

    let rows = costs(&f.db, f.tenant, ym("2026-03"), None, "project")
        .await
        .expect("costs");
    let tokens: Vec<(&str, Decimal, Decimal)> = rows
        .iter()
        .filter(|r| r.meter == "tokens")
        .map(|r| (r.value.as_str(), r.quantity, r.amount))
        .collect();
    // 12.50 split 1000 : 500 = 8.333… : 4.1666… → 8.33 and 4.17 (largest remainder).
    assert_eq!(
        tokens,
        [
            ("alpha", d("1000"), d("8.33")),
            ("beta", d("500"), d("4.17"))
        ]
    );
    // Usage without the dimension is "(none)"; every part adds up to the invoice's lines.
    assert!(rows
        .iter()
        .any(|r| r.meter == "requests" && r.value == "(none)"));
    let total: Decimal = rows.iter().map(|r| r.amount).sum();
    let lines: Decimal = f
        .lines("acme", "2026-03")
        .await
        .iter()
        .filter(|l| l.0 == "usage")
        .map(|l| l.3)
        .sum();
    assert_eq!(total, lines);

    // A cheaper plan: tokens at 0.001 flat per unit, no fee, nothing else priced.
    let cheap_plan: Uuid =
        f.db.query_one(
            "INSERT INTO plans (tenant_id, key, tier) VALUES ($1, 'cheap', 'basic') RETURNING id",
            &[&f.tenant],
        )
        .await
        .expect("plan")
        .get(0);
    let cheap: Uuid = f
        .db
        .query_one(
            "INSERT INTO plan_versions (tenant_id, plan_id, version, currency) VALUES ($1, $2, 1, 'USD') RETURNING id",
            &[&f.tenant, &cheap_plan],
        )
        .await
        .expect("version")
        .get(0);
    f.db.execute(
        "INSERT INTO plan_prices (tenant_id, plan_version_id, meter_id, price) VALUES ($1, $2, $3, $4)",
        &[&f.tenant, &cheap, &f.meters["tokens"], &serde_json::json!({"type": "unit", "amount": "0.001"})],
    )
    .await
    .expect("price");
    let before = stamp(&f.db).await;
    let o = plan_override(&f.db, f.tenant, "cheap", None)
        .await
        .expect("plan");
    let sim = simulate(
        &f.db,
        f.tenant,
        &o,
        ym("2026-03"),
        ym("2026-04"),
        Some("acme"),
    )
    .await
    .expect("simulate");
    assert_eq!(sim.len(), 2);
    // March: 1500 × 0.001 = 1.50, tax 19 % = 0.285 → 0.29: 1.79 against 47.56.
    assert_eq!(
        (sim[0].period.as_str(), sim[0].actual, sim[0].simulated),
        ("2026-03", d("47.56"), d("1.79"))
    );
    assert_eq!(sim[0].difference, d("-45.77"));
    // April: 800 tokens → 0.80 + 0.15 tax.
    assert_eq!(
        (sim[1].period.as_str(), sim[1].simulated),
        ("2026-04", d("0.95"))
    );
    assert_eq!(stamp(&f.db).await, before, "simulate writes nothing");
    let err = plan_override(&f.db, f.tenant, "nope", None)
        .await
        .expect_err("unknown plan");
    assert!(err.to_string().contains("nope"), "{err}");

    // Spend at a moment of March (Berlin) is March's invoice so far; before the subscription,
    // there is none.
    let s = spend(&f.db, f.tenant, "acme", t("2026-03-20T00:00:00Z"))
        .await
        .expect("spend")
        .expect("subscribed");
    assert_eq!((s.period.as_str(), s.total), ("2026-03", d("47.56")));
    let s = spend(&f.db, f.tenant, "acme", t("2026-03-31T22:30:00Z"))
        .await
        .expect("spend")
        .expect("subscribed");
    assert_eq!(
        s.period, "2026-04",
        "22:30 UTC on 31 March is April in Berlin"
    );
    assert!(spend(&f.db, f.tenant, "acme", t("2026-03-10T00:00:00Z"))
        .await
        .expect("spend")
        .is_none());
}
