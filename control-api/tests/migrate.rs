//! Migrations against the real PostgreSQL: applied on a fresh database, a second run applies
//! nothing, concurrent runners serialise, and the tables the pipeline needs exist and round-trip
//! exact values.

use schemas::testing::{connect, database_url, fresh_database, with_database};
use std::process::Command;

const REQUIRED_TABLES: &[&str] = &[
    "tenants",
    "api_keys",
    "meters",
    "usage_minute",
    "usage_hour",
    "usage_day",
    "usage_unique_minute",
    "usage_unique_hour",
    "usage_unique_day",
    "consumer_offsets",
    "partition_leases",
    "dedup_keys",
    "dead_letters",
    "usage_corrections",
    "event_outcomes",
];

#[tokio::test]
async fn migrations_apply_once_and_twice_is_a_no_op() {
    let (_url, mut client) = fresh_database().await;
    let again = schemas::migrate::run(&mut client)
        .await
        .expect("second run");
    assert!(again.is_empty(), "second run applied {again:?}");

    for table in REQUIRED_TABLES {
        let row = client
            .query_one("SELECT to_regclass($1)::text", &[table])
            .await
            .expect("query");
        let found: Option<String> = row.get(0);
        assert_eq!(found.as_deref(), Some(*table), "table {table} missing");
    }
    let history: i64 = client
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await
        .expect("history")
        .get(0);
    assert_eq!(history as usize, schemas::migrate::known().len());
}

/// A new database with no migrations applied; returns its URL.
async fn empty_database() -> String {
    let admin = connect(&with_database(&database_url(), "postgres")).await;
    let name = format!("metering_t_{}", uuid_like());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create db");
    with_database(&database_url(), &name)
}

#[tokio::test]
async fn concurrent_runners_serialise_on_the_lock() {
    let url = empty_database().await;
    let mut a = connect(&url).await;
    let mut b = connect(&url).await;
    let (ra, rb) = tokio::join!(schemas::migrate::run(&mut a), schemas::migrate::run(&mut b));
    let (ra, rb) = (ra.expect("runner a"), rb.expect("runner b"));
    // Exactly one runner applied everything; the other found nothing left to do.
    assert_eq!(ra.len() + rb.len(), schemas::migrate::known().len());
    assert!(ra.is_empty() || rb.is_empty());
}

#[tokio::test]
async fn usage_rows_round_trip_exact_decimals_into_monthly_partitions() {
    let (_url, client) = fresh_database().await;
    let tenant: uuid::Uuid = client
        .query_one(
            "INSERT INTO tenants (name) VALUES ('acme') RETURNING id",
            &[],
        )
        .await
        .expect("tenant")
        .get(0);
    let exact = "12345678901234567890.000000000000000001";
    client
        .execute(
            "INSERT INTO usage_minute (tenant_id, meter_id, window_start, subject, sum_value, event_count)
             VALUES ($1, gen_random_uuid(), date_trunc('minute', now()), 'customer-1', $2::text::numeric, 3)",
            &[&tenant, &exact],
        )
        .await
        .expect("insert usage");
    let row = client
        .query_one(
            "SELECT sum_value::text, event_count, tableoid::regclass::text FROM usage_minute WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .expect("select usage");
    assert_eq!(row.get::<_, String>(0), exact);
    assert_eq!(row.get::<_, i64>(1), 3);
    let partition: String = row.get(2);
    let has_timescale: bool = client
        .query_one("SELECT metering_has_timescale()", &[])
        .await
        .expect("ts")
        .get(0);
    if !has_timescale {
        assert!(
            partition.starts_with("usage_minute_2") && partition != "usage_minute_default",
            "row went to {partition}, not a monthly partition"
        );
    }
    // Ensuring partitions again is idempotent.
    let created: i32 = client
        .query_one(
            "SELECT metering_ensure_partitions(current_date, current_date + 1)",
            &[],
        )
        .await
        .expect("ensure")
        .get(0);
    assert_eq!(created, 0);
}

#[tokio::test]
async fn the_cli_migrates_and_reports_json() {
    let (url, _client) = fresh_database().await;
    let out = Command::new(env!("CARGO_BIN_EXE_control-api"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("run control-api");
    assert!(
        out.status.success(),
        "control-api migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json on stdout");
    assert_eq!(report["applied"], serde_json::json!([]));
    assert_eq!(
        report["known"].as_u64(),
        Some(schemas::migrate::known().len() as u64)
    );

    let bad = Command::new(env!("CARGO_BIN_EXE_control-api"))
        .args([
            "migrate",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
        ])
        .output()
        .expect("run control-api");
    assert!(!bad.status.success());
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(
        msg.contains("cannot connect to PostgreSQL"),
        "unclear error: {msg}"
    );
}

fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// V13 turns the dedup ids of V3 into 16-byte keys: an id claimed before the upgrade is still
/// claimed after it, under the key the aggregator computes, with its reception time.
#[tokio::test]
async fn dedup_ids_become_keys_on_upgrade() {
    let mut client = connect(&empty_database().await).await;
    schemas::migrate::run_to(&mut client, Some(12))
        .await
        .expect("up to V12");
    let tenant = uuid::Uuid::from_u128(0xb1);
    client
        .execute(
            "INSERT INTO dedup_ids (tenant_id, source, event_id, seen_at)
             VALUES ($1, 'svc', 'ev-1', '2026-12-01T10:00:00Z'), ($1, 'sé', '', '2026-12-01T11:00:00Z')",
            &[&tenant],
        )
        .await
        .expect("old ids");
    let applied = schemas::migrate::run(&mut client).await.expect("upgrade");
    assert!(applied.iter().any(|m| m.version == 13), "{applied:?}");
    let rows = client
        .query(
            "SELECT key::text, seen_at::text FROM dedup_keys ORDER BY seen_at",
            &[],
        )
        .await
        .expect("keys");
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        vec![
            // The value aggregator::process::dedup_key gives for (b1, "svc", "ev-1").
            (
                "04c5651b-c12f-2a50-d681-9af0fec89e51".to_string(),
                "2026-12-01 10:00:00+00".to_string()
            ),
            (
                "caa9471b-e48b-1b8e-f0aa-980581ba9639".to_string(),
                "2026-12-01 11:00:00+00".to_string()
            ),
        ]
    );
    let old: Option<String> = client
        .query_one("SELECT to_regclass('dedup_ids')::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(old, None, "the old table is gone");
}
