//! zonecast: a real-time stock notification server.
//!
//! Every change is one transaction that updates the rows and appends one event with
//! the next gapless seq of its stream; after commit the event is published; every
//! subscriber reads through a cursor that emits seqs strictly consecutively, filling
//! any gap from the recent-event cache or the change log (DESIGN §1).
//!
//! Map of the modules, in the order data flows:
//! - `config`: command line and environment.
//! - `domain`: validated types (zones, items, changes, stream keys).
//! - `store`: the only place with SQL: stock rows and the change log.
//! - `service`: one transaction per change, publish after commit;
//!   `notifications`: the per-user side of it (notifications, watches, announcements).
//! - `event`: an event rendered once (JSON + SSE frame).
//! - `broker`: where committed events enter the node: cache + hub.
//! - `cache`: recent events per stream, for replays without queries.
//! - `hub`: one broadcast channel per live stream; no DB, no HTTP.
//! - `cursor`: the gapless per-subscriber feed, transport-agnostic.
//! - `transport::sse`, `transport::sse_multi`: SSE streams (one stream per
//!   connection, or several on one); `transport::ws`, `ws_protocol`: WebSocket.
//! - `auth`: principals, API keys, JWTs, revocation; `limits`: rate limits.
//! - `api`: REST (OpenAPI), authentication middleware, problem+json.
//! - `pages`: the dashboard, `zonecast.js` and the raw test pages (from `static/`).
//! - `ops`: `/metrics`, `/readyz`, the per-request span.
//! - `server`: the accept loop and HTTP connections: caps, deadlines, back-off.
//! - `app`: wiring, binding, graceful shutdown.
//! - `observe`: metrics and the connection registry behind `/api/stats`.
//! - `telemetry`: logging setup.

pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod config;
pub mod cursor;
pub mod domain;
pub mod event;
pub mod hub;
pub mod limits;
pub mod notifications;
pub mod observe;
pub mod ops;
pub mod pages;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod transport;
