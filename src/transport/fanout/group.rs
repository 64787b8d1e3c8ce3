//! One stream's group: its members, SSE or WebSocket, and the rules for joining,
//! writing a batch and handing back (see the module above for the promise they keep).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use tokio::task::AbortHandle;

use super::{Conn, Fanout, Joiner, Shared};
use crate::credentials::Ended;
use crate::cursor::Item;
use crate::domain::{Event, Principal, StreamKey};
use crate::observe::{Stats, Transport};
use crate::transport::send::{Sent, try_send};
use crate::transport::ws_socket::{self, Delivered};
use crate::transport::{Delivery, render};

/// Sockets written between two yields to the runtime: a pass over ten thousand
/// members must not hold a worker for its whole length.
const YIELD_EVERY: usize = 256;

/// Events a joining connection may be behind the group and still be brought level by
/// the group itself (from the cache); further behind, it catches up on its own.
const CATCH_UP_MAX: u64 = 512;

/// One item of a batch, in both wire forms, and the stream position after it.
pub(super) struct Frame {
    pub after: u64,
    pub sse: Bytes,
    pub ws: Bytes,
    /// A `reset`: the position moved without a seq.
    pub reset: bool,
}

impl Frame {
    pub fn of(stream: &StreamKey, item: &Item) -> Frame {
        let (after, reset) = match item {
            Item::Event(ev) => (ev.seq, false),
            Item::Reset(r) => (r.last_event_id, true),
        };
        Frame {
            after,
            sse: render::sse(item),
            ws: ws_socket::text(render::ws(stream, item).as_bytes()),
            reset,
        }
    }
}

fn concat<'a>(parts: impl Iterator<Item = &'a Bytes> + Clone) -> Bytes {
    let len = parts.clone().map(Bytes::len).sum();
    let mut b = BytesMut::with_capacity(len);
    for p in parts {
        b.extend_from_slice(p);
    }
    b.freeze()
}

/// A batch in both wire forms.
struct Batch {
    sse: Bytes,
    ws: Bytes,
}

impl Batch {
    /// The frames after seq `p`.
    fn after(frames: &[Frame], p: u64) -> Batch {
        let rest = || frames.iter().filter(move |f| f.after > p);
        Batch {
            sse: concat(rest().map(|f| &f.sse)),
            ws: concat(rest().map(|f| &f.ws)),
        }
    }

    fn events(events: &[Arc<Event>]) -> Batch {
        Batch {
            sse: concat(events.iter().map(|e| &e.sse)),
            ws: concat(
                events
                    .iter()
                    .map(|e| ws_socket::text(e.text.as_bytes()))
                    .collect::<Vec<_>>()
                    .iter(),
            ),
        }
    }
}

/// A member's place while it is one: counted in `/api/stats`; an SSE member's watcher
/// is aborted when it leaves, so its socket closes with it.
struct Place {
    watcher: Option<AbortHandle>,
    stats: Arc<Stats>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(w) = &self.watcher {
            w.abort();
        }
        self.stats.fanout_member(false);
    }
}

/// A connection in a group.
pub(super) struct Member {
    who: Joiner,
    _place: Place,
}

/// What became of a batch for one member.
enum Wrote {
    All,
    /// Could not take it (all or the rest): it goes on on its own.
    Back(Bytes),
    Gone,
}

impl Member {
    fn new(who: Joiner, shared: &Arc<Shared>, stats: &Arc<Stats>) -> Self {
        stats.fanout_member(true);
        let watcher = match &who {
            Joiner::Sse(f) => {
                let (conn, shared) = (f.conn.clone(), shared.clone());
                Some(tokio::spawn(watch(conn, shared)).abort_handle())
            }
            // Its own task reads the socket, and tells the group when it ends.
            Joiner::Ws { .. } => None,
        };
        Member {
            who,
            _place: Place {
                watcher,
                stats: stats.clone(),
            },
        }
    }

    fn write(&self, stream: &StreamKey, batch: &Batch) -> Wrote {
        match &self.who {
            Joiner::Sse(f) => match try_send(&f.conn.tcp, &batch.sse) {
                Sent::All => Wrote::All,
                Sent::Part(n) => Wrote::Back(batch.sse.slice(n..)),
                Sent::Gone => Wrote::Gone,
            },
            Joiner::Ws { conn, sub } => match conn.deliver(stream, *sub, &batch.ws) {
                Delivered::Yes => Wrote::All,
                // Nothing of it was queued: the connection takes the stream from
                // before the batch.
                Delivered::Busy => Wrote::Back(Bytes::new()),
                Delivered::Gone => Wrote::Gone,
            },
        }
    }

