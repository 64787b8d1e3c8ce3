//! Server-sent events (DESIGN §5): the single-stream endpoints, and the event-stream
//! response body every SSE endpoint uses.
//!
//! The body is built by hand rather than with poem's `SSE` type: events arrive already
//! rendered as SSE frames (shared `Bytes`), and everything ready is drained into one
//! chunk (`batch::collect`), so a burst costs one socket write per subscriber, not one
//! per event.
//!
//! Once a stream has started, errors cannot become HTTP statuses: a storage failure
//! ends the stream (the client reconnects with `Last-Event-ID`), shutdown ends it after
//! the last complete frame, and so do revoked or expired credentials.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use poem::http::{Method, StatusCode};
use poem::web::{Path, Query};
use poem::{Body, Response, handler};
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use super::batch::{MAX_CHUNK, Source, collect, join};
use super::{Caller, Delivery, OpenError, render, sse_socket, stopping};
use crate::cursor::{Cursor, Item};
use crate::domain::StreamKey;
use crate::http::wire::SnapshotBody;
use crate::observe::Transport;
use crate::server::Takeover;

#[derive(Debug, Default, Deserialize)]
pub struct SnapshotQuery {
    pub snapshot: Option<String>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "yes"))
}

/// `GET /sse/zones/{zone_id}/stock`
#[handler]
pub async fn zone_stock(
    Path(zone_id): Path<i32>,
    Query(q): Query<SnapshotQuery>,
    caller: Caller<'_>,
) -> Response {
    if let Err(e) = caller.admit() {
        return e.response();
    }
    let state = caller.state;
    let mut first = BytesMut::from(&render::retry(state.config.sse_retry)[..]);
    // A reconnecting EventSource repeats the URL (with `snapshot=1`) and sends
    // `Last-Event-ID`: it already has the state, so the header wins over a snapshot.
    let cursor = if !caller.reconnecting && truthy(q.snapshot.as_deref()) {
        match state
            .service
            .open_with_snapshot(caller.principal, zone_id)
            .await
        {
            Ok((snapshot, cursor)) => {
                first.extend_from_slice(&render::sse_snapshot(&SnapshotBody::from(snapshot)));
                cursor
            }
            Err(e) => return OpenError::from(e).response(),
        }
    } else {
        match caller.open(StreamKey::Zone(zone_id), caller.start()).await {
            Ok(cursor) => cursor,
            Err(e) => return e.response(),
        }
    };
    respond_single(&caller, cursor, first.freeze())
}

/// `GET /sse/alerts`
#[handler]
pub async fn alerts(caller: Caller<'_>) -> Response {
    resumable(&caller, Ok(StreamKey::Alerts)).await
}

/// `GET /sse/notifications`: the caller's own user stream.
#[handler]
pub async fn notifications(caller: Caller<'_>) -> Response {
    let stream = caller
        .state
        .service
        .user_stream(caller.principal)
        .map_err(OpenError::from);
    resumable(&caller, stream).await
}

/// A stream without a snapshot: live, or resumed from `Last-Event-ID` /
/// `?last_event_id=`.
async fn resumable(caller: &Caller<'_>, stream: Result<StreamKey, OpenError>) -> Response {
    let opened = async {
        let stream = stream?;
        caller.admit()?;
        caller.open(stream, caller.start()).await
    };
    match opened.await {
        Ok(cursor) => {
            let first = render::retry(caller.state.config.sse_retry);
            respond_single(caller, cursor, first)
        }
        Err(e) => e.response(),
    }
}

/// Whether the server may answer a plain HTTP/1 connection's first request to `path`
/// itself, so that the response can take the socket over (see `server::takeover`):
/// the single-stream SSE endpoints (`respond_single`) and the WebSocket ones
/// (`ws_socket::upgrade`).
pub fn takes_over(method: &Method, path: &str) -> bool {
    method == Method::GET
        && (path == "/sse/alerts"
            || path == "/sse/notifications"
            || (path.starts_with("/sse/zones/") && path.ends_with("/stock"))
            || path == "/ws"
            || path.starts_with("/ws/zones/"))
}

