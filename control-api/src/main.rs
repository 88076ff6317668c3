//! `control-api` binary: operator CLI (`migrate`, …) and, with later issues, the HTTP server.

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "control-api",
    version,
    about = "Control plane and operator CLI of the metering pipeline"
)]
struct Cli {
    /// PostgreSQL URL of the project's database.
    #[arg(long, env = "DATABASE_URL", default_value = control_api::db::DEFAULT_DATABASE_URL, global = true)]
    database_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (meters, meter queries) until SIGTERM or Ctrl-C.
    Serve {
        #[arg(long, env = "CONTROL_API_LISTEN", default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        /// SMTP relay for email notifications (`smtp://host:port`, `smtps://…`); without it
        /// emails wait in the outbox.
        #[arg(long, env = "CONTROL_API_SMTP_URL")]
        smtp_url: Option<String>,
        /// Sender address of emails.
        #[arg(
            long,
            env = "CONTROL_API_MAIL_FROM",
            default_value = "metering@localhost"
        )]
        mail_from: String,
        /// Base URL of the links in emails.
        #[arg(
            long,
            env = "CONTROL_API_PUBLIC_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        public_url: String,
        /// Stripe's API base URL; with STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET it enables
        /// the stripe provider.
        #[arg(
            long,
            env = "STRIPE_API_BASE",
            default_value = "https://api.stripe.com"
        )]
        stripe_api_base: String,
        /// Do not run the background workers (delivery, thresholds, pending payments) here.
        #[arg(long)]
        no_workers: bool,
    },
    /// Apply pending SQL migrations (safe to run twice); prints the applied ones as JSON.
    Migrate,
    /// Tenants (organizations).
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// API keys; a new key's secret is printed once and never stored.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// People who sign in to the control API.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Print a new random server key (64 hex digits) for CONTROL_API_SECRET.
    Secret,
    /// The subscription lifecycle.
    #[command(subcommand)]
    Subscriptions(SubscriptionsCommand),
    /// Payments.
    #[command(subcommand)]
    Payments(PaymentsCommand),
    /// Notifications.
    #[command(subcommand)]
    Notifications(NotificationsCommand),
}

#[derive(Debug, Subcommand)]
enum PaymentsCommand {
    /// Every mismatch between the providers' records, payments, refunds and invoices of a
    /// tenant; prints a JSON report and exits 1 when there is any.
    Reconcile {
        #[arg(long)]
        tenant: uuid::Uuid,
        /// RFC 3339 start (default: 35 days ago).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// RFC 3339 end, exclusive (default: now).
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Debug, Subcommand)]
enum NotificationsCommand {
    /// Evaluate the usage thresholds once now (serve does it continuously); prints what fired.
    /// Needs CONTROL_API_SECRET (outbox payloads are sealed with it).
    Evaluate,
}

