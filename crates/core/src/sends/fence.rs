//! The fences that keep an attempt inside its claim, across processes whose clocks may differ:
//!
//! - the attempt's deadline ([`attempt_client`]): every request of it must be able to start by
//!   the claim's expiry minus the request timeout minus [`SendConfig::fence_margin`]; the
//!   limiter wait and 429 pauses count, and a request that cannot start in time is not sent
//!   (`cio_client::SendError::NotSent`). The deadline is taken on this process's monotonic
//!   clock at the claim, so a later jump of the wall clock does not move it;
//! - the reconciler's grace ([`settle_after`]) starts at the END of the attempt's window (the
//!   claim's expiry, or when the dispatcher recorded the outcome), plus the fence margin;
//! - the trigger window's key ([`TriggerScope`]);
//! - the start-up check ([`check_start_up`]): the process's clock within
//!   [`SendConfig::max_clock_skew`] of the database's, so two processes differ by at most the
//!   fence margin.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use cio_client::DeadlineClient;
use sharpsend_db::DatabaseConnection;
use sharpsend_db::sends::{self as store, Submission, WORKSPACE_WINDOW};

use super::SendConfig;
use crate::AppContext;
use crate::clock::Clock;
use crate::context::BootstrapError;
use crate::settings::{ConfigError, Settings};

/// Which triggers the trigger spacing holds between (`SHARPSEND_TRIGGER_SCOPE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TriggerScope {
    /// Any two triggers of the workspace, whatever their broadcast: Customer.io documents "1
    /// request every 10 seconds" without saying per broadcast.
    #[default]
    Workspace,
    /// Two triggers of the same broadcast; other broadcasts are not held back.
    Broadcast,
}

impl TriggerScope {
    /// The trigger window a trigger of `broadcast_id` takes.
    pub fn window_of(self, broadcast_id: i64) -> i64 {
        match self {
            TriggerScope::Workspace => WORKSPACE_WINDOW,
            TriggerScope::Broadcast => broadcast_id,
        }
    }
}

impl FromStr for TriggerScope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "workspace" => Ok(TriggerScope::Workspace),
            "broadcast" | "per_broadcast" => Ok(TriggerScope::Broadcast),
            other => Err(format!(
                "unknown trigger scope `{other}`: `workspace` or `broadcast`"
            )),
        }
    }
}

/// `d` as a signed span (saturating).
pub(super) fn span(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// A client for the requests of the attempt that holds `claimed`: each must be able to start by
/// the claim's expiry minus the fence margin minus the request timeout, or it is not sent.
pub(super) fn attempt_client(ctx: &AppContext, claimed: &Submission) -> DeadlineClient {
    let now = ctx.now();
    let expires = claimed.claim_expires_at.unwrap_or(now);
    let end = expires - span(ctx.settings.sends.fence_margin());
    let left = (end - now).to_std().unwrap_or(Duration::ZERO);
    ctx.cio.with_deadline(tokio::time::Instant::now() + left)
}

/// The end of the window of `s`'s last attempt: recorded, or (rows from before it was) the
/// start plus the claim TTL.
pub(super) fn attempt_window_end(
    config: &SendConfig,
    s: &Submission,
    fallback_start: DateTime<Utc>,
) -> DateTime<Utc> {
    s.attempt_ends_at
        .unwrap_or_else(|| s.attempt_started_at.unwrap_or(fallback_start) + span(config.claim_ttl))
}

/// From when an uncertain submission that Customer.io does not show (or shows unsent) may be
/// settled as not sent: the grace after the end of its attempt's window, plus the fence margin
/// (the window's end is in the dispatcher's clock, `now` in the reconciler's).
pub(super) fn settle_after(
    config: &SendConfig,
    s: &Submission,
    fallback_start: DateTime<Utc>,
) -> DateTime<Utc> {
    attempt_window_end(config, s, fallback_start)
        + span(config.fence_margin())
        + span(config.reconcile_grace)
}

/// Start-up checks of the send fences: the settings agree with each other
/// ([`Settings::check`]), and this process's clock is within `SHARPSEND_MAX_CLOCK_SKEW_MS` of
/// the database's. A process outside the bound refuses to start: its claims, grace periods and
/// trigger windows would not mean to other processes what they mean to it.
pub async fn check_start_up(
    db: &DatabaseConnection,
    settings: &Settings,
    clock: &Clock,
) -> Result<(), BootstrapError> {
    settings.check()?;
    let bound = span(settings.sends.max_clock_skew);
    let before = clock.now();
    let database = store::database_now(db).await?;
    let after = clock.now();
    // The database read its clock somewhere between `before` and `after`.
    let round_trip = after - before;
    let local = before + round_trip / 2;
    let skew = local - database;
    let off = skew.abs();
    if off > bound + round_trip / 2 + TimeDelta::milliseconds(1) {
        return Err(ConfigError::new(
            "SHARPSEND_MAX_CLOCK_SKEW_MS",
            format!(
                "this process's clock is {} ms {} the database's, more than the {} ms tolerated; \
                 synchronise the clocks (NTP): claims, grace periods and trigger windows compare \
                 times taken by different processes",
                off.num_milliseconds(),
                if skew > TimeDelta::zero() {
                    "ahead of"
                } else {
                    "behind"
                },
                bound.num_milliseconds()
            ),
        )
        .into());
    }
    if off > bound / 2 {
        tracing::warn!(
            skew_ms = skew.num_milliseconds(),
            bound_ms = bound.num_milliseconds(),
            "this process's clock is more than half the tolerated skew from the database's"
        );
    }
    Ok(())
}
