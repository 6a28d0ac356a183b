//! Database layer of the SharpSend ↔ Customer.io service: sea-orm entities, repositories,
//! connection set-up and the migration runner. It knows nothing of gRPC or of Customer.io's
//! HTTP APIs; it works the same on SQLite (dev, first run) and PostgreSQL (production).
//!
//! Layout:
//! - [`connect`], [`migrate`], [`pending_migrations`], [`ensure_migrated`]
//!   (`database.rs`): opening a pool with sane per-backend settings and running the
//!   `sharpsend-migrations` [`Migrator`](sharpsend_migrations::Migrator).
//! - [`DbError`] (`error.rs`): the one error type of this crate; enums stored as text are
//!   declared with `stored_enum!` (`stored.rs`), whose parse errors are [`UnknownValue`].
//! - [`entities`]: sea-orm entities, one module per table.
//! - [`workspaces`], [`segments`], [`jobs`], [`profiles`], [`outbox`]: query/mutation
//!   functions taking a connection (`&DatabaseConnection`, a transaction, or any
//!   `&impl ConnectionTrait`; `&impl TransactionTrait` for those that open a transaction of
//!   their own) and returning plain structs, never entity models.
//! - The write path: [`outbox::accept_attribute_updates`] / [`outbox::accept_events`] write the
//!   [`profiles`] mirror and the outbox in one transaction; outbox workers deliver with
//!   [`outbox::claim_due`] and `outbox::mark_*` (safe with many workers and replicas).
//! - [`criteria_sql`]: segment criteria ([`criteria_sql::Filter`]) compiled to SQL over the
//!   profiles mirror (PostgreSQL JSONB operators, SQLite JSON functions) with bound parameters;
//!   [`managed_segments`]: SharpSend-managed segments, their membership, evaluation (the
//!   membership difference recorded and queued in the outbox in one transaction) and mirrored
//!   Customer.io memberships.
//! - [`sends`]: sends of approved assignments, their submissions' exactly-once state machine
//!   (claims and broadcast trigger windows taken before a request leaves, guarded transitions,
//!   history); [`campaigns`]: the Customer.io campaign / broadcast / newsletter mirror;
//!   [`metrics`]: metrics poll targets (cadence, failures) and snapshots.
//! - [`api_keys`]: API keys (hashed secrets, role, workspace, revocation); [`audit`]: the
//!   append-only audit record and its filtered, paged listing.
//! - `testing` (feature `test-support`): a fresh database per test on SQLite and PostgreSQL
//!   and the `db_test!` macro that runs one test body on both.
//!
//! Timestamps are stored in UTC with microsecond precision (what PostgreSQL keeps); values
//! passed in are truncated to microseconds so that both backends return exactly what was read
//! back by the other.

#[macro_use]
mod stored;

pub mod abtests;
pub mod analytics;
pub mod api_keys;
pub mod audit;
pub mod campaigns;
pub mod criteria_sql;
mod database;
pub mod engagement;
pub mod entities;
mod error;
pub mod idempotency;
pub mod jobs;
pub mod managed_segments;
pub mod metrics;
pub mod outbox;
pub mod profile_sync;
pub mod profiles;
pub mod read_versions;
pub mod segments;
pub mod sends;
mod sql;
#[cfg(feature = "test-support")]
pub mod testing;
mod time;
pub mod workspaces;

pub use database::{connect, ensure_migrated, migrate, pending_migrations};
pub use error::DbError;
pub use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
pub use stored::UnknownValue;
