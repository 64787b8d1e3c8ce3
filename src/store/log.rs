//! The change log: `streams.last_seq` hands out each stream's next seq under the
//! stream row's lock, in the same transaction as the event insert, so commit order is
//! seq order and there are no gaps.

use chrono::{DateTime, Utc};
use entity::event;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use super::{Store, StoreError, exec, stmt, unique};
use crate::domain::{Event, EventKind, LogBounds, StreamKey};

/// An event to append: what `Store::append` and the item changes' joint statements
/// write. `seq` must come from `next_seq` in the same transaction.
pub struct NewEvent<'a> {
    pub stream: &'a StreamKey,
    pub seq: u64,
    pub kind: EventKind,
    pub data: String,
    pub request_id: Option<String>,
    pub at: DateTime<Utc>,
}

impl NewEvent<'_> {
    pub(super) fn seq_i64(&self) -> Result<i64, StoreError> {
        i64::try_from(self.seq).map_err(|_| StoreError::Corrupt("seq overflow".into()))
    }

    /// The event as appended.
    pub(super) fn event(self) -> Event {
        Event::render(self.stream, self.seq, self.kind, self.at, self.data)
    }
}

pub(super) fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

fn to_event(m: event::Model) -> Result<Event, StoreError> {
    let seq = to_u64(m.seq, "seq")?;
    let stream = StreamKey::parse(&m.stream)
        .map_err(|e| StoreError::Corrupt(format!("event {}#{seq}: {e}", m.stream)))?;
    let kind = EventKind::parse(&m.kind)
        .map_err(|e| StoreError::Corrupt(format!("event {}#{seq}: {e}", m.stream)))?;
    Ok(Event::render(&stream, seq, kind, m.created_at, m.data))
}

const ENSURE_STREAM: &str =
    "INSERT INTO streams (key, last_seq) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING";

impl Store {
    pub async fn ensure_stream(&self, key: &StreamKey) -> Result<(), StoreError> {
        exec(&self.db, ENSURE_STREAM, vec![key.to_string().into()]).await?;
        Ok(())
    }

    pub async fn ensure_stream_in(
        txn: &DatabaseTransaction,
        key: &StreamKey,
    ) -> Result<(), StoreError> {
        exec(txn, ENSURE_STREAM, vec![key.to_string().into()]).await?;
        Ok(())
    }

    /// Takes the next seq of `key`, locking the stream row until the transaction ends.
    pub async fn next_seq(txn: &DatabaseTransaction, key: &StreamKey) -> Result<u64, StoreError> {
        let sql = "UPDATE streams SET last_seq = last_seq + 1 WHERE key = $1 RETURNING last_seq";
        for _ in 0..2 {
            let row = txn
                .query_one_raw(stmt(
                    txn.get_database_backend(),
                    sql,
                    vec![key.to_string().into()],
                ))
                .await?;
            if let Some(row) = row {
                return to_u64(row.try_get_by_index::<i64>(0)?, "last_seq");
            }
            Self::ensure_stream_in(txn, key).await?;
        }
        Err(StoreError::Corrupt(format!(
            "stream {key} cannot be created"
        )))
    }

    /// Appends one event.
    pub async fn append(txn: &DatabaseTransaction, new: NewEvent<'_>) -> Result<Event, StoreError> {
        event::Entity::insert(event::ActiveModel {
            stream: Set(new.stream.to_string()),
            seq: Set(new.seq_i64()?),
            kind: Set(new.kind.as_str().to_owned()),
            data: Set(new.data.clone()),
            request_id: Set(new.request_id.clone()),
            created_at: Set(new.at),
        })
        .exec_without_returning(txn)
        .await?;
        Ok(new.event())
    }

    /// One event of the log, read in `txn`.
    pub async fn event_in(
        txn: &DatabaseTransaction,
        stream: &StreamKey,
        seq: u64,
    ) -> Result<Option<Event>, StoreError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        unique(event::Entity::find_by_id((stream.to_string(), seq)), txn)
            .await?
            .map(to_event)
            .transpose()
    }

    /// Up to `limit` events of `stream` with seq ≥ `from`, in order.
    pub async fn read_from(
        &self,
        stream: &StreamKey,
        from: u64,
        limit: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        event::Entity::find()
            .filter(event::Column::Stream.eq(stream.to_string()))
            .filter(event::Column::Seq.gte(from))
            .order_by_asc(event::Column::Seq)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_event)
            .collect()
    }

    pub async fn bounds(&self, stream: &StreamKey) -> Result<LogBounds, StoreError> {
        let sql = "SELECT s.last_seq, (SELECT MIN(e.seq) FROM events e WHERE e.stream = s.key) \
                   FROM streams s WHERE s.key = $1";
        let row = self
            .db
            .query_one_raw(stmt(self.backend(), sql, vec![stream.to_string().into()]))
            .await?;
        let Some(row) = row else {
            return Ok(LogBounds {
                earliest: None,
                last: 0,
            });
        };
        let last = to_u64(row.try_get_by_index::<i64>(0)?, "last_seq")?;
        let earliest = row
            .try_get_by_index::<Option<i64>>(1)?
            .map(|e| to_u64(e, "seq"))
            .transpose()?;
        Ok(LogBounds { earliest, last })
    }

    /// Deletes events older than `older_than` and all but the newest `keep` of each
    /// stream, and the idempotency keys of the deleted events. Returns how many events
    /// were deleted.
    pub async fn prune(&self, older_than: DateTime<Utc>, keep: u64) -> Result<u64, StoreError> {
        let by_age = event::Entity::delete_many()
            .filter(event::Column::CreatedAt.lt(older_than))
            .exec(&self.db)
            .await?
            .rows_affected;
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let by_count = exec(
            &self.db,
            "DELETE FROM events WHERE seq <= \
             (SELECT s.last_seq FROM streams s WHERE s.key = events.stream) - $1",
            vec![keep.into()],
        )
        .await?;
        self.prune_keys().await?;
        Ok(by_age + by_count)
    }
}
