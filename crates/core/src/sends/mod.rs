//! Sends of approved assignments through Customer.io, exactly once.
//!
//! A send is keyed by (assignment, caller request id) and has one submission per target
//! segment, carrying that segment's content variation. A submission goes out either as a
//! trigger of an API-triggered broadcast (content in the trigger `data`, recipients as a segment
//! filter) or as a newsletter created with the content and then sent. People in several target
//! segments get only the variation of the first of them: each submission's filter excludes the
//! segments listed before it.
//!
//! Exactly once rests on the persisted state machine in `sharpsend_db::sends`:
//! - a submission is claimed (`pending` → `submitting`, and for a broadcast its one-per-window
//!   trigger slot) in the database BEFORE its request leaves, so concurrent dispatchers (two
//!   approvals at once, the server and the scheduler) never both send it;
//! - the whole attempt is fenced inside its claim: every request of it (rate-limiter wait and
//!   429 pauses included) must be able to start by the claim's expiry minus the request timeout
//!   minus [`SendConfig::fence_margin`], or it is not sent at all (`cio_client::NotSent`); so
//!   once the claim has expired — in any process's clock, within the tolerated skew — nothing
//!   of the attempt can still leave or still be on its way;
//! - sending calls are never retried by the client; an answer that proves the request was not
//!   processed (429, 4xx, could not connect) settles it (`pending` again or `failed`); anything
//!   else that is not a success (timeout, dropped connection, 5xx) makes it `uncertain`, as
//!   does a dispatcher that died holding it ([`SendConfig::claim_ttl`]);
//! - [`reconcile`](fn@reconcile) looks for uncertain submissions in Customer.io by the marker
//!   they carry (the trigger `data` field [`MARKER_FIELD`], echoed by the trigger status; the
//!   newsletter name) and settles them: found → `submitted`; absent (or a newsletter found
//!   unsent) once [`SendConfig::reconcile_grace`] has passed after the END of the attempt's
//!   window (when its dispatcher recorded the outcome, else its claim's expiry; plus the fence
//!   margin) → not sent, queued again (at most [`SendConfig::max_attempts`] attempts, then
//!   `failed`); undecidable → left for an operator's [`resolve`], whose decision only applies
//!   to a submission still uncertain (else `CoreError::Aborted`).
//!
//! Times compared across processes (claim expiry, grace, trigger windows) come from each
//! process's own clock: [`check_start_up`] refuses to start a process whose clock is more than
//! [`SendConfig::max_clock_skew`] from the database's, and every fence allows twice that.
//!
//! The server dispatches a new send at once ([`send_assignment`]) and follows it in the
//! background while later submissions wait for their broadcast window; the scheduler's
//! `send-dispatch` and `send-reconcile` jobs are the safety net across restarts.
//!
//! Split by concern:
//! - `request`: [`send_assignment`] (validation, the request fingerprint, recording the send and
//!   its submissions), [`get_send`], [`list_sends`] and [`resolve`];
//! - `dispatch`: [`dispatch_due`], claiming and submitting each submission once (trigger or
//!   newsletter), settling requests that failed, following a new send in the background;
//! - `reconcile`: [`reconcile`](fn@reconcile), settling uncertain submissions from what
//!   Customer.io holds, following submitted ones to completion, and [`metric_targets`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sharpsend_db::sends as store;
/// Where a send or a submission stands, and how it goes out: the state machine's vocabulary.
pub use sharpsend_db::sends::{Delivery, SendState};

mod dispatch;
mod fence;
mod reconcile;
mod request;

pub use dispatch::{DispatchReport, dispatch_due};
pub use fence::{TriggerScope, check_start_up};
pub use reconcile::{ReconcileReport, SendMetricTargets, metric_targets, reconcile};
pub(crate) use request::{Prepared, finish_send, prepare_send};
pub use request::{
    Resolution, SendKey, exclusive_audience, get_send, list_sends, resolve, send_assignment,
};

/// The trigger `data` field that carries a submission's marker.
pub const MARKER_FIELD: &str = "sharpsend_submission";
/// Longest assignment id, request id and title, in characters.
pub const MAX_ID_CHARS: usize = 200;
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest subject, in characters.
pub const MAX_SUBJECT_CHARS: usize = 250;
/// Most content types of one assignment, and the longest, in characters.
pub const MAX_CONTENT_TYPES: usize = 10;
pub const MAX_CONTENT_TYPE_CHARS: usize = 50;
/// Most target segments of one send.
pub const MAX_TARGETS: usize = 20;
/// Customer.io's limit on a trigger's `data`, in bytes of JSON.
pub const MAX_TRIGGER_DATA_BYTES: usize = 50_000;
/// Longest newsletter name Customer.io takes (2026 spec: "190 characters or less"); the title
/// is cut to fit its marker.
pub const MAX_NEWSLETTER_NAME_CHARS: usize = 190;
/// Largest newsletter body we send, in bytes.
pub const MAX_NEWSLETTER_BODY_BYTES: usize = 500_000;
/// Longest ResolveSend actor and reason, in characters.
pub const MAX_ACTOR_CHARS: usize = 200;
pub const MAX_REASON_CHARS: usize = 2_000;
/// Trigger errors kept per submission (the count is of all of them), and the longest line.
pub const MAX_TRIGGER_ERRORS_KEPT: usize = 20;
pub const MAX_TRIGGER_ERROR_CHARS: usize = 500;

