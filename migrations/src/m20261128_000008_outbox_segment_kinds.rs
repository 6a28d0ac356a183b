//! `outbox`: two more kinds of row, `segment_add` and `segment_remove` — membership changes of a
//! SharpSend-managed segment (payload `{"segment_id", "ids": [..at most 1000]}`), delivered
//! through Customer.io's `add_customers` / `remove_customers`. For these rows `customer_id`
//! holds `segment:<Customer.io segment id>` (the people are in the payload).
//!
//! PostgreSQL replaces the `kind` CHECK constraint. SQLite cannot alter a constraint, so the
//! table is rebuilt the documented way: create the new table, copy every row (ids kept), drop
//! the old one, rename, recreate the indexes. Nothing references `outbox`, so the rebuild needs
//! no foreign-key juggling. `down` turns the constraint back (deleting rows of the new kinds).

use sea_orm_migration::{prelude::*, schema::*, sea_orm::DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Longest `customer_id` in bytes (as in `profiles`).
const MAX_CUSTOMER_ID_BYTES: u32 = 150;

const KINDS_BEFORE: [&str; 2] = ["identify", "event"];
const KINDS_AFTER: [&str; 4] = ["identify", "event", "segment_add", "segment_remove"];

/// The indexes of `outbox` (as created by `m20261128_000006_create_outbox`).
const INDEXES: [&str; 3] = [
    "CREATE INDEX ix_outbox_claim ON outbox (workspace_id, status, next_attempt_at, id)",
    "CREATE UNIQUE INDEX ux_outbox_workspace_id_event_id \
     ON outbox (workspace_id, event_id) WHERE event_id IS NOT NULL",
    "CREATE UNIQUE INDEX ux_outbox_workspace_id_idempotency_key \
     ON outbox (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_kinds(manager, &KINDS_AFTER).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let conn = manager.get_connection();
        conn.execute_unprepared(
            "DELETE FROM outbox WHERE kind IN ('segment_add', 'segment_remove')",
        )
        .await?;
        set_kinds(manager, &KINDS_BEFORE).await
    }
}

async fn set_kinds(manager: &SchemaManager<'_>, kinds: &[&str]) -> Result<(), DbErr> {
    let conn = manager.get_connection();
    let list = kinds
        .iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    match manager.get_database_backend() {
        DbBackend::Postgres => {
            conn.execute_unprepared(
                "ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_kind_check",
            )
            .await?;
            conn.execute_unprepared(&format!(
                "ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check CHECK (kind IN ({list}))"
            ))
            .await?;
            Ok(())
        }
        _ => rebuild_sqlite(manager, kinds).await,
    }
}

async fn rebuild_sqlite(manager: &SchemaManager<'_>, kinds: &[&str]) -> Result<(), DbErr> {
    let customer_id_check = Expr::cust(format!(
        "length(CAST(customer_id AS BLOB)) BETWEEN 1 AND {MAX_CUSTOMER_ID_BYTES}"
    ));
    manager
        .create_table(
            Table::create()
                .table(OutboxNew::Table)
                .col(big_pk_auto(Outbox::Id))
                .col(big_integer(Outbox::WorkspaceId))
                .col(text(Outbox::Kind).check(Expr::col(Outbox::Kind).is_in(kinds.iter().copied())))
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
                        .from(OutboxNew::Table, Outbox::WorkspaceId)
                        .to(Workspaces::Table, Workspaces::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
    let conn = manager.get_connection();
    let columns = "id, workspace_id, kind, customer_id, payload, event_id, idempotency_key, \
                   status, attempts, next_attempt_at, claimed_by, claim_expires_at, last_error, \
                   last_attempt_at, created_at, delivered_at";
    conn.execute_unprepared(&format!(
        "INSERT INTO outbox_new ({columns}) SELECT {columns} FROM outbox ORDER BY id"
    ))
    .await?;
    conn.execute_unprepared("DROP TABLE outbox").await?;
    conn.execute_unprepared("ALTER TABLE outbox_new RENAME TO outbox")
        .await?;
    for sql in INDEXES {
        conn.execute_unprepared(sql).await?;
    }
    Ok(())
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum OutboxNew {
    Table,
}

#[derive(DeriveIden)]
enum Outbox {
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
