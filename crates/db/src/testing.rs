//! Test support (cargo feature `test-support`): a fresh database per test, on SQLite and on
//! PostgreSQL, and the [`db_test!`](crate::db_test) macro that runs one test body on both.
//!
//! - SQLite: a file in a new temporary directory (always available).
//! - PostgreSQL: a new database `sharpsend_test_<ulid>` created through the admin URL in
//!   `SHARPSEND_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`) and dropped
//!   by [`TestDatabase::cleanup`]. Without that variable the PostgreSQL variant of a test prints
//!   that it was skipped and passes. For a server on localhost without `sslmode` in the URL,
//!   `sslmode=disable` is added (TLS set-up would dominate test time). A migrated database is
//!   a copy (`CREATE DATABASE … TEMPLATE`) of one migrated once per test process,
//!   `sharpsend_tmpl_<pid>_<ulid>` (~0.1 s instead of ~1.4 s of migrations per test); a process
//!   cannot drop its own when it exits, so each new one drops those of processes that are gone
//!   (Linux, by `/proc/<pid>`, so test processes sharing a server are assumed to share a
//!   machine; elsewhere they stay, ~9 MB each).
//!
//! Each test owns its database, so tests run in parallel. [`TestDatabase::url`] can be handed
//! to another process (a spawned server or scheduler) while the test runs.
//!
//! # Use from another crate
//!
//! ```toml
//! [dev-dependencies]
//! sharpsend-db = { workspace = true, features = ["test-support"] }
//! tokio.workspace = true   # the macro expands to #[tokio::test]
//! ```
//!
//! ```ignore
//! use sharpsend_db::testing::{TestDatabase, TestResult};
//!
//! sharpsend_db::db_test!(ensures_workspace, |db: TestDatabase| async move {
//!     let ws = sharpsend_db::workspaces::ensure(&db.conn, "site-1", "us").await?;
//!     assert_eq!(ws.region, "us");
//!     Ok(()) // or return (); a returned Err fails the test
//! });
//! ```
//!
//! This generates `mod ensures_workspace { async fn sqlite(); async fn postgres(); }` as two
//! `#[tokio::test(flavor = "multi_thread")]` tests, so `cargo test ensures_workspace` runs both
//! and `cargo test sqlite` only the SQLite ones. The database is migrated unless the test is
//! written `db_test!(name, unmigrated, |db| …)`. The database is cleaned up after the body,
//! also when it panics. For custom set-ups call [`TestDatabase::create`] /
//! [`TestDatabase::create_migrated`] and [`TestDatabase::cleanup`] directly, or [`run`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};

use crate::DbError;

/// Environment variable holding the PostgreSQL admin URL used to create test databases.
pub const POSTGRES_URL_ENV: &str = "SHARPSEND_TEST_POSTGRES_URL";

/// Prefix of every database created by [`TestDatabase::create`].
pub const POSTGRES_DB_PREFIX: &str = "sharpsend_test_";

/// Prefix of the migrated template database of a test process (see the module docs).
pub const POSTGRES_TEMPLATE_PREFIX: &str = "sharpsend_tmpl_";

/// This process's migrated template database on PostgreSQL, made by the first test that asks.
static POSTGRES_TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// What a test body may return: `()` or a `Result` whose `Err` fails the test.
pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Which database engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of its own for one test.
#[derive(Debug)]
pub struct TestDatabase {
    /// URL of this test's database; [`crate::connect`] accepts it, from any process.
    pub url: String,
    /// A pool opened with [`crate::connect`].
    pub conn: DatabaseConnection,
    pub backend: Backend,
    cleanup: Cleanup,
}

#[derive(Debug)]
enum Cleanup {
    /// Removing the directory removes the database file (and its WAL files). Shared with
    /// [`run`], which keeps it alive even if the body only captured some fields of the
    /// [`TestDatabase`] (closures capture disjoint fields).
    Sqlite(Arc<tempfile::TempDir>),
    Postgres {
        admin_url: String,
        name: String,
    },
}

