//! The endpoint table: every route, who may call it, and what the OpenAPI document says of it.
//!
//! The router, the authorization middleware and `/openapi.json` are all built from
//! [`endpoints`], so an endpoint cannot exist without an access rule or be missing from the
//! documentation. Layers, outermost first: request id → authorization → `Idempotency-Key` →
//! audit log → handler.

use crate::http::{ApiError, AppState, REQUEST_ID};
use crate::rbac::{role_allows, scope_allows, Access, Perm, Role, SCOPES};
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::Response;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::OnceLock;
use tracing::Instrument;

/// One endpoint.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub tag: &'static str,
    pub summary: &'static str,
    pub status: u16,
    pub handler: fn() -> MethodRouter<AppState>,
    /// JSON Schema of the request body, when the endpoint takes a typed one.
    pub body: Option<fn() -> Value>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// JSON Schema of a request type, for [`Endpoint::body`]: `{"schema": …, "components": {…}}`,
/// the components being the types it refers to.
pub fn schema<T: utoipa::ToSchema>() -> Value {
    let mut deps = Vec::new();
    T::schemas(&mut deps);
    let components: Map<String, Value> = deps
        .into_iter()
        .map(|(name, s)| (name, serde_json::to_value(s).unwrap_or(Value::Null)))
        .collect();
    json!({"schema": serde_json::to_value(T::schema()).unwrap_or(Value::Null), "components": components})
}

macro_rules! ep {
    ($m:ident $path:literal, $access:expr, $tag:literal, $status:literal, $h:path, $summary:literal) => {
        Endpoint {
            method: Method::$m,
            path: $path,
            access: $access,
            tag: $tag,
            summary: $summary,
            status: $status,
            handler: || on(MethodFilter::$m, $h),
            body: None,
        }
    };
    ($m:ident $path:literal, $access:expr, $tag:literal, $status:literal, $h:path, $summary:literal, $body:ty) => {
        Endpoint {
            body: Some(schema::<$body>),
            ..ep!($m $path, $access, $tag, $status, $h, $summary)
        }
    };
}

