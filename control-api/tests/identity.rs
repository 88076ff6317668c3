//! Identity, RBAC, API keys, audit and idempotency against the real PostgreSQL.

mod common;

use common::{Api, PASSWORD};
use control_api::rbac::{role_allows, scope_allows, Access, Role};
use control_api::routes::endpoints;
use serde_json::{json, Value};
use totp_rs::{Algorithm, Secret, TOTP};

/// The path of an endpoint with every parameter replaced by an id nobody has.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| {
            if s.starts_with('{') {
                "00000000-0000-4000-8000-000000000000"
            } else {
                s
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn rbac_matrix_every_endpoint_every_role_and_scope() {
    let api = Api::start().await;
    let mut people = Vec::new();
    for role in Role::ALL {
        let email = format!("{}@a.example", role.as_str());
        people.push((role, api.person(api.a, &email, role.as_str()).await));
    }
    let mut keys = Vec::new();
    for scope in ["ingest", "read", "admin"] {
        keys.push((scope, api.api_key(api.a, &[scope]).await));
    }
    let mut checked = 0;
    for e in endpoints() {
        let path = concrete(e.path);
        let method = e.method.as_str();
        let body = (method != "GET" && method != "DELETE").then(|| json!({}));
        let anon = api.call(method, &path, "", body.clone()).await;
        if e.access == Access::Public {
            assert_ne!(anon.status, 401, "{method} {path} is public: {}", anon.text);
            continue;
        }
        assert_eq!(anon.status, 401, "{method} {path} without credentials");
        for (role, token) in &people {
            let allowed = match e.access {
                Access::SignedIn => true,
                Access::Perm(p) => role_allows(*role, p),
                Access::Public => unreachable!(),
            };
            let r = api.call(method, &path, token, body.clone()).await;
            if allowed {
                assert!(
                    r.status != 401 && r.status != 403,
                    "{method} {path} as {role:?} must be allowed: {} {}",
                    r.status,
                    r.text
                );
            } else {
                assert_eq!(r.status, 403, "{method} {path} as {role:?}: {}", r.text);
                assert_eq!(r.code(), "forbidden");
            }
            checked += 1;
        }
        for (scope, key) in &keys {
            let allowed = match e.access {
                Access::SignedIn => false,
                Access::Perm(p) => scope_allows(&[scope.to_string()], p),
                Access::Public => unreachable!(),
            };
            let r = api.call(method, &path, key, body.clone()).await;
            if allowed {
                assert!(
                    r.status != 401 && r.status != 403,
                    "{method} {path} with a `{scope}` key must be allowed: {} {}",
                    r.status,
                    r.text
                );
            } else {
                assert_eq!(
                    r.status, 403,
                    "{method} {path} with a `{scope}` key: {}",
                    r.text
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 250, "{checked} cells checked");
    // A few cells stated without the matrix.
    let (_, user) = &people[0];
    let (_, org_admin) = &people[1];
    assert_eq!(
        api.call("GET", "/api/v1/meters", user, None).await.status,
        200
    );
    assert_eq!(
        api.call("POST", "/api/v1/api-keys", user, Some(json!({})))
            .await
            .status,
        403
    );
    assert_eq!(
        api.call("GET", "/api/v1/tenants", org_admin, None)
            .await
            .status,
        403
    );
    assert_eq!(
        api.call("GET", "/api/v1/audit-log", org_admin, None)
            .await
            .status,
        200
    );
    // Only a sys_admin may make a sys_admin.
    let r = api
        .call(
            "POST",
            "/api/v1/users",
            org_admin,
            Some(json!({"email": "boss@a.example", "role": "sys_admin", "password": PASSWORD})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // Garbage and tampered credentials.
    assert_eq!(
        api.call("GET", "/api/v1/meters", "mat_nonsense", None)
            .await
            .code(),
        "invalid_token"
    );
    assert_eq!(
        api.call("GET", "/api/v1/meters", "mk_short", None)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let api = Api::start().await;
    let admin_a = api.person(api.a, "admin@a.example", "org_admin").await;
    let key_a = api.api_key(api.a, &["admin"]).await;
    let user_b = api.user(api.b, "someone@b.example", "user").await;
    let admin_b = api.person(api.b, "admin@b.example", "org_admin").await;
    let made = api
        .call(
            "POST",
            "/api/v1/api-keys",
            &admin_b,
            Some(json!({"name": "b's", "scopes": ["read"]})),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let key_b = made.json["id"].as_str().expect("id").to_string();
    let sessions_b = api.call("GET", "/api/v1/me/sessions", &admin_b, None).await;
    let session_b = sessions_b.json["items"][0]["id"]
        .as_str()
        .expect("sid")
        .to_string();
    for cred in [&admin_a, &key_a] {
        for (method, path, body) in [
            ("GET", format!("/api/v1/users/{user_b}"), None),
            (
                "PATCH",
                format!("/api/v1/users/{user_b}"),
                Some(json!({"name": "x"})),
            ),
            ("GET", format!("/api/v1/api-keys/{key_b}"), None),
            (
                "PATCH",
                format!("/api/v1/api-keys/{key_b}"),
                Some(json!({"name": "x"})),
            ),
            ("POST", format!("/api/v1/api-keys/{key_b}/rotate"), None),
            ("POST", format!("/api/v1/api-keys/{key_b}/revoke"), None),
            ("DELETE", format!("/api/v1/me/sessions/{session_b}"), None),
        ] {
            let r = api.call(method, &path, cred, body.clone()).await;
            if path.contains("/me/") && cred == &key_a {
                assert_eq!(r.status, 403, "{method} {path}");
                continue;
            }
            if path.contains("/users/") && cred == &key_a {
                assert_eq!(r.status, 403, "keys do not manage people: {method} {path}");
                continue;
            }
            assert_eq!(r.status, 404, "{method} {path}: {}", r.text);
            // The same answer as for an id that exists nowhere.
            let nowhere = path
                .replace(&key_b, "00000000-0000-4000-8000-000000000000")
                .replace(&user_b.to_string(), "00000000-0000-4000-8000-000000000000")
                .replace(&session_b, "00000000-0000-4000-8000-000000000000");
            let n = api.call(method, &nowhere, cred, body).await;
            assert_eq!(
                (n.status, n.code()),
                (r.status, r.code()),
                "{method} {path}"
            );
        }
        let users = api.call("GET", "/api/v1/users", &admin_a, None).await;
        assert!(!users.text.contains("b.example"), "{}", users.text);
        let keys = api.call("GET", "/api/v1/api-keys", cred, None).await;
        assert!(!keys.text.contains(&key_b));
        let audit = api.call("GET", "/api/v1/audit-log", cred, None).await;
        assert_eq!(audit.status, 200);
        assert!(
            !audit.text.contains(&key_b),
            "A's audit log shows nothing of B"
        );
    }
    // B's key and session still work: nothing above touched them.
    let still = api
        .call("GET", &format!("/api/v1/api-keys/{key_b}"), &admin_b, None)
        .await;
    assert_eq!(still.json["status"], "active");
    assert_eq!(
        api.call("GET", "/api/v1/me", &admin_b, None).await.status,
        200
    );
}

#[tokio::test]
async fn tokens_refresh_rotation_reuse_expiry_and_tampering() {
    let api = Api::start().await;
    let uid = api.user(api.a, "ann@a.example", "user").await;
    let first = api.login("Ann@A.example ", PASSWORD).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let access = first.json["access_token"]
        .as_str()
        .expect("access")
        .to_string();
    let refresh = first.json["refresh_token"]
        .as_str()
        .expect("refresh")
        .to_string();
    let me = api.call("GET", "/api/v1/me", &access, None).await;
    assert_eq!(me.json["id"], json!(uid));
    assert!(me.headers.contains_key("x-request-id"));
    let traced = api
        .call_h(
            "GET",
            "/api/v1/me",
            &access,
            &[("x-request-id", "trace-123")],
            None,
        )
        .await;
    assert_eq!(traced.headers["x-request-id"], "trace-123");
    let err = api
        .call_h(
            "GET",
            "/api/v1/nowhere",
            "",
            &[("x-request-id", "trace-456")],
            None,
        )
        .await;
    assert_eq!(
        err.json["request_id"], "trace-456",
        "errors name their request"
    );

    // Tampered: a signature from another key, a changed payload.
    let other = control_api::crypto::ServerKey::ephemeral();
    let sid = first.json["session_id"].as_str().expect("sid");
    let forged = format!(
        "mat_{}",
        other
            .sign_token(format!(r#"{{"typ":"access","sub":"{sid}","exp":9999999999}}"#).as_bytes())
    );
    assert_eq!(
        api.call("GET", "/api/v1/me", &forged, None).await.code(),
        "invalid_token"
    );
    let mut flipped = access.clone().into_bytes();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    assert_eq!(
        api.call("GET", "/api/v1/me", &flipped, None).await.status,
        401
    );
    // Expired: signed by the server's key, but past its time.
    let expired = format!(
        "mat_{}",
        api.key
            .sign_token(format!(r#"{{"typ":"access","sub":"{sid}","exp":1000}}"#).as_bytes())
    );
    assert_eq!(
        api.call("GET", "/api/v1/me", &expired, None).await.code(),
        "token_expired"
    );
    // An MFA token is not an access token.
    let wrong_type = format!(
        "mat_{}",
        api.key
            .sign_token(format!(r#"{{"typ":"mfa","sub":"{uid}","exp":9999999999}}"#).as_bytes())
    );
    assert_eq!(
        api.call("GET", "/api/v1/me", &wrong_type, None)
            .await
            .code(),
        "invalid_token"
    );

    // Refresh rotates; the spent token used again revokes the whole session.
    let second = api
        .call(
            "POST",
            "/api/v1/auth/refresh",
            "",
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(second.status, 200, "{}", second.text);
    let refresh2 = second.json["refresh_token"]
        .as_str()
        .expect("r2")
        .to_string();
    let access2 = second.json["access_token"]
        .as_str()
        .expect("a2")
        .to_string();
    assert_ne!(refresh2, refresh);
    assert_eq!(
        api.call("GET", "/api/v1/me", &access2, None).await.status,
        200
    );
    let replay = api
        .call(
            "POST",
            "/api/v1/auth/refresh",
            "",
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(
        (replay.status, replay.code()),
        (401, "refresh_token_reused")
    );
    let after = api
        .call(
            "POST",
            "/api/v1/auth/refresh",
            "",
            Some(json!({"refresh_token": refresh2})),
        )
        .await;
    assert_eq!(
        after.code(),
        "session_revoked",
        "the thief's rotation dies with the session"
    );
    assert_eq!(
        api.call("GET", "/api/v1/me", &access2, None).await.code(),
        "session_revoked"
    );
    assert_eq!(
        api.call("GET", "/api/v1/me", &access, None).await.code(),
        "session_revoked"
    );

    // Sessions: two devices, one revoked from the other.
    let phone = api.login("ann@a.example", PASSWORD).await;
    let laptop = api.login("ann@a.example", PASSWORD).await;
    let phone_access = phone.json["access_token"].as_str().expect("a").to_string();
    let laptop_access = laptop.json["access_token"].as_str().expect("a").to_string();
    let list = api
        .call("GET", "/api/v1/me/sessions", &laptop_access, None)
        .await;
    assert_eq!(
        list.json["items"].as_array().map(Vec::len),
        Some(2),
        "{}",
        list.text
    );
    let phone_sid = phone.json["session_id"].as_str().expect("sid");
    let r = api
        .call(
            "DELETE",
            &format!("/api/v1/me/sessions/{phone_sid}"),
            &laptop_access,
            None,
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        api.call("GET", "/api/v1/me", &phone_access, None)
            .await
            .status,
        401
    );
    assert_eq!(
        api.call("GET", "/api/v1/me", &laptop_access, None)
            .await
            .status,
        200
    );
    // Logout ends the laptop's session.
    let out = api
        .call(
            "POST",
            "/api/v1/auth/logout",
            "",
            Some(json!({"refresh_token": laptop.json["refresh_token"]})),
        )
        .await;
    assert_eq!(out.status, 204);
    assert_eq!(
        api.call("GET", "/api/v1/me", &laptop_access, None)
            .await
            .status,
        401
    );

    // Wrong password and unknown address answer alike.
    let bad = api.login("ann@a.example", "not the password").await;
    let nobody = api.login("nobody@a.example", "not the password").await;
    assert_eq!((bad.status, bad.code()), (401, "invalid_credentials"));
    assert_eq!(
        (nobody.status, nobody.json["detail"].clone()),
        (401, bad.json["detail"].clone())
    );
    let fresh = api.login("ann@a.example", PASSWORD).await;
    let hist = api
        .call(
            "GET",
            "/api/v1/me/login-history?limit=2",
            fresh.json["access_token"].as_str().expect("a"),
            None,
        )
        .await;
    assert_eq!(hist.json["items"][0]["outcome"], "ok");
    assert_eq!(hist.json["items"][1]["outcome"], "bad_password");
    assert!(
        hist.json["next_cursor"].is_string(),
        "more pages: {}",
        hist.text
    );
}

#[tokio::test]
async fn lockout_backs_off_after_repeated_failures() {
    let api = Api::start_with(|s| s.lockout_after = 3).await;
    api.user(api.a, "lee@a.example", "user").await;
    for _ in 0..3 {
        assert_eq!(
            api.login("lee@a.example", "wrong wrong wrong").await.status,
            401
        );
    }
    let locked = api.login("lee@a.example", PASSWORD).await;
    assert_eq!(
        (locked.status, locked.code()),
        (429, "login_locked"),
        "{}",
        locked.text
    );
    let wait: u64 = locked.headers["retry-after"].parse().expect("seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    // A reset clears the lock.
    api.call(
        "POST",
        "/api/v1/auth/password-reset",
        "",
        Some(json!({"email": "lee@a.example"})),
    )
    .await;
    let token = api.outbox("reset_password").await[0]["token"]
        .as_str()
        .expect("t")
        .to_string();
    let r = api
        .call(
            "POST",
            "/api/v1/auth/password-reset/confirm",
            "",
            Some(json!({"token": token, "new_password": "a brand new passphrase"})),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(
        api.login("lee@a.example", "a brand new passphrase")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn email_verification_and_password_reset_through_the_outbox() {
    let api = Api::start().await;
    let admin = api.person(api.a, "root@a.example", "org_admin").await;
    let r = api
        .call(
            "POST",
            "/api/v1/users",
            &admin,
            Some(json!({"email": "New@A.example", "role": "user"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let generated = r.json["password"]
        .as_str()
        .expect("a generated password, shown once")
        .to_string();
    assert_eq!(r.json["email_verified"], false);
    let got = api
        .call(
            "GET",
            &format!("/api/v1/users/{}", r.json["id"].as_str().expect("id")),
            &admin,
            None,
        )
        .await;
    assert!(got.json.get("password").is_none(), "shown once only");
    // The verification token, sealed in the outbox, never in clear.
    let verify = api.outbox("verify_email").await;
    let mine = verify
        .iter()
        .find(|p| p["email"] == "new@a.example")
        .expect("queued");
    let token = mine["token"].as_str().expect("token").to_string();
    let raw: Vec<Vec<u8>> = api
        .db
        .query("SELECT payload_sealed FROM notification_outbox", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(raw
        .iter()
        .all(|b| !String::from_utf8_lossy(b).contains(&token)));
    let bad = api
        .call(
            "POST",
            "/api/v1/auth/verify-email",
            "",
            Some(json!({"token": "mvt_nope"})),
        )
        .await;
    assert_eq!(
        (bad.status, bad.json["field"].clone()),
        (400, json!("token"))
    );
    let ok = api
        .call(
            "POST",
            "/api/v1/auth/verify-email",
            "",
            Some(json!({"token": token})),
        )
        .await;
    assert_eq!(ok.status, 204, "{}", ok.text);
    let again = api
        .call(
            "POST",
            "/api/v1/auth/verify-email",
            "",
            Some(json!({"token": token})),
        )
        .await;
    assert_eq!(again.status, 400, "single use");
    let login = api.login("new@a.example", &generated).await;
    let access = login.json["access_token"].as_str().expect("a").to_string();
    assert_eq!(
        api.call("GET", "/api/v1/me", &access, None).await.json["email_verified"],
        true
    );

    // Reset: unknown addresses get the same answer and no message.
    let before = api.outbox("reset_password").await.len();
    let unknown = api
        .call(
            "POST",
            "/api/v1/auth/password-reset",
            "",
            Some(json!({"email": "ghost@a.example"})),
        )
        .await;
    assert_eq!(unknown.status, 202);
    assert_eq!(api.outbox("reset_password").await.len(), before);
    let known = api
        .call(
            "POST",
            "/api/v1/auth/password-reset",
            "",
            Some(json!({"email": "new@a.example"})),
        )
        .await;
    assert_eq!((known.status, known.json.clone()), (202, unknown.json));
    let token = api.outbox("reset_password").await.last().expect("queued")["token"]
        .as_str()
        .expect("t")
        .to_string();
    let short = api
        .call(
            "POST",
            "/api/v1/auth/password-reset/confirm",
            "",
            Some(json!({"token": token, "new_password": "short"})),
        )
        .await;
    assert_eq!(short.json["field"], "new_password");
    let done = api
        .call(
            "POST",
            "/api/v1/auth/password-reset/confirm",
            "",
            Some(json!({"token": token, "new_password": "another long passphrase"})),
        )
        .await;
    assert_eq!(done.status, 204, "{}", done.text);
    assert_eq!(
        api.call("GET", "/api/v1/me", &access, None).await.status,
        401,
        "sessions end on reset"
    );
    assert_eq!(api.login("new@a.example", &generated).await.status, 401);
    assert_eq!(
        api.login("new@a.example", "another long passphrase")
            .await
            .status,
        200
    );
}

fn totp(secret_b32: &str) -> TOTP {
    let bytes = Secret::Encoded(secret_b32.to_string())
        .to_bytes()
        .expect("base32");
    TOTP::new_unchecked(Algorithm::SHA1, 6, 1, 30, bytes)
}

fn step_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 30
}

#[tokio::test]
async fn totp_two_factor_with_replay_and_recovery_codes() {
    let api = Api::start().await;
    let access = api.person(api.a, "tia@a.example", "user").await;
    let setup = api
        .call("POST", "/api/v1/me/2fa/setup", &access, None)
        .await;
    assert_eq!(setup.status, 200, "{}", setup.text);
    let secret = setup.json["secret"].as_str().expect("secret").to_string();
    assert!(setup.json["otpauth_uri"]
        .as_str()
        .expect("uri")
        .starts_with("otpauth://totp/"));
    let stored: Option<Vec<u8>> = api
        .db
        .query_one(
            "SELECT totp_sealed FROM users WHERE email = 'tia@a.example'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    let t = totp(&secret);
    let wrong = api
        .call(
            "POST",
            "/api/v1/me/2fa/enable",
            &access,
            Some(json!({"code": "000000"})),
        )
        .await;
    let code = t.generate(step_now() * 30);
    let wrong_is_wrong = code != "000000";
    if wrong_is_wrong {
        assert_eq!(wrong.json["field"], "code");
    }
    assert!(
        !String::from_utf8_lossy(&stored.expect("sealed")).contains(&secret),
        "the TOTP secret is sealed"
    );
    let on = api
        .call(
            "POST",
            "/api/v1/me/2fa/enable",
            &access,
            Some(json!({"code": code})),
        )
        .await;
    assert_eq!(on.status, 200, "{}", on.text);
    let codes: Vec<String> =
        serde_json::from_value(on.json["recovery_codes"].clone()).expect("codes");
    assert_eq!(codes.len(), 10);

    // Password alone is not enough now.
    let first = api.login("tia@a.example", PASSWORD).await;
    assert_eq!(first.json["mfa_required"], true, "{}", first.text);
    assert!(first.json.get("access_token").is_none());
    let mfa = first.json["mfa_token"].as_str().expect("mfa").to_string();
    let mfa_call = |body: Value| api.call("POST", "/api/v1/auth/login/mfa", "", Some(body));
    // The code that enabled 2FA was spent: replay refused.
    let replay = mfa_call(json!({"mfa_token": mfa, "code": code})).await;
    assert_eq!((replay.status, replay.code()), (401, "invalid_code"));
    // The next step's code is inside the window and unused.
    let next = t.generate((step_now() + 1) * 30);
    let ok = mfa_call(json!({"mfa_token": mfa, "code": next})).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert!(ok.json["access_token"].as_str().is_some());
    let again = mfa_call(json!({"mfa_token": mfa, "code": next})).await;
    assert_eq!(again.code(), "invalid_code", "a code works once");
    // Tampered MFA token; an access token is not an MFA token.
    let tampered = format!("{}x", mfa);
    assert_eq!(
        mfa_call(json!({"mfa_token": tampered, "code": next}))
            .await
            .code(),
        "invalid_token"
    );
    assert_eq!(
        mfa_call(json!({"mfa_token": access, "code": next}))
            .await
            .code(),
        "invalid_token"
    );
    // Recovery codes: each once, in any case and with or without the dash.
    let rc = codes[0].to_uppercase();
    let by_code = mfa_call(json!({"mfa_token": mfa, "recovery_code": rc})).await;
    assert_eq!(by_code.status, 200, "{}", by_code.text);
    let twice = mfa_call(json!({"mfa_token": mfa, "recovery_code": codes[0]})).await;
    assert_eq!(twice.code(), "invalid_code");
    let plain = codes[1].replace('-', "");
    assert_eq!(
        mfa_call(json!({"mfa_token": mfa, "recovery_code": plain}))
            .await
            .status,
        200
    );
    // Disabling needs the password and a fresh code; a spent one is refused.
    let off = api
        .call(
            "POST",
            "/api/v1/me/2fa/disable",
            &access,
            Some(json!({"password": PASSWORD, "code": next})),
        )
        .await;
    assert_eq!(
        (off.status, off.json["field"].clone()),
        (400, json!("code"))
    );
    let off = api
        .call(
            "POST",
            "/api/v1/me/2fa/disable",
            &access,
            Some(json!({"password": "nope nope nope", "code": next})),
        )
        .await;
    assert_eq!(off.json["field"], "password");
    let setup_again = api
        .call("POST", "/api/v1/me/2fa/setup", &access, None)
        .await;
    assert_eq!(setup_again.status, 409, "already on: {}", setup_again.text);
}

#[tokio::test]
async fn idempotency_keys_give_one_object() {
    let api = Api::start().await;
    let admin = api.person(api.a, "ida@a.example", "org_admin").await;
    let body = json!({"name": "retry-me", "scopes": ["ingest"]});
    let h = [("idempotency-key", "create-key-1")];
    let one = api
        .call_h("POST", "/api/v1/api-keys", &admin, &h, Some(body.clone()))
        .await;
    let two = api
        .call_h("POST", "/api/v1/api-keys", &admin, &h, Some(body.clone()))
        .await;
    assert_eq!(one.status, 201, "{}", one.text);
    assert_eq!(
        (two.status, &two.json),
        (201, &one.json),
        "the same answer, secret included"
    );
    assert_eq!(
        two.headers.get("idempotent-replayed").map(String::as_str),
        Some("true")
    );
    let n: i64 = api
        .db
        .query_one("SELECT count(*) FROM api_keys WHERE name = 'retry-me'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "never a second object");
    // The stored answer holds the new key's secret, so it is sealed.
    let stored: Vec<u8> = api
        .db
        .query_one(
            "SELECT response_sealed FROM idempotency_keys WHERE key = 'create-key-1'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    let secret = one.json["key"].as_str().expect("key");
    assert!(!String::from_utf8_lossy(&stored).contains(secret));
    // Same key, other body: refused.
    let other = api
        .call_h(
            "POST",
            "/api/v1/api-keys",
            &admin,
            &h,
            Some(json!({"name": "other"})),
        )
        .await;
    assert_eq!(
        (other.status, other.code()),
        (422, "idempotency_key_reused")
    );
    // Another caller may use the same key string.
    let key = api.api_key(api.a, &["admin"]).await;
    let mine = api
        .call_h("POST", "/api/v1/api-keys", &key, &h, Some(body.clone()))
        .await;
    assert_eq!(mine.status, 201);
    assert_ne!(mine.json["id"], one.json["id"]);
    // On existing endpoints too: one customer.
    let c = json!({"key": "acme", "name": "Acme", "currency": "EUR", "timezone": "UTC"});
    let h2 = [("idempotency-key", "cust-1")];
    let a = api
        .call_h("POST", "/api/v1/customers", &admin, &h2, Some(c.clone()))
        .await;
    let b = api
        .call_h("POST", "/api/v1/customers", &admin, &h2, Some(c.clone()))
        .await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!((b.status, &b.json), (201, &a.json));
    let bad = api
        .call_h(
            "POST",
            "/api/v1/customers",
            &admin,
            &[("idempotency-key", "")],
            Some(c),
        )
        .await;
    assert_eq!(bad.json["field"], "Idempotency-Key");
}

#[tokio::test]
async fn api_keys_rotate_with_grace_revoke_and_audit_without_secrets() {
    let api = Api::start().await;
    let admin = api.person(api.a, "kai@a.example", "org_admin").await;
    let made = api
        .call(
            "POST",
            "/api/v1/api-keys",
            &admin,
            Some(json!({"name": "svc", "scopes": ["ingest", "read"], "allowed_cidrs": ["127.0.0.0/8"],
                        "rate_limit_rps": 50, "monthly_event_quota": 1000000})),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let old_secret = made.json["key"].as_str().expect("secret").to_string();
    let old_id = made.json["id"].as_str().expect("id").to_string();
    assert_eq!(made.json["monthly_event_quota"], 1000000);
    // Field-named validation.
    for (body, field) in [
        (json!({"scopes": ["root"]}), "scopes"),
        (json!({"allowed_cidrs": ["nowhere"]}), "allowed_cidrs"),
        (json!({"rate_limit_eps": 0}), "rate_limit_eps"),
        (json!({"monthly_event_quota": -5}), "monthly_event_quota"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let r = api
            .call("POST", "/api/v1/api-keys", &admin, Some(body))
            .await;
        assert_eq!(
            (r.status, r.json["field"].clone()),
            (400, json!(field)),
            "{}",
            r.text
        );
    }
    // The key works here (read scope, allowed address); listing never shows secrets.
    assert_eq!(
        api.call("GET", "/api/v1/meters", &old_secret, None)
            .await
            .status,
        200
    );
    let list = api.call("GET", "/api/v1/api-keys", &admin, None).await;
    assert!(!list.text.contains(&old_secret));
    // Rotate with a grace period: both work; with none, the old one stops.
    let rot = api
        .call(
            "POST",
            &format!("/api/v1/api-keys/{old_id}/rotate"),
            &admin,
            Some(json!({"grace_seconds": 3600})),
        )
        .await;
    assert_eq!(rot.status, 201, "{}", rot.text);
    let new_secret = rot.json["key"].as_str().expect("new").to_string();
    assert_eq!(rot.json["scopes"], json!(["ingest", "read"]));
    assert_eq!(rot.json["rate_limit_rps"], 50);
    assert_eq!(
        api.call("GET", "/api/v1/meters", &old_secret, None)
            .await
            .status,
        200
    );
    assert_eq!(
        api.call("GET", "/api/v1/meters", &new_secret, None)
            .await
            .status,
        200
    );
    let twice = api
        .call(
            "POST",
            &format!("/api/v1/api-keys/{old_id}/rotate"),
            &admin,
            None,
        )
        .await;
    assert_eq!(twice.code(), "not_rotatable");
    let new_id = rot.json["id"].as_str().expect("id").to_string();
    let rot2 = api
        .call(
            "POST",
            &format!("/api/v1/api-keys/{new_id}/rotate"),
            &admin,
            Some(json!({"grace_seconds": 0})),
        )
        .await;
    assert_eq!(rot2.status, 201);
    assert_eq!(
        api.call("GET", "/api/v1/meters", &new_secret, None)
            .await
            .status,
        401
    );
    // Update and revoke.
    let newest = rot2.json["id"].as_str().expect("id").to_string();
    let newest_secret = rot2.json["key"].as_str().expect("k").to_string();
    let up = api
        .call(
            "PATCH",
            &format!("/api/v1/api-keys/{newest}"),
            &admin,
            Some(json!({"scopes": ["ingest"], "allowed_cidrs": null})),
        )
        .await;
    assert_eq!(up.status, 200, "{}", up.text);
    assert_eq!(up.json["allowed_cidrs"], Value::Null);
    assert_eq!(
        api.call("GET", "/api/v1/meters", &newest_secret, None)
            .await
            .status,
        403,
        "scope removed"
    );
    let rv = api
        .call(
            "POST",
            &format!("/api/v1/api-keys/{newest}/revoke"),
            &admin,
            None,
        )
        .await;
    assert_eq!(rv.json["status"], "revoked");
    assert_eq!(
        api.call("GET", "/api/v1/meters", &newest_secret, None)
            .await
            .status,
        401
    );
    // An allowlist the caller is outside of: 403.
    let far = api
        .call(
            "POST",
            "/api/v1/api-keys",
            &admin,
            Some(json!({"scopes": ["read"], "allowed_cidrs": ["10.9.8.0/24"]})),
        )
        .await;
    let far_key = far.json["key"].as_str().expect("k").to_string();
    assert_eq!(
        api.call("GET", "/api/v1/meters", &far_key, None)
            .await
            .status,
        403
    );

    // The audit log: who did what, before and after, secrets redacted.
    let audit = api
        .call(
            "GET",
            "/api/v1/audit-log?object_kind=api-keys&limit=100",
            &admin,
            None,
        )
        .await;
    let items = audit.json["items"].as_array().expect("items").clone();
    let actions: Vec<&str> = items.iter().filter_map(|i| i["action"].as_str()).collect();
    for a in [
        "POST /api/v1/api-keys",
        "POST /api/v1/api-keys/{id}/rotate",
        "PATCH /api/v1/api-keys/{id}",
        "POST /api/v1/api-keys/{id}/revoke",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
    let patch = items
        .iter()
        .find(|i| i["action"] == "PATCH /api/v1/api-keys/{id}")
        .expect("patch");
    assert_eq!(patch["before"]["scopes"], json!(["ingest", "read"]));
    assert_eq!(patch["after"]["scopes"], json!(["ingest"]));
    assert_eq!(patch["actor_kind"], "user");
    assert_eq!(patch["object_id"], json!(newest));
    let created = items
        .iter()
        .find(|i| i["action"] == "POST /api/v1/api-keys")
        .expect("create");
    assert_eq!(created["after"]["key"], "<redacted>");
    // Filters and pagination.
    let page1 = api
        .call("GET", "/api/v1/audit-log?limit=2", &admin, None)
        .await;
    let cursor = page1.json["next_cursor"]
        .as_str()
        .expect("cursor")
        .to_string();
    let page2 = api
        .call(
            "GET",
            &format!("/api/v1/audit-log?limit=2&cursor={cursor}"),
            &admin,
            None,
        )
        .await;
    assert!(page1.json["items"][1]["id"].as_i64() > page2.json["items"][0]["id"].as_i64());
    let bad = api
        .call("GET", "/api/v1/audit-log?cursor=zzz", &admin, None)
        .await;
    assert_eq!(bad.json["field"], "cursor");

    // No secret anywhere in the audit log, login history or sessions.
    let dump: String = api
        .db
        .query_one(
            "SELECT coalesce(string_agg(t::text, ' '), '') FROM (
                SELECT a::text AS t FROM audit_log a
                UNION ALL SELECT l::text FROM login_history l
                UNION ALL SELECT s::text FROM sessions s
                UNION ALL SELECT u::text FROM users u) x",
            &[],
        )
        .await
        .expect("dump")
        .get(0);
    for s in [
        old_secret.as_str(),
        new_secret.as_str(),
        newest_secret.as_str(),
        far_key.as_str(),
        PASSWORD,
        admin.as_str(),
    ] {
        assert!(!dump.contains(s), "a secret is stored in clear");
    }
}

#[tokio::test]
async fn openapi_and_swagger_ui_are_served_without_credentials() {
    let api = Api::start().await;
    let doc = api.call("GET", "/openapi.json", "", None).await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json["openapi"], "3.1.0");
    let login = &doc.json["paths"]["/api/v1/auth/login"]["post"];
    assert_eq!(login["x-permission"], "public");
    assert_eq!(
        login["requestBody"]["content"]["application/json"]["schema"]["required"],
        json!(["email", "password"])
    );
    assert_eq!(
        doc.json["paths"]["/api/v1/api-keys"]["post"]["x-permission"],
        "keys:write"
    );
    let ui = api.call("GET", "/docs/", "", None).await;
    assert_eq!(ui.status, 200, "{}", ui.text);
    assert!(ui.text.to_lowercase().contains("swagger"), "{}", ui.text);
    let init = api
        .call("GET", "/docs/swagger-initializer.js", "", None)
        .await;
    assert!(init.text.contains("/openapi.json"), "{}", init.text);
}
