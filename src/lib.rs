//! zonecast: a real-time stock notification server.
//!
//! Every change is one transaction that updates the rows and appends one event with
//! the next gapless seq of its stream; after commit the event is published; every
//! subscriber reads through a cursor that emits seqs strictly consecutively, filling
//! any gap from the recent-event cache or the change log (DESIGN §1).
//!
//! Map of the modules, by layer. A module uses modules of its own layer or lower ones,
//! never a higher one, and no two modules use each other (`tests/api/layers.rs` reads
//! this list and fails on an upward edge or a cycle).
//!
//! - `domain` (0): validated types: zones, items, changes, stream keys, principals and
//!   their scopes, notifications, events rendered once (JSON + SSE frame).
//! - `limits` (0): rate limiters with bounded keys.
//! - `server` (0): the accept loop and HTTP connections: caps, deadlines, back-off, TLS,
//!   and the hand-over of a connection's socket to a transport after its first request.
//! - `telemetry` (0): logging setup.
//! - `config` (1): command line and environment.
//! - `observe` (1): metrics and the connection registry behind `/api/stats`.
//! - `pace` (1): how far each stream's fan-out on this node has written; a change's
//!   answer waits while it is too far behind (reported by `transport`, awaited by
//!   `service`).
//! - `store` (1): the only place with SQL: stock rows, the change log, keys,
//!   notifications, idempotency keys.
//! - `cache` (2): recent events per stream, for replays without queries.
//! - `hub` (2): one broadcast channel per live stream; no DB, no HTTP.
//! - `broker` (2): the `Broker` trait, where committed events enter the node, and its
//!   node-local half (cache + hub); `broker_memory` (2): the one-node broker;
//!   `broker_postgres` (2): several nodes on one PostgreSQL (LISTEN/NOTIFY + sweep).
//! - `cursor` (2): the gapless per-subscriber feed, transport-agnostic, reading history
//!   through the `History` trait.
//! - `credentials` (3): API keys, JWTs, revocation: from a request's credentials to a
//!   `Principal`.
//! - `service` (3): every read and write, with its authorization: one transaction per
//!   change, publish after commit; notifications, retention, the demo seed.
//! - `state` (4): `AppState`, what every handler is given.
//! - `http` (5): what REST and the transports share: problem+json, authentication,
//!   body limits, the item wire shapes.
//! - `api` (6): REST (OpenAPI), one `impl` per resource.
//! - `transport` (6): `open` (every transport's one way to a cursor), the renderers,
//!   the coalescing loop, non-blocking writes (`send`); SSE (`sse`, `sse_multi`,
//!   `sse_socket` for the connections the server hands over), WebSocket (`ws`,
//!   `ws_protocol`, `ws_socket`), and `fanout`: one task per stream writing to every
//!   connection that has caught up with it.
//! - `pages` (6): the dashboard, `zonecast.js` and the raw test pages (from `static/`).
//! - `ops` (6): `/metrics`, `/readyz`, the per-request span.
//! - `app` (7): wiring, binding, graceful shutdown.

pub mod api;
pub mod app;
pub mod broker;
pub mod broker_memory;
pub mod broker_postgres;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod cursor;
pub mod domain;
pub mod http;
pub mod hub;
pub mod limits;
pub mod observe;
pub mod ops;
pub mod pace;
pub mod pages;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod transport;
