//! People: users, passwords (argon2id), sessions with access and rotating refresh tokens, email
//! verification and password reset through the notification outbox, TOTP two-factor sign-in
//! with one-time recovery codes, lockout after repeated failures, login history.
//!
//! Tokens:
//! - access token `mat_…`: signed, names its session, valid 15 minutes (configurable);
//! - refresh token `mrt_…`: 256 random bits, stored as SHA-256, spent on use. Presenting a spent
//!   one again means it was stolen or replayed: the whole session is revoked;
//! - MFA token `mfa_…`: signed, 5 minutes, bridges password and second factor;
//! - verification and reset tokens `mvt_…`/`mrs_…`: random, stored as SHA-256, single use,
//!   delivered sealed through `notification_outbox`.
//!
//! Lockout: after `lockout_after` consecutive failures (password or second factor) the account
//! is locked for `lockout_base`, doubling with each further failure up to `lockout_max`; a
//! locked account answers 429 `login_locked` with `Retry-After` without checking the password.
//! Unknown addresses answer exactly as wrong passwords do (401 `invalid_credentials`, after the
//! same argon2 work), so sign-in does not reveal which addresses have accounts.

use crate::auth::{check_token, issue_token, Caller, ACCESS_PREFIX, MFA_PREFIX};
use crate::crypto::{random_secret, sha256, ServerKey};
use crate::http::{body, ApiError, AppState};
use crate::page;
use crate::rbac::Role;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio_postgres::Transaction;
use totp_rs::{Algorithm, TOTP};
use uuid::Uuid;

pub const REFRESH_PREFIX: &str = "mrt_";
const VERIFY_PREFIX: &str = "mvt_";
const RESET_PREFIX: &str = "mrs_";
const MFA_TTL_SECS: i64 = 300;
const RECOVERY_CODES: usize = 10;

/// The client's address and user agent (for sessions and login history).
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: Option<IpAddr>,
    pub user_agent: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        Ok(Client { ip, user_agent })
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------- passwords

/// Passwords: 10 to 1024 characters (length is what matters; no composition rules).
pub fn validate_password(field: &str, pw: &str) -> Result<(), ApiError> {
    let n = pw.chars().count();
    if !(10..=1024).contains(&n) {
        return Err(ApiError::invalid(field, "must be 10 to 1024 characters"));
    }
    Ok(())
}

