//! Engagement flowing back from Customer.io (issue #13).
//!
//! - `delivery_events`: one row per delivery event (reporting webhook or the `delivery-poll`
//!   job), unique per (workspace, `event_id`) so a redelivered webhook is stored once. The
//!   parents Customer.io names (broadcast + trigger, newsletter + content, campaign + action)
//!   are kept as sent; `submission_id`, `send_id`, `assignment_id` and `segment_id` attribute
//!   the event to the SharpSend send it belongs to (NULL: not one of ours, or not yet known).
//!   `prefetched` (machine/privacy-proxy opens) and `machine` (link-scanner clicks) are kept
//!   and never counted as human engagement.
//! - `webhook_quarantine`: validly signed webhook bodies the service did not understand, with
//!   the reason, for operators; never lost, never answered with an error.
//! - Indexes on `send_submissions` by Customer.io trigger and newsletter id, the attribution
//!   lookups.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DeliveryEvents::Table)
                    .col(big_pk_auto(DeliveryEvents::Id))
                    .col(big_integer(DeliveryEvents::WorkspaceId))
                    .col(text(DeliveryEvents::EventId))
                    .col(
                        text(DeliveryEvents::Source)
                            .check(Expr::col(DeliveryEvents::Source).is_in(["webhook", "poll"])),
                    )
                    .col(text(DeliveryEvents::Metric))
                    .col(text(DeliveryEvents::ObjectType))
                    .col(text_null(DeliveryEvents::DeliveryId))
                    .col(text_null(DeliveryEvents::CustomerId))
                    .col(big_integer_null(DeliveryEvents::BroadcastId))
                    .col(big_integer_null(DeliveryEvents::TriggerId))
                    .col(big_integer_null(DeliveryEvents::NewsletterId))
                    .col(big_integer_null(DeliveryEvents::ContentId))
                    .col(big_integer_null(DeliveryEvents::CampaignId))
                    .col(big_integer_null(DeliveryEvents::ActionId))
                    .col(text_null(DeliveryEvents::Link))
                    .col(boolean(DeliveryEvents::Prefetched))
                    .col(boolean(DeliveryEvents::Machine))
                    .col(boolean(DeliveryEvents::Synthetic))
                    .col(timestamp_with_time_zone(DeliveryEvents::OccurredAt))
                    .col(timestamp_with_time_zone(DeliveryEvents::ReceivedAt))
                    .col(big_integer_null(DeliveryEvents::SubmissionId))
                    .col(big_integer_null(DeliveryEvents::SendId))
                    .col(text_null(DeliveryEvents::AssignmentId))
                    .col(big_integer_null(DeliveryEvents::SegmentId))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_delivery_events_workspace_id")
                            .from(DeliveryEvents::Table, DeliveryEvents::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        let indexes: [(&str, Vec<DeliveryEvents>, bool); 4] = [
            (
                "ux_delivery_events_workspace_id_event_id",
                vec![DeliveryEvents::WorkspaceId, DeliveryEvents::EventId],
                true,
            ),
            (
                "ix_delivery_events_workspace_id_customer_id",
                vec![DeliveryEvents::WorkspaceId, DeliveryEvents::CustomerId],
                false,
            ),
            (
                "ix_delivery_events_workspace_id_delivery_id_metric",
                vec![
                    DeliveryEvents::WorkspaceId,
                    DeliveryEvents::DeliveryId,
                    DeliveryEvents::Metric,
                ],
                false,
            ),
            (
                "ix_delivery_events_workspace_id_assignment_id_id",
                vec![
                    DeliveryEvents::WorkspaceId,
                    DeliveryEvents::AssignmentId,
                    DeliveryEvents::Id,
                ],
                false,
            ),
        ];
        for (name, cols, unique) in indexes {
            let mut index = Index::create();
            index.name(name).table(DeliveryEvents::Table);
            for col in cols {
                index.col(col);
            }
            if unique {
                index.unique();
            }
            manager.create_index(index.to_owned()).await?;
        }

        manager
            .create_table(
                Table::create()
                    .table(WebhookQuarantine::Table)
                    .col(big_pk_auto(WebhookQuarantine::Id))
                    .col(big_integer(WebhookQuarantine::WorkspaceId))
                    .col(text(WebhookQuarantine::Reason))
                    .col(text(WebhookQuarantine::Body))
                    .col(timestamp_with_time_zone(WebhookQuarantine::ReceivedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_webhook_quarantine_workspace_id")
                            .from(WebhookQuarantine::Table, WebhookQuarantine::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, col) in [
            (
                "ix_send_submissions_workspace_id_cio_trigger_id",
                SendSubmissions::CioTriggerId,
            ),
            (
                "ix_send_submissions_workspace_id_cio_newsletter_id",
                SendSubmissions::CioNewsletterId,
            ),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(SendSubmissions::Table)
                        .col(SendSubmissions::WorkspaceId)
                        .col(col)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in [
            "ix_send_submissions_workspace_id_cio_trigger_id",
            "ix_send_submissions_workspace_id_cio_newsletter_id",
        ] {
            manager
                .drop_index(
                    Index::drop()
                        .name(name)
                        .table(SendSubmissions::Table)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .drop_table(Table::drop().table(WebhookQuarantine::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(DeliveryEvents::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum DeliveryEvents {
    Table,
    Id,
    WorkspaceId,
    EventId,
    Source,
    Metric,
    ObjectType,
    DeliveryId,
    CustomerId,
    BroadcastId,
    TriggerId,
    NewsletterId,
    ContentId,
    CampaignId,
    ActionId,
    Link,
    Prefetched,
    Machine,
    Synthetic,
    OccurredAt,
    ReceivedAt,
    SubmissionId,
    SendId,
    AssignmentId,
    SegmentId,
}

#[derive(DeriveIden)]
enum WebhookQuarantine {
    Table,
    Id,
    WorkspaceId,
    Reason,
    Body,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum SendSubmissions {
    Table,
    WorkspaceId,
    CioTriggerId,
    CioNewsletterId,
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}
