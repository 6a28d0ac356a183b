//! `ab_tests`: A/B tests over an assignment's variants, one per (workspace, request id).
//! `spec` holds the validated request (audience, variants, fraction, metric, delivery, decision
//! settings) as the caller gave it, normalised, so a repeat can be told from a conflicting reuse
//! of the request id. `decision` is set once (a winner found or declared, or a cancellation).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

const STATES: [&str; 4] = ["draft", "running", "decided", "cancelled"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AbTests::Table)
                    .col(big_pk_auto(AbTests::Id))
                    .col(big_integer(AbTests::WorkspaceId))
                    .col(text(AbTests::PublicId))
                    .col(text(AbTests::RequestId))
                    .col(text(AbTests::AssignmentId))
                    .col(text(AbTests::Title))
                    .col(json_binary(AbTests::Spec))
                    .col(text(AbTests::State).check(Expr::col(AbTests::State).is_in(STATES)))
                    .col(big_integer(AbTests::PlannedPerVariant))
                    .col(big_integer(AbTests::AudienceEstimate))
                    .col(json_binary(AbTests::Warnings))
                    .col(json_binary_null(AbTests::Decision))
                    .col(text(AbTests::CreatedBy))
                    .col(timestamp_with_time_zone(AbTests::CreatedAt))
                    .col(timestamp_with_time_zone(AbTests::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_ab_tests_workspace_id")
                            .from(AbTests::Table, AbTests::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_ab_tests_workspace_id_request_id")
                    .table(AbTests::Table)
                    .col(AbTests::WorkspaceId)
                    .col(AbTests::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_ab_tests_public_id")
                    .table(AbTests::Table)
                    .col(AbTests::PublicId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_ab_tests_workspace_id_assignment_id_id")
                    .table(AbTests::Table)
                    .col(AbTests::WorkspaceId)
                    .col(AbTests::AssignmentId)
                    .col(AbTests::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AbTests::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum AbTests {
    Table,
    Id,
    WorkspaceId,
    PublicId,
    RequestId,
    AssignmentId,
    Title,
    Spec,
    State,
    PlannedPerVariant,
    AudienceEstimate,
    Warnings,
    Decision,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}