/// Argon2id (the crate's defaults: 19 MiB, 2 passes), PHC string with its own salt.
pub async fn hash_password(pw: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(&crate::crypto::random_bytes::<16>())
            .map_err(ApiError::internal)?;
        argon2::Argon2::default()
            .hash_password(pw.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

/// Whether `pw` matches the PHC string `hash`.
pub async fn verify_password(hash: String, pw: String) -> bool {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(&hash)
            .map(|h| {
                argon2::Argon2::default()
                    .verify_password(pw.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// A hash nobody's password matches, verified against for unknown addresses so that they cost
/// the same time as known ones.
async fn dummy_hash() -> String {
    static H: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    H.get_or_init(|| async { hash_password(random_secret("")).await.unwrap_or_default() })
        .await
        .clone()
}

pub fn normalize_email(field: &str, email: &str) -> Result<String, ApiError> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.')
        })
        && !e.chars().any(char::is_whitespace);
    if !ok {
        return Err(ApiError::invalid(field, "is not an email address"));
    }
    Ok(e)
}

// ---------------------------------------------------------------- outbox and one-time tokens

/// Queues a message; its payload (which holds a token) is sealed with the server key.
pub async fn enqueue(
    tx: &Transaction<'_>,
    key: &ServerKey,
    tenant: Uuid,
    user: Uuid,
    kind: &str,
    recipient: &str,
    payload: &Value,
) -> Result<(), tokio_postgres::Error> {
    let sealed = key.seal(payload.to_string().as_bytes());
    tx.execute(
        "INSERT INTO notification_outbox (tenant_id, user_id, kind, recipient, payload_sealed)
         VALUES ($1, $2, $3, $4, $5)",
        &[&tenant, &user, &kind, &recipient, &sealed],
    )
    .await?;
    Ok(())
}

async fn one_time_token(
    tx: &Transaction<'_>,
    key: &ServerKey,
    user: (Uuid, Uuid, &str),
    purpose: &str,
    ttl: Duration,
) -> Result<(), tokio_postgres::Error> {
    let (user_id, tenant, email) = user;
    let prefix = if purpose == "verify_email" {
        VERIFY_PREFIX
    } else {
        RESET_PREFIX
    };
    let token = random_secret(prefix);
    tx.execute(
        "INSERT INTO one_time_tokens (token_sha256, user_id, purpose, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        &[&sha256(&token), &user_id, &purpose, &secs(ttl)],
    )
    .await?;
    enqueue(
        tx,
        key,
        tenant,
        user_id,
        purpose,
        email,
        &json!({"token": token, "email": email}),
    )
    .await
}

/// Consumes a one-time token; the user it was for.
async fn spend_token(tx: &Transaction<'_>, token: &str, purpose: &str) -> Result<Uuid, ApiError> {
    tx.query_opt(
        "UPDATE one_time_tokens SET used_at = now()
          WHERE token_sha256 = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
         RETURNING user_id",
        &[&sha256(token), &purpose],
    )
    .await?
    .map(|r| r.get(0))
    .ok_or_else(|| {
        ApiError::invalid(
            "token",
            "is unknown, already used or expired; ask for a new one",
        )
    })
}

// ---------------------------------------------------------------- users

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub email: String,
    #[serde(default)]
    pub name: String,
    /// `user`, `org_admin` or `sys_admin` (only a sys_admin may create a sys_admin).
    pub role: String,
    /// Omitted: a random password is generated and returned once (the user can reset it).
    pub password: Option<String>,
}

const USER_COLUMNS: &str = "id, tenant_id, email, name, role, email_verified_at, totp_enabled,
    disabled_at, created_at";

pub fn user_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, Uuid>(0),
        "tenant_id": r.get::<_, Uuid>(1),
        "email": r.get::<_, String>(2),
        "name": r.get::<_, String>(3),
        "role": r.get::<_, String>(4),
        "email_verified": r.get::<_, Option<DateTime<Utc>>>(5).is_some(),
        "totp_enabled": r.get::<_, bool>(6),
        "disabled": r.get::<_, Option<DateTime<Utc>>>(7).is_some(),
        "created_at": ts(r.get(8)),
    })
}

/// Creates a user in `tenant` and queues their verification email, in `tx`. Returns the user
/// and, when no password was given, the generated one (to show once).
pub async fn create_user_in(
    tx: &Transaction<'_>,
    key: &ServerKey,
    verify_ttl: Duration,
    tenant: Uuid,
    new: NewUser,
) -> Result<(Value, Option<String>), ApiError> {
    let email = normalize_email("email", &new.email)?;
    let role = Role::parse(&new.role)
        .ok_or_else(|| ApiError::invalid("role", "must be user, org_admin or sys_admin"))?;
    if new.name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "must be at most 200 characters"));
    }
    let (password, generated) = match new.password {
        Some(p) => {
            validate_password("password", &p)?;
            (p, None)
        }
        None => {
            let p = random_secret("");
            (p.clone(), Some(p))
        }
    };
    let hash = hash_password(password).await?;
    let exists = tx
        .query_opt("SELECT 1 FROM tenants WHERE id = $1", &[&tenant])
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO users (tenant_id, email, name, role, password_hash)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email) DO NOTHING
                 RETURNING {USER_COLUMNS}"
            ),
            &[&tenant, &email, &new.name, &role.as_str(), &hash],
        )
        .await?
        .ok_or_else(|| {
            crate::http::conflict("email", "an account with this email exists".into())
        })?;
    let id: Uuid = row.get(0);
    one_time_token(tx, key, (id, tenant, &email), "verify_email", verify_ttl).await?;
    Ok((user_view(&row), generated))
}

pub async fn create_user(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new = body(b)?;
    create_user_for(&st, &caller, caller.tenant, new).await
}

