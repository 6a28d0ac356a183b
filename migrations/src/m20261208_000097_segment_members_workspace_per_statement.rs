//! `segment_members.workspace_id` checked once per statement instead of once per row
//! (PostgreSQL; issue #18), as 000092 did for `profiles` and `outbox`.
//!
//! Evaluations write memberships in bulk: a full evaluation inserts every member of a segment
//! in one statement, an incremental pass every flip of a batch. The foreign key looked up (and
//! locked `FOR KEY SHARE`) the same workspace once per inserted row: in `psql` here, 80,000
//! members took 760–785 ms with it and 395–455 ms with the statement check. Same guarantees as
//! 000092: an insert for a missing workspace fails with SQLSTATE 23503, a member never moves to
//! another workspace, and deleting a workspace deletes its members (the cascade function now
//! names three tables).
//!
//! SQLite keeps its foreign key.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261207_000092_workspace_checks_per_statement::{
    TABLES, check_per_statement, deleted_function, foreign_key_again,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

const TABLE: &str = "segment_members";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        check_per_statement(db, TABLE).await?;
        let cascaded = [&TABLES[..], &[TABLE]].concat();
        db.execute_unprepared(&deleted_function("CREATE OR REPLACE", &cascaded))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(&deleted_function("CREATE OR REPLACE", &TABLES))
            .await?;
        foreign_key_again(db, TABLE).await
    }
}
