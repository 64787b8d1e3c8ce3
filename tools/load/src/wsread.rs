//! A WebSocket subscriber read off the socket by hand: the upgrade written by hand,
//! then server frames decoded as they come, pings answered. Like `sse`, it exists
//! so that the tool is not the bottleneck it measures: a general client (tungstenite)
//! costs the tool more per message than a server's fan-out costs the server.
//!
//! A subscriber only reads: text messages are handed over whole (continuations
//! joined), pings get their pong, a close ends the stream. Server frames are unmasked;
//! a masked one is unmasked anyway.

use std::net::SocketAddr;

use anyhow::{bail, ensure};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::stamp::At;

/// Largest message accepted (zonecast's and Nchan's are far smaller).
const MAX_MESSAGE: usize = 1 << 20;

/// A server's frame (unmasked): FIN, opcode, payload.
pub fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(if fin { 0x80 | opcode } else { opcode });
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// One frame's head: FIN, opcode, and where its payload lies in the input.
struct Head {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Bytes of head before the payload.
    len_head: usize,
    len: usize,
}

/// Parses a frame head at the start of `b`; `None` until all of it is there.
fn head(b: &[u8]) -> anyhow::Result<Option<Head>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
        127 if b.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    ensure!(len <= MAX_MESSAGE as u64, "a frame of {len} bytes");
    let mask = if masked {
        if b.len() < at + 4 {
            return Ok(None);
        }
        let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Head {
        fin,
        opcode,
        mask,
        len_head: at,
        len: len as usize,
    }))
}

/// What a frame asks of the reader.
#[derive(Debug, PartialEq)]
pub enum Control {
    /// A ping: send this pong (a masked client frame).
    Pong(Vec<u8>),
    Close,
}

/// Decodes server frames across reads.
#[derive(Default)]
pub struct Frames {
    /// A frame cut by a read's end.
    partial: Vec<u8>,
    /// A text message whose continuation frames are still to come.
    message: Vec<u8>,
    /// `message` is under way.
    continuing: bool,
}

impl Frames {
    /// Decodes `input`, handing each whole text message to `text`; returns what the
    /// control frames among them ask for.
    pub fn feed(
        &mut self,
        input: &[u8],
        text: &mut impl FnMut(&[u8]),
    ) -> anyhow::Result<Vec<Control>> {
        let mut controls = Vec::new();
        let owned;
        let mut rest: &[u8] = if self.partial.is_empty() {
            input
        } else {
            self.partial.extend_from_slice(input);
            owned = std::mem::take(&mut self.partial);
            &owned
        };
        while let Some(h) = head(rest)? {
            let end = h.len_head + h.len;
            if rest.len() < end {
                break;
            }
            let unmasked;
            let mut payload = &rest[h.len_head..end];
            if let Some(m) = h.mask {
                unmasked = payload
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ m[i % 4])
                    .collect::<Vec<u8>>();
                payload = &unmasked;
            }
            match h.opcode {
                0x1 | 0x2 if h.fin && !self.continuing => text(payload),
                0x1 | 0x2 => {
                    self.message.clear();
                    self.message.extend_from_slice(payload);
                    self.continuing = true;
                }
                0x0 if self.continuing => {
                    ensure!(
                        self.message.len() + payload.len() <= MAX_MESSAGE,
                        "a message over {MAX_MESSAGE} bytes"
                    );
                    self.message.extend_from_slice(payload);
                    if h.fin {
                        text(&self.message);
                        self.message.clear();
                        self.continuing = false;
                    }
                }
                0x0 => bail!("a continuation frame with no message under way"),
                0x8 => controls.push(Control::Close),
                0x9 => {
                    ensure!(h.len <= 125, "a ping of {} bytes", h.len);
                    // FIN + pong; masked, with a zero key (the payload as is).
                    let mut pong = vec![0x8a, 0x80 | h.len as u8, 0, 0, 0, 0];
                    pong.extend_from_slice(payload);
                    controls.push(Control::Pong(pong));
                }
                0xa => {}
                op => bail!("opcode {op:#x}"),
            }
            rest = &rest[end..];
        }
        self.partial.extend_from_slice(rest);
        Ok(controls)
    }
}

