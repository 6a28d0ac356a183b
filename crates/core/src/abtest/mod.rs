//! A/B tests over an assignment's variants.
//!
//! - [`manage`]: creating (validated, planned, idempotent), reading, listing, cancelling tests
//!   and declaring a winner.
//! - [`stats`]: the sequential decision rule, rates with intervals, the sample planner.
//! - [`allocation`]: the deterministic split of an audience into variants and the remainder.
//! - [`run`]: StartTest (the audience snapshot, allocated and stored) and the
//!   `abtest-evaluation` job (variant segments and sends, looks, decisions, the remainder send).

pub mod allocation;
pub mod manage;
pub mod run;
pub mod stats;
