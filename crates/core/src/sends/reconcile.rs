//! Reconciliation: settling uncertain submissions from what Customer.io holds (found by their
//! marker), following submitted ones to completion, and a send's metric targets.

use chrono::{DateTime, Utc};
use cio_client::CioError;
use serde_json::Value;
use sharpsend_db::sends::{
    self as store, Delivery, SendRecord, SendState, Submission, Transition, TriggerErrors,
};

use super::dispatch::{dispatch_due, watch_metrics};
use super::request::{SendKey, get_send};
use super::{MARKER_FIELD, MAX_TRIGGER_ERROR_CHARS, MAX_TRIGGER_ERRORS_KEPT, fence};
use crate::{AppContext, CoreError};

/// How far before an attempt Customer.io's clock may put the trigger it created.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Who the service's own transitions are recorded as.
const RECONCILER: &str = "reconciler";

/// What a reconcile pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    /// Submissions whose dispatcher died holding them (now uncertain).
    pub expired_claims: u64,
    /// Uncertain submissions found in Customer.io (now submitted).
    pub found: u64,
    /// Uncertain submissions queued again: not found after the grace period, or a newsletter
    /// found created but not sent.
    pub requeued: u64,
    /// Uncertain submissions not found after the last allowed attempt (now failed).
    pub failed: u64,
    /// Uncertain submissions left as they are (within the grace period, or undecidable).
    pub still_uncertain: u64,
    /// Submitted submissions Customer.io has processed (now completed).
    pub completed: u64,
    /// Lookups in Customer.io that failed (tried again next run).
    pub lookup_errors: u64,
}

/// Settles uncertain submissions from Customer.io's records and follows submitted ones to
/// completion (the `send-reconcile` job).
pub async fn reconcile(ctx: &AppContext) -> Result<ReconcileReport, CoreError> {
    let ws = ctx.workspace_id();
    let expired = store::expire_claims(&ctx.db, ws, ctx.now()).await?;
    let mut report = ReconcileReport {
        expired_claims: expired.len() as u64,
        ..ReconcileReport::default()
    };
    for s in store::in_state(&ctx.db, ws, SendState::Uncertain, 200).await? {
        let Some(send) = store::get_by_id(&ctx.db, s.send_id).await? else {
            continue;
        };
        match settle_uncertain(ctx, &send, &s).await {
            Ok(Settled::Found) => report.found += 1,
            Ok(Settled::Requeued) => report.requeued += 1,
            Ok(Settled::Failed) => report.failed += 1,
            Ok(Settled::Left) => report.still_uncertain += 1,
            Err(e) => {
                report.lookup_errors += 1;
                tracing::warn!(submission = s.id, error = %crate::error::error_chain(&e), "could not look up an uncertain submission");
            }
        }
    }
    for s in store::in_state(&ctx.db, ws, SendState::Submitted, 200).await? {
        let Some(send) = store::get_by_id(&ctx.db, s.send_id).await? else {
            continue;
        };
        match follow_completion(ctx, &send, &s).await {
            Ok(true) => report.completed += 1,
            Ok(false) => {}
            Err(e) => {
                report.lookup_errors += 1;
                tracing::warn!(submission = s.id, error = %crate::error::error_chain(&e), "could not check a submitted submission");
            }
        }
    }
    if report.requeued > 0 {
        dispatch_due(ctx).await?;
    }
    Ok(report)
}

enum Settled {
    Found,
    Requeued,
    Failed,
    Left,
}

/// What Customer.io holds of an uncertain submission.
enum Lookup {
    /// It arrived (trigger, or newsletter and whether it was sent).
    Trigger {
        id: i64,
        recipients_count: Option<i64>,
    },
    Newsletter {
        id: i64,
        sent: bool,
    },
    /// Provably not there.
    Absent,
    /// Cannot tell (e.g. triggers whose data Customer.io does not echo).
    Undecidable(String),
}

