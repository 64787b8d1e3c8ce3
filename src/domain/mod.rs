//! The domain: validated types and the rules on them, with no SQL, no HTTP and no I/O.
//! "Parse, don't validate": a value of these types has passed its checks, so the layers
//! above never re-check.
//!
//! - `stream`: stream keys, event kinds, what the log keeps of a stream.
//! - `item`: zones, items, and the changes that may be made to them.
//! - `access`: roles, zone scopes, the principal of a request and every check on it.
//! - `notification`: per-user notifications.
//! - `event`: a logged event, rendered once for every wire form.
//! - `error`, `time`, `text`: refusals, the wire time format, shared field checks.

mod access;
mod error;
mod event;
mod item;
mod notification;
mod stream;
mod text;
mod time;

pub use access::{Principal, Role, ZoneScope};
pub use error::DomainError;
pub use event::{Event, Reset, ResetReason, sse_frame};
pub use item::{
    Item, ItemEventData, ItemPatch, LowStockData, NewItem, QuantityTarget, Snapshot, Zone,
};
pub use notification::{NewNotification, Notification, Priority, ReadState};
pub use stream::{EventKind, LogBounds, StreamKey};
pub use text::{key_name, request_id, user_id, zone_name};
pub use time::{format_time, now};
