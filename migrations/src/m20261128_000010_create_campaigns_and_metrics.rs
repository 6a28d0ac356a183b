//! The campaign mirror and campaign metrics.
//!
//! - `campaigns`: Customer.io campaigns, API-triggered broadcasts and newsletters of a workspace
//!   as last seen by a sync, keyed by (`kind`, `cio_id`): campaigns and broadcasts share one id
//!   sequence in Customer.io, newsletters have their own. Customer.io's own times are
//!   `cio_created_at` / `cio_updated_at` / `sent_at`; `tags` is a JSON array of strings. Rows are
//!   never deleted by a sync: one that disappears from Customer.io gets `removed_at` (cleared if
//!   it reappears).
//! - `metric_targets`: what the metrics poller watches, by (`kind`, `cio_id`). `window_start` is
//!   the earliest time a delivery of the target can have (so the polled series covers them all);
//!   `active_since` is the last known send activity and sets the polling cadence;
//!   `next_poll_at` NULL means not polled any more (removed in Customer.io).
//! - `metric_snapshots`: one row per poll: the requested window (`res`, `start_at`, `end_at`),
//!   the first bucket's start (`series_start`) and Customer.io's series (JSON object of metric
//!   name → array of counts, oldest bucket first). The application keeps a bounded number per
//!   target.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

const KINDS: [&str; 3] = ["campaign", "broadcast", "newsletter"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Campaigns::Table)
                    .col(big_pk_auto(Campaigns::Id))
                    .col(big_integer(Campaigns::WorkspaceId))
                    .col(text(Campaigns::Kind).check(Expr::col(Campaigns::Kind).is_in(KINDS)))
                    .col(big_integer(Campaigns::CioId))
                    .col(text(Campaigns::Name))
                    .col(text_null(Campaigns::CampaignType))
                    .col(text_null(Campaigns::State))
                    .col(timestamp_with_time_zone_null(Campaigns::CioCreatedAt))
                    .col(timestamp_with_time_zone_null(Campaigns::CioUpdatedAt))
                    .col(timestamp_with_time_zone_null(Campaigns::SentAt))
                    .col(json_binary(Campaigns::Tags))
                    .col(timestamp_with_time_zone(Campaigns::SyncedAt))
                    .col(timestamp_with_time_zone_null(Campaigns::RemovedAt))
                    .col(timestamp_with_time_zone(Campaigns::CreatedAt))
                    .col(timestamp_with_time_zone(Campaigns::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_campaigns_workspace_id")
                            .from(Campaigns::Table, Campaigns::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_campaigns_workspace_id_kind_cio_id")
                    .table(Campaigns::Table)
                    .col(Campaigns::WorkspaceId)
                    .col(Campaigns::Kind)
                    .col(Campaigns::CioId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(MetricTargets::Table)
                    .col(big_pk_auto(MetricTargets::Id))
                    .col(big_integer(MetricTargets::WorkspaceId))
                    .col(
                        text(MetricTargets::Kind)
                            .check(Expr::col(MetricTargets::Kind).is_in(KINDS)),
                    )
                    .col(big_integer(MetricTargets::CioId))
                    .col(timestamp_with_time_zone(MetricTargets::WindowStart))
                    .col(timestamp_with_time_zone(MetricTargets::ActiveSince))
                    .col(timestamp_with_time_zone_null(MetricTargets::NextPollAt))
                    .col(timestamp_with_time_zone_null(MetricTargets::LastPolledAt))
                    .col(text_null(MetricTargets::LastError))
                    .col(integer(MetricTargets::Failures).default(0))
                    .col(timestamp_with_time_zone(MetricTargets::CreatedAt))
                    .col(timestamp_with_time_zone(MetricTargets::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_metric_targets_workspace_id")
                            .from(MetricTargets::Table, MetricTargets::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_metric_targets_workspace_id_kind_cio_id")
                    .table(MetricTargets::Table)
                    .col(MetricTargets::WorkspaceId)
                    .col(MetricTargets::Kind)
                    .col(MetricTargets::CioId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_metric_targets_workspace_id_next_poll_at")
                    .table(MetricTargets::Table)
                    .col(MetricTargets::WorkspaceId)
                    .col(MetricTargets::NextPollAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(MetricSnapshots::Table)
                    .col(big_pk_auto(MetricSnapshots::Id))
                    .col(big_integer(MetricSnapshots::WorkspaceId))
                    .col(big_integer(MetricSnapshots::TargetId))
                    .col(timestamp_with_time_zone(MetricSnapshots::PolledAt))
                    .col(text(MetricSnapshots::Res))
                    .col(timestamp_with_time_zone(MetricSnapshots::StartAt))
                    .col(timestamp_with_time_zone(MetricSnapshots::EndAt))
                    .col(timestamp_with_time_zone(MetricSnapshots::SeriesStart))
                    .col(json_binary(MetricSnapshots::Series))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_metric_snapshots_workspace_id")
                            .from(MetricSnapshots::Table, MetricSnapshots::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_metric_snapshots_target_id")
                            .from(MetricSnapshots::Table, MetricSnapshots::TargetId)
                            .to(MetricTargets::Table, MetricTargets::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_metric_snapshots_target_id_id")
                    .table(MetricSnapshots::Table)
                    .col(MetricSnapshots::TargetId)
                    .col(MetricSnapshots::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(MetricSnapshots::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(MetricTargets::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Campaigns::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Campaigns {
    Table,
    Id,
    WorkspaceId,
    Kind,
    CioId,
    Name,
    CampaignType,
    State,
    CioCreatedAt,
    CioUpdatedAt,
    SentAt,
    Tags,
    SyncedAt,
    RemovedAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum MetricTargets {
    Table,
    Id,
    WorkspaceId,
    Kind,
    CioId,
    WindowStart,
    ActiveSince,
    NextPollAt,
    LastPolledAt,
    LastError,
    Failures,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum MetricSnapshots {
    Table,
    Id,
    WorkspaceId,
    TargetId,
    PolledAt,
    Res,
    StartAt,
    EndAt,
    SeriesStart,
    Series,
}
