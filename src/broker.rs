//! Where committed events enter a node and where its subscribers tap them.
//!
//! `Broker` is what the service publishes to and what cursors subscribe through. Every
//! broker has the same node-local half, `Local`: the recent-event cache (replays without
//! queries) and the hub (one broadcast channel per live stream). Brokers differ in how
//! events from *other* nodes arrive; `broker_memory` is the one-node broker, where
//! every event is published by this node; `broker_postgres` is the broker of several
//! nodes on one PostgreSQL database.
//!
//! Must only ever be given committed events: a cursor trusts that any seq it sees
//! through a broker is in the log.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use sea_orm::DatabaseTransaction;

use crate::cache::Cache;
use crate::domain::{Event, StreamKey};
use crate::hub::{Hub, Subscription};
use crate::observe::{ReplayCounts, Replays};
use crate::store::StoreError;

/// How a node hears the events other nodes commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusHealth {
    /// There are no other nodes (the memory broker).
    OneNode,
    /// Listening: other nodes' events arrive as they commit.
    Listening,
    /// Not listening (reconnecting): other nodes' events arrive by the sweep only.
    Reconnecting,
}

impl BusHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            BusHealth::OneNode => "one_node",
            BusHealth::Listening => "listening",
            BusHealth::Reconnecting => "reconnecting",
        }
    }
}

/// The events of one node: publish, subscribe, and what the node holds.
pub trait Broker: Send + Sync {
    /// The node-local cache and hub.
    fn local(&self) -> &Local;

    /// Events committed together on this node, in seq order within each stream.
    fn publish(&self, events: &[Arc<Event>]);

    /// Called in the writing transaction just before it commits, with its events: a
    /// broker that announces events with their commit does it here. An error rolls the
    /// change back. The default announces nothing.
    fn before_commit<'a>(
        &'a self,
        _txn: &'a DatabaseTransaction,
        _events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// The broker's background work (hearing other nodes, the sweep), run by the app
    /// until it stops. The default has none.
    fn run(self: Arc<Self>) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    /// How this node hears other nodes' events.
    fn health(&self) -> BusHealth {
        BusHealth::OneNode
    }

    /// Subscribes to `stream` on this node.
    fn subscribe(&self, stream: &StreamKey) -> Tap {
        self.local().subscribe(stream)
    }

    /// Streams with at least one subscriber on this node.
    fn live_streams(&self) -> Vec<StreamKey> {
        self.local().hub.live_streams()
    }

    /// Subscribers of `stream` on this node.
    fn subscribers(&self, stream: &StreamKey) -> usize {
        self.local().hub.subscribers(stream)
    }

    /// Streams whose recent events this node holds in memory.
    fn cached_streams(&self) -> Vec<StreamKey> {
        self.local().cache.stream_keys()
    }

    /// Forgets the cached events of `stream` the log no longer keeps, so the cache
    /// never answers a resume that the log would answer with `reset`.
    fn forget_before(&self, stream: &StreamKey, first_kept: u64) {
        self.local().cache.forget_before(stream, first_kept);
    }

    /// How this node's cursors were fed from memory and from the log.
    fn replays(&self) -> ReplayCounts {
        self.local().replays.counts()
    }
}

/// What a cursor reads from: its stream's live events, and the node's recent ones.
pub struct Tap {
    pub(crate) live: Subscription,
    pub(crate) cache: Arc<Cache>,
    pub(crate) replays: Arc<Replays>,
}

impl Tap {
    pub fn stream(&self) -> &StreamKey {
        self.live.stream()
    }

    /// The live receiver, which may lag and lose events (the fan-out benchmark reads
    /// publish instants from it). Anything that must not miss events reads through a
    /// `Cursor`.
    #[doc(hidden)]
    pub fn raw(&mut self) -> &mut Subscription {
        &mut self.live
    }
}

/// The node-local half of every broker: the recent-event cache and the hub.
pub struct Local {
    hub: Hub,
    cache: Arc<Cache>,
    replays: Arc<Replays>,
    /// With `wake_from_thread`, the hub is handed events on a thread of its own.
    waker: Option<std::sync::mpsc::SyncSender<Vec<Arc<Event>>>>,
}

/// Batches of events waiting for the waker thread, at most; a committer finding it
/// full waits for room (the thread never waits on anything but this queue).
const WAKER_QUEUE: usize = 1024;

impl Local {
    /// `bus_capacity` events a subscriber may lag on the hub; the cache keeps
    /// `cache_per_stream` recent events of each stream, `cache_total` in all.
    pub fn new(bus_capacity: usize, cache_per_stream: usize, cache_total: usize) -> Self {
        Local {
            hub: Hub::new(bus_capacity),
            cache: Arc::new(Cache::new(cache_per_stream, cache_total)),
            replays: Arc::default(),
            waker: None,
        }
    }