/// Creating a user: only a sys_admin may create a sys_admin.
pub async fn create_user_for(
    st: &AppState,
    caller: &Caller,
    tenant: Uuid,
    new: NewUser,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if new.role == Role::SysAdmin.as_str() && caller.role() != Some(Role::SysAdmin) {
        return Err(ApiError::forbidden(
            "only a sys_admin may create a sys_admin",
        ));
    }
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let (mut user, generated) = create_user_in(
        &tx,
        &st.settings.key,
        st.settings.verify_email_ttl,
        tenant,
        new,
    )
    .await?;
    tx.commit().await?;
    if let Some(p) = generated {
        user["password"] = json!(p);
    }
    Ok((StatusCode::CREATED, Json(user)))
}

pub async fn list_users(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let after = page::time_id(q.get("cursor").map(String::as_str))?;
    let role = q.get("role").map(String::as_str);
    if let Some(r) = role {
        Role::parse(r)
            .ok_or_else(|| ApiError::invalid("role", "must be user, org_admin or sys_admin"))?;
    }
    let email = q.get("email").map(|e| e.trim().to_lowercase());
    let (t, id) = after.map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {USER_COLUMNS} FROM users
                  WHERE tenant_id = $1
                    AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
                    AND ($4::text IS NULL OR role = $4)
                    AND ($5::text IS NULL OR email = $5)
                  ORDER BY created_at, id LIMIT $6"
            ),
            &[&caller.tenant, &t, &id, &role, &email, &(limit + 1)],
        )
        .await?;
    Ok(Json(page::page(rows, limit, user_view, |r| {
        page::time_id_cursor(r.get(8), r.get(0))
    })))
}

fn uuid_path(id: &str, what: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::not_found(what))
}

async fn find_user(
    db: &tokio_postgres::Client,
    tenant: Uuid,
    id: Uuid,
) -> Result<tokio_postgres::Row, ApiError> {
    db.query_opt(
        &format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1 AND tenant_id = $2"),
        &[&id, &tenant],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("user"))
}

pub async fn get_user(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = uuid_path(&id, "user")?;
    let db = st.pool.get().await?;
    Ok(Json(user_view(&find_user(&db, caller.tenant, id).await?)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    pub name: Option<String>,
    pub role: Option<String>,
    /// true disables the account and ends its sessions; false enables it again.
    pub disabled: Option<bool>,
}

pub async fn update_user(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    b: Result<Json<UserPatch>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = uuid_path(&id, "user")?;
    let patch = body(b)?;
    let role = match &patch.role {
        None => None,
        Some(r) => Some(
            Role::parse(r)
                .ok_or_else(|| ApiError::invalid("role", "must be user, org_admin or sys_admin"))?,
        ),
    };
    if let Some(n) = &patch.name {
        if n.chars().count() > 200 {
            return Err(ApiError::invalid("name", "must be at most 200 characters"));
        }
    }
    let mut db = st.pool.get().await?;
    let before = find_user(&db, caller.tenant, id).await?;
    let before_role = Role::parse(before.get(4));
    let granting_sys = role == Some(Role::SysAdmin) || before_role == Some(Role::SysAdmin);
    if granting_sys && caller.role() != Some(Role::SysAdmin) {
        return Err(ApiError::forbidden(
            "only a sys_admin may grant or change the sys_admin role",
        ));
    }
    let tx = db.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE users SET name = COALESCE($3, name), role = COALESCE($4, role),
                        disabled_at = CASE WHEN $5::bool IS NULL THEN disabled_at
                                           WHEN $5 THEN COALESCE(disabled_at, now()) ELSE NULL END,
                        updated_at = now()
                  WHERE id = $1 AND tenant_id = $2 RETURNING {USER_COLUMNS}"
            ),
            &[
                &id,
                &caller.tenant,
                &patch.name,
                &role.map(Role::as_str),
                &patch.disabled,
            ],
        )
        .await?;
    if patch.disabled == Some(true) {
        revoke_sessions(&tx, id, None, "user_disabled").await?;
    }
    tx.commit().await?;
    crate::audit::set_before(user_view(&before));
    Ok(Json(user_view(&row)))
}

