//! The in-app inbox of the signed-in person, and its live WebSocket stream.
//!
//! - `GET /api/v1/me/notifications?category&state=unread|read|archived|all&limit&cursor`,
//!   newest first; the default state is every item not archived. The answer carries the
//!   `unread` count.
//! - `POST /api/v1/me/notifications/{id}/read`, `/unread`, `/archive`, `/unarchive`, and
//!   `POST /api/v1/me/notifications/read-all`.
//! - `GET /api/v1/me/notifications/stream` (WebSocket): each new item of the person's inbox as
//!   a JSON text message, as soon as it is delivered. [`Hub`] listens on the PostgreSQL channel
//!   `inbox` (one connection per server, reconnecting), so an item delivered by any process
//!   reaches the streams of every process.

use crate::auth::{Caller, Principal};
use crate::catalog::ts;
use crate::http::{ApiError, AppState};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Json;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Fans `NOTIFY inbox` out to the WebSocket streams of this process.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<(Uuid, i64)>,
}

impl Hub {
    pub fn new() -> Self {
        Hub {
            tx: broadcast::channel(1024).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(Uuid, i64)> {
        self.tx.subscribe()
    }

    /// Listens until `stop`, reconnecting after a lost connection.
    pub async fn listen(self, database_url: String, stop: CancellationToken) {
        loop {
            if let Err(e) = self.listen_once(&database_url, &stop).await {
                tracing::warn!(error = %e, "inbox listener lost its connection; reconnecting");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn listen_once(&self, url: &str, stop: &CancellationToken) -> anyhow::Result<()> {
        let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if ntx.send(n.payload().to_string()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox listener connection failed");
                        break;
                    }
                }
            }
        });
        client.batch_execute("LISTEN inbox").await?;
        loop {
            tokio::select! {
                _ = stop.cancelled() => { driver.abort(); return Ok(()); }
                n = nrx.recv() => {
                    let Some(p) = n else { anyhow::bail!("connection closed") };
                    if let Some((u, i)) = p.split_once(':') {
                        if let (Ok(u), Ok(i)) = (u.parse(), i.parse()) {
                            let _ = self.tx.send((u, i));
                        }
                    }
                }
            }
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

fn person(caller: &Caller) -> Result<Uuid, ApiError> {
    match caller.principal {
        Principal::User { id, .. } => Ok(id),
        Principal::Key { .. } => Err(ApiError::forbidden(
            "the inbox belongs to a signed-in person",
        )),
    }
}

const ITEM_COLUMNS: &str = "id, category, title, body, data, read_at, archived_at, created_at";

fn item_view(r: &tokio_postgres::Row) -> Value {
    json!({
        "id": r.get::<_, i64>(0),
        "category": r.get::<_, String>(1),
        "title": r.get::<_, String>(2),
        "body": r.get::<_, String>(3),
        "data": r.get::<_, Value>(4),
        "read": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(5).is_some(),
        "readAt": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(5).map(ts),
        "archived": r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(6).is_some(),
        "createdAt": ts(r.get(7)),
    })
}

#[derive(Debug, Deserialize)]
pub struct InboxFilter {
    pub category: Option<String>,
    pub state: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// `GET /api/v1/me/notifications`.
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(f): Query<InboxFilter>,
) -> Result<Json<Value>, ApiError> {
    let user = person(&caller)?;
    let limit = crate::page::limit(f.limit.as_deref())?;
    let before = crate::page::seq(f.cursor.as_deref())?;
    let state = f.state.as_deref().unwrap_or("inbox");
    let cond = match state {
        "inbox" => "archived_at IS NULL",
        "unread" => "archived_at IS NULL AND read_at IS NULL",
        "read" => "archived_at IS NULL AND read_at IS NOT NULL",
        "archived" => "archived_at IS NOT NULL",
        "all" => "true",
        _ => {
            return Err(ApiError::invalid(
                "state",
                "must be inbox, unread, read, archived or all",
            ))
        }
    };
    let db = st.pool.get().await?;
    let rows = db
        .query(
            &format!(
                "SELECT {ITEM_COLUMNS}, id FROM inbox_items
                  WHERE user_id = $1 AND tenant_id = $2 AND {cond}
                    AND ($3::text IS NULL OR category = $3) AND ($4::bigint IS NULL OR id < $4)
                  ORDER BY id DESC LIMIT $5"
            ),
            &[&user, &caller.tenant, &f.category, &before, &(limit + 1)],
        )
        .await?;
    let unread: i64 = db
        .query_one(
            "SELECT count(*) FROM inbox_items
              WHERE user_id = $1 AND archived_at IS NULL AND read_at IS NULL",
            &[&user],
        )
        .await?
        .get(0);
    let mut page = crate::page::page(rows, limit, item_view, |r| {
        crate::page::seq_cursor(r.get::<_, i64>(r.len() - 1))
    });
    page["unread"] = json!(unread);
    Ok(Json(page))
}

async fn mark(
    st: AppState,
    caller: Caller,
    id: String,
    set: &str,
) -> Result<Json<Value>, ApiError> {
    let user = person(&caller)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::not_found("notification"))?;
    let db = st.pool.get().await?;
    let r = db
        .query_opt(
            &format!(
                "UPDATE inbox_items SET {set} WHERE id = $1 AND user_id = $2 AND tenant_id = $3
                 RETURNING {ITEM_COLUMNS}"
            ),
            &[&id, &user, &caller.tenant],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("notification"))?;
    Ok(Json(item_view(&r)))
}

pub async fn read(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    mark(st, caller, id, "read_at = coalesce(read_at, now())").await
}

pub async fn unread(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    mark(st, caller, id, "read_at = NULL").await
}

pub async fn archive(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    mark(st, caller, id, "archived_at = coalesce(archived_at, now())").await
}

pub async fn unarchive(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    mark(st, caller, id, "archived_at = NULL").await
}

/// `POST /api/v1/me/notifications/read-all`.
pub async fn read_all(State(st): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let user = person(&caller)?;
    let db = st.pool.get().await?;
    let n = db
        .execute(
            "UPDATE inbox_items SET read_at = now()
              WHERE user_id = $1 AND read_at IS NULL AND archived_at IS NULL",
            &[&user],
        )
        .await?;
    Ok(Json(json!({ "marked": n })))
}

/// `GET /api/v1/me/notifications/stream`: a WebSocket of the person's new inbox items.
pub async fn stream(
    State(st): State<AppState>,
    caller: Caller,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let user = person(&caller)?;
    let rx = st.hub.subscribe();
    Ok(ws.on_upgrade(move |socket| serve(socket, st, user, rx)))
}

async fn serve(
    socket: WebSocket,
    st: AppState,
    user: Uuid,
    mut rx: broadcast::Receiver<(Uuid, i64)>,
) {
    let (mut out, mut inc) = socket.split();
    loop {
        tokio::select! {
            m = inc.next() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            n = rx.recv() => {
                let id = match n {
                    Ok((u, id)) if u == user => id,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(k)) => {
                        let _ = out.send(Message::Text(json!({"lagged": k}).to_string().into())).await;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Ok(db) = st.pool.get().await else { continue };
                let row = db
                    .query_opt(
                        &format!("SELECT {ITEM_COLUMNS} FROM inbox_items WHERE id = $1 AND user_id = $2"),
                        &[&id, &user],
                    )
                    .await;
                if let Ok(Some(r)) = row {
                    let text = item_view(&r).to_string();
                    if out.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
