//! WebSocket connections (DESIGN §6): the same cursors as SSE, plus requests.
//!
//! One connection = a reader loop (requests, pings, shutdown), one writer task that
//! owns the socket's sending half (`ws_socket`), and one feeder task per subscription.
//! Everything outgoing goes through one bounded queue: when a client stops reading,
//! the queue fills, feeders stop pulling from their cursors, and those catch up later
//! from the cache or the log (or say `reset`). Memory per connection stays bounded.
//!
//! Close codes (every other problem is an `error` message and the connection stays
//! open):
//!
//! | code | when |
//! |---|---|
//! | 1001 | the client sent nothing (not even a Pong) for two ping intervals |
//! | 1002 | a protocol error: unmasked frame, reserved bits or opcode, a continuation without a start, a bad close frame |
//! | 1007 | a text frame that is not UTF-8 |
//! | 1008 | credentials revoked or expired; messages far past the rate limit |
//! | 1009 | a message or frame over 64 KiB |
//! | 1012 | the server is shutting down |

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use poem::web::{Data, Path, Query};
use poem::{Request as HttpRequest, Response, handler};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use super::sse::Delivery;
use super::sse::{refusal, stopping};
use super::ws_protocol::{self as proto, Code, Refusal, Request};
use super::ws_socket::{self, Socket, Writer, close_frame};
use crate::api::access::RateKey;
use crate::api::problem::service_problem;
use crate::app::AppState;
use crate::auth::Principal;
use crate::cursor::{Cursor, Start};
use crate::domain::StreamKey;
use crate::limits::check_direct;
use crate::observe::{ConnGuard, Transport};

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Streams one connection may be subscribed to at once.
pub const MAX_SUBSCRIPTIONS: usize = 32;

#[derive(Debug, Default, Deserialize)]
pub struct WsQuery {
    last_event_id: Option<String>,
}

/// Rate-limited messages in a row after which a flooding client is closed (1008).
const FLOOD: u32 = 200;

/// Who is on the other end, fixed at the handshake.
struct Caller {
    principal: Principal,
    rate: RateKey,
}

/// `GET /ws`
#[handler]
pub fn plain_socket(
    req: &HttpRequest,
    Data(state): Data<&AppState>,
    Data(principal): Data<&Principal>,
    Data(rate): Data<&RateKey>,
) -> Response {
    if let Some(r) = refusal(state, principal, rate, None) {
        return r;
    }
    let state = state.clone();
    let caller = Caller {
        principal: principal.clone(),
        rate: rate.clone(),
    };
    ws_socket::upgrade(req, move |socket| run(socket, state, caller, None))
}

/// `GET /ws/zones/{zone_id}`: already subscribed to the zone (`?last_event_id=N`).
#[handler]
pub async fn zone_socket(
    req: &HttpRequest,
    Path(zone_id): Path<i32>,
    Query(q): Query<WsQuery>,
    Data(state): Data<&AppState>,
    Data(principal): Data<&Principal>,
    Data(rate): Data<&RateKey>,
) -> Response {
    if let Some(r) = refusal(state, principal, rate, Some(&StreamKey::Zone(zone_id))) {
        return r;
    }
    if let Err(e) = state.service.zone(zone_id).await {
        return service_problem(e);
    }
    let start = Start::from_resume_point(q.last_event_id.as_deref());
    let state = state.clone();
    let caller = Caller {
        principal: principal.clone(),
        rate: rate.clone(),
    };
    ws_socket::upgrade(req, move |socket| {
        run(socket, state, caller, Some((zone_id, start)))
    })
}

/// Aborts a feeder when its subscription is dropped.
struct Feeder(JoinHandle<()>);

