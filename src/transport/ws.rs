//! WebSocket connections (DESIGN §6): the same cursors as SSE, plus requests.
//!
//! One connection = a reader loop (requests, pings, shutdown) and one writer task that
//! owns the socket's sending half (`ws_socket`) and feeds it the connection's
//! subscriptions (`Feeds`) as well as the replies queued by the reader (a bounded
//! queue). When a client stops reading, the writer blocks: it takes no more from the
//! cursors, which catch up later from the cache or the log (or say `reset`), and the
//! reader's replies wait in the queue, then time out. Memory per connection stays
//! bounded.
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use poem::web::Path;
use poem::{Request as HttpRequest, Response, handler};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::{Instrument, Span};

use super::batch::{Merged, Source, collect};
use super::ws_protocol::{self as proto, Code, Refusal, Request};
use super::ws_socket::{self, Socket, Writer, close_frame};
use super::{Caller, Delivery, OpenError, open, render, stopping};
use crate::cursor::{Cursor, Item, Start};
use crate::domain::{Principal, StreamKey};
use crate::http::access::RateKey;
use crate::limits::check_direct;
use crate::observe::{ConnGuard, Transport};
use crate::state::AppState;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Streams one connection may be subscribed to at once.
pub const MAX_SUBSCRIPTIONS: usize = 32;

/// Messages the feeder queues per batch, at most.
const BATCH: usize = 64;

/// Rate-limited messages in a row after which a flooding client is closed (1008).
const FLOOD: u32 = 200;

/// Who is on the other end, fixed at the handshake.
struct Peer {
    principal: Principal,
    rate: RateKey,
}

