//! Integration tests of `cio-client` against the `cio-sim` simulator over real HTTP (port 0).
//!
//! - `helpers`: simulator + client set-up.
//! - `calls`: the typed calls and how each status maps to `CioError`.
//! - `resilience`: retries, Retry-After, timeouts, dropped connections, NeverRetry endpoints.
//! - `limiter`: pacing shared across clients of one workspace, pauses after a 429.
//! - `wire`: the exact headers on the wire (a raw TCP listener captures them).

#![allow(clippy::unwrap_used)]

mod calls;
mod helpers;
mod limiter;
mod resilience;
mod wire;
