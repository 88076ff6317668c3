//! `Idempotency-Key` on every authenticated POST: the first answer for a (caller, key) is stored
//! (sealed: it may hold a secret shown once, such as a new API key) and given again, byte for
//! byte, to a retry with the same key, path and body, marked `Idempotent-Replayed: true`; the
//! handler does not run twice, so no second object is made. The same key with another path or
//! body is refused (422 `idempotency_key_reused`); a retry while the first request still runs
//! gets 409 `idempotency_in_progress`. 5xx answers are not stored (the retry runs again). Keys
//! are remembered for `idempotency_ttl` (24 h), per caller: two callers may use the same key.

use crate::auth::Caller;
use crate::http::{ApiError, AppState};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const HEADER: &str = "idempotency-key";
const MAX_BODY: usize = 4 << 20;

fn well_formed(k: &str) -> bool {
    !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

pub async fn layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match run(st, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(st: AppState, req: Request, next: Next) -> Result<Response, ApiError> {
    if req.method() != Method::POST {
        return Ok(next.run(req).await);
    }
    let Some(raw) = req.headers().get(HEADER) else {
        return Ok(next.run(req).await);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| well_formed(k))
        .ok_or_else(|| {
            ApiError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?
        .to_string();
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return Ok(next.run(req).await);
    };
    let principal = format!("{}:{}", caller.actor_kind(), caller.actor_id());
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.to_string());
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the body exceeds 4 MiB",
        )
    })?;
    let digest = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(path.as_bytes());
        h.update(b"\n");
        h.update(&bytes);
        h.finalize().to_vec()
    };
    let db = st.pool.get().await?;
    let ttl = st.settings.idempotency_ttl.as_secs_f64();
    db.execute(
        "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2
            AND created_at < now() - make_interval(secs => $3)",
        &[&principal, &key, &ttl],
    )
    .await?;
    let fresh = db
        .execute(
            "INSERT INTO idempotency_keys (principal, key, method, path, body_sha256)
             VALUES ($1, $2, 'POST', $3, $4) ON CONFLICT DO NOTHING",
            &[&principal, &key, &path, &digest],
        )
        .await?
        == 1;
    if !fresh {
        let row = db
            .query_one(
                "SELECT path, body_sha256, status, response_sealed FROM idempotency_keys
                  WHERE principal = $1 AND key = $2",
                &[&principal, &key],
            )
            .await?;
        if row.get::<_, String>(0) != path || row.get::<_, Vec<u8>>(1) != digest {
            return Err(ApiError {
                field: Some("Idempotency-Key".into()),
                ..ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for another request (path or body differ)",
                )
            });
        }
        let (Some(status), Some(sealed)) = (
            row.get::<_, Option<i32>>(2),
            row.get::<_, Option<Vec<u8>>>(3),
        ) else {
            return Err(ApiError {
                retry_after: Some(1),
                ..ApiError::conflict(
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed",
                )
            });
        };
        let plain = st
            .settings
            .key
            .open(&sealed)
            .ok_or_else(|| ApiError::internal("stored answer does not open"))?;
        let (ctype, body) = match plain.iter().position(|b| *b == b'\n') {
            Some(i) => (plain[..i].to_vec(), plain[i + 1..].to_vec()),
            None => (Vec::new(), plain),
        };
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = StatusCode::from_u16(status as u16).map_err(ApiError::internal)?;
        if let Ok(v) = HeaderValue::from_bytes(&ctype) {
            if !ctype.is_empty() {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
        }
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return Ok(r);
    }
    drop(db);
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let db = st.pool.get().await?;
    if resp.status().is_server_error() {
        db.execute(
            "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2",
            &[&principal, &key],
        )
        .await?;
        return Ok(resp);
    }
    let (rparts, rbody) = resp.into_parts();
    let out = axum::body::to_bytes(rbody, usize::MAX)
        .await
        .map_err(ApiError::internal)?;
    let mut plain = rparts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    plain.push(b'\n');
    plain.extend_from_slice(&out);
    db.execute(
        "UPDATE idempotency_keys SET status = $3, response_sealed = $4
          WHERE principal = $1 AND key = $2",
        &[
            &principal,
            &key,
            &(rparts.status.as_u16() as i32),
            &st.settings.key.seal(&plain),
        ],
    )
    .await?;
    Ok(Response::from_parts(rparts, Body::from(out)))
}
