//! `send_submissions.trigger_errors` / `trigger_error_count`: the errors Customer.io reported
//! for a processed trigger (`GET /v1/campaigns/{id}/triggers/{trigger_id}/errors`), read when
//! the submission is followed to completion. Bounded: the first lines (a JSON array of strings)
//! and how many there were in all. NULL: not read (not a trigger, or not processed yet).
//!
//! Two statements: SQLite alters one column at a time.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SendSubmissions::Table)
                    .add_column(
                        ColumnDef::new(SendSubmissions::TriggerErrors)
                            .json_binary()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SendSubmissions::Table)
                    .add_column(
                        ColumnDef::new(SendSubmissions::TriggerErrorCount)
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [
            SendSubmissions::TriggerErrorCount,
            SendSubmissions::TriggerErrors,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(SendSubmissions::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum SendSubmissions {
    Table,
    TriggerErrors,
    TriggerErrorCount,
}
