//! Engagement flowing back from Customer.io (issue #13): who engaged with which assignment,
//! and the scores that go back onto Customer.io profiles.
//!
//! - [`webhooks`]: the reporting-webhook receiver. A request is verified (signature in constant
//!   time, timestamp within the tolerance) before anything is stored; a validly signed body is
//!   always acknowledged: understood events are stored (deduplicated on `event_id`, attributed
//!   to SharpSend's sends), anything else goes to the quarantine.
//! - [`poll`]: the `delivery-poll` job: the same delivery events from the App API's
//!   per-delivery records, for workspaces without webhooks.
//! - [`score`]: the `engagement-scoring` job and the score formula.
//! - [`history`]: a person's engagement history for GetProfile.
//!
//! Counting is per delivery: a delivery is opened by a person if it has at least one opened
//! event that was not prefetched (or a human click), so the same metric reported twice (a
//! duplicate webhook, or a webhook and the poll) never counts twice.

pub mod history;
pub mod poll;
pub mod score;
pub mod webhooks;

use chrono::{DateTime, Utc};
pub use poll::poll;
pub use score::score;
use sharpsend_db::engagement as store;
pub use sharpsend_db::engagement::{DeliveryEvent, EventSource, Quarantined};

use crate::{AppContext, CoreError};

/// Most events one read returns.
pub const MAX_EVENTS_PAGE: u64 = 1000;

/// Stored delivery events after `after_id` (storage order), of one assignment or all.
pub async fn events_after(
    ctx: &AppContext,
    after_id: i64,
    assignment_id: Option<&str>,
    limit: u64,
) -> Result<Vec<DeliveryEvent>, CoreError> {
    Ok(store::events_after(
        &ctx.db,
        ctx.workspace_id(),
        after_id,
        assignment_id,
        limit.clamp(1, MAX_EVENTS_PAGE),
    )
    .await?)
}

/// The id of the newest stored event (0: none yet): where a watcher without a cursor starts.
pub async fn last_event_id(ctx: &AppContext) -> Result<i64, CoreError> {
    Ok(store::last_event_id(&ctx.db, ctx.workspace_id()).await?)
}

/// Quarantined webhook bodies after `after_id`, oldest first (for operators).
pub async fn quarantined(
    ctx: &AppContext,
    after_id: i64,
    limit: u64,
) -> Result<Vec<Quarantined>, CoreError> {
    Ok(store::quarantined(
        &ctx.db,
        ctx.workspace_id(),
        after_id,
        limit.clamp(1, MAX_EVENTS_PAGE),
    )
    .await?)
}

/// Unix seconds → time (out-of-range values: `fallback`).
pub(crate) fn from_unix(secs: i64, fallback: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(fallback)
}
