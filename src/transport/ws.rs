//! WebSocket connections (DESIGN §6): the same cursors as SSE, plus requests.
//!
//! One connection = one task: it reads requests (and pings), answers them, follows
//! the subscriptions that have not caught up with their stream yet, pings, and writes
//! what is queued on the connection's outgoing side (`ws_socket`). A subscription that
//! has caught up joins its stream's fan-out (`fanout`), which writes its events from
//! then on; the fan-out hands it back when the connection's queue is full, and the task
//! follows it again from where it stands.
//!
//! When a client stops reading, its queue fills to a bound: then the task reads no more
//! requests and pulls no more events (its subscriptions catch up later from the cache
//! or the log, or say `reset`), and a client that stays so for two ping intervals is
//! closed. Memory per connection stays bounded.
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

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use poem::web::Path;
use poem::{Request as HttpRequest, Response, handler};
use serde_json::Value;
use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use super::batch::{Merged, Source, collect};
use super::fanout::{Fanout, Joiner};
use super::ws_protocol::{self as proto, Code, Refusal, Request};
use super::ws_socket::{self, Opened, WsConn, close_frame};
use super::{Caller, Delivery, OpenError, open, render, stopping};
use crate::credentials::Ended;
use crate::cursor::{Cursor, Item, Start};
use crate::domain::{Principal, StreamKey};
use crate::http::access::RateKey;
use crate::limits::check_direct;
use crate::observe::{ConnGuard, Transport};
use crate::state::AppState;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Streams one connection may be subscribed to at once.
pub const MAX_SUBSCRIPTIONS: usize = 32;

/// Messages taken from the followed streams per write, at most.
const BATCH: usize = 64;

/// Bytes queued per `--ws-queue` message: the queue's bound in bytes.
const QUEUED_PER_MESSAGE: usize = 256;

/// Rate-limited messages in a row after which a flooding client is closed (1008).
const FLOOD: u32 = 200;

/// Who is on the other end, fixed at the handshake.
struct Peer {
    principal: Principal,
    rate: RateKey,
}

impl Peer {
    /// What the connection keeps of the handshake's caller, and the server's fan-out
    /// (which also gives the server's state).
    fn of(caller: &Caller<'_>) -> (Fanout, Peer) {
        let peer = Peer {
            principal: caller.principal.clone(),
            rate: caller.rate.clone(),
        };
        // Routes without a fan-out (none the app builds): one of the connection's own.
        let fanout = caller
            .fanout
            .cloned()
            .unwrap_or_else(|| super::sse_socket::fanout(caller.state.clone()));
        (fanout, peer)
    }
}

impl From<OpenError> for Refusal {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Refused(d) => d.into(),
            OpenError::RateLimited(r) => Refusal::rate_limited(r, "connections"),
            OpenError::Unavailable(e) => {
                tracing::error!(error = %e, "cannot open a subscription");
                Refusal::new(Code::Internal, "the change log cannot be read right now")
            }
        }
    }
}

fn queue_bytes(state: &AppState) -> usize {
    state.config.ws_queue.max(8) * QUEUED_PER_MESSAGE
}

/// `GET /ws`
#[handler]
pub fn plain_socket(req: &HttpRequest, caller: Caller<'_>) -> Response {
    if let Err(e) = caller.admit() {
        return e.response();
    }
    let (fanout, peer) = Peer::of(&caller);
    let limit = queue_bytes(fanout.state());
    ws_socket::upgrade(req, limit, move |opened| run(opened, fanout, peer, None))
}

