//! `profiles.workspace_id` and `outbox.workspace_id` checked once per statement instead of once
//! per row (PostgreSQL; issues #16 and #12).
//!
//! A foreign key runs one lookup of `workspaces` (with a `FOR KEY SHARE` lock) for EVERY
//! inserted row: ~5–9 µs of PostgreSQL CPU per profile or outbox row, 10–20% of writing one,
//! to find the same one or two workspaces again and again in a statement of 1,000 rows. These
//! two tables take the bulk writes (backfills, ingest), so their foreign keys to `workspaces`
//! are replaced by triggers that do the same work once per statement:
//! - after every `INSERT`, a statement trigger (transition table `new_rows`) locks each DISTINCT
//!   `workspace_id` of the statement's rows `FOR KEY SHARE` — as the foreign key did, so a
//!   workspace cannot be deleted under a running insert — and fails with SQLSTATE 23503
//!   (`foreign_key_violation`) naming the table when one does not exist;
//! - a row's `workspace_id` never changes: an `UPDATE` that changes it fails (23503 as well);
//! - `ON DELETE CASCADE`: deleting a workspace deletes its profiles and outbox rows (a row
//!   trigger on `workspaces`).
//!
//! SQLite keeps its foreign keys (it checks them without a per-row query plan).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The tables this migration changes (000097 adds `segment_members`).
pub(crate) const TABLES: [&str; 2] = ["profiles", "outbox"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE FUNCTION sharpsend_workspaces_exist() RETURNS trigger LANGUAGE plpgsql AS $$ \
             DECLARE ws bigint; BEGIN \
             FOR ws IN SELECT DISTINCT workspace_id FROM new_rows LOOP \
             PERFORM 1 FROM workspaces WHERE id = ws FOR KEY SHARE; \
             IF NOT FOUND THEN RAISE EXCEPTION \
             'insert into % refers to workspace %, which does not exist', TG_TABLE_NAME, ws \
             USING ERRCODE = 'foreign_key_violation'; END IF; \
             END LOOP; RETURN NULL; END $$",
        )
        .await?;
        db.execute_unprepared(
            "CREATE FUNCTION sharpsend_workspace_unchanged() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'a row of % cannot move from workspace % to %', \
             TG_TABLE_NAME, OLD.workspace_id, NEW.workspace_id \
             USING ERRCODE = 'foreign_key_violation'; END $$",
        )
        .await?;
        for table in TABLES {
            check_per_statement(db, table).await?;
        }
        db.execute_unprepared(&deleted_function("CREATE", &TABLES))
            .await?;
        db.execute_unprepared(
            "CREATE TRIGGER workspaces_deleted AFTER DELETE ON workspaces FOR EACH ROW \
             EXECUTE FUNCTION sharpsend_workspace_deleted()",
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared("DROP TRIGGER IF EXISTS workspaces_deleted ON workspaces")
            .await?;
        for table in TABLES {
            foreign_key_again(db, table).await?;
        }
        for function in [
            "sharpsend_workspace_deleted",
            "sharpsend_workspace_unchanged",
            "sharpsend_workspaces_exist",
        ] {
            db.execute_unprepared(&format!("DROP FUNCTION IF EXISTS {function}()"))
                .await?;
        }
        Ok(())
    }
}

/// Replaces `table`'s foreign key `fk_<table>_workspace_id` by the statement check and the
/// row trigger that keeps `workspace_id` unchanged (the functions above must exist).
pub(crate) async fn check_per_statement(
    db: &impl ConnectionTrait,
    table: &str,
) -> Result<(), DbErr> {
    db.execute_unprepared(&format!(
        "ALTER TABLE {table} DROP CONSTRAINT fk_{table}_workspace_id"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "CREATE TRIGGER {table}_workspaces_exist AFTER INSERT ON {table} \
         REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT \
         EXECUTE FUNCTION sharpsend_workspaces_exist()"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "CREATE TRIGGER {table}_workspace_unchanged BEFORE UPDATE OF workspace_id \
         ON {table} FOR EACH ROW WHEN (OLD.workspace_id IS DISTINCT FROM NEW.workspace_id) \
         EXECUTE FUNCTION sharpsend_workspace_unchanged()"
    ))
    .await?;
    Ok(())
}

/// Undoes [`check_per_statement`]: `table`'s triggers dropped, its foreign key back.
pub(crate) async fn foreign_key_again(db: &impl ConnectionTrait, table: &str) -> Result<(), DbErr> {
    db.execute_unprepared(&format!(
        "DROP TRIGGER IF EXISTS {table}_workspaces_exist ON {table}"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "DROP TRIGGER IF EXISTS {table}_workspace_unchanged ON {table}"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "ALTER TABLE {table} ADD CONSTRAINT fk_{table}_workspace_id \
         FOREIGN KEY (workspace_id) REFERENCES workspaces (id) ON DELETE CASCADE"
    ))
    .await?;
    Ok(())
}

/// `<verb> FUNCTION sharpsend_workspace_deleted()` (`CREATE`, or `CREATE OR REPLACE`): the
/// `ON DELETE CASCADE` of `tables`, called by the `workspaces_deleted` row trigger.
pub(crate) fn deleted_function(verb: &str, tables: &[&str]) -> String {
    format!(
        "{verb} FUNCTION sharpsend_workspace_deleted() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN {} RETURN NULL; END $$",
        tables
            .iter()
            .map(|t| format!("DELETE FROM {t} WHERE workspace_id = OLD.id;"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}
