//! Plain HTTP/1 connections whose first request a transport may take over.
//!
//! An event stream over HTTP/1.1 is one response that never ends. Served by hyper it
//! keeps a task, hyper's read and write buffers and the chunked encoder per connection,
//! and every delivery crosses them. A transport that writes the same bytes to many
//! sockets itself (the SSE fan-out) needs the socket instead, right after the response
//! head. hyper cannot hand a connection over in the middle of a response (only on
//! `101 Switching Protocols`), so the server reads the *first* request head of a plain
//! connection itself:
//!
//! - a request the `Eligible` rule picks (a body-less `GET` of an event-stream path, or
//!   a WebSocket upgrade) is answered here: the endpoint is called as hyper would call
//!   it (marked `Answered`), and a `200` or `101` that carries a `Takeover` hands the
//!   socket, with its head still to write, to the transport; a `200`'s body is
//!   delimited by the connection's close (RFC 9112 §6.3). Any other response to it is
//!   written here in full, and the connection is closed;
//! - every other request, and everything after it on the connection, goes to hyper,
//!   with the bytes already read put back in front of the socket (`Prefixed`).
//!
//! Bytes a client pipelines behind a taken-over request are never read as requests: an
//! event stream is the last response on its connection, and after a `101` the
//! connection speaks WebSocket.
//!
//! Must not know which paths are streams (the rule comes from above) nor what a taken
//! connection carries.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use poem::http::{HeaderName, HeaderValue, Method, StatusCode, Version, header, request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::accept::Slot;

/// Which first requests of a plain HTTP/1 connection are answered outside hyper, so
/// that their response may take the socket over: `(method, path)`.
pub type Eligible = fn(&Method, &str) -> bool;

/// Headers in one request head, at most; a longer head goes to hyper (which answers
/// `431`).
const MAX_HEADERS: usize = 64;

/// A request extension: this request is answered outside hyper, so a response may
/// take the socket over (a WebSocket upgrade has no hyper upgrade to wait for).
#[derive(Clone, Copy, Debug)]
pub struct Answered;

/// A response extension: "give me the socket once the head is ready". Taken once;
/// ignored (and dropped) when the response is served by hyper instead (TLS, HTTP/2, a
/// request later on a keep-alive connection), where the body serves the client.
#[derive(Clone)]
pub struct Takeover(Arc<Mutex<Option<TakeoverFn>>>);

type TakeoverFn = Box<dyn FnOnce(RawConnection) + Send>;

impl Takeover {
    pub fn new(f: impl FnOnce(RawConnection) + Send + 'static) -> Self {
        Takeover(Arc::new(Mutex::new(Some(Box::new(f)))))
    }

    fn take(&self) -> Option<TakeoverFn> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A connection handed over after its request: the new owner writes `head` first, then
/// the body, and ends the body by closing the socket. The slot is the connection's
/// place under the server's caps: keep it as long as the socket.
pub struct RawConnection {
    pub tcp: TcpStream,
    pub peer: SocketAddr,
    pub head: Bytes,
    pub slot: Slot,
}

/// What the first bytes of a connection were.
pub(super) enum Head {
    /// A complete request head that may be answered here.
    Eligible(Box<request::Parts>),
    /// Anything else (another request, HTTP/2, a malformed or oversized head): hyper's.
    Other,
    /// The client closed before sending a whole head.
    Closed,
}

/// Reads until the first request head is complete (or cannot be one), into `buf`.
/// Deadlines are the socket's own.
pub(super) async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    eligible: Eligible,
    max: usize,
) -> std::io::Result<Head> {
    loop {
        if io.read_buf(buf).await? == 0 {
            return Ok(Head::Closed);
        }
        match parse(buf, eligible) {
            Parsed::Complete(head) => return Ok(head),
            Parsed::Partial if buf.len() < max => {}
            Parsed::Partial => return Ok(Head::Other),
        }
    }
}

enum Parsed {
    Complete(Head),
    Partial,
}

fn parse(buf: &[u8], eligible: Eligible) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Complete(Head::Other),
    }
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Complete(Head::Other);
    };
    if method != "GET" || !eligible(&Method::GET, path.split('?').next().unwrap_or(path)) {
        return Parsed::Complete(Head::Other);
    }
    let mut builder = poem::http::Request::builder()
        .method(Method::GET)
        .uri(path)
        .version(if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Complete(Head::Other);
        };
        // A body, or a switch to anything but WebSocket, is hyper's to handle.
        let plain = match name {
            header::CONTENT_LENGTH => value.as_bytes() == b"0",
            header::UPGRADE => value.as_bytes().eq_ignore_ascii_case(b"websocket"),
            header::TRANSFER_ENCODING | header::EXPECT => false,
            _ => true,
        };
        if !plain {
            return Parsed::Complete(Head::Other);
        }
        builder = builder.header(name, value);
    }
    match builder.body(()) {
        Ok(r) => Parsed::Complete(Head::Eligible(Box::new(r.into_parts().0))),
        Err(_) => Parsed::Complete(Head::Other),
    }
}

