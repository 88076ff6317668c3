//! The HTTP server: `POST /api/v1/events`, `/healthz`, `/readyz`, `/metrics`, and the
//! forwarding of every other `/api/v1/*` path to control-api (one base URL for OpenMeter SDKs).
//!
//! Order of checks on the event path, cheapest first and nothing produced unless all pass:
//! method → content type → credentials (key, scope, address, request rate) → body size →
//! decompression bound → decoding and validation of every event → event rate → produce, and
//! 204 only once the broker acknowledged every record.

use crate::auth::{Admission, KeyCache, KeyEntry, SCOPE_INGEST};
use crate::config::Config;
use crate::event::{decode, BodyError, BodyFormat, DecodeLimits, Problem};
use crate::metrics::{self as m, Reject};
use crate::producer::{ProduceOutcome, Producer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type Body = Full<Bytes>;

/// What every request handler shares.
pub struct State {
    pub cfg: Config,
    pub keys: Arc<KeyCache>,
    pub producer: Arc<Producer>,
    pub prometheus: PrometheusHandle,
    pub upstream: crate::proxy::Upstream,
    request_seq: AtomicU64,
    instance: String,
    ready_cache: parking_lot::Mutex<Option<(Instant, bool)>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("listen", &self.cfg.listen)
            .finish()
    }
}

impl State {
    pub fn new(
        cfg: Config,
        keys: Arc<KeyCache>,
        producer: Arc<Producer>,
        prometheus: PrometheusHandle,
    ) -> Self {
        let upstream = crate::proxy::Upstream::new(&cfg.control_api_url);
        Self {
            cfg,
            keys,
            producer,
            prometheus,
            upstream,
            request_seq: AtomicU64::new(0),
            instance: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            ready_cache: parking_lot::Mutex::new(None),
        }
    }

