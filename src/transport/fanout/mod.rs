//! SSE fan-out: one task per stream writes each batch of the stream's events, rendered
//! once, straight to the socket of every connection that follows the stream live.
//!
//! Why: served one by one, every SSE connection is a task woken per event, a poll
//! chain, hyper's chunked encoder and its buffers (about 20 KiB per idle connection).
//! Here a connection that has caught up is an entry in its stream's list and a small
//! task that notices its peer leaving (`watch`); a batch is one non-blocking write per
//! socket, from one task.
//!
//! What it keeps of the cursor's promise, across every hand-over:
//! - A connection joins at the seq it wrote last. The group writes it what lies
//!   between that and the group's own position (from the recent-event cache), or holds
//!   it until its cursor passes that seq (`early`), so every seq reaches it once, in
//!   order, and no batch reaches it twice.
//! - A socket that cannot take a whole batch at once goes back to a task of its own
//!   (`sse_socket`) with the rest of that batch and a cursor after it, and joins again
//!   once it has caught up: a slow reader never holds up the others, and costs at most
//!   one batch and one cursor.
//! - Heartbeats, revocation, expiry and shutdown act on every member within the same
//!   bounds as on a connection of its own.
//!
//! Must not: wait on a socket; answer HTTP (a connection arrives with its head
//! written); read the database except through the cursor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};

use super::batch::{MAX_CHUNK, collect};
use super::{Delivery, render, stopping};
use crate::credentials::Ended;
use crate::cursor::{Item, Start};
use crate::domain::{Principal, StreamKey};
use crate::observe::{ConnGuard, Stats, Transport};
use crate::server::Slot;
use crate::state::AppState;

/// Sockets written between two yields to the runtime: a pass over ten thousand
/// members must not hold a worker for its whole length.
const YIELD_EVERY: usize = 256;

/// Longest a busy stream's next batch gathers (see `run`).
const MAX_GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// Events a joining connection may be behind the group and still be brought level by
/// the group itself (from the cache); further behind, it catches up on its own.
const CATCH_UP_MAX: u64 = 512;

/// A socket taken over from the HTTP server, with its place under the server's caps.
pub struct Conn {
    pub tcp: TcpStream,
    _slot: Slot,
    /// Its peer has gone (seen by the watcher).
    closed: AtomicBool,
}

impl Conn {
    pub fn new(tcp: TcpStream, slot: Slot) -> Self {
        Conn {
            tcp,
            _slot: slot,
            closed: AtomicBool::new(false),
        }
    }
}

/// One SSE connection outside hyper: its socket, who reads it, its registration in
/// `/api/stats`, and the stream it follows.
pub struct Follower {
    pub conn: Arc<Conn>,
    pub principal: Arc<Principal>,
    pub registration: ConnGuard,
    pub stream: StreamKey,
}

/// The streams' groups of this server.
#[derive(Clone)]
pub struct Fanout(Arc<Registry>);

/// Where a group hands a connection back to follow on its own: it has written its
/// stream up to the seq given, and the bytes given must be written before anything
/// else. (`sse_socket::resume`, given at construction: the group must not depend on
/// the module that depends on it.)
pub type Resume = fn(Fanout, Follower, u64, Bytes);

struct Registry {
    state: AppState,
    resume: Resume,
    /// std `Mutex`: held for map operations only. Lock order: this, then an inbox.
    groups: Mutex<HashMap<StreamKey, Arc<Shared>>>,
}

