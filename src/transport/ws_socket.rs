//! The WebSocket socket itself: the upgrade, the outgoing side every writer shares,
//! and how a connection ends. No protocol messages here (that is `ws_protocol`), no
//! streams (that is `ws`).
//!
//! Two writers may send on one connection: its own task (replies, pings, the streams
//! it follows itself) and the fan-out task of a stream it has caught up with
//! (`fanout`). Both go through the connection's `Out`, under one lock, whole frames at
//! a time, so frames never interleave:
//! - with the socket handed over by the server (`direct`), a writer that finds nothing
//!   queued writes straight to it without waiting, and queues only what the socket did
//!   not take; the connection's task flushes the queue when the socket has room;
//! - otherwise (hyper's upgrade, TLS) writers queue and the task writes.
//!
//! Bytes queued are bounded (`limit`): past it the task stops reading requests and
//! pulling its streams, a fan-out hands the stream back, and a client that still reads
//! nothing is closed (`ws`).
//!
//! Reading is tungstenite's (poem's wrapper turns every read error into a string, and
//! the close code depends on which error it was). What tungstenite writes by itself
//! (the answer to a ping or a close) goes through `Out` too.
//!
//! How a connection ends, whoever ends it:
//! 1. The close frame goes ahead of anything still queued (a client that does not
//!    read has a full queue), and the flush gets `LINGER`.
//! 2. The write half is shut down, and what the client still sends is read and dropped
//!    until it closes too, or `LINGER` passes (a lingering close, as nginx does):
//!    closing a socket with unread input resets the connection, and the client may
//!    lose the close frame.
//! 3. The socket is shut down for good, and the fan-out groups it was in are told.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use poem::http::{StatusCode, header};
use poem::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::domain::StreamKey;
use crate::http::problem::Problem;
use crate::server::{RawConnection, Slot, Takeover};

/// How long the end of a connection may take for each of its steps.
pub const LINGER: Duration = Duration::from_secs(2);

/// Largest message (and frame) a client may send.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What tungstenite reads from.
pub type Socket = WebSocketStream<ReadIo>;

fn config() -> WebSocketConfig {
    // A 256-byte read buffer (it grows for a larger message) and no write buffer instead
    // of tungstenite's 128 KiB keep an idle connection small; messages and frames
    // above 64 KiB are refused (1009).
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// A server frame (unmasked, final) with `opcode` around `payload`.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    b.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => b.put_u8(n as u8),
        n if n <= 0xffff => {
            b.put_u8(126);
            b.put_u16(n as u16);
        }
        n => {
            b.put_u8(127);
            b.put_u64(n as u64);
        }
    }
    b.put_slice(payload);
    b.freeze()
}

pub fn text(payload: &[u8]) -> Bytes {
    frame(0x1, payload)
}

pub fn ping() -> Bytes {
    frame(0x9, &[])
}

fn close(f: &CloseFrame) -> Bytes {
    let mut payload = Vec::with_capacity(2 + f.reason.len());
    payload.extend_from_slice(&u16::from(f.code).to_be_bytes());
    payload.extend_from_slice(f.reason.as_bytes());
    frame(0x8, &payload)
}

/// Why the server ends a connection, as its close frame.
pub fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    // A close reason is at most 123 bytes; cut at a char boundary below that.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_owned().into(),
    }
}

/// The socket the server handed over, with its place under the server's caps.
struct Direct {
    tcp: TcpStream,
    _slot: Slot,
}

/// The outgoing side of one connection, shared by its task and the fan-out groups it
/// is a member of.
pub struct WsConn {
    direct: Option<Direct>,
    out: Mutex<Out>,
    /// Wakes the connection's task: something to flush, or a stream handed back.
    pub wake: Notify,
    closed: AtomicBool,
    /// Bytes queued at most before the client counts as not reading.
    limit: usize,
}

