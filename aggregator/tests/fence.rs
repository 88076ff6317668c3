//! The generation fence and late-event corrections, checked at the flush itself against real
//! PostgreSQL (no broker needed: the flush is what decides what was counted).

use aggregator::flush::{flush, FlushError, FlushInput, PartitionCommit};
use aggregator::lease::Leases;
use aggregator::process::Pending;
use schemas::proto::usage::v1::UsageEvent;
use std::time::Duration;

const MIN: i64 = 60_000_000_000;

fn pending(tenant: uuid::Uuid, id: &str, time: i64, received: i64, tokens: &str) -> Pending {
    Pending {
        partition: 0,
        offset: 0,
        tenant,
        received,
        event: UsageEvent {
            id: id.into(),
            source: "s".into(),
            r#type: "prompt".into(),
            subject: "cust".into(),
            time_unix_nanos: time,
            data_json: format!(r#"{{"tokens": {tokens}}}"#).into_bytes().into(),
        },
    }
}

async fn setup() -> (
    tokio_postgres::Client,
    uuid::Uuid,
    aggregator::meters::MeterSet,
) {
    let (_, db) = schemas::testing::fresh_database().await;
    let t = control_api::keys::create_tenant(&db, "t")
        .await
        .expect("tenant");
    db.execute(
        "INSERT INTO meters (tenant_id, slug, event_type, aggregation, value_property, created_at)
         VALUES ($1, 'tokens', 'prompt', 'SUM', '$.tokens', now() - interval '1 day')",
        &[&t.id],
    )
    .await
    .expect("meter");
    let meters = aggregator::meters::load(&db).await.expect("meters");
    (db, t.id, meters)
}

fn leases(member: &str) -> Leases {
    Leases {
        group: "g".into(),
        topic: "t".into(),
        member: member.into(),
        ttl: Duration::from_millis(200),
    }
}

#[tokio::test]
async fn a_shard_that_lost_its_partition_cannot_commit() {
    let (mut db, tenant, meters) = setup().await;
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now");
    let a = leases("a");
    let b = leases("b");
    let ta = a
        .acquire(&db, 0)
        .await
        .expect("db")
        .expect("free lease taken");
    assert!(
        b.acquire(&db, 0).await.expect("db").is_none(),
        "a live lease is not taken"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // a stalls past its lease
    let tb = b
        .acquire(&db, 0)
        .await
        .expect("db")
        .expect("expired lease taken");
    assert_eq!(tb.generation, ta.generation + 1);

    let events = vec![pending(tenant, "e1", now - MIN, now, "5")];
    let lateness = aggregator::Config::default().lateness;
    let commit = |generation| {
        vec![PartitionCommit {
            partition: 0,
            generation,
            committed_offset: None,
            next_offset: Some(1),
            watermark: 0,
        }]
    };
    let input = |parts, member| FlushInput {
        group: "g",
        topic: "t",
        member,
        partitions: parts,
        events: &events,
        bad: &[],
        meters: &meters,
        lateness: &lateness,
        dedup_window_secs: 86_400,
    };
    let stale = commit(ta.generation);
    let r = flush(&mut db, input(&stale, "a")).await;
    assert!(matches!(r, Err(FlushError::Fenced(_))), "{r:?}");
    let rows: i64 = db
        .query_one("SELECT (SELECT count(*) FROM usage_minute) + (SELECT count(*) FROM dedup_keys) + (SELECT count(*) FROM consumer_offsets)", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "a fenced flush writes nothing");

    let current = commit(tb.generation);
    let report = flush(&mut db, input(&current, "b"))
        .await
        .expect("the new owner commits");
    assert_eq!(report.accepted, 1);
    // The same batch again (a replay from a stale offset) is refused: the stored offset moved.
    let r = flush(&mut db, input(&current, "b")).await;
    assert!(matches!(r, Err(FlushError::Fenced(_))), "{r:?}");
}

#[tokio::test]
async fn late_events_update_windows_and_record_corrections() {
    let (mut db, tenant, meters) = setup().await;
    let leases = leases("a");
    let taken = leases.acquire(&db, 0).await.expect("db").expect("lease");
    let now = chrono::Utc::now().timestamp_nanos_opt().expect("now");
    let lateness = aggregator::Config::default().lateness;
    // In order: the watermark reaches `now`; then an event 10 minutes back (its window closed
    // long before the watermark, grace 60 s) and one for the current minute.
    let first = vec![pending(tenant, "on-time", now, now, "1")];
    let late = vec![
        pending(tenant, "late", now - 10 * MIN, now, "2.5"),
        pending(tenant, "current", now, now, "4"),
    ];
    let mut committed = None;
    for (i, batch) in [first, late].iter().enumerate() {
        let wm: i64 = db
            .query_opt("SELECT watermark_unix_nanos FROM consumer_offsets", &[])
            .await
            .expect("wm")
            .map(|r| r.get(0))
            .unwrap_or(0);
        let parts = [PartitionCommit {
            partition: 0,
            generation: taken.generation,
            committed_offset: committed,
            next_offset: Some(i as i64 + 1),
            watermark: wm,
        }];
        flush(
            &mut db,
            FlushInput {
                group: "g",
                topic: "t",
                member: "a",
                partitions: &parts,
                events: batch,
                bad: &[],
                meters: &meters,
                lateness: &lateness,
                dedup_window_secs: 86_400,
            },
        )
        .await
        .expect("flush");
        committed = Some(i as i64 + 1);
    }
    let rows = db
        .query(
            "SELECT window_start, delta_sum::text, delta_count FROM usage_corrections WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .expect("corrections");
    assert_eq!(rows.len(), 1, "only the late event is a correction");
    let window: chrono::DateTime<chrono::Utc> = rows[0].get(0);
    let late_minute = (now - 10 * MIN).div_euclid(MIN) * MIN;
    assert_eq!(window.timestamp_nanos_opt(), Some(late_minute));
    assert_eq!(rows[0].get::<_, String>(1), "2.5");
    assert_eq!(rows[0].get::<_, i64>(2), 1);
    // And the stored aggregates include it, at every grain.
    for table in ["usage_minute", "usage_hour", "usage_day"] {
        let total: String = db
            .query_one(
                &format!("SELECT sum(sum_value)::text FROM {table} WHERE tenant_id = $1"),
                &[&tenant],
            )
            .await
            .expect("sum")
            .get(0);
        assert_eq!(total, "7.5", "{table}");
    }
}