impl Drop for Feeder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Connection {
    state: AppState,
    /// In the registry behind `/api/stats` while the connection lives.
    registration: ConnGuard,
    delivery: Arc<Delivery>,
    caller: Caller,
    /// This connection's message limiter, and how many messages in a row it refused.
    messages: Option<governor::DefaultDirectRateLimiter>,
    refused_in_a_row: u32,
    out: mpsc::Sender<Message>,
    subscriptions: HashMap<String, Feeder>,
    /// The zone of the `/ws/zones/{id}` path, the default for `request_stock`.
    zone: Option<i32>,
    /// How long a send to the outgoing queue may wait before the client is taken
    /// for gone.
    send_patience: Duration,
}

/// What the reader loop does after one incoming frame.
enum Step {
    Continue,
    /// End the connection, with this close frame if the server is the one closing.
    End(Option<CloseFrame>),
}

/// Whether an incoming message may be handled.
enum Admitted {
    Yes,
    No(Step),
}

/// The close frame for a read error, if the client is still there to get one.
fn close_for(e: &WsError) -> Option<CloseFrame> {
    match e {
        WsError::Capacity(_) => Some(close_frame(CloseCode::Size, "message over 64 KiB")),
        WsError::Utf8(_) => Some(close_frame(CloseCode::Invalid, "text frame is not UTF-8")),
        WsError::Protocol(p) => Some(close_frame(CloseCode::Protocol, &p.to_string())),
        WsError::AttackAttempt => Some(close_frame(CloseCode::Protocol, "protocol violation")),
        _ => None,
    }
}

async fn run(socket: Socket, state: AppState, caller: Caller, zone: Option<(i32, Start)>) {
    let id = format!("ws-{}", NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed));
    let span = tracing::info_span!("ws", connection = %id, principal = %caller.principal.name);
    serve(socket, state, caller, zone, id)
        .instrument(span)
        .await
}

async fn serve(
    socket: Socket,
    state: AppState,
    caller: Caller,
    zone: Option<(i32, Start)>,
    id: String,
) {
    let stats = state.service.broker.stats.clone();
    let (writer, mut incoming) = Writer::spawn(socket, state.config.ws_queue, stats.clone());
    let ping_every = state.config.ws_ping;
    let mut shutdown = state.shutdown.clone();
    let auth = state.auth.clone();
    let principal = caller.principal.clone();
    let ended = async move { auth.ended(&principal).await };
    tokio::pin!(ended);
    let registration = stats.connect(Transport::Ws, caller.principal.user.as_deref());
    let mut conn = Connection {
        delivery: Arc::new(Delivery::new(stats, Transport::Ws)),
        registration,
        messages: state.limits.ws_messages(),
        refused_in_a_row: 0,
        caller,
        out: writer.queue.clone(),
        subscriptions: HashMap::new(),
        zone: zone.map(|z| z.0),
        send_patience: ping_every * 2,
        state,
    };
    tracing::debug!("connected");

    // The path subscription is opened before `welcome` so the welcome can list it,
    // and fed only after, so `welcome` is always the first message.
    let mut first = None;
    if let Some((zone_id, start)) = zone {
        let stream = StreamKey::Zone(zone_id).to_string();
        match conn.open(&stream, start).await {
            Ok(cursor) => first = Some(cursor),
            Err(r) => tracing::warn!(error = %r.message, "cannot open the path subscription"),
        }
    }
    let subs: Vec<String> = first.iter().map(|c| c.stream().to_owned()).collect();
    let welcome = proto::welcome(&id, &subs, ping_every.as_millis());
    let mut step = if conn.send(welcome).await {
        Step::Continue
    } else {
        Step::End(None)
    };
    if let Some(cursor) = first {
        conn.feed(cursor);
    }

    let mut ping = interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    while let Step::Continue = step {
        step = tokio::select! {
            biased;
            _ = stopping(&mut shutdown) => {
                Step::End(Some(close_frame(CloseCode::Restart, "server restarting")))
            }
            why = &mut ended => {
                tracing::info!(reason = why.reason(), "closing");
                Step::End(Some(close_frame(CloseCode::Policy, why.reason())))
            }
            msg = incoming.next() => {
                last_heard = Instant::now();
                match msg {
                    None | Some(Ok(Message::Close(_))) => Step::End(None),
                    Some(Ok(Message::Text(text))) => conn.handle(Some(text.as_str())).await,
                    Some(Ok(Message::Binary(_))) => conn.handle(None).await,
                    // A ping costs the server a write: it counts like a message.
                    Some(Ok(Message::Ping(_))) => conn.ping().await,
                    Some(Ok(Message::Pong(_) | Message::Frame(_))) => Step::Continue,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "read failed");
                        Step::End(close_for(&e))
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= ping_every * 2 {
                    Step::End(Some(close_frame(CloseCode::Away, "no response to pings")))
                } else {
                    // A full queue means the client is not reading; the check above
                    // will close it if it does not answer either.
                    let _ = conn.out.try_send(Message::Ping(Default::default()));
                    Step::Continue
                }
            }
        };
    }
    let Step::End(frame) = step else {
        return;
    };
    // Feeders stop with their subscriptions, then the socket is closed (see
    // `ws_socket`): nothing of the connection outlives this function.
    drop(conn);
    writer.finish(incoming, frame).await;
    tracing::debug!("disconnected");
}