/// `GET /ws/zones/{zone_id}`: already subscribed to the zone (`?last_event_id=N`).
#[handler]
pub async fn zone_socket(req: &HttpRequest, Path(zone_id): Path<i32>, c: Caller<'_>) -> Response {
    // The path's stream is opened (and refused) before the upgrade.
    let opened = async {
        c.admit()?;
        c.open(StreamKey::Zone(zone_id), c.start()).await
    };
    let cursor = match opened.await {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    let (fanout, peer) = Peer::of(&c);
    let limit = queue_bytes(fanout.state());
    ws_socket::upgrade(req, limit, move |opened| {
        run(opened, fanout, peer, Some((zone_id, cursor)))
    })
}

struct Connection {
    /// The server's fan-out, and through it the server's state.
    fanout: Fanout,
    conn: Arc<WsConn>,
    /// In the registry behind `/api/stats` while the connection lives.
    registration: ConnGuard,
    peer: Peer,
    /// This connection's message limiter, and how many messages in a row it refused.
    messages: Option<governor::DefaultDirectRateLimiter>,
    refused_in_a_row: u32,
    /// Every subscription and its number (the fan-out writes a stream only under the
    /// number it joined with).
    subs: HashMap<StreamKey, u64>,
    /// The subscriptions this task follows itself, and the seq each handed out last.
    following: Merged,
    positions: HashMap<StreamKey, u64>,
    /// The zone of the `/ws/zones/{id}` path, the default for `request_stock`.
    zone: Option<i32>,
    delivery: Delivery,
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

/// What a connection starts with.
struct Setup {
    opened: Opened,
    fanout: Fanout,
    peer: Peer,
    zone: Option<(i32, Cursor)>,
    id: String,
}

/// Not an `async fn`: its arguments would stay in the task for its whole life, beside
/// the connection built from them. `serve` gets them boxed, and frees the box.
fn run(
    opened: Opened,
    fanout: Fanout,
    peer: Peer,
    zone: Option<(i32, Cursor)>,
) -> impl Future<Output = ()> + Send {
    let id = format!("ws-{}", NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed));
    let span = tracing::info_span!("ws", connection = %id, principal = %peer.principal.name);
    let setup = Box::new(Setup {
        opened,
        fanout,
        peer,
        zone,
        id,
    });
    serve(setup).instrument(span)
}

async fn serve(setup: Box<Setup>) {
    let Setup {
        mut opened,
        fanout,
        peer,
        zone,
        id,
    } = *setup;
    let state = fanout.state();
    let stats = state.service.connections().clone();
    let ping_every = state.config.ws_ping;
    let stop = stopping(state.shutdown.clone());
    tokio::pin!(stop);
    // The credentials' end: a revocation (one watch of the server's, checked when it
    // moves) or the token's expiry (a timer only where there is one).
    let mut revocations = state.auth.revocations();
    let mut expiry = peer
        .principal
        .expires_at
        .map(|at| Box::pin(tokio::time::sleep_until(super::fanout::instant_of(at))));
    let revoked_already = state.auth.is_revoked(&peer.principal);
    let mut conn = Connection {
        registration: stats.connect(Transport::Ws, peer.principal.user.as_deref()),
        messages: state.limits.ws_messages(),
        refused_in_a_row: 0,
        peer,
        conn: opened.conn.clone(),
        subs: HashMap::new(),
        following: Merged::default(),
        positions: HashMap::new(),
        zone: zone.as_ref().map(|z| z.0),
        delivery: Delivery::new(stats),
        fanout: fanout.clone(),
    };
    tracing::debug!("connected");

    // The path subscription was opened before the upgrade, so the welcome can list it;
    // it is followed only after, so `welcome` is always the first message.
    let subs: Vec<String> = zone.iter().map(|(_, c)| c.stream().to_string()).collect();
    let welcome = proto::welcome(&id, &conn.state().node, &subs, ping_every.as_millis());
    conn.send(welcome);
    if let Some((_, cursor)) = zone {
        conn.follow(cursor, None);
    }

    let mut ping = interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // Since when the queue has been over its bound (the client is not reading).
    let mut full_since: Option<Instant> = None;
    let mut taken: Vec<Bytes> = Vec::new();
    let mut step = revoked_already.then(|| {
        tracing::info!(reason = Ended::Revoked.reason(), "closing");
        Some(close_frame(CloseCode::Policy, Ended::Revoked.reason()))
    });
    let step = loop {
        if let Some(frame) = step.take() {
            break frame;
        }
        if conn.conn.has_returned() {
            // Boxed: a cursor's seek, inline, would size every idle connection's task.
            Box::pin(conn.take_back()).await;
        }
        conn.follow_ready();
        let over = conn.conn.over_limit();
        full_since = if over {
            full_since.or(Some(Instant::now()))
        } else {
            None
        };
        let pending = conn.conn.pending();
        let following = !conn.following.is_empty();
        let step = tokio::select! {
            biased;
            _ = &mut stop => {
                Step::End(Some(close_frame(CloseCode::Restart, "server restarting")))
            }
            Ok(()) = revocations.changed() => {
                if conn.state().auth.is_revoked(&conn.peer.principal) {
                    tracing::info!(reason = Ended::Revoked.reason(), "closing");
                    Step::End(Some(close_frame(CloseCode::Policy, Ended::Revoked.reason())))
                } else {
                    Step::Continue
                }
            }
            _ = async { if let Some(e) = expiry.as_mut() { e.await } }, if expiry.is_some() => {
                tracing::info!(reason = Ended::Expired.reason(), "closing");
                Step::End(Some(close_frame(CloseCode::Policy, Ended::Expired.reason())))
            }
            // Boxed, as the rest: a `select!` holds every branch's future at once.
            flushed = Box::pin(ws_socket::flush(&opened.conn, &mut opened.writer)), if pending => {
                match flushed {
                    Ok(()) => Step::Continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "write failed");
                        conn.delivery.stats.send_error();
                        Step::End(None)
                    }
                }
            }
            msg = opened.socket.next(), if !over => {
                last_heard = Instant::now();
                match msg {
                    None | Some(Ok(Message::Close(_))) => Step::End(None),
                    // Boxed: a change's future reaches down into the store, and inline
                    // it would size every connection's task for it while idle.
                    Some(Ok(Message::Text(text))) => Box::pin(conn.handle(Some(text.as_str()))).await,
                    Some(Ok(Message::Binary(_))) => Box::pin(conn.handle(None)).await,
                    // A ping costs the server a write: it counts like a message.
                    Some(Ok(Message::Ping(_))) => conn.ping(),
                    Some(Ok(Message::Pong(_) | Message::Frame(_))) => Step::Continue,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "read failed");
                        Step::End(close_for(&e))
                    }
                }
            }
            _ = opened.conn.wake.notified() => Step::Continue,
            got = Box::pin(collect(&mut conn.following, BATCH, |stream, item| {
                let at = match item {
                    Item::Event(ev) => ev.seq,
                    Item::Reset(r) => r.last_event_id,
                };
                conn.positions.insert(stream.clone(), at);
                conn.delivery.delivered(item);
                taken.push(ws_socket::text(render::ws(stream, item).as_bytes()));
                1
            })), if following && !over => match got {
                Ok(_) => {
                    conn.write_taken(&mut taken);
                    Step::Continue
                }
                Err(e) => {
                    conn.subscription_failed(&e);
                    Step::Continue
                }
            },
            _ = ping.tick() => {
                let silent = last_heard.elapsed() >= ping_every * 2;
                let stuck = full_since.is_some_and(|t| t.elapsed() >= ping_every * 2);
                if silent {
                    Step::End(Some(close_frame(CloseCode::Away, "no response to pings")))
                } else if stuck {
                    tracing::info!("not reading for two ping intervals; closing");
                    Step::End(None)
                } else {
                    // A full queue means the client is not reading; the checks above
                    // will close it if it does not answer either.
                    if !over {
                        conn.conn.send(ws_socket::ping());
                    }
                    Step::Continue
                }
            }
        };
        if let Step::End(frame) = step {
            break frame;
        }
    };
    // Nothing of the connection outlives this function: its fan-out groups are told,
    // and the socket is closed (see `ws_socket`).
    let streams = conn.conn.streams();
    drop(conn);
    // Boxed: only the end needs it, and inline it would size the task for it all along.
    Box::pin(ws_socket::finish(opened, step)).await;
    for s in &streams {
        fanout.left(s);
    }
    tracing::debug!("disconnected");
}