/// What a group shares with the connections joining it and with its members' watchers.
struct Shared {
    /// Connections waiting to join, each with the seq it wrote last. Bounded by the
    /// server's connections: each is in one place at a time.
    inbox: Mutex<Vec<(u64, Follower)>>,
    joined: Notify,
    /// A member's peer has gone.
    gone: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data whole, so a poisoned lock is usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fanout {
    pub fn new(state: AppState, resume: Resume) -> Self {
        Fanout(Arc::new(Registry {
            state,
            resume,
            groups: Mutex::default(),
        }))
    }

    /// Hands `f` back to follow on its own (see `Resume`).
    fn resume(&self, f: Follower, after: u64, pending: Bytes) {
        self.0.state.service.connections().handed_back();
        (self.0.resume)(self.clone(), f, after, pending);
    }

    pub(super) fn state(&self) -> &AppState {
        &self.0.state
    }

    /// Hands `f`, which has written its stream up to seq `pos`, to its stream's group,
    /// starting the group if there is none.
    pub(super) fn join(&self, pos: u64, f: Follower) {
        let mut groups = lock(&self.0.groups);
        let shared = match groups.get(&f.stream) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Shared {
                    inbox: Mutex::default(),
                    joined: Notify::new(),
                    gone: Notify::new(),
                });
                groups.insert(f.stream.clone(), s.clone());
                self.0.state.service.connections().fanout_group(true);
                tokio::spawn(run(self.clone(), s.clone(), f.stream.clone(), pos));
                s
            }
        };
        lock(&shared.inbox).push((pos, f));
        shared.joined.notify_one();
    }

    /// Removes the group if nobody waits to join it; `false` if someone does.
    fn retire(&self, stream: &StreamKey, shared: &Arc<Shared>) -> bool {
        let mut groups = lock(&self.0.groups);
        if !lock(&shared.inbox).is_empty() {
            return false;
        }
        if groups.get(stream).is_some_and(|s| Arc::ptr_eq(s, shared)) {
            groups.remove(stream);
            self.0.state.service.connections().fanout_group(false);
        }
        true
    }

    /// Ends the group whatever waits to join it (shutdown, a failed cursor): those
    /// connections are closed too.
    fn abandon(&self, stream: &StreamKey, shared: &Arc<Shared>) {
        let mut groups = lock(&self.0.groups);
        if groups.get(stream).is_some_and(|s| Arc::ptr_eq(s, shared)) {
            groups.remove(stream);
            self.0.state.service.connections().fanout_group(false);
        }
        drop(groups);
        lock(&shared.inbox).clear();
    }
}

/// A connection in a group, with the task that watches its peer.
struct Member {
    f: Follower,
    _watch: Watch,
}

/// A member's watcher, for as long as it is a member: aborted when the member leaves
/// (so the socket closes with it), counted in `/api/stats` meanwhile.
struct Watch {
    task: AbortHandle,
    stats: Arc<Stats>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
        self.stats.fanout_member(false);
    }
}

impl Member {
    fn new(f: Follower, shared: &Arc<Shared>, stats: &Arc<Stats>) -> Self {
        stats.fanout_member(true);
        let task = tokio::spawn(watch(f.conn.clone(), shared.clone())).abort_handle();
        Member {
            f,
            _watch: Watch {
                task,
                stats: stats.clone(),
            },
        }
    }

    fn into_follower(self) -> Follower {
        self.f
    }
}

/// Waits for the peer to leave, then tells the group.
async fn watch(conn: Arc<Conn>, shared: Arc<Shared>) {
    peer_gone(&conn.tcp).await;
    conn.closed.store(true, Ordering::Release);
    shared.gone.notify_one();
}

/// Completes when the peer has closed (or sent anything: an event-stream client has
/// nothing to say after its request).
pub(super) async fn peer_gone(tcp: &TcpStream) {
    let mut one = [0u8; 1];
    loop {
        if tcp.readable().await.is_err() {
            return;
        }
        match tcp.try_read(&mut one) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => return,
        }
    }
}

/// How much of a buffer a socket took without waiting.
pub(super) enum Sent {
    All,
    /// Took this many bytes, then would have blocked.
    Part(usize),
    /// The socket failed: its peer is gone.
    Gone,
}

/// Writes as much of `buf` as the socket takes now.
pub(super) fn try_send(tcp: &TcpStream, buf: &[u8]) -> Sent {
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

/// One frame of a batch and the stream position after it.
struct Frame {
    after: u64,
    bytes: Bytes,
    /// A `reset`: the position moved without a seq.
    reset: bool,
}

fn concat<'a>(parts: impl Iterator<Item = &'a Bytes> + Clone) -> Bytes {
    let len = parts.clone().map(Bytes::len).sum();
    let mut b = BytesMut::with_capacity(len);
    for p in parts {
        b.extend_from_slice(p);
    }
    b.freeze()
}

