#![allow(clippy::float_arithmetic)] // a measurement tool: rates, no money
//! Aggregator benchmark helper (127.0.0.1 only). Subcommands, each printing one `RESULT` line:
//!
//! - `fill BROKERS TOPIC TENANT EVENTS`: the bare broker's produce rate. Produces EVENTS unique
//!   events packed like ingest packs them (`usage.v1.EventBatch`, 500 events per record,
//!   acks=all, idempotent) straight to the topic.
//! - `drain BROKERS TOPIC EVENTS`: the bare broker's consume rate: reads the topic from the start
//!   and decodes records until EVENTS events were seen (`AGG_BENCH_CONSUMER="k=v,…"` adds
//!   librdkafka settings).
//! - `post URL KEY EVENTS BATCH CONCURRENCY`: posts EVENTS unique events through ingest in
//!   batches, CONCURRENCY requests at a time.
//! - `produce-loop BROKERS TOPIC TENANT CONCURRENCY SECONDS SUBJECTS`: the bare broker under
//!   the closed loop the ingest bench puts on ingest: CONCURRENCY clients, each producing one
//!   one-event record (acks=all, idempotent, linger 0, keyed by tenant + subject over SUBJECTS
//!   subjects, murmur2) and waiting for its acknowledgement before the next, for SECONDS.
//! - `wait DATABASE_URL TENANT EVENTS`: polls PostgreSQL until EVENTS events of TENANT are
//!   accounted for by the aggregator; prints the seconds since it started.

use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, FutureProducer, FutureRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schemas::proto::usage::v1::{EventBatch, UsageEvent};
use std::time::{Duration, Instant};

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn data(i: u64) -> String {
    format!(
        r#"{{"tokens":{},"model":"m{}","user":"u{}"}}"#,
        i % 1000,
        i % 4,
        i % 5000
    )
}

/// A UUID-shaped event id, unique per (run, k) and spread like the random ids clients send
/// (sequential ids would make the dedup index's inserts unrealistically local).
fn event_id(run: i64, k: u64) -> String {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let hi = mix((run as u64).wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let lo = mix(hi ^ k);
    let v = (u128::from(hi) << 64) | u128::from(lo);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn local(brokers: &str) {
    assert!(brokers.starts_with("127."), "local targets only");
}

/// A record of no events, produced before the clock starts (see `fill`).
fn warm_up_record(tenant: &str) -> Vec<u8> {
    EventBatch {
        tenant_id: tenant.to_string(),
        request_id: "bench-warm-up".into(),
        received_unix_nanos: now_nanos(),
        events: Vec::new(),
    }
    .encode_to_vec()
}

/// The headers ingest puts on every record.
fn batch_headers() -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: schemas::kafka::CONTENT_TYPE_HEADER,
        value: Some(schemas::kafka::EVENT_BATCH_V1),
    })
}

async fn produce_loop(
    brokers: &str,
    topic: &str,
    tenant: &str,
    concurrency: u64,
    seconds: u64,
    subjects: u64,
) {
    local(brokers);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("partitioner", "murmur2")
        .create()
        .expect("producer");
    // Not timed: the producer id (see `fill`) and the topic's metadata.
    let warm = warm_up_record(tenant);
    producer
        .send(
            FutureRecord::<(), _>::to(topic)
                .partition(0)
                .payload(&warm)
                .headers(batch_headers()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("warm-up record");
    let run = now_nanos();
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (producer, next) = (producer.clone(), next.clone());
        let (topic, tenant) = (topic.to_string(), tenant.to_string());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while Instant::now() < until {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let subject = format!("cust-{}", k % subjects.max(1));
                let received = now_nanos();
                let payload = EventBatch {
                    tenant_id: tenant.clone(),
                    request_id: format!("loop-{k}"),
                    received_unix_nanos: received,
                    events: vec![UsageEvent {
                        id: event_id(run, k),
                        source: "bench".into(),
                        r#type: "prompt".into(),
                        subject: subject.clone(),
                        time_unix_nanos: received,
                        data_json: data(k).into_bytes().into(),
                    }],
                }
                .encode_to_vec();
                let key = schemas::kafka::record_key(&tenant, &subject);
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&payload)
                            .headers(batch_headers()),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .expect("produce");
                done += 1;
            }
            done
        }));
    }
    let mut records = 0;
    for t in tasks {
        records += t.await.expect("task");
    }
    let s = started.elapsed().as_secs_f64();
    println!(
        "RESULT records_per_s={:.0} seconds={s:.2} records={records}",
        records as f64 / s
    );
}

fn fill(brokers: &str, topic: &str, tenant: &str, events: u64) {
    local(brokers);
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "100000")
        .create()
        .expect("producer");
    let md = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let parts = md.topics()[0].partitions().len() as u64;
    assert!(parts > 0, "topic {topic} has no partitions");
    // Not timed: an idempotent producer first acquires its producer id (librdkafka's timer:
    // up to ~0.5 s), which made this baseline bimodal (0.38 M or 1.2 M events/s). One record
    // of no events, flushed, pays that before the clock starts.
    let headers = batch_headers();
    let warm = warm_up_record(tenant);
    producer
        .send(
            BaseRecord::<(), _>::to(topic)
                .partition(0)
                .payload(&warm)
                .headers(headers.clone()),
        )
        .map_err(|(e, _)| e)
        .expect("warm-up record");
    producer
        .flush(Duration::from_secs(30))
        .expect("warm-up flush");
    let started = Instant::now();
    let per = 500u64;
    let mut i = 0u64;
    let mut record = 0u64;
    while i < events {
        let n = per.min(events - i);
        let received = now_nanos();
        let batch = EventBatch {
            tenant_id: tenant.to_string(),
            request_id: format!("bench-{record}"),
            received_unix_nanos: received,
            events: (i..i + n)
                .map(|k| UsageEvent {
                    id: event_id(0, k),
                    source: "bench".into(),
                    r#type: "prompt".into(),
                    subject: format!("cust-{}", k % 100),
                    time_unix_nanos: received - (k % 1000) as i64 * 1_000_000,
                    data_json: data(k).into_bytes().into(),
                })
                .collect(),
        };
        let payload = batch.encode_to_vec();
        let partition = (record % parts) as i32;
        let mut rec = BaseRecord::<(), _>::to(topic)
            .partition(partition)
            .payload(&payload)
            .headers(headers.clone());
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        i += n;
        record += 1;
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    let s = started.elapsed().as_secs_f64();
    println!(
        "RESULT produce_eps={:.0} seconds={s:.2} records={record}",
        events as f64 / s
    );
}

