//! Reporting webhooks (reporting-webhooks.openapi.json): the simulator POSTs every delivery
//! event to a configured URL as it happens on the simulator's clock, signed, at least once,
//! in order, holding back every later event behind one that has not succeeded.
//!
//! Events (`object_type` `email`), from the delivery ledger:
//! | ledger | `metric` | extra `data` |
//! |---|---|---|
//! | sent | `sent` | |
//! | delivered | `delivered` | |
//! | bounced | `bounced` | `failure_message` |
//! | machine open | `opened` | `prefetched: true`, `proxied: true`, `synthetic: false` |
//! | human open | `opened` | `prefetched: false`, `proxied` (a prefetching client's proxy or Gmail's image proxy), `synthetic: false` |
//! | a click before any open | `opened` | `synthetic: true`, `prefetched: false`, `proxied: false` (just before the click) |
//! | machine click | `clicked` | `machine: true`, `href`, `link_id` |
//! | human click | `clicked` | `machine: false`, `href`, `link_id` |
//! | converted, spammed, unsubscribed | `converted`, `spammed`, `unsubscribed` | |
//!
//! So a person whose client prefetches and who then reads the message yields two `opened`
//! events (the "every time" send frequency). Every `data` has `delivery_id`, `customer_id`
//! (the person's id; `""` without one, or when deleted), `identifiers` `{"id","email","cio_id"}`,
//! `recipient`, `subject` and the parents: `broadcast_id` + `trigger_id` + `action_id`,
//! `campaign_id` + `action_id` + `trigger_event_id` (null), or `newsletter_id` + `content_id`.
//! The body's `event_id` is a ULID unique per event (the same on a duplicate), `timestamp` the
//! unix time the event happened.
//!
//! Request: `POST {url}`, `Content-Type: application/json`, `X-CIO-Timestamp` (unix seconds
//! of the attempt) and `X-CIO-Signature` = lowercase hex HMAC-SHA256(signing key,
//! `"v0:" + timestamp + ":" + raw body`) ([`crate::sign_webhook`]).
//!
//! Delivery, as the spec describes it: an attempt succeeds on a 2xx within the timeout (4 s).
//! Anything else is retried with exponential backoff on the simulator's clock: after 1 hour
//! first for the statuses 400, 401, 402, 403, 404, 405, 410, 429, 500, 502, 521 and for
//! connection failures, after 30 seconds first for timeouts and other statuses, doubling up to
//! a day; an event still failing 7 days after its first attempt is abandoned. Until the event at
//! the head succeeds (or is abandoned) nothing behind it is sent, so events go out in the order
//! they happened, per delivery and overall. A configurable fraction of events is delivered
//! twice (the copy right after the first succeeds, same `event_id`), so a receiver must
//! deduplicate.
//!
//! Only events that happen after the webhook is configured are reported. The sender is a task
//! on the tokio runtime that configured it (or served the simulator); [`crate::Simulator::advance`]
//! wakes it. Every event, its body and every attempt are kept in a ledger
//! ([`crate::Simulator::webhook_ledger`]).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::activities::stable_ulid;
use crate::sends::{Delivery, DeliveryMetric, Source};
use crate::signing::sign_webhook;
use crate::state::World;

/// Customer.io's webhook timeout.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(4);
/// How long an event is retried before it is abandoned (Customer.io: 7 days).
pub const WEBHOOK_RETRY_PERIOD: Duration = Duration::from_secs(7 * 24 * 3600);
/// Statuses after which Customer.io waits an hour before the first retry.
const HOLD_OFF_STATUSES: [u16; 11] = [400, 401, 402, 403, 404, 405, 410, 429, 500, 502, 521];
const SHORT_BACKOFF_MS: i64 = 30_000;
const LONG_BACKOFF_MS: i64 = 3_600_000;
const MAX_BACKOFF_MS: i64 = 24 * 3_600_000;
/// Longest the sender sleeps without looking again (wall-clock events, lost wake-ups).
const MAX_IDLE: Duration = Duration::from_millis(250);
const EVENT_TAG: u8 = 0xEB;

