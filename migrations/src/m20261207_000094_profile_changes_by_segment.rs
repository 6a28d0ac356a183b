//! The change log by segment (issue #18): an index on `profile_changes (workspace_id,
//! segment_id, pos)`.
//!
//! Readers of the log want the rows of a few "segments" (0: profile writes, plus the segments a
//! criteria reads) from a position on; the log also holds every membership change of every
//! managed segment. Through the `(workspace_id, pos)` index alone each read walked all of
//! those: after 100 segments were created (about 30,000 membership rows each) the "anything
//! unseen?" probe of one segment took ~150 ms and the segment-evaluation job's first run 17 s
//! on 100,000 profiles. The `(workspace_id, pos)` index stays for pruning.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEX: &str = "ix_profile_changes_workspace_id_segment_id_pos";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
