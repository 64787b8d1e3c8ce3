//! Fan-out: one task per stream writes each batch of the stream's events, rendered
//! once per wire form, to every connection that follows the stream live: SSE
//! connections the server handed over (straight to their sockets), and WebSocket
//! subscriptions (through their connection's shared outgoing side, `ws_socket`).
//!
//! Why: served one by one, every connection is a task woken per event, a poll chain,
//! and (for SSE) hyper's chunked encoder and its buffers (about 20 KiB per idle
//! connection). Here a connection that has caught up is an entry in its stream's list
//! (and, for SSE, a small task that notices its peer leaving); a batch is one
//! non-blocking write per socket, from one task.
//!
//! What it keeps of the cursor's promise, across every hand-over:
//! - A connection joins at the seq it wrote last. The group writes it what lies
//!   between that and the group's own position (from the recent-event cache), or holds
//!   it until its cursor passes that seq (`early`), so every seq reaches it once, in
//!   order, and no batch reaches it twice.
//! - Each member keeps the position it has been written up to; a pass writes each
//!   member the frames after it, and takes what arrives meanwhile for the members it
//!   has not reached yet. The group keeps the frames after the furthest-behind
//!   member's position, and the next pass goes at once while anyone is behind.
//! - A socket that cannot take a whole batch at once goes back to a task of its own
//!   (SSE: `sse_socket`, with the rest of that batch and a cursor after it; WebSocket:
//!   its connection's task, once its queue is full, with a cursor after what it has)
//!   and joins again once it has caught up: a slow reader never holds up the others,
//!   and costs at most one batch (or its bounded queue) and one cursor.
//! - Heartbeats, revocation, expiry and shutdown act on every member within the same
//!   bounds as on a connection of its own.
//!
//! Must not: wait on a socket; answer HTTP (a connection arrives with its head
//! written); read the database except through the cursor.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};

use super::batch::{MAX_CHUNK, collect};
use super::ws_socket::WsConn;
use super::{Delivery, stopping};
use crate::credentials::Ended;
use crate::cursor::Start;
use crate::domain::{Principal, StreamKey};
use crate::observe::ConnGuard;
use crate::server::Slot;
use crate::state::AppState;

mod group;

use group::{Group, YIELD_EVERY};

/// Longest a busy stream's next batch gathers (see `run`).
const MAX_GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// Least time between two sweeps for members that have gone (see `Sweeper`).
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// When a group looks through its members for those that have gone: at once for a
/// departure after a quiet spell, then at most once per `SWEEP_EVERY`.
///
/// Why: a sweep looks at every member (for WebSocket, a lock and a map lookup each).
/// When 10,000 WebSocket clients left at once, each departure woke the group for a
/// sweep of all the others: 3.4 s of the server's core, in which its other streams
/// waited. A member that has gone and is not swept yet costs nothing but a refused
/// write, which drops it too.
#[derive(Default)]
struct Sweeper {
    last: Option<Instant>,
    /// A sweep put off until then.
    due: Option<Instant>,
}

impl Sweeper {
    /// A member has gone, `now`: `true` to sweep now; otherwise one is `due`.
    fn gone(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now < last + SWEEP_EVERY => {
                self.due.get_or_insert(last + SWEEP_EVERY);
                false
            }
            _ => {
                self.swept(now);
                true
            }
        }
    }

    /// A sweep ran, `now` (the one that was due, or one on a departure).
    fn swept(&mut self, now: Instant) {
        self.last = Some(now);
        self.due = None;
    }
}

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

/// Who joins a group.
pub enum Joiner {
    Sse(Follower),
    /// Subscription number `sub` of a WebSocket connection.
    Ws {
        conn: Arc<WsConn>,
        sub: u64,
    },
}

/// The streams' groups of this server.
#[derive(Clone)]
pub struct Fanout(Arc<Registry>);

/// Where a group hands an SSE connection back to follow on its own: it has written
/// its stream up to the seq given, and the bytes given must be written before anything
/// else. (`sse_socket::resume`, given at construction: the group must not depend on
/// the module that depends on it.)
pub type Resume = fn(Fanout, Follower, u64, Bytes);

struct Registry {
    state: AppState,
    resume: Resume,
    /// std `Mutex`: held for map operations only. Lock order: this, then an inbox.
    groups: Mutex<HashMap<StreamKey, Arc<Shared>>>,
}

