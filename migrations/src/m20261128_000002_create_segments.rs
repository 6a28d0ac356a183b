//! `segments`: the local mirror of a workspace's Customer.io segments.
//!
//! Rows are never deleted by a sync: a segment that disappears from Customer.io is flagged
//! `removed` (with `removed_at`) and cleared again if it reappears. `name_lower` holds the
//! Unicode-lowercased name, written by the application, so that name search is
//! case-insensitive with the same semantics on SQLite and PostgreSQL.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Unique key, and the index that serves listing a workspace's segments by `cio_id`.
const UNIQUE_WORKSPACE_CIO_ID: &str = "ux_segments_workspace_id_cio_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Segments::Table)
                    .col(big_pk_auto(Segments::Id))
                    .col(big_integer(Segments::WorkspaceId))
                    .col(big_integer(Segments::CioId))
                    .col(text(Segments::Name))
                    .col(text(Segments::NameLower))
                    .col(text_null(Segments::Description))
                    .col(
                        text(Segments::SegmentType)
                            .check(Expr::col(Segments::SegmentType).is_in(["dynamic", "manual"])),
                    )
                    .col(big_integer_null(Segments::MemberCount))
                    .col(timestamp_with_time_zone_null(Segments::CountedAt))
                    .col(timestamp_with_time_zone(Segments::SyncedAt))
                    .col(boolean(Segments::Removed).default(false))
                    .col(timestamp_with_time_zone_null(Segments::RemovedAt))
                    .col(timestamp_with_time_zone(Segments::CreatedAt))
                    .col(timestamp_with_time_zone(Segments::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_segments_workspace_id")
                            .from(Segments::Table, Segments::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(UNIQUE_WORKSPACE_CIO_ID)
                    .table(Segments::Table)
                    .col(Segments::WorkspaceId)
                    .col(Segments::CioId)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Segments::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Segments {
    Table,
    Id,
    WorkspaceId,
    CioId,
    Name,
    NameLower,
    Description,
    SegmentType,
    MemberCount,
    CountedAt,
    SyncedAt,
    Removed,
    RemovedAt,
    CreatedAt,
    UpdatedAt,
}
