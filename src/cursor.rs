//! The gapless feed of one stream for one subscriber, whatever the transport.
//!
//! A cursor hands out the stream's seqs strictly consecutively from its start. It
//! subscribes to the hub *before* it decides where to start, so nothing published in
//! between is lost; whatever the hub cannot supply (the receiver lagged, two commits
//! were published out of order, the subscriber resumed from an old id) it fills from
//! the recent-event cache, then from the change log. When the log no longer holds the
//! next seq, it yields a `reset` and continues live.
//!
//! `next` is cancel-safe: state changes only after its awaits complete, so a transport
//! may race it against heartbeats and shutdown in `select!`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::broker::Broker;
use crate::cache::Cache;
use crate::event::{Event, Reset, ResetReason};
use crate::hub::Subscription;
use crate::store::{Store, StoreError};

/// How many events one fill reads from the cache or the log.
const BATCH: usize = 512;

/// Where a subscriber starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only what is committed from now on.
    Live,
    /// Resume: everything after this seq (`Last-Event-ID`).
    After(u64),
    /// A resume point that is not a number: `reset` (`unknown_position`), then live.
    Unparsable,
    /// After a snapshot read at this seq, which is known to be committed.
    Snapshot(u64),
}

impl Start {
    /// Parses a client's resume point; `None` or blank means live.
    pub fn from_resume_point(raw: Option<&str>) -> Start {
        match raw.map(str::trim) {
            None | Some("") => Start::Live,
            Some(s) => s.parse().map_or(Start::Unparsable, Start::After),
        }
    }
}

/// What a cursor yields.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<Event>),
    Reset(Reset),
}

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the stream's channel closed")]
    Closed,
}

pub struct Cursor {
    sub: Subscription,
    store: Store,
    cache: Arc<Cache>,
    /// The next seq to hand out.
    next: u64,
    /// Items in order, ready to hand out.
    ready: VecDeque<Item>,
    /// Events from the hub beyond a hole, waiting for the hole to be filled.
    ahead: BTreeMap<u64, Arc<Event>>,
    /// Something between `next` and what the hub delivers must be read from the cache
    /// or the log.
    need_fill: bool,
}

impl Cursor {
    /// Subscribes to `stream`; call `seek` before reading.
    pub fn subscribe(broker: &Broker, store: &Store, stream: &str) -> Cursor {
        Cursor {
            sub: broker.subscribe(stream),
            store: store.clone(),
            cache: broker.cache.clone(),
            next: 1,
            ready: VecDeque::new(),
            ahead: BTreeMap::new(),
            need_fill: false,
        }
    }

    pub fn stream(&self) -> &str {
        self.sub.stream()
    }

    /// The last seq handed out (or skipped by a reset).
    pub fn position(&self) -> u64 {
        self.next - 1
    }

    /// Positions the cursor. A resume point that cannot be replayed queues a `reset`.
    pub async fn seek(&mut self, start: Start) -> Result<(), CursorError> {
        let stream = self.sub.stream().to_owned();
        match start {
            Start::Snapshot(n) => self.set_next(n + 1, false),
            Start::Live => {
                let last = match self.cache.newest(&stream) {
                    Some(n) => n,
                    None => self.store.bounds(&stream).await?.last,
                };
                self.set_next(last + 1, false);
            }
            Start::After(x) => {
                // Served from memory when the cache covers the resume point, so a
                // reconnect storm does not turn into a query storm.
                if self.cache.newest(&stream) == Some(x) {
                    self.set_next(x + 1, false);
                } else if self.cache.contains(&stream, x.saturating_add(1)) {
                    self.set_next(x + 1, true);
                } else {
                    let b = self.store.bounds(&stream).await?;
                    if x > b.last {
                        self.reset(ResetReason::UnknownPosition, b.first_available(), b.last);
                    } else if x + 1 < b.first_available() {
                        self.reset(ResetReason::HistoryExpired, b.first_available(), b.last);
                    } else {
                        self.set_next(x + 1, x < b.last);
                    }
                }
            }
            Start::Unparsable => {
                let b = self.store.bounds(&stream).await?;
                self.reset(ResetReason::UnknownPosition, b.first_available(), b.last);
            }
        }
        Ok(())
    }

    fn set_next(&mut self, next: u64, need_fill: bool) {
        self.next = next;
        self.need_fill = need_fill;
        self.ahead = self.ahead.split_off(&next);
    }

    fn reset(&mut self, reason: ResetReason, earliest_id: u64, last: u64) {
        metrics::counter!("zonecast_resets_total", "reason" => reason.as_str()).increment(1);
        self.ready.push_back(Item::Reset(Reset {
            reason,
            earliest_id,
            last_event_id: last,
        }));
        self.set_next(last + 1, false);
    }

