//! The HTTP server: routing, the error shape, and authentication by API key.
//!
//! Errors are JSON problems (`application/problem+json`, RFC 7807 fields as OpenMeter answers
//! them, plus a stable `code` and the `field` at fault), built in one place: [`ApiError`].
//! Callers authenticate with `Authorization: Bearer <API key>`; the tenant comes from the key.
//! Reading needs the `read` or `admin` scope, changing meters needs `admin`.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: deadpool_postgres::Pool,
}

/// An error answer: status, stable code, message and (when one field is at fault) its name.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let field = field.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_parameter",
            message: format!("{field}: {}", reason.into()),
            field: Some(field),
        }
    }
    pub fn not_found(what: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
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
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
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

/// The authenticated caller: the key's tenant and scopes.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: Uuid,
    pub key_id: Uuid,
    pub scopes: Vec<String>,
}

impl Caller {
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.scopes.iter().any(|s| s == scope || s == "admin") {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the API key lacks the `{scope}` scope"),
            ))
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let unauthenticated = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a valid `Authorization: Bearer <API key>` header is required",
            )
        };
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| schemas::apikey::well_formed(k))
            .ok_or_else(unauthenticated)?;
        let st = AppState::from_ref(state);
        let db = st.pool.get().await?;
        let row = db
            .query_opt(
                "SELECT id, tenant_id, scopes FROM api_keys
                  WHERE secret_sha256 = $1 AND revoked_at IS NULL",
                &[&schemas::apikey::hash(key).as_slice()],
            )
            .await?
            .ok_or_else(unauthenticated)?;
        Ok(Caller {
            key_id: row.get(0),
            tenant: row.get(1),
            scopes: row.get(2),
        })
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/api/v1/meters",
            get(crate::meters::list).post(crate::meters::create),
        )
        .route(
            "/api/v1/meters/{id_or_slug}",
            get(crate::meters::get_one).delete(crate::meters::delete),
        )
        .route(
            "/api/v1/meters/{id_or_slug}/query",
            get(crate::query::query),
        )
        .route("/api/v1/usage/outcomes", get(crate::usage::outcomes))
        .route(
            "/api/v1/plans",
            get(crate::catalog::list_plans).post(crate::catalog::create_plan),
        )
        .route("/api/v1/plans/{key}", get(crate::catalog::get_plan))
        .route(
            "/api/v1/plans/{key}/versions",
            post(crate::catalog::create_version),
        )
        .route("/api/v1/tax-rates", get(crate::catalog::list_tax_rates))
        .route(
            "/api/v1/tax-rates/{region}",
            put(crate::catalog::put_tax_rate),
        )
        .route(
            "/api/v1/customers",
            get(crate::catalog::list_customers).post(crate::catalog::create_customer),
        )
        .route("/api/v1/customers/{key}", get(crate::catalog::get_customer))
        .route(
            "/api/v1/subscriptions",
            get(crate::catalog::list_subscriptions).post(crate::catalog::create_subscription),
        )
        .route(
            "/api/v1/subscriptions/{id}",
            get(crate::catalog::get_subscription),
        )
        .route("/api/v1/invoices", get(crate::catalog::list_invoices))
        .route("/api/v1/invoices/{id}", get(crate::catalog::get_invoice))
        .route(
            "/api/v1/invoices/{id}/issue",
            post(crate::catalog::issue_invoice),
        )
        .route(
            "/api/v1/invoices/{id}/void",
            post(crate::catalog::void_invoice),
        )
        .route(
            "/api/v1/invoices/{id}/mark-paid",
            post(crate::catalog::mark_paid),
        )
        .route(
            "/api/v1/invoices/{id}/html",
            get(crate::catalog::invoice_html),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .with_state(state)
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub done: JoinHandle<()>,
}

/// Binds `listen` (port 0 picks one) and serves until `shutdown`.
pub async fn start(
    listen: SocketAddr,
    database_url: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let pg: tokio_postgres::Config = database_url.parse()?;
    let mgr = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(mgr).max_size(16).build()?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = router(AppState { pool });
    let done = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "control-api server failed");
        }
    });
    tracing::info!(%addr, "control-api listening");
    Ok(Running { addr, done })
}