/// How sends are dispatched and reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendConfig {
    /// Time between two triggers ([`SendConfig::trigger_scope`]). Customer.io allows one per
    /// 10 s; the default keeps a second of margin for network jitter.
    pub trigger_spacing: Duration,
    /// Whether the spacing holds across the workspace (the default: Customer.io's docs do not
    /// say the limit is per broadcast) or per broadcast.
    pub trigger_scope: TriggerScope,
    /// How long a dispatcher holds a submission; one that has not recorded an outcome by then is
    /// taken to have died (and the submission becomes uncertain). Every request of the attempt
    /// must be able to start and end inside it ([`SendConfig::check_fence`]).
    pub claim_ttl: Duration,
    /// How long after the end of an attempt's window a submission not found in Customer.io (or
    /// a newsletter found unsent) is still given to show up before it is settled as not sent.
    pub reconcile_grace: Duration,
    /// Attempts (requests that may have reached Customer.io) before a submission that keeps
    /// not arriving is failed.
    pub max_attempts: i32,
    /// Largest difference tolerated between a process's clock and the database's (checked at
    /// start-up); two processes may then differ by twice it ([`SendConfig::fence_margin`]).
    pub max_clock_skew: Duration,
}

/// Room a request must have between the earliest and the latest start the fence allows.
const MIN_ATTEMPT_ROOM: Duration = Duration::from_secs(1);

impl SendConfig {
    /// What every fence that compares times of two processes allows: twice the skew each may
    /// have from the database.
    pub fn fence_margin(&self) -> Duration {
        self.max_clock_skew * 2
    }

    /// The claim must hold a whole request (`request_timeout`) plus the fence margin plus a
    /// second of room to wait for a turn in the rate limiter.
    pub fn check_fence(
        &self,
        request_timeout: Duration,
    ) -> Result<(), crate::settings::ConfigError> {
        let needed = request_timeout + self.fence_margin() + MIN_ATTEMPT_ROOM;
        if self.claim_ttl < needed {
            return Err(crate::settings::ConfigError::new(
                "SHARPSEND_SEND_CLAIM_TTL_SECS",
                format!(
                    "must be at least {} s: a request (CIO_TIMEOUT_SECS, {} s) must start and end \
                     inside its claim, with twice SHARPSEND_MAX_CLOCK_SKEW_MS ({} ms) to spare \
                     and a second of room",
                    needed.as_secs_f64().ceil(),
                    request_timeout.as_secs_f64(),
                    self.max_clock_skew.as_millis()
                ),
            ));
        }
        Ok(())
    }
}

impl Default for SendConfig {
    fn default() -> Self {
        Self {
            trigger_spacing: Duration::from_secs(11),
            trigger_scope: TriggerScope::Workspace,
            claim_ttl: Duration::from_secs(120),
            reconcile_grace: Duration::from_secs(60),
            max_attempts: 3,
            max_clock_skew: Duration::from_secs(2),
        }
    }
}

/// How the caller wants the assignment delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Broadcast {
        broadcast_id: i64,
    },
    /// `from_id` 0: the workspace's default sender. `subscription_topic_id` `None`: the
    /// service's `CIO_SUBSCRIPTION_TOPIC_ID`, if any.
    Newsletter {
        from_id: i64,
        subscription_topic_id: Option<i64>,
    },
}

/// One target segment's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Variation {
    pub segment_id: i64,
    /// Empty: the send's subject.
    pub subject: String,
    pub body: String,
    /// Extra liquid data (broadcasts only).
    pub data: Option<Map<String, Value>>,
}

/// A SendAssignment call.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub assignment_id: String,
    pub request_id: String,
    pub title: String,
    pub subject: String,
    pub segment_ids: Vec<i64>,
    pub variations: Vec<Variation>,
    pub delivery: Option<DeliveryMode>,
    /// What kind of content the assignment is (engagement scoring's `preferred_content_types`).
    pub content_types: Vec<String>,
    /// Caller identity (API key name).
    pub created_by: String,
}

