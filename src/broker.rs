//! Where committed events enter the node: the broker records them in the recent-event
//! cache and hands them to the hub. This is the in-process broker (one node, SQLite or
//! PostgreSQL); a PostgreSQL LISTEN/NOTIFY broker for several nodes feeds the same two.
//!
//! Must only ever be given committed events: a cursor trusts that any seq it sees
//! here is in the log.

use std::sync::Arc;

use crate::cache::Cache;
use crate::event::Event;
use crate::hub::{Hub, Subscription};
use crate::observe::Stats;

#[derive(Clone)]
pub struct Broker {
    pub hub: Hub,
    pub cache: Arc<Cache>,
    pub stats: Arc<Stats>,
}

impl Broker {
    pub fn new(bus_capacity: usize, cache_per_stream: usize, cache_total: usize) -> Self {
        Broker {
            hub: Hub::new(bus_capacity),
            cache: Arc::new(Cache::new(cache_per_stream, cache_total)),
            stats: Arc::default(),
        }
    }

    /// Publishes events committed together, in seq order within each stream.
    pub fn publish(&self, events: &[Arc<Event>]) {
        self.cache.insert(events);
        self.stats.broadcast(events.len() as u64);
        for ev in events {
            self.hub.publish(ev.clone());
        }
    }

    pub fn subscribe(&self, stream: &str) -> Subscription {
        self.hub.subscribe(stream)
    }
}