#[derive(Default)]
struct Out {
    /// Frames to write, in order; the first may be partly written.
    queue: VecDeque<Bytes>,
    queued: usize,
    /// The first of `queue` is partly written: it must be finished before anything
    /// else.
    started: bool,
    /// Each subscribed stream and its subscription's number: a fan-out writes a stream
    /// only while its number is the one it joined with.
    subs: HashMap<StreamKey, u64>,
    /// Subscriptions ended so far (unsubscribed or replaced). While it is what a
    /// fan-out saw when it last found its subscription in `subs`, that subscription is
    /// still there: a delivery needs no look in the map, two cache misses per
    /// WebSocket delivery in a pass over thousands (`deliver`).
    ended: u64,
    /// Streams a fan-out handed back: `(stream, number, seq written last)`.
    returned: Vec<(StreamKey, u64, u64)>,
}

static NEXT_SUBSCRIPTION: AtomicU64 = AtomicU64::new(1);

/// What became of a fan-out's batch.
pub enum Delivered {
    /// Written, or queued behind what was.
    Yes,
    /// Too much is queued already: the stream goes back to the connection's task.
    Busy,
    /// The connection or the subscription is gone.
    Gone,
}

impl WsConn {
    fn new(direct: Option<Direct>, limit: usize) -> Arc<Self> {
        Arc::new(WsConn {
            direct,
            out: Mutex::default(),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            limit,
        })
    }

    fn out(&self) -> MutexGuard<'_, Out> {
        // Every critical section leaves the queue whole, so a poisoned lock is usable.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Writes (or queues) `bytes`, whole frames, after everything before them.
    fn put(&self, out: &mut Out, bytes: Bytes) {
        if out.queue.is_empty()
            && let Some(d) = &self.direct
        {
            // Past tokio (`try_send_past_tokio`): what would block is queued, and the
            // task flushes it through tokio, which learns the socket's readiness again.
            match super::send::try_send_past_tokio(&d.tcp, &bytes) {
                super::send::Sent::All => return,
                super::send::Sent::Part(n) => {
                    out.started = n > 0;
                    let rest = bytes.slice(n..);
                    out.queued += rest.len();
                    out.queue.push_back(rest);
                }
                // The task finds out when it reads or flushes.
                super::send::Sent::Gone => return,
            }
            self.wake.notify_one();
            return;
        }
        out.queued += bytes.len();
        out.queue.push_back(bytes);
        self.wake.notify_one();
    }

    /// Sends frames of the connection's own (replies, pings).
    pub fn send(&self, bytes: Bytes) {
        let mut out = self.out();
        self.put(&mut out, bytes);
    }

    /// More is queued than a reading client would leave.
    pub fn over_limit(&self) -> bool {
        self.out().queued > self.limit
    }

    pub fn pending(&self) -> bool {
        !self.out().queue.is_empty()
    }

    /// A new subscription to `stream` (replacing any): its number.
    pub fn subscribe(&self, stream: &StreamKey) -> u64 {
        let n = NEXT_SUBSCRIPTION.fetch_add(1, Ordering::Relaxed);
        let mut out = self.out();
        if out.subs.insert(stream.clone(), n).is_some() {
            out.ended += 1;
        }
        n
    }

    /// Ends the subscription to `stream` and sends `reply` after its last event: no
    /// fan-out writes the stream once this returns.
    pub fn unsubscribe(&self, stream: &StreamKey, reply: Bytes) {
        let mut out = self.out();
        if out.subs.remove(stream).is_some() {
            out.ended += 1;
        }
        out.returned.retain(|(s, _, _)| s != stream);
        self.put(&mut out, reply);
    }

    /// Whether subscription `n` to `stream` is current.
    pub fn is_current(&self, stream: &StreamKey, n: u64) -> bool {
        self.out().subs.get(stream) == Some(&n)
    }

    /// A fan-out's batch for `stream` (subscription `n`). `seen` is the fan-out's own
    /// for this subscription alone (`u64::MAX` at first): the count of ended
    /// subscriptions when it last found `n` current.
    pub fn deliver(
        &self,
        stream: &StreamKey,
        n: u64,
        seen: &Cell<u64>,
        bytes: &Bytes,
    ) -> Delivered {
        let mut out = self.out();
        if self.is_closed() {
            return Delivered::Gone;
        }
        if seen.get() != out.ended {
            if out.subs.get(stream) != Some(&n) {
                return Delivered::Gone;
            }
            seen.set(out.ended);
        }
        if out.queued + bytes.len() > self.limit {
            return Delivered::Busy;
        }
        self.put(&mut out, bytes.clone());
        Delivered::Yes
    }