/// A send with its submissions and (for single reads) its history.
#[derive(Debug, Clone, PartialEq)]
pub struct SendView {
    /// Keyset position of the send in listings (newest first).
    pub position: i64,
    /// The send's public id (`snd_…`).
    pub id: String,
    pub assignment_id: String,
    pub request_id: String,
    pub title: String,
    pub subject: String,
    pub delivery: Delivery,
    pub state: SendState,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub submissions: Vec<SubmissionView>,
    pub history: Vec<HistoryView>,
}

/// One target segment's part of a send.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmissionView {
    pub segment_id: i64,
    pub state: SendState,
    pub subject: String,
    /// The marker that finds it in Customer.io (trigger data / newsletter name).
    pub marker: String,
    pub attempts: i32,
    /// When a pending submission is due.
    pub next_attempt_at: DateTime<Utc>,
    pub cio_trigger_id: Option<i64>,
    pub cio_newsletter_id: Option<i64>,
    pub recipients_count: Option<i64>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// The first errors Customer.io reported for the processed trigger (at most
    /// [`MAX_TRIGGER_ERRORS_KEPT`]).
    pub trigger_errors: Vec<String>,
    /// How many errors it reported in all.
    pub trigger_error_count: i64,
}

/// One transition in a send's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryView {
    pub at: DateTime<Utc>,
    /// `None`: the send as a whole.
    pub segment_id: Option<i64>,
    pub from_state: Option<SendState>,
    pub to_state: SendState,
    pub actor: String,
    pub reason: String,
}

impl SendView {
    pub(crate) fn new(
        send: store::SendRecord,
        submissions: Vec<store::Submission>,
        history: Vec<store::HistoryEntry>,
    ) -> Self {
        Self {
            position: send.id,
            id: send.public_id,
            assignment_id: send.assignment_id,
            request_id: send.request_id,
            title: send.title,
            subject: send.subject,
            delivery: send.delivery,
            state: send.state,
            created_by: send.created_by,
            created_at: send.created_at,
            updated_at: send.updated_at,
            submissions: submissions
                .into_iter()
                .map(|s| SubmissionView {
                    segment_id: s.segment_id,
                    state: s.state,
                    subject: s.subject,
                    marker: s.marker,
                    attempts: s.attempts,
                    next_attempt_at: s.next_attempt_at,
                    cio_trigger_id: s.cio_trigger_id,
                    cio_newsletter_id: s.cio_newsletter_id,
                    recipients_count: s.recipients_count,
                    submitted_at: s.submitted_at,
                    completed_at: s.completed_at,
                    error: s.error,
                    trigger_error_count: s.trigger_errors.as_ref().map_or(0, |e| e.count),
                    trigger_errors: s.trigger_errors.map(|e| e.first).unwrap_or_default(),
                })
                .collect(),
            history: history
                .into_iter()
                .map(|h| HistoryView {
                    at: h.at,
                    segment_id: h.segment_id,
                    from_state: h.from_state,
                    to_state: h.to_state,
                    actor: h.actor,
                    reason: h.reason,
                })
                .collect(),
        }
    }

    /// Sum of the submissions' recipient counts, when all are known.
    pub fn recipients_count(&self) -> Option<i64> {
        self.submissions.iter().map(|s| s.recipients_count).sum()
    }
}

/// Which sends [`list_sends`] answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendFilter {
    pub assignment_id: Option<String>,
    pub state: Option<SendState>,
}

/// Trigger data keys the service sets itself.
pub const RESERVED_DATA_KEYS: [&str; 7] = [
    MARKER_FIELD,
    "assignment_id",
    "send_id",
    "title",
    "subject",
    "body",
    "segment_id",
];

/// The `data` of a broadcast trigger: the variation's data plus the content and the marker.
/// What a broadcast trigger's `data` carries: the variation's own data plus the content and the
/// marker under [`RESERVED_DATA_KEYS`].
struct TriggerData<'a> {
    extra: Option<&'a Map<String, Value>>,
    marker: &'a str,
    send_id: &'a str,
    assignment_id: &'a str,
    title: &'a str,
    subject: &'a str,
    body: &'a str,
    segment_id: i64,
}

impl TriggerData<'_> {
    fn build(&self) -> Map<String, Value> {
        let mut data = self.extra.cloned().unwrap_or_default();
        data.insert(MARKER_FIELD.into(), json!(self.marker));
        data.insert("send_id".into(), json!(self.send_id));
        data.insert("assignment_id".into(), json!(self.assignment_id));
        data.insert("title".into(), json!(self.title));
        data.insert("subject".into(), json!(self.subject));
        data.insert("body".into(), json!(self.body));
        data.insert("segment_id".into(), json!(self.segment_id));
        data
    }
}
