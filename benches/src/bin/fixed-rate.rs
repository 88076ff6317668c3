#![allow(clippy::float_arithmetic)] // a measurement tool: percentiles and rates, no money
//! Open-loop load generator: sends requests at a fixed arrival rate over a pool of keep-alive
//! connections and reports latency percentiles measured from each request's *scheduled* time,
//! so queueing behind a slow server counts (no coordinated omission). Lighter than k6, so that
//! on 2 cores the generator does not dominate the measurement. 127.0.0.1 targets only.
//!
//! fixed-rate URL RATE SECONDS CONNECTIONS BODY_FILE CONTENT_TYPE [BEARER_KEY]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Mutex};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 7 {
        eprintln!("usage: fixed-rate URL RATE SECONDS CONNECTIONS BODY_FILE CONTENT_TYPE [KEY]");
        std::process::exit(2);
    }
    let url: hyper::Uri = a[1].parse().expect("URL");
    let host = url.authority().expect("URL with host:port").to_string();
    assert!(
        host.starts_with("127.") || host.starts_with("localhost"),
        "local targets only"
    );
    let rate: u64 = a[2].parse().expect("RATE");
    let secs: u64 = a[3].parse().expect("SECONDS");
    let conns: usize = a[4].parse().expect("CONNECTIONS");
    let body = Bytes::from(std::fs::read(&a[5]).expect("BODY_FILE"));
    let ct = a[6].clone();
    let auth = a.get(7).map(|k| format!("Bearer {k}"));
    let total = rate * secs;

    let (tx, rx) = mpsc::channel::<Instant>(100_000);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (rx, host, body, ct, auth, path) = (
            rx.clone(),
            host.clone(),
            body.clone(),
            ct.clone(),
            auth.clone(),
            url.path().to_string(),
        );
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&host)
                .await
                .expect("connect");
            stream.set_nodelay(true).ok();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let (mut lat, mut bad) = (Vec::new(), 0u64);
            loop {
                let Some(scheduled) = rx.lock().await.recv().await else {
                    break;
                };
                let mut req = Request::post(path.as_str())
                    .header("host", host.as_str())
                    .header("content-type", ct.as_str());
                if let Some(a) = &auth {
                    req = req.header("authorization", a.as_str());
                }
                let resp = send
                    .send_request(req.body(Full::new(body.clone())).expect("request"))
                    .await;
                match resp {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.into_body().collect().await;
                        if !ok {
                            bad += 1;
                        }
                    }
                    Err(_) => bad += 1,
                }
                lat.push(scheduled.elapsed().as_micros() as u32);
            }
            (lat, bad)
        }));
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_nanos() * rate as u128) / 1_000_000_000) as u64;
        while sent < due.min(total) {
            let scheduled = start + Duration::from_nanos(sent * 1_000_000_000 / rate);
            if tx.send(scheduled).await.is_err() {
                break;
            }
            sent += 1;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    drop(tx);
    let (mut all, mut bad) = (Vec::new(), 0);
    for w in workers {
        let (l, b) = w.await.expect("worker");
        all.extend(l);
        bad += b;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: usize| {
        all.get((all.len() * p / 100).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "RESULT sent={} seconds={elapsed:.2} achieved_rps={:.0} non2xx={bad} p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(50),
        pct(99),
        all.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}
