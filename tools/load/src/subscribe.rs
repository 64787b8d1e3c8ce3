//! Subscribers: one connection each, SSE or WebSocket, to zonecast or Nchan, from one
//! of several loopback source addresses; each records when every seq arrived.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::server::{Kind, Topic, Transport, address, connect_from};
use crate::stamp::At;

/// Where stored arrival times count from: set when the first subscriber starts,
/// before it connects, so before anything can arrive.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The longest a run may last for its arrival times to fit (`micros`).
const LONGEST_RUN: Duration = Duration::from_secs(3600);

/// The most deliveries one run may expect: the subscribers keep 8 bytes for each, and
/// the report two `Duration`s.
const MAX_DELIVERIES: usize = 100_000_000;

/// Refuses a run its subscribers could not record: one that may last longer than
/// `LONGEST_RUN`, or expects more than `MAX_DELIVERIES` (`deliveries`, named `what`
/// after the flags that make it).
pub fn within_bounds(timeout: Duration, deliveries: usize, what: &str) -> anyhow::Result<()> {
    if timeout > LONGEST_RUN {
        anyhow::bail!("--timeout: at most {} s", LONGEST_RUN.as_secs());
    }
    if deliveries > MAX_DELIVERIES {
        anyhow::bail!("{what}: at most {MAX_DELIVERIES} deliveries a run");
    }
    Ok(())
}

/// `t` in microseconds since `epoch`, in 4 bytes: enough for 71 minutes, and runs are
/// bounded by `LONGEST_RUN`.
fn micros(t: Instant) -> u32 {
    u32::try_from(t.saturating_duration_since(epoch()).as_micros()).unwrap_or(u32::MAX - 1)
}

fn instant(us: u32) -> Instant {
    epoch() + Duration::from_micros(u64::from(us))
}

/// When each subscriber of a run first received each seq of `first..first + seqs`:
/// one table for them all, eight bytes per expected delivery (the read and the kernel's
/// time, `micros` plus one each; 0: not arrived), allocated and touched before the run.
///
/// Laid out seq by seq, a subscriber to a column: one pass of the server over its
/// subscribers reaches them in about the order they connected, which is the order
/// of the columns, so the tool's reads of one pass write neighbouring slots. With a
/// table per subscriber, each read wrote a slot on a page of its own: at 10,000
/// subscribers a cache and TLB miss per delivery, a tenth of the tool's core.
pub struct Table {
    first: u64,
    seqs: usize,
    width: usize,
    cells: Box<[AtomicU64]>,
}

impl Table {
    /// For `width` subscribers expecting `start+1..=last`. More than
    /// `MAX_DELIVERIES` in all (an idle connection's range, up to `u64::MAX`) gets no
    /// cells: what arrives is only counted, as outside the range.
    pub fn new(start: u64, last: u64, width: usize) -> Arc<Table> {
        let seqs = usize::try_from(last.saturating_sub(start))
            .ok()
            .filter(|&n| n.saturating_mul(width) <= MAX_DELIVERIES)
            .unwrap_or(0);
        // Zeros written here, not a zeroed allocation: that maps the zero page, and
        // the first arrival on each page would fault a fresh one in during the run, on
        // the tool's core.
        let cells = std::iter::repeat_with(|| AtomicU64::new(0))
            .take(seqs * width)
            .collect();
        Arc::new(Table {
            first: start + 1,
            seqs,
            width,
            cells,
        })
    }

    fn cell(&self, seq: u64, column: usize) -> Option<&AtomicU64> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        if i >= self.seqs || column >= self.width {
            return None;
        }
        self.cells.get(i * self.width + column)
    }
}

/// What one subscriber received: its column of a `Table`, and what broke the order.
pub struct Arrivals {
    table: Arc<Table>,
    column: usize,
    /// Seqs outside the table (never expected; kept to count repeats).
    outside: HashSet<u64>,
    prev: u64,
    /// The last `At` recorded, as stored: the events of one read share it, so it is
    /// converted once per read rather than twice per event.
    stored: Option<(At, u64)>,
    last_seq: Option<u64>,
    last_read: Option<Instant>,
    dup: u64,
    disorder: u64,
}

impl Arrivals {
    /// Column `column` of `table`.
    pub fn new(table: &Arc<Table>, column: usize) -> Arrivals {
        Arrivals {
            table: table.clone(),
            column,
            outside: HashSet::new(),
            prev: table.first - 1,
            stored: None,
            last_seq: None,
            last_read: None,
            dup: 0,
            disorder: 0,
        }
    }

