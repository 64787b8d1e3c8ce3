//! Zones and items: reads for whoever may read the zone, and changes, each one
//! transaction with its event (and, on a crossing into low stock, the alert and the
//! watchers' notifications in the same transaction).

use chrono::Utc;
use sea_orm::DatabaseTransaction;
use serde_json::json;

use super::idempotency::Requested;
use super::{ItemChange, KeyCheck, Service, ServiceError, json};
use crate::domain::{
    DomainError, Event, EventKind, Item, ItemEventData, ItemPatch, LowStockData, NewItem,
    NewNotification, Principal, Snapshot, StreamKey, Zone, now, zone_name,
};
use crate::store::{NewEvent, Store};

impl Service {
    pub async fn create_zone(&self, by: &Principal, name: &str) -> Result<Zone, ServiceError> {
        by.require_full_admin("create zones")?;
        let name = zone_name(name)?;
        Ok(self.store.create_zone(&name, now()).await?)
    }

    /// The zones `by` may see.
    pub async fn zones(&self, by: &Principal) -> Result<Vec<Zone>, ServiceError> {
        let mut zones = self.store.zones().await?;
        zones.retain(|z| by.zones.contains(z.id));
        Ok(zones)
    }

    /// A zone `by` may read.
    pub async fn zone(&self, by: &Principal, id: i32) -> Result<Zone, ServiceError> {
        by.require_zone(id)?;
        self.store
            .zone(id)
            .await?
            .ok_or(DomainError::NotFound("zone").into())
    }

    /// The zone's items as of one event, for `by`.
    pub async fn snapshot(&self, by: &Principal, zone_id: i32) -> Result<Snapshot, ServiceError> {
        by.require_zone(zone_id)?;
        self.store
            .snapshot(zone_id)
            .await?
            .ok_or(DomainError::NotFound("zone").into())
    }