    /// The next item, waiting for it if need be.
    pub async fn next(&mut self) -> Result<Item, CursorError> {
        loop {
            if let Some(it) = self.pop_ready() {
                return Ok(it);
            }
            if self.need_fill {
                self.fill().await?;
                continue;
            }
            match self.sub.receiver().recv().await {
                Ok(ev) => self.accept(ev),
                Err(RecvError::Lagged(_)) => self.need_fill = true,
                Err(RecvError::Closed) => return Err(CursorError::Closed),
            }
        }
    }

    /// The next item if it is ready without waiting or I/O, so a transport can drain
    /// everything ready into one write.
    pub fn try_next(&mut self) -> Option<Item> {
        loop {
            if let Some(it) = self.pop_ready() {
                return Some(it);
            }
            if self.need_fill {
                return None;
            }
            match self.sub.receiver().try_recv() {
                Ok(ev) => self.accept(ev),
                Err(TryRecvError::Lagged(_)) => {
                    self.need_fill = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    fn pop_ready(&mut self) -> Option<Item> {
        if let Some(it) = self.ready.pop_front() {
            return Some(it);
        }
        let ev = self.ahead.remove(&self.next)?;
        self.next += 1;
        if self
            .ahead
            .first_key_value()
            .is_some_and(|(&s, _)| s != self.next)
        {
            self.need_fill = true;
        }
        Some(Item::Event(ev))
    }

    fn accept(&mut self, ev: Arc<Event>) {
        if ev.seq < self.next {
            return; // already handed out (filled from the cache or the log)
        }
        if ev.seq == self.next {
            self.next += 1;
            self.ready.push_back(Item::Event(ev));
        } else {
            self.ahead.insert(ev.seq, ev);
            self.need_fill = true;
        }
    }

    /// Reads what follows `next` from the cache, else from the log.
    async fn fill(&mut self) -> Result<(), CursorError> {
        let stream = self.sub.stream().to_owned();
        let run = self.cache.run_from(&stream, self.next, BATCH);
        if let Some(end) = run.last().map(|e| e.seq) {
            // Everything published before we subscribed is in the cache up to its
            // newest entry; anything later reaches us through the hub.
            let caught_up = self.cache.newest(&stream).is_none_or(|n| n <= end);
            metrics::counter!("zonecast_replayed_events_total", "source" => "cache")
                .increment(run.len() as u64);
            self.push_run(run);
            self.need_fill = !caught_up || self.hole_ahead();
            return Ok(());
        }
        let events = self
            .store
            .read_from(&stream, self.next, BATCH as u64)
            .await?;
        match events.first().map(|e| e.seq) {
            Some(first) if first == self.next => {
                let full = events.len() == BATCH;
                metrics::counter!("zonecast_replayed_events_total", "source" => "log")
                    .increment(events.len() as u64);
                let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
                self.cache.insert(&events);
                self.push_run(events);
                self.need_fill = full || self.hole_ahead();
            }
            None if self.ahead.is_empty() => self.need_fill = false,
            // The log no longer holds `next` (pruned), or, defensively, a hole the log
            // cannot explain: say so rather than skip silently.
            _ => {
                let b = self.store.bounds(&stream).await?;
                self.reset(ResetReason::HistoryExpired, b.first_available(), b.last);
            }
        }
        Ok(())
    }

    fn push_run(&mut self, run: Vec<Arc<Event>>) {
        for ev in run {
            if ev.seq == self.next {
                self.next += 1;
                self.ready.push_back(Item::Event(ev));
            }
        }
        self.ahead = self.ahead.split_off(&self.next);
    }

    fn hole_ahead(&self) -> bool {
        self.ahead
            .first_key_value()
            .is_some_and(|(&s, _)| s != self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A resume point is a number (resume after it), blank (live), or anything
        /// else (an unknown position); never a panic.
        #[test]
        fn any_resume_point_has_a_defined_start(raw in proptest::option::of(".{0,64}")) {
            let start = Start::from_resume_point(raw.as_deref());
            let trimmed = raw.as_deref().map(str::trim);
            let expected = match trimmed {
                None | Some("") => Start::Live,
                Some(t) => t.parse().map_or(Start::Unparsable, Start::After),
            };
            proptest::prop_assert_eq!(start, expected);
        }

        #[test]
        fn digits_resume_after_them(n in proptest::num::u64::ANY) {
            proptest::prop_assert_eq!(Start::from_resume_point(Some(&format!(" {n} "))), Start::After(n));
        }
    }
}
