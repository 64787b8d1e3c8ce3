//! An item change's statements, folded into as few round trips as the backend allows.
//!
//! Every statement on SQLite is a round trip to sqlx's worker thread for the
//! connection, and under many writers those hand-offs, not SQLite, were most of a
//! change's cost. sqlx-sqlite runs several `;`-separated statements in one call, so
//! there the stream's next seq and the item are one call, and the item's update and
//! the event's insert another. PostgreSQL's extended protocol takes one statement per
//! call, and a statement that both locked the stream row and read the item would read
//! it with a snapshot from before the lock: there they stay separate, in order.
//!
//! Same contract as the calls they fold (`next_seq`, `item_in`, `save_item`, `append`):
//! the seq comes from the stream row under its lock, in the caller's transaction.

use entity::item;
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, FromQueryResult, QueryResult, Statement,
};

use super::log::to_u64;
use super::stock::to_item;
use super::{NewEvent, Store, StoreError, stmt};
use crate::domain::{Event, Item, StreamKey};

/// The seq row is told from the item row (and the key row) by its first column.
macro_rules! next_seq_and_item {
    () => {
        "UPDATE streams SET last_seq = last_seq + 1 WHERE key = $1 RETURNING 'seq' AS part, last_seq; \
        SELECT 'item' AS part, id, zone_id, sku, name, quantity, low_stock_threshold, version, \
        updated_at FROM items WHERE id = $2"
    };
}
const NEXT_SEQ_AND_ITEM: &str = next_seq_and_item!();
/// The same, after whether a key is still valid. SQLite's `?` are positional: the key's
/// id is bound first.
const KEY_NEXT_SEQ_AND_ITEM: &str = concat!(
    "SELECT 'key' AS part, revoked_at IS NULL AS valid FROM api_keys WHERE id = $1; ",
    next_seq_and_item!()
);

/// The update is followed by a row saying it changed the item (`saved_and_appended`),
/// a check that holds when the statement runs in a call with others; the insert either
/// inserts its row or fails. (`RETURNING` would do it too, at about 40k instructions
/// more per change: SQLite gathers returned rows in a table of their own.)
const SAVE_AND_APPEND: &str = "\
    UPDATE items SET sku = $1, name = $2, quantity = $3, low_stock_threshold = $4, version = $5, \
    updated_at = $6 WHERE id = $7; \
    SELECT 'saved' AS part WHERE changes() = 1; \
    INSERT INTO events (stream, seq, type, data, request_id, created_at) \
    VALUES ($8, $9, $10, $11, $12, $13)";

/// What `next_seq_and_item` read.
pub struct SeqAndItem {
    /// Whether the key asked about is still valid; `None` when none was.
    pub key_valid: Option<bool>,
    pub seq: u64,
    pub item: Option<Item>,
}

impl Store {
    /// The stream's next seq (its row locked) and then the item, as `next_seq` and
    /// `item_in` give them; first, when `key` is given, whether that API key is still
    /// valid, as `key_valid_in` says.
    pub async fn next_seq_and_item(
        txn: &DatabaseTransaction,
        stream: &StreamKey,
        item_id: i32,
        key: Option<i32>,
    ) -> Result<SeqAndItem, StoreError> {
        match Self::next_seq_and_item_first(txn.get_database_backend(), stream, item_id, key) {
            Some(first) => {
                let rows = txn.query_all_raw(first).await?;
                Self::seq_and_item_from(txn, rows, stream, key).await
            }
            None => {
                let key_valid = match key {
                    Some(id) => Some(Self::key_valid_in(txn, id).await?),
                    None => None,
                };
                let seq = Self::next_seq(txn, stream).await?;
                let item = Self::item_in(txn, item_id).await?;
                Ok(SeqAndItem {
                    key_valid,
                    seq,
                    item,
                })
            }
        }
    }

