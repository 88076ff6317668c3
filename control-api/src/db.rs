//! Database connection for the control plane and its CLI.

use tokio_postgres::{Client, NoTls};

/// Default database URL when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/metering";

/// Why the database could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL at {url}: {source}")]
pub struct ConnectError {
    /// The URL without its password.
    pub url: String,
    #[source]
    pub source: tokio_postgres::Error,
}

/// Connects and drives the connection on the current runtime.
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| ConnectError {
            url: redact(url),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

pub use schemas::redact_url as redact;

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_leave_redact() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("not a url"), "not a url");
    }
}
