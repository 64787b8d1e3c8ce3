//! REST bodies. Separate from the entities and the domain types so the wire shape is
//! chosen here, once; times are written as `…Z` like the events.

use poem_openapi::Object;
use serde::Deserialize;

pub use crate::http::wire::{ItemBody, SnapshotBody};

use crate::domain::{Notification, Zone, format_time};
use crate::service::ItemChange;
use crate::store::ApiKey;

#[derive(Debug, Object)]
pub struct ZoneBody {
    pub id: i32,
    pub name: String,
    pub created_at: String,
}

impl From<Zone> for ZoneBody {
    fn from(z: Zone) -> Self {
        ZoneBody {
            id: z.id,
            name: z.name,
            created_at: format_time(&z.created_at),
        }
    }
}

#[derive(Debug, Object, Deserialize)]
pub struct CreateZone {
    pub name: String,
}

#[derive(Debug, Object, Deserialize)]
pub struct CreateItem {
    pub sku: String,
    pub name: String,
    #[oai(default)]
    #[serde(default)]
    pub quantity: i64,
    #[oai(default)]
    #[serde(default)]
    pub low_stock_threshold: i64,
}

/// Give `quantity` (absolute) or `delta` (relative), and/or `name`,
/// `low_stock_threshold`. `expected_version` makes it a compare-and-set.
#[derive(Debug, Object, Deserialize)]
pub struct PatchItem {
    pub quantity: Option<i64>,
    pub delta: Option<i64>,
    pub expected_version: Option<i64>,
    pub reason: Option<String>,
    pub name: Option<String>,
    pub low_stock_threshold: Option<i64>,
}

/// An applied change: the event it appended and the item after it.
#[derive(Debug, Object)]
pub struct ItemChangeBody {
    /// The event the change appended; when `changed` is false, the zone's last event.
    pub event_id: u64,
    pub item: ItemBody,
    /// `false` when the request changed nothing (`delta: 0`, the same quantity): no
    /// event was appended and the version did not move.
    pub changed: bool,
}

impl From<ItemChange> for ItemChangeBody {
    fn from(c: ItemChange) -> Self {
        ItemChangeBody {
            event_id: c.event_id,
            item: c.item.into(),
            changed: c.changed,
        }
    }
}

/// A page of a zone's change log; continue with `after=next_after`.
#[derive(Debug, Object)]
pub struct EventsPage {
    pub zone_id: i32,
    /// Event JSON objects, as sent on SSE and WebSocket.
    pub events: Vec<serde_json::Value>,
    pub next_after: u64,
}

#[derive(Debug, Object, Deserialize)]
pub struct CreateKey {
    pub name: String,
    /// `reader`, `writer` or `admin`.
    pub role: String,
    /// `"*"` (every zone, the default) or a list of zone ids: `[1, 2]`.
    pub zones: Option<serde_json::Value>,
    /// The user id the key acts for.
    pub user: Option<String>,
}

#[derive(Debug, Object)]
pub struct KeyBody {
    pub name: String,
    pub role: String,
    /// `"*"` or a list of zone ids.
    pub zones: serde_json::Value,
    pub user: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl From<ApiKey> for KeyBody {
    fn from(k: ApiKey) -> Self {
        KeyBody {
            name: k.name,
            role: k.role.to_string(),
            zones: k.zones.to_json(),
            user: k.user_id,
            created_at: format_time(&k.created_at),
            revoked_at: k.revoked_at.as_ref().map(format_time),
        }
    }
}

/// A new key: `key` is the secret, shown only in this reply.
#[derive(Debug, Object)]
pub struct NewKeyBody {
    pub key: String,
    #[oai(flatten)]
    pub info: KeyBody,
}

#[derive(Debug, Object)]
pub struct NotificationBody {
    pub id: i32,
    pub user_id: String,
    pub kind: String,
    /// `low`, `normal`, `high` or `urgent`.
    pub priority: String,
    pub subject: String,
    pub message: String,
    pub data: serde_json::Value,
    pub created_at: String,
    pub read_at: Option<String>,
}

impl From<Notification> for NotificationBody {
    fn from(n: Notification) -> Self {
        NotificationBody {
            id: n.id,
            user_id: n.user_id,
            kind: n.kind,
            priority: n.priority.to_string(),
            subject: n.subject,
            message: n.message,
            data: n.data,
            created_at: format_time(&n.created_at),
            read_at: n.read_at.as_ref().map(format_time),
        }
    }
}

#[derive(Debug, Object, Deserialize)]
pub struct CreateNotification {
    /// The user it is for.
    pub user_id: String,
    /// Default `message`.
    pub kind: Option<String>,
    /// Default `normal`.
    pub priority: Option<String>,
    pub subject: String,
    pub message: String,
    /// A JSON object, default `{}`.
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Object)]
pub struct UnreadCount {
    pub count: u64,
}

#[derive(Debug, Object)]
pub struct ReadBody {
    /// Notifications this call turned read.
    pub ids: Vec<i32>,
    pub unread_count: u64,
}

#[derive(Debug, Object, Deserialize)]
pub struct CreateAnnouncement {
    pub subject: String,
    pub message: String,
    pub priority: Option<String>,
}

/// Live connections and delivery totals of this node.
#[derive(Debug, Object)]
pub struct StatsBody {
    /// The node these figures are of (`--node-id`): every figure here is per node.
    pub node_id: String,
    /// `node`: ask each node for its own.
    pub scope: String,
    /// `memory` (one node) or `postgres` (several nodes).
    pub broker: String,
    /// How this node hears other nodes' events: `one_node`, `listening`, or
    /// `reconnecting` (they arrive by the sweep meanwhile).
    pub bus: String,
    /// TCP connections open on this node (streams, idle keep-alive connections and
    /// requests in flight), whoever's they are.
    pub open_sockets: u64,
    pub total_connections: u64,
    pub connections_by_stream: std::collections::BTreeMap<String, u64>,
    pub connections_by_transport: std::collections::BTreeMap<String, u64>,
    pub unique_users: u64,
    /// SSE heartbeat interval in milliseconds.
    pub heartbeat_interval: u64,
    pub metrics: StatsMetrics,
    pub fanout: StatsFanout,
}

/// The SSE fan-out: an SSE connection of its own (a plain HTTP/1.1 connection's first
/// request) is written by one task per stream once it has caught up.
#[derive(Debug, Object)]
pub struct StatsFanout {
    /// Streams with a fan-out task.
    pub groups: u64,
    /// SSE connections written by a fan-out task (the others follow on their own).
    pub members: u64,
    /// Times a connection was handed back to follow on its own: its socket could not
    /// take a whole batch (a slow reader), or it joined too far behind.
    pub handed_back: u64,
}

#[derive(Debug, Object)]
pub struct StatsMetrics {
    pub total_messages_sent: u64,
    pub total_broadcasts: u64,
    pub total_send_errors: u64,
    pub last_broadcast_at: Option<String>,
}

/// Who the credentials belong to.
#[derive(Debug, Object)]
pub struct MeBody {
    pub name: String,
    pub role: String,
    /// `"*"` or a list of zone ids.
    pub zones: serde_json::Value,
    pub user: Option<String>,
}

#[derive(Debug, Object)]
pub struct EventId {
    pub event_id: u64,
}
