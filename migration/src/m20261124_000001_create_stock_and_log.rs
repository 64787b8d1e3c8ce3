//! Zones, items, and the change log (`streams` + `events`).
//!
//! `events.data` is TEXT, not JSON/JSONB: the bytes written are the bytes replayed, so an
//! event read back from the log renders identically to the one published live.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Zones::Table)
                    .if_not_exists()
                    .col(pk_auto(Zones::Id))
                    .col(string(Zones::Name))
                    .col(timestamp_with_time_zone(Zones::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Items::Table)
                    .if_not_exists()
                    .col(pk_auto(Items::Id))
                    .col(integer(Items::ZoneId))
                    .col(string(Items::Sku))
                    .col(string(Items::Name))
                    .col(big_integer(Items::Quantity))
                    .col(big_integer(Items::LowStockThreshold))
                    .col(big_integer(Items::Version))
                    .col(timestamp_with_time_zone(Items::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_items_zone")
                            .from(Items::Table, Items::ZoneId)
                            .to(Zones::Table, Zones::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_items_zone_sku")
                    .table(Items::Table)
                    .col(Items::ZoneId)
                    .col(Items::Sku)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Streams::Table)
                    .if_not_exists()
                    .col(string(Streams::Key).primary_key())
                    .col(big_integer(Streams::LastSeq).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Events::Table)
                    .if_not_exists()
                    .col(string(Events::Stream))
                    .col(big_integer(Events::Seq))
                    .col(string(Events::Type))
                    .col(text(Events::Data))
                    .col(string_null(Events::RequestId))
                    .col(timestamp_with_time_zone(Events::CreatedAt))
                    .primary_key(Index::create().col(Events::Stream).col(Events::Seq))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_events_stream_request")
                    .table(Events::Table)
                    .col(Events::Stream)
                    .col(Events::RequestId)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_events_created_at")
                    .table(Events::Table)
                    .col(Events::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Events::Table.into_iden(),
            Streams::Table.into_iden(),
            Items::Table.into_iden(),
            Zones::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Zones {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Items {
    Table,
    Id,
    ZoneId,
    Sku,
    Name,
    Quantity,
    LowStockThreshold,
    Version,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Streams {
    Table,
    Key,
    LastSeq,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Stream,
    Seq,
    Type,
    Data,
    RequestId,
    CreatedAt,
}
