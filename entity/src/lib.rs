//! SeaORM entities for zonecast's tables. Plain rows: no HTTP shapes and no domain
//! rules live here (those are in the server's `domain` and `store` modules).

pub mod api_key;
pub mod event;
pub mod idempotency_key;
pub mod item;
pub mod notification;
pub mod stream;
pub mod watch;
pub mod zone;
