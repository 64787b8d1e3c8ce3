//! `floor`: the least a server can spend per delivery on this machine. A publish is
//! written to each subscriber's socket with one `send`, by the thread that read the
//! publish, and nothing else happens per delivery: no event loop, no timers, no
//! buffering, no per-subscriber state beyond the socket.
//!
//! It speaks the part of Nchan's protocol the tool uses (`GET /sub/{channel}` for SSE
//! and WebSocket, `POST /pub/{channel}`, answered once every subscriber was written),
//! so `fanout --server nchan` drives it exactly as it drives Nchan, and its CPU per
//! delivery (`--server-pid`) is what one write per delivery costs here whatever the
//! server: on loopback mostly the kernel's TCP path, the subscriber's receive
//! included. Set beside zonecast's and Nchan's in one sitting, it says how much of
//! theirs is their own.
//!
//! Not a server to use: a subscriber that cannot take a message whole at once is
//! dropped, there are no heartbeats, and a publish holds its channel while it writes.
//! What a client can make it hold is bounded (connections, request heads and bodies,
//! a quiet client's thread by a read timeout).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub struct Args {
    /// Where to listen: a loopback address.
    #[arg(long, default_value = "127.0.0.1:8092")]
    pub bind: SocketAddr,
    /// Connections held at once, at most (subscribers and publishers).
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,
}

/// Largest request head and publish body read.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

/// How long a connection may keep its thread waiting for a request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Stack of each connection's thread: it parses a head and writes, nothing deeper.
const STACK: usize = 128 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wire {
    Sse,
    Ws,
}

struct Subscriber {
    wire: Wire,
    tcp: TcpStream,
    /// Its place under the cap, given back when a publish finds it gone.
    _slot: Slot,
}

#[derive(Default)]
struct Floor {
    channels: Mutex<HashMap<String, Vec<Subscriber>>>,
    connections: AtomicUsize,
    max_connections: usize,
}

/// A connection's place under the cap, given back when its thread ends or, for a
/// subscriber, when it is dropped.
struct Slot(Arc<Floor>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.bind.ip().is_loopback() {
        bail!("--bind {}: only loopback addresses", args.bind);
    }
    let listener = TcpListener::bind(args.bind).with_context(|| format!("bind {}", args.bind))?;
    eprintln!("floor: listening on http://{}", listener.local_addr()?);
    serve(listener, args.max_connections)
}

