//! Tracing set-up shared by the binaries: an `EnvFilter` (`RUST_LOG`, default `info,sqlx=warn`)
//! and human or JSON output.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Default filter: our logs at info; sqlx logs every statement at info, so keep it at warn.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,h2=warn,hyper=warn,tower=warn";

/// Installs the global subscriber. `json` switches to one JSON object per line. Safe to call more
/// than once (later calls do nothing).
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(fmt::layer().json().with_current_span(false)).try_init()
    } else {
        registry.with(fmt::layer().with_target(true)).try_init()
    };
    // Err means a subscriber is already installed (tests, or dev mode's in-process parts).
    let _ = result;
}
