//! [`DbError`], the error type of every function in this crate.

/// Errors from the database layer.
///
/// `Display` never contains database text, SQL, or URLs with credentials: callers may show it.
/// The underlying [`sea_orm::DbErr`] is available as the error's `source()` for logs.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database (or the driver) failed; the cause is the `source()`.
    #[error("database error")]
    Db(#[from] sea_orm::DbErr),
    /// The schema is behind the code: some migrations have not been applied.
    #[error(
        "{count} pending database migration(s) ({names}); run `sharpsend-server migrate` first"
    )]
    PendingMigrations {
        /// How many migrations are pending.
        count: usize,
        /// Their names, comma separated.
        names: String,
    },
    /// The database URL cannot be used. The message never repeats a password.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
}