impl Peer {
    /// What the connection keeps of the handshake's caller.
    fn of(caller: &Caller<'_>) -> (AppState, Peer) {
        let peer = Peer {
            principal: caller.principal.clone(),
            rate: caller.rate.clone(),
        };
        (caller.state.clone(), peer)
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

/// `GET /ws`
#[handler]
pub fn plain_socket(req: &HttpRequest, caller: Caller<'_>) -> Response {
    if let Err(e) = caller.admit() {
        return e.response();
    }
    let (state, peer) = Peer::of(&caller);
    ws_socket::upgrade(req, move |socket| run(socket, state, peer, None))
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
    let (state, peer) = Peer::of(&c);
    ws_socket::upgrade(req, move |socket| {
        run(socket, state, peer, Some((zone_id, cursor)))
    })
}

/// What the reader tells the writer's feed: subscriptions come and go through it, in order
/// with their replies, so `subscribed` always comes before the stream's first event and
/// `unsubscribed` after its last.
/// Boxed where large: a tokio channel allocates its slots 32 at a time, whatever its
/// bound, and a `Cursor` inline made that 5 KiB per connection.
enum Control {
    Add {
        cursor: Box<Cursor>,
        reply: Option<Utf8Bytes>,
    },
    Remove {
        stream: StreamKey,
        reply: Utf8Bytes,
    },
}

struct Connection {
    state: AppState,
    /// In the registry behind `/api/stats` while the connection lives.
    registration: ConnGuard,
    peer: Peer,
    /// This connection's message limiter, and how many messages in a row it refused.
    messages: Option<governor::DefaultDirectRateLimiter>,
    refused_in_a_row: u32,
    out: mpsc::Sender<Box<Message>>,
    feeds: mpsc::Sender<Control>,
    /// The streams the feeder carries.
    subscribed: HashSet<StreamKey>,
    /// The zone of the `/ws/zones/{id}` path, the default for `request_stock`.
    zone: Option<i32>,
    /// How long a send to the outgoing queue may wait before the client is taken
    /// for gone.
    send_patience: Duration,
}

/// The answer to one request.
enum Reply {
    Send(String),
    /// Already queued, in order, by the feeder (`subscribed`, `unsubscribed`).
    Queued,
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

async fn run(socket: Socket, state: AppState, peer: Peer, zone: Option<(i32, Cursor)>) {
    let id = format!("ws-{}", NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed));
    let span = tracing::info_span!("ws", connection = %id, principal = %peer.principal.name);
    serve(socket, state, peer, zone, id).instrument(span).await
}

async fn serve(
    socket: Socket,
    state: AppState,
    peer: Peer,
    zone: Option<(i32, Cursor)>,
    id: String,
) {
    let stats = state.service.connections().clone();
    let (feeds, control) = mpsc::channel(8);
    let feed = Feeds {
        control: Some(control),
        merged: Merged::default(),
        positions: HashMap::new(),
        delivery: Delivery::new(stats.clone()),
        span: Span::current(),
    };
    let (writer, mut incoming) = Writer::spawn(socket, state.config.ws_queue, stats.clone(), feed);
    let ping_every = state.config.ws_ping;
    let stop = stopping(state.shutdown.clone());
    tokio::pin!(stop);
    let auth = state.auth.clone();
    let principal = peer.principal.clone();
    let ended = async move { auth.ended(&principal).await };
    tokio::pin!(ended);
    let registration = stats.connect(Transport::Ws, peer.principal.user.as_deref());
    let mut conn = Connection {
        registration,
        messages: state.limits.ws_messages(),
        refused_in_a_row: 0,
        peer,
        out: writer.queue.clone(),
        feeds,
        subscribed: HashSet::new(),
        zone: zone.as_ref().map(|z| z.0),
        send_patience: ping_every * 2,
        state,
    };
    tracing::debug!("connected");

    // The path subscription was opened before the upgrade, so the welcome can list it;
    // it is fed only after, so `welcome` is always the first message.
    let subs: Vec<String> = zone.iter().map(|(_, c)| c.stream().to_string()).collect();
    let welcome = proto::welcome(&id, &conn.state.node, &subs, ping_every.as_millis());
    let mut step = if conn.send(welcome).await {
        Step::Continue
    } else {
        Step::End(None)
    };
    if let Some((_, cursor)) = zone {
        Box::pin(conn.feed(cursor, None)).await;
    }

    let mut ping = interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    while let Step::Continue = step {
        step = tokio::select! {
            biased;
            _ = &mut stop => {
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
                    // Boxed: a change's future reaches down into the store, and inline
                    // it would size every connection's task for it while idle.
                    Some(Ok(Message::Text(text))) => Box::pin(conn.handle(Some(text.as_str()))).await,
                    Some(Ok(Message::Binary(_))) => Box::pin(conn.handle(None)).await,
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
                    let _ = conn.out.try_send(Box::new(Message::Ping(Default::default())));
                    Step::Continue
                }
            }
        };
    }
    let Step::End(frame) = step else {
        return;
    };
    // The feeder stops with the connection, then the socket is closed (see
    // `ws_socket`): nothing of the connection outlives this function.
    drop(conn);
    writer.finish(incoming, frame).await;
    tracing::debug!("disconnected");
}

/// The connection's subscriptions, fed to the socket by its writer task: every
/// subscribed stream merged, in batches. The writer asks for a batch only when it has
/// written the last one, so for a client that does not read the cursors stop pulling
/// and catch up later from the cache or the log.
struct Feeds {
    /// `None` once the connection dropped its end.
    control: Option<mpsc::Receiver<Control>>,
    merged: Merged,
    /// Each stream's last position handed out, for the message when it fails.
    positions: HashMap<StreamKey, u64>,
    delivery: Delivery,
    /// The connection's span, entered only to log: instrumenting the writer would
    /// enter it on every wake-up.
    span: Span,
}

impl Feeds {
    /// A subscription added or removed; its reply (if any) is appended to `out`, so
    /// it is written before the stream's first event and after its last.
    fn control(&mut self, cmd: Option<Control>, out: &mut Vec<Message>) {
        let reply = match cmd {
            None => {
                self.control = None;
                None
            }
            Some(Control::Add { cursor, reply }) => {
                self.positions
                    .insert(cursor.stream().clone(), cursor.position());
                self.merged.insert(*cursor);
                reply
            }
            Some(Control::Remove { stream, reply }) => {
                self.merged.remove(&stream);
                self.positions.remove(&stream);
                Some(reply)
            }
        };
        if let Some(r) = reply {
            out.push(Message::Text(r));
        }
    }
}

impl ws_socket::Feed for Feeds {
    async fn next_batch(&mut self, out: &mut Vec<Message>) {
        let Feeds {
            control,
            merged,
            positions,
            delivery,
            ..
        } = self;
        let cmd = async {
            match control {
                Some(c) => c.recv().await,
                None => std::future::pending().await,
            }
        };
        let taken = tokio::select! {
            biased;
            cmd = cmd => Err(cmd),
            taken = collect(merged, BATCH, |stream, item| {
                delivery.delivered(item);
                let at = match item {
                    Item::Event(ev) => ev.seq,
                    Item::Reset(r) => r.last_event_id,
                };
                if let Some(p) = positions.get_mut(stream) {
                    *p = at;
                }
                out.push(Message::Text(render::ws(stream, item)));
                1
            }) => Ok(taken),
        };
        match taken {
            Err(cmd) => self.control(cmd, out),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let stream = self.merged.last_stream().clone();
                self.span.in_scope(
                    || tracing::warn!(stream = %stream, error = %e, "subscription ended"),
                );
                self.merged.remove(&stream);
                let at = self.positions.remove(&stream).unwrap_or(0);
                let r = Refusal::new(
                    Code::Internal,
                    format!(
                        "subscription to {stream} ended; subscribe again with last_event_id {at}"
                    ),
                );
                out.push(Message::Text(proto::error(None, &r).into()));
            }
        }
    }

