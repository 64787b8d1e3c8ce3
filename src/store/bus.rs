//! PostgreSQL as the bus between nodes: `pg_notify` on a channel of the database, a
//! `LISTEN`ing connection, and the streams' heads for the sweep. The payloads are the
//! broker's business; this module only carries text.
//!
//! PostgreSQL only: SQLite serves one node and has no bus.

use entity::stream;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter};

use super::{Store, StoreError, stmt};
use crate::domain::StreamKey;

/// `pg_notify` refuses payloads of 8000 bytes or more.
pub const MAX_PAYLOAD: usize = 7999;

/// A connection that `LISTEN`s on one channel.
pub struct Listener {
    inner: PgListener,
}

impl Listener {
    /// The next notification's payload; `None` when the connection is lost (the caller
    /// connects a new listener; what was sent meanwhile is lost).
    pub async fn recv(&mut self) -> Result<Option<String>, StoreError> {
        match self.inner.try_recv().await {
            Ok(Some(n)) => Ok(Some(n.payload().to_owned())),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Bus(e.to_string())),
        }
    }
}

async fn notify_on<C: ConnectionTrait>(
    c: &C,
    channel: &str,
    payloads: &[String],
) -> Result<(), StoreError> {
    for p in payloads {
        let values = vec![channel.into(), p.as_str().into()];
        c.execute_raw(stmt(
            c.get_database_backend(),
            "SELECT pg_notify($1, $2)",
            values,
        ))
        .await?;
    }
    Ok(())
}

impl Store {
    /// The bus channel of this database and schema: nodes on one schema share it, and
    /// two deployments in other schemas of one database do not hear each other.
    pub async fn bus_channel(&self) -> Result<String, StoreError> {
        let row = self
            .db
            .query_one_raw(stmt(self.backend(), "SELECT current_schema()", vec![]))
            .await?
            .ok_or_else(|| StoreError::Bus("no current schema".into()))?;
        let schema: String = row.try_get_by_index(0)?;
        // NOTIFY channels are identifiers: at most 63 bytes.
        let mut channel = format!("zonecast_{schema}");
        while channel.len() > 63 {
            channel.pop();
        }
        Ok(channel)
    }

    /// Announces `payloads` on `channel` when `txn` commits (and never if it rolls back).
    pub async fn notify_in(
        txn: &DatabaseTransaction,
        channel: &str,
        payloads: &[String],
    ) -> Result<(), StoreError> {
        notify_on(txn, channel, payloads).await
    }

    /// Announces `payloads` on `channel` now, outside any transaction.
    pub async fn notify(&self, channel: &str, payloads: &[String]) -> Result<(), StoreError> {
        notify_on(&self.db, channel, payloads).await
    }

    /// A new connection of its own (not one of the pool's) that listens on `channel`,
    /// named `zonecast-listener NODE` in `pg_stat_activity`.
    pub async fn listen(url: &str, channel: &str, node: &str) -> Result<Listener, StoreError> {
        let bus = |e: sea_orm::sqlx::Error| StoreError::Bus(e.to_string());
        let opts: PgConnectOptions = url.parse().map_err(bus)?;
        let opts = opts.application_name(&format!("zonecast-listener {node}"));
        // A pool of one, without timeouts: the listener holds its connection for good.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(opts)
            .await
            .map_err(bus)?;
        let mut inner = PgListener::connect_with(&pool).await.map_err(bus)?;
        inner.ignore_pool_close_event(true);
        // Reconnecting is the caller's: it must sweep after every new connection.
        inner.eager_reconnect(false);
        inner.listen(channel).await.map_err(bus)?;
        Ok(Listener { inner })
    }

    /// The last seq of each of `streams` that has one, in as few queries as the list
    /// allows (one for up to 1,000 streams).
    pub async fn heads(&self, streams: &[StreamKey]) -> Result<Vec<(StreamKey, u64)>, StoreError> {
        let mut out = Vec::with_capacity(streams.len());
        for chunk in streams.chunks(1000) {
            let keys: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            let rows = stream::Entity::find()
                .filter(stream::Column::Key.is_in(keys))
                .all(&self.db)
                .await?;
            for r in rows {
                let key = StreamKey::parse(&r.key)
                    .map_err(|e| StoreError::Corrupt(format!("stream {}: {e}", r.key)))?;
                let last = u64::try_from(r.last_seq)
                    .map_err(|_| StoreError::Corrupt(format!("stream {}: last_seq", r.key)))?;
                out.push((key, last));
            }
        }
        Ok(out)
    }
}
