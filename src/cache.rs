//! Recent events of each stream, kept in memory so that replays, lag recovery and
//! reconnect storms are served without a query. Bounded per stream and in total: past
//! the total, the stream used least recently is forgotten whole (its next replay reads
//! the log), so writers creating many streams (a notification for each of a million
//! users) cannot grow it without end.
//!
//! The cache may hold holes (events are inserted in publish order, which can differ
//! from seq order); it only ever answers with a consecutive run, never across a hole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::domain::{Event, StreamKey};

struct Run {
    events: BTreeMap<u64, Arc<Event>>,
    /// When it was last inserted into or read, on the cache's own clock.
    used: u64,
}

#[derive(Default)]
struct Streams {
    runs: HashMap<StreamKey, Run>,
    /// Events held, over all streams.
    total: usize,
    clock: u64,
}

impl Streams {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

pub struct Cache {
    per_stream: usize,
    max_total: usize,
    /// std `Mutex`: held for in-memory map work only, never across an `.await`.
    streams: Mutex<Streams>,
}

impl Cache {
    /// At most `per_stream` events of each stream and `max_total` in all.
    pub fn new(per_stream: usize, max_total: usize) -> Self {
        Cache {
            per_stream: per_stream.min(max_total),
            max_total,
            streams: Mutex::default(),
        }
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        // Each operation leaves the maps consistent, so a poisoned lock is still usable.
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, events: &[Arc<Event>]) {
        if self.per_stream == 0 || events.is_empty() {
            return;
        }
        let mut s = self.streams();
        for ev in events {
            let used = s.tick();
            let run = s.runs.entry(ev.stream.clone()).or_insert_with(|| Run {
                events: BTreeMap::new(),
                used,
            });
            run.used = used;
            let before = run.events.len();
            run.events.insert(ev.seq, ev.clone());
            while run.events.len() > self.per_stream {
                run.events.pop_first();
            }
            let after = run.events.len();
            s.total = s.total + after - before;
        }
        while s.total > self.max_total {
            // Only on overflow: a scan for the stream used least recently.
            let Some(oldest) = s
                .runs
                .iter()
                .min_by_key(|(_, r)| r.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(run) = s.runs.remove(&oldest) {
                s.total -= run.events.len();
            }
        }
    }

    /// Consecutive events of `stream` starting exactly at `from`, at most `max`.
    pub fn run_from(&self, stream: &StreamKey, from: u64, max: usize) -> Vec<Arc<Event>> {
        let mut s = self.streams();
        let used = s.tick();
        let Some(run) = s.runs.get_mut(stream) else {
            return Vec::new();
        };
        run.used = used;
        run.events
            .range(from..)
            .zip(from..)
            .take_while(|((seq, _), want)| *seq == want)
            .take(max)
            .map(|((_, ev), _)| ev.clone())
            .collect()
    }

    /// The newest seq cached for `stream`: a seq known to be committed.
    pub fn newest(&self, stream: &StreamKey) -> Option<u64> {
        self.streams()
            .runs
            .get(stream)
            .and_then(|r| r.events.last_key_value().map(|(k, _)| *k))
    }

    pub fn contains(&self, stream: &StreamKey, seq: u64) -> bool {
        self.streams()
            .runs
            .get(stream)
            .is_some_and(|r| r.events.contains_key(&seq))
    }

    pub fn stream_keys(&self) -> Vec<StreamKey> {
        self.streams().runs.keys().cloned().collect()
    }

    /// Events held in all.
    pub fn len(&self) -> usize {
        self.streams().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets events the log no longer keeps, so the cache never answers a resume that
    /// the log would answer with `reset`.
    pub fn forget_before(&self, stream: &StreamKey, first_kept: u64) {
        let mut s = self.streams();
        let Some(run) = s.runs.get_mut(stream) else {
            return;
        };
        let before = run.events.len();
        run.events = run.events.split_off(&first_kept);
        let dropped = before - run.events.len();
        s.total -= dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::domain::EventKind;

    fn ev(seq: u64) -> Arc<Event> {
        ev_in(&StreamKey::Alerts, seq)
    }

    fn s() -> StreamKey {
        StreamKey::Alerts
    }

    #[test]
    fn answers_only_consecutive_runs_and_stays_bounded() {
        let c = Cache::new(4, 1000);
        c.insert(&[ev(1), ev(2), ev(4), ev(5), ev(6)]);
        // 1 was evicted (bound 4); 3 is a hole.
        assert!(c.run_from(&s(), 1, 10).is_empty());
        assert_eq!(c.run_from(&s(), 2, 10).len(), 1);
        let seqs: Vec<u64> = c.run_from(&s(), 4, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
        assert_eq!(c.newest(&s()), Some(6));
        c.forget_before(&s(), 5);
        assert!(c.run_from(&s(), 4, 10).is_empty());
        assert_eq!(c.len(), 2);
    }

    fn ev_in(stream: &StreamKey, seq: u64) -> Arc<Event> {
        Arc::new(Event::render(
            stream,
            seq,
            EventKind::Announcement,
            crate::domain::now(),
            "{}".into(),
        ))
    }

    fn z(n: i32) -> StreamKey {
        StreamKey::Zone(n)
    }

    #[test]
    fn the_stream_used_least_recently_goes_first_past_the_total() {
        let c = Cache::new(10, 25);
        for n in [1, 2, 3] {
            c.insert(&(1..=8).map(|seq| ev_in(&z(n), seq)).collect::<Vec<_>>());
        }
        assert_eq!(c.len(), 24);
        // Zone 1 is read, so zone 2 is now the one used least recently.
        assert_eq!(c.run_from(&z(1), 1, 100).len(), 8);
        c.insert(&[ev_in(&z(4), 1), ev_in(&z(4), 2)]);
        assert!(c.len() <= 25, "{}", c.len());
        assert!(c.newest(&z(2)).is_none(), "zone 2 was evicted");
        assert_eq!(c.newest(&z(1)), Some(8));
        assert_eq!(c.newest(&z(4)), Some(2));
        // Many streams of one event each never hold more than the total.
        for i in 0..1000 {
            c.insert(&[ev_in(&StreamKey::User(format!("u{i}")), 1)]);
        }
        assert!(c.len() <= 25);
    }
}
