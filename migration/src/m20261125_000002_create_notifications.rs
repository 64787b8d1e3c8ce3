//! Per-user notifications and zone watches (who gets `stock_alert` notifications).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Notifications::Table)
                    .if_not_exists()
                    .col(pk_auto(Notifications::Id))
                    .col(string(Notifications::UserId))
                    .col(string(Notifications::Kind))
                    .col(string(Notifications::Priority))
                    .col(string(Notifications::Subject))
                    .col(text(Notifications::Message))
                    .col(text(Notifications::Data))
                    .col(timestamp_with_time_zone(Notifications::CreatedAt))
                    .col(timestamp_with_time_zone_null(Notifications::ReadAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_notifications_user")
                    .table(Notifications::Table)
                    .col(Notifications::UserId)
                    .col(Notifications::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Watches::Table)
                    .if_not_exists()
                    .col(string(Watches::UserId))
                    .col(integer(Watches::ZoneId))
                    .col(timestamp_with_time_zone(Watches::CreatedAt))
                    .primary_key(Index::create().col(Watches::UserId).col(Watches::ZoneId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_watches_zone")
                            .from(Watches::Table, Watches::ZoneId)
                            .to(Zones::Table, Zones::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_watches_zone")
                    .table(Watches::Table)
                    .col(Watches::ZoneId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for t in [Watches::Table.into_iden(), Notifications::Table.into_iden()] {
            manager
                .drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    Id,
    UserId,
    Kind,
    Priority,
    Subject,
    Message,
    Data,
    CreatedAt,
    ReadAt,
}

#[derive(DeriveIden)]
enum Watches {
    Table,
    UserId,
    ZoneId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Zones {
    Table,
    Id,
}
