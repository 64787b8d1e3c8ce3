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

use bytes::{Bytes, BytesMut};
use poem::http::StatusCode;
use poem::web::{Path, Query};
use poem::{Body, Response, handler};
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use super::batch::{Source, collect};
use super::{Caller, Delivery, OpenError, render, stopping};
use crate::cursor::Item;
use crate::domain::StreamKey;
use crate::http::wire::SnapshotBody;
use crate::observe::Transport;

/// Upper bound of one coalesced write.
pub const MAX_CHUNK: usize = 64 * 1024;

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
    respond(&caller, cursor, first.freeze(), |_, item| render::sse(item))
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
            respond(caller, cursor, first, |_, item| render::sse(item))
        }
        Err(e) => e.response(),
    }
}

/// The event-stream response: `first`, then batches from `src` rendered by `frame`,
/// heartbeats, and the end on shutdown, on revoked or expired credentials, or on a
/// storage failure. Registered in `/api/stats` while it streams.
pub fn respond<S, F>(caller: &Caller<'_>, mut src: S, first: Bytes, mut frame: F) -> Response
where
    S: Source + StreamsOf + 'static,
    F: FnMut(&StreamKey, &Item) -> Bytes + Send + 'static,
{
    let state = caller.state;
    let heartbeat = state.config.heartbeat;
    let shutdown = state.shutdown.clone();
    let auth = state.auth.clone();
    let principal = caller.principal.clone();
    let mut delivery = Delivery::new(state.service.connections().clone());
    let body = async_stream::stream! {
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

/// One chunk of frames: a lone frame is passed on as the shared bytes, without a copy.
fn join(pieces: &mut Vec<Bytes>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for p in pieces.drain(..) {
        buf.extend_from_slice(&p);
    }
    buf.freeze()
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