fn drain(brokers: &str, topic: &str, events: u64) {
    local(brokers);
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", "agg-bench-drain")
        .set("enable.auto.commit", "false")
        // tansu answers a fetch only when fetch.wait.max.ms has passed, even with data ready:
        // librdkafka's default (500 ms) held this baseline at ~183 k events/s, 10 ms gives
        // ~1.6 M (measured 2026-12-07: 1 / 5 / 10 / 50 / 500 ms → 1.5 / 1.8 / 1.6 / 0.84 /
        // 0.18 M events/s).
        .set("fetch.wait.max.ms", "10");
    // AGG_BENCH_CONSUMER="key=value,…": extra librdkafka settings (fetch tuning experiments).
    for kv in std::env::var("AGG_BENCH_CONSUMER")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((k, v)) = kv.split_once('=') {
            cc.set(k.trim(), v.trim());
        }
    }
    let c: BaseConsumer = cc.create().expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < events {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "drain stuck at {seen}"
        );
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let b = EventBatch::decode(m.payload().unwrap_or_default()).expect("batch");
            seen += b.events.len() as u64;
        }
    }
    let s = started.elapsed().as_secs_f64();
    println!("RESULT consume_eps={:.0} seconds={s:.2}", events as f64 / s);
}

async fn post(url: &str, key: &str, events: u64, batch: u64, concurrency: u64) {
    let uri: hyper::Uri = url.parse().expect("URL");
    let host = uri.authority().expect("host").to_string();
    assert!(host.starts_with("127."), "local targets only");
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    let run = now_nanos();
    for _ in 0..concurrency {
        let (next, host, key) = (next.clone(), host.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&host).await.expect("connect");
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            let mut retries = 0u64;
            loop {
                let start = next.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
                if start >= events {
                    return retries;
                }
                let n = batch.min(events - start);
                let time = chrono_like(now_nanos());
                let mut body = String::with_capacity((n as usize) * 200);
                body.push('[');
                for k in start..start + n {
                    if k > start {
                        body.push(',');
                    }
                    body.push_str(&format!(
                        r#"{{"specversion":"1.0","id":"{}","source":"bench","type":"prompt","subject":"cust-{}","time":"{time}","data":{}}}"#,
                        event_id(run, k),
                        k % 100,
                        data(k)
                    ));
                }
                body.push(']');
                let body = bytes::Bytes::from(body);
                loop {
                    let req = hyper::Request::post("/api/v1/events")
                        .header("host", &host)
                        .header("content-type", "application/cloudevents-batch+json")
                        .header("authorization", format!("Bearer {key}"))
                        .body(http_body_util::Full::new(body.clone()))
                        .expect("request");
                    let resp = tx.send_request(req).await.expect("response");
                    let status = resp.status().as_u16();
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                    if status == 204 {
                        break;
                    }
                    assert!(status == 503 || status == 429, "ingest answered {status}");
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.expect("task");
    }
    let s = started.elapsed().as_secs_f64();
    println!(
        "RESULT post_eps={:.0} seconds={s:.2} retries={retries}",
        events as f64 / s
    );
}

/// RFC 3339 UTC with milliseconds.
fn chrono_like(nanos: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn wait(db_url: &str, tenant: &str, events: i64) {
    let (db, conn) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let tenant: uuid::Uuid = tenant.parse().expect("tenant uuid");
    let started = Instant::now();
    loop {
        let n: i64 = db
            .query_one(
                "SELECT coalesce(sum(events), 0)::int8 FROM event_outcomes WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .expect("query")
            .get(0);
        if n >= events {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "stuck at {n} of {events}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("RESULT seconds={:.3}", started.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<u64>().expect("number argument");
    match arg(1).as_str() {
        "fill" => {
            let (b, t, ten, n) = (arg(2), arg(3), arg(4), num(5));
            tokio::task::spawn_blocking(move || fill(&b, &t, &ten, n))
                .await
                .expect("fill")
        }
        "drain" => {
            let (b, t, n) = (arg(2), arg(3), num(4));
            tokio::task::spawn_blocking(move || drain(&b, &t, n))
                .await
                .expect("drain")
        }
        "post" => post(&arg(2), &arg(3), num(4), num(5), num(6)).await,
        "produce-loop" => {
            let subjects = num(7);
            produce_loop(&arg(2), &arg(3), &arg(4), num(5), num(6), subjects).await
        }
        "wait" => wait(&arg(2), &arg(3), num(4) as i64).await,
        _ => {
            eprintln!("usage: agg-bench fill|drain|produce-loop|post|wait ... (see the source's doc comment)");
            std::process::exit(2);
        }
    }
}