impl Connection {
    fn state(&self) -> &AppState {
        self.fanout.state()
    }

    /// Queues a message of the connection's own.
    fn send(&self, text: String) {
        self.conn.send(ws_socket::text(text.as_bytes()));
    }

    /// Writes what the followed streams gave, as one write.
    fn write_taken(&mut self, taken: &mut Vec<Bytes>) {
        if taken.is_empty() {
            return;
        }
        let n = taken.len();
        let bytes = if n == 1 {
            taken.pop().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(taken.iter().map(Bytes::len).sum());
            for t in taken.drain(..) {
                b.extend_from_slice(&t);
            }
            b.freeze()
        };
        self.conn.send(bytes);
        self.delivery.written();
        self.delivery.stats.sent(Transport::Ws, n as u64);
    }

    /// Writes what the followed streams have ready now, without waiting; then hands
    /// each stream that has caught up to its fan-out.
    fn follow_ready(&mut self) {
        if self.following.is_empty() {
            return;
        }
        let mut taken = Vec::new();
        let mut drained = false;
        while !self.conn.over_limit() {
            while taken.len() < BATCH {
                let Some(item) = self.following.try_next_item() else {
                    drained = true;
                    break;
                };
                let stream = self.following.last_stream().clone();
                let at = match &item {
                    Item::Event(ev) => ev.seq,
                    Item::Reset(r) => r.last_event_id,
                };
                self.positions.insert(stream.clone(), at);
                self.delivery.delivered(&item);
                taken.push(ws_socket::text(render::ws(&stream, &item).as_bytes()));
            }
            self.write_taken(&mut taken);
            if drained {
                break;
            }
        }
        if drained {
            self.join_caught_up();
        }
    }

