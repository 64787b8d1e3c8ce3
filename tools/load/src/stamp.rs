//! When bytes reached a subscriber's socket, as the kernel stamped them
//! (`SO_TIMESTAMPNS`), next to when the tool read them.
//!
//! Under a heavy fan-out the tool itself can fall behind (one core reading millions of
//! deliveries a second): its read time then includes its own queue, which is not the
//! server's latency. The kernel stamps a packet when the sender's write queues it to
//! the receiving socket (on loopback, inside the server's `send`), so the stamp of
//! what a read returned is when the server delivered it, whatever the tool was doing.
//! For TCP the kernel reports the stamp of the last packet the read consumed, so an
//! event earlier in the same read is given a time no earlier than its own: the
//! figure can only err towards more latency.
//!
//! A read that comes without a stamp counts at its read time: also on Linux, for the
//! first packets after the first socket on the host turns stamping on (the kernel
//! flips it on from a work queue a moment later). The tool enables stamping as each
//! subscriber connects, long before the first delivery.
//!
//! Linux only; elsewhere (or if the option is refused) every arrival is its read time.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// When one read's bytes arrived: `read` by the tool, `kernel` at the socket (the
/// same as `read` when there is no stamp).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct At {
    pub read: Instant,
    pub kernel: Instant,
}

impl At {
    /// Bytes in hand now, with no stamp.
    pub fn now() -> At {
        let now = Instant::now();
        At {
            read: now,
            kernel: now,
        }
    }

    /// A read at `read` with the kernel's stamp `stamp` (wall-clock nanoseconds), if
    /// any. A stamp after the read (clock steps) is taken as the read.
    fn new(read: Instant, stamp: Option<u128>) -> At {
        let kernel = stamp.map_or(read, |ns| wall_to_instant(ns).min(read));
        At { read, kernel }
    }
}

/// A wall-clock time (nanoseconds since the epoch) on the monotonic clock, through
/// one pair of readings taken once per process.
fn wall_to_instant(ns: u128) -> Instant {
    static ANCHOR: OnceLock<(Instant, u128)> = OnceLock::new();
    let (i, w) = *ANCHOR.get_or_init(|| {
        let w = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        (Instant::now(), w)
    });
    let nanos = |d: u128| Duration::from_nanos(u64::try_from(d).unwrap_or(u64::MAX));
    if ns >= w {
        i + nanos(ns - w)
    } else {
        i.checked_sub(nanos(w - ns)).unwrap_or(i)
    }
}

/// Asks the kernel to stamp what arrives on `tcp`. `false`: it will not (arrivals
/// are then read times).
pub fn enable(tcp: &TcpStream) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: `tcp` is an open socket for the duration of the call, and the option
        // value is a live c_int of the length given.
        let rc = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = tcp;
        false
    }
}

/// One non-blocking read into `buf`, with the stamp of the last packet it consumed.
fn try_recv(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, Option<u128>)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one SCM_TIMESTAMPNS (a timespec), aligned for cmsghdr.
        let mut control = [0u64; 8];
        // SAFETY: an all-zero msghdr is valid (no name, no iov, no control yet).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, all live and of the
        // lengths given, for the duration of the call.
        let n = unsafe { libc::recvmsg(tcp.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut stamp = None;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in, within
        // `msg.msg_controllen`; a SCM_TIMESTAMPNS payload is a timespec, read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    if ts.tv_sec > 0 {
                        stamp = Some(ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, stamp))
    }
    #[cfg(not(target_os = "linux"))]
    {
        tcp.try_read(buf).map(|n| (n, None))
    }
}

/// Reads once (waiting until there is something) into `buf`: how many bytes, and when
/// they arrived. (`sse::Body` reads into a shared buffer through `try_read`.)
#[cfg(test)]
pub async fn recv(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, At)> {
    loop {
        tcp.readable().await?;
        if let Some(got) = try_read(tcp, buf)? {
            return Ok(got);
        }
    }
}

