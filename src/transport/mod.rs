//! Transports: how cursors reach clients. They parse requests, open streams through
//! `open` (the service decides who may read what), render items with `render`, write
//! them in batches made by `batch` (to sockets without waiting: `send`), and hold no
//! state beyond their connections and the fan-out of their streams.
//!
//! - `sse`: the single-stream endpoints and the event-stream response body;
//!   `sse_multi`: several streams on one EventSource; `sse_socket`: a single-stream
//!   connection the server handed over, on its own until it has caught up.
//! - `fanout`: one task per stream writing each batch to every caught-up connection,
//!   SSE or WebSocket.
//! - `ws`: WebSocket connections; `ws_protocol`: their messages; `ws_socket`: the
//!   socket, the outgoing queue every writer shares, and how it closes.

pub mod batch;
pub mod fanout;
pub mod render;
pub mod send;
pub mod sse;
pub mod sse_multi;
pub mod sse_socket;
pub mod ws;
pub mod ws_protocol;
pub mod ws_socket;

use poem::http::StatusCode;
use poem::web::Query;
use poem::{FromRequest, Request, RequestBody, Response};

use crate::cursor::{Cursor, Start};
use crate::domain::{DomainError, Principal, StreamKey};
use crate::http::access::RateKey;
use crate::http::problem::{ApiError, Problem, error_response};
use crate::limits::RetryAfter;
use crate::service::ServiceError;
use crate::state::AppState;
use crate::store::StoreError;

/// Why a stream (or a connection that carries streams) cannot be opened.
#[derive(Debug)]
pub enum OpenError {
    /// Not allowed, or nothing to open (no such zone, a bad stream key).
    Refused(DomainError),
    /// Too many stream connections opened by this caller.
    RateLimited(RetryAfter),
    /// The change log cannot be read.
    Unavailable(StoreError),
}

impl From<ServiceError> for OpenError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Domain(d) => OpenError::Refused(d),
            ServiceError::Store(s) => OpenError::Unavailable(s),
        }
    }
}

impl OpenError {
    /// As an HTTP answer before the stream starts.
    pub fn response(self) -> Response {
        match self {
            OpenError::Refused(d) => error_response(d),
            OpenError::RateLimited(r) => error_response(ApiError::rate_limited(r, "connections")),
            OpenError::Unavailable(e) => {
                tracing::error!(error = %e, "cannot open a stream");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the change log cannot be read right now; retry",
                )
                .response()
            }
        }
    }
}

/// What every transport handler is given: the server, the caller and the key their
/// connects count against (as the authentication middleware left them on the request),
/// and where the caller resumes.
pub struct Caller<'a> {
    pub state: &'a AppState,
    /// The server's SSE fan-out, where the routes have one.
    pub fanout: Option<&'a fanout::Fanout>,
    pub principal: &'a Principal,
    pub rate: &'a RateKey,
    /// The resume point: the `Last-Event-ID` header, else `?last_event_id=`.
    pub resume: Option<String>,
    /// It came in the header: an `EventSource` reconnecting by itself.
    pub reconnecting: bool,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ResumeQuery {
    last_event_id: Option<String>,
}

impl<'a> FromRequest<'a> for Caller<'a> {
    async fn from_request(req: &'a Request, _: &mut RequestBody) -> poem::Result<Self> {
        fn data<T: Send + Sync + 'static>(req: &Request) -> poem::Result<&T> {
            req.data::<T>().ok_or_else(|| {
                poem::Error::from_string(
                    format!(
                        "{} missing: the route is outside the middleware",
                        std::any::type_name::<T>()
                    ),
                    StatusCode::INTERNAL_SERVER_ERROR,
                )
            })
        }
        let header = req.header("Last-Event-ID");
        let resume = match header {
            Some(h) => Some(h.to_owned()),
            None => {
                let Query(q) = Query::<ResumeQuery>::from_request_without_body(req).await?;
                q.last_event_id
            }
        };
        Ok(Caller {
            state: data(req)?,
            fanout: req.data(),
            principal: data(req)?,
            rate: data(req)?,
            resume,
            reconnecting: header.is_some(),
        })
    }
}

impl Caller<'_> {
    /// A connection that will carry streams counts against its caller's open rate.
    pub fn admit(&self) -> Result<(), OpenError> {
        self.state
            .limits
            .connect(&self.rate.0)
            .map_err(OpenError::RateLimited)
    }

    /// Where the caller starts: its resume point, else live.
    pub fn start(&self) -> Start {
        Start::from_resume_point(self.resume.as_deref())
    }

    /// `open` for this caller.
    pub async fn open(&self, stream: StreamKey, start: Start) -> Result<Cursor, OpenError> {
        open(self.state, self.principal, stream, start).await
    }
}

/// Opens `stream` for `principal`, positioned at `start`. Every transport opens its
/// streams here.
pub async fn open(
    state: &AppState,
    principal: &Principal,
    stream: StreamKey,
    start: Start,
) -> Result<Cursor, OpenError> {
    Ok(state.service.open_stream(principal, &stream, start).await?)
}

/// Completes once shutdown starts (or the server is gone). Made once per connection
/// and pinned, not once per wake-up: each new one registers with the watch again.
pub async fn stopping(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    // The returned guard is dropped at once: it must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Delivery accounting of one connection: the lag histogram's handle is taken once,
/// not per event, and it is recorded once per write (the oldest event of the batch,
/// the one that waited longest), not per event: a clock read and a histogram record
/// per delivery were a visible part of fan-out's CPU.
pub struct Delivery {
    pub stats: std::sync::Arc<crate::observe::Stats>,
    lag: metrics::Histogram,
    /// The commit instant of the first event of the batch being taken.
    oldest: Option<std::time::Instant>,
}

impl Delivery {
    pub fn new(stats: std::sync::Arc<crate::observe::Stats>) -> Self {
        Delivery {
            stats,
            lag: metrics::histogram!("zonecast_delivery_lag_seconds"),
            oldest: None,
        }
    }

    /// Notes one item handed to the socket (events only; resets are notices).
    pub fn delivered(&mut self, item: &crate::cursor::Item) {
        if self.oldest.is_none()
            && let crate::cursor::Item::Event(ev) = item
        {
            self.oldest = ev.committed;
        }
    }

    /// A batch was written: records its lag.
    pub fn written(&mut self) {
        if let Some(at) = self.oldest.take() {
            self.lag.record(at.elapsed().as_secs_f64());
        }
    }
}