async fn revoke_sessions(
    tx: &Transaction<'_>,
    user: Uuid,
    except: Option<Uuid>,
    why: &str,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "UPDATE sessions SET revoked_at = now(), revoked_why = $3
          WHERE user_id = $1 AND revoked_at IS NULL AND ($2::uuid IS NULL OR id <> $2)",
        &[&user, &except, &why],
    )
    .await
}

// ---------------------------------------------------------------- sign-in

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaRequest {
    pub mfa_token: String,
    /// A 6-digit TOTP code…
    pub code: Option<String>,
    /// …or one of the recovery codes (each works once).
    pub recovery_code: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

async fn history(
    db: &tokio_postgres::Client,
    user: Option<(Uuid, Uuid)>,
    client: &Client,
    outcome: &str,
) -> Result<(), ApiError> {
    let (u, t) = user.map_or((None, None), |(u, t)| (Some(u), Some(t)));
    db.execute(
        "INSERT INTO login_history (user_id, tenant_id, ip, user_agent, outcome)
         VALUES ($1, $2, $3, $4, $5)",
        &[&u, &t, &client.ip, &client.user_agent, &outcome],
    )
    .await?;
    Ok(())
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthenticated("invalid_credentials", "wrong email or password")
}

fn locked(until: DateTime<Utc>) -> ApiError {
    let wait = (until - Utc::now()).num_seconds().max(1) as u64;
    ApiError {
        retry_after: Some(wait),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "login_locked",
            format!("too many failed sign-ins; try again in {wait} s or reset the password"),
        )
    }
}

/// Counts a failure; locks the account once `lockout_after` failures in a row are reached.
async fn failed(st: &AppState, db: &tokio_postgres::Client, user: Uuid) -> Result<(), ApiError> {
    let s = &st.settings;
    db.execute(
        "UPDATE users SET failed_logins = failed_logins + 1,
                locked_until = CASE WHEN failed_logins + 1 >= $2
                    THEN now() + make_interval(secs => LEAST($4,
                             $3 * power(2, LEAST(failed_logins + 1 - $2, 30))))
                    ELSE locked_until END
          WHERE id = $1",
        &[
            &user,
            &(s.lockout_after as i32),
            &secs(s.lockout_base),
            &secs(s.lockout_max),
        ],
    )
    .await?;
    Ok(())
}

struct Account {
    id: Uuid,
    tenant: Uuid,
    hash: String,
    totp: bool,
    locked_until: Option<DateTime<Utc>>,
}

async fn account(
    db: &tokio_postgres::Client,
    by_email: Option<&str>,
    by_id: Option<Uuid>,
) -> Result<Option<Account>, ApiError> {
    Ok(db
        .query_opt(
            "SELECT id, tenant_id, password_hash, totp_enabled, locked_until FROM users
              WHERE (email = $1 OR id = $2) AND disabled_at IS NULL",
            &[&by_email, &by_id],
        )
        .await?
        .map(|r| Account {
            id: r.get(0),
            tenant: r.get(1),
            hash: r.get(2),
            totp: r.get(3),
            locked_until: r
                .get::<_, Option<DateTime<Utc>>>(4)
                .filter(|t| *t > Utc::now()),
        }))
}

/// Opens a session: a refresh token (stored hashed) and an access token.
async fn open_session(
    st: &AppState,
    db: &tokio_postgres::Client,
    acct: &Account,
    client: &Client,
) -> Result<Value, ApiError> {
    db.execute(
        "UPDATE users SET failed_logins = 0, locked_until = NULL WHERE id = $1",
        &[&acct.id],
    )
    .await?;
    let sid: Uuid = db
        .query_one(
            "INSERT INTO sessions (user_id, tenant_id, ip, user_agent, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) RETURNING id",
            &[
                &acct.id,
                &acct.tenant,
                &client.ip,
                &client.user_agent,
                &secs(st.settings.session_ttl),
            ],
        )
        .await?
        .get(0);
    history(db, Some((acct.id, acct.tenant)), client, "ok").await?;
    tokens(st, db, sid).await
}