impl TestDatabase {
    /// A new, empty (not migrated) database. `Ok(None)` when PostgreSQL is asked for but
    /// `SHARPSEND_TEST_POSTGRES_URL` is not set.
    pub async fn create(backend: Backend) -> Result<Option<Self>, DbError> {
        match backend {
            Backend::Sqlite => Self::create_sqlite().await.map(Some),
            Backend::Postgres => match postgres_admin_url() {
                Some(admin_url) => Self::create_postgres(admin_url, test_database_name(), None)
                    .await
                    .map(Some),
                None => Ok(None),
            },
        }
    }

    /// Like [`create`](Self::create), with every migration applied.
    pub async fn create_migrated(backend: Backend) -> Result<Option<Self>, DbError> {
        if backend == Backend::Postgres {
            let Some(admin_url) = postgres_admin_url() else {
                return Ok(None);
            };
            let template = POSTGRES_TEMPLATE
                .get_or_try_init(|| migrated_template(&admin_url))
                .await?;
            return Self::create_postgres(admin_url, test_database_name(), Some(template))
                .await
                .map(Some);
        }
        match Self::create(backend).await? {
            Some(db) => db.migrated().await.map(Some),
            None => Ok(None),
        }
    }

    /// `self` with every migration applied; deleted if they fail.
    async fn migrated(self) -> Result<Self, DbError> {
        if let Err(e) = crate::migrate(&self.conn).await {
            self.cleanup().await;
            return Err(e);
        }
        Ok(self)
    }

    /// A second, independent pool to the same database (e.g. to race two "processes").
    pub async fn connect_again(&self) -> Result<DatabaseConnection, DbError> {
        crate::connect(&self.url).await
    }

    /// Closes the pool and deletes the database (drops the PostgreSQL database, terminating
    /// any connection still open to it; removes the SQLite directory). Failures are printed,
    /// not raised: a leftover `sharpsend_test_*` database is harmless.
    pub async fn cleanup(self) {
        let TestDatabase { conn, cleanup, .. } = self;
        if let Err(e) = conn.close().await {
            eprintln!("test database: closing the pool failed: {e}");
        }
        match cleanup {
            Cleanup::Sqlite(dir) => {
                if let Ok(dir) = Arc::try_unwrap(dir)
                    && let Err(e) = dir.close()
                {
                    eprintln!("test database: removing the SQLite directory failed: {e}");
                }
            }
            Cleanup::Postgres { admin_url, name } => {
                if let Err(e) = drop_postgres_database(&admin_url, &name).await {
                    eprintln!("test database: dropping {name} failed: {e}");
                }
            }
        }
    }

    async fn create_sqlite() -> Result<Self, DbError> {
        let dir = tempfile::Builder::new()
            .prefix("sharpsend-test-")
            .tempdir()
            .map_err(|e| DbError::Db(sea_orm::DbErr::Custom(format!("temp dir: {e}"))))?;
        let path: PathBuf = dir.path().join("test.db");
        let url = format!("sqlite://{}", path.display());
        let conn = crate::connect(&url).await?;
        Ok(Self {
            url,
            conn,
            backend: Backend::Sqlite,
            cleanup: Cleanup::Sqlite(Arc::new(dir)),
        })
    }

    /// A new database `name`, a copy of `template` if given.
    async fn create_postgres(
        admin_url: String,
        name: String,
        template: Option<&str>,
    ) -> Result<Self, DbError> {
        let mut url = url::Url::parse(&admin_url)
            .map_err(|e| DbError::InvalidUrl(format!("{POSTGRES_URL_ENV} is not a URL ({e})")))?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();

        let admin = admin_connection(&admin_url).await?;
        let created = admin
            .execute_unprepared(&match template {
                Some(template) => format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""),
                None => format!("CREATE DATABASE \"{name}\""),
            })
            .await;
        let closed = admin.close().await;
        created?;
        closed?;

        match crate::connect(&url).await {
            Ok(conn) => Ok(Self {
                url,
                conn,
                backend: Backend::Postgres,
                cleanup: Cleanup::Postgres { admin_url, name },
            }),
            Err(e) => {
                // Best effort; the connect error is the one worth reporting.
                let _ = drop_postgres_database(&admin_url, &name).await;
                Err(e)
            }
        }
    }
}

