//! A fourth read-cache area, `deliveries` (issue #12): `analytics_deliveries`, which a person's
//! delivery history in GetProfile reads, announces its writes the way migration 000031's areas
//! do (a SQLite `read_versions` row bumped by row triggers; PostgreSQL statement triggers calling
//! 000031's `sharpsend_read_changed`), so that history can be cached without ever outliving a
//! committed write.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const AREA: &str = "deliveries";
const TABLE: &str = "analytics_deliveries";
const OPS: [&str; 3] = ["insert", "update", "delete"];

fn trigger_name(op: &str) -> String {
    format!("read_version_{TABLE}_{op}")
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(&format!(
                    "CREATE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {TABLE} \
                     FOR EACH STATEMENT EXECUTE FUNCTION sharpsend_read_changed('{AREA}')",
                    name = trigger_name("any"),
                ))
                .await?;
            }
            _ => {
                db.execute_unprepared(&format!(
                    "INSERT INTO read_versions (area, version) VALUES ('{AREA}', 0)"
                ))
                .await?;
                for op in OPS {
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER {name} AFTER {op} ON {TABLE} FOR EACH ROW BEGIN \
                         UPDATE read_versions SET version = version + 1 WHERE area = '{AREA}'; END",
                        name = trigger_name(op),
                    ))
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(&format!(
                    "DROP TRIGGER IF EXISTS {} ON {TABLE}",
                    trigger_name("any")
                ))
                .await?;
            }
            _ => {
                for op in OPS {
                    db.execute_unprepared(&format!("DROP TRIGGER IF EXISTS {}", trigger_name(op)))
                        .await?;
                }
                db.execute_unprepared(&format!("DELETE FROM read_versions WHERE area = '{AREA}'"))
                    .await?;
            }
        }
        Ok(())
    }
}
