//! API keys: stored only as a SHA-256 hash of the secret (keys are 256 random bits,
//! so a fast hash suffices); revocation keeps the row for the audit trail.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .if_not_exists()
                    .col(pk_auto(ApiKeys::Id))
                    .col(string_uniq(ApiKeys::Name))
                    .col(string_uniq(ApiKeys::Hash))
                    .col(string(ApiKeys::Role))
                    .col(string(ApiKeys::Zones))
                    .col(string_null(ApiKeys::UserId))
                    .col(timestamp_with_time_zone(ApiKeys::CreatedAt))
                    .col(timestamp_with_time_zone_null(ApiKeys::RevokedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ApiKeys::Table).if_exists().to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    Name,
    Hash,
    Role,
    Zones,
    UserId,
    CreatedAt,
    RevokedAt,
}
