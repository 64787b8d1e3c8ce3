//! What every HTTP-facing part shares (REST, SSE, the WebSocket handshake, the
//! operator endpoints): problem+json (`problem`, the one place that picks status
//! codes), the authentication and write-limit middlewares (`access`), the request body
//! limit (`body`), JSON bodies that name the member at fault (`json_body`), and the
//! wire shapes REST and WebSocket both send (`wire`).

pub mod access;
pub mod body;
pub mod json_body;
pub mod problem;
pub mod wire;
