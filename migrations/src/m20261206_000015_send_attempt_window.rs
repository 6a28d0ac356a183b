//! `send_submissions.attempt_ends_at`: when the current (or last) attempt's window closes — the
//! claim's expiry when the attempt is claimed, the moment its dispatcher recorded the outcome
//! when it did. The reconciler measures its grace from here (not from `attempt_started_at`): a
//! request may leave until the end of the window, so "not found in Customer.io" only means
//! "not sent" once the grace has passed after it.
//!
//! Rows claimed before this migration take their claim's expiry; rows without a claim stay
//! NULL and the service falls back to `attempt_started_at` plus the claim TTL.

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
                        ColumnDef::new(SendSubmissions::AttemptEndsAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE send_submissions SET attempt_ends_at = claim_expires_at \
                 WHERE claim_expires_at IS NOT NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SendSubmissions::Table)
                    .drop_column(SendSubmissions::AttemptEndsAt)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum SendSubmissions {
    Table,
    AttemptEndsAt,
}