impl Connection {
    /// Queues a message; `false` when the client is gone or has not read for too long.
    async fn send(&self, text: String) -> bool {
        self.out
            .send_timeout(Message::Text(text.into()), self.send_patience)
            .await
            .is_ok()
    }

    fn step(sent: bool) -> Step {
        if sent {
            Step::Continue
        } else {
            Step::End(None)
        }
    }

    /// Counts one incoming message against the connection's limit. Refused: the
    /// refusal is sent (or, far past the limit, the connection ends).
    async fn admit(&mut self) -> Admitted {
        let Err(retry) = check_direct(&self.messages) else {
            self.refused_in_a_row = 0;
            return Admitted::Yes;
        };
        self.refused_in_a_row += 1;
        if self.refused_in_a_row >= FLOOD {
            tracing::info!("flooding far past the message limit; closing");
            return Admitted::No(Step::End(Some(close_frame(
                CloseCode::Policy,
                "message rate far past the limit",
            ))));
        }
        let r = Refusal::rate_limited(retry, "messages");
        Admitted::No(Self::step(self.send(proto::error(None, &r)).await))
    }

    /// A ping from the client: tungstenite answers it; it only counts.
    async fn ping(&mut self) -> Step {
        match self.admit().await {
            Admitted::Yes => Step::Continue,
            Admitted::No(step) => step,
        }
    }

    /// Handles one data frame: a text message, or `None` for a binary one.
    async fn handle(&mut self, text: Option<&str>) -> Step {
        if let Admitted::No(step) = self.admit().await {
            return step;
        }
        let Some(text) = text else {
            let r = Refusal::new(
                Code::BadMessage,
                "binary frames are not accepted; send JSON text",
            );
            return Self::step(self.send(proto::error(None, &r)).await);
        };
        let parsed = proto::parse(text);
        let rid = parsed.request_id.as_ref();
        let reply = match parsed.request {
            Ok(request) => self.answer(request, rid).await,
            Err(r) => Err(r),
        };
        let text = reply.unwrap_or_else(|r| proto::error(rid, &r));
        // An empty reply was already queued by the handler (`subscribed`).
        Self::step(text.is_empty() || self.send(text).await)
    }

