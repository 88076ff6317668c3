//! Shared harness of the ingest tests: a fresh database with a tenant and keys, a fresh topic on
//! the real broker, the service started in-process on port 0, a minimal HTTP client, and a
//! consumer that reads back what was produced.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schemas::proto::usage::v1::EventBatch;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct Harness {
    pub addr: SocketAddr,
    pub db_url: String,
    pub db: tokio_postgres::Client,
    pub tenant: uuid::Uuid,
    pub key: String,
    pub topic: String,
    pub brokers: String,
    pub shutdown: CancellationToken,
    pub running: Option<ingest::Running>,
}

pub async fn create_topic(brokers: &str, partitions: i32) -> String {
    let name = format!("ingest-test-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .expect("admin client");
    for r in admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic")
    {
        r.unwrap_or_else(|(t, e)| panic!("topic {t}: {e}"));
    }
    name
}

pub fn config(db_url: &str, brokers: &str, topic: &str) -> ingest::Config {
    let mut cfg = ingest::Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        database_url: db_url.to_string(),
        ..Default::default()
    };
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.topic = topic.to_string();
    cfg.auth.key_cache_staleness_ms = 1_000;
    cfg
}

impl Harness {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut ingest::Config)) -> Self {
        Self::on_broker(&schemas::testing::kafka_brokers(), 4, tweak).await
    }

    pub async fn on_broker(
        brokers: &str,
        partitions: i32,
        tweak: impl FnOnce(&mut ingest::Config),
    ) -> Self {
        let (db_url, db) = schemas::testing::fresh_database().await;
        let tenant = control_api::keys::create_tenant(&db, "acme")
            .await
            .expect("tenant");
        let key = control_api::keys::create_key(&db, tenant.id, Default::default())
            .await
            .expect("key")
            .key;
        let topic = create_topic(brokers, partitions).await;
        let mut cfg = config(&db_url, brokers, &topic);
        tweak(&mut cfg);
        let shutdown = CancellationToken::new();
        let running = ingest::start(cfg, shutdown.clone())
            .await
            .expect("ingest starts");
        Self {
            addr: running.addr,
            db_url,
            db,
            tenant: tenant.id,
            key,
            topic,
            brokers: brokers.to_string(),
            shutdown,
            running: Some(running),
        }
    }

    pub async fn key_with(&self, opts: control_api::keys::NewKey) -> control_api::keys::CreatedKey {
        control_api::keys::create_key(&self.db, self.tenant, opts)
            .await
            .expect("key")
    }

    pub async fn post(&self, content_type: &str, body: impl Into<Bytes>) -> Resp {
        let auth = format!("Bearer {}", self.key);
        send(
            self.addr,
            "POST",
            "/api/v1/events",
            &[("content-type", content_type), ("authorization", &auth)],
            body.into(),
        )
        .await
    }

    /// Every event produced to the topic so far, with its record's partition and key.
    pub fn consume(&self, expected_events: usize, wait: Duration) -> Vec<Consumed> {
        consume(&self.brokers, &self.topic, expected_events, wait)
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One HTTP/1.1 request on a new connection.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Resp {
    try_send(addr, method, path, headers, body)
        .await
        .expect("connect, send and read an answer")
}

/// [`send`], or `None` when the connection is refused or closed without an answer (a server
/// shutting down).
pub async fn try_send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Option<Resp> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).expect("request"))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub content_type: Option<String>,
    pub batch: EventBatch,
}

pub fn consume(
    brokers: &str,
    topic: &str,
    expected_events: usize,
    wait: Duration,
) -> Vec<Consumed> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let until = Instant::now() + wait;
    let mut out = Vec::new();
    let mut events = 0;
    while Instant::now() < until && (events < expected_events || expected_events == 0) {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.expect("consume");
            let batch =
                EventBatch::decode(m.payload().unwrap_or_default()).expect("decodable record");
            events += batch.events.len();
            let content_type = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == schemas::kafka::CONTENT_TYPE_HEADER)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            out.push(Consumed {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                content_type,
                batch,
            });
        }
    }
    out
}

pub fn event(id: &str, subject: &str) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "svc-llm", "type": "tokens",
        "subject": subject, "time": "2026-11-25T10:00:00.250Z",
        "data": {"model": "m1", "tokens": "12.5"}
    })
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// A private tansu broker (SQLite storage) on a free port, for tests that stop the broker.
pub struct PrivateBroker {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateBroker {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir =
            std::env::temp_dir().join(format!("tansu-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let mut b = Self {
            port,
            dir,
            child: None,
        };
        b.restart();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| "tansu".into());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(bin)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu on PATH (scripts/test.sh puts it there) or TANSU_BIN");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < until, "private tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `POST /api/v1/events` with `key` as the bearer token.
pub async fn post_as(addr: SocketAddr, key: &str, content_type: &str, body: Bytes) -> Resp {
    let auth = format!("Bearer {key}");
    send(
        addr,
        "POST",
        "/api/v1/events",
        &[("content-type", content_type), ("authorization", &auth)],
        body,
    )
    .await
}
