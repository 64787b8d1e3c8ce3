//! Writing to a socket without waiting: as much of a buffer as the socket takes now.
//! What every fan-out write and every handed-over socket's write is made of.

use tokio::net::TcpStream;

/// How much of a buffer a socket took without waiting.
pub enum Sent {
    All,
    /// Took this many bytes, then would have blocked.
    Part(usize),
    /// The socket failed: its peer is gone.
    Gone,
}

/// Writes as much of `buf` as the socket takes now.
pub fn try_send(tcp: &TcpStream, buf: &[u8]) -> Sent {
    let mut off = 0;
    while off < buf.len() {
        match tcp.try_write(&buf[off..]) {
            Ok(0) => return Sent::Gone,
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Sent::Part(off),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Sent::Gone,
        }
    }
    Sent::All
}
