//! Server-sent events (DESIGN §5).
//!
//! The body is built by hand rather than with poem's `SSE` type: events arrive already
//! rendered as SSE frames (shared `Bytes`), and everything ready is drained into one
//! chunk, so a burst costs one socket write per subscriber, not one per event.
//!
//! Once a stream has started, errors cannot become HTTP statuses: a storage failure
//! ends the stream (the client reconnects with `Last-Event-ID`), shutdown ends it after
//! the last complete frame.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use poem::http::StatusCode;
use poem::web::{Data, Path, Query};
use poem::{Body, Request, Response, handler};
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use crate::api::access::RateKey;
use crate::api::problem::{ApiError, Problem, error_response, service_problem};
use crate::app::AppState;
use crate::auth::Principal;
use crate::cursor::{Cursor, CursorError, Item, Start};
use crate::domain::{StreamKey, format_time, now};
use crate::event::sse_frame;
use crate::observe::{Stats, Transport};

/// Upper bound of one coalesced write.
pub const MAX_CHUNK: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
pub struct SseQuery {
    pub last_event_id: Option<String>,
    pub snapshot: Option<String>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "yes"))
}

pub fn header_resume_point(req: &Request) -> Option<String> {
    req.header("Last-Event-ID").map(str::to_owned)
}

pub fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "cannot open stream");
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the change log cannot be read right now; retry",
    )
    .response()
}

/// Why this caller may not open a stream on `stream` now (scope, then the
/// connection-open rate limit), as a problem response before the stream starts;
/// `None` when it may.
pub fn refusal(
    state: &AppState,
    p: &Principal,
    rate: &RateKey,
    stream: Option<&StreamKey>,
) -> Option<Response> {
    if let Some(Err(e)) = stream.map(|s| p.require_stream(s)) {
        return Some(error_response(e));
    }
    let retry = state.limits.connect(&rate.0).err()?;
    Some(error_response(ApiError::rate_limited(retry, "connections")))
}

/// `GET /sse/zones/{zone_id}/stock`
#[handler]
pub async fn zone_stock(
    req: &Request,
    Path(zone_id): Path<i32>,
    Query(q): Query<SseQuery>,
    Data(state): Data<&AppState>,
    Data(principal): Data<&Principal>,
    Data(rate): Data<&RateKey>,
) -> Response {
    if let Some(r) = refusal(state, principal, rate, Some(&StreamKey::Zone(zone_id))) {
        return r;
    }
    let service = &state.service;
    if let Err(e) = service.zone(zone_id).await {
        return service_problem(e);
    }
    let stream = StreamKey::Zone(zone_id).to_string();
    let mut cursor = Cursor::subscribe(&service.broker, &service.store, &stream);
    let mut first = BytesMut::from(retry_line(state.config.sse_retry).as_bytes());
    // A reconnecting EventSource repeats the URL (with `snapshot=1`) and sends
    // `Last-Event-ID`: it already has the state, so the header wins over a snapshot.
    let start = match header_resume_point(req) {
        Some(h) => Start::from_resume_point(Some(&h)),
        None if truthy(q.snapshot.as_deref()) => {
            let snap = match service.snapshot(zone_id).await {
                Ok(s) => s,
                Err(e) => return service_problem(e),
            };
            let body = crate::api::dto::SnapshotBody::from(snap);
            let json = serde_json::to_string(&body).unwrap_or_default();
            first.extend_from_slice(&sse_frame(
                Some(body.last_event_id),
                "stock_snapshot",
                json.as_bytes(),
            ));
            Start::Snapshot(body.last_event_id)
        }
        None => Start::from_resume_point(q.last_event_id.as_deref()),
    };
    if let Err(e) = cursor.seek(start).await {
        return unavailable(e);
    }
    stream_response(state, principal, cursor, first.freeze())
}

/// `GET /sse/alerts`
#[handler]
pub async fn alerts(
    req: &Request,
    Query(q): Query<SseQuery>,
    Data(state): Data<&AppState>,
    Data(principal): Data<&Principal>,
    Data(rate): Data<&RateKey>,
) -> Response {
    resumable(req, q, state, principal, rate, StreamKey::Alerts).await
}

/// `GET /sse/notifications`: the caller's own user stream.
#[handler]
pub async fn notifications(
    req: &Request,
    Query(q): Query<SseQuery>,
    Data(state): Data<&AppState>,
    Data(principal): Data<&Principal>,
    Data(rate): Data<&RateKey>,
) -> Response {
    let Some(user) = principal.user.clone() else {
        let e = crate::domain::DomainError::Forbidden(format!(
            "{} is not bound to a user",
            principal.name
        ));
        return error_response(e);
    };
    resumable(req, q, state, principal, rate, StreamKey::User(user)).await
}

/// A stream without a snapshot: live, or resumed from `Last-Event-ID` /
/// `?last_event_id=`.
async fn resumable(
    req: &Request,
    q: SseQuery,
    state: &AppState,
    principal: &Principal,
    rate: &RateKey,
    key: StreamKey,
) -> Response {
    if let Some(r) = refusal(state, principal, rate, Some(&key)) {
        return r;
    }
    let service = &state.service;
    let mut cursor = Cursor::subscribe(&service.broker, &service.store, &key.to_string());
    let raw = header_resume_point(req).or(q.last_event_id);
    if let Err(e) = cursor.seek(Start::from_resume_point(raw.as_deref())).await {
        return unavailable(e);
    }
    let first = Bytes::from(retry_line(state.config.sse_retry));
    stream_response(state, principal, cursor, first)
}

