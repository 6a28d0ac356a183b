//! Incremental segment evaluation (issue #18): an exact log of the people whose profile or
//! segment membership changed, and where each managed segment stands in it.
//!
//! - `profile_changes (pos, workspace_id, segment_id, customer_id)`: one row per written
//!   `profiles` row (`segment_id = 0`) and per inserted or deleted `segment_members` row (its
//!   segment), written by triggers IN THE WRITING TRANSACTION, whichever code path writes.
//!   `pos` orders the log so that "everything from position W on" is exact:
//!   - PostgreSQL: `pos` is the writing transaction's id (`pg_current_xact_id()`). A reader
//!     takes as watermark the oldest transaction still running (`pg_snapshot_xmin`): every
//!     transaction below it has ended, so its rows are visible to any later statement, and
//!     every transaction that may still commit has `pos >=` the watermark. (A sequence or a
//!     timestamp would not do: numbers are taken in one order, commits happen in another.)
//!     Statement triggers with transition tables: one `INSERT … SELECT` per statement.
//!   - SQLite: `pos` is an `AUTOINCREMENT` rowid; one writer at a time, so the next id is
//!     an exact watermark.
//! - `managed_segments.change_watermark`: the log position from which the segment's recorded
//!   membership may be stale (NULL: unknown, the next evaluation is a full one);
//!   `change_snapshot` (PostgreSQL): the snapshot (`pg_snapshot` text) taken with it — of the
//!   transactions at or above the watermark, those it shows as committed were seen too, so only
//!   the others need a re-check (without it, every change made while some older transaction
//!   was still running would be re-checked once more);
//!   `last_full_at`: when the last full evaluation ran (for the periodic check).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (table, operation, `NEW` or `OLD` rows), on both backends.
const TRIGGERS: &[(&str, &str, &str)] = &[
    ("profiles", "INSERT", "NEW"),
    ("profiles", "UPDATE", "NEW"),
    ("profiles", "DELETE", "OLD"),
    ("segment_members", "INSERT", "NEW"),
    ("segment_members", "DELETE", "OLD"),
];

fn trigger_name(table: &str, op: &str) -> String {
    format!("profile_changes_{table}_{}", op.to_lowercase())
}

fn segment_expr(table: &str, row: &str) -> String {
    if table == "profiles" {
        "0".to_owned()
    } else {
        format!("{row}.segment_id")
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for column in [
            ColumnDef::new(ManagedSegments::ChangeWatermark)
                .big_integer()
                .null()
                .to_owned(),
            ColumnDef::new(ManagedSegments::LastFullAt)
                .timestamp_with_time_zone()
                .null()
                .to_owned(),
            ColumnDef::new(ManagedSegments::ChangeSnapshot)
                .text()
                .null()
                .to_owned(),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ManagedSegments::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(
                    "CREATE TABLE profile_changes (\
                     pos BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint), \
                     workspace_id BIGINT NOT NULL, segment_id BIGINT NOT NULL, \
                     customer_id VARCHAR(150) NOT NULL)",
                )
                .await?;
                for table in ["profiles", "segment_members"] {
                    for alias in ["new_rows", "old_rows"] {
                        db.execute_unprepared(&format!(
                            "CREATE FUNCTION profile_changes_{table}_{alias}() RETURNS trigger \
                             LANGUAGE plpgsql AS $$ BEGIN \
                             INSERT INTO profile_changes (workspace_id, segment_id, customer_id) \
                             SELECT t.workspace_id, {segment}, t.customer_id FROM {alias} t; \
                             RETURN NULL; END $$",
                            segment = segment_expr(table, "t"),
                        ))
                        .await?;
                    }
                }
                for (table, op, row) in TRIGGERS {
                    let alias = if *row == "NEW" {
                        "new_rows"
                    } else {
                        "old_rows"
                    };
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER {name} AFTER {op} ON {table} \
                         REFERENCING {row} TABLE AS {alias} FOR EACH STATEMENT \
                         EXECUTE FUNCTION profile_changes_{table}_{alias}()",
                        name = trigger_name(table, op),
                    ))
                    .await?;
                }
            }
            _ => {
                db.execute_unprepared(
                    "CREATE TABLE profile_changes (\
                     pos INTEGER PRIMARY KEY AUTOINCREMENT, \
                     workspace_id BIGINT NOT NULL, segment_id BIGINT NOT NULL, \
                     customer_id VARCHAR(150) NOT NULL)",
                )
                .await?;
                for (table, op, row) in TRIGGERS {
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER {name} AFTER {op} ON {table} FOR EACH ROW BEGIN \
                         INSERT INTO profile_changes (workspace_id, segment_id, customer_id) \
                         VALUES ({row}.workspace_id, {segment}, {row}.customer_id); END",
                        name = trigger_name(table, op),
                        segment = segment_expr(table, row),
                    ))
                    .await?;
                }
            }
        }
        db.execute_unprepared(
            "CREATE INDEX ix_profile_changes_workspace_id_pos ON profile_changes \
             (workspace_id, pos)",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let postgres = manager.get_database_backend() == DbBackend::Postgres;
        for (table, op, _) in TRIGGERS {
            let name = trigger_name(table, op);
            db.execute_unprepared(&if postgres {
                format!("DROP TRIGGER IF EXISTS {name} ON {table}")
            } else {
                format!("DROP TRIGGER IF EXISTS {name}")
            })
            .await?;
        }
        if postgres {
            for table in ["profiles", "segment_members"] {
                for alias in ["new_rows", "old_rows"] {
                    db.execute_unprepared(&format!(
                        "DROP FUNCTION IF EXISTS profile_changes_{table}_{alias}()"
                    ))
                    .await?;
                }
            }
        }
        db.execute_unprepared("DROP TABLE IF EXISTS profile_changes")
            .await?;
        for column in [
            ManagedSegments::ChangeWatermark,
            ManagedSegments::LastFullAt,
            ManagedSegments::ChangeSnapshot,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ManagedSegments::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum ManagedSegments {
    Table,
    ChangeWatermark,
    LastFullAt,
    ChangeSnapshot,
}
