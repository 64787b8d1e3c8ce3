//! Back-pressure from the fan-out to writers: a change is answered once it is
//! committed and, where this node fans its stream out in a group (`transport::fanout`),
//! once that group is close enough behind the change's own event; or after `max_wait`,
//! whichever comes first. Close enough: the events still to write, times the group's
//! members, are at most `backlog` deliveries (and one event is always allowed). So a
//! stream with 1,000 watchers may be 40 events behind its writers by default, one with
//! 10,000 watchers 4: about the same time's work either way.
//!
//! Why: a write is answered before its fan-out, so a writer that writes again at once
//! (a bulk import, a load generator publishing back to back) can publish faster than
//! the fan-out to a large audience writes. The events then queue between the two and
//! every watcher falls further behind: with 10,000 subscribers and writes back to back,
//! p99 from publish to receipt was 150–200 ms, against Nchan's 90–110 ms, whose
//! publisher is answered only after its fan-out (BENCHMARKS.md, 2026-12-07). Holding
//! the writer keeps the watchers close; letting it run a few events ahead keeps the
//! batches that make the fan-out cheap. Under an ordinary load no group is that far
//! behind, and nothing waits.
//!
//! What it must not do: make a change fail, or wait for good. The change is committed
//! and published before the wait; the wait is bounded by `max_wait` and ends when the
//! group ends. Slow readers are not counted: a member that cannot take a batch leaves
//! the group (it follows on its own), so one slow socket holds up no writer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::StreamKey;

/// Deliveries (events still to write × members) a stream's group may be behind a
/// change before the change's answer waits.
pub const DEFAULT_BACKLOG: u64 = 40_000;

/// Longest a writer waits for the fan-out.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Written {
    seq: u64,
    members: usize,
}

pub struct Pace {
    /// 0: writers never wait.
    backlog: u64,
    max_wait: Duration,
    /// For each stream fanned out in a group on this node, the seq up to which the
    /// group has written every member, and how many members it has. One entry per
    /// running group (bounded as the groups are: by the connections), removed when the
    /// group ends.
    written: Mutex<HashMap<StreamKey, watch::Sender<Written>>>,
}

impl Default for Pace {
    fn default() -> Self {
        Pace::new(DEFAULT_BACKLOG, DEFAULT_MAX_WAIT)
    }
}

impl Pace {
    pub fn new(backlog: u64, max_wait: Duration) -> Self {
        Pace {
            backlog,
            max_wait,
            written: Mutex::default(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, watch::Sender<Written>>> {
        // Each critical section is one map operation: a poisoned lock is usable.
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `stream`'s group, of `members` members, has written every one up to `seq`.
    pub fn written(&self, stream: &StreamKey, seq: u64, members: usize) {
        let now = Written { seq, members };
        let mut map = self.map();
        match map.get(stream) {
            Some(tx) => {
                tx.send_if_modified(|w| {
                    let moved = now.seq > w.seq || now.members != w.members;
                    *w = Written {
                        seq: w.seq.max(now.seq),
                        members,
                    };
                    moved
                });
            }
            None => {
                map.insert(stream.clone(), watch::channel(now).0);
            }
        }
    }

    /// Where `stream`'s group has written every member up to, if it has a group.
    pub fn written_up_to(&self, stream: &StreamKey) -> Option<u64> {
        self.map().get(stream).map(|tx| tx.borrow().seq)
    }

    /// Whether a change with event `seq` may be answered, with the group at `w`.
    fn close_enough(&self, w: &Written, seq: u64) -> bool {
        let events = (self.backlog / w.members.max(1) as u64).max(1);
        w.seq >= seq.saturating_sub(events)
    }

    /// Whether a writer waits for `stream`'s group now.
    pub fn holding(&self, stream: &StreamKey) -> bool {
        self.map()
            .get(stream)
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// `stream`'s group has ended: nobody waits for it any more.
    pub fn ended(&self, stream: &StreamKey) {
        self.map().remove(stream);
    }

    /// Waits until each stream's group (where there is one) is close enough behind the
    /// seq given, for at most `max_wait` in all.
    pub async fn wait(&self, changes: &[(StreamKey, u64)]) {
        if self.backlog == 0 {
            return;
        }
        let waits: Vec<(watch::Receiver<Written>, u64)> = {
            let map = self.map();
            changes
                .iter()
                .filter_map(|(stream, seq)| {
                    // Only a writer that will wait subscribes: `holding` counts them.
                    let tx = map.get(stream)?;
                    let behind = !self.close_enough(&tx.borrow(), *seq);
                    behind.then(|| (tx.subscribe(), *seq))
                })
                .collect()
        };
        if waits.is_empty() {
            return;
        }
        let all = async {
            for (mut rx, seq) in waits {
                // An error: the group ended meanwhile.
                let _ = rx.wait_for(|w| self.close_enough(w, seq)).await;
            }
        };
        if tokio::time::timeout(self.max_wait, all).await.is_err() {
            metrics::counter!("zonecast_fanout_wait_timeouts_total").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_writer_waits_only_while_the_group_is_more_than_the_backlog_behind() {
        // 20 deliveries with 10 members: 2 events.
        let pace = std::sync::Arc::new(Pace::new(20, Duration::from_secs(60)));
        let z = StreamKey::Zone(1);
        // No group: no wait.
        tokio::time::timeout(BOUND, pace.wait(&[(z.clone(), 100)]))
            .await
            .expect("no group, no wait");
        pace.written(&z, 5, 10);
        // Within the backlog: no wait.
        tokio::time::timeout(BOUND, pace.wait(&[(z.clone(), 7)]))
            .await
            .expect("within the backlog");
        // Beyond it: waits until the group has written up to 8 (10 − 2).
        let waiting = tokio::spawn({
            let (pace, z) = (pace.clone(), z.clone());
            async move { pace.wait(&[(z, 10)]).await }
        });
        pace.written(&z, 7, 10);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "7 is more than 2 behind 10");
        // With 5 members the group may be 4 events behind: 7 will do.
        pace.written(&z, 7, 5);
        tokio::time::timeout(BOUND, waiting)
            .await
            .expect("released with fewer members")
            .expect("task");
        // With more members than the backlog, one event is still allowed.
        pace.written(&z, 9, 1000);
        tokio::time::timeout(BOUND, pace.wait(&[(z.clone(), 10)]))
            .await
            .expect("one event ahead is always allowed");
        assert_eq!(pace.written_up_to(&z), Some(9));
    }

    #[tokio::test]
    async fn a_writer_is_released_when_the_group_ends_or_the_wait_runs_out() {
        let z = StreamKey::Zone(1);
        let pace = std::sync::Arc::new(Pace::new(1, Duration::from_secs(60)));
        pace.written(&z, 0, 1);
        let waiting = tokio::spawn({
            let (pace, z) = (pace.clone(), z.clone());
            async move { pace.wait(&[(z, 10)]).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(pace.holding(&z), "a writer waits for the group");
        pace.ended(&z);
        tokio::time::timeout(BOUND, waiting)
            .await
            .expect("released when the group ends")
            .expect("task");

        let short = Pace::new(1, Duration::from_millis(20));
        short.written(&z, 0, 1);
        tokio::time::timeout(BOUND, short.wait(&[(z.clone(), 10)]))
            .await
            .expect("released after max_wait");
        assert!(!short.holding(&z));
        // Off: never waits.
        let off = Pace::new(0, Duration::from_secs(60));
        off.written(&z, 0, 1);
        tokio::time::timeout(BOUND, off.wait(&[(z, 10)]))
            .await
            .expect("backlog 0 is off");
    }
}
