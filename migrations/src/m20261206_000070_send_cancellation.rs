//! Cancelling sends (issue #14: a cancelled A/B test sends nothing more).
//!
//! - `sends.state` and `send_submissions.state` may be `cancelled`: a submission stopped before
//!   any dispatcher claimed it (a terminal state).
//! - `send_submissions.cancel_requested_at`: set when a cancel found the submission already
//!   claimed (`submitting`) or `uncertain`; if that attempt turns out not to have gone out and
//!   the submission would be queued again (`pending`), it becomes `cancelled` instead.
//!
//! PostgreSQL replaces the two `state` CHECK constraints. SQLite cannot alter a constraint and
//! rebuilding `sends` would cascade into its children and drop its triggers, so the CHECK text
//! is widened in place, the way SQLite documents for changes that leave every stored row valid
//! (`PRAGMA writable_schema`, then a new `schema_version`). `down` turns `cancelled` rows into
//! `failed` and narrows the constraints again.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

const BEFORE: &str = "'failed', 'uncertain')";
const AFTER: &str = "'failed', 'uncertain', 'cancelled')";
const STATES_AFTER: &str =
    "'pending', 'submitting', 'submitted', 'completed', 'failed', 'uncertain', 'cancelled'";
const STATES_BEFORE: &str =
    "'pending', 'submitting', 'submitted', 'completed', 'failed', 'uncertain'";
const TABLES: [&str; 2] = ["sends", "send_submissions"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_states(manager, STATES_AFTER, BEFORE, AFTER).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SendSubmissions::Table)
                    .add_column(
                        ColumnDef::new(SendSubmissions::CancelRequestedAt)
                            .timestamp_with_time_zone()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SendSubmissions::Table)
                    .drop_column(SendSubmissions::CancelRequestedAt)
                    .to_owned(),
            )
            .await?;
        let conn = manager.get_connection();
        for table in TABLES {
            conn.execute_unprepared(&format!(
                "UPDATE {table} SET state = 'failed' WHERE state = 'cancelled'"
            ))
            .await?;
        }
        set_states(manager, STATES_BEFORE, AFTER, BEFORE).await
    }
}

/// Makes `states` the allowed values of both `state` columns (SQLite: by replacing `from` with
/// `to` in the stored CHECK text).
async fn set_states(
    manager: &SchemaManager<'_>,
    states: &str,
    from: &str,
    to: &str,
) -> Result<(), DbErr> {
    let conn = manager.get_connection();
    match manager.get_database_backend() {
        DbBackend::Postgres => {
            for table in TABLES {
                conn.execute_unprepared(&format!(
                    "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_state_check"
                ))
                .await?;
                conn.execute_unprepared(&format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {table}_state_check \
                     CHECK (state IN ({states}))"
                ))
                .await?;
            }
            Ok(())
        }
        _ => {
            let version: i64 = conn
                .query_one_raw(Statement::from_string(
                    DbBackend::Sqlite,
                    "PRAGMA schema_version",
                ))
                .await?
                .ok_or_else(|| DbErr::Custom("no schema_version".into()))?
                .try_get_by_index(0)?;
            conn.execute_unprepared("PRAGMA writable_schema = ON")
                .await?;
            for table in TABLES {
                let changed = conn
                    .execute_raw(Statement::from_sql_and_values(
                        DbBackend::Sqlite,
                        "UPDATE sqlite_master SET sql = replace(sql, ?, ?) \
                         WHERE type = 'table' AND name = ? AND instr(sql, ?) > 0",
                        [from.into(), to.into(), table.into(), from.into()],
                    ))
                    .await?
                    .rows_affected();
                if changed != 1 {
                    conn.execute_unprepared("PRAGMA writable_schema = OFF")
                        .await?;
                    return Err(DbErr::Custom(format!(
                        "the state CHECK of `{table}` is not the one expected ({from})"
                    )));
                }
            }
            conn.execute_unprepared(&format!("PRAGMA schema_version = {}", version + 1))
                .await?;
            conn.execute_unprepared("PRAGMA writable_schema = OFF")
                .await?;
            Ok(())
        }
    }
}

#[derive(DeriveIden)]
enum SendSubmissions {
    Table,
    CancelRequestedAt,
}