async fn tokens(st: &AppState, db: &tokio_postgres::Client, sid: Uuid) -> Result<Value, ApiError> {
    let refresh = random_secret(REFRESH_PREFIX);
    db.execute(
        "INSERT INTO refresh_tokens (token_sha256, session_id) VALUES ($1, $2)",
        &[&sha256(&refresh), &sid],
    )
    .await?;
    let ttl = st.settings.access_ttl.as_secs() as i64;
    Ok(json!({
        "access_token": issue_token(st, ACCESS_PREFIX, "access", sid, ttl),
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": ttl,
        "session_id": sid,
    }))
}

pub async fn login(
    State(st): State<AppState>,
    client: Client,
    b: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(b)?;
    let email = req.email.trim().to_lowercase();
    let db = st.pool.get().await?;
    let Some(acct) = account(&db, Some(&email), None).await? else {
        let _ = verify_password(dummy_hash().await, req.password).await;
        history(&db, None, &client, "unknown_user").await?;
        return Err(invalid_credentials());
    };
    if let Some(until) = acct.locked_until {
        history(&db, Some((acct.id, acct.tenant)), &client, "locked").await?;
        return Err(locked(until));
    }
    if !verify_password(acct.hash.clone(), req.password).await {
        failed(&st, &db, acct.id).await?;
        history(&db, Some((acct.id, acct.tenant)), &client, "bad_password").await?;
        return Err(invalid_credentials());
    }
    if acct.totp {
        history(&db, Some((acct.id, acct.tenant)), &client, "mfa_required").await?;
        return Ok(Json(json!({
            "mfa_required": true,
            "mfa_token": issue_token(&st, MFA_PREFIX, "mfa", acct.id, MFA_TTL_SECS),
        })));
    }
    Ok(Json(open_session(&st, &db, &acct, &client).await?))
}

fn totp_of(secret: Vec<u8>) -> TOTP {
    TOTP::new_unchecked(Algorithm::SHA1, 6, 1, 30, secret)
}

