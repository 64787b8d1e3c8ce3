//! Recent events of each stream, kept in memory so that replays, lag recovery and
//! reconnect storms are served without a query. Bounded per stream.
//!
//! The cache may hold holes (events are inserted in publish order, which can differ
//! from seq order); it only ever answers with a consecutive run, never across a hole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::event::Event;

type Streams = HashMap<String, BTreeMap<u64, Arc<Event>>>;

pub struct Cache {
    per_stream: usize,
    /// std `Mutex`: held for in-memory map work only, never across an `.await`.
    streams: Mutex<Streams>,
}

impl Cache {
    pub fn new(per_stream: usize) -> Self {
        Cache {
            per_stream,
            streams: Mutex::new(HashMap::new()),
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
        let mut streams = self.streams();
        for ev in events {
            let run = streams.entry(ev.stream.clone()).or_default();
            run.insert(ev.seq, ev.clone());
            while run.len() > self.per_stream {
                run.pop_first();
            }
        }
    }

    /// Consecutive events of `stream` starting exactly at `from`, at most `max`.
    pub fn run_from(&self, stream: &str, from: u64, max: usize) -> Vec<Arc<Event>> {
        let streams = self.streams();
        let Some(run) = streams.get(stream) else {
            return Vec::new();
        };
        run.range(from..)
            .zip(from..)
            .take_while(|((seq, _), want)| *seq == want)
            .take(max)
            .map(|((_, ev), _)| ev.clone())
            .collect()
    }

    /// The newest seq cached for `stream`: a seq known to be committed.
    pub fn newest(&self, stream: &str) -> Option<u64> {
        self.streams()
            .get(stream)
            .and_then(|r| r.last_key_value().map(|(k, _)| *k))
    }

    pub fn contains(&self, stream: &str, seq: u64) -> bool {
        self.streams()
            .get(stream)
            .is_some_and(|r| r.contains_key(&seq))
    }

    pub fn stream_keys(&self) -> Vec<String> {
        self.streams().keys().cloned().collect()
    }

    /// Forgets events the log no longer keeps, so the cache never answers a resume that
    /// the log would answer with `reset`.
    pub fn forget_before(&self, stream: &str, first_kept: u64) {
        if let Some(run) = self.streams().get_mut(stream) {
            *run = run.split_off(&first_kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> Arc<Event> {
        Arc::new(Event::render(
            "s",
            seq,
            "t",
            crate::domain::now(),
            "{}".into(),
        ))
    }

    #[test]
    fn answers_only_consecutive_runs_and_stays_bounded() {
        let c = Cache::new(4);
        c.insert(&[ev(1), ev(2), ev(4), ev(5), ev(6)]);
        // 1 was evicted (bound 4); 3 is a hole.
        assert!(c.run_from("s", 1, 10).is_empty());
        assert_eq!(c.run_from("s", 2, 10).len(), 1);
        let seqs: Vec<u64> = c.run_from("s", 4, 10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
        assert_eq!(c.newest("s"), Some(6));
        c.forget_before("s", 5);
        assert!(c.run_from("s", 4, 10).is_empty());
    }
}