    /// Hands every followed stream whose position is the newest this node knows to its
    /// fan-out (only called when no followed stream has anything ready).
    fn join_caught_up(&mut self) {
        let fanout = self.fanout.clone();
        let local = fanout.state().service.broker().local();
        let keys: Vec<StreamKey> = self.following.keys().cloned().collect();
        for stream in keys {
            let (Some(&pos), Some(&sub)) = (self.positions.get(&stream), self.subs.get(&stream))
            else {
                continue;
            };
            if local.newest(&stream).is_some_and(|n| n > pos) {
                continue;
            }
            self.following.remove(&stream);
            self.positions.remove(&stream);
            let who = Joiner::Ws {
                conn: self.conn.clone(),
                sub,
            };
            fanout.join(&stream, pos, who);
        }
    }

    /// Takes back the streams a fan-out handed back: follows each again from where it
    /// stands.
    async fn take_back(&mut self) {
        for (stream, sub, after) in self.conn.take_returned() {
            if self.subs.get(&stream) != Some(&sub) {
                continue;
            }
            let mut cursor = self.state().service.cursor(&stream);
            match cursor.seek(Start::After(after)).await {
                Ok(()) => {
                    self.positions.insert(stream, cursor.position());
                    self.following.insert(cursor);
                }
                Err(e) => self.report_failed(&stream, after, &e),
            }
        }
    }

    /// A followed subscription failed (the log cannot be read): it ends, and the
    /// client is told where to resume.
    fn subscription_failed(&mut self, e: &crate::cursor::CursorError) {
        let stream = self.following.last_stream().clone();
        let at = self.positions.get(&stream).copied().unwrap_or(0);
        self.following.remove(&stream);
        self.positions.remove(&stream);
        self.report_failed(&stream, at, e);
    }

    fn report_failed(&mut self, stream: &StreamKey, at: u64, e: &dyn std::fmt::Display) {
        tracing::warn!(stream = %stream, error = %e, "subscription ended");
        self.subs.remove(stream);
        self.registration.remove_stream(stream);
        let r = Refusal::new(
            Code::Internal,
            format!("subscription to {stream} ended; subscribe again with last_event_id {at}"),
        );
        self.conn
            .unsubscribe(stream, ws_socket::text(proto::error(None, &r).as_bytes()));
    }

    /// Counts one incoming message against the connection's limit. Refused: the
    /// refusal is sent (or, far past the limit, the connection ends).
    fn admit(&mut self) -> Admitted {
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
        self.send(proto::error(None, &r));
        Admitted::No(Step::Continue)
    }

    /// A ping from the client: tungstenite answers it; it only counts.
    fn ping(&mut self) -> Step {
        match self.admit() {
            Admitted::Yes => Step::Continue,
            Admitted::No(step) => step,
        }
    }