async fn settle_uncertain(
    ctx: &AppContext,
    send: &SendRecord,
    s: &Submission,
) -> Result<Settled, CoreError> {
    let started = s.attempt_started_at.unwrap_or(send.created_at);
    let lookup = match send.delivery {
        Delivery::Broadcast { broadcast_id } => find_trigger(ctx, broadcast_id, s, started).await?,
        Delivery::Newsletter { .. } => find_newsletter(ctx, s, started).await?,
    };
    let now = ctx.now();
    // Absent (or unsent) means "not sent" only once the grace has passed after the END of the
    // attempt's window: until then its request may still have been on its way.
    let settle_after = fence::settle_after(&ctx.settings.sends, s, send.created_at);
    let t = match lookup {
        Lookup::Trigger {
            id,
            recipients_count,
        } => Transition {
            cio_trigger_id: Some(id),
            recipients_count,
            ..Transition::new(
                SendState::Uncertain,
                SendState::Submitted,
                RECONCILER,
                format!("found in Customer.io as trigger {id}"),
            )
        },
        Lookup::Newsletter { id, sent: true } => Transition {
            cio_newsletter_id: Some(id),
            ..Transition::new(
                SendState::Uncertain,
                SendState::Submitted,
                RECONCILER,
                format!("found newsletter {id}, sent"),
            )
        },
        Lookup::Newsletter { id, sent: false } if now < settle_after => {
            if s.cio_newsletter_id.is_none() {
                let t = Transition {
                    cio_newsletter_id: Some(id),
                    ..Transition::new(
                        SendState::Uncertain,
                        SendState::Uncertain,
                        RECONCILER,
                        format!(
                            "found newsletter {id}, not sent yet; its send may still be on its \
                             way: waiting until {settle_after}"
                        ),
                    )
                }
                .error(s.error.clone().unwrap_or_default());
                store::transition(&ctx.db, s.id, &t, now).await?;
            }
            return Ok(Settled::Left);
        }
        Lookup::Newsletter { id, sent: false } => Transition {
            cio_newsletter_id: Some(id),
            next_attempt_at: Some(now),
            ..Transition::new(
                SendState::Uncertain,
                SendState::Pending,
                RECONCILER,
                format!(
                    "found newsletter {id}, still not sent after the grace period: queued to send it"
                ),
            )
        },
        Lookup::Undecidable(why) => {
            if s.error.as_deref() != Some(why.as_str()) {
                let t = Transition::new(
                    SendState::Uncertain,
                    SendState::Uncertain,
                    RECONCILER,
                    "cannot be settled automatically; resolve with ResolveSend",
                )
                .error(why);
                store::transition(&ctx.db, s.id, &t, now).await?;
            }
            return Ok(Settled::Left);
        }
        Lookup::Absent => {
            if now < settle_after {
                return Ok(Settled::Left);
            }
            if s.attempts >= ctx.settings.sends.max_attempts {
                let why = format!(
                    "not found in Customer.io after {} attempt(s): settled as not sent",
                    s.attempts
                );
                let t = Transition::new(
                    SendState::Uncertain,
                    SendState::Failed,
                    RECONCILER,
                    why.clone(),
                )
                .error(why);
                return Ok(if store::transition(&ctx.db, s.id, &t, now).await? {
                    Settled::Failed
                } else {
                    Settled::Left
                });
            }
            let t = Transition {
                next_attempt_at: Some(now),
                ..Transition::new(
                    SendState::Uncertain,
                    SendState::Pending,
                    RECONCILER,
                    "not found in Customer.io after the grace period: settled as not sent, queued again",
                )
            };
            return Ok(if store::transition(&ctx.db, s.id, &t, now).await? {
                Settled::Requeued
            } else {
                Settled::Left
            });
        }
    };
    // A newsletter found unsent goes back to pending: the next dispatch sends it.
    if !store::transition(&ctx.db, s.id, &t, now).await? {
        return Ok(Settled::Left);
    }
    if t.to == SendState::Pending {
        return Ok(Settled::Requeued);
    }
    watch_metrics(ctx, send, t.cio_newsletter_id, now).await;
    Ok(Settled::Found)
}

/// Looks through the broadcast's triggers created since the attempt for the submission's marker.
async fn find_trigger(
    ctx: &AppContext,
    broadcast_id: i64,
    s: &Submission,
    started: DateTime<Utc>,
) -> Result<Lookup, CoreError> {
    let since = (started - CLOCK_SKEW).timestamp();
    let triggers = ctx.cio.broadcast_triggers(broadcast_id).await?;
    let mut unreadable = 0;
    let candidates: Vec<i64> = triggers
        .iter()
        .filter(|t| t.created_at.is_none_or(|at| at >= since))
        .map(|t| t.id)
        .collect();
    for candidate in candidates {
        let status = ctx.cio.trigger_status(broadcast_id, candidate).await?;
        let marker = status
            .recipients_filter
            .as_ref()
            .and_then(|f| f.get("data"))
            .and_then(|d| d.get(MARKER_FIELD))
            .and_then(Value::as_str);
        match marker {
            Some(m) if m == s.marker => {
                return Ok(Lookup::Trigger {
                    id: status.id,
                    recipients_count: status.recipients_count,
                });
            }
            Some(_) => {}
            None => unreadable += 1,
        }
    }
    if unreadable > 0 {
        return Ok(Lookup::Undecidable(format!(
            "{unreadable} trigger(s) of broadcast {broadcast_id} since the attempt do not show their data; cannot tell whether one is this submission"
        )));
    }
    Ok(Lookup::Absent)
}

/// Looks through the newsletters created since the attempt, newest first, for the one whose name
/// ends with the submission's marker.
async fn find_newsletter_by_marker(
    ctx: &AppContext,
    s: &Submission,
    started: DateTime<Utc>,
) -> Result<Option<cio_client::Newsletter>, CoreError> {
    let tag = format!("[{}]", s.marker);
    let since = (started - CLOCK_SKEW).timestamp();
    let mut start: Option<String> = None;
    loop {
        let page = ctx
            .cio
            .newsletters_page(start.as_deref(), cio_client::NEWSLETTERS_PAGE, true)
            .await?;
        if let Some(found) = page.items.iter().find(|n| n.name.ends_with(&tag)) {
            return Ok(Some(found.clone()));
        }
        let reached_older = page
            .items
            .iter()
            .any(|n| n.created.is_some_and(|c| c < since));
        match page.next.filter(|next| !next.is_empty()) {
            Some(next) if !reached_older && !page.items.is_empty() => start = Some(next),
            _ => return Ok(None),
        }
    }
}