    /// A fan-out hands `stream` back: the task follows it on its own from `after`.
    pub fn hand_back(&self, stream: &StreamKey, n: u64, after: u64) {
        let mut out = self.out();
        if out.subs.get(stream) == Some(&n) {
            out.returned.push((stream.clone(), n, after));
        }
        drop(out);
        self.wake.notify_one();
    }

    pub fn has_returned(&self) -> bool {
        !self.out().returned.is_empty()
    }

    pub fn take_returned(&self) -> Vec<(StreamKey, u64, u64)> {
        std::mem::take(&mut self.out().returned)
    }

    /// The streams this connection is subscribed to.
    pub fn streams(&self) -> Vec<StreamKey> {
        self.out().subs.keys().cloned().collect()
    }

    /// Puts the close frame ahead of everything queued but a frame already started.
    fn queue_close(&self, f: &CloseFrame) {
        let mut out = self.out();
        let keep = usize::from(out.started);
        out.queue.truncate(keep);
        out.queued = out.queue.iter().map(Bytes::len).sum();
        let bytes = close(f);
        out.queued += bytes.len();
        out.queue.push_back(bytes);
    }

    /// Writes what the socket takes now; `true` when nothing is left.
    fn try_flush(&self, tcp: &TcpStream) -> std::io::Result<bool> {
        let mut out = self.out();
        while let Some(front) = out.queue.front_mut() {
            match super::send::try_send(tcp, front) {
                super::send::Sent::All => {
                    let n = front.len();
                    out.queue.pop_front();
                    out.queued -= n;
                    out.started = false;
                }
                super::send::Sent::Part(n) => {
                    front.advance(n);
                    out.queued -= n;
                    out.started |= n > 0;
                    return Ok(false);
                }
                super::send::Sent::Gone => {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
            }
        }
        Ok(true)
    }
}

/// The writing half of a connection the task writes itself (hyper's upgrade, TLS).
pub type Writer = Option<WriteHalf<BoxIo>>;

/// Writes some of what is queued (all of it, on a handed-over socket); waits for the
/// socket as it must. Cancel-safe: bytes leave the queue only once written.
pub async fn flush(conn: &WsConn, writer: &mut Writer) -> std::io::Result<()> {
    if let Some(d) = &conn.direct {
        while !conn.try_flush(&d.tcp)? {
            d.tcp.writable().await?;
        }
        return Ok(());
    }
    let Some(w) = writer else {
        return Err(std::io::ErrorKind::NotConnected.into());
    };
    let Some(front) = conn.out().queue.front().cloned() else {
        return Ok(());
    };
    let n = w.write(&front).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    let mut out = conn.out();
    let done = out.queue.front_mut().map(|f| {
        f.advance(n);
        f.is_empty()
    });
    out.started = done == Some(false);
    if done == Some(true) {
        out.queue.pop_front();
    }
    out.queued -= n;
    Ok(())
}

/// What hyper's upgrade gives, boxed.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// The reading side tungstenite is given; what tungstenite writes by itself (pongs,
/// the answer to a close) is queued on the connection.
pub struct ReadIo {
    conn: Arc<WsConn>,
    half: Option<ReadHalf<BoxIo>>,
}

impl AsyncRead for ReadIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(h) = this.half.as_mut() {
            return Pin::new(h).poll_read(cx, buf);
        }
        let Some(d) = &this.conn.direct else {
            return Poll::Ready(Ok(()));
        };
        loop {
            std::task::ready!(d.tcp.poll_read_ready(cx))?;
            match d.tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ReadIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.conn.send(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A connection ready to serve: tungstenite's reading side, the shared outgoing side,
/// and the writing half where the task writes itself.
pub struct Opened {
    pub socket: Socket,
    pub conn: Arc<WsConn>,
    pub writer: Writer,
}

fn header_has(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Answers the upgrade handshake (RFC 6455 §4.2) with 101, and runs `serve` once the
/// socket is there: handed over by the server (a plain connection's first request),
/// or by hyper's upgrade. Anything else gets 400 problem+json. `limit` bounds the
/// bytes queued.
pub fn upgrade<F, Fut>(req: &Request, limit: usize, serve: F) -> Response
where
    F: FnOnce(Opened) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let key = req.header("Sec-WebSocket-Key").map(str::to_owned);
    let valid = req.method() == poem::http::Method::GET
        && header_has(req, header::UPGRADE, "websocket")
        && header_has(req, header::CONNECTION, "upgrade")
        && req.header("Sec-WebSocket-Version") == Some("13");
    let (Some(key), true) = (key, valid) else {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not a WebSocket handshake: GET with Upgrade: websocket, Connection: Upgrade, \
             Sec-WebSocket-Version: 13 and Sec-WebSocket-Key",
        )
        .response();
    };
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .finish();
    // Boxed: the closure is called once the socket is there, and its captures would
    // otherwise stay in the task beside the connection made from them.
    let serve = Box::new(serve);
    match req.take_upgrade() {
        Ok(on_upgrade) => {
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let (read, write) = tokio::io::split(Box::new(upgraded) as BoxIo);
                    let conn = WsConn::new(None, limit);
                    let io = ReadIo {
                        conn: conn.clone(),
                        half: Some(read),
                    };
                    let socket =
                        WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
                    serve(Opened {
                        socket,
                        conn,
                        writer: Some(write),
                    })
                    .await;
                }
            });
        }
        // Answered outside hyper: the server hands the socket over after the head.
        Err(_) if req.extensions().get::<crate::server::Answered>().is_some() => {
            resp.extensions_mut()
                .insert(Takeover::new(move |raw: RawConnection| {
                    let direct = Direct {
                        tcp: raw.tcp,
                        _slot: raw.slot,
                    };
                    let conn = WsConn::new(Some(direct), limit);
                    conn.send(raw.head);
                    tokio::spawn(async move {
                        let io = ReadIo {
                            conn: conn.clone(),
                            half: None,
                        };
                        let socket =
                            WebSocketStream::from_raw_socket(io, Role::Server, Some(config()))
                                .await;
                        serve(Opened {
                            socket,
                            conn,
                            writer: None,
                        })
                        .await;
                    });
                }));
        }
        Err(_) => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "this connection cannot be upgraded",
            )
            .response();
        }
    }
    resp
}

