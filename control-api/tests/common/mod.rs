//! A control API on a fresh database, a plain HTTP/1.1 client, and people and keys to call it with.
#![allow(dead_code)]

use control_api::crypto::ServerKey;
use control_api::http::Settings;
use control_api::keys::{create_key, create_tenant, NewKey};
use serde_json::{json, Value};
use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";

/// An answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub text: String,
    pub json: Value,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or("")
    }
}

/// Sends one request to `addr`; `auth` is a bearer credential or "".
pub async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Resp {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    if !auth.is_empty() {
        req.push_str(&format!("authorization: Bearer {auth}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, payload) = text.split_once("\r\n\r\n").expect("head");
    let status: u16 = head[9..12].parse().expect("status");
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<HashMap<_, _>>();
    let payload = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        dechunk(payload)
    } else {
        payload.to_string()
    };
    let json = serde_json::from_str(&payload).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        text: payload,
        json,
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// A running control API with two tenants.
pub struct Api {
    pub addr: std::net::SocketAddr,
    pub url: String,
    pub db: tokio_postgres::Client,
    pub key: ServerKey,
    pub a: Uuid,
    pub b: Uuid,
    _stop: tokio_util::sync::DropGuard,
}

impl Api {
    pub async fn start() -> Api {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Settings)) -> Api {
        let (url, db) = schemas::testing::fresh_database().await;
        let a = create_tenant(&db, "tenant a").await.expect("tenant").id;
        let b = create_tenant(&db, "tenant b").await.expect("tenant").id;
        let key = ServerKey::ephemeral();
        let mut settings = Settings::new(&url, key.clone());
        tune(&mut settings);
        let stop = CancellationToken::new();
        let run = control_api::http::start_with(
            "127.0.0.1:0".parse().expect("addr"),
            settings,
            stop.clone(),
        )
        .await
        .expect("control-api");
        Api {
            addr: run.addr,
            url,
            db,
            key,
            a,
            b,
            _stop: stop.drop_guard(),
        }
    }

    /// Stops this server (its workers too) and starts another on the same database and key.
    pub async fn restart(self, tune: impl FnOnce(&mut Settings)) -> Api {
        let Api {
            url,
            db,
            key,
            a,
            b,
            _stop,
            ..
        } = self;
        drop(_stop);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut settings = Settings::new(&url, key.clone());
        tune(&mut settings);
        let stop = CancellationToken::new();
        let run = control_api::http::start_with(
            "127.0.0.1:0".parse().expect("addr"),
            settings,
            stop.clone(),
        )
        .await
        .expect("control-api");
        Api {
            addr: run.addr,
            url,
            db,
            key,
            a,
            b,
            _stop: stop.drop_guard(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, auth: &str, body: Option<Value>) -> Resp {
        send(self.addr, method, path, auth, &[], body.as_ref()).await
    }

    pub async fn call_h(
        &self,
        method: &str,
        path: &str,
        auth: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Resp {
        send(self.addr, method, path, auth, headers, body.as_ref()).await
    }

    /// A user with [`PASSWORD`]; returns their id.
    pub async fn user(&self, tenant: Uuid, email: &str, role: &str) -> Uuid {
        let mut db = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .map(|(c, conn)| {
                tokio::spawn(conn);
                c
            })
            .expect("db");
        let tx = db.transaction().await.expect("tx");
        let (u, _) = control_api::identity::create_user_in(
            &tx,
            &self.key,
            std::time::Duration::from_secs(3600),
            tenant,
            control_api::identity::NewUser {
                email: email.into(),
                name: "Test".into(),
                role: role.into(),
                password: Some(PASSWORD.into()),
            },
        )
        .await
        .expect("user");
        tx.commit().await.expect("commit");
        u["id"].as_str().expect("id").parse().expect("uuid")
    }

    /// Signs in; the whole answer (tokens).
    pub async fn login(&self, email: &str, password: &str) -> Resp {
        self.call(
            "POST",
            "/api/v1/auth/login",
            "",
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    /// An access token for a new user of `role` in `tenant`.
    pub async fn person(&self, tenant: Uuid, email: &str, role: &str) -> String {
        self.user(tenant, email, role).await;
        let r = self.login(email, PASSWORD).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json["access_token"].as_str().expect("token").to_string()
    }

    pub async fn api_key(&self, tenant: Uuid, scopes: &[&str]) -> String {
        create_key(
            &self.db,
            tenant,
            NewKey {
                name: "test".into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
        .expect("key")
        .key
    }

    /// The payloads of the outbox, opened with the server key, oldest first.
    pub async fn outbox(&self, kind: &str) -> Vec<Value> {
        self.db
            .query(
                "SELECT payload_sealed FROM notification_outbox WHERE kind = $1 ORDER BY id",
                &[&kind],
            )
            .await
            .expect("outbox")
            .iter()
            .map(|r| {
                let sealed: Vec<u8> = r.get(0);
                let plain = self.key.open(&sealed).expect("opens with the server key");
                serde_json::from_slice(&plain).expect("json")
            })
            .collect()
    }
}

pub mod billing;
pub mod sinks;
