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
}

impl Local {
    /// `bus_capacity` events a subscriber may lag on the hub; the cache keeps
    /// `cache_per_stream` recent events of each stream, `cache_total` in all.
    pub fn new(bus_capacity: usize, cache_per_stream: usize, cache_total: usize) -> Self {
        Local {
            hub: Hub::new(bus_capacity),
            cache: Arc::new(Cache::new(cache_per_stream, cache_total)),
            replays: Arc::default(),
        }
    }

    /// Records committed events in the cache, then hands them to local subscribers.
    pub fn deliver(&self, events: &[Arc<Event>]) {
        self.cache.insert(events);
        for ev in events {
            self.hub.publish(ev.clone());
        }
    }

    /// Each live stream and the newest seq delivered on it since it became live.
    pub fn positions(&self) -> Vec<(StreamKey, u64)> {
        self.hub.positions()
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