    /// `next_seq_and_item` as one statement, for whoever begins the change's
    /// transaction or savepoint to run in the same call (`seq_and_item_from` reads its
    /// rows). `None` on PostgreSQL, where it is several.
    pub fn next_seq_and_item_first(
        backend: DbBackend,
        stream: &StreamKey,
        item_id: i32,
        key: Option<i32>,
    ) -> Option<Statement> {
        if backend != DbBackend::Sqlite {
            return None;
        }
        let mut values = vec![stream.to_string().into(), item_id.into()];
        let sql = match key {
            Some(id) => {
                values.insert(0, id.into());
                KEY_NEXT_SEQ_AND_ITEM
            }
            None => NEXT_SEQ_AND_ITEM,
        };
        Some(stmt(DbBackend::Sqlite, sql, values))
    }

    /// What the rows of `next_seq_and_item_first` say.
    pub async fn seq_and_item_from(
        txn: &DatabaseTransaction,
        rows: Vec<QueryResult>,
        stream: &StreamKey,
        key: Option<i32>,
    ) -> Result<SeqAndItem, StoreError> {
        // No key row: the key is gone, so not valid.
        let (mut key_valid, mut seq, mut item) = (key.map(|_| false), None, None);
        for row in rows {
            match row.try_get::<String>("", "part")?.as_str() {
                "key" => key_valid = Some(row.try_get::<bool>("", "valid")?),
                "seq" => seq = Some(to_u64(row.try_get("", "last_seq")?, "last_seq")?),
                "item" => item = Some(to_item(item::Model::from_query_result(&row, "")?)),
                // Rows of statements run in the same call (`saved_and_appended`).
                _ => {}
            }
        }
        let seq = match seq {
            Some(s) => s,
            // No stream row yet: `next_seq` makes it. (SQLite holds the write lock for
            // the whole transaction, so the item read above is still current.)
            None => Self::next_seq(txn, stream).await?,
        };
        Ok(SeqAndItem {
            key_valid,
            seq,
            item,
        })
    }

    /// Saves the item and appends its event, as `save_item` and `append` do.
    pub async fn save_and_append(
        txn: &DatabaseTransaction,
        it: &Item,
        new: NewEvent<'_>,
    ) -> Result<Event, StoreError> {
        if txn.get_database_backend() != DbBackend::Sqlite {
            Self::save_item(txn, it).await?;
            return Self::append(txn, new).await;
        }
        let (last, ev) = Self::save_and_append_last(it, new)?;
        Self::run_last(txn, last).await?;
        Ok(ev)
    }

    /// Runs a statement made by `save_and_append_last` on its own, and checks it.
    pub async fn run_last(txn: &DatabaseTransaction, last: Statement) -> Result<(), StoreError> {
        Self::saved_and_appended(&txn.query_all_raw(last).await?, 1)
    }

    /// `save_and_append` on SQLite as a statement for later in the transaction (a
    /// grouped change's last, run in the next call, `service::commit`), and the event
    /// it appends. `saved_and_appended` checks its rows.
    pub fn save_and_append_last(
        it: &Item,
        new: NewEvent<'_>,
    ) -> Result<(Statement, Event), StoreError> {
        let values = vec![
            it.sku.clone().into(),
            it.name.clone().into(),
            it.quantity.into(),
            it.low_stock_threshold.into(),
            it.version.into(),
            it.updated_at.into(),
            it.id.into(),
            new.stream.to_string().into(),
            new.seq_i64()?.into(),
            new.kind.as_str().into(),
            new.data.clone().into(),
            new.request_id.clone().into(),
            new.at.into(),
        ];
        let last = stmt(DbBackend::Sqlite, SAVE_AND_APPEND, values);
        Ok((last, new.event()))
    }

    /// Checks that `rows` hold what `n` runs of `save_and_append_last` return: each
    /// updated its item (and inserted its event, or the call failed).
    pub fn saved_and_appended(rows: &[QueryResult], n: usize) -> Result<(), StoreError> {
        let mut saved = 0;
        for row in rows {
            if row.try_get::<String>("", "part")? == "saved" {
                saved += 1;
            }
        }
        if saved != n {
            return Err(StoreError::Corrupt(format!(
                "{saved} items saved, not {n}: an item was not there to update"
            )));
        }
        Ok(())
    }
}
