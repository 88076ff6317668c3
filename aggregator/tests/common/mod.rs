//! Harness of the pipeline tests: a fresh database with a tenant and a key, a fresh topic on the
//! real broker, ingest and control-api in-process on port 0, and aggregators either in-process
//! or as child processes (to SIGKILL them).
#![allow(dead_code)]

pub mod gen;

#[path = "../../../ingest/tests/common/mod.rs"]
pub mod edge;

use bytes::Bytes;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use edge::{send, Resp};

pub struct Pipeline {
    pub db_url: String,
    pub db: tokio_postgres::Client,
    pub tenant: Uuid,
    pub key: String,
    pub topic: String,
    pub brokers: String,
    pub ingest: SocketAddr,
    pub api: SocketAddr,
    pub shutdown: CancellationToken,
}

impl Pipeline {
    pub async fn new(partitions: i32) -> Self {
        Self::on_broker(&schemas::testing::kafka_brokers(), partitions).await
    }

    pub async fn on_broker(brokers: &str, partitions: i32) -> Self {
        let (db_url, db) = schemas::testing::fresh_database().await;
        Self::on(brokers, partitions, db_url, db).await
    }

    /// On the given broker and (migrated) database.
    pub async fn on(
        brokers: &str,
        partitions: i32,
        db_url: String,
        db: tokio_postgres::Client,
    ) -> Self {
        let tenant = control_api::keys::create_tenant(&db, "acme")
            .await
            .expect("tenant");
        let key = control_api::keys::create_key(
            &db,
            tenant.id,
            control_api::keys::NewKey {
                scopes: vec!["ingest".into(), "read".into(), "admin".into()],
                ..Default::default()
            },
        )
        .await
        .expect("key")
        .key;
        let topic = edge::create_topic(brokers, partitions).await;
        let shutdown = CancellationToken::new();
        let api = control_api::http::start(
            "127.0.0.1:0".parse().expect("addr"),
            &db_url,
            shutdown.clone(),
        )
        .await
        .expect("control-api starts");
        let mut cfg = edge::config(&db_url, brokers, &topic);
        cfg.control_api_url = format!("http://{}", api.addr);
        let ingest = ingest::start(cfg, shutdown.clone())
            .await
            .expect("ingest starts");
        Pipeline {
            db_url,
            db,
            tenant: tenant.id,
            key,
            topic,
            brokers: brokers.to_string(),
            ingest: ingest.addr,
            api: api.addr,
            shutdown,
        }
    }

    /// Another tenant with its own key (scopes ingest, read, admin).
    pub async fn other_tenant(&self) -> (Uuid, String) {
        let t = control_api::keys::create_tenant(&self.db, "other")
            .await
            .expect("tenant");
        let k = control_api::keys::create_key(
            &self.db,
            t.id,
            control_api::keys::NewKey {
                scopes: vec!["ingest".into(), "read".into(), "admin".into()],
                ..Default::default()
            },
        )
        .await
        .expect("key");
        (t.id, k.key)
    }

    pub fn aggregator_config(&self, member: &str) -> aggregator::Config {
        let mut cfg = aggregator::Config {
            database_url: self.db_url.clone(),
            member: member.to_string(),
            metrics_listen: "127.0.0.1:0".parse().expect("addr"),
            ..Default::default()
        };
        cfg.kafka.brokers = self.brokers.clone();
        cfg.kafka.topic = self.topic.clone();
        cfg.flush.interval_ms = 100;
        cfg.lease.tick_ms = 200;
        cfg.lease.ttl_ms = 2_000;
        cfg.meters_refresh_ms = 200;
        cfg
    }

    /// An aggregator in this process; cancel the token to stop it cleanly.
    pub fn spawn_aggregator(
        &self,
        member: &str,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let cfg = self.aggregator_config(member);
        let stop = CancellationToken::new();
        let s = stop.clone();
        let h = tokio::spawn(async move {
            aggregator::run(cfg, s).await.expect("aggregator runs");
        });
        (stop, h)
    }

    /// An aggregator as a child process (SIGKILL-able), configured through its environment.
    pub fn child_aggregator(&self, member: &str) -> std::process::Child {
        self.child_aggregator_with(member, &[])
    }

