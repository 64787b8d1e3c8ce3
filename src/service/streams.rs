//! Opening a stream for a subscriber: the access check, the zone's existence, and a
//! cursor positioned where the subscriber starts. Every transport opens streams here.

use super::{Service, ServiceError};
use crate::cursor::{Cursor, CursorError, Start};
use crate::domain::{DomainError, Principal, Snapshot, StreamKey};
use crate::store::StoreError;

fn seek_error(e: CursorError) -> ServiceError {
    match e {
        CursorError::Store(s) => ServiceError::Store(s),
        CursorError::Closed => StoreError::Corrupt("the stream's channel closed".into()).into(),
    }
}

impl Service {
    /// A cursor on `stream`, not yet positioned, with no access check (for tests and
    /// the benchmark; subscribers get theirs from `open_stream`).
    pub fn cursor(&self, stream: &StreamKey) -> Cursor {
        Cursor::new(self.broker.subscribe(stream), self.history.clone())
    }

    /// Opens `stream` for `by`, positioned at `start`: refused when `by` may not read
    /// it or its zone does not exist.
    pub async fn open_stream(
        &self,
        by: &Principal,
        stream: &StreamKey,
        start: Start,
    ) -> Result<Cursor, ServiceError> {
        by.require_stream(stream)?;
        if let StreamKey::Zone(id) = stream {
            self.require_zone_exists(*id).await?;
        }
        let mut cursor = self.cursor(stream);
        cursor.seek(start).await.map_err(seek_error)?;
        Ok(cursor)
    }

    /// Refused when zone `id` does not exist; a query only the first time it does.
    async fn require_zone_exists(&self, id: i32) -> Result<(), ServiceError> {
        if self.known_zones.get(&id).is_some() {
            return Ok(());
        }
        self.store
            .zone(id)
            .await?
            .ok_or(DomainError::NotFound("zone"))?;
        self.known_zones.insert(id, ());
        Ok(())
    }

    /// Opens a zone's stream with its snapshot: the cursor is subscribed before the
    /// snapshot is read, so whatever commits in between arrives live, and it continues
    /// from exactly the snapshot's last event.
    pub async fn open_with_snapshot(
        &self,
        by: &Principal,
        zone_id: i32,
    ) -> Result<(Snapshot, Cursor), ServiceError> {
        let stream = StreamKey::Zone(zone_id);
        by.require_stream(&stream)?;
        let mut cursor = self.cursor(&stream);
        let snapshot = self.snapshot(by, zone_id).await?;
        cursor
            .seek(Start::Snapshot(snapshot.last_event_id))
            .await
            .map_err(seek_error)?;
        Ok((snapshot, cursor))
    }

    /// The caller's own user stream.
    pub fn user_stream(&self, by: &Principal) -> Result<StreamKey, ServiceError> {
        Ok(StreamKey::User(
            super::notifications::own_user(by)?.to_owned(),
        ))
    }
}
