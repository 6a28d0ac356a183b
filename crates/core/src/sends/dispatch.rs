//! Dispatch: claiming each due submission and sending it once, as a broadcast trigger or a
//! newsletter, and recording the outcome (or settling a request that did not succeed).

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cio_client::{
    CioError, DeadlineClient, NewNewsletter, NotSent, Recipients, SendError, Trigger,
};
use serde_json::{Map, Value};
use sharpsend_db::sends::{
    self as store, Claim, Delivery, SendRecord, SendState, Submission, Transition, Window,
};

use super::{MAX_NEWSLETTER_NAME_CHARS, TriggerData, fence};
use crate::metrics::MetricsTarget;
use crate::{AppContext, CoreError};

/// What a dispatch pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DispatchReport {
    /// Submissions taken for a request.
    pub claimed: u64,
    /// Accepted by Customer.io.
    pub submitted: u64,
    /// Waiting for their broadcast's trigger window.
    pub waiting: u64,
    /// Back to pending: Customer.io provably did not process the request (429, not reachable).
    pub requeued: u64,
    /// Refused by Customer.io.
    pub failed: u64,
    /// Outcome unknown: left for reconciliation.
    pub uncertain: u64,
}

/// Submits every due submission of the workspace (the `send-dispatch` job).
pub async fn dispatch_due(ctx: &AppContext) -> Result<DispatchReport, CoreError> {
    dispatch(ctx, None).await
}

/// Submits the due submissions of one send.
async fn dispatch_send(ctx: &AppContext, send_id: i64) -> Result<DispatchReport, CoreError> {
    dispatch(ctx, Some(send_id)).await
}

async fn dispatch(ctx: &AppContext, send_id: Option<i64>) -> Result<DispatchReport, CoreError> {
    let holder = format!("dispatcher-{}", ulid::Ulid::new());
    let mut report = DispatchReport::default();
    let mut skipped = HashSet::new();
    loop {
        let due = store::due(&ctx.db, ctx.workspace_id(), send_id, ctx.now(), 50).await?;
        let due: Vec<Submission> = due
            .into_iter()
            .filter(|s| !skipped.contains(&s.id))
            .collect();
        if due.is_empty() {
            return Ok(report);
        }
        for submission in due {
            skipped.insert(submission.id);
            let Some(send) = store::get_by_id(&ctx.db, submission.send_id).await? else {
                continue;
            };
            submit(ctx, &send, &submission, &holder, &mut report).await?;
        }
    }
}

/// Dispatches what of one send is due now and follows the rest in the background. The dispatch
/// runs in a task of its own: a caller that goes away (a cancelled gRPC call) does not cut a
/// request off between its claim and its outcome.
pub(super) async fn dispatch_now(
    ctx: &AppContext,
    send_id: i64,
) -> Result<DispatchReport, CoreError> {
    let task = {
        let ctx = ctx.clone();
        tokio::spawn(async move { dispatch_send(&ctx, send_id).await })
    };
    let report = match task.await {
        Ok(result) => result?,
        Err(e) => {
            // A panic in the task; the send-dispatch job picks the send up.
            tracing::error!(send_id, error = %e, "dispatch task failed");
            DispatchReport::default()
        }
    };
    follow_in_background(ctx, send_id);
    Ok(report)
}

/// How long the process that accepted a send keeps dispatching it itself.
const FOLLOW_FOR: Duration = Duration::from_secs(15 * 60);

/// Keeps dispatching one send while it has pending submissions (later triggers of a broadcast
/// wait for their window), in the background, for at most [`FOLLOW_FOR`]. Stops when none is
/// pending; the scheduler's `send-dispatch` job covers the rest (a send still waiting, or a
/// process that stopped).
fn follow_in_background(ctx: &AppContext, send_id: i64) {
    let ctx = ctx.clone();
    let until = tokio::time::Instant::now() + FOLLOW_FOR;
    tokio::spawn(async move {
        while tokio::time::Instant::now() < until {
            let next = match store::next_due_at(&ctx.db, ctx.workspace_id(), Some(send_id)).await {
                Ok(Some(at)) => at,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(send_id, error = %crate::error::error_chain(&e), "following a send failed; the send-dispatch job takes over");
                    return;
                }
            };
            let wait = (next - ctx.now()).to_std().unwrap_or_default();
            if tokio::time::Instant::now() + wait > until {
                return;
            }
            tokio::time::sleep(wait).await;
            if let Err(e) = dispatch_send(&ctx, send_id).await {
                tracing::warn!(send_id, error = %crate::error::error_chain(&e), "dispatch failed; the send-dispatch job takes over");
                return;
            }
        }
    });
}

