//! `profile_sync_state`: where the Customer.io → SharpSend profile sync of a workspace stands
//! (one row per workspace).
//!
//! - The activity-feed cursor: `cursor_id` / `cursor_at` are the newest `attribute_change`
//!   activity already applied to the mirror (its opaque id and unix time); `feed_read_at` is
//!   when the feed was last read down to the cursor (so a quiet feed does not age the cursor
//!   out of Customer.io's 30-day window). NULL cursor: never synced, a backfill comes first.
//! - A backfill in progress: `export_id` (the Customer.io export being built or loaded, reused
//!   after a crash instead of starting another), `export_requested_at`, and the feed's top
//!   activity read just before the export was requested (`export_top_id` / `export_top_at`),
//!   which becomes the cursor once the file is loaded. `backfill_loaded` counts rows loaded so
//!   far (progress); `last_backfill_at` is when the last backfill finished.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ProfileSyncState::Table)
                    .col(big_integer(ProfileSyncState::WorkspaceId).primary_key())
                    .col(text_null(ProfileSyncState::CursorId))
                    .col(big_integer_null(ProfileSyncState::CursorAt))
                    .col(timestamp_with_time_zone_null(ProfileSyncState::FeedReadAt))
                    .col(big_integer_null(ProfileSyncState::ExportId))
                    .col(timestamp_with_time_zone_null(
                        ProfileSyncState::ExportRequestedAt,
                    ))
                    .col(text_null(ProfileSyncState::ExportTopId))
                    .col(big_integer_null(ProfileSyncState::ExportTopAt))
                    .col(big_integer(ProfileSyncState::BackfillLoaded))
                    .col(timestamp_with_time_zone_null(
                        ProfileSyncState::LastBackfillAt,
                    ))
                    .col(timestamp_with_time_zone(ProfileSyncState::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_profile_sync_state_workspace_id")
                            .from(ProfileSyncState::Table, ProfileSyncState::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ProfileSyncState::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum ProfileSyncState {
    Table,
    WorkspaceId,
    CursorId,
    CursorAt,
    FeedReadAt,
    ExportId,
    ExportRequestedAt,
    ExportTopId,
    ExportTopAt,
    BackfillLoaded,
    LastBackfillAt,
    UpdatedAt,
}