/// If `resp` asks for the socket (a `200` or a `101` with a `Takeover`), its hand-over
/// and the head to write first.
pub(super) fn taken(resp: &poem::Response) -> Option<(TakeoverFn, Bytes)> {
    let body = match resp.status() {
        StatusCode::OK => Body::UntilClose,
        StatusCode::SWITCHING_PROTOCOLS => Body::Switched,
        _ => return None,
    };
    let f = resp.extensions().get::<Takeover>()?.take()?;
    Some((f, head(resp, body)))
}

/// How the body after a head is framed.
#[derive(Clone, Copy, PartialEq)]
enum Body {
    Chunked,
    /// It ends with the connection.
    UntilClose,
    /// None: the connection speaks another protocol (the response's own `Connection`
    /// and `Upgrade` say which).
    Switched,
}

/// The response head: the status line, the response's own headers but those that
/// frame a body, and `connection: close` (unless the protocol switches).
fn head(resp: &poem::Response, body: Body) -> Bytes {
    let status = resp.status();
    let mut b = BytesMut::with_capacity(256);
    b.put_slice(b"HTTP/1.1 ");
    b.put_slice(status.as_str().as_bytes());
    b.put_u8(b' ');
    b.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    b.put_slice(b"\r\n");
    for (name, value) in resp.headers() {
        let framing = match *name {
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING => true,
            header::CONNECTION => body != Body::Switched,
            _ => false,
        };
        if framing {
            continue;
        }
        b.put_slice(name.as_str().as_bytes());
        b.put_slice(b": ");
        b.put_slice(value.as_bytes());
        b.put_slice(b"\r\n");
    }
    match body {
        Body::Chunked => b.put_slice(b"transfer-encoding: chunked\r\nconnection: close\r\n"),
        Body::UntilClose => b.put_slice(b"connection: close\r\n"),
        Body::Switched => {}
    }
    b.put_slice(b"\r\n");
    b.freeze()
}

/// Writes a whole response that does not take the socket (an error, mostly), its
/// body chunked, for a connection that closes after it.
pub(super) async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    resp: poem::Response,
) -> std::io::Result<()> {
    io.write_all(&head(&resp, Body::Chunked)).await?;
    let mut body = resp.into_body().into_bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if chunk.is_empty() {
            continue;
        }
        let mut framed = BytesMut::with_capacity(chunk.len() + 12);
        framed.put_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        framed.put_slice(&chunk);
        framed.put_slice(b"\r\n");
        io.write_all(&framed).await?;
    }
    io.write_all(b"0\r\n\r\n").await?;
    io.flush().await
}

/// A socket with bytes already read from it put back in front.
pub(super) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams(_: &Method, path: &str) -> bool {
        path.starts_with("/sse/")
    }

    fn parsed(raw: &str) -> Option<Head> {
        match parse(raw.as_bytes(), streams) {
            Parsed::Complete(h) => Some(h),
            Parsed::Partial => None,
        }
    }

    #[test]
    fn a_plain_get_of_a_stream_path_is_eligible_with_its_headers() {
        let raw = "GET /sse/alerts?last_event_id=4 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n";
        let Some(Head::Eligible(parts)) = parsed(raw) else {
            panic!("eligible")
        };
        assert_eq!(parts.uri.path(), "/sse/alerts");
        assert_eq!(parts.uri.query(), Some("last_event_id=4"));
        assert_eq!(parts.headers["last-event-id"], "7");
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn other_paths_methods_bodies_and_upgrades_go_to_hyper() {
        for raw in [
            "GET /api/zones HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST /sse/alerts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            "GET /sse/alerts HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET /sse/alerts HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /sse/alerts HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /sse/alerts HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert!(matches!(parsed(raw), Some(Head::Other)), "{raw:?}");
        }
    }

    #[test]
    fn a_head_cut_short_waits_for_more() {
        assert!(parsed("GET /sse/alerts HTTP/1.1\r\nHost: x\r\n").is_none());
    }

    #[tokio::test]
    async fn prefixed_bytes_are_read_before_the_socket() {
        let inner: &[u8] = b" world";
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        io.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }

    #[test]
    fn a_taken_over_head_is_close_delimited_and_keeps_the_responses_headers() {
        let resp = poem::Response::builder()
            .content_type("text/event-stream")
            .header("X-Request-Id", "r1")
            .header("Content-Length", "3")
            .finish();
        let h = head(&resp, Body::UntilClose);
        let text = std::str::from_utf8(&h).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("content-type: text/event-stream\r\n"),
            "{text}"
        );
        assert!(text.contains("x-request-id: r1\r\n"), "{text}");
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
    }
}