/// Claims `submission` and sends it once, inside its claim ([`fence::attempt_client`]);
/// records the outcome.
async fn submit(
    ctx: &AppContext,
    send: &SendRecord,
    submission: &Submission,
    holder: &str,
    report: &mut DispatchReport,
) -> Result<(), CoreError> {
    let window = match send.delivery {
        Delivery::Broadcast { broadcast_id } => Some(Window {
            broadcast_id: ctx.settings.sends.trigger_scope.window_of(broadcast_id),
            spacing: ctx.settings.sends.trigger_spacing,
        }),
        Delivery::Newsletter { .. } => None,
    };
    let claimed = match store::claim(
        &ctx.db,
        ctx.workspace_id(),
        submission.id,
        holder,
        ctx.settings.sends.claim_ttl,
        window,
        ctx.now(),
    )
    .await?
    {
        Claim::Claimed(s) => s,
        Claim::WindowClosed(_) => {
            report.waiting += 1;
            return Ok(());
        }
        Claim::Gone => return Ok(()),
    };
    report.claimed += 1;
    let cio = fence::attempt_client(ctx, &claimed);
    let outcome = match send.delivery {
        Delivery::Broadcast { broadcast_id } => {
            let trigger = Trigger {
                recipients: Recipients::Filter(claimed.recipients.clone()),
                data: trigger_data_of(send, &claimed),
            };
            cio.trigger_broadcast(broadcast_id, &trigger)
                .await
                .map(Accepted::Trigger)
                .map_err(Failure::from)
        }
        Delivery::Newsletter {
            from_id,
            subscription_topic_id,
        } => {
            let topic = subscription_topic_id.or_else(|| {
                ctx.settings
                    .cio
                    .as_ref()
                    .and_then(|c| c.subscription_topic_id)
            });
            send_newsletter(ctx, &cio, send, &claimed, holder, from_id, topic).await
        }
    };
    let now = ctx.now();
    if let Some(window) = window
        && !matches!(outcome, Err(Failure::NotSent(_)))
    {
        // The window was taken before the request; the request may have left later (waiting
        // for the App API rate limit), and Customer.io counts from its arrival.
        store::hold_window(
            &ctx.db,
            ctx.workspace_id(),
            window.broadcast_id,
            now + fence::span(window.spacing),
        )
        .await?;
    }
    let t = match outcome {
        Ok(Accepted::Trigger(trigger_id)) => {
            report.submitted += 1;
            Transition {
                cio_trigger_id: Some(trigger_id),
                ..Transition::new(
                    SendState::Submitting,
                    SendState::Submitted,
                    holder,
                    format!("Customer.io accepted trigger {trigger_id}"),
                )
            }
        }
        Ok(Accepted::Newsletter(newsletter_id)) => {
            report.submitted += 1;
            Transition {
                cio_newsletter_id: Some(newsletter_id),
                ..Transition::new(
                    SendState::Submitting,
                    SendState::Submitted,
                    holder,
                    format!("newsletter {newsletter_id} sent"),
                )
            }
        }
        Err(Failure::NotSent(not_sent)) => {
            report.requeued += 1;
            let wait = not_sent
                .earliest_start_in
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(100));
            let at = now + fence::span(wait);
            Transition {
                next_attempt_at: Some(at),
                uncount_attempt: true,
                ..Transition::new(
                    SendState::Submitting,
                    SendState::Pending,
                    holder,
                    format!(
                        "not sent: the request could not start early enough to end inside its \
                         claim (waiting for the rate limit); nothing reached Customer.io; \
                         queued until {at}"
                    ),
                )
                .error(not_sent.to_string())
            }
        }
        Err(Failure::ClaimLost { newsletter_id }) => {
            report.uncertain += 1;
            tracing::warn!(
                submission = claimed.id,
                newsletter_id,
                "the claim was lost after the newsletter was created; it is not sent from here \
                 (the reconciler finds it by name)"
            );
            return Ok(());
        }
        Err(Failure::NotRecorded {
            newsletter_id,
            error,
        }) => {
            report.uncertain += 1;
            Transition::new(
                SendState::Submitting,
                SendState::Uncertain,
                holder,
                format!(
                    "newsletter {newsletter_id} was created but could not be recorded; not sent \
                     from here (the reconciler finds it by name)"
                ),
            )
            .error(crate::error::error_chain(&error))
        }
        Err(Failure::Cio(e)) => {
            settle_failure(ctx, send, &claimed, &e, holder, now, report).await?
        }
    };
    let t = Transition {
        ends_attempt: true,
        ..t
    }
    .held_by(holder);
    if !store::transition(&ctx.db, claimed.id, &t, now).await? {
        tracing::warn!(
            submission = claimed.id,
            "the submission's claim was lost before its outcome was recorded"
        );
    } else if t.to == SendState::Submitted {
        watch_metrics(ctx, send, t.cio_newsletter_id, now).await;
    }
    Ok(())
}

