//! The gapless feed of one stream for one subscriber, whatever the transport.
//!
//! A cursor hands out the stream's seqs strictly consecutively from its start. It
//! subscribes to the broker *before* it decides where to start, so nothing published in
//! between is lost; whatever the live channel cannot supply (the receiver lagged, two
//! commits were published out of order, the subscriber resumed from an old id) it fills
//! from the node's recent-event cache, then from the change log (`History`). When the
//! log no longer holds the next seq, it yields a `reset` and continues live.
//!
//! `next` is cancel-safe: state changes only after its awaits complete, so a transport
//! may race it against heartbeats and shutdown in `select!`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::broker::Tap;
use crate::domain::{Event, LogBounds, Reset, ResetReason, StreamKey};
use crate::store::{Store, StoreError};

/// How many events one fill reads from the cache or the log.
pub const BATCH: usize = 512;

/// The change log as a cursor reads it. The store is the real one; unit tests give an
/// in-memory log.
pub trait History: Send + Sync {
    fn bounds<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, Result<LogBounds, StoreError>>;

    /// Up to `limit` events of `stream` with seq ≥ `from`, in order.
    fn read_from<'a>(
        &'a self,
        stream: &'a StreamKey,
        from: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>>;
}

impl History for Store {
    fn bounds<'a>(&'a self, stream: &'a StreamKey) -> BoxFuture<'a, Result<LogBounds, StoreError>> {
        Box::pin(Store::bounds(self, stream))
    }

