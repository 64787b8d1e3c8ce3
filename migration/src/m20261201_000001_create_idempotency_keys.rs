//! Idempotency keys belong to their principal, and remember what they were used for.
//!
//! Before, a key was looked up by `(stream, request_id)` on the event it produced, so
//! two principals (or two items of one zone) shared one key space and a second client's
//! write could be answered with the first one's result. Now a key is
//! `(principal, key)`, with a fingerprint of the request it was first used for and the
//! event that request appended; the unique index that tied keys to streams goes.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(IdempotencyKeys::Table)
                    .if_not_exists()
                    .col(string(IdempotencyKeys::Principal))
                    .col(string(IdempotencyKeys::Key))
                    .col(string(IdempotencyKeys::Fingerprint))
                    .col(string(IdempotencyKeys::Stream))
                    .col(big_integer(IdempotencyKeys::Seq))
                    .col(timestamp_with_time_zone(IdempotencyKeys::CreatedAt))
                    .primary_key(
                        Index::create()
                            .col(IdempotencyKeys::Principal)
                            .col(IdempotencyKeys::Key),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_idempotency_keys_event")
                    .table(IdempotencyKeys::Table)
                    .col(IdempotencyKeys::Stream)
                    .col(IdempotencyKeys::Seq)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("ux_events_stream_request")
                    .table(Events::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(IdempotencyKeys::Table)
                    .if_exists()
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
            .await
    }
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    Principal,
    Key,
    Fingerprint,
    Stream,
    Seq,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Stream,
    RequestId,
}