/// Every endpoint of the control API.
pub fn endpoints() -> Vec<Endpoint> {
    use crate::{
        apikeys, audit, business, catalog, channels, credit_notes, identity, inbox, meters,
        payments, query, stripe, subscriptions, tenants, usage,
    };
    use Access::{Public, SignedIn};
    use Perm::*;
    let p = Access::Perm;
    vec![
        ep!(GET "/healthz", Public, "operations", 200, healthz, "Liveness"),
        ep!(GET "/metrics", Public, "operations", 200, business::metrics,
            "Business metrics (Prometheus): subscriptions, MRR, ARPU, invoices, payment failures, notifications"),
        // Identity: signing in and tokens.
        ep!(POST "/api/v1/auth/login", Public, "auth", 200, identity::login,
            "Sign in with email and password; answers tokens, or an MFA challenge", identity::LoginRequest),
        ep!(POST "/api/v1/auth/login/mfa", Public, "auth", 200, identity::login_mfa,
            "Second factor: a TOTP code or a recovery code", identity::MfaRequest),
        ep!(POST "/api/v1/auth/refresh", Public, "auth", 200, identity::refresh,
            "Exchange a refresh token for new tokens (the old one is spent; reuse revokes the session)",
            identity::RefreshRequest),
        ep!(POST "/api/v1/auth/logout", Public, "auth", 204, identity::logout,
            "End the session of a refresh token", identity::RefreshRequest),
        ep!(POST "/api/v1/auth/verify-email", Public, "auth", 204, identity::verify_email,
            "Confirm an email address with the token sent to it", identity::TokenRequest),
        ep!(POST "/api/v1/auth/password-reset", Public, "auth", 202, identity::request_reset,
            "Send a password reset token (answers 202 whether or not the address exists)",
            identity::ResetRequest),
        ep!(POST "/api/v1/auth/password-reset/confirm", Public, "auth", 204, identity::confirm_reset,
            "Set a new password with a reset token; ends every session", identity::ResetConfirm),
        // The signed-in person.
        ep!(GET "/api/v1/me", SignedIn, "me", 200, identity::me, "The signed-in person"),
        ep!(POST "/api/v1/me/password", SignedIn, "me", 204, identity::change_password,
            "Change the password; ends the other sessions", identity::PasswordChange),
        ep!(GET "/api/v1/me/sessions", SignedIn, "me", 200, identity::list_sessions,
            "Sessions (devices) of the signed-in person"),
        ep!(DELETE "/api/v1/me/sessions/{id}", SignedIn, "me", 204, identity::revoke_session,
            "Revoke one session"),
        ep!(GET "/api/v1/me/login-history", SignedIn, "me", 200, identity::login_history,
            "Sign-in attempts on this account, newest first"),
        ep!(POST "/api/v1/me/2fa/setup", SignedIn, "me", 200, identity::totp_setup,
            "Start TOTP enrolment: a new secret and its otpauth:// URI"),
        ep!(POST "/api/v1/me/2fa/enable", SignedIn, "me", 200, identity::totp_enable,
            "Confirm enrolment with a code; answers one-time recovery codes (shown once)",
            identity::CodeRequest),
        ep!(POST "/api/v1/me/2fa/disable", SignedIn, "me", 204, identity::totp_disable,
            "Turn TOTP off (password and a current code needed)", identity::TotpDisable),
        // People of the tenant.
        ep!(GET "/api/v1/users", p(UsersRead), "users", 200, identity::list_users,
            "Users of the tenant (filters: role, email; cursor pagination)"),
        ep!(POST "/api/v1/users", p(UsersWrite), "users", 201, identity::create_user,
            "Create a user; a verification email is queued", identity::NewUser),
        ep!(GET "/api/v1/users/{id}", p(UsersRead), "users", 200, identity::get_user, "One user"),
        ep!(PATCH "/api/v1/users/{id}", p(UsersWrite), "users", 200, identity::update_user,
            "Change a user's name or role, or disable them (ends their sessions)", identity::UserPatch),
        // API keys.
        ep!(GET "/api/v1/api-keys", p(KeysRead), "api-keys", 200, apikeys::list,
            "API keys of the tenant (never their secrets; cursor pagination)"),
        ep!(POST "/api/v1/api-keys", p(KeysWrite), "api-keys", 201, apikeys::create,
            "Create a key; its secret is in this answer only", apikeys::KeySpec),
        ep!(GET "/api/v1/api-keys/{id}", p(KeysRead), "api-keys", 200, apikeys::get_one, "One key"),
        ep!(PATCH "/api/v1/api-keys/{id}", p(KeysWrite), "api-keys", 200, apikeys::update,
            "Change a key's name, scopes, allowlist, rate limits or monthly quota", apikeys::KeyPatch),
        ep!(POST "/api/v1/api-keys/{id}/rotate", p(KeysWrite), "api-keys", 201, apikeys::rotate,
            "A new key with the same settings; the old one works for a grace period", apikeys::Rotate),
        ep!(POST "/api/v1/api-keys/{id}/revoke", p(KeysWrite), "api-keys", 200, apikeys::revoke,
            "Revoke a key (the ingest edge refuses it within its cache bound)"),
        // Audit.
        ep!(GET "/api/v1/audit-log", p(AuditRead), "audit", 200, audit::list,
            "Mutations by users and keys, newest first (filters: actor_id, action, object_kind, object_id, since, until)"),
        // Cross-tenant administration.
        ep!(GET "/api/v1/tenants", p(TenantsAdmin), "tenants", 200, tenants::list, "Every tenant"),
        ep!(POST "/api/v1/tenants", p(TenantsAdmin), "tenants", 201, tenants::create,
            "Create a tenant", tenants::NewTenant),
        ep!(POST "/api/v1/tenants/{id}/users", p(TenantsAdmin), "tenants", 201, tenants::create_user,
            "Create a user in any tenant (e.g. its first org_admin)", identity::NewUser),
        // Metering (OpenMeter v1).
        ep!(GET "/api/v1/meters", p(MetersRead), "meters", 200, meters::list, "Meters"),
        ep!(POST "/api/v1/meters", p(MetersWrite), "meters", 201, meters::create, "Create a meter", meters::NewMeter),
        ep!(GET "/api/v1/meters/{id_or_slug}", p(MetersRead), "meters", 200, meters::get_one, "One meter"),
        ep!(DELETE "/api/v1/meters/{id_or_slug}", p(MetersWrite), "meters", 204, meters::delete,
            "Delete a meter (its stored usage stays)"),
        ep!(GET "/api/v1/meters/{id_or_slug}/query", p(UsageRead), "meters", 200, query::query,
            "Query a meter's usage (from, to, windowSize, windowTimeZone, subject, groupBy, filterGroupBy)"),
        ep!(GET "/api/v1/usage/outcomes", p(UsageRead), "meters", 200, usage::outcomes,
            "Events received, accepted, duplicate and rejected, per reason"),
        // Catalog and billing.
        ep!(GET "/api/v1/plans", p(CatalogRead), "catalog", 200, catalog::list_plans,
            "Plans (filter: tier; cursor pagination)"),
        ep!(POST "/api/v1/plans", p(CatalogWrite), "catalog", 201, catalog::create_plan,
            "Create a plan with its first version", catalog::NewPlan),
        ep!(GET "/api/v1/plans/{key}", p(CatalogRead), "catalog", 200, catalog::get_plan, "One plan"),
        ep!(POST "/api/v1/plans/{key}/versions", p(CatalogWrite), "catalog", 201, catalog::create_version,
            "Add a plan version (versions are immutable)", catalog::NewVersion),
        ep!(GET "/api/v1/tax-rates", p(CatalogRead), "catalog", 200, catalog::list_tax_rates,
            "Tax rates (cursor pagination)"),
        ep!(PUT "/api/v1/tax-rates/{region}", p(CatalogWrite), "catalog", 200, catalog::put_tax_rate,
            "Set a region's tax rate", catalog::NewTaxRate),
        ep!(GET "/api/v1/customers", p(CatalogRead), "catalog", 200, catalog::list_customers,
            "Customers (filters: currency, subject; cursor pagination)"),
        ep!(POST "/api/v1/customers", p(CatalogWrite), "catalog", 201, catalog::create_customer,
            "Create a customer", catalog::NewCustomer),
        ep!(GET "/api/v1/customers/{key}", p(CatalogRead), "catalog", 200, catalog::get_customer,
            "One customer"),
        ep!(GET "/api/v1/subscriptions", p(CatalogRead), "catalog", 200, catalog::list_subscriptions,
            "Subscriptions (filters: customer, plan, status; cursor pagination)"),
        ep!(POST "/api/v1/subscriptions", p(CatalogWrite), "catalog", 201, catalog::create_subscription,
            "Subscribe a customer to a plan version", catalog::NewSubscription),
        ep!(GET "/api/v1/subscriptions/{id}", p(CatalogRead), "catalog", 200, catalog::get_subscription,
            "One subscription"),
        ep!(POST "/api/v1/subscriptions/{id}/cancel", p(CatalogWrite), "catalog", 200, subscriptions::cancel,
            "Cancel now, or at the end of the current period (`{\"at\": \"period_end\"}`)", subscriptions::When),
        ep!(POST "/api/v1/subscriptions/{id}/resume", p(CatalogWrite), "catalog", 200, subscriptions::resume,
            "Undo a scheduled cancel or plan change"),
        ep!(POST "/api/v1/subscriptions/{id}/auto-renew", p(CatalogWrite), "catalog", 200, subscriptions::auto_renew,
            "Auto-renew on or off (off: the subscription expires at the end of the current period)",
            subscriptions::AutoRenew),
        ep!(POST "/api/v1/subscriptions/{id}/change-plan", p(CatalogWrite), "catalog", 201, subscriptions::change_plan,
            "Upgrade or downgrade now (with proration) or at the end of the period", subscriptions::PlanChange),
        ep!(GET "/api/v1/subscriptions/{id}/events", p(CatalogRead), "catalog", 200, subscriptions::events,
            "The subscription's domain events (every transition)"),
        ep!(POST "/api/v1/invoices/{id}/payment-failed", p(InvoicesWrite), "invoices", 200,
            subscriptions::invoice_payment_failed,
            "Record a failed collection: the subscription goes past due (grace period starts)"),
        ep!(GET "/api/v1/invoices", p(InvoicesRead), "invoices", 200, catalog::list_invoices,
            "Invoices (filters: period, customer, status; cursor pagination)"),
        ep!(GET "/api/v1/invoices/{id}", p(InvoicesRead), "invoices", 200, catalog::get_invoice,
            "One invoice with its lines"),
        ep!(POST "/api/v1/invoices/{id}/issue", p(InvoicesWrite), "invoices", 200, catalog::issue_invoice,
            "Issue a draft (next gapless number; `?early=true` before the period ends)"),
        ep!(POST "/api/v1/invoices/{id}/void", p(InvoicesWrite), "invoices", 200, catalog::void_invoice,
            "Void a draft or issued invoice"),
        ep!(POST "/api/v1/invoices/{id}/mark-paid", p(InvoicesWrite), "invoices", 200, catalog::mark_paid,
            "Record an issued invoice as paid"),
        ep!(GET "/api/v1/invoices/{id}/html", p(InvoicesRead), "invoices", 200, catalog::invoice_html,
            "The invoice as an HTML page"),
        // Credit notes, payments, refunds.
        ep!(POST "/api/v1/invoices/{id}/credit-notes", p(InvoicesWrite), "payments", 201, credit_notes::create,
            "Credit an issued or paid invoice (per line, or `full`); numbered per tenant", credit_notes::NewCreditNote),
        ep!(GET "/api/v1/invoices/{id}/credit-notes", p(InvoicesRead), "payments", 200, credit_notes::list,
            "The invoice's credit notes, what they credit and what is still due"),
        ep!(GET "/api/v1/credit-notes/{id}", p(InvoicesRead), "payments", 200, credit_notes::get_one,
            "One credit note"),
        ep!(POST "/api/v1/invoices/{id}/payments", p(InvoicesWrite), "payments", 201, payments::create,
            "Charge an issued invoice through a provider (sandbox test cards, or Stripe)", payments::NewPayment),
        ep!(GET "/api/v1/payments", p(InvoicesRead), "payments", 200, payments::list,
            "Payments (filters: invoice, status; cursor pagination)"),
        ep!(GET "/api/v1/payments/{id}", p(InvoicesRead), "payments", 200, payments::get_one,
            "One payment with its refunds"),
        ep!(POST "/api/v1/payments/{id}/refresh", p(InvoicesWrite), "payments", 200, payments::refresh,
            "Ask the provider about a pending payment and apply its answer"),
        ep!(POST "/api/v1/payments/{id}/refunds", p(InvoicesWrite), "payments", 201, payments::refund,
            "Refund a succeeded payment, fully (default) or partly", payments::NewRefund),
        ep!(POST "/api/v1/webhooks/stripe", Public, "payments", 200, stripe::webhook,
            "Stripe's webhook events (verified by their Stripe-Signature; replays refused)"),
        // Notifications.
        ep!(GET "/api/v1/notification-channels", p(NotificationsRead), "notifications", 200, channels::list,
            "Notification channels of the tenant"),
        ep!(POST "/api/v1/notification-channels", p(NotificationsWrite), "notifications", 201, channels::create,
            "Add a webhook, email or inbox channel (a webhook's signing secret is shown once)", channels::NewChannel),
        ep!(DELETE "/api/v1/notification-channels/{id}", p(NotificationsWrite), "notifications", 204, channels::delete,
            "Disable a channel"),
        ep!(GET "/api/v1/notification-channels/{id}/deliveries", p(NotificationsRead), "notifications", 200,
            channels::deliveries, "The channel's messages and every delivery attempt"),
        ep!(GET "/api/v1/notification-templates", p(NotificationsRead), "notifications", 200, channels::list_templates,
            "Templates of every notification kind"),
        ep!(PUT "/api/v1/notification-templates/{kind}", p(NotificationsWrite), "notifications", 200,
            channels::put_template, "Replace a kind's subject and body (`{{name}}` placeholders)", channels::TemplateBody),
        ep!(GET "/api/v1/me/notifications", SignedIn, "me", 200, inbox::list,
            "The inbox (filters: category, state = inbox|unread|read|archived|all; cursor pagination)"),
        ep!(POST "/api/v1/me/notifications/read-all", SignedIn, "me", 200, inbox::read_all,
            "Mark every inbox item read"),
        ep!(POST "/api/v1/me/notifications/{id}/read", SignedIn, "me", 200, inbox::read, "Mark an item read"),
        ep!(POST "/api/v1/me/notifications/{id}/unread", SignedIn, "me", 200, inbox::unread, "Mark an item unread"),
        ep!(POST "/api/v1/me/notifications/{id}/archive", SignedIn, "me", 200, inbox::archive, "Archive an item"),
        ep!(POST "/api/v1/me/notifications/{id}/unarchive", SignedIn, "me", 200, inbox::unarchive,
            "Bring an item back from the archive"),
        ep!(GET "/api/v1/me/notifications/stream", SignedIn, "me", 101, inbox::stream,
            "WebSocket: each new inbox item as a JSON message"),
    ]
}

