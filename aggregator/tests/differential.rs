//! Differential and crash tests: a seeded stream goes through ingest, the real broker and the
//! aggregator; every meter query must equal the reference computed from the generated events,
//! whatever happened to the aggregators on the way.

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use common::gen::{self, Window};
use common::Pipeline;
use std::time::Duration as StdDuration;

const WAIT: StdDuration = StdDuration::from_secs(120);

fn minute_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp().div_euclid(60) * 60, 0).expect("time")
}

fn local_midnight(tz: Tz, t: DateTime<Utc>, days: i64) -> DateTime<Utc> {
    let d = t.with_timezone(&tz).date_naive() + Duration::days(days);
    tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
        .earliest()
        .expect("midnight exists")
        .with_timezone(&Utc)
}

/// Sends the stream through ingest in requests of 100 events.
async fn send(p: &Pipeline, key: &str, s: &gen::Stream) {
    for chunk in s.events.chunks(100) {
        p.post_events(key, chunk).await;
    }
}

/// Every meter × a set of windows, zones, group-bys and filters, against the reference.
async fn compare_all(p: &Pipeline, key: &str, s: &gen::Stream, now: DateTime<Utc>) -> usize {
    let ny: Tz = "America/New_York".parse().expect("tz");
    let berlin: Tz = "Europe/Berlin".parse().expect("tz");
    let kolkata: Tz = "Asia/Kolkata".parse().expect("tz");
    let utc = chrono_tz::UTC;
    let recent_from = minute_floor(now) - Duration::hours(3);
    let recent_to = minute_floor(now) + Duration::minutes(1);
    // (window, tz, from, to)
    let ranges: Vec<(Window, Tz, DateTime<Utc>, DateTime<Utc>)> = vec![
        (
            Window::None,
            utc,
            minute_floor(now) - Duration::days(35),
            recent_to,
        ),
        (
            Window::None,
            utc,
            minute_floor(now) - Duration::days(2) + Duration::minutes(7),
            recent_to,
        ),
        (Window::Minute, utc, recent_from, recent_to),
        (
            Window::Hour,
            utc,
            local_midnight(utc, now, -3),
            local_midnight(utc, now, 1),
        ),
        (
            Window::Hour,
            kolkata,
            local_midnight(kolkata, now, -2),
            local_midnight(kolkata, now, 1),
        ),
        (
            Window::Hour,
            ny,
            local_midnight(ny, now, -30),
            local_midnight(ny, now, -20),
        ),
        (
            Window::Day,
            utc,
            local_midnight(utc, now, -35),
            local_midnight(utc, now, 1),
        ),
        (
            Window::Day,
            ny,
            local_midnight(ny, now, -35),
            local_midnight(ny, now, 1),
        ),
        (
            Window::Day,
            berlin,
            local_midnight(berlin, now, -35),
            local_midnight(berlin, now, 1),
        ),
        (
            Window::Day,
            kolkata,
            local_midnight(kolkata, now, -35),
            local_midnight(kolkata, now, 1),
        ),
        (
            Window::Month,
            ny,
            local_midnight(ny, now, -40),
            local_midnight(ny, now, 1),
        ),
    ];
    // (groupBy=subject, groupBy names, subject filter, region filter)
    type Shape<'a> = (bool, Vec<&'a str>, Vec<&'a str>, Option<&'a str>);
    let shapes: Vec<Shape> = vec![
        (false, vec![], vec![], None),
        (true, vec!["model"], vec![], None),
        (
            false,
            vec!["model", "region"],
            vec!["cust-1", "cust-3"],
            Some("eu"),
        ),
    ];
    let mut compared = 0;
    for (slug, agg, _) in gen::METERS {
        for (w, tz, from, to) in &ranges {
            for (by_subject, group_by, subjects, region) in &shapes {
                let mut q = format!(
                    "from={}&to={}",
                    from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                let ws = match w {
                    Window::None => None,
                    Window::Minute => Some("MINUTE"),
                    Window::Hour => Some("HOUR"),
                    Window::Day => Some("DAY"),
                    Window::Month => Some("MONTH"),
                };
                if let Some(ws) = ws {
                    q += &format!(
                        "&windowSize={ws}&windowTimeZone={}",
                        tz.name().replace('/', "%2F")
                    );
                }
                if *by_subject {
                    q += "&groupBy=subject";
                }
                for g in group_by {
                    q += &format!("&groupBy={g}");
                }
                for s in subjects {
                    q += &format!("&subject={s}");
                }
                if let Some(r) = region {
                    q += &format!("&filterGroupBy%5Bregion%5D={r}");
                }
                let r = p
                    .api(
                        "GET",
                        &format!("/api/v1/meters/{slug}/query?{q}"),
                        key,
                        None,
                    )
                    .await;
                assert_eq!(r.status, 200, "{slug}?{q}: {}", r.body);
                let got = gen::answer(&r.json(), group_by);
                let want = gen::expected(
                    &s.accepted,
                    agg,
                    *from,
                    *to,
                    *w,
                    *tz,
                    *by_subject,
                    group_by,
                    subjects,
                    *region,
                );
                assert!(
                    !want.is_empty() || matches!(w, Window::Minute),
                    "reference empty for {slug}?{q}"
                );
                if got != want {
                    let missing: Vec<_> = want
                        .iter()
                        .filter(|(k, v)| got.get(*k) != Some(*v))
                        .take(5)
                        .collect();
                    let extra: Vec<_> = got
                        .iter()
                        .filter(|(k, v)| want.get(*k) != Some(*v))
                        .take(5)
                        .collect();
                    panic!("{slug}?{q}: {} rows expected, {} got; expected-not-got {missing:?}; got-not-expected {extra:?}", want.len(), got.len());
                }
                compared += 1;
            }
        }
    }
    compared
}

