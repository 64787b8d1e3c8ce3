//! Local fan-out: one `tokio::sync::broadcast` channel per stream that has a subscriber
//! on this node, created with the first and dropped with the last.
//!
//! The hub only delivers what it is given, in the order given; it never reads the
//! database, and it does not promise that a receiver sees everything (a receiver that
//! lags loses the oldest events). Filling those holes is the cursor's job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::event::Event;

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    /// Ring size of each channel: how far a receiver may fall behind before it lags.
    /// Memory for it is shared by all receivers of the stream.
    capacity: usize,
    /// std `Mutex`: held only for map operations, never across an `.await`.
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<Event>>>>,
}

impl Inner {
    fn channels(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<Arc<Event>>>> {
        // A panic while holding this lock cannot leave the map half-updated (each
        // operation is a single insert/remove), so a poisoned lock is still usable.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A receiver on one stream; dropping the last one removes the stream's channel.
pub struct Subscription {
    inner: Arc<Inner>,
    stream: String,
    rx: Option<broadcast::Receiver<Arc<Event>>>,
}

impl Subscription {
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The raw receiver, for measuring publish instants in the fan-out benchmark;
    /// anything that must not miss events reads through a `Cursor` instead.
    #[doc(hidden)]
    pub fn receiver_for_bench(&mut self) -> &mut broadcast::Receiver<Arc<Event>> {
        self.receiver()
    }

    pub(crate) fn receiver(&mut self) -> &mut broadcast::Receiver<Arc<Event>> {
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

    pub fn subscribe(&self, stream: &str) -> Subscription {
        let mut map = self.inner.channels();
        let rx = match map.get(stream) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.inner.capacity);
                map.insert(stream.to_owned(), tx);
                rx
            }
        };
        Subscription {
            inner: self.inner.clone(),
            stream: stream.to_owned(),
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
    pub fn live_streams(&self) -> usize {
        self.inner.channels().len()
    }

    pub fn subscribers(&self, stream: &str) -> usize {
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
        let a = hub.subscribe("zone:1");
        let b = hub.subscribe("zone:1");
        assert_eq!((hub.live_streams(), hub.subscribers("zone:1")), (1, 2));
        drop(a);
        assert_eq!(hub.live_streams(), 1);
        drop(b);
        assert_eq!(hub.live_streams(), 0);
    }
}