    fn written(&mut self, n: usize) {
        self.delivery.written();
        self.delivery.stats.sent(Transport::Ws, n as u64);
    }
}

impl Connection {
    /// Queues a message; `false` when the client is gone or has not read for too long.
    async fn send(&self, text: String) -> bool {
        self.out
            .send_timeout(Box::new(Message::Text(text.into())), self.send_patience)
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
        match reply {
            Ok(Reply::Queued) => Step::Continue,
            Ok(Reply::Send(text)) => Self::step(self.send(text).await),
            Err(r) => Self::step(self.send(proto::error(rid, &r)).await),
        }
    }

    async fn answer(&mut self, request: Request, rid: Option<&Value>) -> Result<Reply, Refusal> {
        let service = &self.state.service;
        let by = &self.peer.principal;
        Ok(Reply::Send(match request {
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
                if !self.subscribed.contains(&stream) && self.subscribed.len() >= MAX_SUBSCRIPTIONS
                {
                    return Err(Refusal::new(
                        Code::Invalid,
                        format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                    ));
                }
                let start = last_event_id.map_or(Start::Live, Start::After);
                let cursor = open(&self.state, by, stream.clone(), start).await?;
                // Subscribing again replaces the old feed.
                let reply = proto::subscription("subscribed", rid, &stream.to_string());
                if !self.feed(cursor, Some(reply.into())).await {
                    return Err(Refusal::new(Code::Internal, "connection closing"));
                }
                return Ok(Reply::Queued);
            }
            Request::MarkRead { notification_id } => {
                self.write_allowed()?;
                let r = service.mark_read(by, notification_id).await?;
                proto::marked_read(rid, &r.ids, r.unread)
            }
            Request::GetUnreadCount => proto::unread_count(rid, service.unread_count(by).await?),
            Request::Unsubscribe { stream } => {
                if !self.subscribed.remove(&stream) {
                    return Err(Refusal::new(
                        Code::NotFound,
                        format!("not subscribed to {stream}"),
                    ));
                }
                self.registration.remove_stream(&stream);
                let reply = proto::subscription("unsubscribed", rid, &stream.to_string());
                let sent = self
                    .feeds
                    .send_timeout(
                        Control::Remove {
                            stream,
                            reply: reply.into(),
                        },
                        self.send_patience,
                    )
                    .await;
                if sent.is_err() {
                    return Err(Refusal::new(Code::Internal, "connection closing"));
                }
                return Ok(Reply::Queued);
            }
        }))
    }

    /// A message that writes counts against the caller's write limit, as over REST.
    fn write_allowed(&self) -> Result<(), Refusal> {
        self.state
            .limits
            .write(&self.peer.rate.0)
            .map_err(|r| Refusal::rate_limited(r, "writes"))
    }

    /// Hands a cursor to the feeder (with the reply to queue before its first event);
    /// `false` when the connection is going.
    async fn feed(&mut self, cursor: Cursor, reply: Option<Utf8Bytes>) -> bool {
        let stream = cursor.stream().clone();
        if self.subscribed.insert(stream.clone()) {
            self.registration.add_stream(&stream);
        }
        self.feeds
            .send_timeout(
                Control::Add {
                    cursor: Box::new(cursor),
                    reply,
                },
                self.send_patience,
            )
            .await
            .is_ok()
    }
}