    fn request_id(&self) -> String {
        format!(
            "{}-{}",
            self.instance,
            self.request_seq.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Routes one request. Never fails: every error is an HTTP answer.
pub async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path();
    let resp = if path == "/api/v1/events" {
        events(&state, peer, req).await
    } else if path == "/healthz" {
        text(StatusCode::OK, "ok")
    } else if path == "/readyz" {
        ready(&state).await
    } else if path == "/metrics" {
        m::set_in_flight(state.producer.in_flight());
        let mut r = text(StatusCode::OK, &state.prometheus.render());
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    } else if path.starts_with("/api/") {
        crate::proxy::forward(&state, req).await
    } else {
        problem(
            StatusCode::NOT_FOUND,
            "not found",
            &format!("no route for {path}"),
            &[],
        )
    };
    m::record_request(resp.status().as_u16());
    Ok(resp)
}

async fn ready(state: &State) -> Response<Body> {
    let cached = *state.ready_cache.lock();
    let broker = match cached {
        Some((at, ok)) if at.elapsed() < Duration::from_secs(1) => ok,
        _ => {
            let ok = state
                .producer
                .broker_reachable(Duration::from_millis(1500))
                .await;
            *state.ready_cache.lock() = Some((Instant::now(), ok));
            ok
        }
    };
    let keys = state.keys.is_ready();
    let body = serde_json::json!({"broker": broker, "key_cache": keys}).to_string();
    let status = if broker && keys {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body)
}

fn client_ip(state: &State, peer: SocketAddr, req: &Request<Incoming>) -> IpAddr {
    if state.cfg.auth.trust_forwarded_for {
        if let Some(ip) = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            return ip;
        }
    }
    peer.ip().to_canonical()
}

async fn events(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        let mut r = problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "use POST for /api/v1/events",
            &[],
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("POST"));
        return r;
    }
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(format) = BodyFormat::from_content_type(ct) else {
        m::record_rejected(Reject::UnsupportedMediaType, 1);
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported media type",
            &format!(
                "Content-Type {ct:?} is not accepted; use application/cloudevents+json, \
                 application/cloudevents-batch+json or application/x-ndjson"
            ),
            &[],
        );
    };
    let gzip = match req.headers().get(CONTENT_ENCODING).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) if v.eq_ignore_ascii_case("gzip") => true,
        Some(Ok(v)) if v.eq_ignore_ascii_case("identity") => false,
        Some(v) => {
            m::record_rejected(Reject::UnsupportedMediaType, 1);
            return problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported content encoding",
                &format!(
                    "Content-Encoding {:?} is not accepted; use gzip or none",
                    v.unwrap_or("?")
                ),
                &[],
            );
        }
    };
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let ip = client_ip(state, peer, &req);
    let key = match state.keys.admit(auth, ip, SCOPE_INGEST).await {
        Admission::Allowed(k) => k,
        Admission::Unauthenticated(why) => {
            m::record_rejected(Reject::Unauthenticated, 1);
            let mut r = problem(StatusCode::UNAUTHORIZED, "unauthorized", why, &[]);
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return r;
        }
        Admission::Forbidden(why) => {
            m::record_rejected(Reject::Forbidden, 1);
            return problem(StatusCode::FORBIDDEN, "forbidden", &why, &[]);
        }
        Admission::RateLimited {
            retry_after_secs,
            what,
        } => {
            m::record_rejected(Reject::RateLimited, 1);
            return retry(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded",
                &format!("this API key is over its {what} limit"),
                retry_after_secs,
            );
        }
        Admission::Unavailable => {
            m::record_rejected(Reject::Overloaded, 1);
            return retry(
                StatusCode::SERVICE_UNAVAILABLE,
                "key store unavailable",
                "API keys cannot be verified right now",
                state.cfg.limits.retry_after_secs,
            );
        }
    };
    let limits = &state.cfg.limits;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        m::record_rejected(Reject::TooLarge, 1);
        return too_large(&format!(
            "body of {} bytes is over the limit of {} bytes",
            declared.unwrap_or(0),
            limits.max_body_bytes
        ));
    }
    let body = Limited::new(req.into_body(), limits.max_body_bytes);
    let read = tokio::time::timeout(
        Duration::from_millis(limits.body_read_timeout_ms),
        body.collect(),
    )
    .await;
    let raw = match read {
        Err(_) => {
            return problem(
                StatusCode::REQUEST_TIMEOUT,
                "request timeout",
                "the body did not arrive in time",
                &[],
            )
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            m::record_rejected(Reject::TooLarge, 1);
            return too_large(&format!(
                "body is over the limit of {} bytes",
                limits.max_body_bytes
            ));
        }
        Ok(Err(e)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "bad request",
                &format!("cannot read the body: {e}"),
                &[],
            )
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    m::record_bytes(raw.len());
    let body: Bytes = if gzip {
        match gunzip(&raw, limits.max_decompressed_bytes) {
            Ok(b) => b.into(),
            Err(GunzipError::TooLarge) => {
                m::record_rejected(Reject::TooLarge, 1);
                return too_large(&format!(
                    "decompressed body is over the limit of {} bytes",
                    limits.max_decompressed_bytes
                ));
            }
            Err(GunzipError::Corrupt(e)) => {
                m::record_rejected(Reject::Invalid, 1);
                return problem(
                    StatusCode::BAD_REQUEST,
                    "bad request",
                    &format!("body is not valid gzip: {e}"),
                    &[],
                );
            }
        }
    } else {
        raw
    };
    let decoded = decode(
        &body,
        format,
        DecodeLimits {
            max_events: limits.max_events_per_request,
            max_event_bytes: limits.max_event_bytes,
        },
    );
    let evs = match decoded {
        Ok(e) => e,
        Err(BodyError::TooManyEvents { count, max }) => {
            m::record_rejected(Reject::TooMany, count);
            return too_large(&format!(
                "{count} events in one request, over the limit of {max}"
            ));
        }
        Err(BodyError::Empty) => {
            m::record_rejected(Reject::Invalid, 1);
            return problem(
                StatusCode::BAD_REQUEST,
                "bad request",
                "the request holds no events",
                &[],
            );
        }
        Err(BodyError::Malformed(why)) => {
            m::record_rejected(Reject::Invalid, 1);
            return problem(StatusCode::BAD_REQUEST, "bad request", &why, &[]);
        }
        Err(BodyError::Invalid(problems)) => {
            let n = problems.last().map_or(1, |p| p.index + 1);
            m::record_rejected(Reject::Invalid, n);
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid events",
                &format!(
                    "{} problem(s) in the request; no event was accepted",
                    problems.len()
                ),
                &problems,
            );
        }
    };
    produce(state, &key, &evs).await
}