    /// Handles one data frame: a text message, or `None` for a binary one.
    async fn handle(&mut self, text: Option<&str>) -> Step {
        if let Admitted::No(step) = self.admit() {
            return step;
        }
        let Some(text) = text else {
            let r = Refusal::new(
                Code::BadMessage,
                "binary frames are not accepted; send JSON text",
            );
            self.send(proto::error(None, &r));
            return Step::Continue;
        };
        let parsed = proto::parse(text);
        let rid = parsed.request_id.as_ref();
        let reply = match parsed.request {
            Ok(request) => self.answer(request, rid).await,
            Err(r) => Err(r),
        };
        match reply {
            Ok(Some(text)) => self.send(text),
            Ok(None) => {}
            Err(r) => self.send(proto::error(rid, &r)),
        }
        Step::Continue
    }

    /// The reply to one request; `None` when it was sent already (in order with the
    /// stream it is about).
    async fn answer(
        &mut self,
        request: Request,
        rid: Option<&Value>,
    ) -> Result<Option<String>, Refusal> {
        let state = self.fanout.state();
        let service = &state.service;
        let by = &self.peer.principal;
        Ok(Some(match request {
            Request::Ping => proto::pong(rid),
            Request::RequestStock { zone_id } => {
                let zone_id = zone_id
                    .or(self.zone)
                    .ok_or_else(|| Refusal::new(Code::Invalid, "zone_id is required"))?;
                let snapshot = service.snapshot(by, zone_id).await?;
                proto::stock_snapshot(rid, snapshot.into())
            }
            Request::UpdateQuantity { item_id, patch } => {
                self.write_allowed()?;
                let key = rid.and_then(Value::as_str).map(str::to_owned);
                let key = crate::domain::request_id(key.as_deref())?;
                let change = service.update_item(item_id, patch, key, by).await?;
                proto::ack(rid, change)
            }
            Request::Subscribe {
                stream,
                last_event_id,
            } => {
                if !self.subs.contains_key(&stream) && self.subs.len() >= MAX_SUBSCRIPTIONS {
                    return Err(Refusal::new(
                        Code::Invalid,
                        format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                    ));
                }
                let start = last_event_id.map_or(Start::Live, Start::After);
                let cursor = open(state, by, stream.clone(), start).await?;
                // Subscribing again replaces the old subscription.
                let reply = proto::subscription("subscribed", rid, &stream.to_string());
                self.follow(cursor, Some(reply));
                return Ok(None);
            }
            Request::MarkRead { notification_id } => {
                self.write_allowed()?;
                let r = service.mark_read(by, notification_id).await?;
                proto::marked_read(rid, &r.ids, r.unread)
            }
            Request::GetUnreadCount => proto::unread_count(rid, service.unread_count(by).await?),
            Request::Unsubscribe { stream } => {
                if self.subs.remove(&stream).is_none() {
                    return Err(Refusal::new(
                        Code::NotFound,
                        format!("not subscribed to {stream}"),
                    ));
                }
                self.registration.remove_stream(&stream);
                self.following.remove(&stream);
                self.positions.remove(&stream);
                let reply = proto::subscription("unsubscribed", rid, &stream.to_string());
                // After the stream's last event: no fan-out writes it once this returns.
                self.conn
                    .unsubscribe(&stream, ws_socket::text(reply.as_bytes()));
                self.fanout.left(&stream);
                return Ok(None);
            }
        }))
    }

    /// A message that writes counts against the caller's write limit, as over REST.
    fn write_allowed(&self) -> Result<(), Refusal> {
        self.state()
            .limits
            .write(&self.peer.rate.0)
            .map_err(|r| Refusal::rate_limited(r, "writes"))
    }

    /// Follows a cursor (replacing any subscription to its stream), with the reply to
    /// send before its first event.
    fn follow(&mut self, cursor: Cursor, reply: Option<String>) {
        let stream = cursor.stream().clone();
        let sub = self.conn.subscribe(&stream);
        if self.subs.insert(stream.clone(), sub).is_none() {
            self.registration.add_stream(&stream);
        }
        if let Some(r) = reply {
            self.send(r);
        }
        self.positions.insert(stream, cursor.position());
        self.following.insert(cursor);
    }
}