    /// Seq `seq` arrived, at `at`.
    pub fn record(&mut self, seq: u64, at: At) {
        let again = match self.table.cell(seq, self.column) {
            // Only this subscriber writes its column: a load and a store, no
            // read-modify-write.
            Some(cell) if cell.load(Ordering::Relaxed) != 0 => true,
            Some(cell) => {
                let stored = match self.stored {
                    Some((a, stored)) if a == at => stored,
                    _ => {
                        let read = micros(at.read).saturating_add(1);
                        let kernel = micros(at.kernel).saturating_add(1);
                        let stored = (u64::from(read) << 32) | u64::from(kernel);
                        self.stored = Some((at, stored));
                        stored
                    }
                };
                cell.store(stored, Ordering::Relaxed);
                false
            }
            None => !self.outside.insert(seq),
        };
        self.dup += u64::from(again);
        self.disorder += u64::from(seq <= self.prev);
        self.prev = seq;
        self.last_seq = Some(seq);
        self.last_read = Some(at.read);
    }

    /// The seq that arrived last, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// When the last arrival was read.
    pub fn last_read(&self) -> Option<Instant> {
        self.last_read
    }

    /// This subscriber's cells, by seq.
    fn column(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let t = &*self.table;
        (0..t.seqs).map(move |i| {
            let cell = t.cells[i * t.width + self.column].load(Ordering::Relaxed);
            (t.first + i as u64, cell)
        })
    }

    /// Missing, duplicated and out-of-order deliveries.
    pub fn check(&self) -> (u64, u64, u64) {
        let missing = self.column().filter(|&(_, c)| c == 0).count() as u64;
        (missing, self.dup, self.disorder)
    }

    /// Every expected seq that arrived: `(seq, read, kernel)`, the first time.
    pub fn each(&self) -> impl Iterator<Item = (u64, Instant, Instant)> + '_ {
        self.column().filter(|&(_, c)| c != 0).map(|(seq, c)| {
            let (read, kernel) = ((c >> 32) as u32, c as u32);
            (seq, instant(read - 1), instant(kernel - 1))
        })
    }
}

/// The `i`-th of `n` source addresses: 127.0.0.1, 127.0.0.2, …
pub fn source(i: usize, n: usize) -> IpAddr {
    let k = (i % n.max(1)) as u32 + 1;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + k))
}

/// One subscriber's connection.
pub struct Sub {
    pub transport: Transport,
    pub base: String,
    pub from: IpAddr,
}

/// A seq in one SSE line: zonecast's `id: N`, Nchan's `data: {"seq":N}`.
fn sse_seq(kind: Kind, line: &[u8]) -> Option<u64> {
    let rest = match kind {
        Kind::Zonecast => line.strip_prefix(b"id: ")?,
        Kind::Nchan => line.strip_prefix(b"data: {\"seq\":")?,
    };
    digits(rest)
}

/// A seq in one WebSocket text message: zonecast's event JSON starts `{"id":N,`,
/// Nchan's messages are `{"seq":N…`.
fn ws_seq(kind: Kind, text: &[u8]) -> Option<u64> {
    let rest = match kind {
        Kind::Zonecast => text.strip_prefix(b"{\"id\":")?,
        Kind::Nchan => text.strip_prefix(b"{\"seq\":")?,
    };
    digits(rest)
}

/// The number `rest` starts with.
fn digits(rest: &[u8]) -> Option<u64> {
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Prints why a subscriber could not connect, for the first one only.
fn first_failure<E: std::fmt::Display>(e: E) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!("a subscriber could not connect: {e}");
    }
}