    /// As [`Self::child_aggregator`], with extra `AGGREGATOR_*` settings.
    pub fn child_aggregator_with(
        &self,
        member: &str,
        extra: &[(&str, &str)],
    ) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .arg("serve")
            .env("AGGREGATOR_DATABASE_URL", &self.db_url)
            .env("AGGREGATOR_MEMBER", member)
            .env("AGGREGATOR_KAFKA__BROKERS", &self.brokers)
            .env("AGGREGATOR_KAFKA__TOPIC", &self.topic)
            .env("AGGREGATOR_METRICS_LISTEN", "127.0.0.1:0")
            .env("AGGREGATOR_FLUSH__INTERVAL_MS", "100")
            .env("AGGREGATOR_FLUSH__MAX_EVENTS", "2000")
            .env("AGGREGATOR_LEASE__TICK_MS", "200")
            .env("AGGREGATOR_LEASE__TTL_MS", "2000")
            .env("AGGREGATOR_METERS_REFRESH_MS", "200")
            .env("RUST_LOG", "warn")
            .envs(extra.iter().copied())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("aggregator binary")
    }

    pub async fn api(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<serde_json::Value>,
    ) -> Resp {
        let auth = format!("Bearer {key}");
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        send(
            self.api,
            method,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            body,
        )
        .await
    }

    pub async fn create_meter(&self, meter: serde_json::Value) -> serde_json::Value {
        let r = self
            .api("POST", "/api/v1/meters", &self.key, Some(meter))
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()
    }

    /// Posts events (a JSON array) through ingest until it answers 204 (it may answer 503 while
    /// the broker is away; the same events are then sent again, which dedup absorbs).
    pub async fn post_events(&self, key: &str, events: &[serde_json::Value]) {
        let body = Bytes::from(serde_json::to_vec(events).expect("json"));
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let r = edge::post_as(
                self.ingest,
                key,
                "application/cloudevents-batch+json",
                body.clone(),
            )
            .await;
            if r.status == 204 {
                return;
            }
            assert!(
                matches!(r.status, 429 | 503),
                "ingest answered {}: {}",
                r.status,
                r.body
            );
            assert!(
                Instant::now() < until,
                "ingest kept refusing: {} {}",
                r.status,
                r.body
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn query(&self, slug: &str, params: &str) -> serde_json::Value {
        let r = self
            .api(
                "GET",
                &format!("/api/v1/meters/{slug}/query?{params}"),
                &self.key,
                None,
            )
            .await;
        assert_eq!(r.status, 200, "query {slug}?{params}: {}", r.body);
        r.json()
    }

    /// Events accounted for (all outcomes) for `tenant`.
    pub async fn accounted(&self, tenant: Uuid) -> i64 {
        self.db
            .query_one(
                "SELECT coalesce(sum(events), 0)::int8 FROM event_outcomes WHERE tenant_id = $1",
                &[&tenant],
            )
            .await
            .expect("outcomes")
            .get(0)
    }

    /// Waits until `expected` events of `tenant` are accounted for (and fails if more are).
    pub async fn wait_accounted(&self, tenant: Uuid, expected: i64, within: Duration) {
        let until = Instant::now() + within;
        loop {
            let n = self.accounted(tenant).await;
            assert!(
                n <= expected,
                "{n} events accounted for, only {expected} sent"
            );
            if n == expected {
                return;
            }
            assert!(
                Instant::now() < until,
                "only {n} of {expected} events accounted for"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn outcomes(&self, tenant: Uuid) -> std::collections::BTreeMap<String, i64> {
        self.db
            .query(
                "SELECT outcome || CASE WHEN reason = '' THEN '' ELSE ':' || reason END, sum(events)::int8
                   FROM event_outcomes WHERE tenant_id = $1 GROUP BY 1",
                &[&tenant],
            )
            .await
            .expect("outcomes")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
}

pub fn event(
    id: &str,
    ty: &str,
    subject: &str,
    time: &str,
    data: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "test", "type": ty,
        "subject": subject, "time": time, "data": data,
    })
}

pub fn kill9(child: &mut std::process::Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

pub fn sigterm(child: &mut std::process::Child) {
    // The workspace forbids unsafe code, so no libc::kill: the `kill` command sends the signal.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// A PostgreSQL server of the test's own (initdb into a temporary folder, a free port), so that
/// it can be restarted — even crashed with `pg_ctl -m immediate` — without touching the
/// machine's shared server. Binaries from `PG_BIN` or /usr/lib/postgresql/<version>/bin.
pub struct PrivatePostgres {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    fn pg_bin() -> std::path::PathBuf {
        if let Ok(b) = std::env::var("PG_BIN") {
            return b.into();
        }
        let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL binaries under /usr/lib/postgresql (or set PG_BIN)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .collect();
        found.sort();
        found
            .pop()
            .expect("an initdb under /usr/lib/postgresql/*/bin")
    }

    /// Runs a PostgreSQL tool as the `postgres` user when this process is root (initdb and the
    /// server refuse root), directly otherwise.
    fn run(&self, tool: &str, args: &[&str]) {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let exe = self.bin.join(tool);
        let status = if root {
            // runuser lives in /usr/sbin or /sbin, which a minimal PATH (CI) may lack.
            let runuser = ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or("runuser");
            std::process::Command::new(runuser)
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
        } else {
            std::process::Command::new(&exe)
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
        }
        .expect("PostgreSQL tool runs");
        assert!(status.success(), "{tool} {args:?} failed");
    }

    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = std::env::temp_dir().join(format!("pg-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status();
        let pg = PrivatePostgres {
            port,
            dir,
            bin: Self::pg_bin(),
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        pg.ctl_start();
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn ctl_start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.to_string_lossy()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Crash (no checkpoint, like a power cut for the server process) and start again.
    pub fn crash_and_restart(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        self.ctl_start();
    }

    /// A migrated database on this server.
    pub async fn database(&self) -> (String, tokio_postgres::Client) {
        let admin = schemas::testing::connect(&self.url("postgres")).await;
        admin
            .batch_execute("CREATE DATABASE metering")
            .await
            .expect("create database");
        let url = self.url("metering");
        let mut db = schemas::testing::connect(&url).await;
        schemas::migrate::run(&mut db).await.expect("migrate");
        (url, db)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
        }));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
