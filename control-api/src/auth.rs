//! Authentication and authorization of every request, in one middleware.
//!
//! Two kinds of credentials, both as `Authorization: Bearer …`:
//! - an API key (`mk_…`, looked up by SHA-256; revoked or expired keys refused; the key's IP
//!   allowlist applies here as at the ingest edge);
//! - a person's access token (`mat_…`): signed by the server key, short-lived, naming a session
//!   that must still be live (revoking a session stops its access tokens at once). The role is
//!   read from the database on each request, so a role change applies immediately.
//!
//! [`authorize`] finds the endpoint's [`Access`] in the route table and checks it against the
//! permission matrix ([`crate::rbac`]) before any handler runs. Handlers take a [`Caller`].

use crate::http::{ApiError, AppState};
use crate::rbac::{role_allows, scope_allows, Access, Role};
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use uuid::Uuid;

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    Key { id: Uuid, scopes: Vec<String> },
    User { id: Uuid, role: Role, session: Uuid },
}

/// The authenticated caller and their tenant.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: Uuid,
    pub principal: Principal,
    pub ip: Option<IpAddr>,
}

impl Caller {
    /// `api_key` or `user`, as the audit log names actors.
    pub fn actor_kind(&self) -> &'static str {
        match self.principal {
            Principal::Key { .. } => "api_key",
            Principal::User { .. } => "user",
        }
    }
    pub fn actor_id(&self) -> Uuid {
        match self.principal {
            Principal::Key { id, .. } | Principal::User { id, .. } => id,
        }
    }
    /// The signed-in person, or 403 for an API key.
    pub fn user(&self) -> Result<(Uuid, Role, Uuid), ApiError> {
        match self.principal {
            Principal::User { id, role, session } => Ok((id, role, session)),
            Principal::Key { .. } => Err(ApiError::forbidden(
                "this endpoint is for a signed-in person, not an API key",
            )),
        }
    }
    pub fn role(&self) -> Option<Role> {
        match self.principal {
            Principal::User { role, .. } => Some(role),
            Principal::Key { .. } => None,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::unauthenticated(
                "unauthenticated",
                "a valid `Authorization: Bearer <API key or access token>` header is required",
            )
        })
    }
}

/// Prefix of access tokens.
pub const ACCESS_PREFIX: &str = "mat_";
/// Prefix of the short-lived token between password and second factor.
pub const MFA_PREFIX: &str = "mfa_";

/// What a signed token carries.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// `access` or `mfa`.
    pub typ: String,
    /// Session (access) or user (mfa).
    pub sub: Uuid,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
}

pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A signed token of type `typ` for `sub`, valid `ttl`.
pub fn issue_token(st: &AppState, prefix: &str, typ: &str, sub: Uuid, ttl_secs: i64) -> String {
    let claims = Claims {
        typ: typ.into(),
        sub,
        exp: now_secs() + ttl_secs,
    };
    let payload = serde_json::to_vec(&claims).expect("claims serialise");
    format!("{prefix}{}", st.settings.key.sign_token(&payload))
}

/// Checks a signed token's prefix, signature, type and expiry; returns its subject.
pub fn check_token(st: &AppState, token: &str, prefix: &str, typ: &str) -> Result<Uuid, ApiError> {
    let bad = || ApiError::unauthenticated("invalid_token", "the token is not valid");
    let body = token.strip_prefix(prefix).ok_or_else(bad)?;
    let payload = st.settings.key.verify_token(body).ok_or_else(bad)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| bad())?;
    if claims.typ != typ {
        return Err(bad());
    }
    if claims.exp <= now_secs() {
        return Err(ApiError::unauthenticated(
            "token_expired",
            "the token has expired; refresh it or sign in again",
        ));
    }
    Ok(claims.sub)
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn unauthenticated() -> ApiError {
    ApiError::unauthenticated(
        "unauthenticated",
        "a valid `Authorization: Bearer <API key or access token>` header is required",
    )
}