/// Has the metrics poller follow what a submission went out through, from now on.
pub(super) async fn watch_metrics(
    ctx: &AppContext,
    send: &SendRecord,
    newsletter_id: Option<i64>,
    now: DateTime<Utc>,
) {
    let target = match (send.delivery, newsletter_id) {
        (Delivery::Broadcast { broadcast_id }, _) => MetricsTarget::Broadcast(broadcast_id),
        (Delivery::Newsletter { .. }, Some(id)) => MetricsTarget::Newsletter(id),
        (Delivery::Newsletter { .. }, None) => return,
    };
    if let Err(e) = crate::metrics::watch(ctx, target, now).await {
        tracing::warn!(send = %send.public_id, error = %crate::error::error_chain(&e), "could not schedule metrics polling; the campaign sync will");
    }
}

enum Accepted {
    Trigger(i64),
    Newsletter(i64),
}

/// Why an attempt did not end in an accepted request.
enum Failure {
    /// Nothing left the process: the request could not start early enough to end inside the
    /// claim.
    NotSent(NotSent),
    /// The request failed ([`settle_failure`]).
    Cio(CioError),
    /// The newsletter was created, but the claim was lost before its id was recorded: nothing
    /// more is sent from here; whoever holds the submission now settles it.
    ClaimLost { newsletter_id: i64 },
    /// The newsletter was created, but recording its id failed: it is not sent from here.
    NotRecorded {
        newsletter_id: i64,
        error: sharpsend_db::DbError,
    },
}

impl From<SendError> for Failure {
    fn from(error: SendError) -> Self {
        match error {
            SendError::NotSent(not_sent) => Failure::NotSent(not_sent),
            SendError::Failed(e) => Failure::Cio(e),
        }
    }
}

fn trigger_data_of(send: &SendRecord, s: &Submission) -> Map<String, Value> {
    TriggerData {
        extra: s.data.as_ref().and_then(Value::as_object),
        marker: &s.marker,
        send_id: &send.public_id,
        assignment_id: &send.assignment_id,
        title: &send.title,
        subject: &s.subject,
        body: &s.body,
        segment_id: s.segment_id,
    }
    .build()
}

/// The newsletter's name: the title and the marker that finds it again, within Customer.io's
/// [`MAX_NEWSLETTER_NAME_CHARS`] (a longer name is refused): the title is cut (ending in `…`),
/// never the marker.
fn newsletter_name(send: &SendRecord, s: &Submission) -> String {
    named(&send.title, &s.marker)
}

fn named(title: &str, marker: &str) -> String {
    let tag = format!(" [{marker}]");
    let room = MAX_NEWSLETTER_NAME_CHARS.saturating_sub(tag.chars().count());
    let title = if title.chars().count() <= room {
        title.to_owned()
    } else {
        let cut: String = title.chars().take(room.saturating_sub(1)).collect();
        format!("{}…", cut.trim_end())
    };
    format!("{title}{tag}")
}

/// Creates the submission's newsletter (unless an earlier attempt did), records its id while
/// still holding the claim, and only then sends it — both requests inside the attempt's fence.
async fn send_newsletter(
    ctx: &AppContext,
    cio: &DeadlineClient,
    send: &SendRecord,
    s: &Submission,
    holder: &str,
    from_id: Option<i64>,
    subscription_topic_id: Option<i64>,
) -> Result<Accepted, Failure> {
    let newsletter_id = match s.cio_newsletter_id {
        Some(id) => id,
        None => {
            let mut new = NewNewsletter::email(
                newsletter_name(send, s),
                s.recipients.clone(),
                s.subject.clone(),
                s.body.clone(),
            );
            new.from_id = from_id;
            new.subscription_topic_id = subscription_topic_id;
            let created = cio.create_newsletter(&new).await?;
            let t = Transition {
                cio_newsletter_id: Some(created.id),
                ..Transition::new(
                    SendState::Submitting,
                    SendState::Submitting,
                    holder,
                    format!("newsletter {} created", created.id),
                )
            }
            .held_by(holder);
            match store::transition(&ctx.db, s.id, &t, ctx.now()).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Failure::ClaimLost {
                        newsletter_id: created.id,
                    });
                }
                Err(error) => {
                    return Err(Failure::NotRecorded {
                        newsletter_id: created.id,
                        error,
                    });
                }
            }
            created.id
        }
    };
    cio.send_newsletter(newsletter_id).await?;
    Ok(Accepted::Newsletter(newsletter_id))
}

