//! `job_leases`: at most one holder per (workspace, job) at a time, until `expires_at`.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(JobLeases::Table)
                    .col(big_integer(JobLeases::WorkspaceId))
                    .col(text(JobLeases::Job))
                    .col(text(JobLeases::Holder))
                    .col(timestamp_with_time_zone(JobLeases::AcquiredAt))
                    .col(timestamp_with_time_zone(JobLeases::ExpiresAt))
                    .primary_key(
                        Index::create()
                            .name("pk_job_leases")
                            .col(JobLeases::WorkspaceId)
                            .col(JobLeases::Job),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_job_leases_workspace_id")
                            .from(JobLeases::Table, JobLeases::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobLeases::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum JobLeases {
    Table,
    WorkspaceId,
    Job,
    Holder,
    AcquiredAt,
    ExpiresAt,
}
