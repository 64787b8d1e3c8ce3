//! The item and snapshot shapes REST answers with and WebSocket replies carry: one
//! definition, so `ack.item` and a REST change's `item` cannot drift apart. Times are
//! written `…Z`, like the events.

use poem_openapi::Object;
use serde::Serialize;

use crate::domain::{Item, Snapshot, format_time};

#[derive(Debug, Object, Serialize)]
pub struct ItemBody {
    pub id: i32,
    pub zone_id: i32,
    pub sku: String,
    pub name: String,
    pub quantity: i64,
    pub low_stock_threshold: i64,
    /// `quantity <= low_stock_threshold`.
    pub low_stock: bool,
    pub version: i64,
    pub updated_at: String,
}

impl From<Item> for ItemBody {
    fn from(i: Item) -> Self {
        ItemBody {
            low_stock: i.is_low(),
            id: i.id,
            zone_id: i.zone_id,
            sku: i.sku,
            name: i.name,
            quantity: i.quantity,
            low_stock_threshold: i.low_stock_threshold,
            version: i.version,
            updated_at: format_time(&i.updated_at),
        }
    }
}

/// The zone's items exactly as of event `last_event_id`: subscribe with
/// `Last-Event-ID: last_event_id` to continue from it.
#[derive(Debug, Object, Serialize)]
pub struct SnapshotBody {
    pub zone_id: i32,
    pub last_event_id: u64,
    pub items: Vec<ItemBody>,
}

impl From<Snapshot> for SnapshotBody {
    fn from(s: Snapshot) -> Self {
        SnapshotBody {
            zone_id: s.zone_id,
            last_event_id: s.last_event_id,
            items: s.items.into_iter().map(Into::into).collect(),
        }
    }
}