/// An open WebSocket subscription.
pub struct Stream {
    body: crate::sse::Body,
    frames: Frames,
}

impl Stream {
    /// Upgrades `GET path` on `tcp` to a WebSocket; fails unless the answer is 101.
    pub async fn open(mut tcp: TcpStream, addr: SocketAddr, path: &str) -> anyhow::Result<Stream> {
        crate::stamp::enable(&tcp);
        let headers = [
            ("Upgrade", "websocket".to_owned()),
            ("Connection", "Upgrade".to_owned()),
            // RFC 6455's sample nonce: the tool does not check the accept hash.
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
            ("Sec-WebSocket-Version", "13".to_owned()),
        ];
        let (head, early) = crate::sse::request(&mut tcp, addr, path, &headers).await?;
        let status = head.split(' ').nth(1).unwrap_or("");
        if status != "101" {
            bail!("HTTP {status} (not an upgrade)");
        }
        Ok(Stream {
            body: crate::sse::Body::new(tcp, early),
            frames: Frames::default(),
        })
    }

    /// Reads once and hands each whole text message to `text`, with when its last
    /// bytes arrived; `false` once the connection has closed.
    pub async fn read(&mut self, text: &mut impl FnMut(&[u8], At)) -> anyhow::Result<bool> {
        let frames = &mut self.frames;
        let fed = self
            .body
            .read(|bytes, at| frames.feed(bytes, &mut |m| text(m, at)))
            .await?;
        let Some(controls) = fed else {
            return Ok(false);
        };
        let controls = controls?;
        for c in controls {
            match c {
                Control::Pong(p) => self.body.tcp.write_all(&p).await?,
                Control::Close => return Ok(false),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        server_frame(fin, opcode, payload)
    }

    #[test]
    fn messages_are_decoded_however_the_reads_cut_them() {
        let long = vec![b'x'; 300];
        let mut whole = frame(true, 1, br#"{"type":"welcome"}"#);
        whole.extend(frame(true, 9, b"hi"));
        whole.extend(frame(false, 1, b"{\"id\":"));
        whole.extend(frame(true, 0, b"7}"));
        whole.extend(frame(true, 1, &long));
        whole.extend(frame(true, 8, b""));
        for cut in 0..whole.len() {
            let mut f = Frames::default();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut controls = Vec::new();
            for part in [&whole[..cut], &whole[cut..]] {
                controls.extend(
                    f.feed(part, &mut |m| got.push(m.to_vec()))
                        .expect("valid frames"),
                );
            }
            assert_eq!(
                got,
                vec![
                    br#"{"type":"welcome"}"#.to_vec(),
                    b"{\"id\":7}".to_vec(),
                    long.clone()
                ],
                "cut at {cut}"
            );
            assert_eq!(
                controls,
                vec![
                    Control::Pong(vec![0x8a, 0x82, 0, 0, 0, 0, b'h', b'i']),
                    Control::Close
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_masked_frame_is_unmasked_and_bad_frames_are_errors() {
        let key = [1u8, 2, 3, 4];
        let mut f = vec![0x81, 0x80 | 3];
        f.extend_from_slice(&key);
        f.extend(b"abc".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        let mut got = Vec::new();
        Frames::default()
            .feed(&f, &mut |m| got.push(m.to_vec()))
            .expect("valid");
        assert_eq!(got, vec![b"abc".to_vec()]);
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert!(Frames::default().feed(&huge, &mut |_| {}).is_err());
        assert!(Frames::default().feed(&[0x80, 0], &mut |_| {}).is_err());
        assert!(Frames::default().feed(&[0x83, 0], &mut |_| {}).is_err());
    }
}
