//! Analytics over delivery events (issue #15): an index on (workspace, occurred_at) so reports
//! and rankings over a period read only that period's events, and one on (workspace,
//! segment_id) for per-segment reports.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEXES: [(&str, DeliveryEvents); 2] = [
    (
        "ix_delivery_events_workspace_id_occurred_at",
        DeliveryEvents::OccurredAt,
    ),
    (
        "ix_delivery_events_workspace_id_segment_id",
        DeliveryEvents::SegmentId,
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, col) in INDEXES {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(DeliveryEvents::Table)
                        .col(DeliveryEvents::WorkspaceId)
                        .col(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, _) in INDEXES {
            manager
                .drop_index(
                    Index::drop()
                        .name(name)
                        .table(DeliveryEvents::Table)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum DeliveryEvents {
    Table,
    WorkspaceId,
    OccurredAt,
    SegmentId,
}
