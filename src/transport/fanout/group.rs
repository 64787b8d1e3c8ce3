//! One stream's group: its members, SSE or WebSocket, and the rules for joining,
//! writing a batch and handing back (see the module above for the promise they keep).

use std::cell::Cell;
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
use crate::transport::batch::MAX_CHUNK;
use crate::transport::send::{Sent, try_send_past_tokio};
use crate::transport::ws_socket::{self, Delivered};
use crate::transport::{Delivery, render};

/// Sockets written between two yields to the runtime (and two looks at the cursor for
/// what arrived meanwhile): a pass over ten thousand members must not hold a worker
/// for its whole length.
pub(super) const YIELD_EVERY: usize = 256;

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

    /// The events (not resets) among the frames after seq `p`.
    fn count_after(frames: &[Frame], p: u64) -> u64 {
        frames.iter().filter(|f| f.after > p && !f.reset).count() as u64
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
    /// The stream position it has been written up to (for an early member, the seq
    /// its own cursor wrote last).
    at: u64,
    /// A WebSocket member's view of its connection's subscriptions (`WsConn::deliver`).
    seen: Cell<u64>,
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
    fn new(who: Joiner, at: u64, shared: &Arc<Shared>, stats: &Arc<Stats>) -> Self {
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
            at,
            seen: Cell::new(u64::MAX),
            _place: Place {
                watcher,
                stats: stats.clone(),
            },
        }
    }

    fn write(&self, stream: &StreamKey, batch: &Batch) -> Wrote {
        match &self.who {
            // Past tokio (`try_send_past_tokio`): one that would block is handed back.
            Joiner::Sse(f) => match try_send_past_tokio(&f.conn.tcp, &batch.sse) {
                Sent::All => Wrote::All,
                Sent::Part(n) => Wrote::Back(batch.sse.slice(n..)),
                Sent::Gone => Wrote::Gone,
            },
            Joiner::Ws { conn, sub } => match conn.deliver(stream, *sub, &self.seen, &batch.ws) {
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
    /// Following the group: each has been written up to its `at`, at most `pos`
    /// (behind it only if it was written before a pass took more).
    pub members: Vec<Member>,
    /// Joined ahead of the group (their own cursor saw a seq first): each waits, with
    /// the seq it wrote last as its `at`, until the group passes it.
    pub early: Vec<Member>,
    /// The seq the group's cursor handed out last.
    pub pos: u64,
    /// The frames after the furthest-behind member's position, oldest first: bounded
    /// by what two passes take.
    pub frames: Vec<Frame>,
    /// No member is behind this position (as of the last pass's end).
    pub low: u64,
    /// A reset was taken since the last pass ended.
    pub reset_seen: bool,
    /// Sockets written between two looks at the cursor (`YIELD_EVERY`; tests lower
    /// it).
    pub look_every: usize,
    pub delivery: Delivery,
    /// The earliest expiry of a member's credentials.
    pub expiry: Option<DateTime<Utc>>,
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.early.is_empty()
    }

    fn member(&self, who: Joiner, at: u64) -> Member {
        Member::new(who, at, &self.shared, &self.delivery.stats)
    }

    /// A member has not been written everything the group took.
    pub fn lagging(&self) -> bool {
        self.low < self.pos
    }

    /// Takes one item from the group's cursor, to be written by the pass under way or
    /// the next one. Returns its size on the wire (SSE).
    pub fn take(&mut self, item: &Item) -> usize {
        self.delivery.delivered(item);
        let f = Frame::of(&self.stream, item);
        let n = f.sse.len();
        self.reset_seen |= f.reset;
        self.pos = f.after;
        self.frames.push(f);
        n
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
            let m = self.member(who, p);
            if p == self.pos {
                self.members.push(m);
            } else {
                self.early.push(m);
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
        let m = self.member(who, p);
        self.bring_level(m, &Batch::events(&events), behind);
    }

    /// Writes `m` the batch (of `events` events) that takes it from its `at` to the
    /// group's position: a member from then on, or handed back where it stands.
    fn bring_level(&mut self, mut m: Member, batch: &Batch, events: u64) {
        match m.write(&self.stream, batch) {
            Wrote::All => {
                self.count_sent(&m, events);
                m.at = self.pos;
                self.members.push(m);
            }
            Wrote::Back(rest) if rest.is_empty() => self.back(m.who, m.at, rest),
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

    /// One pass: writes every member what it has not been written yet, and every
    /// early member the group has passed the part after its seq. Every `look_every`
    /// sockets it takes what `more` has ready (up to `MAX_CHUNK` bytes a pass), so an
    /// event that arrives mid-pass reaches the members not yet written in this pass
    /// (and the others in the next, which follows at once): under a steady stream of
    /// changes every member is written at most one pass after a commit, not two.
    pub async fn fan_out(&mut self, mut more: impl FnMut() -> Option<Item>) {
        // The batch from each position met in this pass, for the group's current `pos`.
        let mut batches: Vec<(u64, Batch, u64)> = Vec::new();
        let mut head = self.pos;
        let mut taken = 0;
        let mut k = 0;
        let mut tried = 0;
        // Events written, `[sse, ws]`: counted once per batch, not per member.
        let mut written = [0u64; 2];
        while k < self.members.len() {
            let at = self.members[k].at;
            if at >= self.pos {
                k += 1;
                continue;
            }
            if head != self.pos {
                batches.clear();
                head = self.pos;
            }
            let i = match batches.iter().position(|b| b.0 == at) {
                Some(i) => i,
                None => {
                    let b = Batch::after(&self.frames, at);
                    batches.push((at, b, Batch::count_after(&self.frames, at)));
                    batches.len() - 1
                }
            };
            let (_, batch, events) = &batches[i];
            match self.members[k].write(&self.stream, batch) {
                Wrote::All => {
                    written[usize::from(!self.members[k].is_sse())] += *events;
                    self.members[k].at = head;
                    k += 1;
                }
                Wrote::Back(rest) => {
                    let m = self.members.swap_remove(k);
                    // A socket that took part of the batch has the rest to write, and
                    // goes on after it; one that took none of it goes on from before.
                    let to = if rest.is_empty() { at } else { head };
                    self.back(m.who, to, rest);
                }
                Wrote::Gone => {
                    self.members.swap_remove(k);
                    self.delivery.stats.send_error();
                }
            }
            tried += 1;
            if tried % self.look_every == 0 {
                tokio::task::yield_now().await;
                while taken < MAX_CHUNK {
                    let Some(item) = more() else { break };
                    taken += self.take(&item);
                }
            }
        }
        self.delivery.stats.sent(Transport::Sse, written[0]);
        self.delivery.stats.sent(Transport::Ws, written[1]);
        // A reset moves the position without a seq: nobody ahead can be matched
        // against it, so they catch up on their own.
        let reset = std::mem::take(&mut self.reset_seen);
        let mut j = 0;
        while j < self.early.len() {
            let p = self.early[j].at;
            if p >= self.pos && !reset {
                j += 1;
                continue;
            }
            let m = self.early.swap_remove(j);
            if reset {
                self.back(m.who, p, Bytes::new());
                continue;
            }
            let batch = Batch::after(&self.frames, p);
            self.bring_level(m, &batch, Batch::count_after(&self.frames, p));
        }
        self.low = self.members.iter().map(|m| m.at).min().unwrap_or(self.pos);
        let low = self.low;
        self.fanout
            .state()
            .service
            .pace()
            .written(&self.stream, low, self.members.len());
        self.frames.retain(|f| f.after > low);
        self.delivery.written();
    }

    /// Writes a heartbeat to every SSE member (WebSocket connections ping on their
    /// own); a socket that cannot take it whole goes on on its own with the rest.
    pub async fn heartbeat(&mut self) {
        let beat = Batch {
            sse: render::heartbeat(),
            ws: Bytes::new(),
        };
        let mut tried = 0;
        for early in [false, true] {
            // Taken out while written, so that hand-backs may borrow the group.
            let list = if early {
                &mut self.early
            } else {
                &mut self.members
            };
            let mut list = std::mem::take(list);
            let mut k = 0;
            while k < list.len() {
                tried += 1;
                if tried % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                }
                if !list[k].is_sse() {
                    k += 1;
                    continue;
                }
                match list[k].write(&self.stream, &beat) {
                    Wrote::All => k += 1,
                    Wrote::Back(rest) => {
                        let m = list.swap_remove(k);
                        self.back(m.who, m.at, rest);
                    }
                    Wrote::Gone => {
                        list.swap_remove(k);
                    }
                }
            }
            *(if early {
                &mut self.early
            } else {
                &mut self.members
            }) = list;
        }
    }

    /// Hands every WebSocket member back (the group is ending but its connections are
    /// not); SSE members close when the group drops them.
    pub fn release_ws(&mut self) {
        let members = std::mem::take(&mut self.members);
        let early = std::mem::take(&mut self.early);
        for m in members.into_iter().chain(early) {
            if let Joiner::Ws { conn, sub } = &m.who {
                conn.hand_back(&self.stream, *sub, m.at);
            }
        }
    }

    /// Drops the members whose peers (or subscriptions) have gone.
    pub fn drop_gone(&mut self) {
        let stream = &self.stream;
        self.members.retain(|m| !m.gone(stream));
        self.early.retain(|m| !m.gone(stream));
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
        self.early.retain(keep);
    }

    /// Ends the members whose credentials have expired; sets the next expiry.
    pub fn end_expired(&mut self) {
        let now = Utc::now();
        self.end_where(Ended::Expired, |p| p.expires_at.is_some_and(|at| at <= now));
        self.expiry = self
            .members
            .iter()
            .chain(self.early.iter())
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
