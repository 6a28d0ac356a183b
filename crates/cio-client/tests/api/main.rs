//! Integration tests of `cio-client` against the `cio-sim` simulator over real HTTP (port 0).
//!
//! - `deadline`: sending calls fenced by a deadline (NotSent before anything leaves).
//! - `helpers`: simulator + client set-up.
//! - `account`: `check_account` (wrong Track credentials vs wrong region).
//! - `calls`: the typed calls and how each status maps to `CioError`.
//! - `people`: Track writes: v1 identify/events, v2 entity and batch (200, 207), safe retries.
//! - `customers`: App API customer reads (attributes, bulk attributes, segments, email lookup).
//! - `segment_members`: manual segment membership (add/remove customers, 400s, limits).
//! - `resilience`: retries, Retry-After, timeouts, dropped connections, NeverRetry endpoints.
//! - `limiter`: pacing shared across clients of one workspace (never over the limit in any
//!   rolling second), pauses after a 429 scoped to what was throttled.
//! - `paths`: ids in path segments (encoded exactly; dot segments refused, nothing sent).
//! - `wire`: the exact headers on the wire (a raw TCP listener captures them).

#![allow(clippy::unwrap_used)]

mod account;
mod activities;
mod calls;
mod campaigns;
mod customers;
mod deadline;
mod exports;
mod helpers;
mod limiter;
mod messages;
mod paths;
mod people;
mod resilience;
mod segment_members;
mod webhooks;
mod wire;
