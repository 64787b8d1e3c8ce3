//! The one-node broker: every event a node sees is one it committed itself, so
//! publishing is delivering to the node's own cache and hub. With SQLite, or with
//! PostgreSQL and a single node.

use std::sync::Arc;

use crate::broker::{Broker, Local};
use crate::domain::Event;

pub struct MemoryBroker {
    local: Local,
}

impl MemoryBroker {
    pub fn new(local: Local) -> Self {
        MemoryBroker { local }
    }
}

impl Broker for MemoryBroker {
    fn local(&self) -> &Local {
        &self.local
    }

    fn publish(&self, events: &[Arc<Event>]) {
        self.local.deliver(events);
    }
}
