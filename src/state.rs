//! What every request handler and transport shares: the service, the credentials, the
//! limits, the configuration, the shutdown signal, and the server's slots. Imports no
//! handler: handlers import it.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::ServeArgs;
use crate::credentials::Authenticator;
use crate::limits::Limits;
use crate::server::Slots;
use crate::service::Service;

#[derive(Clone)]
pub struct AppState {
    /// This node's id (`--node-id`).
    pub node: Arc<str>,
    pub service: Service,
    pub config: Arc<ServeArgs>,
    pub auth: Authenticator,
    pub limits: Arc<Limits>,
    /// Turns `true` once shutdown starts; every open stream watches it and ends, so
    /// graceful shutdown does not wait out its grace on streams that never end.
    pub shutdown: watch::Receiver<bool>,
    /// The server's connection slots (open sockets, for `/api/stats`).
    pub slots: Slots,
}