/// Accepts connections until the listener fails.
fn serve(listener: TcpListener, max_connections: usize) -> anyhow::Result<()> {
    let floor = Arc::new(Floor {
        max_connections,
        ..Floor::default()
    });
    loop {
        let (tcp, _) = match listener.accept() {
            Ok(c) => c,
            // Out of descriptors for a moment, a connection reset before it was taken.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if floor.connections.fetch_add(1, Ordering::AcqRel) >= floor.max_connections {
            floor.connections.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let slot = Slot(floor.clone());
        let spawned = std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || {
                // A client that misbehaves only loses its own connection.
                let _ = connection(tcp, slot);
            });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// One request head: its method, path, and the headers the floor reads.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    content_length: usize,
    websocket_key: Option<String>,
}

/// Reads a request head off `tcp` (`buf` holds what came after the last one), and
/// leaves in `buf` what came after it.
fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Option<Head>> {
    loop {
        if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") {
            let head = parse_head(&buf[..end])?;
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            bail!("request head over {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk)?;
        if n == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => bail!("connection closed in a request head"),
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_head(raw: &[u8]) -> anyhow::Result<Head> {
    use crate::sse::header;
    let text = std::str::from_utf8(raw).context("request head is not UTF-8")?;
    let mut first = text.lines().next().unwrap_or_default().split(' ');
    Ok(Head {
        method: first.next().unwrap_or_default().to_owned(),
        path: first.next().unwrap_or_default().to_owned(),
        content_length: match header(text, "content-length") {
            Some(v) => v.parse().context("Content-Length")?,
            None => 0,
        },
        websocket_key: header(text, "sec-websocket-key").map(str::to_owned),
    })
}

fn connection(mut tcp: TcpStream, slot: Slot) -> anyhow::Result<()> {
    tcp.set_read_timeout(Some(READ_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut tcp, &mut buf)? {
        if let Some(channel) = head.path.strip_prefix("/sub/")
            && head.method == "GET"
        {
            let wire = match &head.websocket_key {
                Some(key) => {
                    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                        key.as_bytes(),
                    );
                    tcp.write_all(
                        format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                        )
                        .as_bytes(),
                    )?;
                    Wire::Ws
                }
                None => {
                    tcp.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                          Cache-Control: no-cache\r\nConnection: close\r\n\r\n",
                    )?;
                    Wire::Sse
                }
            };
            tcp.set_nonblocking(true)?;
            let floor = slot.0.clone();
            let mut channels = floor.channels.lock().unwrap_or_else(|p| p.into_inner());
            channels
                .entry(channel.to_owned())
                .or_default()
                .push(Subscriber {
                    wire,
                    tcp,
                    _slot: slot,
                });
            return Ok(());
        }
        let Some(channel) = head
            .path
            .strip_prefix("/pub/")
            .filter(|_| head.method == "POST")
        else {
            tcp.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        };
        if head.content_length > MAX_BODY {
            tcp.write_all(
                b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        while buf.len() < head.content_length {
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed in a request body");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..head.content_length).collect();
        publish(&slot.0, channel, &body);
        tcp.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")?;
    }
    Ok(())
}

/// `body` in one wire form: an SSE event, or an unmasked WebSocket text frame.
fn frame(wire: Wire, body: &[u8]) -> Vec<u8> {
    match wire {
        Wire::Sse => [b"data: ", body, b"\n\n"].concat(),
        Wire::Ws => crate::wsread::server_frame(true, 1, body),
    }
}

/// Writes `body` to each subscriber of `channel`: one `send` each. One that cannot
/// take it whole at once (or has gone) is dropped, and its place under the cap given
/// back.
fn publish(floor: &Floor, channel: &str, body: &[u8]) {
    let (sse, ws) = (frame(Wire::Sse, body), frame(Wire::Ws, body));
    let mut channels = floor.channels.lock().unwrap_or_else(|p| p.into_inner());
    let Some(subs) = channels.get_mut(channel) else {
        return;
    };
    subs.retain(|s| {
        let bytes = match s.wire {
            Wire::Sse => &sse,
            Wire::Ws => &ws,
        };
        matches!((&s.tcp).write(bytes), Ok(n) if n == bytes.len())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn start(max_connections: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || serve(listener, max_connections));
        addr
    }

    /// A connection whose reads fail after 5 s rather than hang.
    fn connect(addr: SocketAddr) -> TcpStream {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        tcp
    }

    fn request(addr: SocketAddr, req: &str) -> TcpStream {
        let mut tcp = connect(addr);
        tcp.write_all(req.as_bytes()).expect("write");
        tcp
    }

    /// Reads until `want` has arrived (or fails after the read timeout).
    fn read_until(tcp: &mut TcpStream, want: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        while memchr::memmem::find(&got, want).is_none() {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).expect("read");
            assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(want));
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    fn publish_to(publisher: &mut TcpStream, channel: &str, body: &str) {
        publisher
            .write_all(
                format!(
                    "POST /pub/{channel} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .expect("publish");
        read_until(publisher, b"201 Created\r\nContent-Length: 0\r\n\r\n");
    }

    /// An SSE subscriber and a WebSocket one (a real client) each get every publish on
    /// their channel, and nothing of another channel; a publisher's connection is kept
    /// alive across publishes.
    #[tokio::test]
    async fn publishes_reach_sse_and_websocket_subscribers() {
        let addr = start(100);
        let mut sse = request(addr, "GET /sub/a HTTP/1.1\r\nHost: x\r\n\r\n");
        read_until(&mut sse, b"text/event-stream");
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(format!("ws://{addr}/sub/a")),
        )
        .await
        .expect("in time")
        .expect("handshake");
        let mut other = request(addr, "GET /sub/b HTTP/1.1\r\nHost: x\r\n\r\n");
        read_until(&mut other, b"\r\n\r\n");

        let mut publisher = connect(addr);
        publish_to(&mut publisher, "a", r#"{"seq":1}"#);
        publish_to(&mut publisher, "a", r#"{"seq":2}"#);

        let got = read_until(&mut sse, b"data: {\"seq\":2}\n\n");
        assert!(
            memchr::memmem::find(&got, b"data: {\"seq\":1}\n\ndata: {\"seq\":2}\n\n").is_some(),
            "{}",
            String::from_utf8_lossy(&got)
        );
        for want in [r#"{"seq":1}"#, r#"{"seq":2}"#] {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("in time")
                .expect("a message")
                .expect("a frame");
            assert_eq!(msg.to_text().expect("text"), want);
        }
        // The other channel's subscriber got nothing: its next bytes are the next
        // publish on its own channel.
        publish_to(&mut publisher, "b", r#"{"seq":9}"#);
        let got = read_until(&mut other, b"\n\n");
        assert!(got.ends_with(b"data: {\"seq\":9}\n\n"));
        assert!(memchr::memmem::find(&got, b"seq\":1").is_none());
    }

    /// A subscriber that has gone is dropped by the next publish, and its place under
    /// the connection cap is given back; beyond the cap, connections are closed.
    #[test]
    fn gone_subscribers_give_their_place_back() {
        let addr = start(2);
        let mut first = request(addr, "GET /sub/c HTTP/1.1\r\nHost: x\r\n\r\n");
        read_until(&mut first, b"\r\n\r\n");
        let mut publisher = connect(addr);
        // Two held: a third is closed at once.
        let mut third = request(addr, "GET /sub/c HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut b = [0u8; 16];
        // Closed with its request unread: an end of stream or a reset.
        let closed = third.read(&mut b);
        assert!(
            matches!(&closed, Ok(0))
                || matches!(&closed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{closed:?}"
        );
        drop(first);
        // The publish that finds it gone (a reset may take one more write to show).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            publish_to(&mut publisher, "c", "x");
            let mut again = request(addr, "GET /sub/c HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut head = [0u8; 64];
            if matches!(again.read(&mut head), Ok(n) if n > 0) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gone subscriber's place was not given back"
            );
        }
    }

    #[test]
    fn heads_are_read_whole_and_bounded() {
        let head =
            parse_head(b"POST /pub/x HTTP/1.1\r\ncontent-length: 12\r\nSec-WebSocket-Key: aB+c/==")
                .expect("parsed");
        assert_eq!(
            (
                head.method.as_str(),
                head.path.as_str(),
                head.content_length
            ),
            ("POST", "/pub/x", 12)
        );
        // Names in any case; the key's value as sent (base64 is case-sensitive).
        assert_eq!(head.websocket_key.as_deref(), Some("aB+c/=="));
        let bare = parse_head(b"GET /sub/x HTTP/1.1\r\nHost: x").expect("parsed");
        assert_eq!((bare.content_length, bare.websocket_key), (0, None));
        assert!(parse_head(b"POST /pub/x HTTP/1.1\r\nContent-Length: lots").is_err());
        assert_eq!(frame(Wire::Ws, b"hi"), b"\x81\x02hi");
        assert_eq!(frame(Wire::Ws, &[b'x'; 200])[..4], [0x81, 126, 0, 200]);
    }
}