/// Finds the submission's newsletter: by the id recorded at creation, else by the marker in its
/// name.
async fn find_newsletter(
    ctx: &AppContext,
    s: &Submission,
    started: DateTime<Utc>,
) -> Result<Lookup, CoreError> {
    let newsletter = match s.cio_newsletter_id {
        Some(id) => match ctx.cio.get_newsletter(id).await {
            Ok(n) => Some(n),
            Err(CioError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        },
        None => find_newsletter_by_marker(ctx, s, started).await?,
    };
    Ok(match newsletter {
        Some(n) => Lookup::Newsletter {
            id: n.id,
            sent: n.sent_at.is_some(),
        },
        None => Lookup::Absent,
    })
}

/// Submitted → completed once Customer.io has processed the trigger / sent the newsletter.
async fn follow_completion(
    ctx: &AppContext,
    send: &SendRecord,
    s: &Submission,
) -> Result<bool, CoreError> {
    let (done, recipients_count, what, trigger_errors) =
        match (send.delivery, s.cio_trigger_id, s.cio_newsletter_id) {
            (Delivery::Broadcast { broadcast_id }, Some(trigger_id), _) => {
                let status = ctx.cio.trigger_status(broadcast_id, trigger_id).await?;
                let processed = status.processed_at.is_some();
                let errors = if processed {
                    Some(trigger_errors(ctx, broadcast_id, trigger_id).await?)
                } else {
                    None
                };
                let what = match &errors {
                    Some(e) if e.count > 0 => format!(
                        "trigger {trigger_id} processed with {} error(s) reported by Customer.io",
                        e.count
                    ),
                    _ => format!("trigger {trigger_id} processed"),
                };
                (processed, status.recipients_count, what, errors)
            }
            (Delivery::Newsletter { .. }, _, Some(newsletter_id)) => {
                let n = ctx.cio.get_newsletter(newsletter_id).await?;
                (
                    n.sent_at.is_some(),
                    None,
                    format!("newsletter {newsletter_id} sent"),
                    None,
                )
            }
            // Marked as sent by an operator without a Customer.io id: nothing to follow.
            _ => return Ok(false),
        };
    if !done {
        return Ok(false);
    }
    let t = Transition {
        recipients_count,
        trigger_errors,
        ..Transition::new(SendState::Submitted, SendState::Completed, RECONCILER, what)
    };
    Ok(store::transition(&ctx.db, s.id, &t, ctx.now()).await?)
}

/// The errors Customer.io reports for a processed trigger, bounded: the first
/// [`MAX_TRIGGER_ERRORS_KEPT`] lines (each cut at [`MAX_TRIGGER_ERROR_CHARS`]) and how many there
/// are in all. A trigger Customer.io no longer knows has none to show.
async fn trigger_errors(
    ctx: &AppContext,
    broadcast_id: i64,
    trigger_id: i64,
) -> Result<TriggerErrors, CoreError> {
    let all = match ctx.cio.trigger_errors(broadcast_id, trigger_id).await {
        Ok(all) => all,
        Err(CioError::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(TriggerErrors {
        count: i64::try_from(all.len()).unwrap_or(i64::MAX),
        first: all
            .into_iter()
            .take(MAX_TRIGGER_ERRORS_KEPT)
            .map(|line| {
                if line.chars().count() > MAX_TRIGGER_ERROR_CHARS {
                    let cut: String = line.chars().take(MAX_TRIGGER_ERROR_CHARS).collect();
                    format!("{cut}…")
                } else {
                    line
                }
            })
            .collect(),
    })
}

/// What a send's metrics are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct SendMetricTargets {
    /// Broadcast delivery: the broadcast and when the send's first trigger was accepted (None if
    /// none was yet).
    pub broadcast: Option<(i64, Option<DateTime<Utc>>)>,
    /// Newsletter delivery: the Customer.io newsletter ids created so far.
    pub newsletter_ids: Vec<i64>,
}

/// The metric targets of send `send_id`. Unknown send: `CoreError::NotFound`.
pub async fn metric_targets(
    ctx: &AppContext,
    send_id: &str,
) -> Result<SendMetricTargets, CoreError> {
    let view = get_send(ctx, &SendKey::Id(send_id.to_string())).await?;
    Ok(match view.delivery {
        Delivery::Broadcast { broadcast_id } => SendMetricTargets {
            broadcast: Some((
                broadcast_id,
                view.submissions.iter().filter_map(|s| s.submitted_at).min(),
            )),
            newsletter_ids: Vec::new(),
        },
        Delivery::Newsletter { .. } => SendMetricTargets {
            broadcast: None,
            newsletter_ids: view
                .submissions
                .iter()
                .filter_map(|s| s.cio_newsletter_id)
                .collect(),
        },
    })
}