/// Where and how reporting webhooks are sent ([`crate::SimConfig::reporting_webhook`]).
#[derive(Clone, PartialEq)]
pub struct ReportingWebhook {
    /// The endpoint (`http://` or `https://`).
    pub url: String,
    /// The signing key (`X-CIO-Signature`).
    pub signing_key: String,
    /// Fraction of events (0..=1) delivered twice.
    pub duplicate_rate: f64,
    /// How long an attempt may take before it counts as failed (Customer.io: 4 s).
    pub timeout: Duration,
}

impl ReportingWebhook {
    /// A webhook to `url` signed with `signing_key`, no duplicates, 4 s timeout.
    pub fn new(url: &str, signing_key: &str) -> Self {
        Self {
            url: url.to_owned(),
            signing_key: signing_key.to_owned(),
            duplicate_rate: 0.0,
            timeout: DEFAULT_WEBHOOK_TIMEOUT,
        }
    }
}

/// A reporting webhook configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reporting webhook: {0}")]
pub struct InvalidWebhook(pub String);

impl ReportingWebhook {
    /// Checks the URL (absolute http/https), the key (not empty), the duplicate rate (0..=1)
    /// and the timeout (positive).
    pub fn validate(&self) -> Result<(), InvalidWebhook> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| InvalidWebhook(format!("url {:?}: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(InvalidWebhook("url must be an absolute http(s) URL".into()));
        }
        if self.signing_key.is_empty() {
            return Err(InvalidWebhook("signing_key is empty".into()));
        }
        if !(0.0..=1.0).contains(&self.duplicate_rate) {
            return Err(InvalidWebhook("duplicate_rate must be within 0..=1".into()));
        }
        if self.timeout.is_zero() {
            return Err(InvalidWebhook("timeout must be positive".into()));
        }
        Ok(())
    }
}

impl fmt::Debug for ReportingWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportingWebhook")
            .field("url", &self.url)
            .field("signing_key", &"<redacted>")
            .field("duplicate_rate", &self.duplicate_rate)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One attempt to deliver an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookAttempt {
    /// When it was made (presented like every simulator time: the wall clock, so it does not
    /// move with [`crate::Simulator::advance`]).
    pub at: DateTime<Utc>,
    /// Time since the event's first attempt on the simulator's clock (which `advance` moves):
    /// the backoff shows here.
    pub since_first_attempt: Duration,
    /// Its `X-CIO-Timestamp`.
    pub signed_at: i64,
    /// 1 for the event, 2 for its duplicate.
    pub copy: u8,
    /// The receiver's status, if it answered in time.
    pub status: Option<u16>,
    /// `timeout` or the connection error, if it did not.
    pub error: Option<String>,
}

impl WebhookAttempt {
    /// Answered 2xx in time.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// One event in the webhook ledger ([`crate::Simulator::webhook_ledger`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimWebhook {
    /// The body's `event_id`.
    pub event_id: String,
    /// The body's `metric`.
    pub metric: String,
    /// The body's `object_type` (`email`).
    pub object_type: String,
    /// The delivery it is about.
    pub delivery_id: String,
    /// The body's `timestamp`.
    pub timestamp: i64,
    /// The raw body sent (signed as is).
    pub body: String,
    /// Copies to deliver: 1, or 2 when duplicated.
    pub copies: u8,
    /// Copies acknowledged with a 2xx.
    pub acknowledged: u8,
    /// Given up on after the retry period.
    pub abandoned: bool,
    /// Every attempt, in order.
    pub attempts: Vec<WebhookAttempt>,
}

impl SimWebhook {
    /// The body as JSON.
    pub fn body_json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// Every copy was acknowledged.
    pub fn delivered(&self) -> bool {
        self.acknowledged >= self.copies
    }
}

struct Entry {
    hook: SimWebhook,
    next_attempt_ms: i64,
    first_attempt_ms: Option<i64>,
    failures: u32,
}

/// The sender's state (behind its own mutex; taken after the world's, never before).
#[derive(Default)]
pub(crate) struct WebhookState {
    config: Option<ReportingWebhook>,
    /// Bumped on every (re)configuration: answers to older attempts are ignored.
    generation: u64,
    entries: Vec<Entry>,
    /// Entries still to deliver, oldest first; the head blocks the rest.
    queue: VecDeque<usize>,
    in_flight: bool,
}

