//! The service layer: each change is ONE transaction that updates the rows and appends
//! exactly one event to its stream (plus a `low_stock_alert` on `alerts` when an item
//! crosses into low stock), and is published only after commit.
//!
//! No HTTP or WebSocket types here: transports parse their input into domain types,
//! call these methods, and map `ServiceError` to their own wire form.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sea_orm::DatabaseTransaction;

use crate::auth::{Principal, Role, ZoneScope, hash_key, new_key};
use crate::broker::Broker;
use crate::domain::{
    DomainError, Item, ItemEventData, ItemPatch, LowStockData, NewItem, Snapshot, StreamKey, Zone,
    now, zone_name,
};
use crate::event::Event;
use crate::store::{ApiKey, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for ServiceError {
    fn from(e: sea_orm::DbErr) -> Self {
        ServiceError::Store(e.into())
    }
}

/// The result of an item change, rebuilt from its logged event so that a repeated
/// idempotency key answers with exactly the same result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemChange {
    pub event_id: u64,
    pub item: Item,
}

impl ItemChange {
    fn from_event(ev: &Event) -> Result<Self, ServiceError> {
        let data: ItemEventData = serde_json::from_str(&ev.data)
            .map_err(|e| StoreError::Corrupt(format!("event {}#{}: {e}", ev.stream, ev.seq)))?;
        Ok(ItemChange {
            event_id: ev.seq,
            item: data.item(ev.at),
        })
    }
}

#[derive(Clone)]
pub struct Service {
    pub store: Store,
    pub broker: Broker,
}

/// Events of one transaction, published together after it commits.
type Outcome<T> = Result<(T, Vec<Event>), ServiceError>;

fn json<T: serde::Serialize>(v: &T) -> Result<String, ServiceError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()).into())
}

impl Service {
    pub fn new(store: Store, broker: Broker) -> Self {
        Service { store, broker }
    }

    /// Runs `body` in a write transaction: commit and publish on success, roll back on
    /// error, so a refused change applies nothing.
    pub(crate) async fn write<T, F>(&self, body: F) -> Result<T, ServiceError>
    where
        F: AsyncFnOnce(&DatabaseTransaction) -> Outcome<T>,
    {
        let started = std::time::Instant::now();
        let txn = self.store.begin_write().await?;
        let result = body(&txn).await;
        metrics::histogram!("zonecast_write_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            // A replayed idempotency key appends nothing: roll back, or the seq taken
            // under the lock would be committed without its event, leaving a gap.
            Ok((value, events)) if events.is_empty() => {
                txn.rollback().await?;
                Ok(value)
            }
            Ok((value, events)) => {
                txn.commit().await?;
                let committed = std::time::Instant::now();
                let events: Vec<Arc<Event>> = events
                    .into_iter()
                    .map(|mut e| {
                        metrics::counter!("zonecast_events_appended_total",
                            "stream_kind" => crate::observe::stream_kind(&e.stream), "type" => e.kind.clone())
                        .increment(1);
                        e.committed = Some(committed);
                        Arc::new(e)
                    })
                    .collect();
                self.broker.publish(&events);
                Ok(value)
            }
            Err(e) => {
                txn.rollback().await?;
                Err(e)
            }
        }
    }

    pub async fn create_zone(&self, by: &Principal, name: &str) -> Result<Zone, ServiceError> {
        by.require_admin("create zones")?;
        let name = zone_name(name)?;
        Ok(self.store.create_zone(&name, now()).await?)
    }

    /// The zones `by` may see.
    pub async fn zones(&self, by: &Principal) -> Result<Vec<Zone>, ServiceError> {
        let mut zones = self.store.zones().await?;
        zones.retain(|z| by.zones.contains(z.id));
        Ok(zones)
    }

    pub async fn zone(&self, id: i32) -> Result<Zone, ServiceError> {
        self.store
            .zone(id)
            .await?
            .ok_or(DomainError::NotFound("zone").into())
    }