/// The event-stream response of one cursor. Where the server hands the socket over,
/// the connection is served outside hyper: on its own until it has caught up, then by
/// its stream's fan-out (`sse_socket`, `fanout`). Elsewhere (TLS, HTTP/2, a request
/// later on a keep-alive connection) the body serves it (`respond`). Whichever runs
/// takes the cursor; the other finds nothing.
fn respond_single(caller: &Caller<'_>, cursor: Cursor, first: Bytes) -> Response {
    let opened = Arc::new(Mutex::new(Some((cursor, first))));
    let take =
        |o: &Mutex<Option<(Cursor, Bytes)>>| o.lock().unwrap_or_else(|e| e.into_inner()).take();
    let for_body = opened.clone();
    let mut resp = respond(caller, move || take(&for_body), |_, item| render::sse(item));
    if let Some(fanout) = caller.fanout.cloned() {
        let principal = Arc::new(caller.principal.clone());
        resp.extensions_mut().insert(Takeover::new(move |raw| {
            if let Some((cursor, first)) = take(&opened) {
                sse_socket::start(fanout, raw, principal, cursor, first);
            }
        }));
    }
    resp
}

/// The event-stream response: the source and first bytes `open` gives, then batches
/// from the source rendered by `frame`, heartbeats, and the end on shutdown, on revoked
/// or expired credentials, or on a storage failure. Registered in `/api/stats` while it
/// streams.
pub fn respond<S, O, F>(caller: &Caller<'_>, open: O, mut frame: F) -> Response
where
    S: Source + StreamsOf + 'static,
    O: FnOnce() -> Option<(S, Bytes)> + Send + 'static,
    F: FnMut(&StreamKey, &Item) -> Bytes + Send + 'static,
{
    let state = caller.state;
    let heartbeat = state.config.heartbeat;
    let shutdown = state.shutdown.clone();
    let auth = state.auth.clone();
    let principal = caller.principal.clone();
    let mut delivery = Delivery::new(state.service.connections().clone());
    let body = async_stream::stream! {
        let Some((mut src, first)) = open() else {
            return;
        };
        yield Ok::<Bytes, std::io::Error>(first);
        let name = principal.name.clone();
        // Registered while the body streams; dropped (unregistered) when it ends.
        let registration = delivery.stats.connect(Transport::Sse, principal.user.as_deref());
        let streams = src.streams();
        for st in &streams {
            registration.add_stream(st);
        }
        tracing::info!(principal = %name, streams = ?streams, "SSE stream opened");
        let ended = async move { auth.ended(&principal).await };
        tokio::pin!(ended);
        let stop = stopping(shutdown);
        tokio::pin!(stop);
        let mut beat = interval_at(Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pieces: Vec<Bytes> = Vec::new();
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                why = &mut ended => {
                    tracing::info!(principal = %name, reason = why.reason(), "ending SSE stream");
                    break;
                }
                taken = collect(&mut src, MAX_CHUNK, |stream, item| {
                    delivery.delivered(item);
                    let f = frame(stream, item);
                    let n = f.len();
                    pieces.push(f);
                    n
                }) => match taken {
                    Ok(n) => {
                        delivery.written();
                        delivery.stats.sent(Transport::Sse, n as u64);
                        yield Ok(join(&mut pieces));
                    }
                    Err(e) => {
                        tracing::warn!(streams = ?streams, error = %e, "ending SSE stream");
                        break;
                    }
                },
                _ = beat.tick() => yield Ok(render::heartbeat()),
            }
        }
    };
    Response::builder()
        .status(StatusCode::OK)
        .content_type("text/event-stream")
        .header("Cache-Control", "no-cache")
        .header("X-Accel-Buffering", "no")
        .body(Body::from_bytes_stream(body))
}

/// The streams a source carries, for the connection registry.
pub trait StreamsOf {
    fn streams(&self) -> Vec<StreamKey>;
}

impl StreamsOf for crate::cursor::Cursor {
    fn streams(&self) -> Vec<StreamKey> {
        vec![self.stream().clone()]
    }
}

impl StreamsOf for super::batch::Merged {
    fn streams(&self) -> Vec<StreamKey> {
        self.keys().cloned().collect()
    }
}