#[derive(Debug, Subcommand)]
enum SubscriptionsCommand {
    /// Apply what time decides up to now (or --at): trials ending, scheduled plan changes,
    /// cancels at period end, expiries, past-due grace periods running out. `serve` does this
    /// every minute; safe to run any number of times. Prints what it did as JSON.
    Advance {
        /// RFC 3339 time to advance to (default: now).
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// Days a subscription may stay past due before it is canceled.
        #[arg(long, default_value_t = 14)]
        grace_days: u64,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Create a user; prints the user as JSON (with a generated password, shown once, unless
    /// --password-stdin gives one). A verification email is queued in the outbox.
    /// Needs CONTROL_API_SECRET (the outbox payload is sealed with it).
    Create {
        #[arg(long)]
        tenant: uuid::Uuid,
        #[arg(long)]
        email: String,
        /// user, org_admin or sys_admin.
        #[arg(long, default_value = "org_admin")]
        role: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TenantsCommand {
    /// Create a tenant; prints {"id", "name"}.
    Create {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key for a tenant; prints {"id", "tenant_id", "key", ...} (the key is shown once).
    Create {
        #[arg(long)]
        tenant: uuid::Uuid,
        /// Comma-separated scopes: ingest, read, admin (default: ingest).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Comma-separated addresses or CIDR blocks allowed to use the key (default: any).
        #[arg(long, value_delimiter = ',')]
        allow: Option<Vec<String>>,
        /// Requests per second allowed to this key at the ingest edge.
        #[arg(long)]
        rate_limit_rps: Option<i32>,
        /// Events per second allowed to this key at the ingest edge.
        #[arg(long)]
        rate_limit_eps: Option<i32>,
        /// Events per UTC month the ingest edge accepts for this key.
        #[arg(long)]
        monthly_quota: Option<i64>,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revoke a key; the ingest edge refuses it within its cache bound.
    Revoke {
        #[arg(long)]
        tenant: uuid::Uuid,
        #[arg(long)]
        id: uuid::Uuid,
    },
}

/// Stripe's settings when STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET are set.
fn stripe_from_env(api_base: String) -> Option<control_api::stripe::StripeSettings> {
    let secret_key = std::env::var("STRIPE_SECRET_KEY").ok()?;
    let webhook_secret = std::env::var("STRIPE_WEBHOOK_SECRET").ok()?;
    Some(control_api::stripe::StripeSettings {
        api_base,
        secret_key,
        webhook_secret,
        tolerance: std::time::Duration::from_secs(300),
    })
}

/// The lifecycle's clock: applies what time decides once a minute until shutdown.
async fn advance_every_minute(url: String, shutdown: tokio_util::sync::CancellationToken) {
    let grace = std::time::Duration::from_secs(14 * 86_400);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
        let run = async {
            let mut db = control_api::db::connect(&url).await?;
            let done = control_api::subscriptions::advance(&mut db, chrono::Utc::now(), grace)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
            anyhow::Ok(done)
        };
        match run.await {
            Ok(d) => tracing::debug!(?d, "subscriptions advanced"),
            Err(e) => tracing::warn!(error = %e, "advancing subscriptions failed"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            smtp_url,
            mail_from,
            public_url,
            stripe_api_base,
            no_workers,
        } => {
            let key = control_api::crypto::ServerKey::from_env()?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let mut settings = control_api::http::Settings::new(&cli.database_url, key);
            settings.notify.workers = !no_workers;
            settings.notify.smtp_url = smtp_url;
            settings.notify.mail_from = mail_from;
            settings.notify.public_url = public_url;
            settings.payments.stripe = stripe_from_env(stripe_api_base);
            let running = control_api::http::start_with(listen, settings, shutdown.clone()).await?;
            eprintln!("control-api listening on {}", running.addr);
            tokio::spawn(advance_every_minute(
                cli.database_url.clone(),
                shutdown.clone(),
            ));
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
            let _ = running.done.await;
        }
        Command::Migrate => {
            let mut client = control_api::db::connect(&cli.database_url).await?;
            let applied = schemas::migrate::run(&mut client)
                .await
                .context("failed to apply migrations")?;
            let out = serde_json::json!({
                "applied": applied.iter().map(|m| serde_json::json!({"version": m.version, "name": m.name})).collect::<Vec<_>>(),
                "known": schemas::migrate::known().len(),
            });
            println!("{out}");
        }
        Command::Tenants(TenantsCommand::Create { name }) => {
            let db = control_api::db::connect(&cli.database_url).await?;
            let t = control_api::keys::create_tenant(&db, &name)
                .await
                .context("failed to create the tenant")?;
            println!("{}", serde_json::to_string(&t)?);
        }
        Command::Keys(KeysCommand::Create {
            tenant,
            scopes,
            allow,
            rate_limit_rps,
            rate_limit_eps,
            monthly_quota,
            name,
        }) => {
            let db = control_api::db::connect(&cli.database_url).await?;
            let opts = control_api::keys::NewKey {
                name,
                scopes,
                allowed_cidrs: allow,
                rate_limit_rps,
                rate_limit_eps,
                monthly_event_quota: monthly_quota,
                expires_at: None,
            };
            let k = control_api::keys::create_key(&db, tenant, opts)
                .await
                .context("failed to create the key")?;
            println!("{}", serde_json::to_string(&k)?);
        }
        Command::Subscriptions(SubscriptionsCommand::Advance { at, grace_days }) => {
            let mut db = control_api::db::connect(&cli.database_url).await?;
            let done = control_api::subscriptions::advance(
                &mut db,
                at.unwrap_or_else(chrono::Utc::now),
                std::time::Duration::from_secs(grace_days * 86_400),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
            println!("{}", serde_json::to_string(&done)?);
        }
        Command::Payments(PaymentsCommand::Reconcile { tenant, from, to }) => {
            let key = control_api::crypto::ServerKey::from_env()
                .unwrap_or_else(|_| control_api::crypto::ServerKey::ephemeral());
            let mut settings = control_api::http::Settings::new(&cli.database_url, key);
            settings.payments.stripe = stripe_from_env(
                std::env::var("STRIPE_API_BASE")
                    .unwrap_or_else(|_| "https://api.stripe.com".into()),
            );
            let pool = control_api::http::pool(&cli.database_url)?;
            let state = control_api::http::AppState::new(pool, settings);
            let db = control_api::db::connect(&cli.database_url).await?;
            let to = to.unwrap_or_else(chrono::Utc::now);
            let from = from.unwrap_or(to - chrono::Duration::days(35));
            let report =
                control_api::reconcile::run(&db, &state.providers, tenant, from, to).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.mismatches.is_empty() {
                eprintln!("{} mismatches", report.mismatches.len());
                std::process::exit(1);
            }
        }
        Command::Notifications(NotificationsCommand::Evaluate) => {
            let key = control_api::crypto::ServerKey::from_env()?;
            let mut db = control_api::db::connect(&cli.database_url).await?;
            let done = control_api::notify::evaluate(&mut db, &key, chrono::Utc::now()).await?;
            println!("{}", serde_json::to_string(&done)?);
        }
        Command::Secret => {
            println!("{}", hex::encode(control_api::crypto::random_bytes::<32>()));
        }
        Command::Users(UsersCommand::Create {
            tenant,
            email,
            role,
            name,
            password_stdin,
        }) => {
            let key = control_api::crypto::ServerKey::from_env()?;
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                Some(line.trim_end_matches(['\r', '\n']).to_string())
            } else {
                None
            };
            let mut db = control_api::db::connect(&cli.database_url).await?;
            let tx = db.transaction().await?;
            let settings = control_api::http::Settings::new(&cli.database_url, key.clone());
            let new = control_api::identity::NewUser {
                email,
                name,
                role,
                password,
            };
            let (mut user, generated) = control_api::identity::create_user_in(
                &tx,
                &key,
                settings.verify_email_ttl,
                tenant,
                new,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
            tx.commit().await?;
            if let Some(p) = generated {
                user["password"] = serde_json::json!(p);
            }
            println!("{user}");
        }
        Command::Keys(KeysCommand::Revoke { tenant, id }) => {
            let db = control_api::db::connect(&cli.database_url).await?;
            let revoked = control_api::keys::revoke_key(&db, tenant, id)
                .await
                .context("failed to revoke the key")?;
            if !revoked {
                anyhow::bail!("no live key {id} for tenant {tenant}");
            }
            println!("{}", serde_json::json!({"id": id, "revoked": true}));
        }
    }
    Ok(())
}
