//! Zones and items. Item writes take the caller's transaction, which has already locked
//! the zone's stream row (`next_seq`), so changes to one zone are serialised.

use chrono::{DateTime, Utc};
use entity::{item, stream, zone};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, Set, TransactionTrait,
};

use super::{Store, StoreError, unique};
use crate::domain::{Item, NewItem, Snapshot, StreamKey, Zone};

fn to_zone(m: zone::Model) -> Zone {
    Zone {
        id: m.id,
        name: m.name,
        created_at: m.created_at,
    }
}

pub(super) fn to_item(m: item::Model) -> Item {
    Item {
        id: m.id,
        zone_id: m.zone_id,
        sku: m.sku,
        name: m.name,
        quantity: m.quantity,
        low_stock_threshold: m.low_stock_threshold,
        version: m.version,
        updated_at: m.updated_at,
    }
}

impl Store {
    /// Creates a zone and its stream row in one transaction.
    pub async fn create_zone(&self, name: &str, at: DateTime<Utc>) -> Result<Zone, StoreError> {
        let txn = self.db.begin().await?;
        let z = zone::ActiveModel {
            name: Set(name.to_owned()),
            created_at: Set(at),
            ..Default::default()
        }
        .insert(&txn)
        .await?;
        Self::ensure_stream_in(&txn, &StreamKey::Zone(z.id)).await?;
        txn.commit().await?;
        Ok(to_zone(z))
    }

    pub async fn zones(&self) -> Result<Vec<Zone>, StoreError> {
        Ok(zone::Entity::find()
            .order_by_asc(zone::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(to_zone)
            .collect())
    }

    pub async fn zone(&self, id: i32) -> Result<Option<Zone>, StoreError> {
        Ok(unique(zone::Entity::find_by_id(id), &self.db)
            .await?
            .map(to_zone))
    }

    pub async fn zone_count(&self) -> Result<u64, StoreError> {
        Ok(zone::Entity::find().count(&self.db).await?)
    }

    pub async fn item_zone(&self, item_id: i32) -> Result<Option<i32>, StoreError> {
        Ok(unique(item::Entity::find_by_id(item_id), &self.db)
            .await?
            .map(|m| m.zone_id))
    }

    pub async fn item_in(
        txn: &DatabaseTransaction,
        item_id: i32,
    ) -> Result<Option<Item>, StoreError> {
        Ok(unique(item::Entity::find_by_id(item_id), txn)
            .await?
            .map(to_item))
    }

    pub async fn zone_exists_in(
        txn: &DatabaseTransaction,
        zone_id: i32,
    ) -> Result<bool, StoreError> {
        Ok(unique(zone::Entity::find_by_id(zone_id), txn)
            .await?
            .is_some())
    }

    pub async fn sku_taken(
        txn: &DatabaseTransaction,
        zone_id: i32,
        sku: &str,
    ) -> Result<bool, StoreError> {
        Ok(item::Entity::find()
            .filter(item::Column::ZoneId.eq(zone_id))
            .filter(item::Column::Sku.eq(sku))
            .count(txn)
            .await?
            > 0)
    }

    pub async fn insert_item(
        txn: &DatabaseTransaction,
        zone_id: i32,
        new: &NewItem,
        at: DateTime<Utc>,
    ) -> Result<Item, StoreError> {
        let m = item::ActiveModel {
            zone_id: Set(zone_id),
            sku: Set(new.sku().to_owned()),
            name: Set(new.name().to_owned()),
            quantity: Set(new.quantity()),
            low_stock_threshold: Set(new.low_stock_threshold()),
            version: Set(1),
            updated_at: Set(at),
            ..Default::default()
        }
        .insert(txn)
        .await?;
        Ok(to_item(m))
    }

    /// One `UPDATE`: an active model's `update` would read the row back after it on
    /// SQLite, a second round trip on the hot path of every change.
    pub async fn save_item(txn: &DatabaseTransaction, it: &Item) -> Result<(), StoreError> {
        let changed = item::Entity::update_many()
            .set(item::ActiveModel {
                // The id and the zone never change.
                sku: Set(it.sku.clone()),
                name: Set(it.name.clone()),
                quantity: Set(it.quantity),
                low_stock_threshold: Set(it.low_stock_threshold),
                version: Set(it.version),
                updated_at: Set(it.updated_at),
                ..Default::default()
            })
            .filter(item::Column::Id.eq(it.id))
            .exec(txn)
            .await?
            .rows_affected;
        if changed != 1 {
            return Err(StoreError::Corrupt(format!(
                "item {} was not there to update",
                it.id
            )));
        }
        Ok(())
    }

    pub async fn delete_item(txn: &DatabaseTransaction, id: i32) -> Result<(), StoreError> {
        item::Entity::delete_by_id(id).exec(txn).await?;
        Ok(())
    }

    /// The zone's items and the seq of the last event they include, read at one point
    /// in time. `None` for an unknown zone.
    pub async fn snapshot(&self, zone_id: i32) -> Result<Option<Snapshot>, StoreError> {
        let txn = self.begin_read().await?;
        if unique(zone::Entity::find_by_id(zone_id), &txn)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let key = StreamKey::Zone(zone_id).to_string();
        let last = unique(stream::Entity::find_by_id(key), &txn)
            .await?
            .map_or(0, |s| s.last_seq);
        let items = item::Entity::find()
            .filter(item::Column::ZoneId.eq(zone_id))
            .order_by_asc(item::Column::Id)
            .all(&txn)
            .await?
            .into_iter()
            .map(to_item)
            .collect();
        txn.commit().await?;
        Ok(Some(Snapshot {
            zone_id,
            last_event_id: u64::try_from(last).unwrap_or(0),
            items,
        }))
    }
}