async fn setup_meters(p: &Pipeline, key: &str) {
    for (slug, agg, value) in gen::METERS {
        let r = p
            .api(
                "POST",
                "/api/v1/meters",
                key,
                Some(gen::meter_json(slug, agg, *value)),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
}

async fn check_outcomes(p: &Pipeline, tenant: uuid::Uuid, s: &gen::Stream) {
    p.wait_accounted(tenant, s.events.len() as i64, WAIT).await;
    assert_eq!(p.outcomes(tenant).await, s.outcomes);
}

#[tokio::test]
async fn every_query_equals_the_reference() {
    let p = Pipeline::new(4).await;
    let (other, other_key) = p.other_tenant().await;
    setup_meters(&p, &p.key).await;
    setup_meters(&p, &other_key).await;
    let now = Utc::now();
    let a = gen::stream(7, 3_000, now, "a");
    let b = gen::stream(8, 1_500, now, "b");
    let (stop, task) = p.spawn_aggregator("diff");
    let (ka, kb) = (p.key.clone(), other_key.clone());
    tokio::join!(send(&p, &ka, &a), send(&p, &kb, &b));
    check_outcomes(&p, p.tenant, &a).await;
    check_outcomes(&p, other, &b).await;
    // Late events were recorded as corrections (the stream is out of order by design).
    let corrections: i64 =
        p.db.query_one(
            "SELECT count(*) FROM usage_corrections WHERE tenant_id = $1",
            &[&p.tenant],
        )
        .await
        .expect("corrections")
        .get(0);
    assert!(
        corrections > 0,
        "out-of-order events must produce corrections"
    );
    let n = compare_all(&p, &p.key, &a, now).await + compare_all(&p, &other_key, &b, now).await;
    assert!(n >= 2 * 7 * 33, "{n} queries compared");
    stop.cancel();
    task.await.expect("stopped");
}

/// SIGKILL at random points, a clean hand-over between two aggregators, and database
/// connections cut mid-stream: the totals stay exact.
#[tokio::test]
async fn crashes_handovers_and_lost_connections_keep_totals_exact() {
    use rand::{Rng, SeedableRng};
    let p = Pipeline::new(4).await;
    setup_meters(&p, &p.key).await;
    let now = Utc::now();
    let s = gen::stream(11, 4_000, now, "c");
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut a = p.child_aggregator("agg-a");
    let mut b = p.child_aggregator("agg-b");
    let chunks: Vec<_> = s.events.chunks(100).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        p.post_events(&p.key, chunk).await;
        match rng.random_range(0..10) {
            0 => {
                kill9(&mut a);
                tokio::time::sleep(StdDuration::from_millis(rng.random_range(0..400))).await;
                a = p.child_aggregator("agg-a");
            }
            1 => {
                kill9(&mut b);
                b = p.child_aggregator("agg-b");
            }
            2 => {
                // Cut every connection of the test database (flushes in flight included).
                let _ =
                    p.db.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE datname = current_database() AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await;
            }
            _ => {}
        }
        if i == chunks.len() / 2 {
            // A clean stop mid-stream: b hands its partitions over to a.
            common::sigterm(&mut b);
        }
    }
    check_outcomes(&p, p.tenant, &s).await;
    let n = compare_all(&p, &p.key, &s, now).await;
    assert!(n > 0);
    kill9(&mut a);
    kill9(&mut b);
}

fn kill9(c: &mut std::process::Child) {
    common::kill9(c)
}

/// The database crashes (twice) and the broker restarts (durable SQLite storage) while the
/// stream flows; ingest answers 503 meanwhile and the events are sent again. Exact.
#[tokio::test]
async fn database_crashes_and_broker_restart_mid_stream_keep_totals_exact() {
    let pg = common::PrivatePostgres::start();
    let mut broker = common::edge::PrivateBroker::start();
    let (url, db) = pg.database().await;
    let mut p = Pipeline::on(&broker.brokers(), 4, url, db).await;
    setup_meters(&p, &p.key).await;
    let now = Utc::now();
    let s = gen::stream(21, 3_000, now, "r");
    let mut agg = p.child_aggregator("agg-r");
    let chunks: Vec<_> = s.events.chunks(100).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        p.post_events(&p.key, chunk).await;
        if i == 8 || i == 22 {
            pg.crash_and_restart();
        }
        if i == 15 {
            broker.kill();
            tokio::time::sleep(StdDuration::from_millis(500)).await;
            broker.restart();
        }
    }
    p.db = schemas::testing::connect(&p.db_url).await;
    check_outcomes(&p, p.tenant, &s).await;
    let n = compare_all(&p, &p.key, &s, now).await;
    assert!(n > 0);
    kill9(&mut agg);
}
