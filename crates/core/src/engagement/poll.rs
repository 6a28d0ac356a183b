//! The `delivery-poll` job: the path without reporting webhooks. For every SharpSend
//! submission that reached Customer.io within `SHARPSEND_DELIVERY_POLL_DAYS`, it reads the
//! per-delivery records (`GET /v1/broadcasts/{id}/messages`, `/v1/newsletters/{id}/messages`,
//! 1000 per page, through the client's App API rate limiter) and stores one delivery event per
//! metric timestamp (`event_id` `poll:<delivery id>:<metric>`).
//!
//! Nothing is counted twice: a (delivery, metric) already stored — by a webhook or an earlier
//! poll — is not stored again, and scoring counts per delivery anyway.
//!
//! Limits of the App API this cannot get around: its messages carry no `trigger_id`, so a
//! broadcast delivery is attributed to the broadcast's SharpSend submission submitted last at
//! or before the delivery was created (the first one when none was); and `metrics.opened`
//! does not say whether a machine (privacy proxy) opened it, so polled opens count as human.

use std::collections::BTreeMap;

use cio_client::messages::{Message, MessagesQuery};
use serde::Serialize;
use sharpsend_db::engagement::{self as store, EventSource, NewDeliveryEvent};

use crate::{AppContext, CoreError};

/// Pages read per run at most (each one App API request).
pub const MAX_PAGES_PER_RUN: usize = 200;
/// Metrics of a message's `metrics` that become events.
const METRICS: [&str; 11] = [
    "sent",
    "delivered",
    "opened",
    "clicked",
    "converted",
    "bounced",
    "spammed",
    "unsubscribed",
    "failed",
    "dropped",
    "undeliverable",
];

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PollReport {
    /// Broadcasts and newsletters read.
    pub sources: u64,
    pub pages: u64,
    pub messages: u64,
    /// Events stored now (not already known).
    pub stored: u64,
    /// Webhook events attributed only now.
    pub attributed_late: u64,
    /// The page budget ran out before every source was read.
    pub truncated: bool,
}

enum Source {
    Broadcast(i64),
    Newsletter(i64),
}

/// Runs one poll.
pub async fn poll(ctx: &AppContext) -> Result<PollReport, CoreError> {
    let ws = ctx.workspace_id();
    let mut report = PollReport {
        attributed_late: store::attribute_pending(&ctx.db, ws).await?,
        ..PollReport::default()
    };
    let window = chrono::TimeDelta::from_std(ctx.settings.engagement.poll_window)
        .unwrap_or(chrono::TimeDelta::days(3));
    let since = ctx.now() - window;
    let submissions = store::recent_submissions(&ctx.db, ws, since).await?;
    // Per broadcast: its submissions by submission time (for attribution by creation time).
    let mut broadcasts: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
    let mut sources = Vec::new();
    for s in &submissions {
        if let Some(b) = s.broadcast_id {
            let subs = broadcasts.entry(b).or_default();
            if subs.is_empty() {
                sources.push((Source::Broadcast(b), None));
            }
            subs.push((s.submitted_at.timestamp(), s.submission_id));
        } else if let Some(n) = s.newsletter_id {
            sources.push((Source::Newsletter(n), Some(s.submission_id)));
        }
    }
    let query = MessagesQuery::new();
    let mut budget = MAX_PAGES_PER_RUN;
    'sources: for (source, submission) in sources {
        report.sources += 1;
        let mut start: Option<String> = None;
        loop {
            if budget == 0 {
                report.truncated = true;
                break 'sources;
            }
            budget -= 1;
            let page = match &source {
                Source::Broadcast(id) => {
                    ctx.cio
                        .broadcast_messages_page(*id, &query, start.as_deref())
                        .await
                }
                Source::Newsletter(id) => {
                    ctx.cio
                        .newsletter_messages_page(*id, &query, start.as_deref())
                        .await
                }
            };
            let page = match page {
                Ok(page) => page,
                Err(cio_client::CioError::NotFound { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            report.pages += 1;
            report.messages += page.items.len() as u64;
            let events: Vec<NewDeliveryEvent> = page
                .items
                .iter()
                .flat_map(|m| {
                    let submission = match &source {
                        Source::Broadcast(b) => broadcasts
                            .get(b)
                            .and_then(|subs| submission_at(subs, m.created)),
                        Source::Newsletter(_) => submission,
                    };
                    events_of(m, submission, ctx.now())
                })
                .collect();
            report.stored +=
                store::insert_events(&ctx.db, ws, EventSource::Poll, &events, ctx.now())
                    .await?
                    .len() as u64;
            match page.next.filter(|n| !n.is_empty()) {
                Some(next) => start = Some(next),
                None => break,
            }
        }
    }
    Ok(report)
}

/// The submission (of `subs`, sorted by submission time) a delivery created at `created`
/// belongs to: the last submitted at or before it, else the first.
fn submission_at(subs: &[(i64, i64)], created: Option<i64>) -> Option<i64> {
    let created = created.unwrap_or(i64::MAX);
    subs.iter()
        .rev()
        .find(|(at, _)| *at <= created)
        .or_else(|| subs.first())
        .map(|(_, id)| *id)
}

/// One event per metric the message reached.
fn events_of(
    m: &Message,
    submission_id: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<NewDeliveryEvent> {
    if m.id.is_empty() {
        return Vec::new();
    }
    let customer_id = m
        .customer_id
        .clone()
        .filter(|c| !c.is_empty())
        .or_else(|| m.customer_identifiers.id.clone().filter(|c| !c.is_empty()));
    METRICS
        .iter()
        .filter_map(|metric| {
            let at = m.metric(metric)?;
            Some(NewDeliveryEvent {
                event_id: format!("poll:{}:{metric}", m.id),
                metric: (*metric).to_string(),
                object_type: m.message_type.clone().unwrap_or_else(|| "email".into()),
                delivery_id: Some(m.id.clone()),
                customer_id: customer_id.clone(),
                broadcast_id: m.broadcast_id,
                trigger_id: m.trigger_id,
                newsletter_id: m.newsletter_id,
                content_id: m.content_id,
                campaign_id: m.campaign_id,
                action_id: m.action_id,
                link: None,
                prefetched: false,
                machine: false,
                synthetic: false,
                occurred_at: super::from_unix(at, now),
                submission_id,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_deliveries_go_to_the_submission_sent_last_before_them() {
        let subs = [(100, 1), (200, 2), (300, 3)];
        assert_eq!(submission_at(&subs, Some(250)), Some(2));
        assert_eq!(submission_at(&subs, Some(300)), Some(3));
        assert_eq!(submission_at(&subs, Some(50)), Some(1));
        assert_eq!(submission_at(&subs, None), Some(3));
        assert_eq!(submission_at(&[], Some(1)), None);
    }
}
