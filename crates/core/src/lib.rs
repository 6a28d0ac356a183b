//! Logic shared by `sharpsend-server` and `sharpsend-scheduler`; no gRPC and no HTTP serving here.
//!
//! - [`settings`]: [`settings::Settings`], every setting of both binaries, read and validated
//!   once at start-up (each variable declared with its default; errors name the variable).
//! - [`context`]: [`AppContext`], the database + Customer.io client + workspace + settings +
//!   [`clock::Clock`] every operation runs against. Core reads the time only from the clock.
//! - [`profiles`]: validating and accepting writes (mirror + outbox in one transaction),
//!   reading and importing profiles.
//! - [`outbox`]: delivering accepted writes to Customer.io in as few requests as the limits allow.
//! - [`cache`]: the read-through cache of the hot reads, never stale after a committed write.
//! - [`segments`]: the segment sync (Customer.io → mirror) and targeting validation.
//! - [`criteria`]: segment criteria (model, JSON form, validation with paths, database filter);
//!   [`managed_segments`]: SharpSend-managed segments kept in Customer.io as manual segments
//!   (create / preview / update / delete, evaluation job, membership delivery).
//! - [`sends`]: sends of approved assignments through Customer.io, exactly once (broadcast
//!   triggers or newsletters, one submission per target segment, reconciliation of uncertain
//!   outcomes, operator resolution); [`journey`]: journey events for every member of target
//!   segments through the outbox.
//! - [`campaigns`]: the campaign / broadcast / newsletter mirror; [`metrics`]: polling their
//!   metrics series into snapshots and answering totals, rates and series.
//! - [`engagement`]: delivery events from Customer.io (webhooks, delivery-poll), scores and a
//!   person's history; [`analytics`]: assignment analytics, rankings, reports, segment
//!   suggestions and the engagement watch.
//! - [`jobs`]: the background jobs as plain one-step async functions, run under a database lease
//!   and recorded as job runs; the scheduler's cron and `--once` both call [`jobs::run_job`].
//! - [`telemetry`]: logs, and OpenTelemetry traces and metrics over OTLP when configured, shared
//!   by the binaries (with this crate's job and outbox instruments).
//! - [`workspaces`]: workspaces as data (create, update, list, disable; credentials checked with
//!   Customer.io, sealed at rest by [`secrets`] under `SHARPSEND_MASTER_KEY`) and
//!   [`workspaces::access`], a stored workspace with its credentials opened.
//! - [`error`]: [`CoreError`], the one error type callers map to their protocol, and
//!   [`error::error_chain`] for logs; [`input`]: the bounds every request string is held to
//!   (bounded, no NUL, identifiers never trimmed).

pub mod abtest;
pub mod analytics;
pub mod cache;
pub mod campaigns;
pub mod clock;
pub mod context;
pub mod criteria;
pub mod engagement;
pub mod error;
pub mod idempotency;
pub mod input;
pub mod jobs;
pub mod journey;
pub mod managed_segments;
pub mod metrics;
pub mod outbox;
pub mod paging;
pub mod profile_sync;
pub mod profiles;
pub mod secrets;
pub mod segments;
pub mod sends;
pub mod settings;
pub mod telemetry;
pub mod tenants;
pub mod workspaces;

/// Per-test databases and `db_test!` (feature `test-support`), for crates that build on core.
#[cfg(feature = "test-support")]
pub mod testing {
    pub use sharpsend_db::db_test;
    pub use sharpsend_db::testing::*;
}

pub use context::AppContext;
pub use error::{CoreError, FieldViolation};