    /// A page of the zone's change log: events with seq > `after`.
    pub async fn events(
        &self,
        by: &Principal,
        zone_id: i32,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Event>, ServiceError> {
        self.zone(by, zone_id).await?;
        Ok(self
            .store
            .read_from(&StreamKey::Zone(zone_id), after.saturating_add(1), limit)
            .await?)
    }

    pub async fn create_item(
        &self,
        zone_id: i32,
        new: NewItem,
        request_id: Option<String>,
        by: &Principal,
    ) -> Result<ItemChange, ServiceError> {
        by.require_write(zone_id)?;
        let actor = by.name.as_str();
        let stream = StreamKey::Zone(zone_id);
        let req = Requested::new(
            by,
            request_id.as_deref(),
            json!(["create_item", zone_id, new.canonical()]),
        );
        self.write(by, async |txn| {
            if let Some(done) = req.claim(txn).await? {
                return Ok((ItemChange::from_event(&done)?, vec![]));
            }
            if !Store::zone_exists_in(txn, zone_id).await? {
                return Err(DomainError::NotFound("zone").into());
            }
            let seq = Store::next_seq(txn, &stream).await?;
            if Store::sku_taken(txn, zone_id, new.sku()).await? {
                return Err(DomainError::Conflict(format!(
                    "sku {:?} already exists in zone {zone_id}",
                    new.sku()
                ))
                .into());
            }
            let at = now();
            let item = Store::insert_item(txn, zone_id, &new, at).await?;
            let data = json(&ItemEventData::new(&item, None, None, actor))?;
            let ev = req
                .append(txn, &stream, seq, EventKind::ItemCreated, data, at)
                .await?;
            Ok((ItemChange::from_event(&ev)?, vec![ev]))
        })
        .await
    }

    /// Quantity (absolute or delta), name and threshold in one event: `stock_updated`
    /// when the quantity was given, else `item_updated`.
    pub async fn update_item(
        &self,
        item_id: i32,
        patch: ItemPatch,
        request_id: Option<String>,
        by: &Principal,
    ) -> Result<ItemChange, ServiceError> {
        let stream = self.item_stream(item_id, by).await?;
        let actor = by.name.as_str();
        let req = Requested::new(
            by,
            request_id.as_deref(),
            json!(["update_item", item_id, patch.canonical()]),
        );
        // Without an idempotency key to claim first, the change begins with the stream's
        // next seq and the item (and the key check, if any), in the same call as its
        // savepoint in a group. That statement cannot fail on the request's input.
        let key = KeyCheck::key_of(by);
        let first = match req.keyed() {
            true => None,
            false => Store::next_seq_and_item_first(self.store.backend(), &stream, item_id, key),
        };
        let folded = first.is_some();
        self.write_change(by, first, async |txn, change| {
            if req.keyed() {
                // A revoked key's replay must be refused, not answered.
                change.check.run(txn).await?;
                if let Some(done) = req.claim(txn).await? {
                    return Ok((ItemChange::from_event(&done)?, vec![]));
                }
            }
            // The stream row lock is taken before the item is read: it serialises every
            // change to the zone, so the item read cannot go stale. The key check, if
            // still to make, is folded in first.
            let read = match change.first.take() {
                Some(rows) => Store::seq_and_item_from(txn, rows, &stream, key).await?,
                None => {
                    let key = change.check.pending();
                    Store::next_seq_and_item(txn, &stream, item_id, key).await?
                }
            };
            change.check.settle(read.key_valid)?;
            let seq = read.seq;
            let before = in_zone(read.item, item_id, &stream)?;
            let at = now();
            let after = patch.apply(&before, at)?;
            let same = after.quantity == before.quantity
                && after.name == before.name
                && after.low_stock_threshold == before.low_stock_threshold;
            if same {
                // Nothing changes: no event, no new version (and the key, if any, is
                // not kept: the transaction is rolled back).
                let unchanged = ItemChange {
                    event_id: seq - 1,
                    item: before,
                    changed: false,
                };
                return Ok((unchanged, vec![]));
            }
            let kind = if patch.changes_quantity() {
                EventKind::StockUpdated
            } else {
                EventKind::ItemUpdated
            };
            let reason = patch.reason().map(str::to_owned);
            let data = json(&ItemEventData::new(&after, Some(&before), reason, actor))?;
            let crossing = !before.is_low() && after.is_low();
            let ev = if folded && !crossing {
                // The change's last statement, and nothing reads what it writes before
                // the commit: it runs in the next call on the transaction (in a group,
                // with the next change's savepoint).
                let new = NewEvent {
                    stream: &stream,
                    seq,
                    kind,
                    data,
                    request_id: req.id(),
                    at,
                };
                let (last, ev) = Store::save_and_append_last(&after, new)?;
                change.defer(last);
                ev
            } else {
                req.save_and_append(txn, &after, &stream, seq, kind, data, at)
                    .await?
            };
            let mut events = vec![];
            if crossing {
                events.push(low_stock_alert(txn, &after, ev.seq, at).await?);
                // Each watcher of the zone gets a notification, in the same transaction.
                let alert = NewNotification::stock_alert(&after, ev.seq);
                for user in Store::watchers_in(txn, after.zone_id).await? {
                    let (_, evs) = super::notifications::notify_in(txn, &user, &alert, at).await?;
                    events.extend(evs);
                }
            }
            events.insert(0, ev);
            Ok((ItemChange::from_event(&events[0])?, events))
        })
        .await
    }

    pub async fn delete_item(
        &self,
        item_id: i32,
        request_id: Option<String>,
        by: &Principal,
    ) -> Result<ItemChange, ServiceError> {
        let stream = self.item_stream(item_id, by).await?;
        let actor = by.name.as_str();
        let req = Requested::new(by, request_id.as_deref(), json!(["delete_item", item_id]));
        let deleted = self
            .write(by, async |txn| {
                if let Some(done) = req.claim(txn).await? {
                    return Ok((ItemChange::from_event(&done)?, vec![]));
                }
                let seq = Store::next_seq(txn, &stream).await?;
                let item = item_of(txn, item_id, &stream).await?;
                Store::delete_item(txn, item_id).await?;
                let at = now();
                let data = json(&ItemEventData::new(&item, None, None, actor))?;
                let ev = req
                    .append(txn, &stream, seq, EventKind::ItemDeleted, data, at)
                    .await?;
                Ok((ItemChange::from_event(&ev)?, vec![ev]))
            })
            .await;
        if deleted.is_ok() {
            self.item_zones.remove(&item_id);
        }
        deleted
    }

    /// The stream of the zone an item belongs to, once `by` is known to be allowed to
    /// change it. The zone comes from `item_zones` when it is there: an entry can only
    /// outlive its item, and the change reads the item in its transaction under the
    /// zone's lock anyway (`item_of`: 404 if it has gone). Never used to say that an
    /// item exists, nor for a caller who may not write the remembered zone.
    async fn item_stream(&self, item_id: i32, by: &Principal) -> Result<StreamKey, ServiceError> {
        if let Some(zone_id) = self.item_zones.get(&item_id)
            && by.require_write(zone_id).is_ok()
        {
            return Ok(StreamKey::Zone(zone_id));
        }
        // Unknown, or not writable: the database says whether the item exists (404)
        // before the caller's rights are refused (403), as without the cache.
        let zone_id = self
            .store
            .item_zone(item_id)
            .await?
            .ok_or(DomainError::NotFound("item"))?;
        by.require_write(zone_id)?;
        self.item_zones.insert(item_id, zone_id);
        Ok(StreamKey::Zone(zone_id))
    }
}

/// The item, read under its zone's lock; 404 when it has gone.
async fn item_of(
    txn: &DatabaseTransaction,
    item_id: i32,
    stream: &StreamKey,
) -> Result<Item, ServiceError> {
    in_zone(Store::item_in(txn, item_id).await?, item_id, stream)
}

/// The item read under its zone's lock, checked to be of that zone; 404 when it has
/// gone.
fn in_zone(found: Option<Item>, item_id: i32, stream: &StreamKey) -> Result<Item, ServiceError> {
    let item = found.ok_or(DomainError::NotFound("item"))?;
    if *stream != StreamKey::Zone(item.zone_id) {
        // Items never change zones: a cached zone cannot be wrong unless ids are reused.
        return Err(crate::store::StoreError::Corrupt(format!(
            "item {item_id} is in zone {}, not {stream}",
            item.zone_id
        ))
        .into());
    }
    Ok(item)
}

async fn low_stock_alert(
    txn: &DatabaseTransaction,
    item: &Item,
    zone_event_id: u64,
    at: chrono::DateTime<Utc>,
) -> Result<Event, ServiceError> {
    let stream = StreamKey::Alerts;
    let seq = Store::next_seq(txn, &stream).await?;
    let data = json(&LowStockData {
        zone_id: item.zone_id,
        item_id: item.id,
        sku: item.sku.clone(),
        name: item.name.clone(),
        quantity: item.quantity,
        low_stock_threshold: item.low_stock_threshold,
        zone_event_id,
    })?;
    let new = NewEvent {
        stream: &stream,
        seq,
        kind: EventKind::LowStockAlert,
        data,
        request_id: None,
        at,
    };
    Ok(Store::append(txn, new).await?)
}
