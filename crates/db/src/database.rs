//! Opening a connection pool and running / checking migrations.

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement,
    TransactionOptions, TransactionTrait,
};
use sharpsend_migrations::{Migrator, MigratorTrait};

use crate::DbError;

/// How long a SQLite connection waits for another writer before giving up.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per SQLite file pool (readers run in parallel under WAL; writers queue).
const SQLITE_MAX_CONNECTIONS: u32 = 8;
/// Connections per PostgreSQL pool (one process).
const POSTGRES_MAX_CONNECTIONS: u32 = 10;
const POSTGRES_MIN_CONNECTIONS: u32 = 1;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Key of the PostgreSQL advisory lock held while migrating ("sharpsnd" in ASCII), so that two
/// processes migrating at once run one after the other instead of colliding.
const MIGRATION_LOCK_KEY: i64 = 0x7368_6172_7073_6e64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UrlKind {
    /// A SQLite file; `explicit_mode` is true when the URL carries its own `mode=`.
    SqliteFile {
        explicit_mode: bool,
    },
    SqliteMemory,
    Postgres,
}

/// Classifies a database URL without ever echoing it (it may hold a password).
fn classify(url: &str) -> Result<UrlKind, DbError> {
    let parsed = url::Url::parse(url).map_err(|e| {
        DbError::InvalidUrl(format!(
            "not a URL ({e}); expected sqlite:<path> or postgres://…"
        ))
    })?;
    match parsed.scheme() {
        "sqlite" => {
            let mode = parsed
                .query_pairs()
                .find(|(k, _)| k == "mode")
                .map(|(_, v)| v.into_owned());
            let memory = parsed.path().contains(":memory:")
                || parsed.host_str() == Some(":memory:")
                || mode.as_deref() == Some("memory");
            if memory {
                Ok(UrlKind::SqliteMemory)
            } else if parsed.path().is_empty() && parsed.host_str().unwrap_or("").is_empty() {
                Err(DbError::InvalidUrl(
                    "SQLite URL without a file path".to_owned(),
                ))
            } else {
                Ok(UrlKind::SqliteFile {
                    explicit_mode: mode.is_some(),
                })
            }
        }
        "postgres" | "postgresql" => Ok(UrlKind::Postgres),
        other => Err(DbError::InvalidUrl(format!(
            "unsupported scheme `{other}`; expected sqlite: or postgres:"
        ))),
    }
}

/// Opens a connection pool.
///
/// - `sqlite:<path>` (e.g. `sqlite://data/sharpsend.db`): the file is created if missing
///   (unless the URL sets its own `mode=`), WAL journal, `synchronous=NORMAL`, foreign keys on,
///   5 s busy timeout, up to 8 connections. `sqlite::memory:` gets a single connection that
///   lives as long as the pool (each connection would otherwise see its own empty database).
/// - `postgres://…`: up to 10 connections, 10 s connect / acquire timeouts.
///
/// Statement logging by sqlx is off (it logs every statement at INFO otherwise).
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbError> {
    let kind = classify(url)?;
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(ACQUIRE_TIMEOUT);
    match kind {
        UrlKind::SqliteFile { explicit_mode } => {
            opts.max_connections(SQLITE_MAX_CONNECTIONS)
                .min_connections(0)
                .idle_timeout(IDLE_TIMEOUT);
            opts.map_sqlx_sqlite_opts(move |o| {
                let o = o
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT);
                if explicit_mode {
                    o
                } else {
                    o.create_if_missing(true)
                }
            });
        }
        UrlKind::SqliteMemory => {
            opts.max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
            opts.map_sqlx_sqlite_opts(|o| o.foreign_keys(true).busy_timeout(SQLITE_BUSY_TIMEOUT));
        }
        UrlKind::Postgres => {
            opts.max_connections(POSTGRES_MAX_CONNECTIONS)
                .min_connections(POSTGRES_MIN_CONNECTIONS)
                .idle_timeout(IDLE_TIMEOUT);
            // Statements are prepared once per connection and their texts never change with
            // the data (rows are bound as one JSON array). A generic plan PostgreSQL caches
            // while a table is small (a fresh mirror) keeps scanning it once it is large: a
            // 1,000-row lock of a 300,000-row table went from ~1.5 ms to 84 s that way. Plan
            // each execution for the table as it is now; planning costs well under a ms.
            opts.map_sqlx_postgres_opts(|o| o.options([("plan_cache_mode", "force_custom_plan")]));
        }
    }
    let db = Database::connect(opts).await?;
    tracing::debug!(backend = ?db.get_database_backend(), "database connected");
    Ok(db)
}

