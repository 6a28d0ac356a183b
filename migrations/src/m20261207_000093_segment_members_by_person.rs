//! Memberships by person (issue #18): an index on `segment_members (workspace_id, customer_id)`.
//!
//! An incremental evaluation of many managed segments at once reads each changed person's
//! memberships of those segments in one index probe; the primary key (`workspace_id,
//! segment_id, customer_id`) would need one probe per person AND segment. The cost is one more
//! index entry per membership written.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEX: &str = "ix_segment_members_workspace_id_customer_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(SegmentMembers::Table)
                    .col(SegmentMembers::WorkspaceId)
                    .col(SegmentMembers::CustomerId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(INDEX)
                    .table(SegmentMembers::Table)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum SegmentMembers {
    Table,
    WorkspaceId,
    CustomerId,
}