/// One read into `buf` without waiting, once `readable` said so: how many bytes and
/// when they arrived, or `None` if the socket had nothing after all.
///
/// A read that leaves room in `buf` has taken all the socket held, so the socket's
/// readiness is cleared with it: otherwise the next call would spend a `recvmsg` on
/// finding it empty, one wasted system call per wake (at a 10,000-subscriber fan-out,
/// half the tool's `recvmsg` calls). Bytes that land after the read raise a new
/// edge-triggered event, and tokio clears only the readiness the read saw (its tick),
/// never a newer one.
pub fn try_read(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<Option<(usize, At)>> {
    let mut drained = None;
    let got = match tcp.try_io(Interest::READABLE, || {
        let (n, stamp) = try_recv(tcp, buf)?;
        if n > 0 && n < buf.len() {
            drained = Some((n, stamp));
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok((n, stamp))
    }) {
        Ok(got) => got,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => match drained {
            Some(got) => got,
            None => return Ok(None),
        },
        Err(e) => return Err(e),
    };
    let (n, stamp) = got;
    if n > 0 {
        if DELAYED_ACKS.load(Ordering::Relaxed) {
            delay_acks_on(tcp);
        }
        READS.fetch_add(1, Ordering::Relaxed);
        UNSTAMPED.fetch_add(u64::from(stamp.is_none()), Ordering::Relaxed);
    }
    Ok(Some((n, At::new(Instant::now(), stamp))))
}

/// How the tool's subscribers acknowledge what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Acks {
    /// As a Linux client that only reads: an ACK as soon as a read drains a small
    /// segment, so about one per delivery.
    Prompt,
    /// As clients that delay their ACKs (Windows and macOS do by default): one for
    /// every other segment, or when the delayed-ACK timer runs out.
    Delayed,
}

static DELAYED_ACKS: AtomicBool = AtomicBool::new(false);

/// How this process's subscribers acknowledge, from now on.
pub fn set_acks(acks: Acks) {
    DELAYED_ACKS.store(acks == Acks::Delayed, Ordering::Relaxed);
}

/// Puts `tcp` in Linux's delayed-ACK ("pingpong") mode: its next read no longer
/// sends an ACK for a single small segment. The kernel leaves the mode whenever its
/// delayed-ACK timer runs out, so this is done again after each read (one
/// `setsockopt`, cheaper than the ACK it saves: on loopback an ACK runs the
/// server's TCP input on the tool's core).
fn delay_acks_on(tcp: &TcpStream) {
    // A refusal leaves ACKs prompt, which is only slower.
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(tcp).set_tcp_quickack(false);
    #[cfg(not(target_os = "linux"))]
    let _ = tcp;
}

static READS: AtomicU64 = AtomicU64::new(0);
static UNSTAMPED: AtomicU64 = AtomicU64::new(0);

/// Reads that returned bytes so far, and how many of them came without a stamp (and so
/// count at their read time), in this process.
pub fn reads() -> (u64, u64) {
    (
        READS.load(Ordering::Relaxed),
        UNSTAMPED.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Bytes written while the reader is busy elsewhere are stamped when they
    /// arrived, not when they were read.
    #[tokio::test]
    async fn a_late_read_reports_when_the_bytes_arrived() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reader = TcpStream::connect(addr).await.expect("connect");
        let (mut writer, _) = listener.accept().await.expect("accept");
        assert!(enable(&reader), "SO_TIMESTAMPNS refused");
        // When no socket on the host had stamping on, the kernel turns it on from a
        // work queue, a moment after `enable`; packets queued before that come
        // unstamped. That flip cannot be awaited, so probe until one comes stamped.
        let mut stamped = false;
        for _ in 0..500 {
            writer.write_all(b"p").await.expect("probe write");
            let mut probe = [0u8; 1];
            let (_, stamp) = tokio::time::timeout(
                Duration::from_secs(5),
                reader.async_io(Interest::READABLE, || try_recv(&reader, &mut probe)),
            )
            .await
            .expect("probe in time")
            .expect("probe recv");
            if stamp.is_some() {
                stamped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(stamped, "the kernel never stamped a probe");
        let written = Instant::now();
        writer.write_all(b"hello").await.expect("write");
        std::thread::sleep(Duration::from_millis(50)); // the reader is "busy"
        let mut buf = [0u8; 16];
        let (n, at) = tokio::time::timeout(Duration::from_secs(5), recv(&reader, &mut buf))
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(&buf[..n], b"hello");
        assert!(at.read.duration_since(written) >= Duration::from_millis(50));
        let lag = at.kernel.saturating_duration_since(written);
        assert!(
            lag < Duration::from_millis(25),
            "stamped {lag:?} after the write"
        );
        assert!(at.kernel <= at.read);
    }

    /// A connected pair on loopback: the reader's end and the writer's.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let reader = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (writer, _) = listener.accept().await.expect("accept");
        (reader, writer)
    }

    /// A read that drains the socket leaves it waiting for the next bytes, which still
    /// wake it; a read that fills the buffer leaves the rest to be read at once.
    #[tokio::test]
    async fn reads_drain_and_wake_again() {
        let (reader, mut writer) = connected().await;
        let mut buf = [0u8; 4];
        let read = async |buf: &mut [u8]| {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), recv(&reader, buf))
                .await
                .expect("in time")
                .expect("recv");
            buf[..n].to_vec()
        };
        // Six bytes, a four-byte buffer: full, then the rest, with nothing written
        // in between.
        writer.write_all(b"abcdef").await.expect("write");
        assert_eq!(read(&mut buf).await, b"abcd");
        assert_eq!(read(&mut buf).await, b"ef");
        // Drained: the next bytes, written after, are read when they come.
        for round in 0..20u8 {
            writer.write_all(&[round]).await.expect("write");
            assert_eq!(read(&mut buf).await, [round]);
        }
    }

    /// Whether `tcp` would ACK a read at once (Linux reports the mode through
    /// `TCP_QUICKACK`).
    #[cfg(target_os = "linux")]
    fn acks_promptly(tcp: &TcpStream) -> bool {
        socket2::SockRef::from(tcp)
            .tcp_quickack()
            .expect("getsockopt TCP_QUICKACK")
    }

    /// A subscriber told to delay its ACKs is in the kernel's delayed-ACK mode after
    /// each read; without it, a socket that only reads ACKs promptly. (The only test
    /// that sets the process-wide mode; the others do not look at ACKs.)
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn delayed_acks_hold_read_after_read() {
        let (reader, mut writer) = connected().await;
        let mut buf = [0u8; 16];
        let mut read_one = async |byte: u8| {
            writer.write_all(&[byte]).await.expect("write");
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), recv(&reader, &mut buf))
                .await
                .expect("in time")
                .expect("recv");
            assert_eq!(n, 1);
        };
        read_one(0).await;
        assert!(acks_promptly(&reader));
        set_acks(Acks::Delayed);
        for round in 1..6u8 {
            read_one(round).await;
            assert!(!acks_promptly(&reader), "round {round}");
        }
        set_acks(Acks::Prompt);
    }

    /// A read from a socket that does not ask for stamps is counted as unstamped.
    #[tokio::test]
    async fn an_unstamped_read_is_counted() {
        let (reader, mut writer) = connected().await;
        let (reads_before, unstamped_before) = reads();
        writer.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 4];
        let (n, at) = tokio::time::timeout(Duration::from_secs(5), recv(&reader, &mut buf))
            .await
            .expect("in time")
            .expect("recv");
        assert_eq!(n, 1);
        assert_eq!(at.kernel, at.read);
        let (reads_after, unstamped_after) = reads();
        assert!(reads_after > reads_before);
        assert!(unstamped_after > unstamped_before);
    }
}
