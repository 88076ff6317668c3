//! Local peers for delivery tests: an SMTP sink that keeps every message, and a webhook
//! receiver that answers with programmed statuses and keeps every request.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One message as the sink received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

impl Mail {
    /// The message with quoted-printable soft line breaks and `=3D` undone.
    pub fn text(&self) -> String {
        self.data.replace("=\r\n", "").replace("=3D", "=")
    }
}

/// A minimal SMTP server (EHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT) on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct SmtpSink {
    pub port: u16,
    pub mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let keep = mails.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let keep = keep.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                    let (mut from, mut to) = (String::new(), Vec::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let up = line.to_ascii_uppercase();
                        let reply: &[u8] = if up.starts_with("EHLO") || up.starts_with("HELO") {
                            b"250-sink\r\n250 8BITMIME\r\n"
                        } else if up.starts_with("MAIL FROM:") {
                            from = line[10..].trim().to_string();
                            b"250 ok\r\n"
                        } else if up.starts_with("RCPT TO:") {
                            to.push(line[8..].trim().to_string());
                            b"250 ok\r\n"
                        } else if up.starts_with("DATA") {
                            let _ = w.write_all(b"354 go ahead\r\n").await;
                            let mut data = String::new();
                            loop {
                                let mut l = String::new();
                                if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if l == ".\r\n" {
                                    break;
                                }
                                data.push_str(&l);
                            }
                            keep.lock().expect("lock").push(Mail {
                                from: std::mem::take(&mut from),
                                to: std::mem::take(&mut to),
                                data,
                            });
                            b"250 queued\r\n"
                        } else if up.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else {
                            b"250 ok\r\n"
                        };
                        if w.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SmtpSink { port, mails }
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().expect("lock").clone()
    }
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// An HTTP receiver on 127.0.0.1: the k-th request carrying a given `webhook-id` is answered
/// `script[k]` (200 past the end of the script), so every message meets the same failures.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub port: u16,
    pub hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    pub async fn start(script: &[u16]) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Vec<u16>> = Arc::new(script.to_vec());
        let (h, sc) = (hits.clone(), script.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (h, sc) = (h.clone(), sc.clone());
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    let mut first = String::new();
                    if r.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = first.split(' ').nth(1).unwrap_or("").to_string();
                    let mut headers = HashMap::new();
                    loop {
                        let mut l = String::new();
                        if r.read_line(&mut l).await.unwrap_or(0) == 0 || l == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let n: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0u8; n];
                    let _ = r.read_exact(&mut body).await;
                    let status = {
                        let mut all = h.lock().expect("lock");
                        let id = headers.get("webhook-id").cloned().unwrap_or_default();
                        let k = all
                            .iter()
                            .filter(|x: &&Hit| x.headers.get("webhook-id") == Some(&id))
                            .count();
                        all.push(Hit {
                            path,
                            headers,
                            body: String::from_utf8_lossy(&body).to_string(),
                        });
                        sc.get(k).copied().unwrap_or(200)
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = r.get_mut().write_all(resp.as_bytes()).await;
                });
            }
        });
        Receiver { port, hits }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }
}

/// Polls `f` every 100 ms until it yields `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