/// What a group shares with the connections joining it and with its members.
struct Shared {
    /// Connections waiting to join, each with the seq it wrote last. Bounded by the
    /// server's connections and their subscriptions: each is in one place at a time.
    inbox: Mutex<Vec<(u64, Joiner)>>,
    joined: Notify,
    /// A member's peer (or subscription) has gone.
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
        (self.0.resume)(self.clone(), f, after, pending);
    }

    pub(super) fn state(&self) -> &AppState {
        &self.0.state
    }

    /// Hands `who`, which has written `stream` up to seq `pos`, to the stream's group,
    /// starting the group if there is none.
    pub(super) fn join(&self, stream: &StreamKey, pos: u64, who: Joiner) {
        let mut groups = lock(&self.0.groups);
        let shared = match groups.get(stream) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Shared {
                    inbox: Mutex::default(),
                    joined: Notify::new(),
                    gone: Notify::new(),
                });
                groups.insert(stream.clone(), s.clone());
                self.0.state.service.connections().fanout_group(true);
                tokio::spawn(run(self.clone(), s.clone(), stream.clone(), pos));
                s
            }
        };
        lock(&shared.inbox).push((pos, who));
        shared.joined.notify_one();
    }

    /// A member of `stream`'s group has gone (a WebSocket connection ended, or left the
    /// stream): the group lets it go now rather than at its next write.
    pub(super) fn left(&self, stream: &StreamKey) {
        if let Some(s) = lock(&self.0.groups).get(stream) {
            s.gone.notify_one();
        }
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
            self.0.state.service.pace().ended(stream);
        }
        true
    }

    /// Ends the group whatever waits to join it (shutdown, a failed cursor): SSE
    /// connections waiting are closed; WebSocket subscriptions go back to their
    /// connections.
    fn abandon(&self, stream: &StreamKey, shared: &Arc<Shared>) {
        let mut groups = lock(&self.0.groups);
        if groups.get(stream).is_some_and(|s| Arc::ptr_eq(s, shared)) {
            groups.remove(stream);
            self.0.state.service.connections().fanout_group(false);
            self.0.state.service.pace().ended(stream);
        }
        drop(groups);
        for (p, who) in lock(&shared.inbox).drain(..) {
            if let Joiner::Ws { conn, sub } = who {
                conn.hand_back(stream, sub, p);
            }
        }
    }
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

/// When `at` comes, as a tokio instant.
pub(super) fn instant_of(at: DateTime<Utc>) -> Instant {
    Instant::now() + (at - Utc::now()).to_std().unwrap_or_default()
}

/// A far-off instant for a timer that is off.
fn never() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

/// After a pass that began at `pass`: if events arrived while it ran, the stream comes
/// faster than passes go round. The next batch gathers for about as long as the pass
/// took, so each write carries more (fewer writes, for the server and for every
/// reader); an idle stream never waits. Nor does one whose writers wait for its next
/// pass (`held`, see `pace`): nothing more comes until it goes.
async fn gather(cursor: &mut crate::cursor::Cursor, lagging: bool, held: bool, pass: Instant) {
    if !held && (lagging || cursor.pending()) {
        tokio::time::sleep(pass.elapsed().min(MAX_GATHER)).await;
    }
}

/// The group's task: its cursor starts after `start`, the position of the connection
/// that started it.
async fn run(fanout: Fanout, shared: Arc<Shared>, stream: StreamKey, start: u64) {
    let state = fanout.state().clone();
    let mut cursor = state.service.cursor(&stream);
    if let Err(e) = cursor.seek(Start::After(start)).await {
        tracing::warn!(stream = %stream, error = %e, "cannot follow the stream; ending its connections");
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
        frames: Vec::new(),
        low: cursor.position(),
        reset_seen: false,
        look_every: YIELD_EVERY,
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
    let mut sweeper = Sweeper::default();
    let sweep = sleep_until(never());
    tokio::pin!(sweep);
    let mut sweep_armed: Option<Instant> = None;
    loop {
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
            _ = shared.gone.notified() => {
                if sweeper.gone(Instant::now()) {
                    g.drop_gone();
                }
            }
            _ = &mut sweep, if sweeper.due.is_some() => {
                sweeper.swept(Instant::now());
                g.drop_gone();
            }
            _ = shared.joined.notified() => {
                let joining = std::mem::take(&mut *lock(&shared.inbox));
                for (p, who) in joining {
                    g.admit(p, who);
                }
            }
            // A pass left members behind what it took: the next pass goes at once.
            () = std::future::ready(()), if g.lagging() => {
                let pass = Instant::now();
                g.fan_out(|| cursor.try_next()).await;
                gather(&mut cursor, g.lagging(), state.service.pace().holding(&stream), pass).await;
            }
            taken = collect(&mut cursor, MAX_CHUNK, |_, item| g.take(item)) => match taken {
                Ok(_) => {
                    let pass = Instant::now();
                    g.fan_out(|| cursor.try_next()).await;
                    gather(&mut cursor, g.lagging(), state.service.pace().holding(&stream), pass).await;
                }
                Err(e) => {
                    tracing::warn!(stream = %stream, error = %e, "ending the stream's connections");
                    g.release_ws();
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
        if sweep_armed != sweeper.due {
            sweep_armed = sweeper.due;
            sweep.as_mut().reset(sweep_armed.unwrap_or_else(never));
        }
        if g.is_empty() && fanout.retire(&stream, &shared) {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