/// What the sender task does next.
pub(crate) enum Step {
    Send(Job),
    Wait(Duration),
}

/// One attempt to make.
pub(crate) struct Job {
    generation: u64,
    entry: usize,
    url: String,
    timeout: Duration,
    body: String,
    signed_at: i64,
    signature: String,
}

/// How an attempt ended.
pub(crate) enum Outcome {
    Status(u16),
    Timeout,
    Failed(String),
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The webhook `metric` and its flags for a ledger event (`None`: not reported on its own).
fn webhook_metric(d: &Delivery, metric: DeliveryMetric, at: i64) -> Option<(&'static str, Value)> {
    let has_before = |m: DeliveryMetric| d.events.iter().any(|(x, t)| *x == m && *t <= at);
    Some(match metric {
        DeliveryMetric::Sent => ("sent", json!({})),
        DeliveryMetric::Delivered => ("delivered", json!({})),
        DeliveryMetric::Bounced => (
            "bounced",
            json!({ "failure_message": crate::messages_api::BOUNCE_MESSAGE }),
        ),
        DeliveryMetric::PrefetchOpened => (
            "opened",
            json!({ "prefetched": true, "proxied": true, "synthetic": false }),
        ),
        DeliveryMetric::HumanOpened => {
            let gmail = d.email.to_ascii_lowercase().ends_with("@gmail.com");
            let proxied = gmail
                || d.events
                    .iter()
                    .any(|(m, _)| *m == DeliveryMetric::PrefetchOpened);
            (
                "opened",
                json!({ "prefetched": false, "proxied": proxied, "synthetic": false }),
            )
        }
        DeliveryMetric::Opened => {
            if has_before(DeliveryMetric::HumanOpened) || has_before(DeliveryMetric::PrefetchOpened)
            {
                return None;
            }
            (
                "opened",
                json!({ "prefetched": false, "proxied": false, "synthetic": true }),
            )
        }
        DeliveryMetric::PrefetchClicked | DeliveryMetric::HumanClicked => {
            let link_id = 1 + mix(d.seq as u64) % 3;
            let href = format!("https://example.com/sim/{}?link={link_id}", d.id);
            (
                "clicked",
                json!({
                    "machine": metric == DeliveryMetric::PrefetchClicked,
                    "href": href,
                    "link_id": link_id,
                }),
            )
        }
        DeliveryMetric::Converted => ("converted", json!({})),
        DeliveryMetric::Spammed => ("spammed", json!({})),
        DeliveryMetric::Unsubscribed => ("unsubscribed", json!({})),
        DeliveryMetric::Clicked => return None,
    })
}

fn event_body(
    world: &World,
    d: &Delivery,
    metric: &str,
    extra: Value,
    event_id: &str,
    at: i64,
) -> String {
    let person = world.person(d.person_seq);
    let identifiers = match person {
        Some(p) => json!({ "id": p.id, "email": p.email, "cio_id": p.cio_id }),
        None => {
            let id = (!d.person_id.starts_with("cio_")).then(|| d.person_id.clone());
            json!({ "id": id, "email": d.email, "cio_id": d.cio_id })
        }
    };
    let mut data = json!({
        "delivery_id": d.id,
        "customer_id": person.and_then(|p| p.id.clone()).unwrap_or_default(),
        "identifiers": identifiers,
        "recipient": d.email,
        "subject": &*d.subject,
    });
    if let Some(obj) = data.as_object_mut() {
        match d.source {
            Source::Broadcast {
                broadcast_id,
                action_id,
                trigger_id,
            } => {
                obj.insert("broadcast_id".into(), json!(broadcast_id));
                obj.insert("trigger_id".into(), json!(trigger_id));
                obj.insert("action_id".into(), json!(action_id));
            }
            Source::Campaign {
                campaign_id,
                action_id,
            } => {
                obj.insert("campaign_id".into(), json!(campaign_id));
                obj.insert("action_id".into(), json!(action_id));
                obj.insert("trigger_event_id".into(), Value::Null);
            }
            Source::Newsletter {
                newsletter_id,
                content_id,
            } => {
                obj.insert("newsletter_id".into(), json!(newsletter_id));
                obj.insert("content_id".into(), json!(content_id));
            }
        }
        if let Value::Object(extra) = extra {
            obj.extend(extra);
        }
    }
    json!({
        "event_id": event_id,
        "object_type": "email",
        "metric": metric,
        "timestamp": world.sends.present_secs(at),
        "data": data,
    })
    .to_string()
}

fn backoff_ms(failures: u32, outcome: &Outcome) -> i64 {
    let base = match outcome {
        Outcome::Status(status) if HOLD_OFF_STATUSES.contains(status) => LONG_BACKOFF_MS,
        Outcome::Failed(_) => LONG_BACKOFF_MS,
        Outcome::Status(_) | Outcome::Timeout => SHORT_BACKOFF_MS,
    };
    let doublings = failures.saturating_sub(1).min(20);
    base.saturating_mul(1_i64 << doublings).min(MAX_BACKOFF_MS)
}

impl WebhookState {
    pub(crate) fn config(&self) -> Option<&ReportingWebhook> {
        self.config.as_ref()
    }