/// The state of one stream's group, owned by its task.
struct Group {
    fanout: Fanout,
    shared: Arc<Shared>,
    stream: StreamKey,
    /// Level with the group: have written everything up to `pos`.
    members: Vec<Member>,
    /// Joined ahead of the group (their own cursor saw a seq first): each waits, with
    /// the seq it wrote last, until the group passes it.
    early: Vec<(u64, Member)>,
    /// The seq the group's cursor handed out last.
    pos: u64,
    delivery: Delivery,
    /// The earliest expiry of a member's credentials.
    expiry: Option<DateTime<Utc>>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.members.is_empty() && self.early.is_empty()
    }

    fn all(&mut self) -> impl Iterator<Item = &mut Member> {
        self.members
            .iter_mut()
            .chain(self.early.iter_mut().map(|(_, m)| m))
    }

    /// Takes a joining connection in (see the module's promise).
    fn admit(&mut self, p: u64, f: Follower) {
        if let Some(at) = f.principal.expires_at {
            self.expiry = Some(self.expiry.map_or(at, |e| e.min(at)));
        }
        if p >= self.pos {
            let m = Member::new(f, &self.shared, &self.delivery.stats);
            if p == self.pos {
                self.members.push(m);
            } else {
                self.early.push((p, m));
            }
            return;
        }
        let behind = self.pos - p;
        let events = if behind <= CATCH_UP_MAX {
            self.fanout.state().service.broker().local().recent(
                &self.stream,
                p + 1,
                behind as usize,
            )
        } else {
            Vec::new()
        };
        if events.len() as u64 != behind {
            // Not all in the cache: it catches up from the log on its own.
            self.fanout.resume(f, p, Bytes::new());
            return;
        }
        let bytes = concat(events.iter().map(|e| &e.sse));
        match try_send(&f.conn.tcp, &bytes) {
            Sent::All => {
                self.count_sent(events.len() as u64);
                self.members
                    .push(Member::new(f, &self.shared, &self.delivery.stats));
            }
            Sent::Part(n) => {
                self.fanout.resume(f, self.pos, bytes.slice(n..));
            }
            Sent::Gone => self.delivery.stats.send_error(),
        }
    }

    fn count_sent(&self, n: u64) {
        self.delivery.stats.sent(Transport::Sse, n);
    }

    /// Writes a batch of frames (which took the group from `pos` to `after`) to every
    /// member, and to every early member the part it has not written.
    async fn fan_out(&mut self, frames: &[Frame], events: u64) {
        let after = frames.last().map_or(self.pos, |f| f.after);
        let joined = concat(frames.iter().map(|f| &f.bytes));
        let mut written = 0u64;
        let mut k = 0;
        let mut tried = 0;
        while k < self.members.len() {
            match try_send(&self.members[k].f.conn.tcp, &joined) {
                Sent::All => {
                    written += 1;
                    k += 1;
                }
                Sent::Part(n) => {
                    let f = self.members.swap_remove(k).into_follower();
                    self.fanout.resume(f, after, joined.slice(n..));
                }
                Sent::Gone => {
                    self.members.swap_remove(k);
                    self.delivery.stats.send_error();
                }
            }
            tried += 1;
            if tried % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
        self.count_sent(events * written);
        // A reset moves the position without a seq: nobody ahead can be matched
        // against it, so they catch up on their own.
        let reset = frames.iter().any(|f| f.reset);
        let mut j = 0;
        while j < self.early.len() {
            let p = self.early[j].0;
            if p >= after && !reset {
                j += 1;
                continue;
            }
            let (_, m) = self.early.swap_remove(j);
            let f = m.into_follower();
            if reset {
                self.fanout.resume(f, p, Bytes::new());
                continue;
            }
            let rest = concat(frames.iter().filter(|fr| fr.after > p).map(|fr| &fr.bytes));
            match try_send(&f.conn.tcp, &rest) {
                Sent::All => {
                    self.count_sent(after - p);
                    self.members
                        .push(Member::new(f, &self.shared, &self.delivery.stats));
                }
                Sent::Part(n) => {
                    self.fanout.resume(f, after, rest.slice(n..));
                }
                Sent::Gone => self.delivery.stats.send_error(),
            }
        }
        self.pos = after;
        self.delivery.written();
    }

    /// Writes a heartbeat to everyone; a socket that cannot take it whole goes on on
    /// its own with the rest.
    async fn heartbeat(&mut self) {
        let beat = render::heartbeat();
        let pos = self.pos;
        let mut k = 0;
        let mut tried = 0;
        while k < self.members.len() {
            tried += 1;
            if tried % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            match try_send(&self.members[k].f.conn.tcp, &beat) {
                Sent::All => k += 1,
                Sent::Part(n) => {
                    let f = self.members.swap_remove(k).into_follower();
                    self.fanout.resume(f, pos, beat.slice(n..));
                }
                Sent::Gone => {
                    self.members.swap_remove(k);
                }
            }
        }
        let mut j = 0;
        while j < self.early.len() {
            match try_send(&self.early[j].1.f.conn.tcp, &beat) {
                Sent::All => j += 1,
                Sent::Part(n) => {
                    let (p, m) = self.early.swap_remove(j);
                    let f = m.into_follower();
                    self.fanout.resume(f, p, beat.slice(n..));
                }
                Sent::Gone => {
                    self.early.swap_remove(j);
                }
            }
        }
    }

    /// Drops the members whose peers have gone.
    fn drop_closed(&mut self) {
        let open = |m: &Member| !m.f.conn.closed.load(Ordering::Acquire);
        self.members.retain(open);
        self.early.retain(|(_, m)| open(m));
    }

    /// Ends (closes) the members `why` applies to.
    fn end_where(&mut self, why: Ended, ends: impl Fn(&Principal) -> bool) {
        let keep = |m: &Member| {
            let end = ends(&m.f.principal);
            if end {
                tracing::info!(principal = %m.f.principal.name, reason = why.reason(),
                    "ending SSE stream");
            }
            !end
        };
        self.members.retain(keep);
        self.early.retain(|(_, m)| keep(m));
    }

    /// Ends the members whose credentials have expired; sets the next expiry.
    fn end_expired(&mut self) {
        let now = Utc::now();
        self.end_where(Ended::Expired, |p| p.expires_at.is_some_and(|at| at <= now));
        self.expiry = self.all().filter_map(|m| m.f.principal.expires_at).min();
    }
}

