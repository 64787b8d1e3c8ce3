//! An event stream read off the socket by hand: the request written by hand, the
//! response head parsed, then the body as it comes, whatever its framing (zonecast
//! closes its own connections' bodies with the connection; Nchan and hyper send them
//! chunked). One read per wake-up and no body channel: the tool must not be the
//! bottleneck it measures.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stamp::At;

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// How a response's body ends.
pub enum Framing {
    /// With the connection.
    Close,
    /// `Content-Length` bytes.
    Length(u64),
    Chunked(Chunked),
}

/// Where a chunked body's decoder stands.
#[derive(Debug, PartialEq)]
pub enum Chunked {
    /// Reading a chunk's size (hex digits so far); `ext` once past them (an extension
    /// or white space until the line ends).
    Size { size: u64, ext: bool },
    /// The size line's `\n`.
    SizeLf { size: u64 },
    /// Bytes of the chunk still to come.
    Data(u64),
    /// The `\r\n` after a chunk's data: how many bytes of it are left.
    DataEnd(u8),
    /// The last chunk was read (trailers are not read).
    Done,
}

impl Chunked {
    fn start() -> Self {
        Chunked::Size {
            size: 0,
            ext: false,
        }
    }

    /// Decodes `input`, handing each run of body bytes to `body`.
    fn feed(&mut self, mut input: &[u8], body: &mut impl FnMut(&[u8])) -> anyhow::Result<()> {
        while !input.is_empty() {
            match self {
                Chunked::Size { size, ext } => {
                    let b = input[0];
                    input = &input[1..];
                    match (b, *ext) {
                        (b'\r', _) => *self = Chunked::SizeLf { size: *size },
                        (_, true) => {}
                        (b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F', false) => {
                            let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                            *size = size
                                .checked_mul(16)
                                .and_then(|s| s.checked_add(d))
                                .context("chunk size overflows")?;
                        }
                        (b';' | b' ' | b'\t', false) => *ext = true,
                        _ => bail!("bad chunk size byte {b:#x}"),
                    }
                }
                Chunked::SizeLf { size } => {
                    if input[0] != b'\n' {
                        bail!("chunk size line without \\n");
                    }
                    input = &input[1..];
                    *self = if *size == 0 {
                        Chunked::Done
                    } else {
                        Chunked::Data(*size)
                    };
                }
                Chunked::Data(left) => {
                    let n = (*left).min(input.len() as u64) as usize;
                    body(&input[..n]);
                    input = &input[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Chunked::DataEnd(2);
                    }
                }
                Chunked::DataEnd(left) => {
                    input = &input[1..];
                    *left -= 1;
                    if *left == 0 {
                        *self = Chunked::start();
                    }
                }
                Chunked::Done => return Ok(()),
            }
        }
        Ok(())
    }
}

/// Sends `GET path` with `headers` on `tcp` and reads the response head: the head
/// (lower-cased) and the bytes read after it.
pub async fn request(
    tcp: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    exchange(tcp, req.as_bytes()).await
}