pub fn retry_line(retry: Duration) -> String {
    format!("retry: {}\n\n", retry.as_millis())
}

fn heartbeat_frame() -> Bytes {
    let data = format!("{{\"at\":\"{}\"}}", format_time(&now()));
    sse_frame(None, "heartbeat", data.as_bytes())
}

/// The frame of one cursor item: the shared pre-rendered bytes for an event.
pub fn frame(item: &Item) -> Bytes {
    match item {
        Item::Event(ev) => ev.sse.clone(),
        Item::Reset(r) => {
            let data = serde_json::to_vec(r).unwrap_or_default();
            sse_frame(None, "reset", &data)
        }
    }
}

/// What an SSE response streams from: one cursor (the per-stream endpoints, frames
/// shared by all subscribers) or several merged (`/sse/streams`).
pub enum Feed {
    One(Cursor),
    Many(super::sse_multi::Merged),
}

impl Feed {
    fn streams(&self) -> Vec<String> {
        match self {
            Feed::One(c) => vec![c.stream().to_owned()],
            Feed::Many(m) => m.streams(),
        }
    }

    /// The next chunk: everything ready, coalesced. Cancel-safe.
    async fn next_chunk(&mut self, delivery: &Delivery) -> Result<Bytes, CursorError> {
        match self {
            Feed::One(cursor) => {
                let item = cursor.next().await?;
                Ok(drain(cursor, &item, delivery))
            }
            Feed::Many(m) => m.next_chunk(delivery).await,
        }
    }
}

fn stream_response(
    state: &AppState,
    principal: &Principal,
    cursor: Cursor,
    first: Bytes,
) -> Response {
    feed_response(state, principal, Feed::One(cursor), first)
}

pub fn feed_response(
    state: &AppState,
    principal: &Principal,
    mut feed: Feed,
    first: Bytes,
) -> Response {
    let heartbeat = state.config.heartbeat;
    let mut shutdown = state.shutdown.clone();
    let auth = state.auth.clone();
    let principal = principal.clone();
    let delivery = Delivery::new(state.service.broker.stats.clone(), Transport::Sse);
    let body = async_stream::stream! {
        yield Ok::<Bytes, std::io::Error>(first);
        let name = principal.name.clone();
        // Registered while the body streams; dropped (unregistered) when it ends.
        let registration = delivery.stats.connect(Transport::Sse, principal.user.as_deref());
        let streams = feed.streams();
        for st in &streams {
            registration.add_stream(st);
        }
        tracing::info!(principal = %name, streams = ?streams, "SSE stream opened");
        let ended = async move { auth.ended(&principal).await };
        tokio::pin!(ended);
        let mut beat = interval_at(Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => break,
                why = &mut ended => {
                    tracing::info!(principal = %name, reason = why.reason(), "ending SSE stream");
                    break;
                }
                chunk = feed.next_chunk(&delivery) => match chunk {
                    Ok(chunk) => yield Ok(chunk),
                    Err(e) => {
                        tracing::warn!(streams = ?streams, error = %e, "ending SSE stream");
                        break;
                    }
                },
                _ = beat.tick() => yield Ok(heartbeat_frame()),
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

/// Completes once shutdown starts (or the server is gone).
pub async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The returned guard is dropped at once: it must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Delivery accounting of one connection: metric handles taken once, not per event.
pub struct Delivery {
    pub stats: Arc<Stats>,
    pub transport: Transport,
    lag: metrics::Histogram,
}

impl Delivery {
    pub fn new(stats: Arc<Stats>, transport: Transport) -> Self {
        Delivery {
            stats,
            transport,
            lag: metrics::histogram!("zonecast_delivery_lag_seconds"),
        }
    }

    /// Counts one item handed to the socket (events only; resets are notices).
    pub fn delivered(&self, item: &Item) {
        if let Item::Event(ev) = item
            && let Some(at) = ev.committed
        {
            self.lag.record(at.elapsed().as_secs_f64());
        }
    }
}

/// Appends everything else that is ready to the first item's frame, up to
/// `MAX_CHUNK`. A lone frame is passed on as the shared bytes, without a copy.
fn drain(cursor: &mut Cursor, first: &Item, delivery: &Delivery) -> Bytes {
    delivery.delivered(first);
    let first = frame(first);
    let Some(second) = cursor.try_next() else {
        delivery.stats.sent(delivery.transport, 1);
        return first;
    };
    delivery.delivered(&second);
    let mut n = 2;
    let mut buf = BytesMut::with_capacity(MAX_CHUNK.min(first.len() * 16));
    buf.extend_from_slice(&first);
    buf.extend_from_slice(&frame(&second));
    while buf.len() < MAX_CHUNK {
        match cursor.try_next() {
            Some(item) => {
                delivery.delivered(&item);
                n += 1;
                buf.extend_from_slice(&frame(&item));
            }
            None => break,
        }
    }
    delivery.stats.sent(delivery.transport, n);
    buf.freeze()
}
