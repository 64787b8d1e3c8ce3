//! Local fan-out: one `tokio::sync::broadcast` channel per stream that has a subscriber
//! on this node, created with the first and dropped with the last.
//!
//! The hub only delivers what it is given, in the order given; it never reads the
//! database, and it does not promise that a receiver sees everything (a receiver that
//! lags loses the oldest events). Filling those holes is the cursor's job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::domain::{Event, StreamKey};

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Ring size of each channel: how far a receiver may fall behind before it lags.
    /// Memory for it is shared by all receivers of the stream.
    capacity: usize,
    /// std `Mutex`: held only for map operations, never across an `.await`.
    channels: Mutex<HashMap<StreamKey, Channel>>,
}

struct Channel {
    tx: broadcast::Sender<Arc<Event>>,
    /// The highest seq published on it, 0 before the first: where this node's view of
    /// the stream stands (the sweep compares it with the log).
    newest: u64,
}

impl Inner {
    fn channels(&self) -> MutexGuard<'_, HashMap<StreamKey, Channel>> {
        // A panic while holding this lock cannot leave the map half-updated (each
        // operation is a single insert/remove), so a poisoned lock is still usable.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A receiver on one stream; dropping the last one removes the stream's channel.
pub struct Subscription {
    inner: Arc<Inner>,
    stream: StreamKey,
    rx: Option<broadcast::Receiver<Arc<Event>>>,
}

impl Subscription {
    pub fn stream(&self) -> &StreamKey {
        &self.stream
    }

    /// The raw receiver: it may lag and lose events. Anything that must not miss
    /// events reads through a `Cursor`.
    pub fn receiver(&mut self) -> &mut broadcast::Receiver<Arc<Event>> {
        // Only `Drop` takes the receiver out.
        self.rx.as_mut().expect("receiver present until drop")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.inner.channels();
        // Dropped under the lock, so no `subscribe` can slip in between the drop and the
        // count check and be left holding a removed channel.
        drop(self.rx.take());
        if map
            .get(&self.stream)
            .is_some_and(|c| c.tx.receiver_count() == 0)
        {
            map.remove(&self.stream);
        }
    }
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        Hub {
            inner: Arc::new(Inner {
                capacity: capacity.max(1),
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn subscribe(&self, stream: &StreamKey) -> Subscription {
        let mut map = self.inner.channels();
        let rx = match map.get(stream) {
            Some(c) => c.tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.inner.capacity);
                map.insert(stream.clone(), Channel { tx, newest: 0 });
                rx
            }
        };
        Subscription {
            inner: self.inner.clone(),
            stream: stream.clone(),
            rx: Some(rx),
        }
    }

    /// Sends to the stream's local subscribers, if it has any.
    pub fn publish(&self, event: Arc<Event>) {
        let tx = self.inner.channels().get_mut(&event.stream).map(|c| {
            c.newest = c.newest.max(event.seq);
            c.tx.clone()
        });
        if let Some(tx) = tx {
            // An error only means every receiver went away meanwhile.
            let _ = tx.send(event);
        }
    }

    /// Streams with at least one local subscriber.
    pub fn live_streams(&self) -> Vec<StreamKey> {
        self.inner.channels().keys().cloned().collect()
    }

    /// Each live stream with the highest seq published on it since it became live (0
    /// for none yet).
    pub fn positions(&self) -> Vec<(StreamKey, u64)> {
        self.inner
            .channels()
            .iter()
            .map(|(k, c)| (k.clone(), c.newest))
            .collect()
    }

    pub fn subscribers(&self, stream: &StreamKey) -> usize {
        self.inner
            .channels()
            .get(stream)
            .map_or(0, |c| c.tx.receiver_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_lives_exactly_as_long_as_its_subscribers() {
        let hub = Hub::new(4);
        let z = StreamKey::Zone(1);
        let a = hub.subscribe(&z);
        let b = hub.subscribe(&z);
        assert_eq!(
            (hub.live_streams(), hub.subscribers(&z)),
            (vec![z.clone()], 2)
        );
        drop(a);
        assert_eq!(hub.live_streams().len(), 1);
        drop(b);
        assert!(hub.live_streams().is_empty());
    }

    #[test]
    fn positions_are_the_newest_seq_published_on_each_live_stream() {
        let hub = Hub::new(4);
        let (z, a) = (StreamKey::Zone(1), StreamKey::Alerts);
        let _subs = (hub.subscribe(&z), hub.subscribe(&a));
        let ev = |stream: &StreamKey, seq| {
            Arc::new(Event::render(
                stream,
                seq,
                crate::domain::EventKind::StockUpdated,
                chrono::DateTime::UNIX_EPOCH,
                "{}".into(),
            ))
        };
        hub.publish(ev(&z, 3));
        hub.publish(ev(&z, 2)); // out of order: the position does not move back
        hub.publish(ev(&StreamKey::Zone(9), 7)); // not live: not tracked
        let mut p = hub.positions();
        p.sort_by_key(|(k, _)| k.to_string());
        assert_eq!(p, vec![(a, 0), (z, 3)]);
    }
}