    /// Hands events to the hub on a thread of its own, so that the subscriber tasks an
    /// event wakes enter tokio's global queue in order, rather than the committing
    /// worker's local queue.
    ///
    /// Why: the local queue holds 256 tasks. When one event wakes a thousand
    /// subscribers from a worker, the rest spill into the global queue, and a busy
    /// worker takes from that only once every 61 polls. Under a steady stream of
    /// changes, the spilled subscribers waited many events' worth (back to back, 1,000
    /// subscribers: p99 ≈ 85 ms with ≈ 70 % of writes within 2.5 ms). Woken from
    /// outside the runtime, they all queue first come, first served (p99 ≈ 20 ms, and
    /// more deliveries per second). See BENCHMARKS.md.
    ///
    /// The thread ends when this `Local` is dropped. Order is kept: one queue, one
    /// thread, in the order `deliver` was called.
    pub fn wake_from_thread(mut self) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Arc<Event>>>(WAKER_QUEUE);
        let hub = self.hub.clone();
        std::thread::Builder::new()
            .name("zonecast-wake".into())
            .spawn(move || {
                for events in rx {
                    for ev in events {
                        hub.publish(ev);
                    }
                }
            })?;
        self.waker = Some(tx);
        Ok(self)
    }

    /// Records committed events in the cache, then hands them to local subscribers
    /// (on the waker thread, when there is one).
    pub fn deliver(&self, events: &[Arc<Event>]) {
        self.cache.insert(events);
        if let Some(tx) = &self.waker
            && tx.send(events.to_vec()).is_ok()
        {
            return;
        }
        // No waker thread, or it has gone (it would only if it panicked): here, then.
        for ev in events {
            self.hub.publish(ev.clone());
        }
    }

    /// Each live stream and the newest seq delivered on it since it became live.
    pub fn positions(&self) -> Vec<(StreamKey, u64)> {
        self.hub.positions()
    }

    /// Up to `max` cached events of `stream` from seq `from` on, consecutive (it stops
    /// at the first one the cache does not hold).
    pub fn recent(&self, stream: &StreamKey, from: u64, max: usize) -> Vec<Arc<Event>> {
        self.cache.run_from(stream, from, max)
    }

    /// The newest seq of `stream` this node has seen committed, if it has any cached.
    pub fn newest(&self, stream: &StreamKey) -> Option<u64> {
        self.cache.newest(stream)
    }

    pub fn is_live(&self, stream: &StreamKey) -> bool {
        self.hub.subscribers(stream) > 0
    }

    pub fn subscribe(&self, stream: &StreamKey) -> Tap {
        Tap {
            live: self.hub.subscribe(stream),
            cache: self.cache.clone(),
            replays: self.replays.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::domain::EventKind;

    fn event(seq: u64) -> Arc<Event> {
        let at: DateTime<Utc> = DateTime::UNIX_EPOCH;
        Arc::new(Event::render(
            &StreamKey::Zone(1),
            seq,
            EventKind::StockUpdated,
            at,
            "{}".into(),
        ))
    }

    /// Through the waker thread every event arrives, in the order delivered, and the
    /// thread ends with its `Local` (the hub's channels close).
    #[tokio::test]
    async fn the_waker_thread_keeps_order_and_ends_with_its_local() {
        let local = Local::new(4096, 16, 1024)
            .wake_from_thread()
            .expect("waker thread");
        let mut tap = local.subscribe(&StreamKey::Zone(1));
        let mut seq = 0;
        // More batches than the queue holds at once.
        for batch in 0..(WAKER_QUEUE as u64 + 100) {
            let n = 1 + batch % 3;
            let events: Vec<_> = (seq + 1..=seq + n).map(event).collect();
            seq += n;
            local.deliver(&events);
            // Keep up, so the receiver never lags the ring.
            for want in seq + 1 - n..=seq {
                let got = tokio::time::timeout(Duration::from_secs(5), tap.raw().receiver().recv())
                    .await
                    .expect("an event within 5 s")
                    .expect("received");
                assert_eq!(got.seq, want);
            }
        }
        assert_eq!(waker_threads(), 1);
        drop(local);
        // Nothing to await: the thread's end is seen in /proc, polled for 5 s at most.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while waker_threads() > 0 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(waker_threads(), 0, "the thread ends with its Local");
    }

    /// This process's threads named `zonecast-wake` (no other unit test starts one).
    fn waker_threads() -> usize {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return usize::MAX;
        };
        tasks
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "zonecast-wake")
            })
            .count()
    }
}
