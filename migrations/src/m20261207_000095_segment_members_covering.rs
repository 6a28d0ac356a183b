//! Memberships by person, covering (issue #18): `segment_members (workspace_id, customer_id,
//! segment_id)` replaces migration 000093's `(workspace_id, customer_id)`.
//!
//! An incremental pass reads every changed person's memberships; through 000093's index each
//! of a person's memberships (one per managed segment they are in, ~30 in the benchmark) was
//! a heap fetch of its own, on pages scattered over the whole table. With `segment_id` in the
//! index the read is an index-only scan (heap pages all-visible, as vacuum leaves nearly all
//! of them), one leaf page per person.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEX: &str = "ix_segment_members_workspace_id_customer_id_segment_id";
/// Migration 000093's index.
const BY_PERSON: &str = "ix_segment_members_workspace_id_customer_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(BY_PERSON)
                    .table(SegmentMembers::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(SegmentMembers::Table)
                    .col(SegmentMembers::WorkspaceId)
                    .col(SegmentMembers::CustomerId)
                    .col(SegmentMembers::SegmentId)
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
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(BY_PERSON)
                    .table(SegmentMembers::Table)
                    .col(SegmentMembers::WorkspaceId)
                    .col(SegmentMembers::CustomerId)
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
    SegmentId,
}