    fn read_from<'a>(
        &'a self,
        stream: &'a StreamKey,
        from: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
        Box::pin(Store::read_from(self, stream, from, limit))
    }
}

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
    tap: Tap,
    history: Arc<dyn History>,
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
    /// A cursor on `tap`'s stream; call `seek` before reading.
    pub fn new(tap: Tap, history: Arc<dyn History>) -> Cursor {
        Cursor {
            tap,
            history,
            next: 1,
            ready: VecDeque::new(),
            ahead: BTreeMap::new(),
            need_fill: false,
        }
    }

    pub fn stream(&self) -> &StreamKey {
        self.tap.stream()
    }

    /// The last seq handed out (or skipped by a reset).
    pub fn position(&self) -> u64 {
        self.next - 1
    }

    async fn bounds(&self) -> Result<LogBounds, CursorError> {
        self.tap.replays.queried_log();
        Ok(self.history.bounds(self.tap.stream()).await?)
    }

    /// Positions the cursor. A resume point that cannot be replayed queues a `reset`.
    pub async fn seek(&mut self, start: Start) -> Result<(), CursorError> {
        let stream = self.tap.stream().clone();
        let cache = self.tap.cache.clone();
        match start {
            Start::Snapshot(n) => self.set_next(n + 1, false),
            Start::Live => {
                let last = match cache.newest(&stream) {
                    Some(n) => n,
                    None => self.bounds().await?.last,
                };
                self.set_next(last + 1, false);
            }
            Start::After(x) => {
                // Served from memory when the cache covers the resume point, so a
                // reconnect storm does not turn into a query storm.
                if cache.newest(&stream) == Some(x) {
                    self.set_next(x + 1, false);
                } else if cache.contains(&stream, x.saturating_add(1)) {
                    self.set_next(x + 1, true);
                } else {
                    let b = self.bounds().await?;
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
                let b = self.bounds().await?;
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
        self.tap.replays.reset(reason);
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
            match self.tap.live.receiver().recv().await {
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
            match self.tap.live.receiver().try_recv() {
                Ok(ev) => self.accept(ev),
                Err(TryRecvError::Lagged(_)) => {
                    self.need_fill = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Nothing to hand out and nothing to fill: every seq up to `position()` has been
    /// handed out, and the next can only come live. Meaningful right after `try_next`
    /// returned `None`.
    pub fn caught_up(&self) -> bool {
        self.ready.is_empty() && self.ahead.is_empty() && !self.need_fill
    }

    /// Something arrived that has not been handed out yet (without taking it).
    pub fn pending(&mut self) -> bool {
        !self.ready.is_empty() || !self.tap.live.receiver().is_empty()
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
        let stream = self.tap.stream().clone();
        let cache = self.tap.cache.clone();
        let run = cache.run_from(&stream, self.next, BATCH);
        if let Some(end) = run.last().map(|e| e.seq) {
            // Everything published before we subscribed is in the cache up to its
            // newest entry; anything later reaches us through the hub.
            let caught_up = cache.newest(&stream).is_none_or(|n| n <= end);
            let n = run.len() as u64;
            self.tap.replays.served_from_cache(n);
            self.push_run(run);
            self.need_fill = !caught_up || self.hole_ahead();
            return Ok(());
        }
        self.tap.replays.queried_log();
        let events = self
            .history
            .read_from(&stream, self.next, BATCH as u64)
            .await?;
        match events.first().map(|e| e.seq) {
            Some(first) if first == self.next => {
                let full = events.len() == BATCH;
                let n = events.len() as u64;
                self.tap.replays.served_from_log(n);
                let events: Vec<Arc<Event>> = events.into_iter().map(Arc::new).collect();
                cache.insert(&events);
                self.push_run(events);
                self.need_fill = full || self.hole_ahead();
            }
            None if self.ahead.is_empty() => self.need_fill = false,
            // The log no longer holds `next` (pruned), or, defensively, a hole the log
            // cannot explain: say so rather than skip silently.
            _ => {
                let b = self.bounds().await?;
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
    use std::sync::Mutex;
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::broker::Local;
    use crate::domain::EventKind;

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

    fn stream() -> StreamKey {
        StreamKey::Zone(1)
    }

    /// Rendering is a pure function of its inputs, so the log and the hub can each
    /// render their own copy of an event.
    fn event(seq: u64) -> Event {
        let at: DateTime<Utc> = DateTime::UNIX_EPOCH;
        Event::render(
            &stream(),
            seq,
            EventKind::StockUpdated,
            at,
            format!("{{\"n\":{seq}}}"),
        )
    }

    /// The change log of one stream, in memory: committed seqs, the oldest kept.
    #[derive(Default)]
    struct MemLog {
        inner: Mutex<MemInner>,
    }

    #[derive(Default)]
    struct MemInner {
        committed: BTreeMap<u64, ()>,
        last: u64,
        reads: Vec<u64>,
    }

    impl MemLog {
        fn inner(&self) -> std::sync::MutexGuard<'_, MemInner> {
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Commits seqs up to `last`.
        fn commit_to(&self, last: u64) {
            let mut m = self.inner();
            for seq in m.last + 1..=last {
                m.committed.insert(seq, ());
            }
            m.last = m.last.max(last);
        }

        /// Retention: forgets everything before `first_kept`.
        fn prune_before(&self, first_kept: u64) {
            let mut m = self.inner();
            m.committed = m.committed.split_off(&first_kept);
        }

        /// The `from` of every `read_from` so far.
        fn reads(&self) -> Vec<u64> {
            self.inner().reads.clone()
        }
    }

    impl History for MemLog {
        fn bounds<'a>(&'a self, _: &'a StreamKey) -> BoxFuture<'a, Result<LogBounds, StoreError>> {
            let m = self.inner();
            let b = LogBounds {
                earliest: m.committed.first_key_value().map(|(&s, _)| s),
                last: m.last,
            };
            Box::pin(async move { Ok(b) })
        }

        fn read_from<'a>(
            &'a self,
            _: &'a StreamKey,
            from: u64,
            limit: u64,
        ) -> BoxFuture<'a, Result<Vec<Event>, StoreError>> {
            let mut m = self.inner();
            m.reads.push(from);
            let events: Vec<Event> = m
                .committed
                .range(from..)
                .take(limit as usize)
                .map(|(&s, _)| event(s))
                .collect();
            Box::pin(async move { Ok(events) })
        }
    }

    /// One node's hub and cache, a log, and helpers to drive them.
    struct Rig {
        local: Local,
        log: Arc<MemLog>,
    }

    impl Rig {
        fn new(bus: usize, cache_per_stream: usize) -> Rig {
            Rig {
                local: Local::new(bus, cache_per_stream, 1 << 20),
                log: Arc::default(),
            }
        }

        fn cursor(&self) -> Cursor {
            Cursor::new(self.local.subscribe(&stream()), self.log.clone())
        }

        /// Publishes committed events, in the order given.
        fn publish(&self, seqs: &[u64]) {
            let events: Vec<Arc<Event>> = seqs.iter().map(|&s| Arc::new(event(s))).collect();
            self.local.deliver(&events);
        }

        /// Commits and publishes `from..=to`.
        fn write(&self, from: u64, to: u64) {
            self.log.commit_to(to);
            self.publish(&(from..=to).collect::<Vec<_>>());
        }
    }

    fn label(item: &Item) -> String {
        match item {
            Item::Event(ev) => ev.seq.to_string(),
            Item::Reset(r) => format!(
                "reset {} {}..{}",
                r.reason.as_str(),
                r.earliest_id,
                r.last_event_id
            ),
        }
    }

    /// The next `n` items, failing fast if the cursor waits for one.
    async fn take(c: &mut Cursor, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let item = tokio::time::timeout(Duration::from_secs(5), c.next())
                .await
                .expect("the cursor yields without waiting")
                .expect("the cursor reads");
            out.push(label(&item));
        }
        out
    }

    /// Asserts that nothing more is ready: `next` would wait for the hub.
    async fn assert_waits(c: &mut Cursor) {
        let more = tokio::time::timeout(Duration::from_millis(20), c.next()).await;
        assert!(
            more.is_err(),
            "unexpected item {:?}",
            more.map(|r| r.map(|i| label(&i)))
        );
    }

    fn strs(seqs: impl IntoIterator<Item = u64>) -> Vec<String> {
        seqs.into_iter().map(|s| s.to_string()).collect()
    }

    // --- accept -----------------------------------------------------------------

    #[tokio::test]
    async fn live_events_in_order_are_handed_out_as_they_come() {
        let rig = Rig::new(16, 16);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        assert_eq!(c.position(), 0);
        rig.write(1, 3);
        assert_eq!(take(&mut c, 3).await, strs(1..=3));
        assert_waits(&mut c).await;
        assert_eq!(c.position(), 3);
        assert!(rig.log.reads().is_empty(), "no fill was needed");
    }

    /// `pending` says something arrived without taking it; `caught_up` once all of it
    /// was handed out.
    #[tokio::test]
    async fn pending_looks_without_taking_and_caught_up_follows_the_last() {
        let rig = Rig::new(16, 16);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        assert!(!c.pending());
        rig.write(1, 2);
        assert!(c.pending());
        assert!(c.pending(), "looking took nothing");
        assert_eq!(c.try_next().map(|i| label(&i)), Some("1".into()));
        assert!(c.pending());
        assert_eq!(c.try_next().map(|i| label(&i)), Some("2".into()));
        assert!(c.try_next().is_none());
        assert!(!c.pending() && c.caught_up());
        assert_eq!(c.position(), 2);
    }

    #[tokio::test]
    async fn an_event_already_handed_out_is_dropped() {
        let rig = Rig::new(16, 16);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.write(1, 2);
        rig.publish(&[2, 1]); // published again, e.g. by a sweep
        rig.write(3, 3);
        assert_eq!(take(&mut c, 3).await, strs(1..=3));
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn out_of_order_publish_is_reordered_from_the_cache() {
        // Two commits published in the other order: 2 arrives first and waits ahead;
        // the hole (1) is in the cache, because publishing caches before it fans out.
        let rig = Rig::new(16, 16);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.log.commit_to(2);
        rig.publish(&[2]);
        assert!(c.try_next().is_none(), "2 waits for 1");
        assert!(c.need_fill);
        rig.publish(&[1]);
        assert_eq!(take(&mut c, 2).await, strs(1..=2));
        assert_waits(&mut c).await;
        let r = c.tap.replays.counts();
        assert_eq!((r.from_cache, r.from_log), (2, 0));
        assert!(rig.log.reads().is_empty());
    }

    #[tokio::test]
    async fn a_hole_ahead_is_filled_from_the_log_when_the_cache_lacks_it() {
        // 1 is committed but not yet published (and so not cached) when 2 arrives.
        let rig = Rig::new(16, 16);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.log.commit_to(2);
        rig.publish(&[2]);
        assert_eq!(take(&mut c, 2).await, strs(1..=2));
        assert_eq!(rig.log.reads(), vec![1]);
        // Its late publish is a duplicate.
        rig.publish(&[1]);
        rig.write(3, 3);
        assert_eq!(take(&mut c, 1).await, strs([3]));
        assert_waits(&mut c).await;
    }

    // --- pop_ready --------------------------------------------------------------

    #[tokio::test]
    async fn events_ahead_are_released_in_order_and_a_second_hole_is_filled() {
        // Ahead: 2, 3 and 5; 1 and 4 are holes the log fills.
        let rig = Rig::new(16, 0);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.log.commit_to(5);
        rig.publish(&[2, 3, 5]);
        // The first fill reads 1..=5 from the log at once.
        assert_eq!(take(&mut c, 5).await, strs(1..=5));
        assert_eq!(rig.log.reads(), vec![1]);
        assert!(c.ahead.is_empty());
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn releasing_ahead_up_to_a_hole_asks_for_a_fill() {
        let rig = Rig::new(16, 0);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        // What the hub delivered beyond the hole at 2 and the one at 4.
        c.accept(Arc::new(event(1)));
        c.accept(Arc::new(event(3)));
        c.accept(Arc::new(event(5)));
        assert!(c.need_fill);
        c.need_fill = false;
        assert_eq!(c.try_next().map(|i| label(&i)), Some("1".into()));
        assert_eq!(c.try_next().map(|i| label(&i)), None, "2 is missing");
        c.next = 3; // as if a fill handed out 2
        assert_eq!(c.try_next().map(|i| label(&i)), Some("3".into()));
        assert!(c.need_fill, "releasing 3 finds the hole at 4");
        assert_eq!(c.try_next().map(|i| label(&i)), None);
    }

    // --- fill: the cache --------------------------------------------------------

    #[tokio::test]
    async fn lag_beyond_the_bus_is_filled_from_the_cache() {
        let rig = Rig::new(4, 64);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.write(1, 20); // the receiver keeps 17..=20 and lags
        assert_eq!(take(&mut c, 20).await, strs(1..=20));
        assert_waits(&mut c).await;
        let r = c.tap.replays.counts();
        assert_eq!((r.from_cache, r.from_log), (20, 0));
        assert!(rig.log.reads().is_empty());
    }

    #[tokio::test]
    async fn a_cache_run_ending_at_a_hole_is_continued_from_the_log() {
        // The cache holds 1..=3 and 5 (4 committed, published later): the run stops
        // at 3, the cache is not caught up, so the next fill reads 4.. from the log.
        let rig = Rig::new(16, 64);
        let mut c = rig.cursor();
        c.seek(Start::Snapshot(0)).await.unwrap();
        rig.log.commit_to(5);
        let cached: Vec<Arc<Event>> = [1, 2, 3, 5].map(|s| Arc::new(event(s))).into();
        c.tap.cache.insert(&cached);
        c.need_fill = true;
        assert_eq!(take(&mut c, 5).await, strs(1..=5));
        assert_eq!(rig.log.reads(), vec![4]);
        let r = c.tap.replays.counts();
        assert_eq!((r.from_cache, r.from_log), (3, 2));
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn a_cache_run_that_leaves_a_hole_ahead_fills_again() {
        // The cache is caught up to its newest (3), but the hub delivered 6 ahead of
        // the cache (an event from another node): 4 and 5 come from the log.
        let rig = Rig::new(16, 64);
        let mut c = rig.cursor();
        c.seek(Start::Snapshot(0)).await.unwrap();
        rig.log.commit_to(6);
        let cached: Vec<Arc<Event>> = [1, 2, 3].map(|s| Arc::new(event(s))).into();
        c.tap.cache.insert(&cached);
        c.accept(Arc::new(event(6)));
        assert_eq!(take(&mut c, 6).await, strs(1..=6));
        assert_eq!(rig.log.reads(), vec![4]);
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn a_long_cache_run_is_served_in_batches() {
        let total = BATCH as u64 * 2 + 10;
        let rig = Rig::new(4, BATCH * 4);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.write(1, total);
        assert_eq!(take(&mut c, total as usize).await, strs(1..=total));
        assert_waits(&mut c).await;
        let r = c.tap.replays.counts();
        assert_eq!((r.from_cache, r.from_log), (total, 0));
    }

    // --- fill: the log ----------------------------------------------------------

    #[tokio::test]
    async fn lag_beyond_the_cache_is_filled_from_the_log_and_cached() {
        let rig = Rig::new(4, 8);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.write(1, 20); // the cache keeps 13..=20, the receiver 17..=20
        assert_eq!(take(&mut c, 20).await, strs(1..=20));
        assert_waits(&mut c).await;
        assert_eq!(rig.log.reads(), vec![1]);
        let r = c.tap.replays.counts();
        assert_eq!((r.from_cache, r.from_log), (0, 20));
        // What the log returned is cached for the next subscriber (newest 8 kept).
        assert!(c.tap.cache.contains(&stream(), 13));
        assert!(!c.tap.cache.contains(&stream(), 12));
    }

    #[tokio::test]
    async fn a_full_batch_from_the_log_reads_the_next_one() {
        let total = BATCH as u64 * 2 + 10;
        let rig = Rig::new(4, 0);
        let mut c = rig.cursor();
        c.seek(Start::Snapshot(0)).await.unwrap();
        rig.write(1, total);
        assert_eq!(take(&mut c, total as usize).await, strs(1..=total));
        let b = BATCH as u64;
        assert_eq!(rig.log.reads(), vec![1, b + 1, 2 * b + 1]);
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn a_log_batch_that_leaves_a_hole_ahead_fills_again() {
        // The hub delivered 10 while the log held only up to 7: after 1..=7 the
        // cursor still lacks 8 and 9, and finds them once they are committed.
        let rig = Rig::new(16, 0);
        let mut c = rig.cursor();
        c.seek(Start::Snapshot(0)).await.unwrap();
        rig.log.commit_to(7);
        c.accept(Arc::new(event(10)));
        let first: Vec<String> = std::iter::from_fn(|| c.try_next().map(|i| label(&i))).collect();
        assert!(first.is_empty(), "nothing before a fill");
        c.fill().await.unwrap();
        assert!(c.need_fill, "8 and 9 are still missing");
        rig.log.commit_to(10);
        assert_eq!(take(&mut c, 10).await, strs(1..=10));
        assert_eq!(rig.log.reads(), vec![1, 8]);
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn a_lag_on_events_already_handed_out_reads_nothing_new() {
        // The receiver lagged on 1..=5, which a fill had handed out already: the
        // next fill finds nothing after 5 and the cursor waits live.
        let rig = Rig::new(2, 0);
        let mut c = rig.cursor();
        rig.write(1, 5);
        c.seek(Start::After(0)).await.unwrap();
        assert_eq!(take(&mut c, 5).await, strs(1..=5));
        assert_waits(&mut c).await;
        assert_eq!(rig.log.reads(), vec![1, 6]);
        assert!(!c.need_fill);
        rig.write(6, 6);
        assert_eq!(take(&mut c, 1).await, strs([6]));
    }

    #[tokio::test]
    async fn lag_into_pruned_history_yields_a_reset_then_live() {
        let rig = Rig::new(4, 0);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        rig.write(1, 20);
        rig.log.prune_before(10);
        assert_eq!(take(&mut c, 1).await, vec!["reset history_expired 10..20"]);
        assert_eq!(c.position(), 20);
        assert_waits(&mut c).await;
        rig.write(21, 21);
        assert_eq!(take(&mut c, 1).await, strs([21]));
    }

    #[tokio::test]
    async fn a_hole_the_log_cannot_explain_yields_a_reset() {
        // The hub delivered 5 but the log holds nothing after 2: say so, never skip.
        let rig = Rig::new(16, 0);
        let mut c = rig.cursor();
        rig.log.commit_to(2);
        c.seek(Start::After(2)).await.unwrap();
        rig.publish(&[5]);
        assert_eq!(take(&mut c, 1).await, vec!["reset history_expired 1..2"]);
        assert_eq!(c.position(), 2);
        // The cursor continues from the log's last seq; 5 waits for 3 and 4.
        rig.log.commit_to(5);
        rig.publish(&[3, 4]);
        assert_eq!(take(&mut c, 3).await, strs(3..=5));
        assert_waits(&mut c).await;
    }

    // --- try_next ---------------------------------------------------------------

    #[tokio::test]
    async fn try_next_drains_what_is_ready_and_never_does_io() {
        let rig = Rig::new(4, 0);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        assert!(c.try_next().is_none(), "empty channel");
        rig.write(1, 3);
        let got: Vec<String> = std::iter::from_fn(|| c.try_next().map(|i| label(&i))).collect();
        assert_eq!(got, strs(1..=3));
        rig.write(4, 12); // lags
        assert!(c.try_next().is_none(), "a lag needs a fill, which is I/O");
        assert!(c.need_fill);
        assert!(c.try_next().is_none(), "still waiting for the fill");
        assert!(rig.log.reads().is_empty());
        assert_eq!(take(&mut c, 9).await, strs(4..=12));
    }

    // --- seek -------------------------------------------------------------------

    #[tokio::test]
    async fn seek_live_takes_the_newest_cached_seq_without_a_query() {
        let rig = Rig::new(16, 16);
        rig.write(1, 4);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        assert_eq!(c.position(), 4);
        assert_eq!(c.tap.replays.counts().log_queries, 0);
    }

    #[tokio::test]
    async fn seek_live_asks_the_log_when_nothing_is_cached() {
        let rig = Rig::new(16, 0);
        rig.write(1, 4);
        let mut c = rig.cursor();
        c.seek(Start::Live).await.unwrap();
        assert_eq!(c.position(), 4);
        assert_eq!(c.tap.replays.counts().log_queries, 1);
        assert!(!c.need_fill);
    }

    #[tokio::test]
    async fn seek_snapshot_starts_after_it_and_drops_what_it_covers() {
        let rig = Rig::new(16, 16);
        let mut c = rig.cursor();
        rig.write(1, 3); // delivered before the snapshot's seq was known
        c.seek(Start::Snapshot(2)).await.unwrap();
        assert_eq!(c.position(), 2);
        assert_eq!(c.tap.replays.counts().log_queries, 0);
        assert_eq!(take(&mut c, 1).await, strs([3]));
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn seek_to_the_newest_cached_seq_is_live_without_a_query() {
        let rig = Rig::new(16, 16);
        rig.write(1, 4);
        let mut c = rig.cursor();
        c.seek(Start::After(4)).await.unwrap();
        assert_eq!(c.position(), 4);
        assert!(!c.need_fill);
        assert_eq!(c.tap.replays.counts().log_queries, 0);
    }

    #[tokio::test]
    async fn seek_into_the_cache_replays_from_it_without_a_query() {
        let rig = Rig::new(16, 16);
        rig.write(1, 6);
        let mut c = rig.cursor();
        c.seek(Start::After(2)).await.unwrap();
        assert_eq!(take(&mut c, 4).await, strs(3..=6));
        assert_waits(&mut c).await;
        let r = c.tap.replays.counts();
        assert_eq!((r.log_queries, r.from_cache), (0, 4));
    }

    #[tokio::test]
    async fn seek_beyond_the_cache_replays_from_the_log() {
        let rig = Rig::new(16, 2);
        rig.write(1, 6); // cached: 5, 6
        let mut c = rig.cursor();
        c.seek(Start::After(1)).await.unwrap();
        assert_eq!(take(&mut c, 5).await, strs(2..=6));
        assert_eq!(rig.log.reads(), vec![2]);
        assert_waits(&mut c).await;
    }

    #[tokio::test]
    async fn seek_to_the_last_logged_seq_needs_no_fill() {
        let rig = Rig::new(16, 0);
        rig.write(1, 6);
        let mut c = rig.cursor();
        c.seek(Start::After(6)).await.unwrap();
        assert!(!c.need_fill);
        assert_eq!(c.position(), 6);
        assert_waits(&mut c).await;
        assert!(rig.log.reads().is_empty());
    }

    #[tokio::test]
    async fn seek_into_the_future_resets_with_unknown_position() {
        let rig = Rig::new(16, 0);
        rig.write(1, 6);
        let mut c = rig.cursor();
        c.seek(Start::After(99)).await.unwrap();
        assert_eq!(take(&mut c, 1).await, vec!["reset unknown_position 1..6"]);
        assert_eq!(c.position(), 6);
        rig.write(7, 7);
        assert_eq!(take(&mut c, 1).await, strs([7]));
    }

    #[tokio::test]
    async fn seek_before_the_kept_history_resets_with_history_expired() {
        let rig = Rig::new(16, 0);
        rig.write(1, 6);
        rig.log.prune_before(4);
        let mut c = rig.cursor();
        c.seek(Start::After(2)).await.unwrap();
        assert_eq!(take(&mut c, 1).await, vec!["reset history_expired 4..6"]);
        // The oldest kept event's predecessor is still a valid resume point.
        let mut c = rig.cursor();
        c.seek(Start::After(3)).await.unwrap();
        assert_eq!(take(&mut c, 3).await, strs(4..=6));
    }

    #[tokio::test]
    async fn seek_from_an_unparsable_id_resets_with_unknown_position() {
        let rig = Rig::new(16, 16);
        rig.write(1, 2);
        let mut c = rig.cursor();
        c.seek(Start::from_resume_point(Some("abc"))).await.unwrap();
        assert_eq!(take(&mut c, 1).await, vec!["reset unknown_position 1..2"]);
        assert_waits(&mut c).await;
    }
}
