//! The operator CLI (`users create`, `keys create`) and the real binary's logs at debug level:
//! passwords, tokens and API keys never appear in them.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_control-api");

fn cli(url: &str, secret: &str, args: &[&str], stdin: Option<&str>) -> Value {
    let mut child = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env("CONTROL_API_SECRET", secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("control-api runs");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("exit");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[tokio::test]
async fn cli_creates_what_a_new_install_needs_and_logs_hold_no_secrets() {
    let (url, db) = schemas::testing::fresh_database().await;
    let secret = hex::encode([7u8; 32]);
    // CLI: tenant, first admin (password from stdin), key.
    let t = cli(
        &url,
        &secret,
        &["tenants", "create", "--name", "Acme"],
        None,
    );
    let tenant = t["id"].as_str().expect("id").to_string();
    let password = "operator chosen passphrase";
    let u = cli(
        &url,
        &secret,
        &[
            "users",
            "create",
            "--tenant",
            &tenant,
            "--email",
            "ops@acme.example",
            "--role",
            "org_admin",
            "--password-stdin",
        ],
        Some(&format!("{password}\n")),
    );
    assert_eq!(u["role"], "org_admin");
    assert!(u.get("password").is_none(), "the password came from stdin");
    let generated = cli(
        &url,
        &secret,
        &[
            "users",
            "create",
            "--tenant",
            &tenant,
            "--email",
            "dev@acme.example",
            "--role",
            "user",
        ],
        None,
    );
    let generated_pw = generated["password"]
        .as_str()
        .expect("generated, shown once")
        .to_string();
    let k = cli(
        &url,
        &secret,
        &[
            "keys",
            "create",
            "--tenant",
            &tenant,
            "--scopes",
            "read",
            "--monthly-quota",
            "5000",
        ],
        None,
    );
    let cli_key = k["key"].as_str().expect("key").to_string();
    let quota: Option<i64> = db
        .query_one(
            "SELECT monthly_event_quota FROM api_keys WHERE prefix = $1",
            &[&&cli_key[..11]],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(quota, Some(5000));
    let bad = Command::new(BIN)
        .args([
            "users", "create", "--tenant", &tenant, "--email", "nope", "--role", "user",
        ])
        .env("DATABASE_URL", &url)
        .env("CONTROL_API_SECRET", &secret)
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("email"),
        "names the field"
    );
    let no_secret = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &url)
        .env_remove("CONTROL_API_SECRET")
        .output()
        .expect("runs");
    assert!(!no_secret.status.success());
    assert!(String::from_utf8_lossy(&no_secret.stderr).contains("CONTROL_API_SECRET"));

    // The server at debug level, its log captured.
    let mut server = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &url)
        .env("CONTROL_API_SECRET", &secret)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("serve");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        let stderr = server.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("control-api listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                log.lock().expect("log").push_str(&line);
                log.lock().expect("log").push('\n');
            }
        });
    }
    let addr: std::net::SocketAddr = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("listening")
        .parse()
        .expect("addr");
    let call = |m: &'static str, p: &'static str, auth: String, body: Option<Value>| async move {
        common::send(addr, m, p, &auth, &[], body.as_ref()).await
    };
    let login = call(
        "POST",
        "/api/v1/auth/login",
        String::new(),
        Some(json!({"email": "ops@acme.example", "password": password})),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.text);
    let access = login.json["access_token"].as_str().expect("a").to_string();
    let refresh = login.json["refresh_token"].as_str().expect("r").to_string();
    let wrong = call(
        "POST",
        "/api/v1/auth/login",
        String::new(),
        Some(json!({"email": "ops@acme.example", "password": "a wrong passphrase"})),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let dev = call(
        "POST",
        "/api/v1/auth/login",
        String::new(),
        Some(json!({"email": "dev@acme.example", "password": generated_pw})),
    )
    .await;
    assert_eq!(dev.status, 200);
    let r2 = call(
        "POST",
        "/api/v1/auth/refresh",
        String::new(),
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    let refresh2 = r2.json["refresh_token"].as_str().expect("r2").to_string();
    let reuse = call(
        "POST",
        "/api/v1/auth/refresh",
        String::new(),
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(reuse.status, 401);
    let made = call(
        "POST",
        "/api/v1/api-keys",
        cli_key.clone(),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(made.status, 403, "a read key cannot make keys");
    let login2 = call(
        "POST",
        "/api/v1/auth/login",
        String::new(),
        Some(json!({"email": "ops@acme.example", "password": password})),
    )
    .await;
    let access2 = login2.json["access_token"].as_str().expect("a").to_string();
    let made = call(
        "POST",
        "/api/v1/api-keys",
        access2.clone(),
        Some(json!({"name": "x", "scopes": ["ingest"]})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let http_key = made.json["key"].as_str().expect("key").to_string();
    let reset = call(
        "POST",
        "/api/v1/auth/password-reset",
        String::new(),
        Some(json!({"email": "dev@acme.example"})),
    )
    .await;
    assert_eq!(reset.status, 202);
    let _ = call("GET", "/api/v1/me", access.clone(), None).await;

    // Stop the server, then read everything it logged.
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let _ = server.wait();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = log.lock().expect("log").clone();
    assert!(log.contains("served"), "requests are logged: {log}");
    assert!(log.contains("request_id"), "with their ids");
    for s in [
        password,
        generated_pw.as_str(),
        "a wrong passphrase",
        access.as_str(),
        access2.as_str(),
        refresh.as_str(),
        refresh2.as_str(),
        cli_key.as_str(),
        http_key.as_str(),
        secret.as_str(),
    ] {
        assert!(!log.contains(s), "a secret is in the log");
    }
    assert!(
        !log.contains("mrs_") && !log.contains("mvt_"),
        "no reset or verification token"
    );
}
