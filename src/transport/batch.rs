//! The one coalescing loop, used by single-stream SSE, `/sse/streams` and WebSocket:
//! wait for the first item, then take everything else that is ready without waiting,
//! up to a budget, so that a burst costs one socket write per subscriber instead of one
//! per event.
//!
//! A `Source` is one cursor, or several merged (`Merged`, whose set of streams may
//! change while it runs: WebSocket subscriptions).

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio_stream::StreamMap;

use crate::cursor::{Cursor, CursorError, Item};
use crate::domain::StreamKey;

/// Upper bound of one coalesced SSE write.
pub const MAX_CHUNK: usize = 64 * 1024;

/// One chunk of frames: a lone frame is passed on as the shared bytes, without a copy.
pub fn join(pieces: &mut Vec<Bytes>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for p in pieces.drain(..) {
        buf.extend_from_slice(&p);
    }
    buf.freeze()
}

/// Where a batch's items come from.
pub trait Source: Send {
    /// The next item, waiting for it. Cancel-safe.
    fn next_item(&mut self) -> impl Future<Output = Result<Item, CursorError>> + Send;

    /// The next item if one is ready now, without waiting or I/O. An error met here is
    /// held back and returned by the next `next_item`, so the items before it are
    /// written.
    fn try_next_item(&mut self) -> Option<Item>;

    /// The stream of the item (or the error) last returned.
    fn last_stream(&self) -> &StreamKey;
}

impl Source for Cursor {
    fn next_item(&mut self) -> impl Future<Output = Result<Item, CursorError>> + Send {
        self.next()
    }

    fn try_next_item(&mut self) -> Option<Item> {
        // A cursor's `try_next` does no I/O and meets no error.
        self.try_next()
    }

    fn last_stream(&self) -> &StreamKey {
        self.stream()
    }
}

type Items = Pin<Box<dyn Stream<Item = Result<Item, CursorError>> + Send>>;

/// Several cursors as one source, each still gapless.
pub struct Merged {
    streams: StreamMap<StreamKey, Items>,
    /// The stream of the item last returned; `Alerts` until there is one.
    last: StreamKey,
    /// An error met while a batch was being taken: held back so that the items before
    /// it are written, and returned by the next `next_item`.
    held: Option<(StreamKey, CursorError)>,
}

impl Default for Merged {
    fn default() -> Self {
        Merged {
            streams: StreamMap::new(),
            last: StreamKey::Alerts,
            held: None,
        }
    }
}

impl Merged {
    /// Adds (or replaces) the cursor of its stream.
    pub fn insert(&mut self, cursor: Cursor) {
        let key = cursor.stream().clone();
        let items = futures_util::stream::unfold(cursor, |mut c| async move {
            let item = c.next().await;
            Some((item, c))
        });
        self.streams.insert(key, Box::pin(items));
    }

    pub fn remove(&mut self, stream: &StreamKey) -> bool {
        self.streams.remove(stream).is_some()
    }

    pub fn contains(&self, stream: &StreamKey) -> bool {
        self.streams.contains_key(stream)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &StreamKey> {
        self.streams.keys()
    }
}

impl Source for Merged {
    async fn next_item(&mut self) -> Result<Item, CursorError> {
        if let Some((key, e)) = self.held.take() {
            self.last = key;
            return Err(e);
        }
        match self.streams.next().await {
            Some((key, item)) => {
                self.last = key;
                item
            }
            // No stream (yet): nothing will come until one is inserted, and inserting
            // happens outside this future.
            None => std::future::pending().await,
        }
    }

    fn try_next_item(&mut self) -> Option<Item> {
        match self.streams.next().now_or_never() {
            Some(Some((key, Ok(item)))) => {
                self.last = key;
                Some(item)
            }
            Some(Some((key, Err(e)))) => {
                self.held = Some((key, e));
                None
            }
            _ => None,
        }
    }

    fn last_stream(&self) -> &StreamKey {
        &self.last
    }
}

/// One batch: waits for an item, then takes what is ready until `push` has been given
/// `budget` (in whatever unit it counts: bytes, messages). Returns how many items it
/// took; an error comes only before the first item (a later one waits for the next
/// call). Cancel-safe: the only await is `next_item`'s.
pub async fn collect<S: Source>(
    src: &mut S,
    budget: usize,
    mut push: impl FnMut(&StreamKey, &Item) -> usize,
) -> Result<usize, CursorError> {
    let first = src.next_item().await?;
    let mut used = push(src.last_stream(), &first);
    let mut n = 1;
    while used < budget {
        match src.try_next_item() {
            Some(item) => {
                used += push(src.last_stream(), &item);
                n += 1;
            }
            None => break,
        }
    }
    Ok(n)
}
