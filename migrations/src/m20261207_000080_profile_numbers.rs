//! Typed shadow values (issue #18): `profiles.numbers`, the profile's numeric attributes as a
//! JSON object of numbers, kept in step with `attributes` on every write, so that a segment's
//! number conditions read a number instead of checking and casting text on every row of every
//! evaluation.
//!
//! An attribute is in `numbers` when its value is a JSON number or a numeric string — digits
//! only, or JSON number syntax with spaces around — exactly the values the criteria's number
//! conditions accept (see `sharpsend_db::criteria_sql`); the value is the number itself:
//! - PostgreSQL: a `GENERATED ALWAYS … STORED` column computed by the `IMMUTABLE` function
//!   `sharpsend_numbers(attributes)`: PostgreSQL recomputes it in every `INSERT` and `UPDATE`,
//!   whatever code path writes, so it cannot go stale. Values are exact `numeric`s; numeric
//!   text with an exponent beyond `numeric`'s range is held as 0 (zero mantissa or negative
//!   exponent), or as ±1e400 for ±infinity — beyond every double, so it compares with a
//!   condition's value (a double) as infinity would.
//! - SQLite: a JSON text column written by triggers after every `INSERT` and every `UPDATE` that
//!   sets `attributes` (SQLite has no stored generated column that could read `json_each`, and
//!   none can be added to an existing table); values as SQLite reads them (integers, doubles).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// PostgreSQL: an attribute's text (`->>`) as `numeric`, or NULL when it is not a number; the
/// same test as `criteria_sql`'s former per-row check.
pub(crate) const PG_NUMBER_OF_TEXT: &str = r"CASE WHEN ltrim(value, '0123456789') = '' THEN NULLIF(value, '')::numeric WHEN value ~ '^ *-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]{1,4})? *$' THEN value::numeric WHEN value ~ '^ *-?(0|[1-9][0-9]*)(\.[0-9]+)?[eE][-+]?[0-9]+ *$' THEN (CASE WHEN value ~ '([eE]-|^ *-?0(\.0+)?[eE])' THEN 0 WHEN value ~ '^ *-' THEN -1e400 ELSE 1e400 END) END";

/// SQLite: the `numbers` object of the profile row `row` (`NEW` in a trigger).
fn sqlite_numbers(row: &str) -> String {
    format!(
        "(SELECT json_group_object(j.key, j.n) FROM (SELECT key, CASE type \
         WHEN 'integer' THEN value WHEN 'real' THEN value \
         WHEN 'text' THEN (CASE WHEN value <> '' AND value NOT GLOB '*[^0-9]*' THEN CAST(value AS NUMERIC) \
         WHEN value NOT GLOB '*[^0-9eE.+ -]*' AND json_valid(value) THEN CAST(value AS NUMERIC) END) END AS n \
         FROM json_each(CASE WHEN json_type({row}.attributes) = 'object' THEN {row}.attributes ELSE '{{}}' END)) j \
         WHERE j.n IS NOT NULL)"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(&format!(
                    "CREATE FUNCTION sharpsend_numbers(a jsonb) RETURNS jsonb LANGUAGE sql \
                     IMMUTABLE PARALLEL SAFE AS $$ \
                     SELECT COALESCE(jsonb_object_agg(e.key, e.n), '{{}}'::jsonb) FROM (\
                     SELECT key, {PG_NUMBER_OF_TEXT} AS n FROM jsonb_each_text(\
                     CASE WHEN jsonb_typeof(a) = 'object' THEN a ELSE '{{}}'::jsonb END)) e \
                     WHERE e.n IS NOT NULL $$"
                ))
                .await?;
                db.execute_unprepared(
                    "ALTER TABLE profiles ADD COLUMN numbers jsonb \
                     GENERATED ALWAYS AS (sharpsend_numbers(attributes)) STORED",
                )
                .await?;
            }
            _ => {
                db.execute_unprepared("ALTER TABLE profiles ADD COLUMN numbers TEXT")
                    .await?;
                let numbers = sqlite_numbers("NEW");
                db.execute_unprepared(&format!(
                    "CREATE TRIGGER profile_numbers_insert AFTER INSERT ON profiles BEGIN \
                     UPDATE profiles SET numbers = {numbers} WHERE rowid = NEW.rowid; END"
                ))
                .await?;
                db.execute_unprepared(&format!(
                    "CREATE TRIGGER profile_numbers_update AFTER UPDATE OF attributes ON profiles \
                     BEGIN UPDATE profiles SET numbers = {numbers} WHERE rowid = NEW.rowid; END"
                ))
                .await?;
                db.execute_unprepared(&format!(
                    "UPDATE profiles SET numbers = {}",
                    sqlite_numbers("profiles")
                ))
                .await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let postgres = manager.get_database_backend() == DbBackend::Postgres;
        if !postgres {
            db.execute_unprepared("DROP TRIGGER IF EXISTS profile_numbers_insert")
                .await?;
            db.execute_unprepared("DROP TRIGGER IF EXISTS profile_numbers_update")
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Profiles::Table)
                    .drop_column(Profiles::Numbers)
                    .to_owned(),
            )
            .await?;
        if postgres {
            db.execute_unprepared("DROP FUNCTION IF EXISTS sharpsend_numbers(jsonb)")
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Profiles {
    Table,
    Numbers,
}