/// Ends the connection: the close frame (if the server is the one closing) ahead of
/// anything queued, then the lingering close; see the module docs. `socket` is read
/// and dropped meanwhile.
pub async fn finish(opened: Opened, frame: Option<CloseFrame>) {
    use futures_util::StreamExt;
    let Opened {
        mut socket,
        conn,
        mut writer,
    } = opened;
    if let Some(f) = &frame {
        conn.queue_close(f);
    }
    let flushed = tokio::time::timeout(LINGER, async {
        while conn.pending() {
            flush(&conn, &mut writer).await?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if matches!(flushed, Ok(Ok(()))) {
        let _ = tokio::time::timeout(LINGER, async {
            match (&conn.direct, writer.as_mut()) {
                (Some(d), _) => {
                    let _ = socket2::SockRef::from(&d.tcp).shutdown(std::net::Shutdown::Write);
                }
                (None, Some(w)) => {
                    let _ = w.shutdown().await;
                }
                (None, None) => {}
            }
            while let Some(Ok(_)) = socket.next().await {}
        })
        .await;
    }
    conn.closed.store(true, Ordering::Release);
    if let Some(d) = &conn.direct {
        let _ = socket2::SockRef::from(&d.tcp).shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(conn: &WsConn) -> Vec<Bytes> {
        conn.out().queue.iter().cloned().collect()
    }

    /// A fan-out writes a stream only under the subscription it joined with, only
    /// while the queue has room, and never after the stream's `unsubscribed`.
    #[test]
    fn deliveries_follow_the_subscription_and_the_queues_bound() {
        let conn = WsConn::new(None, 10);
        let z = StreamKey::Zone(1);
        let sub = conn.subscribe(&z);
        // Each subscription's own `seen`, as a fan-out member keeps it.
        let (seen, seen_other, seen_again) = (
            Cell::new(u64::MAX),
            Cell::new(u64::MAX),
            Cell::new(u64::MAX),
        );
        let batch = Bytes::from_static(b"12345678");
        assert!(matches!(
            conn.deliver(&z, sub, &seen, &batch),
            Delivered::Yes
        ));
        // 8 queued: another 8 would pass the bound of 10.
        assert!(matches!(
            conn.deliver(&z, sub, &seen, &batch),
            Delivered::Busy
        ));
        assert!(matches!(
            conn.deliver(&z, sub + 1, &seen_other, &batch),
            Delivered::Gone
        ));
        let again = conn.subscribe(&z);
        assert!(
            matches!(conn.deliver(&z, sub, &seen, &batch), Delivered::Gone),
            "replaced, though it was current when last seen"
        );
        // A subscription to another stream that ends does not end this one.
        let other = StreamKey::Zone(9);
        conn.subscribe(&other);
        conn.unsubscribe(&other, Bytes::from_static(b"L"));
        assert!(matches!(
            conn.deliver(&z, again, &seen_again, &Bytes::from_static(b"1")),
            Delivered::Yes
        ));
        conn.unsubscribe(&z, Bytes::from_static(b"bye"));
        assert!(matches!(
            conn.deliver(&z, again, &seen_again, &Bytes::new()),
            Delivered::Gone
        ));
        assert_eq!(
            queued(&conn),
            vec![
                batch,
                Bytes::from_static(b"L"),
                Bytes::from_static(b"1"),
                Bytes::from_static(b"bye")
            ]
        );
        assert!(conn.streams().is_empty());
    }

    /// A hand-back for a subscription that has since gone is dropped.
    #[test]
    fn a_hand_back_counts_only_for_the_current_subscription() {
        let conn = WsConn::new(None, 1024);
        let z = StreamKey::Zone(2);
        let old = conn.subscribe(&z);
        let new = conn.subscribe(&z);
        conn.hand_back(&z, old, 5);
        conn.hand_back(&z, new, 7);
        assert_eq!(conn.take_returned(), vec![(z, new, 7)]);
    }

    /// The close frame goes ahead of whole frames still queued, but never into the
    /// middle of one already started.
    #[test]
    fn the_close_frame_overtakes_the_queue_but_not_a_started_frame() {
        let conn = WsConn::new(None, 1024);
        conn.send(text(b"first"));
        conn.send(text(b"second"));
        conn.queue_close(&close_frame(CloseCode::Away, "bye"));
        let close_bytes = close(&close_frame(CloseCode::Away, "bye"));
        assert_eq!(queued(&conn), vec![close_bytes.clone()]);
        let conn = WsConn::new(None, 1024);
        conn.send(text(b"first"));
        conn.send(text(b"second"));
        {
            let mut out = conn.out();
            out.started = true;
        }
        conn.queue_close(&close_frame(CloseCode::Away, "bye"));
        assert_eq!(queued(&conn), vec![text(b"first"), close_bytes]);
    }

    #[test]
    fn server_frames_carry_their_length_in_the_shortest_form() {
        assert_eq!(&text(b"hi")[..], b"\x81\x02hi");
        let mid = text(&[b'a'; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 0x01, 0x2c]);
        let big = text(&vec![b'b'; 70_000]);
        assert_eq!(&big[..2], &[0x81, 127]);
        assert_eq!(
            u64::from_be_bytes(big[2..10].try_into().expect("8")),
            70_000
        );
        let c = close(&close_frame(CloseCode::Away, "bye"));
        assert_eq!(&c[..], b"\x88\x05\x03\xe9bye");
    }
}