/// Accepts a TOTP code of the current 30-second step or its neighbours, once: the step is
/// recorded and no code of that step or an earlier one is accepted again.
async fn check_totp(
    st: &AppState,
    db: &tokio_postgres::Client,
    user: Uuid,
    code: &str,
    pending: bool,
) -> Result<bool, ApiError> {
    let row = db
        .query_one(
            "SELECT totp_sealed, totp_last_step FROM users WHERE id = $1",
            &[&user],
        )
        .await?;
    let Some(secret) = row
        .get::<_, Option<Vec<u8>>>(0)
        .and_then(|s| st.settings.key.open(&s))
    else {
        return Ok(false);
    };
    let last: Option<i64> = row.get(1);
    let totp = totp_of(secret);
    let now_step = crate::auth::now_secs() / 30;
    let code = code.trim();
    for step in [now_step - 1, now_step, now_step + 1] {
        if last.is_some_and(|l| step <= l) {
            continue;
        }
        let expected = totp.generate((step * 30) as u64);
        if constant_eq(expected.as_bytes(), code.as_bytes()) {
            // Conditional: two requests racing with the same code cannot both win.
            let n = db
                .execute(
                    "UPDATE users SET totp_last_step = $2
                      WHERE id = $1 AND (totp_last_step IS NULL OR totp_last_step < $2)
                        AND totp_enabled = $3",
                    &[&user, &step, &!pending],
                )
                .await?;
            return Ok(n == 1);
        }
    }
    Ok(false)
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn login_mfa(
    State(st): State<AppState>,
    client: Client,
    b: Result<Json<MfaRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(b)?;
    let user = check_token(&st, &req.mfa_token, MFA_PREFIX, "mfa")?;
    let db = st.pool.get().await?;
    let acct = account(&db, None, Some(user))
        .await?
        .filter(|a| a.totp)
        .ok_or_else(|| ApiError::unauthenticated("invalid_token", "the token is not valid"))?;
    if let Some(until) = acct.locked_until {
        history(&db, Some((acct.id, acct.tenant)), &client, "locked").await?;
        return Err(locked(until));
    }
    let ok = match (&req.code, &req.recovery_code) {
        (Some(code), None) => check_totp(&st, &db, user, code, false).await?,
        (None, Some(rc)) => {
            db.execute(
                "UPDATE recovery_codes SET used_at = now()
                  WHERE user_id = $1 AND code_sha256 = $2 AND used_at IS NULL",
                &[&user, &sha256(&normalize_recovery(rc))],
            )
            .await?
                == 1
        }
        _ => {
            return Err(ApiError::invalid(
                "code",
                "give either `code` or `recovery_code`",
            ))
        }
    };
    if !ok {
        failed(&st, &db, user).await?;
        history(&db, Some((acct.id, acct.tenant)), &client, "mfa_failed").await?;
        return Err(ApiError::unauthenticated(
            "invalid_code",
            "the code is wrong, expired or already used",
        ));
    }
    Ok(Json(open_session(&st, &db, &acct, &client).await?))
}

pub async fn refresh(
    State(st): State<AppState>,
    b: Result<Json<RefreshRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let req = body(b)?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT r.session_id, r.rotated_at IS NOT NULL,
                    s.revoked_at IS NULL AND s.expires_at > now()
               FROM refresh_tokens r JOIN sessions s ON s.id = r.session_id
              WHERE r.token_sha256 = $1
              FOR UPDATE OF r, s",
            &[&sha256(&req.refresh_token)],
        )
        .await?
        .ok_or_else(|| {
            ApiError::unauthenticated("invalid_refresh_token", "the refresh token is not valid")
        })?;
    let (sid, spent, live): (Uuid, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if spent {
        tx.execute(
            "UPDATE sessions SET revoked_at = COALESCE(revoked_at, now()),
                    revoked_why = COALESCE(revoked_why, 'refresh_token_reused')
              WHERE id = $1",
            &[&sid],
        )
        .await?;
        tx.commit().await?;
        tracing::warn!(session = %sid, "refresh token reused: session revoked");
        return Err(ApiError::unauthenticated(
            "refresh_token_reused",
            "this refresh token was already used; the session has been revoked",
        ));
    }
    if !live {
        return Err(ApiError::unauthenticated(
            "session_revoked",
            "the session has ended or was revoked; sign in again",
        ));
    }
    tx.execute(
        "UPDATE refresh_tokens SET rotated_at = now() WHERE token_sha256 = $1",
        &[&sha256(&req.refresh_token)],
    )
    .await?;
    tx.execute(
        "UPDATE sessions SET last_seen_at = now(),
                expires_at = now() + make_interval(secs => $2) WHERE id = $1",
        &[&sid, &secs(st.settings.session_ttl)],
    )
    .await?;
    tx.commit().await?;
    Ok(Json(tokens(&st, &db, sid).await?))
}

pub async fn logout(
    State(st): State<AppState>,
    b: Result<Json<RefreshRequest>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = body(b)?;
    let db = st.pool.get().await?;
    let n = db
        .execute(
            "UPDATE sessions SET revoked_at = now(), revoked_why = 'logout'
              WHERE id = (SELECT session_id FROM refresh_tokens WHERE token_sha256 = $1)
                AND revoked_at IS NULL",
            &[&sha256(&req.refresh_token)],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::unauthenticated(
            "invalid_refresh_token",
            "the refresh token is not valid",
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- email and password reset

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub token: String,
}

pub async fn verify_email(
    State(st): State<AppState>,
    b: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = body(b)?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let user = spend_token(&tx, &req.token, "verify_email").await?;
    tx.execute(
        "UPDATE users SET email_verified_at = COALESCE(email_verified_at, now()), updated_at = now()
          WHERE id = $1",
        &[&user],
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub email: String,
}

pub async fn request_reset(
    State(st): State<AppState>,
    b: Result<Json<ResetRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req = body(b)?;
    let email = normalize_email("email", &req.email)?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let user = tx
        .query_opt(
            "SELECT id, tenant_id FROM users WHERE email = $1 AND disabled_at IS NULL",
            &[&email],
        )
        .await?;
    if let Some(u) = user {
        one_time_token(
            &tx,
            &st.settings.key,
            (u.get(0), u.get(1), &email),
            "reset_password",
            st.settings.reset_password_ttl,
        )
        .await?;
    }
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"detail": "if an account has this address, a reset token was sent to it"})),
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    pub token: String,
    pub new_password: String,
}

pub async fn confirm_reset(
    State(st): State<AppState>,
    b: Result<Json<ResetConfirm>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = body(b)?;
    validate_password("new_password", &req.new_password)?;
    let hash = hash_password(req.new_password).await?;
    let mut db = st.pool.get().await?;
    let tx = db.transaction().await?;
    let user = spend_token(&tx, &req.token, "reset_password").await?;
    tx.execute(
        "UPDATE users SET password_hash = $2, failed_logins = 0, locked_until = NULL,
                email_verified_at = COALESCE(email_verified_at, now()), updated_at = now()
          WHERE id = $1",
        &[&user, &hash],
    )
    .await?;
    revoke_sessions(&tx, user, None, "password_reset").await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- the signed-in person

pub async fn me(State(st): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let (id, _, session) = caller.user()?;
    let db = st.pool.get().await?;
    let mut v = user_view(&find_user(&db, caller.tenant, id).await?);
    v["session_id"] = json!(session);
    Ok(Json(v))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

pub async fn change_password(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let (id, _, session) = caller.user()?;
    let req = body(b)?;
    validate_password("new_password", &req.new_password)?;
    let mut db = st.pool.get().await?;
    let hash: String = db
        .query_one("SELECT password_hash FROM users WHERE id = $1", &[&id])
        .await?
        .get(0);
    if !verify_password(hash, req.current_password).await {
        failed(&st, &db, id).await?;
        return Err(ApiError::invalid("current_password", "is wrong"));
    }
    let new_hash = hash_password(req.new_password).await?;
    let tx = db.transaction().await?;
    tx.execute(
        "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
        &[&id, &new_hash],
    )
    .await?;
    revoke_sessions(&tx, id, Some(session), "password_changed").await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_sessions(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let (id, _, current) = caller.user()?;
    let db = st.pool.get().await?;
    let rows = db
        .query(
            "SELECT id, host(ip), user_agent, created_at, last_seen_at, expires_at
               FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()
              ORDER BY created_at DESC",
            &[&id],
        )
        .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            let sid: Uuid = r.get(0);
            json!({
                "id": sid,
                "ip": r.get::<_, Option<String>>(1),
                "user_agent": r.get::<_, String>(2),
                "created_at": ts(r.get(3)),
                "last_seen_at": ts(r.get(4)),
                "expires_at": ts(r.get(5)),
                "current": sid == current,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

pub async fn revoke_session(
    State(st): State<AppState>,
    caller: Caller,
    Path(sid): Path<String>,
) -> Result<StatusCode, ApiError> {
    let (id, _, _) = caller.user()?;
    let sid = uuid_path(&sid, "session")?;
    let db = st.pool.get().await?;
    let n = db
        .execute(
            "UPDATE sessions SET revoked_at = now(), revoked_why = 'revoked_by_user'
              WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
            &[&sid, &id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("session"));
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn login_history(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let (id, _, _) = caller.user()?;
    let limit = page::limit(q.get("limit").map(String::as_str))?;
    let before = page::seq(q.get("cursor").map(String::as_str))?;
    let db = st.pool.get().await?;
    let rows = db
        .query(
            "SELECT id, host(ip), user_agent, outcome, at FROM login_history
              WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2)
              ORDER BY id DESC LIMIT $3",
            &[&id, &before, &(limit + 1)],
        )
        .await?;
    Ok(Json(page::page(
        rows,
        limit,
        |r| {
            json!({
                "ip": r.get::<_, Option<String>>(1),
                "user_agent": r.get::<_, String>(2),
                "outcome": r.get::<_, String>(3),
                "at": ts(r.get(4)),
            })
        },
        |r| page::seq_cursor(r.get(0)),
    )))
}

// ---------------------------------------------------------------- TOTP enrolment

pub async fn totp_setup(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let (id, _, _) = caller.user()?;
    let secret = crate::crypto::random_bytes::<20>().to_vec();
    let encoded = totp_rs::Secret::Raw(secret.clone())
        .to_encoded()
        .to_string();
    let db = st.pool.get().await?;
    let row = db
        .query_opt(
            "UPDATE users SET totp_sealed = $2, totp_last_step = NULL, updated_at = now()
              WHERE id = $1 AND NOT totp_enabled RETURNING email",
            &[&id, &st.settings.key.seal(&secret)],
        )
        .await?
        .ok_or_else(|| {
            ApiError::conflict(
                "totp_enabled",
                "two-factor sign-in is already on; disable it first",
            )
        })?;
    let email: String = row.get(0);
    let label: String = serde_urlencoded::to_string([("", email.as_str())])
        .unwrap_or_default()
        .trim_start_matches('=')
        .to_string();
    Ok(Json(json!({
        "secret": encoded,
        "otpauth_uri": format!(
            "otpauth://totp/Metering:{label}?secret={encoded}&issuer=Metering&algorithm=SHA1&digits=6&period=30"
        ),
    })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    pub code: String,
}

fn normalize_recovery(code: &str) -> String {
    code.trim().to_lowercase().replace('-', "")
}

pub async fn totp_enable(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<CodeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let (id, _, _) = caller.user()?;
    let req = body(b)?;
    let mut db = st.pool.get().await?;
    let state = db
        .query_one(
            "SELECT totp_enabled, totp_sealed IS NOT NULL FROM users WHERE id = $1",
            &[&id],
        )
        .await?;
    if state.get::<_, bool>(0) {
        return Err(ApiError::conflict(
            "totp_enabled",
            "two-factor sign-in is already on",
        ));
    }
    if !state.get::<_, bool>(1) {
        return Err(ApiError::conflict(
            "totp_not_set_up",
            "call POST /api/v1/me/2fa/setup first",
        ));
    }
    if !check_totp(&st, &db, id, &req.code, true).await? {
        return Err(ApiError::invalid("code", "is wrong or expired"));
    }
    let codes: Vec<String> = (0..RECOVERY_CODES)
        .map(|_| {
            let h = hex::encode(crate::crypto::random_bytes::<6>());
            format!("{}-{}", &h[..6], &h[6..])
        })
        .collect();
    let tx = db.transaction().await?;
    tx.execute("DELETE FROM recovery_codes WHERE user_id = $1", &[&id])
        .await?;
    for c in &codes {
        tx.execute(
            "INSERT INTO recovery_codes (user_id, code_sha256) VALUES ($1, $2)",
            &[&id, &sha256(&normalize_recovery(c))],
        )
        .await?;
    }
    tx.execute(
        "UPDATE users SET totp_enabled = true, updated_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    tx.commit().await?;
    Ok(Json(json!({ "enabled": true, "recovery_codes": codes })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpDisable {
    pub password: String,
    pub code: String,
}

pub async fn totp_disable(
    State(st): State<AppState>,
    caller: Caller,
    b: Result<Json<TotpDisable>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let (id, _, _) = caller.user()?;
    let req = body(b)?;
    let db = st.pool.get().await?;
    let row = db
        .query_one(
            "SELECT password_hash, totp_enabled FROM users WHERE id = $1",
            &[&id],
        )
        .await?;
    if !row.get::<_, bool>(1) {
        return Err(ApiError::conflict(
            "totp_not_enabled",
            "two-factor sign-in is off",
        ));
    }
    if !verify_password(row.get(0), req.password).await {
        failed(&st, &db, id).await?;
        return Err(ApiError::invalid("password", "is wrong"));
    }
    if !check_totp(&st, &db, id, &req.code, false).await? {
        failed(&st, &db, id).await?;
        return Err(ApiError::invalid(
            "code",
            "is wrong, expired or already used",
        ));
    }
    db.execute(
        "UPDATE users SET totp_enabled = false, totp_sealed = NULL, totp_last_step = NULL,
                updated_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    db.execute("DELETE FROM recovery_codes WHERE user_id = $1", &[&id])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
