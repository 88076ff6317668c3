//! Test support for every crate of the workspace: real PostgreSQL, one fresh database per test.
//!
//! Tests find services through environment variables with local defaults:
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/metering`) names the server (its
//! database part is replaced), `KAFKA_BROKERS` (default `127.0.0.1:9092`) the broker.

use tokio_postgres::{Client, NoTls};

/// Server URL tests use, from `DATABASE_URL` or the local default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/metering".to_string())
}

/// Broker list tests use, from `KAFKA_BROKERS` or the local default.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_string())
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // postgres://user@host:port/dbname -> keep everything up to the last '/' after the host.
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].rfind('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Connects to `url`, driving the connection on the current tokio runtime.
pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A new, empty database with every migration applied. Returns its URL and a client.
/// Databases are named `metering_t_<uuid>`; `scripts/test.sh` drops old ones.
pub async fn fresh_database() -> (String, Client) {
    let admin = connect(&with_database(&database_url(), "postgres")).await;
    let name = format!("metering_t_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
    let url = with_database(&database_url(), &name);
    let mut client = connect(&url).await;
    crate::migrate::run(&mut client)
        .await
        .unwrap_or_else(|e| panic!("migrations failed on {name}: {e}"));
    (url, client)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/metering", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/metering?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
