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
    channels: Mutex<HashMap<StreamKey, broadcast::Sender<Arc<Event>>>>,
}

impl Inner {
    fn channels(&self) -> MutexGuard<'_, HashMap<StreamKey, broadcast::Sender<Arc<Event>>>> {
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
            .is_some_and(|tx| tx.receiver_count() == 0)
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
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.inner.capacity);
                map.insert(stream.clone(), tx);
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
        let tx = self.inner.channels().get(&event.stream).cloned();
        if let Some(tx) = tx {
            // An error only means every receiver went away meanwhile.
            let _ = tx.send(event);
        }
    }

    /// Streams with at least one local subscriber.
    pub fn live_streams(&self) -> Vec<StreamKey> {
        self.inner.channels().keys().cloned().collect()
    }

    pub fn subscribers(&self, stream: &StreamKey) -> usize {
        self.inner
            .channels()
            .get(stream)
            .map_or(0, |tx| tx.receiver_count())
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
}
