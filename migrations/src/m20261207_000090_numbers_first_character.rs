//! A cheaper `sharpsend_numbers` (PostgreSQL; issues #16 and #12): the function behind the
//! `profiles.numbers` shadow (migration 000080) runs on every written profile and used to try
//! two regular expressions on every text attribute that is not all digits — emails, names, plan
//! names — although a number (as the shadow reads it: digits, or JSON number syntax with spaces
//! around) can only start with a digit, a space or `-`. The function now looks at the first
//! character (`ascii`, no allocation) and answers "not a number" at once for anything else;
//! every other value goes through the unchanged test of 000080, so the results are identical
//! (stored values need no recomputation). SQLite is unchanged (its shadow uses `GLOB`).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261207_000080_profile_numbers::PG_NUMBER_OF_TEXT;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// `CREATE OR REPLACE` of `sharpsend_numbers` with `number_of_text` (an expression of the
/// attribute's text `value`, NULL when it is not a number) — 000080's function body.
fn numbers_function(number_of_text: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION sharpsend_numbers(a jsonb) RETURNS jsonb LANGUAGE sql \
         IMMUTABLE PARALLEL SAFE AS $$ \
         SELECT COALESCE(jsonb_object_agg(e.key, e.n), '{{}}'::jsonb) FROM (\
         SELECT key, {number_of_text} AS n FROM jsonb_each_text(\
         CASE WHEN jsonb_typeof(a) = 'object' THEN a ELSE '{{}}'::jsonb END)) e \
         WHERE e.n IS NOT NULL $$"
    )
}

/// True when the attribute's text `value` cannot be a number, from its first character alone:
/// 48..57 are '0'..'9', 32 ' ', 45 '-'; `ascii('')` is 0 (not a number either way).
pub(crate) const PG_CANNOT_BE_NUMBER: &str =
    "ascii(value) NOT BETWEEN 48 AND 57 AND ascii(value) NOT IN (32, 45)";

/// This migration's `sharpsend_numbers` (the last SQL one; 000096 replaces it and restores it
/// when undone).
pub(crate) fn sql_function() -> String {
    numbers_function(&format!(
        "CASE WHEN {PG_CANNOT_BE_NUMBER} THEN NULL ELSE {PG_NUMBER_OF_TEXT} END"
    ))
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&sql_function())
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(&numbers_function(PG_NUMBER_OF_TEXT))
            .await?;
        Ok(())
    }
}
