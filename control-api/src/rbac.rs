//! Roles, permissions and the permission matrix: the one place that says who may do what.
//!
//! Every endpoint names one [`Access`] in the endpoint table (`routes.rs`); the authentication
//! middleware checks it against [`role_allows`] (people) or [`scope_allows`] (API keys) before the
//! handler runs. `docs/rbac.md` is generated from this file and the route table
//! (`routes::docs_markdown`) and a test keeps the two equal.
//!
//! Tenancy: every permission except [`Perm::TenantsAdmin`] acts inside the caller's own tenant.
//! `sys_admin` alone crosses tenants, and only through the endpoints guarded by `TenantsAdmin`
//! (`/api/v1/tenants…`: list and create tenants, create a tenant's first users).

use serde::{Deserialize, Serialize};

/// A person's role within their tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    OrgAdmin,
    SysAdmin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::User, Role::OrgAdmin, Role::SysAdmin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::OrgAdmin => "org_admin",
            Role::SysAdmin => "sys_admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    MetersRead,
    MetersWrite,
    UsageRead,
    CatalogRead,
    CatalogWrite,
    InvoicesRead,
    InvoicesWrite,
    KeysRead,
    KeysWrite,
    UsersRead,
    UsersWrite,
    AuditRead,
    NotificationsRead,
    NotificationsWrite,
    /// Cross-tenant administration (sys_admin only).
    TenantsAdmin,
}

impl Perm {
    pub const ALL: [Perm; 15] = [
        Perm::MetersRead,
        Perm::MetersWrite,
        Perm::UsageRead,
        Perm::CatalogRead,
        Perm::CatalogWrite,
        Perm::InvoicesRead,
        Perm::InvoicesWrite,
        Perm::KeysRead,
        Perm::KeysWrite,
        Perm::UsersRead,
        Perm::UsersWrite,
        Perm::AuditRead,
        Perm::NotificationsRead,
        Perm::NotificationsWrite,
        Perm::TenantsAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Perm::MetersRead => "meters:read",
            Perm::MetersWrite => "meters:write",
            Perm::UsageRead => "usage:read",
            Perm::CatalogRead => "catalog:read",
            Perm::CatalogWrite => "catalog:write",
            Perm::InvoicesRead => "invoices:read",
            Perm::InvoicesWrite => "invoices:write",
            Perm::KeysRead => "keys:read",
            Perm::KeysWrite => "keys:write",
            Perm::UsersRead => "users:read",
            Perm::UsersWrite => "users:write",
            Perm::AuditRead => "audit:read",
            Perm::NotificationsRead => "notifications:read",
            Perm::NotificationsWrite => "notifications:write",
            Perm::TenantsAdmin => "tenants:admin",
        }
    }
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Anyone, without credentials (login, token refresh, password reset, health, docs).
    Public,
    /// A signed-in person (not an API key): their own profile, sessions, 2FA.
    SignedIn,
    /// A person whose role, or a key whose scopes, grant the permission.
    Perm(Perm),
}

/// The matrix for people.
pub fn role_allows(role: Role, perm: Perm) -> bool {
    use Perm::*;
    match role {
        Role::User => matches!(
            perm,
            MetersRead | UsageRead | CatalogRead | InvoicesRead | NotificationsRead
        ),
        Role::OrgAdmin => perm != TenantsAdmin,
        Role::SysAdmin => true,
    }
}

/// The matrix for API keys. `read` reads the metering and billing data; `admin` also changes it
/// and manages keys and reads the audit log; people (users) are managed by people only. `ingest`
/// grants nothing here (it is for the ingest edge).
pub fn scope_allows(scopes: &[String], perm: Perm) -> bool {
    use Perm::*;
    let has = |s: &str| scopes.iter().any(|x| x == s);
    let read = matches!(
        perm,
        MetersRead | UsageRead | CatalogRead | InvoicesRead | NotificationsRead
    );
    let admin = read
        || matches!(
            perm,
            MetersWrite
                | CatalogWrite
                | InvoicesWrite
                | KeysRead
                | KeysWrite
                | AuditRead
                | NotificationsWrite
        );
    (read && has("read")) || (admin && has("admin"))
}

/// The scopes a key may carry.
pub const SCOPES: [&str; 3] = ["ingest", "read", "admin"];

/// The matrix as a Markdown table (what `docs/rbac.md` holds).
pub fn matrix_markdown() -> String {
    let mut s = String::from(
        "# Permission matrix\n\n\
         Generated from `control-api/src/rbac.rs` (a test keeps this file equal to it).\n\
         Every endpoint of the control API names one permission (see `/openapi.json`, field\n\
         `x-permission`, or `/docs`); `public` endpoints need no credentials and `signed-in`\n\
         endpoints need a person's access token (not an API key).\n\n\
         Every permission acts inside the caller's own tenant, except `tenants:admin`: only\n\
         `sys_admin` holds it, and only the `/api/v1/tenants…` endpoints use it (list and create\n\
         tenants, create a tenant's users). Another tenant's ids answer 404 everywhere else.\n\n\
         | permission | user | org_admin | sys_admin | key `ingest` | key `read` | key `admin` |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let yes = |b: bool| if b { "yes" } else { "—" };
    for p in Perm::ALL {
        s.push_str(&format!("| `{}` |", p.as_str()));
        for r in Role::ALL {
            s.push_str(&format!(" {} |", yes(role_allows(r, p))));
        }
        for scope in SCOPES {
            s.push_str(&format!(
                " {} |",
                yes(scope_allows(&[scope.to_string()], p))
            ));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_cells_stated_independently() {
        assert!(role_allows(Role::User, Perm::MetersRead));
        assert!(!role_allows(Role::User, Perm::KeysWrite));
        assert!(!role_allows(Role::OrgAdmin, Perm::TenantsAdmin));
        assert!(role_allows(Role::SysAdmin, Perm::TenantsAdmin));
        let s = |x: &str| vec![x.to_string()];
        assert!(!scope_allows(&s("ingest"), Perm::MetersRead));
        assert!(scope_allows(&s("read"), Perm::InvoicesRead));
        assert!(!scope_allows(&s("read"), Perm::KeysRead));
        assert!(scope_allows(&s("admin"), Perm::KeysWrite));
        assert!(!scope_allows(&s("admin"), Perm::UsersWrite));
        assert!(!scope_allows(&s("admin"), Perm::TenantsAdmin));
    }
}