    fn is_sse(&self) -> bool {
        matches!(self.who, Joiner::Sse(_))
    }

    /// An SSE member's principal (a WebSocket connection's own task watches its
    /// credentials).
    fn principal(&self) -> Option<&Principal> {
        self.who.principal()
    }

    fn gone(&self, stream: &StreamKey) -> bool {
        match &self.who {
            Joiner::Sse(f) => f.conn.closed.load(Ordering::Acquire),
            Joiner::Ws { conn, sub } => conn.is_closed() || !conn.is_current(stream, *sub),
        }
    }
}

/// Waits for an SSE member's peer to leave, then tells the group.
async fn watch(conn: Arc<Conn>, shared: Arc<Shared>) {
    super::peer_gone(&conn.tcp).await;
    conn.closed.store(true, Ordering::Release);
    shared.gone.notify_one();
}

/// The state of one stream's group, owned by its task.
pub(super) struct Group {
    pub fanout: Fanout,
    pub shared: Arc<Shared>,
    pub stream: StreamKey,
    /// Level with the group: have written everything up to `pos`.
    pub members: Vec<Member>,
    /// Joined ahead of the group (their own cursor saw a seq first): each waits, with
    /// the seq it wrote last, until the group passes it.
    pub early: Vec<(u64, Member)>,
    /// The seq the group's cursor handed out last.
    pub pos: u64,
    pub delivery: Delivery,
    /// The earliest expiry of a member's credentials.
    pub expiry: Option<DateTime<Utc>>,
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.early.is_empty()
    }

    fn member(&self, who: Joiner) -> Member {
        Member::new(who, &self.shared, &self.delivery.stats)
    }

    /// Hands `who` back to go on on its own: it has written the stream up to `after`,
    /// and `rest` must be written before anything else.
    fn back(&self, who: Joiner, after: u64, rest: Bytes) {
        self.delivery.stats.handed_back();
        match who {
            Joiner::Sse(f) => self.fanout.resume(f, after, rest),
            Joiner::Ws { conn, sub } => conn.hand_back(&self.stream, sub, after),
        }
    }

    /// Takes a joining connection in (see the module's promise).
    pub fn admit(&mut self, p: u64, who: Joiner) {
        if let Some(at) = who.principal().and_then(|p| p.expires_at) {
            self.expiry = Some(self.expiry.map_or(at, |e| e.min(at)));
        }
        if p >= self.pos {
            let m = self.member(who);
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
            self.back(who, p, Bytes::new());
            return;
        }
        let m = self.member(who);
        match m.write(&self.stream, &Batch::events(&events)) {
            Wrote::All => {
                self.count_sent(&m, events.len() as u64);
                self.members.push(m);
            }
            Wrote::Back(rest) if rest.is_empty() => self.back(m.who, p, rest),
            Wrote::Back(rest) => self.back(m.who, self.pos, rest),
            Wrote::Gone => self.delivery.stats.send_error(),
        }
    }

    fn count_sent(&self, m: &Member, n: u64) {
        let t = if m.is_sse() {
            Transport::Sse
        } else {
            Transport::Ws
        };
        self.delivery.stats.sent(t, n);
    }

    /// Writes a batch of frames (which took the group from `pos` to their last
    /// position) to every member, and to every early member the part it has not
    /// written.
    pub async fn fan_out(&mut self, frames: &[Frame], events: u64) {
        let before = self.pos;
        let after = frames.last().map_or(before, |f| f.after);
        let batch = Batch::after(frames, before);
        let mut k = 0;
        let mut tried = 0;
        // Members written, `[sse, ws]`: counted once per batch, not per member.
        let mut written = [0u64; 2];
        while k < self.members.len() {
            match self.members[k].write(&self.stream, &batch) {
                Wrote::All => {
                    written[usize::from(!self.members[k].is_sse())] += 1;
                    k += 1;
                }
                Wrote::Back(rest) => {
                    let m = self.members.swap_remove(k);
                    // A socket that took part of the batch has the rest to write, and
                    // goes on after it; one that took none of it goes on from before.
                    let at = if rest.is_empty() { before } else { after };
                    self.back(m.who, at, rest);
                }
                Wrote::Gone => {
                    self.members.swap_remove(k);
                    self.delivery.stats.send_error();
                }
            }
            tried += 1;
            if tried % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
        }
        self.delivery
            .stats
            .sent(Transport::Sse, events * written[0]);
        self.delivery.stats.sent(Transport::Ws, events * written[1]);
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
            if reset {
                self.back(m.who, p, Bytes::new());
                continue;
            }
            match m.write(&self.stream, &Batch::after(frames, p)) {
                Wrote::All => {
                    self.count_sent(&m, after - p);
                    self.members.push(m);
                }
                Wrote::Back(rest) if rest.is_empty() => self.back(m.who, p, rest),
                Wrote::Back(rest) => self.back(m.who, after, rest),
                Wrote::Gone => self.delivery.stats.send_error(),
            }
        }
        self.pos = after;
        self.delivery.written();
    }

    /// Writes a heartbeat to every SSE member (WebSocket connections ping on their
    /// own); a socket that cannot take it whole goes on on its own with the rest.
    pub async fn heartbeat(&mut self) {
        let beat = Batch {
            sse: render::heartbeat(),
            ws: Bytes::new(),
        };
        let pos = self.pos;
        let mut tried = 0;
        let mut k = 0;
        while k < self.members.len() {
            tried += 1;
            if tried % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            if !self.members[k].is_sse() {
                k += 1;
                continue;
            }
            match self.members[k].write(&self.stream, &beat) {
                Wrote::All => k += 1,
                Wrote::Back(rest) => {
                    let m = self.members.swap_remove(k);
                    self.back(m.who, pos, rest);
                }
                Wrote::Gone => {
                    self.members.swap_remove(k);
                }
            }
        }
        let mut j = 0;
        while j < self.early.len() {
            if !self.early[j].1.is_sse() {
                j += 1;
                continue;
            }
            match self.early[j].1.write(&self.stream, &beat) {
                Wrote::All => j += 1,
                Wrote::Back(rest) => {
                    let (p, m) = self.early.swap_remove(j);
                    self.back(m.who, p, rest);
                }
                Wrote::Gone => {
                    self.early.swap_remove(j);
                }
            }
        }
    }

    /// Hands every WebSocket member back (the group is ending but its connections are
    /// not); SSE members close when the group drops them.
    pub fn release_ws(&mut self) {
        let members = std::mem::take(&mut self.members);
        let early = std::mem::take(&mut self.early);
        let all = members.into_iter().map(|m| (self.pos, m)).chain(early);
        for (p, m) in all {
            if let Joiner::Ws { conn, sub } = &m.who {
                conn.hand_back(&self.stream, *sub, p);
            }
        }
    }

    /// Drops the members whose peers (or subscriptions) have gone.
    pub fn drop_gone(&mut self) {
        let stream = &self.stream;
        self.members.retain(|m| !m.gone(stream));
        self.early.retain(|(_, m)| !m.gone(stream));
    }

    /// Ends (closes) the SSE members `why` applies to.
    pub fn end_where(&mut self, why: Ended, ends: impl Fn(&Principal) -> bool) {
        let keep = |m: &Member| {
            let Some(p) = m.principal() else { return true };
            let end = ends(p);
            if end {
                tracing::info!(principal = %p.name, reason = why.reason(), "ending SSE stream");
            }
            !end
        };
        self.members.retain(keep);
        self.early.retain(|(_, m)| keep(m));
    }

    /// Ends the members whose credentials have expired; sets the next expiry.
    pub fn end_expired(&mut self) {
        let now = Utc::now();
        self.end_where(Ended::Expired, |p| p.expires_at.is_some_and(|at| at <= now));
        self.expiry = self
            .members
            .iter()
            .chain(self.early.iter().map(|(_, m)| m))
            .filter_map(|m| m.principal()?.expires_at)
            .min();
    }
}

impl Joiner {
    fn principal(&self) -> Option<&Principal> {
        match self {
            Joiner::Sse(f) => Some(&f.principal),
            Joiner::Ws { .. } => None,
        }
    }
}
