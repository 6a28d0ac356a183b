//! `job_runs`: one row per run of a background job (who ran it, when, how it ended, counts).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(JobRuns::Table)
                    .col(big_pk_auto(JobRuns::Id))
                    .col(big_integer(JobRuns::WorkspaceId))
                    .col(text(JobRuns::Job))
                    .col(text(JobRuns::Holder))
                    .col(timestamp_with_time_zone(JobRuns::StartedAt))
                    .col(timestamp_with_time_zone_null(JobRuns::FinishedAt))
                    .col(
                        text(JobRuns::Outcome).check(Expr::col(JobRuns::Outcome).is_in([
                            "running",
                            "succeeded",
                            "failed",
                            "skipped",
                        ])),
                    )
                    .col(json_binary(JobRuns::Details))
                    .col(text_null(JobRuns::Error))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_job_runs_workspace_id")
                            .from(JobRuns::Table, JobRuns::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_job_runs_workspace_id_job_started_at")
                    .table(JobRuns::Table)
                    .col(JobRuns::WorkspaceId)
                    .col(JobRuns::Job)
                    .col(JobRuns::StartedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(JobRuns::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum JobRuns {
    Table,
    Id,
    WorkspaceId,
    Job,
    Holder,
    StartedAt,
    FinishedAt,
    Outcome,
    Details,
    Error,
}
