//! The HTTP server: state, settings, the error shape, request ids, and start-up.
//!
//! Errors are JSON problems (`application/problem+json`, RFC 7807 fields as OpenMeter answers
//! them, plus a stable `code`, the `field` at fault and the `request_id`), built in one place:
//! [`ApiError`]. Routes and who may call them are in [`crate::routes`]; authentication in
//! [`crate::auth`]; the audit log and `Idempotency-Key` in [`crate::audit`] and
//! [`crate::idempotency`].

use crate::crypto::ServerKey;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Lifetimes and limits of the identity layer.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub key: ServerKey,
    /// Access tokens (short-lived, signed).
    pub access_ttl: Duration,
    /// A session (and its refresh tokens) without use expires after this.
    pub session_ttl: Duration,
    /// Consecutive failed logins before the account is locked.
    pub lockout_after: u32,
    /// First lock; each further failure doubles it, up to `lockout_max`.
    pub lockout_base: Duration,
    pub lockout_max: Duration,
    pub verify_email_ttl: Duration,
    pub reset_password_ttl: Duration,
    /// A rotated API key keeps working this long unless the request names another grace.
    pub key_rotation_grace: Duration,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: Duration,
    /// How long a subscription stays past due before it is canceled.
    pub past_due_grace: Duration,
    pub payments: PaymentSettings,
    pub notify: NotifySettings,
}

/// Payment providers.
#[derive(Debug, Clone)]
pub struct PaymentSettings {
    /// `sandbox` or `stripe`: the provider of a payment that names none.
    pub default_provider: &'static str,
    /// How long the sandbox's delayed-confirmation cards stay pending.
    pub sandbox_confirm_delay: Duration,
    pub stripe: Option<crate::stripe::StripeSettings>,
}

/// Notifications and the background workers.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// Run the workers in this process: outbox delivery, threshold evaluation, pending payments.
    pub workers: bool,
    /// `smtp://host:port`, `smtps://…`; without it emails wait in the outbox.
    pub smtp_url: Option<String>,
    pub mail_from: String,
    /// Base of the links in emails.
    pub public_url: String,
    /// Attempts before a message is dead.
    pub max_attempts: i32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Per delivery attempt.
    pub timeout: Duration,
    /// How often the outbox is looked at.
    pub deliver_every: Duration,
    /// How often thresholds are evaluated.
    pub evaluate_every: Duration,
    /// How often pending payments are asked about.
    pub refresh_payments_every: Duration,
    /// Allow webhook channels to loopback and private addresses (default off: a webhook URL
    /// must name, and resolve to, a public address).
    pub allow_private_webhooks: bool,
}

impl NotifySettings {
    pub fn delivery(&self, key: &ServerKey) -> crate::delivery::Delivery {
        crate::delivery::Delivery {
            key: key.clone(),
            smtp_url: self.smtp_url.clone(),
            mail_from: self.mail_from.clone(),
            public_url: self.public_url.clone(),
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            timeout: self.timeout,
            allow_private_targets: self.allow_private_webhooks,
        }
    }
}