    async fn answer(&mut self, request: Request, rid: Option<&Value>) -> Result<String, Refusal> {
        let service = &self.state.service;
        match request {
            Request::Ping => Ok(proto::pong(rid)),
            Request::RequestStock { zone_id } => {
                let zone_id = zone_id
                    .or(self.zone)
                    .ok_or_else(|| Refusal::new(Code::Invalid, "zone_id is required"))?;
                self.caller.principal.require_zone(zone_id)?;
                let snapshot = service.snapshot(zone_id).await?;
                Ok(proto::stock_snapshot(rid, snapshot.into()))
            }
            Request::UpdateQuantity { item_id, patch } => {
                self.write_allowed()?;
                let key = rid.and_then(Value::as_str).map(str::to_owned);
                let key = crate::domain::request_id(key.as_deref())?;
                let change = service
                    .update_item(item_id, patch, key, &self.caller.principal)
                    .await?;
                Ok(proto::ack(rid, change))
            }
            Request::Subscribe {
                stream,
                last_event_id,
            } => {
                let key = stream.to_string();
                if !self.subscriptions.contains_key(&key)
                    && self.subscriptions.len() >= MAX_SUBSCRIPTIONS
                {
                    return Err(Refusal::new(
                        Code::Invalid,
                        format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                    ));
                }
                let start = last_event_id.map_or(Start::Live, Start::After);
                let cursor = self.open(&key, start).await?;
                // Re-subscribing replaces the old feed; `subscribed` is queued before
                // the new feeder can queue any event.
                self.subscriptions.remove(&key);
                let reply = proto::subscription("subscribed", rid, &key);
                if !self.send(reply).await {
                    return Err(Refusal::new(Code::Internal, "connection closing"));
                }
                self.feed(cursor);
                Ok(String::new())
            }
            Request::MarkRead { notification_id } => {
                self.write_allowed()?;
                let r = service
                    .mark_read(&self.caller.principal, notification_id)
                    .await?;
                Ok(proto::marked_read(rid, &r.ids, r.unread))
            }
            Request::GetUnreadCount => {
                let n = service.unread_count(&self.caller.principal).await?;
                Ok(proto::unread_count(rid, n))
            }
            Request::Unsubscribe { stream } => {
                let key = stream.to_string();
                self.registration.remove_stream(&key);
                if self.subscriptions.remove(&key).is_none() {
                    return Err(Refusal::new(
                        Code::NotFound,
                        format!("not subscribed to {key}"),
                    ));
                }
                Ok(proto::subscription("unsubscribed", rid, &key))
            }
        }
    }

    /// A message that writes counts against the caller's write limit, as over REST.
    fn write_allowed(&self) -> Result<(), Refusal> {
        self.state
            .limits
            .write(&self.caller.rate.0)
            .map_err(|r| Refusal::rate_limited(r, "writes"))
    }

    /// Opens a positioned cursor on a stream this connection may read.
    async fn open(&self, stream: &str, start: Start) -> Result<Cursor, Refusal> {
        let service = &self.state.service;
        let key = StreamKey::parse(stream)?;
        self.caller.principal.require_stream(&key)?;
        if let StreamKey::Zone(id) = key {
            service.zone(id).await?;
        }
        let mut cursor = Cursor::subscribe(&service.broker, &service.store, stream);
        cursor.seek(start).await.map_err(|e| {
            tracing::error!(error = %e, "cannot open cursor");
            Refusal::new(Code::Internal, "the change log cannot be read right now")
        })?;
        Ok(cursor)
    }

    /// Starts the feeder that writes the cursor's items to the outgoing queue.
    fn feed(&mut self, mut cursor: Cursor) {
        let out = self.out.clone();
        let stream = cursor.stream().to_owned();
        let delivery = self.delivery.clone();
        // Once per stream, also when a subscription is replaced.
        self.registration.remove_stream(&stream);
        self.registration.add_stream(&stream);
        let task = tokio::spawn(
            async move {
                loop {
                    let text = match cursor.next().await {
                        Ok(item) => {
                            delivery.delivered(&item);
                            proto::item(cursor.stream(), &item)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "subscription ended");
                            let r = Refusal::new(
                                Code::Internal,
                                format!("subscription to {} ended; subscribe again with last_event_id {}", cursor.stream(), cursor.position()),
                            );
                            let _ = out.send(Message::Text(proto::error(None, &r).into())).await;
                            break;
                        }
                    };
                    // Waits while the queue is full: the cursor stops pulling and
                    // catches up from the cache or the log once the client reads.
                    if out.send(Message::Text(text)).await.is_err() {
                        break;
                    }
                    delivery.stats.sent(Transport::Ws, 1);
                }
            }
            .in_current_span(),
        );
        self.subscriptions.insert(stream, Feeder(task));
    }
}
