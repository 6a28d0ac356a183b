//! `sharpsend-server`: the gRPC face of the service. It maps requests to `sharpsend_core` calls and
//! domain errors to gRPC status; business logic lives in `sharpsend-core`.
//!
//! - [`auth`]: the access layer: API keys (configured and created; constant-time comparison;
//!   caller identity in extensions), roles checked against [`access`] (THE table of the role each
//!   RPC needs), and the audit record ([`audit`]: the ids of each audited request).
//! - [`admin`] serves `sharpsend.cio.v1.AdminService` (API keys, audit events).
//! - [`tls`]: TLS / mTLS on the gRPC listener with certificates reloaded when their files change.
//! - [`status`]: the ONE place where domain errors become `tonic::Status`.
//! - [`segments`] serves `sharpsend.cio.v1.SegmentService`; [`profiles`] serves
//!   `sharpsend.cio.v1.ProfileService`; [`convert`] maps protobuf well-known types.
//! - [`campaigns`] serves `sharpsend.cio.v1.CampaignService` (sends here; the campaign and metrics
//!   reads in [`campaign_metrics`], journey events in [`journey`]).
//! - [`analytics`] serves `sharpsend.cio.v1.AnalyticsService` (engagement watch, quarantine,
//!   assignment analytics, reports, segment suggestions).
//! - [`ops`] serves `sharpsend.cio.v1.OpsService` (jobs: list, runs, run now).
//! - [`telemetry`]: the per-call span (honouring `traceparent`) and gRPC metrics layer.
//! - [`app`]: assembling and serving everything (health, reflection, limits, graceful shutdown);
//!   [`limits`]: the global in-flight limit (shedding with `UNAVAILABLE` + `RetryInfo`) and the
//!   deadline (`DEADLINE_EXCEEDED`); [`cache_layer`]: forgets cached reads after every call that
//!   may write, so the caller's next read sees its write.
//! - [`webhooks`]: the HTTP endpoint for Customer.io's reporting webhooks
//!   (`SHARPSEND_WEBHOOK_LISTEN`).
//! - `dev` (feature `dev`, on by default): `--dev` mode: SQLite + in-process simulator +
//!   in-process scheduler. Production builds (`--no-default-features`) do not link the simulator.

pub mod abtests;
pub mod access;
pub mod admin;
pub mod analytics;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cache_layer;
pub mod campaign_metrics;
pub mod campaigns;
pub mod convert;
#[cfg(feature = "dev")]
pub mod dev;
pub mod journey;
pub mod limits;
pub mod ops;
pub mod profiles;
pub mod segments;
pub mod status;
pub mod telemetry;
pub mod tenancy;
pub mod tls;
pub mod webhooks;

pub use app::serve;
