//! The background workers of `control-api serve`: outbox delivery, threshold evaluation and
//! pending payments. Each runs on its own interval until shutdown, reconnects after a lost
//! database connection, and is safe to run in several processes at once (rows are claimed or
//! locked; firings are unique).

use crate::http::AppState;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Starts the workers.
pub fn spawn(st: AppState, stop: CancellationToken) {
    let n = st.settings.notify.clone();
    let url = st.settings.database_url.clone();
    let delivery = n.delivery(&st.settings.key);
    let mut builder = reqwest::Client::builder()
        .timeout(n.timeout)
        .redirect(reqwest::redirect::Policy::none());
    if !n.allow_private_webhooks {
        builder = builder.dns_resolver(std::sync::Arc::new(crate::delivery::PublicOnly));
    }
    let http = builder.build().unwrap_or_default();
    {
        let url = url.clone();
        let stop = stop.clone();
        tokio::spawn(run("deliver", url, n.deliver_every, stop, move |db| {
            let (d, http) = (delivery.clone(), http.clone());
            async move {
                let p = crate::delivery::run_once(&db, &d, &http, 50).await?;
                if p.sent + p.failed + p.dead > 0 {
                    tracing::debug!(?p, "outbox pass");
                }
                Ok(db)
            }
        }));
    }
    {
        let key = st.settings.key.clone();
        tokio::spawn(run(
            "thresholds",
            url.clone(),
            n.evaluate_every,
            stop.clone(),
            move |mut db| {
                let key = key.clone();
                async move {
                    let e = crate::notify::evaluate(&mut db, &key, chrono::Utc::now()).await?;
                    if e.fired > 0 {
                        tracing::info!(fired = e.fired, "usage thresholds fired");
                    }
                    Ok(db)
                }
            },
        ));
    }
    {
        let key = st.settings.key.clone();
        let providers = st.providers.clone();
        tokio::spawn(run(
            "payments",
            url,
            n.refresh_payments_every,
            stop,
            move |mut db| {
                let (key, providers) = (key.clone(), providers.clone());
                async move {
                    crate::payments::refresh_pending(&mut db, &key, &providers)
                        .await
                        .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
                    Ok(db)
                }
            },
        ));
    }
}

/// Runs `f` every `period` with a connection, connecting (again) when there is none.
async fn run<F, Fut>(
    name: &'static str,
    url: String,
    period: Duration,
    stop: CancellationToken,
    mut f: F,
) where
    F: FnMut(tokio_postgres::Client) -> Fut,
    Fut: Future<Output = anyhow::Result<tokio_postgres::Client>>,
{
    let mut db: Option<tokio_postgres::Client> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let client = match db.take() {
            Some(c) if !c.is_closed() => c,
            _ => match crate::db::connect(&url).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(worker = name, error = %e, "worker cannot connect");
                    continue;
                }
            },
        };
        match f(client).await {
            Ok(c) => db = Some(c),
            Err(e) => tracing::warn!(worker = name, error = %e, "worker pass failed"),
        }
    }
}
