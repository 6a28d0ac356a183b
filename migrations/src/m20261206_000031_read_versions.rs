//! Change signals for the read cache (`sharpsend_core::cache`): every write to a table a cached
//! read depends on announces itself, so cached reads never outlive a committed write, whichever
//! process or connection made it.
//!
//! - SQLite: a `read_versions` row per area (`segments`, `profiles`, `sends`) that row triggers
//!   bump in the writing transaction; a reader compares one cheap `SELECT` with its cache.
//! - PostgreSQL: statement triggers `pg_notify('sharpsend_reads', area)`; PostgreSQL delivers the
//!   notification to listeners when the writing transaction commits (never before), so no row
//!   is shared by writers (no lock to wait for) and readers need no query.
//!
//! Areas and their tables are listed once, in [`AREAS`].

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Cache areas and the tables their reads depend on.
const AREAS: &[(&str, &[&str])] = &[
    ("segments", &["segments", "managed_segments"]),
    ("profiles", &["profiles"]),
    ("sends", &["sends", "send_submissions", "send_history"]),
];

/// The PostgreSQL notification channel (also in `sharpsend_db::read_versions`).
const CHANNEL: &str = "sharpsend_reads";

fn trigger_name(table: &str, op: &str) -> String {
    format!("read_version_{table}_{op}")
}

const OPS: [&str; 3] = ["insert", "update", "delete"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(&format!(
                    "CREATE FUNCTION sharpsend_read_changed() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN PERFORM pg_notify('{CHANNEL}', TG_ARGV[0]); RETURN NULL; END $$"
                ))
                .await?;
                for (area, tables) in AREAS {
                    for table in *tables {
                        db.execute_unprepared(&format!(
                            "CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE \
                             ON {table} FOR EACH STATEMENT EXECUTE FUNCTION \
                             sharpsend_read_changed('{area}')",
                            name = trigger_name(table, "any"),
                        ))
                        .await?;
                    }
                }
            }
            _ => {
                db.execute_unprepared(
                    "CREATE TABLE read_versions (area VARCHAR(16) NOT NULL PRIMARY KEY, \
                     version BIGINT NOT NULL DEFAULT 0)",
                )
                .await?;
                for (area, tables) in AREAS {
                    db.execute_unprepared(&format!(
                        "INSERT INTO read_versions (area, version) VALUES ('{area}', 0)"
                    ))
                    .await?;
                    for table in *tables {
                        for op in OPS {
                            db.execute_unprepared(&format!(
                                "CREATE TRIGGER {name} AFTER {op} ON {table} FOR EACH ROW BEGIN \
                                 UPDATE read_versions SET version = version + 1 \
                                 WHERE area = '{area}'; END",
                                name = trigger_name(table, op),
                            ))
                            .await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                for (_, tables) in AREAS {
                    for table in *tables {
                        db.execute_unprepared(&format!(
                            "DROP TRIGGER IF EXISTS {} ON {table}",
                            trigger_name(table, "any")
                        ))
                        .await?;
                    }
                }
                db.execute_unprepared("DROP FUNCTION IF EXISTS sharpsend_read_changed()")
                    .await?;
            }
            _ => {
                for (_, tables) in AREAS {
                    for table in *tables {
                        for op in OPS {
                            db.execute_unprepared(&format!(
                                "DROP TRIGGER IF EXISTS {}",
                                trigger_name(table, op)
                            ))
                            .await?;
                        }
                    }
                }
                db.execute_unprepared("DROP TABLE IF EXISTS read_versions")
                    .await?;
            }
        }
        Ok(())
    }
}
