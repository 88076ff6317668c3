//! `rater` binary: the billing-ops CLI. `quote` prices a quantity; `run` rates a period into
//! draft invoices; `issue` numbers and freezes them; `reconcile` checks them; `show` prints them.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rater::period::YearMonth;
use rust_decimal::Decimal;
use std::str::FromStr;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "rater",
    version,
    about = "Rating jobs and price checks for billing operations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Scope {
    /// Billing period, YYYY-MM (each customer's period starts on their anchor day).
    #[arg(long)]
    period: String,
    /// Only this tenant (id).
    #[arg(long)]
    tenant: Option<Uuid>,
    /// Only this customer (key or id).
    #[arg(long)]
    customer: Option<String>,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/metering"
    )]
    database_url: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Price Q units (or the next Q after B already billed this period); prints {"amount": "…"}.
    Quote {
        /// A price object in DESIGN.md's format, e.g. '{"type":"unit","amount":"0.002"}'.
        #[arg(long)]
        price: String,
        /// Quantity to price (exact decimal).
        #[arg(long)]
        quantity: String,
        /// Quantity already billed in the period.
        #[arg(long)]
        already_billed: Option<String>,
    },
    /// Rate a period: usage per subscription → priced lines → draft invoices (idempotent).
    Run {
        #[command(flatten)]
        scope: Scope,
        /// Rate and print the summary without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Print the rated invoices as JSON on stdout (after the summary on stderr).
        #[arg(long)]
        json: bool,
    },
    /// Issue the period's drafts: freeze them and number them per tenant, without gaps.
    Issue {
        #[command(flatten)]
        scope: Scope,
        /// Issue before the period has ended.
        #[arg(long)]
        early: bool,
    },
    /// Check the period's invoices against their lines, prices and the stored usage; exits 1
    /// when anything differs.
    Reconcile {
        #[command(flatten)]
        scope: Scope,
    },
    /// Rated usage amounts broken down by a meter group-by dimension (cost per project, team,
    /// model…); nothing is written.
    Costs {
        #[command(flatten)]
        scope: Scope,
        /// The group-by name to break down by, e.g. `project` or `model`.
        #[arg(long)]
        by: String,
        /// JSON rows instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What the invoices of periods FROM..=TO would have been under another plan, beside what
    /// they are under each customer's own plan; nothing is written.
    Simulate {
        /// Plan key to simulate.
        #[arg(long)]
        plan: String,
        /// Plan version (default: the latest).
        #[arg(long)]
        version: Option<i32>,
        /// First period, YYYY-MM.
        #[arg(long)]
        from: String,
        /// Last period, YYYY-MM (inclusive).
        #[arg(long)]
        to: String,
        /// The tenant (id): plans belong to one tenant.
        #[arg(long)]
        tenant: Uuid,
        /// Only this customer (key or id).
        #[arg(long)]
        customer: Option<String>,
        /// JSON rows (with the simulated invoices) instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/metering"
        )]
        database_url: String,
    },
    /// Print the period's invoices: lines, tiers, tax and totals.
    Show {
        #[command(flatten)]
        scope: Scope,
    },
}

fn decimal(field: &str, s: &str) -> anyhow::Result<Decimal> {
    Decimal::from_str(s.trim()).with_context(|| format!("--{field} {s:?} is not a decimal number"))
}

