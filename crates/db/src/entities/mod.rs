//! sea-orm entities, one module per table. They mirror the schema created by
//! `sharpsend-migrations`; callers normally use the repository modules
//! ([`crate::workspaces`], [`crate::segments`], [`crate::jobs`], [`crate::profiles`],
//! [`crate::outbox`]) instead.

pub mod job_leases;
pub mod job_runs;
pub mod outbox;
pub mod profiles;
pub mod segments;
pub mod workspaces;
