//! The baseline of the ingest benchmarks: a bare hyper 1 HTTP/1 server on the same runtime
//! settings as ingest, that reads each request body whole and answers 204. Whatever ingest
//! achieves is reported as a ratio of this, measured in the same run.
//!
//! Usage: bare-hyper [PORT] (default 18090, 127.0.0.1 only).

use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(18090);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let _body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(
                    Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::<bytes::Bytes>::default())
                        .expect("static response"),
                )
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
