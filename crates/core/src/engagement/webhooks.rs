//! The reporting-webhook receiver (reporting-webhooks.openapi.json).
//!
//! [`WebhookReceiver::receive`] verifies the request first (`X-CIO-Signature` over
//! `"v0:" + X-CIO-Timestamp + ":" + raw body`, compared in constant time; the timestamp within
//! `SHARPSEND_WEBHOOK_TOLERANCE_SECS` of the clock either way): forged, unsigned or stale
//! requests are refused and nothing is stored. A validly signed body is then always
//! acknowledged — Customer.io holds back every later webhook behind one that failed — so a
//! body that is not understood (not JSON, no `event_id`, an unknown `metric` or `object_type`)
//! is kept in the quarantine with the reason instead of being refused.
//!
//! Understood events go through one insert-only path: a task collects the events of
//! concurrent requests and stores them with one multi-row insert (`ON CONFLICT (workspace,
//! event_id) DO NOTHING`: a redelivery is stored once), attributing each to its SharpSend
//! submission; every request is answered after the insert that holds its event committed.
//! When the database fails the request is answered 503 and Customer.io retries it.

use std::time::{Duration, SystemTime};

use cio_client::webhooks::{
    self as cio_webhooks, Metric, ObjectType, ReportingEvent, WebhookError,
};
use secrecy::{ExposeSecret as _, SecretString};
use sharpsend_db::engagement::{self as store, EventSource, NewDeliveryEvent};
use tokio::sync::{mpsc, oneshot};

use crate::AppContext;
use crate::error::error_chain;

/// Events stored by one insert at most.
const BATCH: usize = 500;
/// Inserts running at once (each takes the requests waiting when it starts).
const INSERTERS: usize = 4;
/// Requests waiting for the insert tasks at most (beyond it requests wait to be queued).
const QUEUE: usize = 10_000;

/// What happened to a validly signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// An understood event: stored (or already stored: a redelivery).
    Stored,
    /// Not understood: kept in the quarantine with this reason.
    Quarantined(String),
}

/// Why a request was refused (nothing was stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Missing, malformed or wrong signature, or a timestamp outside the tolerance: 401.
    #[error("unauthenticated webhook: {0}")]
    Unauthenticated(WebhookError),
    /// The event could not be stored now (database failure); Customer.io retries: 503.
    #[error("the event could not be stored now")]
    Unavailable,
}

struct Pending {
    event: NewDeliveryEvent,
    stored: oneshot::Sender<bool>,
}

/// Receives reporting webhooks for the workspace of its context.
#[derive(Clone)]
pub struct WebhookReceiver {
    ctx: AppContext,
    signing_key: SecretString,
    tolerance: Duration,
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for WebhookReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookReceiver")
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

impl WebhookReceiver {
    /// A receiver checking signatures with `signing_key`, with its insert task on the current
    /// tokio runtime (it ends when the last clone of the receiver is dropped).
    pub fn start(ctx: AppContext, signing_key: SecretString) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..INSERTERS {
            tokio::spawn(insert_task(ctx.clone(), rx.clone()));
        }
        let tolerance = ctx.settings.engagement.webhook_tolerance;
        Self {
            ctx,
            signing_key,
            tolerance,
            queue,
        }
    }