/// Watches `topic` until seq `until` has arrived or `stop` turns true, recording into
/// `out`; calls `opened` once its stream is open. `None`: it could not connect.
pub async fn subscribe(
    topic: Arc<Topic>,
    sub: Sub,
    mut out: Arrivals,
    until: u64,
    opened: impl FnOnce() + Send,
    mut stop: watch::Receiver<bool>,
) -> Option<Arrivals> {
    epoch();
    match sub.transport {
        Transport::Sse => {
            let path = match topic.kind {
                Kind::Zonecast => format!("/sse/zones/{}/stock", topic.zone),
                Kind::Nchan => format!("/sub/{}", topic.channel),
            };
            let mut stream = sse_open(&sub, &topic, &path)
                .await
                .map_err(first_failure)
                .ok()?;
            opened();
            let mut line = Vec::with_capacity(64);
            // Made once: a new one per read registered with the channel every time.
            let stopped = stop.wait_for(|s| *s);
            tokio::pin!(stopped);
            while out.last_seq().is_none_or(|s| s < until) {
                // Whole lines straight from what was read; only a line cut by the
                // read's end is copied.
                let mut take = |chunk: &[u8], at: At| {
                    let mut rest = chunk;
                    while let Some(nl) = memchr::memchr(b'\n', rest) {
                        let seq = if line.is_empty() {
                            sse_seq(topic.kind, &rest[..nl])
                        } else {
                            line.extend_from_slice(&rest[..nl]);
                            let seq = sse_seq(topic.kind, &line);
                            line.clear();
                            seq
                        };
                        if let Some(seq) = seq {
                            out.record(seq, at);
                        }
                        rest = &rest[nl + 1..];
                    }
                    line.extend_from_slice(rest);
                };
                let more = tokio::select! {
                    // Reads first, with no coin toss per read: a stop comes after the
                    // publishing has ended, and is seen as soon as a read waits.
                    biased;
                    r = stream.read(&mut take) => r,
                    _ = &mut stopped => break,
                };
                if !matches!(more, Ok(true)) {
                    break;
                }
            }
            Some(out)
        }
        Transport::Ws => {
            let path = match topic.kind {
                Kind::Zonecast => format!(
                    "/ws/zones/{}?last_event_id={}&access_token={}",
                    topic.zone, topic.start, topic.key
                ),
                Kind::Nchan => format!("/sub/{}", topic.channel),
            };
            let addr = address(&sub.base).map_err(first_failure).ok()?;
            let tcp = connect_from(addr, sub.from)
                .await
                .map_err(first_failure)
                .ok()?;
            let mut ws = crate::wsread::Stream::open(tcp, addr, &path)
                .await
                .map_err(first_failure)
                .ok()?;
            opened();
            // Made once: a new one per read registered with the channel every time.
            let stopped = stop.wait_for(|s| *s);
            tokio::pin!(stopped);
            while out.last_seq().is_none_or(|s| s < until) {
                let mut take = |text: &[u8], at: At| {
                    if let Some(seq) = ws_seq(topic.kind, text) {
                        out.record(seq, at);
                    }
                };
                let more = tokio::select! {
                    // Reads first, with no coin toss per read: a stop comes after the
                    // publishing has ended, and is seen as soon as a read waits.
                    biased;
                    r = ws.read(&mut take) => r,
                    _ = &mut stopped => break,
                };
                if !matches!(more, Ok(true)) {
                    break;
                }
            }
            Some(out)
        }
    }
}

/// Opens an event stream over a connection of its own from `sub.from`.
async fn sse_open(sub: &Sub, topic: &Topic, path: &str) -> anyhow::Result<crate::sse::Stream> {
    let addr = address(&sub.base)?;
    let tcp = connect_from(addr, sub.from).await?;
    let mut headers = Vec::new();
    if topic.kind == Kind::Zonecast {
        headers.push(("Authorization", format!("Bearer {}", topic.key)));
        headers.push(("Last-Event-ID", topic.start.to_string()));
    }
    crate::sse::Stream::open(tcp, addr, path, &headers).await
}

/// Subscribers being opened, at most a set number connecting at once; each counts
/// as ready once its stream is open.
pub struct Opening {
    ready: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    pub tasks: Vec<JoinHandle<Option<Arrivals>>>,
}

impl Opening {
    pub fn new(concurrency: usize, stop: watch::Receiver<bool>) -> Opening {
        Opening {
            ready: Arc::default(),
            gate: Arc::new(Semaphore::new(concurrency.max(1))),
            stop,
            tasks: Vec::new(),
        }
    }

