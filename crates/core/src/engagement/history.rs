//! A person's engagement history for GetProfile: their SharpSend deliveries with what they did
//! (delivered, human open, human click, bounce, unsubscribe), from the local delivery events
//! and counted as everywhere else (`sharpsend_db::analytics`), newest first, paged by the
//! delivery's first event id, through the read cache; and, when asked, one page each of
//! Customer.io's own `GET /v1/customers/{id}/messages` and `/activities` (through the client's
//! shared App API limiter, so they never exceed the workspace's 10 requests/s).

pub use cio_client::IdType;
use std::sync::Arc;

use cio_client::{Activity, ActivityQuery, ActivityType, Message};
use sharpsend_db::analytics::{self, DeliveryRow, Scope};

use crate::cache::HistoryKey;
use crate::input;
use crate::{AppContext, CoreError, FieldViolation};

/// Most deliveries of one history page, and the default.
pub const MAX_HISTORY_PAGE: u64 = 200;
pub const DEFAULT_HISTORY_PAGE: u64 = 20;
/// Customer.io's own page limits.
pub const MAX_CIO_MESSAGES: u32 = cio_client::MAX_MESSAGES_PAGE;
pub const MAX_CIO_ACTIVITIES: u32 = cio_client::MAX_ACTIVITIES_PAGE;
/// Longest Customer.io cursor or activity type accepted.
const MAX_CURSOR_BYTES: usize = 512;

/// What history to read besides the local deliveries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub page_size: u64,
    /// The first event id of the last delivery of the previous page.
    pub before_first_id: Option<i64>,
    /// One page of Customer.io's messages: (limit 1..=1000, start).
    pub cio_messages: Option<(u32, Option<String>)>,
    /// One page of Customer.io's activities: (limit 1..=100, type, start).
    pub cio_activities: Option<(u32, Option<String>, Option<String>)>,
}

impl HistoryQuery {
    /// Checks the Customer.io parts; `fresh` says whether the call reads Customer.io at all.
    pub fn validate(&self, fresh: bool) -> Result<(), CoreError> {
        let mut violations = Vec::new();
        if let Some((limit, start)) = &self.cio_messages {
            if !fresh {
                violations.push(FieldViolation::new(
                    "cio_messages_limit",
                    "Customer.io's messages are read only with fresh: true",
                ));
            }
            if !(1..=MAX_CIO_MESSAGES).contains(limit) {
                violations.push(FieldViolation::new(
                    "cio_messages_limit",
                    format!("must be 0 to {MAX_CIO_MESSAGES}"),
                ));
            }
            if let Some(s) = start {
                input::identifier(
                    &mut violations,
                    "cio_messages_start",
                    s,
                    MAX_CURSOR_BYTES,
                    false,
                );
            }
        }
        if let Some((limit, kind, start)) = &self.cio_activities {
            if !fresh {
                violations.push(FieldViolation::new(
                    "cio_activities_limit",
                    "Customer.io's activities are read only with fresh: true",
                ));
            }
            if !(1..=MAX_CIO_ACTIVITIES).contains(limit) {
                violations.push(FieldViolation::new(
                    "cio_activities_limit",
                    format!("must be 0 to {MAX_CIO_ACTIVITIES}"),
                ));
            }
            if let Some(k) = kind {
                input::identifier(&mut violations, "cio_activities_type", k, 64, false);
            }
            if let Some(s) = start {
                input::identifier(
                    &mut violations,
                    "cio_activities_start",
                    s,
                    MAX_CURSOR_BYTES,
                    false,
                );
            }
        }
        input::finish(violations)
    }
}

/// A person's history page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub deliveries: Vec<DeliveryRow>,
    /// `before_first_id` of the next page.
    pub next: Option<i64>,
    pub cio_messages: Vec<Message>,
    pub cio_messages_next: Option<String>,
    pub cio_activities: Vec<Activity>,
    pub cio_activities_next: Option<String>,
}

/// The history of `customer_id` (the person's Customer.io `id`); Customer.io's pages are read
/// with `identifier` / `id_type` (how the caller named the person).
pub async fn history(
    ctx: &AppContext,
    customer_id: &str,
    identifier: &str,
    id_type: IdType,
    query: &HistoryQuery,
) -> Result<History, CoreError> {
    let limit = query.page_size.clamp(1, MAX_HISTORY_PAGE);
    let scope = Scope {
        customer_id: Some(customer_id.to_string()),
        ..Default::default()
    };
    // One more than the page: whether a next page exists.
    let fetch = limit + 1;
    let key = HistoryKey {
        customer_id: customer_id.to_string(),
        before_first_id: query.before_first_id,
        limit: fetch,
    };
    let rows = ctx
        .read_cache
        .delivery_rows(&ctx.db, ctx.workspace_id(), key, || async {
            Ok(analytics::delivery_rows(
                &ctx.db,
                ctx.workspace_id(),
                &scope,
                query.before_first_id,
                fetch,
            )
            .await?)
        })
        .await?;
    let page = crate::paging::Page::cut(Arc::unwrap_or_clone(rows), limit, |r| r.first_id);
    let mut out = History {
        deliveries: page.items,
        next: page.next,
        ..Default::default()
    };
    if let Some((limit, start)) = &query.cio_messages {
        let got = ctx
            .cio
            .customer_messages_page(identifier, id_type, *limit, start.as_deref())
            .await?;
        out.cio_messages = got.items;
        out.cio_messages_next = got.next;
    }
    if let Some((limit, kind, start)) = &query.cio_activities {
        let mut q = ActivityQuery::new().with_limit(*limit);
        if let Some(k) = kind {
            q = q.of_type(ActivityType::parse(k));
        }
        let got = ctx
            .cio
            .customer_activities_page(identifier, id_type, &q, start.as_deref())
            .await?;
        out.cio_activities = got.items;
        out.cio_activities_next = got.next;
    }
    Ok(out)
}
