//! Transports: how cursors reach clients. They parse requests, open cursors and write
//! frames; they hold no state of their own beyond one connection.

pub mod sse;
pub mod sse_multi;
pub mod ws;
pub mod ws_protocol;
pub mod ws_socket;