/// When `at` comes, as a tokio instant.
fn instant_of(at: DateTime<Utc>) -> Instant {
    Instant::now() + (at - Utc::now()).to_std().unwrap_or_default()
}

/// A far-off instant for a timer that is off.
fn never() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

/// The group's task: its cursor starts after `start`, the position of the connection
/// that started it.
async fn run(fanout: Fanout, shared: Arc<Shared>, stream: StreamKey, start: u64) {
    let state = fanout.state().clone();
    let mut cursor = state.service.cursor(&stream);
    if let Err(e) = cursor.seek(Start::After(start)).await {
        tracing::warn!(stream = %stream, error = %e, "cannot follow the stream; ending its SSE connections");
        fanout.abandon(&stream, &shared);
        return;
    }
    let heartbeat = state.config.heartbeat;
    let mut g = Group {
        fanout: fanout.clone(),
        shared: shared.clone(),
        stream: stream.clone(),
        members: Vec::new(),
        early: Vec::new(),
        pos: cursor.position(),
        delivery: Delivery::new(state.service.connections().clone()),
        expiry: None,
    };
    let stop = stopping(state.shutdown.clone());
    tokio::pin!(stop);
    let mut revocations = state.auth.revocations();
    let mut beat = interval_at(Instant::now() + heartbeat, heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let expiry = sleep_until(never());
    tokio::pin!(expiry);
    let mut armed: Option<DateTime<Utc>> = None;
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        let mut events = 0u64;
        tokio::select! {
            biased;
            _ = &mut stop => {
                fanout.abandon(&stream, &shared);
                return;
            }
            Ok(()) = revocations.changed() => {
                g.end_where(Ended::Revoked, |p| state.auth.is_revoked(p));
            }
            _ = &mut expiry, if g.expiry.is_some() => g.end_expired(),
            _ = shared.gone.notified() => g.drop_closed(),
            _ = shared.joined.notified() => {
                let joining = std::mem::take(&mut *lock(&shared.inbox));
                for (p, f) in joining {
                    g.admit(p, f);
                }
            }
            taken = collect(&mut cursor, MAX_CHUNK, |_, item| {
                g.delivery.delivered(item);
                let (after, reset) = match item {
                    Item::Event(ev) => {
                        events += 1;
                        (ev.seq, false)
                    }
                    Item::Reset(r) => (r.last_event_id, true),
                };
                let bytes = render::sse(item);
                let n = bytes.len();
                frames.push(Frame { after, bytes, reset });
                n
            }) => match taken {
                Ok(_) => {
                    let pass = Instant::now();
                    g.fan_out(&frames, events).await;
                    frames.clear();
                    // Events arrived while this pass ran: the stream comes faster than
                    // passes go round. Let the next batch gather for about as long as
                    // the pass took, so each write carries more (fewer writes, for the
                    // server and for every reader); an idle stream never waits.
                    if cursor.pending() {
                        tokio::time::sleep(pass.elapsed().min(MAX_GATHER)).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(stream = %stream, error = %e, "ending the stream's SSE connections");
                    fanout.abandon(&stream, &shared);
                    return;
                }
            },
            _ = beat.tick() => g.heartbeat().await,
        }
        if armed != g.expiry {
            armed = g.expiry;
            expiry.as_mut().reset(armed.map_or_else(never, instant_of));
        }
        if g.is_empty() && fanout.retire(&stream, &shared) {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