async fn healthz() -> &'static str {
    "ok"
}

fn table() -> &'static HashMap<(Method, &'static str), Access> {
    static T: OnceLock<HashMap<(Method, &'static str), Access>> = OnceLock::new();
    T.get_or_init(|| {
        endpoints()
            .into_iter()
            .map(|e| ((e.method, e.path), e.access))
            .collect()
    })
}

/// The access rule of a matched route.
pub fn access_of(method: &Method, path: &str) -> Option<Access> {
    let m = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    table().get(&(m.clone(), path)).copied()
}

/// Accepts a caller's `X-Request-Id` when it is short and plain; otherwise makes one. The id is
/// in the response header, in error bodies, in the log span of the request and in audit rows.
async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let started = std::time::Instant::now();
    let mut resp = REQUEST_ID
        .scope(id.clone(), next.run(req).instrument(span.clone()))
        .await;
    span.in_scope(|| {
        tracing::info!(
            status = resp.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "served"
        );
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The application: every endpoint of the table behind the layers, plus `/openapi.json` and the
/// Swagger UI at `/docs`.
pub fn router(state: AppState) -> Router {
    let mut r = Router::new();
    for e in endpoints() {
        r = r.route(e.path, (e.handler)());
    }
    let api = r
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(from_fn_with_state(state.clone(), crate::audit::record))
        .layer(from_fn_with_state(state.clone(), crate::idempotency::layer))
        .layer(from_fn_with_state(state.clone(), crate::auth::authorize))
        .with_state(state);
    let doc: utoipa::openapi::OpenApi =
        serde_json::from_value(openapi()).expect("the generated OpenAPI document parses");
    let docs: Router = utoipa_swagger_ui::SwaggerUi::new("/docs")
        .url("/openapi.json", doc)
        .into();
    api.merge(docs).layer(from_fn(request_id))
}

fn who(access: Access) -> (String, String) {
    match access {
        Access::Public => ("public".into(), "No credentials needed.".into()),
        Access::SignedIn => (
            "signed-in".into(),
            "A signed-in person's access token (not an API key).".into(),
        ),
        Access::Perm(p) => {
            let roles: Vec<&str> = Role::ALL
                .into_iter()
                .filter(|r| role_allows(*r, p))
                .map(Role::as_str)
                .collect();
            let scopes: Vec<&str> = SCOPES
                .into_iter()
                .filter(|s| scope_allows(&[s.to_string()], p))
                .collect();
            (
                p.as_str().into(),
                format!(
                    "Permission `{}`: roles {}; API key scopes {}.",
                    p.as_str(),
                    roles.join(", "),
                    if scopes.is_empty() {
                        "none".to_string()
                    } else {
                        scopes.join(", ")
                    }
                ),
            )
        }
    }
}

/// The OpenAPI 3 document, generated from [`endpoints`] and the permission matrix.
pub fn openapi() -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    for e in endpoints() {
        let (perm, description) = who(e.access);
        let mut params: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if e.method == Method::POST && e.access != Access::Public {
            params.push(json!({
                "name": "Idempotency-Key", "in": "header", "required": false,
                "description": "Same key and body within 24 h: the first answer again, never a second object. Same key, other body: 422.",
                "schema": {"type": "string", "maxLength": 255}
            }));
        }
        let mut responses = Map::new();
        responses.insert(e.status.to_string(), json!({"description": "Success"}));
        for (code, what) in [
            ("400", "Invalid input; `field` names the field at fault"),
            ("401", "Missing, invalid or expired credentials"),
            (
                "403",
                "The caller's role or key scopes do not grant the permission",
            ),
            ("404", "Not found (also for another tenant's ids)"),
        ] {
            responses.insert(
                code.into(),
                json!({"description": what, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}),
            );
        }
        let mut op = json!({
            "operationId": format!("{}_{}", e.method.as_str().to_lowercase(), e.path.trim_start_matches('/').replace(['/', '{', '}', '-'], "_")),
            "summary": e.summary,
            "description": description,
            "tags": [e.tag],
            "parameters": params,
            "responses": responses,
            "security": if e.access == Access::Public { json!([]) } else { json!([{"bearer": []}]) },
            "x-permission": perm,
        });
        if let Some(body) = e.body {
            let b = body();
            if let Some(c) = b["components"].as_object() {
                schemas.extend(c.clone());
            }
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": b["schema"]}}});
        }
        let item = paths.entry(e.path.to_string()).or_insert_with(|| json!({}));
        item[e.method.as_str().to_lowercase()] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "metering control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Tenants, users, API keys, meters (OpenMeter v1), plans, customers, subscriptions, invoices. Errors are application/problem+json with a stable `code`, the `field` at fault and the `request_id`."
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key (mk_…) or a person's access token (mat_…)"}},
            "schemas": problem_and(schemas),
        }
    })
}