/// The transition for a request that did not succeed.
async fn settle_failure(
    ctx: &AppContext,
    send: &SendRecord,
    claimed: &Submission,
    error: &CioError,
    holder: &str,
    now: DateTime<Utc>,
    report: &mut DispatchReport,
) -> Result<Transition, CoreError> {
    let text = crate::error::error_chain(error);
    let requeue = |at: DateTime<Utc>, why: String| Transition {
        next_attempt_at: Some(at),
        uncount_attempt: true,
        ..Transition::new(SendState::Submitting, SendState::Pending, holder, why)
            .error(text.clone())
    };
    if let CioError::Rejected { .. } = error
        && matches!(send.delivery, Delivery::Newsletter { .. })
        && let Some(id) = claimed.cio_newsletter_id
        && already_sent(ctx, id).await
    {
        // `/send` refused because the newsletter is no longer a draft: an earlier attempt's
        // send went out after all.
        report.submitted += 1;
        return Ok(Transition {
            cio_newsletter_id: Some(id),
            ..Transition::new(
                SendState::Submitting,
                SendState::Submitted,
                holder,
                format!("newsletter {id} had already been sent"),
            )
        });
    }
    Ok(match error {
        CioError::RateLimited { retry_after, .. } => {
            report.requeued += 1;
            let wait = retry_after
                .unwrap_or(ctx.settings.sends.trigger_spacing)
                .max(Duration::from_millis(100));
            let at =
                now + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::seconds(10));
            if let Delivery::Broadcast { broadcast_id } = send.delivery {
                let window = ctx.settings.sends.trigger_scope.window_of(broadcast_id);
                store::hold_window(&ctx.db, ctx.workspace_id(), window, at).await?;
            }
            requeue(
                at,
                format!("Customer.io answered 429 (not processed); waiting until {at}"),
            )
        }
        CioError::Transport {
            maybe_sent: false, ..
        }
        | CioError::Unauthorized { .. }
        | CioError::Config { .. } => {
            report.requeued += 1;
            let at = now + chrono::TimeDelta::seconds(30);
            requeue(
                at,
                "the request did not reach Customer.io; trying again later".to_string(),
            )
        }
        CioError::NotFound { .. } | CioError::Rejected { .. } => {
            report.failed += 1;
            Transition::new(
                SendState::Submitting,
                SendState::Failed,
                holder,
                "Customer.io refused it",
            )
            .error(text)
        }
        CioError::Timeout { .. }
        | CioError::Transport { .. }
        | CioError::Server { .. }
        | CioError::Decode { .. } => {
            report.uncertain += 1;
            Transition::new(
                SendState::Submitting,
                SendState::Uncertain,
                holder,
                "the outcome of the request is unknown; not sent again",
            )
            .error(text)
        }
    })
}

/// Whether Customer.io shows newsletter `id` as sent (false when it cannot tell).
async fn already_sent(ctx: &AppContext, id: i64) -> bool {
    ctx.cio
        .get_newsletter(id)
        .await
        .is_ok_and(|n| n.sent_at.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newsletter_name_fits_customer_io_and_keeps_its_marker() {
        let marker = "ss:snd_01JZ0000000000000000000000:0";
        assert_eq!(
            named("Q4 outlook", marker),
            format!("Q4 outlook [{marker}]")
        );
        let long = "ü".repeat(200);
        let name = named(&long, marker);
        assert_eq!(name.chars().count(), MAX_NEWSLETTER_NAME_CHARS);
        assert!(name.ends_with(&format!("… [{marker}]")), "{name}");
        let exact = "a".repeat(MAX_NEWSLETTER_NAME_CHARS - marker.len() - 3);
        assert_eq!(
            named(&exact, marker).chars().count(),
            MAX_NEWSLETTER_NAME_CHARS
        );
        assert!(!named(&exact, marker).contains('…'));
    }
}
