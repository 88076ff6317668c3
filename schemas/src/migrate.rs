//! Versioned SQL migrations (`schemas/migrations/V<n>__<name>.sql`), applied by refinery.
//!
//! Safe to run twice and from several processes at once: a PostgreSQL advisory lock serialises
//! runners, and refinery's history table skips what was already applied. Migrations detect
//! TimescaleDB and use hypertables where it is installed, native partitioning where it is not.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Key of the advisory lock that serialises migration runners ("metering" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d65_7465_7269_6e67;

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("failed to take the migration lock: {0}")]
    Lock(#[source] tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Apply(#[source] refinery::Error),
}

/// One applied migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i32,
    pub name: String,
}

/// Applies every pending migration and returns the ones this call applied (empty when the
/// database was already up to date).
pub async fn run(client: &mut Client) -> Result<Vec<Applied>, MigrateError> {
    run_to(client, None).await
}

/// Applies the pending migrations up to and including `version` (all with `None`): upgrade
/// tests start from an older schema with this.
pub async fn run_to(
    client: &mut Client,
    version: Option<i32>,
) -> Result<Vec<Applied>, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(MigrateError::Lock)?;
    let mut runner = embedded::migrations::runner();
    if let Some(v) = version {
        runner = runner.set_target(refinery::Target::Version(v));
    }
    let report = runner.set_abort_divergent(true).run_async(client).await;
    // Unlock even when a migration failed; the connection's end would release it too.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let report = report.map_err(MigrateError::Apply)?;
    unlock.map_err(MigrateError::Lock)?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version(),
            name: m.name().to_string(),
        })
        .collect())
}

/// Every migration this build knows, in order.
pub fn known() -> Vec<Applied> {
    // Embedded in file-name order (V10 before V2); by version here.
    let mut all: Vec<Applied> = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version(),
            name: m.name().to_string(),
        })
        .collect();
    all.sort_by_key(|m| m.version);
    all
}