fn problem_and(mut schemas: Map<String, Value>) -> Value {
    schemas.insert(
        "Problem".into(),
        json!({
                "type": "object",
                "required": ["status", "code", "detail"],
                "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"},
                    "status": {"type": "integer"}, "detail": {"type": "string"},
                    "code": {"type": "string", "description": "Stable, machine-readable"},
                    "field": {"type": ["string", "null"]},
                    "request_id": {"type": ["string", "null"]}
                }
        }),
    );
    Value::Object(schemas)
}

/// `docs/rbac.md`: the matrix and every endpoint with its permission.
pub fn docs_markdown() -> String {
    let mut s = crate::rbac::matrix_markdown();
    s.push_str("\n## Endpoints\n\n| method | path | permission |\n|---|---|---|\n");
    for e in endpoints() {
        s.push_str(&format!(
            "| {} | `{}` | `{}` |\n",
            e.method,
            e.path,
            who(e.access).0
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_match_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/rbac.md");
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(path, docs_markdown()).expect("write docs/rbac.md");
            return;
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            on_disk,
            docs_markdown(),
            "docs/rbac.md is stale: run UPDATE_DOCS=1 cargo test -p control-api docs_match"
        );
    }

    #[test]
    fn every_endpoint_is_unique_and_documented() {
        let all = endpoints();
        let doc = openapi();
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            assert!(
                seen.insert((e.method.clone(), e.path)),
                "{e:?} listed twice"
            );
            let op = &doc["paths"][e.path][e.method.as_str().to_lowercase()];
            assert!(op.is_object(), "{e:?} missing from the OpenAPI document");
            assert_eq!(op["x-permission"], who(e.access).0);
        }
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|x| refs(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
                _ => {}
            }
        }
        let mut all_refs = Vec::new();
        refs(&doc, &mut all_refs);
        assert!(all_refs.iter().any(|r| r.ends_with("/Problem")));
        for r in all_refs {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{r} dangles"
            );
        }
        let parsed: Result<utoipa::openapi::OpenApi, _> = serde_json::from_value(doc);
        assert!(
            parsed.is_ok(),
            "the document parses as OpenAPI 3: {:?}",
            parsed.err()
        );
    }
}