/// Runs `test` against a fresh database of `backend` (migrated if `migrated`), then cleans the
/// database up, also when `test` panics. What [`db_test!`](crate::db_test) expands to.
///
/// Panics if the database cannot be created, or if `test` returns an `Err`.
pub async fn run<F, Fut, T>(backend: Backend, migrated: bool, test: F)
where
    F: FnOnce(TestDatabase) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: TestOutcome + Send + 'static,
{
    let created = if migrated {
        TestDatabase::create_migrated(backend).await
    } else {
        TestDatabase::create(backend).await
    };
    let db = match created {
        Ok(Some(db)) => db,
        Ok(None) => {
            eprintln!("skipped: {backend:?} test database not configured (set {POSTGRES_URL_ENV})");
            return;
        }
        Err(e) => panic!("creating a {backend:?} test database failed: {}", chain(&e)),
    };
    let handle = CleanupHandle::of(&db);
    // A task of its own, so that a panic in the body still lets us drop the database.
    let outcome = tokio::spawn(test(db)).await;
    handle.run().await;
    match outcome {
        Ok(out) => out.check(),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        },
    }
}

/// Return types accepted from a [`run`] / [`db_test!`](crate::db_test) body.
pub trait TestOutcome {
    /// Panics if the outcome is a failure.
    fn check(self);
}

impl TestOutcome for () {
    fn check(self) {}
}

impl<E: std::fmt::Debug> TestOutcome for Result<(), E> {
    fn check(self) {
        if let Err(e) = self {
            panic!("test returned an error: {e:?}");
        }
    }
}

/// What [`run`] needs to delete a database after the body (which owns the
/// [`TestDatabase`]) has finished.
enum CleanupHandle {
    /// The temporary directory goes away when the last handle to it is dropped.
    Sqlite(Arc<tempfile::TempDir>),
    Postgres {
        admin_url: String,
        name: String,
    },
}

impl CleanupHandle {
    fn of(db: &TestDatabase) -> Self {
        match &db.cleanup {
            Cleanup::Sqlite(dir) => CleanupHandle::Sqlite(dir.clone()),
            Cleanup::Postgres { admin_url, name } => CleanupHandle::Postgres {
                admin_url: admin_url.clone(),
                name: name.clone(),
            },
        }
    }

    async fn run(self) {
        match self {
            CleanupHandle::Sqlite(dir) => {
                if let Ok(dir) = Arc::try_unwrap(dir)
                    && let Err(e) = dir.close()
                {
                    eprintln!("test database: removing the SQLite directory failed: {e}");
                }
            }
            CleanupHandle::Postgres { admin_url, name } => {
                if let Err(e) = drop_postgres_database(&admin_url, &name).await {
                    eprintln!("test database: dropping {name} failed: {e}");
                }
            }
        }
    }
}

fn postgres_admin_url() -> Option<String> {
    std::env::var(POSTGRES_URL_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| without_local_tls(&v))
}

/// For a server on the loopback interface with no `sslmode` in the URL, adds
/// `sslmode=disable`: the TLS handshake (tried first by default) costs ~0.1 s per connection
/// in a debug build and protects nothing on localhost.
fn without_local_tls(admin_url: &str) -> String {
    let Ok(mut url) = url::Url::parse(admin_url) else {
        return admin_url.to_owned();
    };
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if !loopback || url.query_pairs().any(|(k, _)| k == "sslmode") {
        return admin_url.to_owned();
    }
    url.query_pairs_mut().append_pair("sslmode", "disable");
    url.to_string()
}

/// A new name under [`POSTGRES_DB_PREFIX`].
fn test_database_name() -> String {
    format!(
        "{POSTGRES_DB_PREFIX}{}",
        ulid::Ulid::new().to_string().to_lowercase()
    )
}

async fn admin_connection(admin_url: &str) -> Result<DatabaseConnection, DbError> {
    let mut opts = ConnectOptions::new(admin_url.to_owned());
    opts.max_connections(1)
        .min_connections(0)
        .sqlx_logging(false);
    let conn = Database::connect(opts).await?;
    if conn.get_database_backend() != DbBackend::Postgres {
        return Err(DbError::InvalidUrl(format!(
            "{POSTGRES_URL_ENV} must be a postgres:// URL"
        )));
    }
    Ok(conn)
}