/// Begins a transaction that is going to write: `BEGIN IMMEDIATE` on SQLite, so that it takes
/// the write lock up front and waits (busy timeout) for other writers instead of failing when
/// it later upgrades from reading to writing; a plain `BEGIN` on PostgreSQL. Inside a
/// transaction it opens a savepoint.
pub(crate) async fn begin_write<C: TransactionTrait>(db: &C) -> Result<C::Transaction, DbErr> {
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// Applies every pending migration, all in one transaction.
///
/// Safe to call from two processes at once: on PostgreSQL the second waits on an advisory lock,
/// on SQLite on the write lock (`BEGIN IMMEDIATE`), and then finds nothing left to do.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbError> {
    let txn = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        })
        .await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [MIGRATION_LOCK_KEY.into()],
        ))
        .await?;
    }
    let pending: Vec<String> = Migrator::get_pending_migrations(&txn)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    if !pending.is_empty() {
        tracing::info!(count = pending.len(), names = %pending.join(", "), "applying database migrations");
        Migrator::up(&txn, None).await?;
    }
    txn.commit().await?;
    Ok(())
}

/// Names of the migrations not yet applied, oldest first. Read-only: works for a database user
/// without DDL rights, and on a database never migrated (then every migration is pending).
pub async fn pending_migrations(db: &DatabaseConnection) -> Result<Vec<String>, DbError> {
    Ok(Migrator::get_pending_migrations_read_only(db)
        .await?
        .iter()
        .map(|m| m.name().to_owned())
        .collect())
}

/// `Ok(())` when the schema is up to date, [`DbError::PendingMigrations`] otherwise. For
/// processes that must not migrate themselves (server, scheduler) to call at start-up.
pub async fn ensure_migrated(db: &DatabaseConnection) -> Result<(), DbError> {
    let pending = pending_migrations(db).await?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(DbError::PendingMigrations {
            count: pending.len(),
            names: pending.join(", "),
        })
    }
}

/// PostgreSQL: runs `statement` (one row back) inside `txn` with a plan made once per
/// connection and kept (`plan_cache_mode = force_generic_plan` for this statement only; every
/// other statement keeps [`connect`]'s plan per execution).
///
/// Only for statements whose plan cannot depend on the data: rows bound as one JSON array and
/// written through unique-index probes (`INSERT … ON CONFLICT`), no table scanned. Planned per
/// execution, such a statement folds its JSON parameters into constants and plans them every
/// time: 5 ms of a ~35 ms merge of 1,000 attribute updates (docs/benchmarks.md, thirteenth
/// session). Costs two `SET LOCAL` round trips.
pub(crate) async fn query_one_planned_once(
    txn: &impl ConnectionTrait,
    statement: Statement,
) -> Result<Option<sea_orm::QueryResult>, DbErr> {
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?;
    // On an error the transaction is over: nothing to reset.
    let row = txn.query_one_raw(statement).await?;
    txn.execute_unprepared("SET LOCAL plan_cache_mode = DEFAULT")
        .await?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_urls() {
        assert_eq!(
            classify("sqlite://data/x.db").ok(),
            Some(UrlKind::SqliteFile {
                explicit_mode: false
            })
        );
        assert_eq!(
            classify("sqlite:///tmp/x.db?mode=rwc").ok(),
            Some(UrlKind::SqliteFile {
                explicit_mode: true
            })
        );
        assert_eq!(
            classify("sqlite::memory:").ok(),
            Some(UrlKind::SqliteMemory)
        );
        assert_eq!(
            classify("sqlite://?mode=memory").ok(),
            Some(UrlKind::SqliteMemory)
        );
        assert_eq!(
            classify("postgres://u:p@localhost/db").ok(),
            Some(UrlKind::Postgres)
        );
        assert_eq!(
            classify("postgresql://localhost/db").ok(),
            Some(UrlKind::Postgres)
        );
    }

    #[test]
    fn invalid_urls_never_echo_secrets() {
        for url in [
            "mysql://user:hunter2@localhost/db",
            "hunter2",
            "http://user:hunter2@x",
        ] {
            let err = classify(url).err().map(|e| e.to_string());
            let Some(msg) = err else {
                panic!("{url} should be rejected");
            };
            assert!(msg.starts_with("invalid database URL"), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[tokio::test]
    async fn connect_rejects_bad_url_without_echoing_it() {
        let err = connect("mysql://root:hunter2@localhost/x").await.err();
        assert!(matches!(err, Some(DbError::InvalidUrl(ref m)) if !m.contains("hunter2")));
    }
}