    /// Opens one more subscriber, watching until seq `until`, recording into `out`.
    pub fn spawn(&mut self, topic: &Arc<Topic>, sub: Sub, out: Arrivals, until: u64) {
        let (topic, ready, gate, stop) = (
            topic.clone(),
            self.ready.clone(),
            self.gate.clone(),
            self.stop.clone(),
        );
        self.tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let opened = move || {
                drop(permit);
                ready.fetch_add(1, Ordering::Relaxed);
            };
            subscribe(topic, sub, out, until, opened, stop).await
        }));
    }

    /// Until `n` subscribers are open; fails at once when one could not open, and at
    /// the deadline.
    pub async fn wait(&self, n: usize, deadline: Instant) -> anyhow::Result<()> {
        while self.ready.load(Ordering::Relaxed) < n {
            if self.tasks.iter().any(|t| t.is_finished()) {
                anyhow::bail!(
                    "a subscriber could not connect (the server's limits: --connect-rate, \
                     --max-connections-per-ip, --max-connections; the open-file limit)"
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "only {} of {n} subscribers connected in time",
                    self.ready.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_read_from_either_server() {
        assert_eq!(sse_seq(Kind::Zonecast, b"id: 42"), Some(42));
        assert_eq!(sse_seq(Kind::Zonecast, b"data: {\"id\":42}"), None);
        assert_eq!(sse_seq(Kind::Nchan, b"data: {\"seq\":7}"), Some(7));
        assert_eq!(sse_seq(Kind::Nchan, b"id: 1764000000:0"), None);
        assert_eq!(
            ws_seq(Kind::Zonecast, br#"{"id":9,"stream":"zone:1"}"#),
            Some(9)
        );
        assert_eq!(ws_seq(Kind::Zonecast, br#"{"type":"welcome"}"#), None);
        assert_eq!(ws_seq(Kind::Nchan, br#"{"seq":3}"#), Some(3));
        // Padded to a zonecast event's size, the seq still leads.
        let padded = crate::server::nchan_message(3, 240);
        assert_eq!(padded.len(), 240);
        assert_eq!(ws_seq(Kind::Nchan, padded.as_bytes()), Some(3));
        let line = format!("data: {padded}");
        assert_eq!(sse_seq(Kind::Nchan, line.as_bytes()), Some(3));
        assert_eq!(crate::server::nchan_message(3, 0), r#"{"seq":3}"#);
    }

    #[test]
    fn runs_the_arrival_tables_cannot_hold_are_refused() {
        let hour = Duration::from_secs(3600);
        assert!(within_bounds(hour, MAX_DELIVERIES, "n").is_ok());
        assert!(within_bounds(hour + Duration::from_secs(1), 1, "n").is_err());
        let too_many = within_bounds(hour, MAX_DELIVERIES + 1, "--clients × --behind");
        assert!(too_many.is_err_and(|e| e.to_string().starts_with("--clients × --behind")));
    }

    #[test]
    fn missing_duplicated_and_out_of_order_are_counted() {
        // Times count from the epoch: a subscriber sets it before anything can arrive.
        epoch();
        let at = At::now();
        let table = Table::new(0, 5, 3);
        let mut a = Arrivals::new(&table, 1);
        for seq in [1, 2, 2, 4, 3, 9, 9] {
            a.record(seq, at);
        }
        // 5 missing; 2 and 9 again; 2, 3 and the second 9 out of order.
        assert_eq!(a.check(), (1, 2, 3));
        assert_eq!(a.last_seq(), Some(9));
        let seqs: Vec<u64> = a.each().map(|(s, ..)| s).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        // The columns beside it are other subscribers': nothing of this one's is theirs.
        let (mut left, mut right) = (Arrivals::new(&table, 0), Arrivals::new(&table, 2));
        assert_eq!(left.check(), (5, 0, 0));
        assert_eq!(right.check(), (5, 0, 0));
        right.record(5, at);
        assert_eq!(right.check(), (4, 0, 0));
        assert_eq!(a.check(), (1, 2, 3));
        left.record(1, at);
        assert_eq!(left.check(), (4, 0, 0));
        // A time is kept as it was given, to the microsecond.
        let (_, read, kernel) = right.each().next().expect("seq 5");
        let us = |t: Instant, u: Instant| t.max(u).duration_since(t.min(u)).as_micros();
        assert!(us(read, at.read) <= 1 && us(kernel, at.kernel) <= 1);
        // An idle connection expects nothing in particular, and holds no table for it.
        let idle_table = Table::new(7, u64::MAX, 2);
        assert!(idle_table.cells.is_empty());
        let mut idle = Arrivals::new(&idle_table, 1);
        idle.record(8, at);
        idle.record(8, at);
        assert_eq!(idle.check(), (0, 1, 1));
        assert_eq!(idle.each().count(), 0);
        assert_eq!(source(0, 3), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source(4, 3), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    }
}
