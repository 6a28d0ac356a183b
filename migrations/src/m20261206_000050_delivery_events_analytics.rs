//! Analytics over delivery events (issue #15): an index on (workspace, occurred_at) so reports
//! and rankings over a period read only that period's events, and (workspace, assignment_id |
//! segment_id, delivery_id) so a report finds its next page of deliveries by an ordered index
//! scan that stops after the page.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const INDEXES: [(&str, &[DeliveryEvents]); 3] = [
    (
        "ix_delivery_events_workspace_id_occurred_at",
        &[DeliveryEvents::OccurredAt],
    ),
    (
        "ix_delivery_events_workspace_id_segment_id_delivery_id",
        &[DeliveryEvents::SegmentId, DeliveryEvents::DeliveryId],
    ),
    (
        "ix_delivery_events_workspace_id_assignment_id_delivery_id",
        &[DeliveryEvents::AssignmentId, DeliveryEvents::DeliveryId],
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, cols) in INDEXES {
            let mut index = Index::create();
            index
                .name(name)
                .table(DeliveryEvents::Table)
                .col(DeliveryEvents::WorkspaceId);
            for col in cols {
                index.col(*col);
            }
            manager.create_index(index.to_owned()).await?;
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
    AssignmentId,
    DeliveryId,
}
