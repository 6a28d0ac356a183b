//! A person's engagement history: their SharpSend delivery events from the local store,
//! newest first, paged by event id.

use sharpsend_db::engagement as store;

use crate::engagement::DeliveryEvent;
use crate::{AppContext, CoreError};

/// Most events of one history page.
pub const MAX_HISTORY_PAGE: u64 = 200;

/// The person's attributed delivery events before `before_id` (`None`: the newest), newest
/// first, at most `limit` (clamped to 1..=[`MAX_HISTORY_PAGE`]).
pub async fn local_history(
    ctx: &AppContext,
    customer_id: &str,
    before_id: Option<i64>,
    limit: u64,
) -> Result<Vec<DeliveryEvent>, CoreError> {
    Ok(store::events_of_customer(
        &ctx.db,
        ctx.workspace_id(),
        customer_id,
        before_id,
        limit.clamp(1, MAX_HISTORY_PAGE),
    )
    .await?)
}