    pub(crate) fn ledger(&self) -> Vec<SimWebhook> {
        self.entries.iter().map(|e| e.hook.clone()).collect()
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// (Re)configures; `None` disables and drops what was still queued (the ledger stays).
    pub(crate) fn configure(&mut self, world: &mut World, config: Option<ReportingWebhook>) {
        self.generation += 1;
        self.in_flight = false;
        self.queue.clear();
        world.sends.track_unreported(config.is_some());
        self.config = config;
    }

    /// Turns the events that have happened into queued webhooks.
    pub(crate) fn collect(&mut self, world: &mut World) {
        if self.config.is_none() {
            return;
        }
        let duplicate_rate = self.config.as_ref().map_or(0.0, |c| c.duplicate_rate);
        let now = world.sends.now_ms();
        let seed = world.sends.seed();
        for (at, seq, metric) in world.sends.take_unreported(now) {
            let Some(d) = world.sends.ledger().get(seq) else {
                continue;
            };
            let Some((name, extra)) = webhook_metric(d, metric, at) else {
                continue;
            };
            let ordinal = (seq as u64) << 4 | metric as u64;
            let event_id = stable_ulid(at, EVENT_TAG, ordinal, &[seed]).to_string();
            let body = event_body(world, d, name, extra, &event_id, at);
            let copies = if unit(mix(seed ^ mix(ordinal ^ 0xD0B1E))) < duplicate_rate {
                2
            } else {
                1
            };
            self.queue.push_back(self.entries.len());
            self.entries.push(Entry {
                hook: SimWebhook {
                    event_id,
                    metric: name.to_owned(),
                    object_type: "email".to_owned(),
                    delivery_id: d.id.clone(),
                    timestamp: world.sends.present_secs(at),
                    body,
                    copies,
                    acknowledged: 0,
                    abandoned: false,
                    attempts: Vec::new(),
                },
                next_attempt_ms: now,
                first_attempt_ms: None,
                failures: 0,
            });
        }
    }

    /// Nothing to send now: nothing queued, or the head waits for a later retry.
    pub(crate) fn quiet(&self, now: i64) -> bool {
        !self.in_flight
            && self
                .queue
                .front()
                .and_then(|i| self.entries.get(*i))
                .is_none_or(|e| e.next_attempt_ms > now)
    }

    /// The next step of the sender task.
    pub(crate) fn step(&mut self, world: &mut World) -> Step {
        self.collect(world);
        let now = world.sends.now_ms();
        let Some(config) = self.config.clone() else {
            return Step::Wait(MAX_IDLE);
        };
        if self.in_flight {
            return Step::Wait(MAX_IDLE);
        }
        while let Some(&index) = self.queue.front() {
            let Some(entry) = self.entries.get_mut(index) else {
                self.queue.pop_front();
                continue;
            };
            let period = i64::try_from(WEBHOOK_RETRY_PERIOD.as_millis()).unwrap_or(i64::MAX);
            if entry
                .first_attempt_ms
                .is_some_and(|first| now.saturating_sub(first) >= period)
            {
                entry.hook.abandoned = true;
                self.queue.pop_front();
                continue;
            }
            if entry.next_attempt_ms > now {
                let wait = u64::try_from(entry.next_attempt_ms - now).unwrap_or(0);
                return Step::Wait(Duration::from_millis(wait).min(MAX_IDLE));
            }
            entry.first_attempt_ms.get_or_insert(now);
            let signed_at = world.sends.present_secs(now);
            let signature =
                sign_webhook(&config.signing_key, signed_at, entry.hook.body.as_bytes());
            self.in_flight = true;
            return Step::Send(Job {
                generation: self.generation,
                entry: index,
                url: config.url.clone(),
                timeout: config.timeout,
                body: entry.hook.body.clone(),
                signed_at,
                signature,
            });
        }
        let wait = world.sends.next_unreported().map_or(MAX_IDLE, |at| {
            Duration::from_millis(u64::try_from(at - now).unwrap_or(0))
        });
        Step::Wait(wait.min(MAX_IDLE))
    }

    /// Records how an attempt ended.
    pub(crate) fn done(&mut self, world: &World, job: &Job, outcome: Outcome) {
        if job.generation != self.generation {
            return;
        }
        self.in_flight = false;
        let now = world.sends.now_ms();
        let Some(entry) = self.entries.get_mut(job.entry) else {
            return;
        };
        let (status, error) = match &outcome {
            Outcome::Status(s) => (Some(*s), None),
            Outcome::Timeout => (None, Some("timeout".to_owned())),
            Outcome::Failed(e) => (None, Some(e.clone())),
        };
        let since_first = entry
            .first_attempt_ms
            .map_or(0, |first| now.saturating_sub(first));
        entry.hook.attempts.push(WebhookAttempt {
            at: world.sends.present(now),
            since_first_attempt: Duration::from_millis(u64::try_from(since_first).unwrap_or(0)),
            signed_at: job.signed_at,
            copy: entry.hook.acknowledged + 1,
            status,
            error,
        });
        if matches!(outcome, Outcome::Status(s) if (200..300).contains(&s)) {
            entry.hook.acknowledged += 1;
            entry.failures = 0;
            entry.next_attempt_ms = now;
            if entry.hook.delivered() {
                self.queue.pop_front();
            }
        } else {
            entry.failures += 1;
            entry.next_attempt_ms = now.saturating_add(backoff_ms(entry.failures, &outcome));
        }
    }
}

/// Makes one attempt.
pub(crate) async fn attempt(http: &reqwest::Client, job: &Job) -> Outcome {
    let request = http
        .post(&job.url)
        .timeout(job.timeout)
        .header("Content-Type", "application/json")
        .header("User-Agent", "Customer.io Reporting Webhooks (cio-sim)")
        .header("X-CIO-Timestamp", job.signed_at.to_string())
        .header("X-CIO-Signature", &job.signature)
        .body(job.body.clone());
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            // Read the answer within the timeout too (it is discarded).
            let _ = tokio::time::timeout(job.timeout, response.bytes()).await;
            Outcome::Status(status)
        }
        Err(e) if e.is_timeout() => Outcome::Timeout,
        Err(e) => {
            let e = e.without_url();
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            Outcome::Failed(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_holds_off_an_hour_for_the_listed_answers() {
        assert_eq!(backoff_ms(1, &Outcome::Status(500)), LONG_BACKOFF_MS);
        assert_eq!(
            backoff_ms(1, &Outcome::Failed("refused".into())),
            LONG_BACKOFF_MS
        );
        assert_eq!(backoff_ms(1, &Outcome::Timeout), SHORT_BACKOFF_MS);
        assert_eq!(backoff_ms(1, &Outcome::Status(503)), SHORT_BACKOFF_MS);
        assert_eq!(backoff_ms(3, &Outcome::Timeout), 4 * SHORT_BACKOFF_MS);
        assert_eq!(backoff_ms(30, &Outcome::Status(404)), MAX_BACKOFF_MS);
        let key = format!("{:?}", ReportingWebhook::new("http://x", "very-secret"));
        assert!(!key.contains("very-secret"), "{key}");
    }
}
