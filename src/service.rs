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
use serde_json::json;
use sha2::Digest;

use crate::auth::{Principal, Role, ZoneScope, hash_key, new_key};
use crate::broker::Broker;
use crate::domain::{
    DomainError, Item, ItemEventData, ItemPatch, LowStockData, NewItem, Snapshot, StreamKey, Zone,
    now, zone_name,
};
use crate::event::Event;
use crate::store::{ApiKey, KeyClaim, Store, StoreError};

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
    /// The event the change appended; for a change that changed nothing, the zone's
    /// last event (the item is as of it).
    pub event_id: u64,
    pub item: Item,
    /// `false`: the request would change nothing (`delta: 0`, the same quantity);
    /// nothing was appended and the version did not move.
    pub changed: bool,
}

impl ItemChange {
    fn from_event(ev: &Event) -> Result<Self, ServiceError> {
        let data: ItemEventData = serde_json::from_str(&ev.data)
            .map_err(|e| StoreError::Corrupt(format!("event {}#{}: {e}", ev.stream, ev.seq)))?;
        Ok(ItemChange {
            event_id: ev.seq,
            item: data.item(ev.at),
            changed: true,
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
        let keyed = Keyed::new(
            by,
            request_id.as_deref(),
            json!(["create_item", zone_id, new.canonical()]),
        );
        self.write(async |txn| {
            if let Some(done) = claim(txn, keyed.as_ref()).await? {
                return Ok((ItemChange::from_event(&done)?, vec![]));
            }
            if !Store::zone_exists_in(txn, zone_id).await? {
                return Err(DomainError::NotFound("zone").into());
            }
            let seq = Store::next_seq(txn, &stream).await?;
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
            let ev = Store::append(
                txn,
                &stream,
                seq,
                "item_created",
                data,
                request_id.clone(),
                at,
            )
            .await?;
            settle(txn, keyed.as_ref(), &ev).await?;
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
        let keyed = Keyed::new(
            by,
            request_id.as_deref(),
            json!(["update_item", item_id, patch.canonical()]),
        );
        self.write(async |txn| {
            if let Some(done) = claim(txn, keyed.as_ref()).await? {
                return Ok((ItemChange::from_event(&done)?, vec![]));
            }
            // The stream row lock is taken before the item is read: it serialises every
            // change to the zone, so the item read below cannot go stale.
            let seq = Store::next_seq(txn, &stream).await?;
            let before = Store::item_in(txn, item_id)
                .await?
                .ok_or(DomainError::NotFound("item"))?;
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
            Store::save_item(txn, &after).await?;
            let kind = if patch.quantity.is_some() {
                "stock_updated"
            } else {
                "item_updated"
            };
            let data = ItemEventData::new(&after, Some(&before), patch.reason.clone(), actor);
            let ev = Store::append(
                txn,
                &stream,
                seq,
                kind,
                json(&data)?,
                request_id.clone(),
                at,
            )
            .await?;
            settle(txn, keyed.as_ref(), &ev).await?;
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
        let keyed = Keyed::new(by, request_id.as_deref(), json!(["delete_item", item_id]));
        self.write(async |txn| {
            if let Some(done) = claim(txn, keyed.as_ref()).await? {
                return Ok((ItemChange::from_event(&done)?, vec![]));
            }
            let seq = Store::next_seq(txn, &stream).await?;
            let item = Store::item_in(txn, item_id)
                .await?
                .ok_or(DomainError::NotFound("item"))?;
            Store::delete_item(txn, item_id).await?;
            let at = now();
            let data = json(&ItemEventData::new(&item, None, None, actor))?;
            let ev = Store::append(
                txn,
                &stream,
                seq,
                "item_deleted",
                data,
                request_id.clone(),
                at,
            )
            .await?;
            settle(txn, keyed.as_ref(), &ev).await?;
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
        if !by.may_grant(role, &zones, user.as_deref()) {
            return Err(DomainError::Forbidden(format!(
                "{} may only create keys within its own role ({}) and zones ({}){}",
                by.name,
                by.role,
                by.zones,
                if by.zones == ZoneScope::All {
                    ""
                } else {
                    ", bound to no user or its own"
                }
            ))
            .into());
        }
        if let ZoneScope::Only(ids) = &zones {
            for id in ids {
                if self.store.zone(*id).await?.is_none() {
                    return Err(DomainError::Invalid(format!("zone {id} does not exist")).into());
                }
            }
        }
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

    /// The keys `by` may see: those it could have created itself.
    pub async fn keys(&self, by: &Principal) -> Result<Vec<ApiKey>, ServiceError> {
        by.require_admin("manage keys")?;
        let mut keys = self.store.api_keys().await?;
        keys.retain(|k| by.may_grant(k.role, &k.zones, k.user_id.as_deref()));
        Ok(keys)
    }

    /// Revokes a key `by` may see; any other is "not found", so nothing says it exists.
    pub async fn revoke_key(&self, by: &Principal, name: &str) -> Result<ApiKey, ServiceError> {
        by.require_admin("manage keys")?;
        let visible = self
            .store
            .api_key_by_name(name)
            .await?
            .is_some_and(|k| by.may_grant(k.role, &k.zones, k.user_id.as_deref()));
        if !visible {
            return Err(DomainError::NotFound("key").into());
        }
        Ok(self
            .store
            .revoke_api_key(name, now())
            .await?
            .ok_or(DomainError::NotFound("key"))?)
    }

    /// Connections and totals of this node as `by` may see them: an admin of every
    /// zone sees everything; an admin of some zones sees only connections reading a
    /// stream it could read itself, and only those streams. Delivery totals are the
    /// node's (they carry no names, and `/metrics` shows them anyway).
    pub fn stats(&self, by: &Principal) -> Result<crate::observe::Snapshot, ServiceError> {
        by.require_admin("read stats")?;
        Ok(if by.zones == ZoneScope::All {
            self.broker.stats.snapshot(None)
        } else {
            self.broker
                .stats
                .snapshot(Some(&|stream: &str| by.sees_stream(stream)))
        })
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

/// An idempotency key with its owner and the fingerprint of the request it came with.
pub(crate) struct Keyed<'a> {
    principal: &'a str,
    key: &'a str,
    fingerprint: String,
}

impl<'a> Keyed<'a> {
    /// `request` names the operation, its target and its parsed body, so the same
    /// change over REST or WebSocket has the same fingerprint.
    pub(crate) fn new(
        by: &'a Principal,
        key: Option<&'a str>,
        request: serde_json::Value,
    ) -> Option<Self> {
        Some(Keyed {
            principal: &by.name,
            key: key?,
            fingerprint: hex::encode(sha2::Sha256::digest(request.to_string().as_bytes())),
        })
    }
}

/// Claims the key for this transaction; for a key already used, the event the
/// original request appended (same request) or `idempotency_key_reused` (another).
pub(crate) async fn claim(
    txn: &DatabaseTransaction,
    keyed: Option<&Keyed<'_>>,
) -> Result<Option<Event>, ServiceError> {
    let Some(k) = keyed else {
        return Ok(None);
    };
    match Store::claim_key(txn, k.principal, k.key, &k.fingerprint, now()).await? {
        KeyClaim::New => Ok(None),
        KeyClaim::Used {
            fingerprint,
            stream,
            seq,
        } => {
            if fingerprint != k.fingerprint {
                return Err(DomainError::IdempotencyKeyReused(k.key.to_owned()).into());
            }
            let ev = Store::event_in(txn, &stream, seq).await?.ok_or_else(|| {
                DomainError::Conflict(format!(
                    "the result of idempotency key {:?} is no longer kept; use a new key",
                    k.key
                ))
            })?;
            Ok(Some(ev))
        }
    }
}

pub(crate) async fn settle(
    txn: &DatabaseTransaction,
    keyed: Option<&Keyed<'_>>,
    ev: &Event,
) -> Result<(), ServiceError> {
    if let Some(k) = keyed {
        Store::settle_key(txn, k.principal, k.key, &ev.stream, ev.seq).await?;
    }
    Ok(())
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
