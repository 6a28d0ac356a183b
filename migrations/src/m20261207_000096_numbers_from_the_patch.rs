//! `profiles.numbers` on PostgreSQL computed once per write, and from the patch alone where a
//! write merges one (issue #12).
//!
//! 000080 made `numbers` a generated column, which PostgreSQL recomputes from the whole
//! `attributes` object in every `INSERT` and `UPDATE` — and twice in an `INSERT … ON CONFLICT DO
//! UPDATE` that updates: once for the proposed row, once for the updated one. Merging 1,000
//! three-attribute patches into existing six-attribute profiles spent ~30 ms of a ~45 ms upsert
//! there (`EXPLAIN ANALYZE`; with no shadow at all the upsert took 10–14 ms).
//!
//! Now `numbers` is a plain column that is still always `sharpsend_numbers(attributes)`:
//! - a writer may supply it (the attribute merge does: the stored profile's numbers without the
//!   patch's keys, plus the numbers of the patch — `sharpsend_numbers` over a few keys instead of
//!   the whole profile, once);
//! - `BEFORE` row triggers compute it when a writer does not: an `INSERT` without it, and an
//!   `UPDATE` that changes `attributes` but leaves `numbers` as it was (every other writer). An
//!   `UPDATE` that changes neither needs nothing.
//!
//! `sharpsend_numbers` itself becomes PL/pgSQL with the same test per value (000090's): a SQL
//! function with an aggregate is never inlined, and its per-call executor start cost more than
//! the work (13 → 8 µs for a six-attribute profile here). Same results: the test of every value
//! class (`the_numbers_shadow_takes_exactly_the_numbers_on_postgres`) is unchanged.
//!
//! `DROP EXPRESSION` keeps the stored values and does not rewrite the table. SQLite is unchanged
//! (its shadow has always been kept by triggers).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261207_000080_profile_numbers::{PG_ADD_GENERATED_NUMBERS, PG_NUMBER_OF_TEXT};
use crate::m20261207_000090_numbers_first_character::{
    self as first_character, PG_CANNOT_BE_NUMBER,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// `sharpsend_numbers` in PL/pgSQL: one pass over the attributes, 000090's first-character
/// test, then 000080's test for the values that may be numbers.
fn plpgsql_numbers() -> String {
    format!(
        "CREATE OR REPLACE FUNCTION sharpsend_numbers(a jsonb) RETURNS jsonb LANGUAGE plpgsql \
         IMMUTABLE PARALLEL SAFE AS $$ \
         DECLARE k text; value text; n numeric; o jsonb := '{{}}'; \
         BEGIN \
           IF a IS NULL OR jsonb_typeof(a) <> 'object' THEN RETURN o; END IF; \
           FOR k, value IN SELECT e.key, e.value FROM jsonb_each_text(a) e LOOP \
             CONTINUE WHEN {PG_CANNOT_BE_NUMBER}; \
             n := {PG_NUMBER_OF_TEXT}; \
             IF n IS NOT NULL THEN o := o || jsonb_build_object(k, n); END IF; \
           END LOOP; \
           RETURN o; \
         END $$"
    )
}

const TRIGGER_FUNCTION: &str = "CREATE FUNCTION sharpsend_profile_numbers() RETURNS trigger \
     LANGUAGE plpgsql AS $$ BEGIN NEW.numbers := sharpsend_numbers(NEW.attributes); \
     RETURN NEW; END $$";

const INSERT_TRIGGER: &str = "CREATE TRIGGER profiles_numbers_insert BEFORE INSERT ON profiles \
     FOR EACH ROW WHEN (NEW.numbers IS NULL) EXECUTE FUNCTION sharpsend_profile_numbers()";

const UPDATE_TRIGGER: &str = "CREATE TRIGGER profiles_numbers_update \
     BEFORE UPDATE OF attributes, numbers ON profiles FOR EACH ROW \
     WHEN (NEW.attributes IS DISTINCT FROM OLD.attributes \
           AND NEW.numbers IS NOT DISTINCT FROM OLD.numbers) \
     EXECUTE FUNCTION sharpsend_profile_numbers()";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        for sql in [
            "ALTER TABLE profiles ALTER COLUMN numbers DROP EXPRESSION".to_owned(),
            plpgsql_numbers(),
            TRIGGER_FUNCTION.to_owned(),
            INSERT_TRIGGER.to_owned(),
            UPDATE_TRIGGER.to_owned(),
        ] {
            db.execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        for sql in [
            "DROP TRIGGER IF EXISTS profiles_numbers_update ON profiles",
            "DROP TRIGGER IF EXISTS profiles_numbers_insert ON profiles",
            "DROP FUNCTION IF EXISTS sharpsend_profile_numbers()",
            "ALTER TABLE profiles DROP COLUMN numbers",
        ] {
            db.execute_unprepared(sql).await?;
        }
        // 000090's SQL function (a generated column needs an immutable function; the body
        // changes language, so it is dropped and made again), then 000080's column.
        db.execute_unprepared("DROP FUNCTION IF EXISTS sharpsend_numbers(jsonb)")
            .await?;
        db.execute_unprepared(&first_character::sql_function())
            .await?;
        db.execute_unprepared(PG_ADD_GENERATED_NUMBERS).await?;
        Ok(())
    }
}