    /// Handles one request: headers as received (`None`: absent), the raw body.
    pub async fn receive(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<Received, Refused> {
        let timestamp = timestamp.ok_or(Refused::Unauthenticated(WebhookError::BadTimestamp))?;
        let signature =
            signature.ok_or(Refused::Unauthenticated(WebhookError::MalformedSignature))?;
        let now: SystemTime = self.ctx.now().into();
        cio_webhooks::verify_signature(
            self.signing_key.expose_secret(),
            timestamp,
            signature,
            body,
            now,
            self.tolerance,
        )
        .map_err(Refused::Unauthenticated)?;

        let event = match understand(body) {
            Ok(event) => event,
            Err(reason) => {
                let text = String::from_utf8_lossy(body).replace('\0', "\u{FFFD}");
                store::quarantine(
                    &self.ctx.db,
                    self.ctx.workspace_id(),
                    &reason,
                    &text,
                    self.ctx.now(),
                )
                .await
                .map_err(|e| {
                    tracing::warn!(error = %error_chain(&e), "could not quarantine a webhook body");
                    Refused::Unavailable
                })?;
                tracing::warn!(%reason, "reporting webhook quarantined");
                return Ok(Received::Quarantined(reason));
            }
        };
        let event = to_new_event(&event, self.ctx.now());
        let (stored, answer) = oneshot::channel();
        self.queue
            .send(Pending { event, stored })
            .await
            .map_err(|_| Refused::Unavailable)?;
        match answer.await {
            Ok(true) => Ok(Received::Stored),
            _ => Err(Refused::Unavailable),
        }
    }
}

/// The event, or why it is not understood.
fn understand(body: &[u8]) -> Result<ReportingEvent, String> {
    let event = cio_webhooks::parse_reporting_event(body).map_err(|e| e.to_string())?;
    if let Metric::Other(metric) = &event.metric {
        return Err(format!("unknown metric `{}`", clip(metric)));
    }
    if let ObjectType::Other(kind) = &event.object_type {
        return Err(format!("unknown object_type `{}`", clip(kind)));
    }
    if event.event_id.is_empty() || event.event_id.len() > 200 || event.event_id.contains('\0') {
        return Err("event_id is empty, longer than 200 bytes or has NUL".into());
    }
    Ok(event)
}

fn clip(s: &str) -> String {
    s.chars().take(100).filter(|c| *c != '\0').collect()
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref()
        .filter(|s| !s.is_empty() && !s.contains('\0'))
        .cloned()
}

/// The stored form of a reporting event.
pub(crate) fn to_new_event(
    e: &ReportingEvent,
    now: chrono::DateTime<chrono::Utc>,
) -> NewDeliveryEvent {
    let d = &e.data;
    let customer_id =
        non_empty(&d.customer_id).or_else(|| d.identifiers.as_ref().and_then(|i| non_empty(&i.id)));
    NewDeliveryEvent {
        event_id: e.event_id.clone(),
        metric: e.metric.as_str().to_string(),
        object_type: e.object_type.as_str().to_string(),
        delivery_id: non_empty(&d.delivery_id),
        customer_id,
        broadcast_id: d.broadcast_id,
        trigger_id: d.trigger_id,
        newsletter_id: d.newsletter_id,
        content_id: d.content_id,
        campaign_id: d.campaign_id,
        action_id: d.action_id,
        link: non_empty(&d.href).map(|h| h.chars().take(2000).collect()),
        prefetched: d.prefetched == Some(true),
        machine: d.machine == Some(true),
        synthetic: e.is_synthetic(),
        occurred_at: e.timestamp.map_or(now, |t| super::from_unix(t, now)),
        submission_id: None,
    }
}

/// Stores the events of concurrent requests together; answers each after its insert. Several
/// run at once: each takes what is waiting, then inserts while the next one collects.
async fn insert_task(
    ctx: AppContext,
    rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
    loop {
        let received = rx.lock().await.recv_many(&mut batch, BATCH).await;
        if received == 0 {
            return;
        }
        let events: Vec<NewDeliveryEvent> = batch.iter().map(|p| p.event.clone()).collect();
        let stored = match store::insert_events(
            &ctx.db,
            ctx.workspace_id(),
            EventSource::Webhook,
            &events,
            ctx.now(),
        )
        .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), events = events.len(), "could not store webhook events; answering 503");
                false
            }
        };
        for pending in batch.drain(..) {
            let _ = pending.stored.send(stored);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_metrics_and_bodies_are_not_understood() {
        assert!(
            understand(br#"{"event_id":"e1","object_type":"email","metric":"opened","data":{}}"#)
                .is_ok()
        );
        let reason =
            understand(br#"{"event_id":"e1","object_type":"email","metric":"teleported"}"#)
                .unwrap_err();
        assert_eq!(reason, "unknown metric `teleported`");
        assert!(understand(b"not json").is_err());
        assert!(understand(br#"{"event_id":"","object_type":"email","metric":"sent"}"#).is_err());
    }

    #[test]
    fn stored_form_keeps_flags_and_falls_back_to_identifiers() {
        let body =
            br#"{"event_id":"e2","object_type":"email","metric":"opened","timestamp":1700000000,
            "data":{"delivery_id":"d1","customer_id":"","identifiers":{"id":"p7"},"prefetched":true,
            "broadcast_id":3,"trigger_id":9}}"#;
        let event = understand(body).unwrap();
        let row = to_new_event(&event, chrono::DateTime::from_timestamp(0, 0).unwrap());
        assert_eq!(row.customer_id.as_deref(), Some("p7"));
        assert!(row.prefetched && !row.machine);
        assert_eq!((row.broadcast_id, row.trigger_id), (Some(3), Some(9)));
        assert_eq!(row.occurred_at.timestamp(), 1_700_000_000);
    }
}
