//! `api_keys`: API keys created by `AdminService/CreateApiKey`. A key is shown once and stored
//! only as the SHA-256 of its secret part; `key_id` (the public prefix of the key) finds the row.
//! A key is bound to one workspace (`workspace_id`), or to all of them (NULL, admins only), and
//! has one role. Revoking sets `revoked_at`; rows are never deleted (the audit names key ids).

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
                    .col(big_pk_auto(ApiKeys::Id))
                    .col(text_uniq(ApiKeys::KeyId))
                    .col(text(ApiKeys::Name))
                    .col(text(ApiKeys::Role))
                    .col(big_integer_null(ApiKeys::WorkspaceId))
                    .col(text(ApiKeys::SecretHash))
                    .col(text(ApiKeys::CreatedBy))
                    .col(timestamp_with_time_zone(ApiKeys::CreatedAt))
                    .col(timestamp_with_time_zone_null(ApiKeys::RevokedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_keys_workspace_id")
                            .from(ApiKeys::Table, ApiKeys::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ApiKeys::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    KeyId,
    Name,
    Role,
    WorkspaceId,
    SecretHash,
    CreatedBy,
    CreatedAt,
    RevokedAt,
}
