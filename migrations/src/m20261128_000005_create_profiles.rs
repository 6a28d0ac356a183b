//! `profiles`: the local mirror of a workspace's Customer.io people.
//!
//! One row per person, keyed by the Customer.io `id` identifier (`customer_id`, 1 to 150
//! bytes, checked by the database). `attributes` is a JSON object: what Customer.io held at the
//! last import (`fetched_at`) with every write accepted since merged in. `email_lower` is the
//! Unicode-lowercased email, written by the application, so that email lookup is
//! case-insensitive with the same semantics on SQLite and PostgreSQL. `cio_segments` is the
//! JSON array of `{id, name}` segments Customer.io last reported for the person.

use sea_orm_migration::{prelude::*, schema::*, sea_orm::DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Longest `customer_id` in bytes (Customer.io's limit on the `id` identifier).
const MAX_CUSTOMER_ID_BYTES: u32 = 150;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Length in bytes: `octet_length` on PostgreSQL; SQLite's `length` counts characters
        // of text, so measure the text as a blob.
        let bytes = match manager.get_database_backend() {
            DbBackend::Postgres => "octet_length(customer_id)",
            _ => "length(CAST(customer_id AS BLOB))",
        };
        let customer_id_check =
            Expr::cust(format!("{bytes} BETWEEN 1 AND {MAX_CUSTOMER_ID_BYTES}"));
        manager
            .create_table(
                Table::create()
                    .table(Profiles::Table)
                    .col(big_pk_auto(Profiles::Id))
                    .col(big_integer(Profiles::WorkspaceId))
                    .col(text(Profiles::CustomerId).check(customer_id_check))
                    .col(text_null(Profiles::Email))
                    .col(text_null(Profiles::EmailLower))
                    .col(text_null(Profiles::CioId))
                    .col(json_binary(Profiles::Attributes))
                    .col(json_binary_null(Profiles::CioSegments))
                    .col(timestamp_with_time_zone(Profiles::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Profiles::FetchedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_profiles_workspace_id")
                            .from(Profiles::Table, Profiles::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_profiles_workspace_id_customer_id")
                    .table(Profiles::Table)
                    .col(Profiles::WorkspaceId)
                    .col(Profiles::CustomerId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_profiles_workspace_id_email_lower")
                    .table(Profiles::Table)
                    .col(Profiles::WorkspaceId)
                    .col(Profiles::EmailLower)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_profiles_workspace_id_cio_id")
                    .table(Profiles::Table)
                    .col(Profiles::WorkspaceId)
                    .col(Profiles::CioId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Profiles::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Profiles {
    Table,
    Id,
    WorkspaceId,
    CustomerId,
    Email,
    EmailLower,
    CioId,
    Attributes,
    CioSegments,
    UpdatedAt,
    FetchedAt,
}