/// Creates and migrates this process's template database (see the module docs), after dropping
/// those of processes that are gone. Answers its name. Its pool is closed: PostgreSQL copies a
/// template only while nobody is connected to it.
async fn migrated_template(admin_url: &str) -> Result<String, DbError> {
    drop_abandoned_templates(admin_url).await;
    let name = format!(
        "{POSTGRES_TEMPLATE_PREFIX}{}_{}",
        std::process::id(),
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let template = TestDatabase::create_postgres(admin_url.to_owned(), name.clone(), None)
        .await?
        .migrated()
        .await?;
    template.conn.close().await?;
    Ok(name)
}

/// Drops the template databases of test processes that no longer run (Linux only: a process is
/// alive while `/proc/<pid>` exists). Best effort: a failure leaves a template behind.
async fn drop_abandoned_templates(admin_url: &str) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let Ok(admin) = admin_connection(admin_url).await else {
        return;
    };
    let listed = admin
        .query_all_raw(sea_orm::Statement::from_string(
            DbBackend::Postgres,
            format!(
                "SELECT datname FROM pg_database WHERE starts_with(datname, '{POSTGRES_TEMPLATE_PREFIX}')"
            ),
        ))
        .await;
    let _ = admin.close().await;
    for row in listed.unwrap_or_default() {
        let Ok(name) = row.try_get::<String>("", "datname") else {
            continue;
        };
        let pid = name
            .strip_prefix(POSTGRES_TEMPLATE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            && let Err(e) = drop_postgres_database(admin_url, &name).await
        {
            eprintln!("test database: dropping the abandoned template {name} failed: {e}");
        }
    }
}

async fn drop_postgres_database(admin_url: &str, name: &str) -> Result<(), DbError> {
    let admin = admin_connection(admin_url).await?;
    let dropped = admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await;
    let closed = admin.close().await;
    dropped?;
    closed?;
    Ok(())
}

/// `err: cause: cause…`, for panic messages of test set-up failures.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Defines a test that runs the same body on SQLite and on PostgreSQL, each with a fresh,
/// migrated database of its own. See the [`testing`](crate::testing) module docs.
///
/// ```ignore
/// sharpsend_db::db_test!(name, |db: TestDatabase| async move { /* … */ Ok(()) });
/// sharpsend_db::db_test!(name, unmigrated, |db: TestDatabase| async move { /* … */ });
/// ```
///
/// Expands to `mod name { #[tokio::test] async fn sqlite() …; #[tokio::test] async fn postgres()
/// … }` (multi-threaded runtime, two workers); attributes written before `name` (docs,
/// `#[ignore]`…) go on both tests. The body is any `FnOnce(TestDatabase) -> impl Future` whose
/// output is `()` or `Result<(), impl Debug>`; the module sees the caller's imports
/// (`use super::*`).
#[macro_export]
macro_rules! db_test {
    ($(#[$meta:meta])* $name:ident, unmigrated, $body:expr $(,)?) => {
        $crate::db_test!(@emit [$(#[$meta])*] $name, false, $body);
    };
    ($(#[$meta:meta])* $name:ident, $body:expr $(,)?) => {
        $crate::db_test!(@emit [$(#[$meta])*] $name, true, $body);
    };
    (@emit [$(#[$meta:meta])*] $name:ident, $migrated:expr, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$meta])*
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::testing::run($crate::testing::Backend::Sqlite, $migrated, $body).await;
            }

            $(#[$meta])*
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::testing::run($crate::testing::Backend::Postgres, $migrated, $body).await;
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::without_local_tls;

    #[test]
    fn local_postgres_skips_tls_unless_told_otherwise() {
        assert_eq!(
            without_local_tls("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
        );
        assert_eq!(
            without_local_tls("postgres://u@localhost/test?sslmode=require"),
            "postgres://u@localhost/test?sslmode=require"
        );
        assert_eq!(
            without_local_tls("postgres://u@db.internal/test"),
            "postgres://u@db.internal/test"
        );
    }
}
