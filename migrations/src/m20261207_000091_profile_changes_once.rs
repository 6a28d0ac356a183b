//! One change-log row per profile write on SQLite (issue #18's log, migration 000045).
//!
//! The `profiles.numbers` shadow (000080) is kept on SQLite by triggers that `UPDATE profiles
//! SET numbers = …` after every insert and every update of `attributes`, and that `UPDATE`
//! fired the change log's update trigger again: every profile write was logged twice (twice
//! the log writes, twice the rows an incremental evaluation reads). `numbers` is derived from
//! `attributes`, whose write is logged already, so the update trigger now fires only for
//! updates that set some OTHER column (`AFTER UPDATE OF` every column of `profiles` but
//! `numbers`, listed when this migration runs: a later migration that adds a column to
//! `profiles` must add it to the list too, which the test `migrations::` checks).
//! PostgreSQL computes `numbers` inside the writing statement (a generated column): unchanged.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

const TRIGGER: &str = "profile_changes_profiles_update";
const LOG_ROW: &str = "INSERT INTO profile_changes (workspace_id, segment_id, customer_id) \
                       VALUES (NEW.workspace_id, 0, NEW.customer_id)";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        let db = manager.get_connection();
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT name FROM pragma_table_info('profiles') WHERE name <> 'numbers' \
                 ORDER BY cid",
            ))
            .await?;
        let mut columns = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get("", "name")?;
            columns.push(format!("\"{}\"", name.replace('"', "\"\"")));
        }
        db.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {TRIGGER}"))
            .await?;
        db.execute_unprepared(&format!(
            "CREATE TRIGGER {TRIGGER} AFTER UPDATE OF {} ON profiles FOR EACH ROW BEGIN \
             {LOG_ROW}; END",
            columns.join(", ")
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {TRIGGER}"))
            .await?;
        db.execute_unprepared(&format!(
            "CREATE TRIGGER {TRIGGER} AFTER UPDATE ON profiles FOR EACH ROW BEGIN {LOG_ROW}; END"
        ))
        .await?;
        Ok(())
    }
}
