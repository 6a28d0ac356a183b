//! The `delivery-poll` job: the path without reporting webhooks. For every SharpSend
//! submission that reached Customer.io within `SHARPSEND_DELIVERY_POLL_DAYS`, it reads the
//! per-delivery records (`GET /v1/broadcasts/{id}/messages`, `/v1/newsletters/{id}/messages`,
//! 1000 per page, through the client's App API rate limiter) and stores one delivery event per
//! metric timestamp (`event_id` `poll:<delivery id>:<metric>`).
//!
//! Nothing is counted twice: a (delivery, metric) already stored — by a webhook or an earlier
//! poll — is not stored again, and scoring counts per delivery anyway.
//!
//! Limits of the App API this cannot get around: its messages carry no `trigger_id`, and
//! `metrics.opened` does not say whether a machine (privacy proxy) opened it, so polled opens
//! count as human. A broadcast delivery is attributed by its recipient, then its creation time
//! ([`submission_for`]): an A/B test's arm goes to its own manual segment of exactly the people
//! allocated to it, so a delivery goes to the arm its recipient was allocated to (exact, even
//! with the arms' triggers seconds apart and their deliveries created interleaved), or to a
//! plain (not A/B) submission of the broadcast submitted last before it. Two plain sends
//! through one broadcast whose deliveries are created interleaved stay ambiguous (the later
//! one gets them); webhooks tell exactly.

use std::collections::{BTreeMap, BTreeSet};

use cio_client::messages::{Message, MessagesQuery};
use serde::Serialize;
use sharpsend_db::abtests::{self, ArmAudiences};
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
            let subs = match &source {
                Source::Broadcast(b) => broadcasts.get(b).map(Vec::as_slice).unwrap_or_default(),
                Source::Newsletter(_) => &[],
            };
            // Several submissions of one broadcast: whose arm was each recipient?
            let audiences = if subs.len() > 1 {
                let ids: Vec<i64> = subs.iter().map(|(_, id)| *id).collect();
                let customers: Vec<String> = page
                    .items
                    .iter()
                    .filter_map(recipient)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                abtests::arm_audiences(&ctx.db, ws, &ids, &customers).await?
            } else {
                ArmAudiences::default()
            };
            let events: Vec<NewDeliveryEvent> = page
                .items
                .iter()
                .flat_map(|m| {
                    let submission = match &source {
                        Source::Broadcast(_) => {
                            submission_for(subs, m.created, recipient(m).as_deref(), &audiences)
                        }
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

/// The submission (of `subs`: `(submitted at, id)` of one broadcast, sorted by time) a
/// delivery created at `created` to `customer` belongs to, among those that could have reached
/// `customer` (an A/B test's arm reaches only the people allocated to it, any other submission
/// anyone):
/// 1. the last of them submitted at or before `created` (so the arms of one test, triggered
///    seconds apart with their deliveries created interleaved, each get their own people's
///    deliveries, and a later plain send its own);
/// 2. else the first submitted after it (Customer.io's clock and ours differ; a delivery is
///    never older than its trigger);
/// 3. else (nobody could have: an unknown recipient), by time alone: the last submitted at or
///    before `created`, else the first.
///
/// Without arms this is attribution by time alone.
fn submission_for(
    subs: &[(i64, i64)],
    created: Option<i64>,
    customer: Option<&str>,
    audiences: &ArmAudiences,
) -> Option<i64> {
    let created = created.unwrap_or(i64::MAX);
    let reaches = |id: i64| {
        !audiences.arm_submissions.contains(&id)
            || customer.is_some_and(|c| audiences.members.contains(&(id, c.to_string())))
    };
    let before = || subs.iter().rev().filter(move |(at, _)| *at <= created);
    before()
        .find(|(_, id)| reaches(*id))
        .or_else(|| subs.iter().find(|(at, id)| *at > created && reaches(*id)))
        .or_else(|| before().next())
        .or_else(|| subs.first())
        .map(|(_, id)| *id)
}

/// A message's recipient id (the profile's `id`), when it has one.
fn recipient(m: &Message) -> Option<String> {
    m.customer_id
        .clone()
        .filter(|c| !c.is_empty())
        .or_else(|| m.customer_identifiers.id.clone().filter(|c| !c.is_empty()))
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
    let customer_id = recipient(m);
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

    fn by_time(subs: &[(i64, i64)], created: Option<i64>) -> Option<i64> {
        submission_for(subs, created, Some("p"), &ArmAudiences::default())
    }

    #[test]
    fn broadcast_deliveries_go_to_the_submission_sent_last_before_them() {
        let subs = [(100, 1), (200, 2), (300, 3)];
        assert_eq!(by_time(&subs, Some(250)), Some(2));
        assert_eq!(by_time(&subs, Some(300)), Some(3));
        assert_eq!(by_time(&subs, Some(50)), Some(1));
        assert_eq!(by_time(&subs, None), Some(3));
        assert_eq!(by_time(&[], Some(1)), None);
    }

    #[test]
    fn a_delivery_goes_to_the_arm_its_recipient_was_allocated_to() {
        // Three arms of one test (10 s apart) and, later, a plain send through the broadcast.
        let subs = [(100, 1), (110, 2), (120, 3), (500, 4)];
        let audiences = ArmAudiences {
            arm_submissions: [1, 2, 3].into(),
            members: [
                (1, "a".to_string()),
                (2, "b".to_string()),
                (3, "c".to_string()),
            ]
            .into(),
        };
        let at = |created, who| submission_for(&subs, Some(created), Some(who), &audiences);
        // Arm 1's person, created after arms 2 and 3 went out: still arm 1.
        assert_eq!(at(130, "a"), Some(1));
        assert_eq!(at(130, "b"), Some(2));
        // Created before our recorded submission times (the clocks differ): its own arm.
        assert_eq!(at(118, "c"), Some(3));
        assert_eq!(at(50, "b"), Some(2));
        // A person of arm 1 also gets the later plain send: that one is the later send's.
        assert_eq!(at(600, "a"), Some(4));
        assert_eq!(at(600, "z"), Some(4));
        // In no arm: only the plain send could have reached them.
        assert_eq!(at(50, "z"), Some(4));
        // Nobody could have (no plain send at all): by time alone, as without arms.
        let arms_only = &subs[..3];
        let alone = |created, who| submission_for(arms_only, Some(created), Some(who), &audiences);
        assert_eq!(alone(130, "z"), Some(3));
        assert_eq!(alone(50, "z"), Some(1));
    }
}
