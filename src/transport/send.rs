//! Writing to a socket without waiting: as much of a buffer as the socket takes now.
//! What every fan-out write and every handed-over socket's write is made of.

use std::io;
use std::os::fd::AsRawFd;

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
    send_with(buf, |b| tcp.try_write(b))
}

/// Writes as much of `buf` as the socket takes now, by its descriptor, past tokio.
///
/// tokio's `try_write` first reads the socket's readiness, which lives in a block of
/// its own: in a pass over ten thousand sockets that is a cache miss per socket (5 %
/// of the server's core at 10,000 subscribers, `perf`), for a check the kernel makes
/// anyway. Writing past tokio leaves its readiness as it was, possibly stale after a
/// write that would have blocked; so what is left must then be written through tokio
/// (`try_send`, `writable`), whose first write learns it again. The fan-out hands such
/// a socket back to its own task, which does.
pub fn try_send_past_tokio(tcp: &TcpStream, buf: &[u8]) -> Sent {
    let fd = tcp.as_raw_fd();
    send_with(buf, |b| {
        // SAFETY: `b` is a live slice of `b.len()` bytes, and `fd` is `tcp`'s, open
        // while `tcp` is borrowed.
        let n = unsafe {
            libc::send(
                fd,
                b.as_ptr().cast(),
                b.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    })
}

fn send_with(buf: &[u8], mut write: impl FnMut(&[u8]) -> io::Result<usize>) -> Sent {
    let mut off = 0;
    while off < buf.len() {
        match write(&buf[off..]) {
            Ok(0) => return Sent::Gone,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::Part(off),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Sent::Gone,
        }
    }
    Sent::All
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A socket filled past tokio, then written through it: tokio's first write finds
    /// it full and waits for room rather than spinning on a stale readiness, and the
    /// bytes arrive whole once the reader reads.
    #[tokio::test]
    async fn a_socket_filled_past_tokio_is_then_written_through_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(TcpStream::connect(addr));
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut reader = client.await.expect("join").expect("connect");
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        let rest = loop {
            match try_send_past_tokio(&tcp, &chunk) {
                Sent::All => sent += chunk.len(),
                Sent::Part(n) => break chunk.len() - n,
                Sent::Gone => panic!("the socket failed"),
            }
            assert!(sent < 256 << 20, "the socket never filled");
        };
        sent += chunk.len() - rest;
        // Written through tokio until `rest` more bytes went out; the reader starts
        // only after the writer has waited once.
        let writer = tokio::spawn(async move {
            let tail = vec![b'y'; rest];
            let (mut off, mut wakes) = (0, 0);
            while off < tail.len() {
                tokio::time::timeout(Duration::from_secs(10), tcp.writable())
                    .await
                    .expect("room within 10 s")
                    .expect("writable");
                wakes += 1;
                match try_send(&tcp, &tail[off..]) {
                    Sent::All => off = tail.len(),
                    Sent::Part(n) => off += n,
                    Sent::Gone => panic!("the socket failed"),
                }
            }
            wakes
        });
        // The writer must be waiting, not spinning: it yields to this task.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "it waits for the reader");
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 20];
        while got < sent + rest {
            let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf))
                .await
                .expect("bytes within 10 s")
                .expect("read");
            assert!(n > 0, "the writer closed early");
            got += n;
        }
        assert_eq!(got, sent + rest);
        let wakes = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends")
            .expect("join");
        // One stale wake at most, then one per time the reader made room.
        assert!(wakes < 1000, "{wakes} wakes: it spun");
    }
}