fn period(s: &str) -> anyhow::Result<YearMonth> {
    s.parse()
        .map_err(|e: String| anyhow::anyhow!("--period: {e}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RATER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Quote {
            price,
            quantity,
            already_billed,
        } => {
            let q = decimal("quantity", &quantity)?;
            let b = already_billed
                .as_deref()
                .map(|b| decimal("already-billed", b))
                .transpose()?;
            let amount = rater::quote(&price, q, b).context("cannot price")?;
            println!(
                "{}",
                serde_json::json!({ "amount": amount.normalize().to_string() })
            );
        }
        Command::Run {
            scope,
            dry_run,
            json,
        } => {
            let mut db = rater::connect(&scope.database_url).await?;
            let opts = rater::run::Options {
                period: period(&scope.period)?,
                tenant: scope.tenant,
                customer: scope.customer,
                dry_run,
            };
            // One connection: on 2 cores a second reading connection measured no faster
            // (BENCHMARKS.md); `run` takes extra connections for larger machines.
            let s = rater::run::run(&mut db, &[], &opts, false).await?;
            let totals: Vec<String> = s
                .totals
                .iter()
                .map(|(c, t)| format!("{} {c}", t.normalize()))
                .collect();
            eprintln!(
                "rated {} {}: {} tenants, {} customers, {} invoices ({} written, {} unchanged, {} already issued), \
                 {} lines ({} corrections), {} usage rows, totals {}, in {:.2?}",
                opts.period,
                if dry_run { "(dry run, nothing written)" } else { "" },
                s.tenants,
                s.customers,
                s.invoices.len(),
                s.invoices_written,
                s.invoices_unchanged,
                s.invoices_frozen,
                s.lines,
                s.corrections,
                s.usage_rows,
                if totals.is_empty() { "none".into() } else { totals.join(", ") },
                s.elapsed,
            );
            tracing::info!(
                load_seconds = s.load.as_secs_f64(),
                datafusion_seconds = s.query.as_secs_f64(),
                write_seconds = s.write.as_secs_f64(),
                "phases"
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&s.invoices)?);
            }
        }
        Command::Issue { scope, early } => {
            let mut db = rater::connect(&scope.database_url).await?;
            let issued = rater::run::issue(
                &mut db,
                period(&scope.period)?,
                scope.tenant,
                scope.customer.as_deref(),
                early,
            )
            .await?;
            let out: Vec<_> = issued
                .iter()
                .map(|(id, t, n)| serde_json::json!({"invoice": id, "tenant": t, "number": n}))
                .collect();
            println!("{}", serde_json::json!({ "issued": out }));
        }
        Command::Reconcile { scope } => {
            let db = rater::connect(&scope.database_url).await?;
            let (checked, diffs) =
                rater::run::reconcile(&db, period(&scope.period)?, scope.tenant).await?;
            println!(
                "{}",
                serde_json::json!({"invoices": checked, "differences": diffs})
            );
            if !diffs.is_empty() {
                std::process::exit(1);
            }
            eprintln!(
                "reconcile {}: {checked} invoices, no difference",
                scope.period
            );
        }
        Command::Costs { scope, by, json } => {
            let db = rater::connect(&scope.database_url).await?;
            let ym = period(&scope.period)?;
            let mut rows = Vec::new();
            for t in rater::run::tenants(&db, scope.tenant).await? {
                rows.extend(
                    rater::analysis::costs(&db, t, ym, scope.customer.as_deref(), &by).await?,
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let mut totals: std::collections::BTreeMap<
                    (String, String, String),
                    (Decimal, Decimal),
                > = Default::default();
                for r in &rows {
                    let e = totals
                        .entry((r.value.clone(), r.meter.clone(), r.currency.clone()))
                        .or_default();
                    e.0 += r.quantity;
                    e.1 += r.amount;
                }
                println!(
                    "{:<24} {:<24} {:>18} {:>14}",
                    by, "meter", "quantity", "amount"
                );
                for ((v, m, c), (q, a)) in totals {
                    println!("{v:<24} {m:<24} {:>18} {:>10} {c}", q.normalize(), a);
                }
            }
        }
        Command::Simulate {
            plan,
            version,
            from,
            to,
            tenant,
            customer,
            json,
            database_url,
        } => {
            let db = rater::connect(&database_url).await?;
            let o = rater::analysis::plan_override(&db, tenant, &plan, version).await?;
            let rows = rater::analysis::simulate(
                &db,
                tenant,
                &o,
                period(&from)?,
                period(&to)?,
                customer.as_deref(),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:<8} {:>14} {:>14} {:>14}",
                    "customer", "period", "actual", o.label, "difference"
                );
                for r in &rows {
                    println!(
                        "{:<24} {:<8} {:>14} {:>14} {:>14} {}",
                        r.customer, r.period, r.actual, r.simulated, r.difference, r.currency
                    );
                }
            }
        }
        Command::Show { scope } => {
            let db = rater::connect(&scope.database_url).await?;
            print!(
                "{}",
                rater::show::invoices(
                    &db,
                    period(&scope.period)?,
                    scope.tenant,
                    scope.customer.as_deref()
                )
                .await?
            );
        }
    }
    Ok(())
}