async fn produce(state: &State, key: &KeyEntry, evs: &[crate::event::Event<'_>]) -> Response<Body> {
    if let Err(secs) = state.keys.charge_events(key, evs.len() as u64) {
        m::record_rejected(Reject::RateLimited, evs.len());
        return retry(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded",
            "this API key is over its events per second limit",
            secs,
        );
    }
    if let Err(secs) = state.keys.reserve_quota(key, evs.len() as u64) {
        m::record_rejected(Reject::QuotaExceeded, evs.len());
        return retry(
            StatusCode::TOO_MANY_REQUESTS,
            "quota exceeded",
            "this API key has used its monthly event quota; it renews at the start of the next UTC month",
            secs,
        );
    }
    let request_id = state.request_id();
    let outcome = state.producer.send(&key.tenant, &request_id, evs).await;
    if !matches!(outcome, ProduceOutcome::Acked) {
        state.keys.release_quota(key, evs.len() as u64);
    }
    match outcome {
        ProduceOutcome::Acked => {
            m::record_accepted(evs.len());
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .header("x-request-id", request_id)
                .body(Body::default())
                .expect("static response parts are valid")
        }
        ProduceOutcome::Overloaded(why) => {
            m::record_rejected(Reject::Overloaded, evs.len());
            retry(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                why,
                state.cfg.limits.retry_after_secs,
            )
        }
        ProduceOutcome::Failed(why) => {
            m::record_rejected(Reject::BrokerError, evs.len());
            tracing::warn!(request_id, tenant = %key.tenant, reason = %why, "produce failed");
            retry(
                StatusCode::SERVICE_UNAVAILABLE,
                "events not stored",
                &format!("{why}; resend the same events (ids make resending safe)"),
                state.cfg.limits.retry_after_secs,
            )
        }
    }
}

enum GunzipError {
    TooLarge,
    Corrupt(std::io::Error),
}

/// Decompresses at most `limit` bytes; more is a gzip bomb or simply too much.
fn gunzip(raw: &[u8], limit: usize) -> Result<Vec<u8>, GunzipError> {
    let mut out = Vec::with_capacity((raw.len() * 4).min(limit));
    let mut dec = flate2::read::MultiGzDecoder::new(raw).take(limit as u64 + 1);
    dec.read_to_end(&mut out).map_err(GunzipError::Corrupt)?;
    if out.len() > limit {
        return Err(GunzipError::TooLarge);
    }
    Ok(out)
}

pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(body.to_string()))
        .expect("static response parts are valid")
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("static response parts are valid")
}

/// An RFC 9457 problem document; `errors` lists per-event problems.
pub fn problem(
    status: StatusCode,
    title: &str,
    detail: &str,
    errors: &[Problem],
) -> Response<Body> {
    let mut doc = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if !errors.is_empty() {
        doc["errors"] = serde_json::to_value(errors).unwrap_or_default();
    }
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/problem+json")
        .body(Body::from(doc.to_string()))
        .expect("static response parts are valid")
}

fn retry(status: StatusCode, title: &str, detail: &str, secs: u32) -> Response<Body> {
    let mut r = problem(status, title, detail, &[]);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

fn too_large(detail: &str) -> Response<Body> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload too large",
        detail,
        &[],
    )
}