impl Settings {
    pub fn new(database_url: &str, key: ServerKey) -> Self {
        Settings {
            database_url: database_url.to_string(),
            key,
            access_ttl: Duration::from_secs(15 * 60),
            session_ttl: Duration::from_secs(30 * 86_400),
            lockout_after: 5,
            lockout_base: Duration::from_secs(60),
            lockout_max: Duration::from_secs(3600),
            verify_email_ttl: Duration::from_secs(3 * 86_400),
            reset_password_ttl: Duration::from_secs(3600),
            key_rotation_grace: Duration::from_secs(86_400),
            idempotency_ttl: Duration::from_secs(86_400),
            past_due_grace: Duration::from_secs(14 * 86_400),
            payments: PaymentSettings {
                default_provider: "sandbox",
                sandbox_confirm_delay: Duration::from_secs(5),
                stripe: None,
            },
            notify: NotifySettings {
                workers: false,
                smtp_url: None,
                mail_from: "metering@localhost".into(),
                public_url: "http://127.0.0.1:8081".into(),
                max_attempts: 8,
                backoff_base: Duration::from_secs(10),
                backoff_max: Duration::from_secs(3600),
                timeout: Duration::from_secs(10),
                deliver_every: Duration::from_secs(1),
                evaluate_every: Duration::from_secs(30),
                refresh_payments_every: Duration::from_secs(10),
                allow_private_webhooks: false,
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: deadpool_postgres::Pool,
    pub settings: Arc<Settings>,
    pub providers: crate::payments::Providers,
    pub hub: crate::inbox::Hub,
}

impl AppState {
    pub fn new(pool: deadpool_postgres::Pool, settings: Settings) -> Self {
        let sandbox =
            crate::provider::Sandbox::new(pool.clone(), settings.payments.sandbox_confirm_delay);
        let stripe = settings.payments.stripe.clone().map(|s| {
            std::sync::Arc::new(crate::stripe::Stripe::new(s))
                as std::sync::Arc<dyn crate::provider::PaymentProvider>
        });
        AppState {
            providers: crate::payments::Providers {
                sandbox: std::sync::Arc::new(sandbox),
                stripe,
                default: settings.payments.default_provider,
            },
            hub: crate::inbox::Hub::new(),
            pool,
            settings: Arc::new(settings),
        }
    }
}

tokio::task_local! {
    /// The id of the request being served (set by [`crate::routes`]'s outermost layer).
    pub static REQUEST_ID: String;
}

/// The current request's id, if any.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(|r| r.clone()).ok()
}

/// An error answer: status, stable code, message and (when one field is at fault) its name.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let field = field.into();
        ApiError {
            field: Some(field.clone()),
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("{field}: {}", reason.into()),
            )
        }
    }
    pub fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    pub fn unauthenticated(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }
    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed; the request id names it in the logs",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "detail": self.message,
            "code": self.code,
            "field": self.field,
            "request_id": request_id(),
        });
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        r
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        tracing::error!(error = %e, "database error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database could not answer; retry later",
        )
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        tracing::error!(error = %e, "database pool error");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the database could not answer; retry later",
        )
    }
}

/// A JSON body, or a 400 naming the field serde complained about.
pub fn body<T>(
    b: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    b.map(|axum::Json(t)| t)
        .map_err(|e| invalid_body(e.body_text()))
}

/// An optional JSON body: empty means `T::default()`; otherwise as [`body`].
pub fn optional_body<T: Default + serde::de::DeserializeOwned>(
    raw: &axum::body::Bytes,
) -> Result<T, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(raw).map_err(|e| invalid_body(e.to_string()))
}

/// 400 `invalid_body`, with the field serde named in `text` (`… field `x` …`), if any.
fn invalid_body(text: String) -> ApiError {
    let field = text
        .split_once("field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(f, _)| f.to_string());
    ApiError {
        field,
        ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", text)
    }
}

/// 409 naming the field whose value is taken.
pub fn conflict(field: &str, message: String) -> ApiError {
    ApiError {
        field: Some(field.into()),
        ..ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub done: JoinHandle<()>,
}

/// Binds `listen` (port 0 picks one) and serves until `shutdown`. The server key comes from
/// `CONTROL_API_SECRET`, or is random for the life of the process when that is not set (tests;
/// `control-api serve` refuses to start without it).
pub async fn start(
    listen: SocketAddr,
    database_url: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let key = ServerKey::from_env().unwrap_or_else(|_| ServerKey::ephemeral());
    start_with(listen, Settings::new(database_url, key), shutdown).await
}

/// A connection pool for `database_url`.
pub fn pool(database_url: &str) -> anyhow::Result<deadpool_postgres::Pool> {
    let pg: tokio_postgres::Config = database_url.parse()?;
    let mgr = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Ok(deadpool_postgres::Pool::builder(mgr).max_size(16).build()?)
}

/// [`start`] with explicit settings.
pub async fn start_with(
    listen: SocketAddr,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let pool = pool(&settings.database_url)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let state = AppState::new(pool, settings);
    tokio::spawn(
        state
            .hub
            .clone()
            .listen(state.settings.database_url.clone(), shutdown.clone()),
    );
    if state.settings.notify.workers {
        crate::workers::spawn(state.clone(), shutdown.clone());
    }
    let app = crate::routes::router(state);
    let done = tokio::spawn(async move {
        let r = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "control-api server failed");
        }
    });
    tracing::info!(%addr, "control-api listening");
    Ok(Running { addr, done })
}