async fn authenticate(st: &AppState, token: &str, ip: Option<IpAddr>) -> Result<Caller, ApiError> {
    if token.starts_with(ACCESS_PREFIX) {
        let session = check_token(st, token, ACCESS_PREFIX, "access")?;
        let db = st.pool.get().await?;
        let row = db
            .query_opt(
                "UPDATE sessions s SET last_seen_at = now()
                   FROM users u
                  WHERE s.id = $1 AND u.id = s.user_id
                    AND s.revoked_at IS NULL AND s.expires_at > now() AND u.disabled_at IS NULL
                 RETURNING u.id, u.tenant_id, u.role",
                &[&session],
            )
            .await?
            .ok_or_else(|| {
                ApiError::unauthenticated(
                    "session_revoked",
                    "the session has ended or was revoked; sign in again",
                )
            })?;
        let role: String = row.get(2);
        return Ok(Caller {
            tenant: row.get(1),
            principal: Principal::User {
                id: row.get(0),
                role: Role::parse(&role).ok_or_else(|| ApiError::internal("unknown role"))?,
                session,
            },
            ip,
        });
    }
    if !schemas::apikey::well_formed(token) {
        return Err(unauthenticated());
    }
    let db = st.pool.get().await?;
    let row = db
        .query_opt(
            "SELECT id, tenant_id, scopes, allowed_cidrs::text[] FROM api_keys
              WHERE secret_sha256 = $1 AND revoked_at IS NULL
                AND (expires_at IS NULL OR expires_at > now())",
            &[&schemas::apikey::hash(token).as_slice()],
        )
        .await?
        .ok_or_else(unauthenticated)?;
    let cidrs: Option<Vec<String>> = row.get(3);
    if let Some(cidrs) = cidrs {
        let ok = ip.is_some_and(|ip| {
            cidrs.iter().any(|c| {
                c.parse::<ipnet::IpNet>()
                    .map(|n| n.contains(&ip))
                    .unwrap_or(false)
            })
        });
        if !ok {
            return Err(ApiError::forbidden(
                "the API key may not be used from this address",
            ));
        }
    }
    Ok(Caller {
        tenant: row.get(1),
        principal: Principal::Key {
            id: row.get(0),
            scopes: row.get(2),
        },
        ip,
    })
}

/// Checks `access` for `caller`.
pub fn permit(caller: &Caller, access: Access) -> Result<(), ApiError> {
    match (access, &caller.principal) {
        (Access::Public, _) => Ok(()),
        (Access::SignedIn, Principal::User { .. }) => Ok(()),
        (Access::SignedIn, Principal::Key { .. }) => Err(ApiError::forbidden(
            "this endpoint is for a signed-in person, not an API key",
        )),
        (Access::Perm(p), Principal::User { role, .. }) if !role_allows(*role, p) => {
            Err(ApiError::forbidden(format!(
                "the role `{}` does not grant `{}`",
                role.as_str(),
                p.as_str()
            )))
        }
        (Access::Perm(p), Principal::Key { scopes, .. }) if !scope_allows(scopes, p) => {
            Err(ApiError::forbidden(format!(
                "the API key's scopes ({}) do not grant `{}`",
                scopes.join(", "),
                p.as_str()
            )))
        }
        (Access::Perm(_), _) => Ok(()),
    }
}

/// The middleware: authenticates and authorizes by the route table, then runs the handler.
pub async fn authorize(
    State(st): State<AppState>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(path) = matched else {
        return next.run(req).await;
    };
    let Some(access) = crate::routes::access_of(req.method(), path.as_str()) else {
        // A route without an entry in the table: refuse rather than guess.
        tracing::error!(
            path = path.as_str(),
            "route missing from the endpoint table"
        );
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this endpoint has no access rule",
        )
        .into_response();
    };
    if access == Access::Public {
        return next.run(req).await;
    }
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (mut parts, body) = req.into_parts();
    let token = bearer(&parts).map(str::to_string);
    let caller = match token {
        None => Err(unauthenticated()),
        Some(t) => authenticate(&st, &t, ip).await,
    };
    let caller = match caller.and_then(|c| permit(&c, access).map(|()| c)) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    parts.extensions.insert(caller);
    req = Request::from_parts(parts, body);
    next.run(req).await
}