    pub async fn snapshot(&self, zone_id: i32) -> Result<Snapshot, ServiceError> {
        self.store
            .snapshot(zone_id)
            .await?
            .ok_or(DomainError::NotFound("zone").into())
    }

    /// A page of the zone's change log: events with seq > `after`.
    pub async fn events(
        &self,
        zone_id: i32,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Event>, ServiceError> {
        self.zone(zone_id).await?;
        let stream = StreamKey::Zone(zone_id).to_string();
        Ok(self
            .store
            .read_from(&stream, after.saturating_add(1), limit)
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
        let stream = StreamKey::Zone(zone_id).to_string();
        self.write(async |txn| {
            if !Store::zone_exists_in(txn, zone_id).await? {
                return Err(DomainError::NotFound("zone").into());
            }
            let seq = Store::next_seq(txn, &stream).await?;
            if let Some(done) = replay(txn, &stream, request_id.as_deref()).await? {
                return Ok((done, vec![]));
            }
            if Store::sku_taken(txn, zone_id, &new.sku).await? {
                return Err(DomainError::Conflict(format!(
                    "sku {:?} already exists in zone {zone_id}",
                    new.sku
                ))
                .into());
            }
            let at = now();
            let item = Store::insert_item(txn, zone_id, &new, at).await?;
            let data = json(&ItemEventData::new(&item, None, None, actor))?;
            let ev = Store::append(txn, &stream, seq, "item_created", data, request_id, at).await?;
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
        self.write(async |txn| {
            // The stream row lock is taken first: it serialises every change to the
            // zone, so the item read below cannot go stale before the update.
            let seq = Store::next_seq(txn, &stream).await?;
            if let Some(done) = replay(txn, &stream, request_id.as_deref()).await? {
                return Ok((done, vec![]));
            }
            let before = Store::item_in(txn, item_id)
                .await?
                .ok_or(DomainError::NotFound("item"))?;
            let at = now();
            let after = patch.apply(&before, at)?;
            Store::save_item(txn, &after).await?;
            let kind = if patch.quantity.is_some() {
                "stock_updated"
            } else {
                "item_updated"
            };
            let data = ItemEventData::new(&after, Some(&before), patch.reason.clone(), actor);
            let ev = Store::append(txn, &stream, seq, kind, json(&data)?, request_id, at).await?;
            let mut events = vec![];
            if !before.is_low() && after.is_low() {
                events.push(low_stock_alert(txn, &after, ev.seq, at).await?);
                // Each watcher of the zone gets a notification, in the same transaction.
                let alert = crate::notifications::stock_alert(&after, ev.seq);
                for user in Store::watchers_in(txn, after.zone_id).await? {
                    let (_, evs) = crate::notifications::notify_in(txn, &user, &alert, at).await?;
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
        self.write(async |txn| {
            let seq = Store::next_seq(txn, &stream).await?;
            if let Some(done) = replay(txn, &stream, request_id.as_deref()).await? {
                return Ok((done, vec![]));
            }
            let item = Store::item_in(txn, item_id)
                .await?
                .ok_or(DomainError::NotFound("item"))?;
            Store::delete_item(txn, item_id).await?;
            let at = now();
            let data = json(&ItemEventData::new(&item, None, None, actor))?;
            let ev = Store::append(txn, &stream, seq, "item_deleted", data, request_id, at).await?;
            Ok((ItemChange::from_event(&ev)?, vec![ev]))
        })
        .await
    }

    /// The stream of the zone an item belongs to (items never change zones), once
    /// `by` is known to be allowed to change it.
    async fn item_stream(&self, item_id: i32, by: &Principal) -> Result<String, ServiceError> {
        let zone_id = self
            .store
            .item_zone(item_id)
            .await?
            .ok_or(DomainError::NotFound("item"))?;
        by.require_write(zone_id)?;
        Ok(StreamKey::Zone(zone_id).to_string())
    }

    /// Creates an API key; the secret is returned here once and stored only hashed.
    pub async fn create_key(
        &self,
        by: &Principal,
        name: &str,
        role: Role,
        zones: ZoneScope,
        user: Option<&str>,
    ) -> Result<(ApiKey, String), ServiceError> {
        by.require_admin("manage keys")?;
        let name = crate::domain::key_name(name)?;
        let user = user.map(crate::domain::user_id).transpose()?;
        let secret = new_key().map_err(|e| StoreError::Corrupt(format!("no randomness: {e}")))?;
        let key = self
            .store
            .insert_api_key(
                &name,
                &hash_key(&secret),
                role,
                &zones,
                user.as_deref(),
                now(),
            )
            .await?
            .ok_or_else(|| DomainError::Conflict(format!("a key named {name:?} exists")))?;
        Ok((key, secret))
    }

    pub async fn keys(&self, by: &Principal) -> Result<Vec<ApiKey>, ServiceError> {
        by.require_admin("manage keys")?;
        Ok(self.store.api_keys().await?)
    }

    pub async fn revoke_key(&self, by: &Principal, name: &str) -> Result<ApiKey, ServiceError> {
        by.require_admin("manage keys")?;
        Ok(self
            .store
            .revoke_api_key(name, now())
            .await?
            .ok_or(DomainError::NotFound("key"))?)
    }

    /// Drops events past the retention window, and forgets them in the cache too, so a
    /// resume from before the window gets `reset` whether or not it hits the cache.
    pub async fn prune(
        &self,
        max_age: Duration,
        keep_per_stream: u64,
    ) -> Result<u64, ServiceError> {
        let age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        let cutoff = Utc::now()
            .checked_sub_signed(age)
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        let deleted = self.store.prune(cutoff, keep_per_stream).await?;
        for stream in self.broker.cache.stream_keys() {
            let b = self.store.bounds(&stream).await?;
            self.broker
                .cache
                .forget_before(&stream, b.first_available());
        }
        Ok(deleted)
    }

    /// A demo zone with a handful of items, for a first run on an empty database.
    pub async fn seed_demo(&self) -> Result<Option<Zone>, ServiceError> {
        if self.store.zone_count().await? > 0 {
            return Ok(None);
        }
        let demo = Principal::system("demo");
        let zone = self.create_zone(&demo, "Demo warehouse").await?;
        for (sku, name, qty, low) in [
            ("BOLT-M6", "Bolts M6", 120, 20),
            ("NUT-M6", "Nuts M6", 200, 40),
            ("WSH-M6", "Washers M6", 90, 30),
            ("GLV-L", "Work gloves L", 12, 10),
            ("TAPE-50", "Packing tape 50 mm", 35, 8),
            ("LBL-A6", "Shipping labels A6", 500, 100),
        ] {
            let new = NewItem::parse(sku, name, qty, low)?;
            self.create_item(zone.id, new, None, &demo).await?;
        }
        Ok(Some(zone))
    }
}

/// The original result of an idempotency key already used in this stream.
async fn replay(
    txn: &DatabaseTransaction,
    stream: &str,
    request_id: Option<&str>,
) -> Result<Option<ItemChange>, ServiceError> {
    let Some(rid) = request_id else {
        return Ok(None);
    };
    match Store::find_by_request(txn, stream, rid).await? {
        Some(ev) => Ok(Some(ItemChange::from_event(&ev)?)),
        None => Ok(None),
    }
}

async fn low_stock_alert(
    txn: &DatabaseTransaction,
    item: &Item,
    zone_event_id: u64,
    at: chrono::DateTime<Utc>,
) -> Result<Event, ServiceError> {
    let stream = StreamKey::Alerts.to_string();
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
    Ok(Store::append(txn, &stream, seq, "low_stock_alert", data, None, at).await?)
}
