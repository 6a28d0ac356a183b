//! `outbox`: writes accepted for Customer.io (attribute updates and events), one row each,
//! waiting for, or past, delivery by the outbox workers.
//!
//! `id` is the acceptance order. A row is `pending` until a worker claims it (`in_flight`,
//! `claimed_by`, `claim_expires_at`), then `delivered`, back to `pending` with
//! `next_attempt_at` later (`attempts`, `last_error`, `last_attempt_at`), or `dead`.
//! `ix_outbox_claim` serves claiming due rows and finding the next due time. `event_id` and
//! `idempotency_key` are unique per workspace where set: partial indexes, so that attribute
//! updates (which have neither) cost nothing in them.

use sea_orm_migration::{prelude::*, schema::*, sea_orm::DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Longest `customer_id` in bytes (as in `profiles`).
const MAX_CUSTOMER_ID_BYTES: u32 = 150;

/// Partial unique indexes (same SQL on both backends; sea-query's index builder has no
/// `WHERE`). `ON CONFLICT` clauses on `idempotency_key` must repeat the predicate.
const PARTIAL_UNIQUE_INDEXES: [&str; 2] = [
    "CREATE UNIQUE INDEX ux_outbox_workspace_id_event_id \
     ON outbox (workspace_id, event_id) WHERE event_id IS NOT NULL",
    "CREATE UNIQUE INDEX ux_outbox_workspace_id_idempotency_key \
     ON outbox (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let bytes = match manager.get_database_backend() {
            DbBackend::Postgres => "octet_length(customer_id)",
            _ => "length(CAST(customer_id AS BLOB))",
        };
        let customer_id_check =
            Expr::cust(format!("{bytes} BETWEEN 1 AND {MAX_CUSTOMER_ID_BYTES}"));
        manager
            .create_table(
                Table::create()
                    .table(Outbox::Table)
                    .col(big_pk_auto(Outbox::Id))
                    .col(big_integer(Outbox::WorkspaceId))
                    .col(
                        text(Outbox::Kind)
                            .check(Expr::col(Outbox::Kind).is_in(["identify", "event"])),
                    )
                    .col(text(Outbox::CustomerId).check(customer_id_check))
                    .col(json_binary(Outbox::Payload))
                    .col(text_null(Outbox::EventId))
                    .col(text_null(Outbox::IdempotencyKey))
                    .col(text(Outbox::Status).check(Expr::col(Outbox::Status).is_in([
                        "pending",
                        "in_flight",
                        "delivered",
                        "dead",
                    ])))
                    .col(integer(Outbox::Attempts).default(0))
                    .col(timestamp_with_time_zone(Outbox::NextAttemptAt))
                    .col(text_null(Outbox::ClaimedBy))
                    .col(timestamp_with_time_zone_null(Outbox::ClaimExpiresAt))
                    .col(text_null(Outbox::LastError))
                    .col(timestamp_with_time_zone_null(Outbox::LastAttemptAt))
                    .col(timestamp_with_time_zone(Outbox::CreatedAt))
                    .col(timestamp_with_time_zone_null(Outbox::DeliveredAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_outbox_workspace_id")
                            .from(Outbox::Table, Outbox::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_outbox_claim")
                    .table(Outbox::Table)
                    .col(Outbox::WorkspaceId)
                    .col(Outbox::Status)
                    .col(Outbox::NextAttemptAt)
                    .col(Outbox::Id)
                    .to_owned(),
            )
            .await?;
        let conn = manager.get_connection();
        for sql in PARTIAL_UNIQUE_INDEXES {
            conn.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Outbox::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Id,
    WorkspaceId,
    Kind,
    CustomerId,
    Payload,
    EventId,
    IdempotencyKey,
    Status,
    Attempts,
    NextAttemptAt,
    ClaimedBy,
    ClaimExpiresAt,
    LastError,
    LastAttemptAt,
    CreatedAt,
    DeliveredAt,
}