/// Writes the request `req` on `tcp` and reads the response head: the head
/// (lower-cased) and the bytes read after it.
pub async fn exchange(tcp: &mut TcpStream, req: &[u8]) -> anyhow::Result<(String, Vec<u8>)> {
    tcp.write_all(req).await?;
    let mut got = Vec::with_capacity(1024);
    let end = loop {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the response head");
        }
        got.extend_from_slice(&chunk[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if got.len() > MAX_HEAD {
            bail!("response head over {MAX_HEAD} bytes");
        }
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    Ok((head, got[end..].to_vec()))
}

/// The status code of a (lower-cased) response head.
pub fn status(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// A header's value in an HTTP head (request or response; `name` in lower case, matched
/// whatever the head's case; the value as it is).
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

impl Framing {
    /// How the body of the response with (lower-cased) head `head` ends.
    pub fn of(head: &str) -> anyhow::Result<Framing> {
        Ok(
            if header(head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
                Framing::Chunked(Chunked::start())
            } else if let Some(n) = header(head, "content-length") {
                Framing::Length(n.parse().context("content-length")?)
            } else {
                Framing::Close
            },
        )
    }

    /// Hands the body bytes in `input` to `body`; `false` once the body has ended.
    pub fn feed(&mut self, input: &[u8], body: &mut impl FnMut(&[u8])) -> anyhow::Result<bool> {
        match self {
            Framing::Close => body(input),
            Framing::Length(left) => {
                let k = (*left).min(input.len() as u64) as usize;
                body(&input[..k]);
                *left -= k as u64;
                return Ok(*left > 0);
            }
            Framing::Chunked(c) => {
                c.feed(input, body)?;
                return Ok(*c != Chunked::Done);
            }
        }
        Ok(true)
    }
}

/// An open event stream.
pub struct Stream {
    body: Body,
    framing: Framing,
}

thread_local! {
    /// The buffer every socket read on this thread goes into. What a read returns is
    /// handed on before its task next waits, so no connection needs one of its own:
    /// ten thousand subscribers each with a 64 KiB buffer had the kernel copy every
    /// read into memory the tool's core had not touched for a whole pass.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
}

/// A response's socket once its head has been read: the bytes that came with the
/// head first, then one stamped read at a time. SSE and WebSocket subscriptions
/// both read through it.
pub struct Body {
    pub tcp: TcpStream,
    /// The bytes read with the head, handed on first (as read at `early_at`).
    early: Vec<u8>,
    early_at: At,
}

impl Body {
    pub fn new(tcp: TcpStream, early: Vec<u8>) -> Body {
        Body {
            tcp,
            early,
            early_at: At::now(),
        }
    }

    /// Reads once and hands the bytes, with when they arrived, to `f`; `None` once the
    /// peer has closed.
    pub async fn read<R>(&mut self, f: impl FnOnce(&[u8], At) -> R) -> std::io::Result<Option<R>> {
        if !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            return Ok(Some(f(&early, self.early_at)));
        }
        loop {
            self.tcp.readable().await?;
            // No wait between the read and `f`: nothing else on this thread runs in
            // between to overwrite the buffer.
            let read = SCRATCH.with_borrow_mut(|buf| crate::stamp::try_read(&self.tcp, buf))?;
            if let Some((n, at)) = read {
                return Ok((n > 0).then(|| SCRATCH.with_borrow(|buf| f(&buf[..n], at))));
            }
        }
    }
}

impl Stream {
    /// Sends `GET path` with `headers` on `tcp` and reads the response head; fails
    /// unless it is a 2xx.
    pub async fn open(
        mut tcp: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Stream> {
        crate::stamp::enable(&tcp);
        let mut all = vec![("Accept", "text/event-stream".to_owned())];
        all.extend(headers.iter().map(|(k, v)| (*k, v.clone())));
        let (head, early) = request(&mut tcp, addr, path, &all).await?;
        let status = status(&head);
        if !status.starts_with('2') {
            bail!("HTTP {status}");
        }
        let framing = Framing::of(&head)?;
        Ok(Stream {
            body: Body::new(tcp, early),
            framing,
        })
    }

    /// Reads once and hands the body bytes to `body`, with when they arrived; `false`
    /// once the body has ended.
    pub async fn read(&mut self, body: &mut impl FnMut(&[u8], At)) -> anyhow::Result<bool> {
        let framing = &mut self.framing;
        let fed = self
            .body
            .read(|input, at| framing.feed(input, &mut |b| body(b, at)))
            .await?;
        fed.unwrap_or(Ok(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dechunk(parts: &[&[u8]]) -> (Vec<u8>, Chunked) {
        let mut c = Chunked::start();
        let mut out = Vec::new();
        for p in parts {
            c.feed(p, &mut |b| out.extend_from_slice(b)).expect("valid");
        }
        (out, c)
    }

    #[test]
    fn a_chunked_body_is_decoded_however_it_is_cut() {
        let whole: &[u8] = b"5\r\nhello\r\nB;x=1\r\n world, sse\r\n0\r\n\r\n";
        for cut in 0..whole.len() {
            let (a, b) = whole.split_at(cut);
            let (out, state) = dechunk(&[a, b]);
            assert_eq!(out, b"hello world, sse", "cut at {cut}");
            assert_eq!(state, Chunked::Done, "cut at {cut}");
        }
    }

    #[test]
    fn a_bad_chunk_size_is_an_error() {
        let mut c = Chunked::start();
        assert!(c.feed(b"zz\r\n", &mut |_| {}).is_err());
    }
}
