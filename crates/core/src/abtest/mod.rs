//! A/B tests over an assignment's variants (the parts that need no database yet):
//! [`stats`] holds the sequential decision rule, the rates with intervals and the sample planner;
//! [`allocation`] the deterministic split of an audience into variants and the remainder.

pub mod allocation;
pub mod stats;
