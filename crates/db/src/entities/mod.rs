//! sea-orm entities, one module per table. They mirror the schema created by
//! `sharpsend-migrations`; callers normally use the repository modules
//! ([`crate::workspaces`], [`crate::segments`], [`crate::jobs`], [`crate::profiles`],
//! [`crate::outbox`], [`crate::managed_segments`]) instead.

pub mod job_leases;
pub mod job_runs;
pub mod managed_segments;
pub mod outbox;
pub mod profiles;
pub mod segment_member_syncs;
pub mod segment_members;
pub mod segments;
pub mod workspaces;
