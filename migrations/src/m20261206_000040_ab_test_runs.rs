//! Running A/B tests (#14): what StartTest and the `abtest-evaluation` job record.
//!
//! - `ab_tests` gains `started_at` (StartTest), `sequential` (the sequential rule's running
//!   state, continued by every look), `looks` (how many looks it has had), `completed_at` (the
//!   job has nothing left to do: the remainder was sent, or nothing goes to it).
//! - `ab_test_allocations`: the audience snapshot at start, one row per person with its arm
//!   (the variant index, or -1 for the remainder). Attribution and re-runs read it.
//! - `ab_test_arms`: per arm (variants and the remainder, -1), its manual segment in
//!   Customer.io, whether its members were queued for Customer.io, and its send.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite alters one column per statement.
        for column in [
            ColumnDef::new(AbTests::StartedAt)
                .timestamp_with_time_zone()
                .null()
                .to_owned(),
            ColumnDef::new(AbTests::Sequential)
                .json_binary()
                .null()
                .to_owned(),
            ColumnDef::new(AbTests::Looks)
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
            ColumnDef::new(AbTests::CompletedAt)
                .timestamp_with_time_zone()
                .null()
                .to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(AbTests::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(AbTestAllocations::Table)
                    .col(big_integer(AbTestAllocations::TestId))
                    .col(text(AbTestAllocations::CustomerId))
                    .col(integer(AbTestAllocations::Arm))
                    .primary_key(
                        Index::create()
                            .col(AbTestAllocations::TestId)
                            .col(AbTestAllocations::CustomerId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_ab_test_allocations_test_id")
                            .from(AbTestAllocations::Table, AbTestAllocations::TestId)
                            .to(AbTests::Table, AbTests::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_ab_test_allocations_test_id_arm_customer_id")
                    .table(AbTestAllocations::Table)
                    .col(AbTestAllocations::TestId)
                    .col(AbTestAllocations::Arm)
                    .col(AbTestAllocations::CustomerId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AbTestArms::Table)
                    .col(big_integer(AbTestArms::TestId))
                    .col(integer(AbTestArms::Arm))
                    .col(big_integer(AbTestArms::Members))
                    .col(big_integer_null(AbTestArms::CioSegmentId))
                    .col(timestamp_with_time_zone_null(AbTestArms::MembersQueuedAt))
                    .col(big_integer_null(AbTestArms::SendId))
                    .col(text_null(AbTestArms::SendPublicId))
                    .col(text_null(AbTestArms::Note))
                    .primary_key(Index::create().col(AbTestArms::TestId).col(AbTestArms::Arm))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_ab_test_arms_test_id")
                            .from(AbTestArms::Table, AbTestArms::TestId)
                            .to(AbTests::Table, AbTests::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AbTestArms::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(AbTestAllocations::Table).to_owned())
            .await?;
        for column in [
            AbTests::CompletedAt,
            AbTests::Looks,
            AbTests::Sequential,
            AbTests::StartedAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(AbTests::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum AbTests {
    Table,
    Id,
    StartedAt,
    Sequential,
    Looks,
    CompletedAt,
}

#[derive(DeriveIden)]
enum AbTestAllocations {
    Table,
    TestId,
    CustomerId,
    Arm,
}

#[derive(DeriveIden)]
enum AbTestArms {
    Table,
    TestId,
    Arm,
    Members,
    CioSegmentId,
    MembersQueuedAt,
    SendId,
    SendPublicId,
    Note,
}
