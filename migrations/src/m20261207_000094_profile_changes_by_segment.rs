//! The change log by segment (issue #18): an index on `profile_changes (workspace_id,
//! segment_id, pos)`.
//!
//! Readers of the log want the rows of a few "segments" (0: profile writes, plus the segments a
//! criteria reads) from a position on; the log also holds every membership change of every
//! managed segment. Through the `(workspace_id, pos)` index alone each read walked all of
//! those: after 100 segments were created (about 30,000 membership rows each) the "anything
//! unseen?" probe of one segment took ~150 ms and the segment-evaluation job's first run 17 s
//! on 100,000 profiles (at 1,000,000, ~0.9 s a probe: with `LIMIT 1` the planner still
//! preferred the `pos` index, betting on finding a profile write early). This index replaces
//! `(workspace_id, pos)`: the prune, the one reader by position alone, reads the workspace's
//! rows of the log anyway (it is pruned after every evaluation run).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEX: &str = "ix_profile_changes_workspace_id_segment_id_pos";
/// Migration 000045's index.
const BY_POSITION: &str = "ix_profile_changes_workspace_id_pos";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(BY_POSITION)
                    .table(ProfileChanges::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(ProfileChanges::Table)
                    .col(ProfileChanges::WorkspaceId)
                    .col(ProfileChanges::SegmentId)
                    .col(ProfileChanges::Pos)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(INDEX)
                    .table(ProfileChanges::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(BY_POSITION)
                    .table(ProfileChanges::Table)
                    .col(ProfileChanges::WorkspaceId)
                    .col(ProfileChanges::Pos)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum ProfileChanges {
    Table,
    WorkspaceId,
    SegmentId,
    Pos,
}
