//! Admission: the accept loop, the connection slots (in total and per address), the
//! shedding of connections past a cap, and back-off on accept errors.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Connections being answered `503` at once; beyond these a refused connection is
/// closed without an answer (each holds a file descriptor while it is answered).
const SHEDDERS: usize = 64;

/// Longest pause after an accept error that says the process is out of resources.
/// Short enough that the server answers within a second once resources are back.
const MAX_BACKOFF: Duration = Duration::from_millis(400);

/// Why a connection was refused, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    MaxConnections,
    MaxPerIp,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxPerIp => "max_connections_per_ip",
        }
    }
}

/// Open connections per client address; an entry lives only while it is non-zero, so
/// the map is bounded by the open connections.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The connection slots of one server.
#[derive(Clone)]
pub struct Slots {
    total: Arc<Semaphore>,
    max: usize,
    max_per_ip: usize,
    per_ip: PerIp,
    shedders: Arc<Semaphore>,
}

/// One admitted connection's place; dropping it (with the socket) frees the place.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    per_ip: Option<(PerIp, IpAddr)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((map, ip)) = &self.per_ip {
            let mut map = lock(map);
            if let Some(n) = map.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
        metrics::gauge!("zonecast_tcp_connections").decrement(1.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the map consistent, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// IPv4 clients on a dual-stack socket arrive as `::ffff:a.b.c.d`; count them as the
/// IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Slots {
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        Slots {
            total: Arc::new(Semaphore::new(max)),
            max,
            max_per_ip,
            per_ip: Arc::default(),
            shedders: Arc::new(Semaphore::new(SHEDDERS)),
        }
    }

    pub fn try_admit(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::MaxConnections)?;
        let per_ip = if self.max_per_ip > 0 {
            let ip = canonical(ip);
            let mut map = lock(&self.per_ip);
            let n = map.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return Err(Refused::MaxPerIp);
            }
            *n += 1;
            Some((self.per_ip.clone(), ip))
        } else {
            None
        };
        metrics::gauge!("zonecast_tcp_connections").increment(1.0);
        Ok(Slot {
            _permit: permit,
            per_ip,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.max - self.total.available_permits()
    }

    /// Completes once every slot has been given back.
    pub async fn all_closed(&self) {
        let n = u32::try_from(self.max).unwrap_or(u32::MAX);
        // Holding every permit proves no connection is open; they go back at once.
        let _ = self.total.acquire_many(n).await;
    }
}

/// A log line at most once per interval, with the count of what it stands for.
struct Quiet {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Quiet {
    fn new(every: Duration) -> Self {
        Quiet {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)`: log now, standing for `n` occurrences.
    fn tick(&mut self) -> Option<u64> {
        self.suppressed += 1;
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Errors that mean the process (or the machine) is out of something, so an immediate
/// retry would fail the same way.
fn out_of_resources(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12)) || e.kind() == ErrorKind::OutOfMemory
}

/// Accepts until `shutdown` turns true, handing each admitted connection to `serve`.
pub async fn accept_until<F>(
    listener: &TcpListener,
    slots: &Slots,
    shutdown: &mut watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot),
{
    let mut backoff = Duration::ZERO;
    let mut refused_log = Quiet::new(Duration::from_secs(10));
    let mut error_log = Quiet::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((socket, peer)) => {
                backoff = Duration::ZERO;
                match slots.try_admit(peer.ip()) {
                    Ok(slot) => serve(socket, peer, slot),
                    Err(why) => {
                        metrics::counter!("zonecast_connections_refused_total", "reason" => why.label())
                            .increment(1);
                        if let Some(n) = refused_log.tick() {
                            tracing::warn!(
                                reason = why.label(),
                                refused = n,
                                open = slots.open(),
                                "refusing connections: at a connection cap"
                            );
                        }
                        shed(slots, socket);
                    }
                }
            }
            Err(e) if out_of_resources(&e) => {
                metrics::counter!("zonecast_accept_errors_total", "kind" => "resources")
                    .increment(1);
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_BACKOFF);
                if let Some(n) = error_log.tick() {
                    tracing::error!(error = %e, errors = n, open = slots.open(),
                        pause_ms = backoff.as_millis() as u64,
                        "cannot accept connections: out of file descriptors or memory; pausing");
                }
                tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            // A connection that failed before it was accepted (ECONNABORTED, …): it
            // concerns that connection only.
            Err(e) => {
                metrics::counter!("zonecast_accept_errors_total", "kind" => "connection")
                    .increment(1);
                if let Some(n) = error_log.tick() {
                    tracing::debug!(error = %e, errors = n, "a connection failed while being accepted");
                }
            }
        }
    }
}

/// The answer past a cap, written without parsing the request.
fn refusal() -> &'static [u8] {
    static TEXT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let body = r#"{"type":"/problems/unavailable","title":"Service Unavailable","status":503,"detail":"too many connections; retry later","code":"unavailable"}"#;
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// Answers a refused connection `503` and closes it. The request is read and dropped
/// (for a moment, bounded) so that closing does not reset the connection before the
/// client has read the answer.
fn shed(slots: &Slots, mut socket: TcpStream) {
    let Ok(permit) = slots.shedders.clone().try_acquire_owned() else {
        return; // dropped: closed without an answer
    };
    tokio::spawn(async move {
        let _permit = permit;
        let answer = async {
            socket.write_all(refusal()).await?;
            socket.shutdown().await?;
            let mut sink = [0u8; 1024];
            let mut left: usize = 64 * 1024;
            while left > 0 {
                let n = socket.read(&mut sink).await?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n);
            }
            Ok::<(), std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_in_total_and_per_address_and_come_back_on_drop() {
        let slots = Slots::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let c: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = slots.try_admit(a).unwrap();
        let _s2 = slots.try_admit(b).unwrap();
        assert_eq!(
            slots.try_admit(a).err(),
            Some(Refused::MaxPerIp),
            "a v4-mapped address is the same client"
        );
        let _s3 = slots.try_admit(c).unwrap();
        assert_eq!(slots.try_admit(c).err(), Some(Refused::MaxConnections));
        assert_eq!(slots.open(), 3);
        drop(s1);
        assert_eq!(slots.open(), 2);
        assert!(slots.try_admit(a).is_ok(), "a freed slot is usable again");
        assert!(lock(&slots.per_ip).len() <= 2);
    }

    #[test]
    fn quiet_logs_once_per_interval_with_the_count() {
        let mut q = Quiet::new(Duration::from_secs(3600));
        assert_eq!(q.tick(), Some(1));
        assert_eq!(q.tick(), None);
        assert_eq!(q.tick(), None);
        q.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(q.tick(), Some(3));
    }
}
