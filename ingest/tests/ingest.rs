//! The ingest edge against the real broker (tansu, SQLite storage) and real PostgreSQL.

mod common;

use bytes::Bytes;
use common::*;
use ingest::record::partition_for;
use std::time::Duration;

const CE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const NDJSON: &str = "application/x-ndjson";

fn key_of(tenant: &str, subject: &str) -> Vec<u8> {
    schemas::kafka::record_key(tenant, subject)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_content_type_and_gzip_lands_in_kafka_keyed_and_partitioned() {
    let h = Harness::new().await;
    let single = event("s-1", "cust-a").to_string();
    assert_eq!(h.post(CE, single).await.status, 204);

    let batch: Vec<_> = (0..20)
        .map(|i| event(&format!("b-{i}"), &format!("cust-{}", i % 7)))
        .collect();
    let r = h
        .post(BATCH, serde_json::to_vec(&batch).expect("json"))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(r.headers.contains_key("x-request-id"));

    let nd: String = (0..5)
        .map(|i| event(&format!("n-{i}"), "cust-n").to_string() + "\n")
        .collect();
    assert_eq!(h.post(NDJSON, nd).await.status, 204);

    let gz: Vec<_> = (0..10)
        .map(|i| event(&format!("g-{i}"), &format!("cust-g{i}")))
        .collect();
    let body = gzip(&serde_json::to_vec(&gz).expect("json"));
    let auth = format!("Bearer {}", h.key);
    let r = send(
        h.addr,
        "POST",
        "/api/v1/events",
        &[
            ("content-type", BATCH),
            ("content-encoding", "gzip"),
            ("authorization", &auth),
        ],
        Bytes::from(body),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);

    let records = h.consume(36, Duration::from_secs(30));
    let tenant = h.tenant.to_string();
    let mut ids = Vec::new();
    for rec in &records {
        assert_eq!(rec.batch.tenant_id, tenant, "tenant comes from the key");
        assert_eq!(
            rec.content_type.as_deref(),
            Some(schemas::kafka::EVENT_BATCH_V1)
        );
        for e in &rec.batch.events {
            assert_eq!(
                rec.partition,
                partition_for(&key_of(&tenant, &e.subject), 4),
                "event {} on the wrong partition",
                e.id
            );
            assert_eq!(e.time_unix_nanos, 1_795_600_800_250_000_000);
            // `data` travels exactly as sent.
            assert_eq!(e.data_json.as_ref(), br#"{"model":"m1","tokens":"12.5"}"#);
            ids.push(e.id.clone());
        }
        // The record key is the tenant + subject of its first event.
        assert_eq!(rec.key, key_of(&tenant, &rec.batch.events[0].subject));
    }
    ids.sort();
    let mut expected: Vec<String> = std::iter::once("s-1".to_string())
        .chain((0..20).map(|i| format!("b-{i}")))
        .chain((0..5).map(|i| format!("n-{i}")))
        .chain((0..10).map(|i| format!("g-{i}")))
        .collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "every acknowledged event is in Kafka exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_partitioner_agrees_with_librdkafkas_murmur2() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let brokers = schemas::testing::kafka_brokers();
    let topic = create_topic(&brokers, 7).await;
    let p: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("broker.address.family", "v4")
        .set("partitioner", "murmur2")
        .create()
        .expect("producer");
    let keys: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            key_of(
                "0193a4f2-7c1e-7d3a-9b8e-5f2c1d0e9a7b",
                &format!("subject-{i}{}", "x".repeat(i % 5)),
            )
        })
        .collect();
    for k in &keys {
        let partition = p
            .send(
                FutureRecord::<Vec<u8>, [u8]>::to(&topic)
                    .key(k)
                    .payload(&[][..]),
                Duration::from_secs(10),
            )
            .await
            .expect("produce")
            .partition;
        assert_eq!(
            partition,
            partition_for(k, 7),
            "key {:?}",
            String::from_utf8_lossy(k)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_errors_and_produce_nothing() {
    let h = Harness::with(|c| {
        c.limits.max_body_bytes = 64 << 10;
        c.limits.max_decompressed_bytes = 256 << 10;
        c.limits.max_events_per_request = 50;
    })
    .await;
    let good = event("ok", "c");
    let with = |field: &str, v: serde_json::Value| {
        let mut e = good.clone();
        e[field] = v;
        e.to_string()
    };
    let without = |field: &str| {
        let mut e = good.clone();
        e.as_object_mut().expect("obj").remove(field);
        e.to_string()
    };
    // (name, content type, body, expected status, expected field, text in the answer)
    type Case<'a> = (&'a str, &'a str, Vec<u8>, u16, Option<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            CE,
            b"{\"specversion\":".to_vec(),
            400,
            None,
            "malformed JSON",
        ),
        (
            "wrong specversion",
            CE,
            with("specversion", "0.3".into()).into(),
            400,
            Some("specversion"),
            "must be \\\"1.0\\\"",
        ),
        (
            "missing id",
            CE,
            without("id").into(),
            400,
            Some("id"),
            "is required",
        ),
        (
            "empty source",
            CE,
            with("source", "".into()).into(),
            400,
            Some("source"),
            "must not be empty",
        ),
        (
            "missing type",
            CE,
            without("type").into(),
            400,
            Some("type"),
            "is required",
        ),
        (
            "missing subject",
            CE,
            without("subject").into(),
            400,
            Some("subject"),
            "is required",
        ),
        (
            "numeric subject",
            CE,
            with("subject", 5.into()).into(),
            400,
            Some("subject"),
            "must be a string",
        ),
        (
            "unparseable time",
            CE,
            with("time", "yesterday".into()).into(),
            400,
            Some("time"),
            "not an RFC 3339",
        ),
        (
            "time without offset",
            CE,
            with("time", "2026-11-25T10:00:00".into()).into(),
            400,
            Some("time"),
            "no UTC offset",
        ),
        (
            "data not an object",
            CE,
            with("data", serde_json::json!([1, 2])).into(),
            400,
            Some("data"),
            "must be a JSON object",
        ),
        (
            "invalid UTF-8",
            CE,
            b"{\"id\":\"\xff\xfe\"}".to_vec(),
            400,
            None,
            "not valid UTF-8",
        ),
        (
            "one bad event in a batch",
            BATCH,
            format!("[{good},{}]", without("time")).into_bytes(),
            400,
            Some("time"),
            "\"index\":1",
        ),
        (
            "body over the limit",
            BATCH,
            format!("[{}]", vec![good.to_string(); 400].join(",")).into_bytes(),
            413,
            None,
            "over the limit",
        ),
        (
            "too many events",
            BATCH,
            format!("[{}]", vec![good.to_string(); 60].join(",")).into_bytes(),
            413,
            None,
            "60 events",
        ),
        (
            "wrong content type",
            "text/plain",
            good.to_string().into_bytes(),
            415,
            None,
            "Content-Type",
        ),
        ("empty batch", BATCH, b"[]".to_vec(), 400, None, "no events"),
    ];
    for (name, ct, body, status, field, text) in cases {
        let r = h.post(ct, body).await;
        assert_eq!(r.status, status, "{name}: {}", r.body);
        assert!(
            r.body.contains(text),
            "{name}: answer lacks {text:?}: {}",
            r.body
        );
        if let Some(f) = field {
            let errors = r.json()["errors"].clone();
            assert!(
                errors
                    .as_array()
                    .is_some_and(|a| a.iter().any(|e| e["field"] == f)),
                "{name}: no error for field {f}: {}",
                r.body
            );
        }
        assert_eq!(
            r.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("")),
            Some("application/problem+json"),
            "{name}"
        );
    }

    // A gzip bomb: 10 MB of zeros in a few KB.
    let bomb = gzip(&vec![b' '; 10 << 20]);
    assert!(bomb.len() < 64 << 10);
    let auth = format!("Bearer {}", h.key);
    let r = send(
        h.addr,
        "POST",
        "/api/v1/events",
        &[
            ("content-type", BATCH),
            ("content-encoding", "gzip"),
            ("authorization", &auth),
        ],
        Bytes::from(bomb),
    )
    .await;
    assert_eq!(r.status, 413, "gzip bomb: {}", r.body);
    assert!(r.body.contains("decompressed"), "{}", r.body);

    // Credentials.
    let body = Bytes::from(good.to_string());
    let r = send(
        h.addr,
        "POST",
        "/api/v1/events",
        &[("content-type", CE)],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 401, "missing key");
    let unknown = format!("Bearer {}", schemas::apikey::generate());
    let r = send(
        h.addr,
        "POST",
        "/api/v1/events",
        &[("content-type", CE), ("authorization", &unknown)],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 401, "unknown key");
    let r = send(
        h.addr,
        "POST",
        "/api/v1/events",
        &[("content-type", CE), ("authorization", "Bearer nope")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 401, "malformed key");

    let read_only = h
        .key_with(control_api::keys::NewKey {
            scopes: vec!["read".into()],
            ..Default::default()
        })
        .await;
    let r = post_as(h.addr, &read_only.key, CE, body.clone()).await;
    assert_eq!(r.status, 403, "wrong scope: {}", r.body);
    assert!(r.body.contains("scope"));

    let elsewhere = h
        .key_with(control_api::keys::NewKey {
            allowed_cidrs: Some(vec!["10.0.0.0/8".into()]),
            ..Default::default()
        })
        .await;
    let r = post_as(h.addr, &elsewhere.key, CE, body.clone()).await;
    assert_eq!(r.status, 403, "address outside the allowlist: {}", r.body);
    assert!(r.body.contains("allowlist"));

    let here = h
        .key_with(control_api::keys::NewKey {
            allowed_cidrs: Some(vec!["127.0.0.0/8".into()]),
            rate_limit_rps: Some(1),
            ..Default::default()
        })
        .await;
    let first = post_as(h.addr, &here.key, CE, body.clone()).await;
    assert_eq!(first.status, 204, "allowlisted address: {}", first.body);
    let second = post_as(h.addr, &here.key, CE, body.clone()).await;
    assert_eq!(second.status, 429, "rate limit: {}", second.body);
    assert!(second.headers.contains_key("retry-after"));

    let revoked = h.key_with(Default::default()).await;
    assert!(control_api::keys::revoke_key(&h.db, h.tenant, revoked.id)
        .await
        .expect("revoke"));
    // A key-cache reload between the key's creation and its revocation may still hold it as
    // valid, up to the staleness bound (1 s in the harness): wait it out.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = post_as(h.addr, &revoked.key, CE, body.clone()).await;
    assert_eq!(r.status, 401, "revoked key");

    // Only the one allowlisted request above reached Kafka.
    let records = h.consume(2, Duration::from_secs(5));
    let events: usize = records.iter().map(|r| r.batch.events.len()).sum();
    assert_eq!(events, 1, "bad requests produced records: {records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_within_the_cache_bound() {
    let h = Harness::new().await;
    let k = h.key_with(Default::default()).await;
    let body = Bytes::from(event("r-1", "c").to_string());
    let r = post_as(h.addr, &k.key, CE, body.clone()).await;
    assert_eq!(r.status, 204);
    assert!(control_api::keys::revoke_key(&h.db, h.tenant, k.id)
        .await
        .expect("revoke"));
    // The harness sets the staleness bound to 1 s.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = post_as(h.addr, &k.key, CE, body).await;
    assert_eq!(r.status, 401, "{}", r.body);
}

fn batch(prefix: &str, n: usize) -> Bytes {
    let evs: Vec<_> = (0..n)
        .map(|i| event(&format!("{prefix}-{i}"), "q"))
        .collect();
    Bytes::from(serde_json::to_vec(&evs).expect("json"))
}

async fn month_count(h: &Harness, key: uuid::Uuid) -> i64 {
    h.db.query_opt(
        "SELECT events FROM api_key_usage WHERE key_id = $1
            AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date",
        &[&key],
    )
    .await
    .expect("usage")
    .map_or(0, |r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_event_quotas_are_enforced_and_counted_across_instances() {
    let h = Harness::new().await;
    let k = h
        .key_with(control_api::keys::NewKey {
            monthly_event_quota: Some(5),
            ..Default::default()
        })
        .await;
    assert_eq!(
        post_as(h.addr, &k.key, BATCH, batch("a", 3)).await.status,
        204
    );
    let over = post_as(h.addr, &k.key, BATCH, batch("b", 3)).await;
    assert_eq!(over.status, 429, "3 + 3 > 5: {}", over.body);
    assert!(over.body.contains("quota"), "{}", over.body);
    let wait: u64 = over.headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (1..=31 * 86_400).contains(&wait),
        "until next month: {wait}"
    );
    assert_eq!(
        post_as(h.addr, &k.key, BATCH, batch("c", 2)).await.status,
        204,
        "exactly 5"
    );
    assert_eq!(
        post_as(h.addr, &k.key, CE, Bytes::from(event("d", "q").to_string()))
            .await
            .status,
        429
    );
    // Counted in PostgreSQL at the next reload (the harness reloads every 0.5 s; waits leave room for a loaded machine).
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(
        month_count(&h, k.id).await,
        5,
        "refused events are not counted"
    );

    // Another instance's count (stored) is part of the total; a raised quota applies within
    // the cache bound.
    let other = h
        .key_with(control_api::keys::NewKey {
            monthly_event_quota: Some(10),
            ..Default::default()
        })
        .await;
    h.db.execute(
        "INSERT INTO api_key_usage (key_id, month, events)
         VALUES ($1, date_trunc('month', now() AT TIME ZONE 'UTC')::date, 9)",
        &[&other.id],
    )
    .await
    .expect("usage");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(
        post_as(h.addr, &other.key, BATCH, batch("e", 2))
            .await
            .status,
        429
    );
    assert_eq!(
        post_as(h.addr, &other.key, BATCH, batch("f", 1))
            .await
            .status,
        204
    );
    h.db.execute(
        "UPDATE api_keys SET monthly_event_quota = 20, updated_at = clock_timestamp() WHERE id = $1",
        &[&other.id],
    )
    .await
    .expect("raise");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(
        post_as(h.addr, &other.key, BATCH, batch("g", 2))
            .await
            .status,
        204
    );
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert_eq!(month_count(&h, other.id).await, 12);
    // Keys without a quota are counted too (shown as events_this_month in the control API).
    assert_eq!(
        h.post(CE, Bytes::from(event("h", "q").to_string()))
            .await
            .status,
        204
    );
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let plain: uuid::Uuid = h
        .db
        .query_one("SELECT id FROM api_keys WHERE monthly_event_quota IS NULL AND name = '' ORDER BY created_at LIMIT 1", &[])
        .await
        .expect("key")
        .get(0);
    assert!(month_count(&h, plain).await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_gives_503_never_2xx_and_resent_events_are_accepted_after_restart() {
    let mut broker = PrivateBroker::start();
    let h = Harness::on_broker(&broker.brokers(), 2, |c| {
        c.kafka.produce_timeout_ms = 2_000;
    })
    .await;
    let before: Vec<_> = (0..5).map(|i| event(&format!("up-{i}"), "c")).collect();
    assert_eq!(
        h.post(BATCH, serde_json::to_vec(&before).expect("json"))
            .await
            .status,
        204
    );

    broker.kill();
    let during: Vec<_> = (0..5)
        .map(|i| event(&format!("down-{i}"), &format!("c{i}")))
        .collect();
    let body = serde_json::to_vec(&during).expect("json");
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let r = h.post(BATCH, body.clone()).await;
        assert_eq!(
            r.status, 503,
            "broker down must not be acknowledged: {}",
            r.body
        );
        assert!(r.headers.contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "503 took {:?}",
            started.elapsed()
        );
    }

    broker.restart();
    let mut accepted = false;
    for _ in 0..30 {
        let r = h.post(BATCH, body.clone()).await;
        if r.status == 204 {
            accepted = true;
            break;
        }
        assert_eq!(r.status, 503, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        accepted,
        "resent events were never accepted after the broker restart"
    );
    let records = h.consume(10, Duration::from_secs(30));
    let mut ids: Vec<String> = records
        .iter()
        .flat_map(|r| r.batch.events.iter().map(|e| e.id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    let mut expected: Vec<String> = (0..5)
        .map(|i| format!("up-{i}"))
        .chain((0..5).map(|i| format!("down-{i}")))
        .collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "events acknowledged before the outage survived the broker restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_acknowledged_event() {
    let mut h = Harness::new().await;
    let addr = h.addr;
    let auth = format!("Bearer {}", h.key);
    // A fresh producer takes up to ~0.5 s to get its producer id; on a loaded machine that can
    // exceed the window below, so wait for one acknowledgement before the stream starts.
    let first = h.post(CE, event("warm-up", "c0").to_string()).await;
    assert_eq!(first.status, 204, "{}", first.body);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4 {
        let auth = auth.clone();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..200 {
                let id = format!("t{t}-{i}");
                let body = Bytes::from(event(&id, &format!("c{}", i % 9)).to_string());
                // The server may close its listener between any two requests: a refused or
                // unanswered request ends this stream (and was not acknowledged).
                let r = tokio::time::timeout(
                    Duration::from_secs(15),
                    try_send(
                        addr,
                        "POST",
                        "/api/v1/events",
                        &[("content-type", CE), ("authorization", &auth)],
                        body,
                    ),
                )
                .await;
                match r {
                    Ok(Some(r)) if r.status == 204 => acked.push(id),
                    _ => break,
                }
            }
            acked
        });
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.shutdown.cancel();
    let mut acked = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r.expect("task"));
    }
    h.running
        .take()
        .expect("running")
        .done
        .await
        .expect("drained");
    assert!(
        !acked.is_empty(),
        "no request was acknowledged before shutdown"
    );
    // The topic also holds the warm-up event and any event produced for a request whose answer
    // never arrived (shutdown closed the connection): read until every acknowledged id is seen
    // or nothing new arrives.
    let mut want = acked.len() + 1;
    let mut stored: std::collections::HashSet<String> = Default::default();
    for _ in 0..5 {
        let records = h.consume(want, Duration::from_secs(10));
        let seen = records.iter().map(|r| r.batch.events.len()).sum::<usize>();
        stored = records
            .iter()
            .flat_map(|r| r.batch.events.iter().map(|e| e.id.clone()))
            .collect();
        if acked.iter().all(|id| stored.contains(id)) || seen < want {
            break;
        }
        want = seen + 50;
    }
    for id in &acked {
        assert!(
            stored.contains(id),
            "acknowledged event {id} is not in Kafka"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_api_paths_go_to_control_api_and_ops_endpoints_answer() {
    // A stand-in upstream that echoes what it received.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = upstream.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap_or("").to_string());
                        let line = format!("{} {} {:?}", req.method(), req.uri(), auth);
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(201)
                                .body(http_body_util::Full::new(Bytes::from(line)))
                                .expect("response"),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let h = Harness::with(|c| c.control_api_url = format!("http://{up_addr}")).await;
    let r = send(
        h.addr,
        "POST",
        "/api/v1/meters?x=1",
        &[("authorization", "Bearer abc")],
        Bytes::from("{}"),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body, "POST /api/v1/meters?x=1 Some(\"Bearer abc\")");

    assert_eq!(
        send(h.addr, "GET", "/healthz", &[], Bytes::new())
            .await
            .status,
        200
    );
    let ready = send(h.addr, "GET", "/readyz", &[], Bytes::new()).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(h.post(CE, event("m-1", "c").to_string()).await.status, 204);
    let metrics = send(h.addr, "GET", "/metrics", &[], Bytes::new()).await;
    assert_eq!(metrics.status, 200);
    for name in [
        "ingest_requests_total",
        "ingest_events_total{outcome=\"accepted\"",
        "ingest_produce_latency_seconds",
        "ingest_record_events",
        "ingest_in_flight_events",
    ] {
        assert!(metrics.body.contains(name), "/metrics lacks {name}");
    }

    let down = Harness::with(|c| c.control_api_url = "http://127.0.0.1:1".into()).await;
    let r = send(down.addr, "GET", "/api/v1/meters", &[], Bytes::new()).await;
    assert_eq!(r.status, 502, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_records_and_each_is_acknowledged() {
    // A long linger makes the sharing certain: 40 requests inside one window.
    let h = Harness::with(|c| c.kafka.coalesce_linger_us = 300_000).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (addr, auth) = (h.addr, format!("Bearer {}", h.key));
        tasks.spawn(async move {
            let body = Bytes::from(event(&format!("c-{i}"), "same-subject").to_string());
            send(
                addr,
                "POST",
                "/api/v1/events",
                &[("content-type", CE), ("authorization", &auth)],
                body,
            )
            .await
            .status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), 204);
    }
    let records = h.consume(40, Duration::from_secs(30));
    let events: usize = records.iter().map(|r| r.batch.events.len()).sum();
    assert_eq!(events, 40);
    assert!(
        records.len() < 10,
        "40 concurrent requests took {} records",
        records.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_are_split_into_records_the_broker_takes() {
    // 3 000 events with 2 KB of data each, all on one subject: about 6 MB of records for one
    // partition, which must leave as several records under the size bound, compressed with zstd.
    let h = Harness::with(|c| {
        c.limits.max_body_bytes = 16 << 20;
        c.limits.max_decompressed_bytes = 16 << 20;
        c.kafka.record_max_bytes = 256 << 10;
        c.kafka.compression = "zstd".into();
    })
    .await;
    let pad = "p".repeat(2_000);
    let batch: Vec<_> = (0..3_000)
        .map(|i| {
            let mut e = event(&format!("big-{i}"), "one-subject");
            e["data"]["pad"] = pad.clone().into();
            e
        })
        .collect();
    let r = h
        .post(BATCH, serde_json::to_vec(&batch).expect("json"))
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let records = h.consume(3_000, Duration::from_secs(60));
    let events: usize = records.iter().map(|r| r.batch.events.len()).sum();
    assert_eq!(events, 3_000);
    assert!(records.len() >= 20, "only {} records", records.len());
    let mut ids: Vec<_> = records
        .iter()
        .flat_map(|r| r.batch.events.iter().map(|e| e.id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3_000);
}
