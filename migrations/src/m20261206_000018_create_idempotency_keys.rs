//! `idempotency_keys`: one row per caller `request_id` of an operation that creates something
//! (CreateSegment, RunJob): the request it came with (to tell a retry from a reuse), and the id
//! of what it created once that is recorded (NULL while the first call is still at work).

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
                    .col(big_pk_auto(IdempotencyKeys::Id))
                    .col(big_integer(IdempotencyKeys::WorkspaceId))
                    .col(text(IdempotencyKeys::Operation))
                    .col(text(IdempotencyKeys::RequestId))
                    .col(json_binary(IdempotencyKeys::Request))
                    .col(big_integer_null(IdempotencyKeys::ResultId))
                    .col(timestamp_with_time_zone(IdempotencyKeys::CreatedAt))
                    .col(timestamp_with_time_zone(IdempotencyKeys::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_idempotency_keys_workspace_id")
                            .from(IdempotencyKeys::Table, IdempotencyKeys::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_idempotency_keys_workspace_id_operation_request_id")
                    .table(IdempotencyKeys::Table)
                    .col(IdempotencyKeys::WorkspaceId)
                    .col(IdempotencyKeys::Operation)
                    .col(IdempotencyKeys::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(IdempotencyKeys::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum IdempotencyKeys {
    Table,
    Id,
    WorkspaceId,
    Operation,
    RequestId,
    Request,
    ResultId,
    CreatedAt,
    UpdatedAt,
}
