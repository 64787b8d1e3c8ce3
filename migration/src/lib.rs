//! Schema migrations for zonecast, run at start-up and by `zonecast migrate`.
//!
//! Tests build their schema through these migrations, never from the entities, so the
//! schema that tests prove is the schema that production runs.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_create_stock_and_log;
mod m20261125_000001_create_api_keys;
mod m20261125_000002_create_notifications;
mod m20261201_000001_create_idempotency_keys;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_create_stock_and_log::Migration),
            Box::new(m20261125_000001_create_api_keys::Migration),
            Box::new(m20261125_000002_create_notifications::Migration),
            Box::new(m20261201_000001_create_idempotency_keys::Migration),
        ]
    }
}
