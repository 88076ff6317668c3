//! Forwarding of `/api/*` paths other than the event endpoint to control-api, so that an
//! OpenMeter SDK pointed at the ingest address can also manage meters and run queries. The
//! request (method, path, query, headers, body up to the body limit) goes through unchanged;
//! control-api authenticates it.

use crate::server::{problem, Body, State};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// Largest upstream answer passed back (meter queries over long ranges can be large).
const MAX_UPSTREAM_BODY: usize = 64 << 20;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
];

#[derive(Debug, Clone)]
pub struct Upstream {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Upstream {
    pub fn new(base: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        Self {
            base: base.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

pub async fn forward(state: &State, req: Request<Incoming>) -> Response<Body> {
    let up = &state.upstream;
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(uri) = format!("{}{pq}", up.base).parse::<Uri>() else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad request",
            "invalid request path",
            &[],
        );
    };
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.cfg.limits.max_body_bytes)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload too large",
                &format!(
                    "body is over the limit of {} bytes",
                    state.cfg.limits.max_body_bytes
                ),
                &[],
            )
        }
    };
    let mut builder = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            builder = builder.header(name, value);
        }
    }
    let Ok(out) = builder.body(Full::new(body)) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad request",
            "invalid request headers",
            &[],
        );
    };
    let resp = match tokio::time::timeout(UPSTREAM_TIMEOUT, up.client.request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, upstream = %up.base, "control-api unreachable");
            return problem(
                StatusCode::BAD_GATEWAY,
                "bad gateway",
                "control-api is unreachable; retry later",
                &[],
            );
        }
        Err(_) => {
            return problem(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway timeout",
                "control-api did not answer in time",
                &[],
            )
        }
    };
    let (parts, body) = resp.into_parts();
    let body = match Limited::new(body, MAX_UPSTREAM_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return problem(
                StatusCode::BAD_GATEWAY,
                "bad gateway",
                "control-api's answer was too large or broken",
                &[],
            )
        }
    };
    let mut r = Response::from_parts(parts, Full::new(body));
    for h in HOP_BY_HOP {
        r.headers_mut().remove(*h);
    }
    r
}
