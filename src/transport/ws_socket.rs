//! The WebSocket socket itself: the upgrade handshake, the writer task, and how a
//! connection ends. No protocol messages here (that is `ws_protocol`), no streams
//! (that is `ws`): the writer takes what it sends from a bounded queue (replies,
//! pings) and from a `Feed` it is given (the connection's subscriptions), and writes
//! a feed's batch straight to the socket, so a delivery wakes one task, not two.
//!
//! tokio-tungstenite is used directly rather than through poem's wrapper: poem turns
//! every read error into a string, and the close code depends on which error it was.
//!
//! How a connection ends, whoever ends it:
//! 1. The writer is asked to send the close frame *ahead of* anything still queued
//!    (a client that does not read has a full queue), and gets `LINGER` for it.
//! 2. The write half of the TCP connection is shut down, and what the client still
//!    sends is read and dropped until it closes too, or `LINGER` passes (a lingering
//!    close, as nginx does): closing a socket with unread input resets the
//!    connection, and the client may lose the close frame.
//! 3. Everything is dropped: the writer task (aborted if it is still stuck), the
//!    socket, the queue. Nothing of the connection outlives this.

use std::future::Future;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use poem::http::{StatusCode, header};
use poem::{Request, Response, Upgraded};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::http::problem::Problem;
use crate::observe::Stats;

pub type Socket = WebSocketStream<Upgraded>;
pub type Incoming = SplitStream<Socket>;
type Sink = SplitSink<Socket, Message>;

/// How long the end of a connection may take for each of its steps.
pub const LINGER: Duration = Duration::from_secs(2);

/// Largest message (and frame) a client may send.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Messages written to the socket in one flush, at most.
const BATCH: usize = 64;

fn config() -> WebSocketConfig {
    // A 4 KiB read buffer and no write buffer instead of tungstenite's 128 KiB keep an
    // idle connection small; messages and frames above 64 KiB are refused (1009).
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

fn header_has(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Answers the upgrade handshake (RFC 6455 §4.2) with 101, and runs `serve` on the
/// socket once hyper hands it over; anything else gets 400 problem+json.
pub fn upgrade<F, Fut>(req: &Request, serve: F) -> Response
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
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
    let Ok(on_upgrade) = req.take_upgrade() else {
        return Problem::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "this connection cannot be upgraded",
        )
        .response();
    };
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let socket = Socket::from_raw_socket(upgraded, Role::Server, Some(config())).await;
            serve(socket).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .finish()
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

/// More to send besides the queue: batches the writer asks for when it is free, so a
/// client that does not read stops the feed from being pulled (and its memory stays
/// one batch).
pub trait Feed: Send + 'static {
    /// Waits for the next batch and appends it to `out`. Cancel-safe: nothing is
    /// taken unless the future completes.
    fn next_batch(&mut self, out: &mut Vec<Message>) -> impl Future<Output = ()> + Send;

    /// The batch just taken was written.
    fn written(&mut self, n: usize);
}

/// The sending side of a connection, owned by its writer task.
pub struct Writer {
    /// Replies and pings (not the close frame), bounded. Boxed: a tokio channel
    /// allocates its slots 32 at a time, whatever its bound, and every connection has
    /// one.
    pub queue: mpsc::Sender<Box<Message>>,
    close: Option<oneshot::Sender<CloseFrame>>,
    task: JoinHandle<Option<Sink>>,
}

impl Writer {
    /// Starts the writer; `incoming` is the reading half, returned by `finish`.
    pub fn spawn<F: Feed>(
        socket: Socket,
        queue_len: usize,
        stats: std::sync::Arc<Stats>,
        feed: F,
    ) -> (Self, Incoming) {
        let (sink, incoming) = socket.split();
        let (queue, rx) = mpsc::channel(queue_len.max(8));
        let (close, close_rx) = oneshot::channel();
        let task = tokio::spawn(write(sink, rx, close_rx, stats, feed));
        (
            Writer {
                queue,
                close: Some(close),
                task,
            },
            incoming,
        )
    }

    /// Ends the connection: the close frame (if the server is the one closing) ahead
    /// of anything queued, then the lingering close; see the module docs.
    pub async fn finish(mut self, incoming: Incoming, frame: Option<CloseFrame>) {
        match (self.close.take(), frame) {
            (Some(tx), Some(f)) => {
                let _ = tx.send(f);
            }
            // Dropped: the writer flushes what tungstenite owes (the reply to a
            // client's close) and stops.
            (tx, _) => drop(tx),
        }
        drop(self.queue);
        let sink = match tokio::time::timeout(LINGER, &mut self.task).await {
            Ok(Ok(Some(sink))) => sink,
            Ok(_) => return,
            Err(_) => {
                // A client that reads nothing: its socket is dropped with the task.
                self.task.abort();
                return;
            }
        };
        let Ok(mut socket) = incoming.reunite(sink) else {
            return;
        };
        let _ = tokio::time::timeout(LINGER, async {
            let _ = socket.get_mut().shutdown().await;
            while let Some(Ok(_)) = socket.next().await {}
        })
        .await;
    }
}

async fn write<F: Feed>(
    mut sink: Sink,
    mut queue: mpsc::Receiver<Box<Message>>,
    mut close: oneshot::Receiver<CloseFrame>,
    stats: std::sync::Arc<Stats>,
    mut feed: F,
) -> Option<Sink> {
    let mut batch: Vec<Message> = Vec::new();
    loop {
        let fed = tokio::select! {
            biased;
            frame = &mut close => return send_close(sink, frame.ok()).await,
            m = queue.recv() => match m {
                Some(m) => {
                    // Everything already queued goes out in one flush.
                    batch.push(*m);
                    while batch.len() < BATCH {
                        match queue.try_recv() {
                            Ok(m) => batch.push(*m),
                            Err(_) => break,
                        }
                    }
                    false
                }
                None => return send_close(sink, close.await.ok()).await,
            },
            () = feed.next_batch(&mut batch) => true,
        };
        let n = batch.len();
        let write = async {
            for m in batch.drain(..) {
                sink.feed(m).await?;
            }
            sink.flush().await
        };
        // The close frame still overtakes a write the client is not reading.
        let sent = tokio::select! {
            biased;
            frame = &mut close => return send_close(sink, frame.ok()).await,
            r = write => r,
        };
        if sent.is_err() {
            stats.send_error();
            return None;
        }
        if fed {
            feed.written(n);
        }
    }
}

async fn send_close(mut sink: Sink, frame: Option<CloseFrame>) -> Option<Sink> {
    let sent = tokio::time::timeout(LINGER, async {
        match frame {
            Some(f) => sink.send(Message::Close(Some(f))).await,
            None => sink.close().await,
        }
    })
    .await;
    matches!(sent, Ok(Ok(()))).then_some(sink)
}
