//! sea-orm entities, one module per table. They mirror the schema created by
//! `sharpsend-migrations`; callers normally use the repository modules
//! ([`crate::workspaces`], [`crate::segments`], [`crate::jobs`], [`crate::profiles`],
//! [`crate::outbox`], [`crate::managed_segments`], [`crate::sends`], [`crate::campaigns`],
//! [`crate::metrics`]) instead.

pub mod ab_test_allocations;
pub mod ab_test_arms;
pub mod ab_tests;
pub mod api_keys;
pub mod audit_events;
pub mod broadcast_windows;
pub mod campaigns;
pub mod idempotency_keys;
pub mod job_leases;
pub mod job_runs;
pub mod managed_segments;
pub mod metric_snapshots;
pub mod metric_targets;
pub mod outbox;
pub mod profiles;
pub mod segment_member_syncs;
pub mod segment_members;
pub mod segments;
pub mod send_history;
pub mod send_submissions;
pub mod sends;
pub mod workspaces;
