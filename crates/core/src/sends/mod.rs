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
//! - sending calls are never retried by the client; an answer that proves the request was not
//!   processed (429, 4xx, could not connect) settles it (`pending` again or `failed`); anything
//!   else that is not a success (timeout, dropped connection, 5xx) makes it `uncertain`, as
//!   does a dispatcher that died holding it ([`SendConfig::claim_ttl`]);
//! - [`reconcile`](fn@reconcile) looks for uncertain submissions in Customer.io by the marker
//!   they carry (the trigger `data` field [`MARKER_FIELD`], echoed by the trigger status; the
//!   newsletter name) and settles them: found → `submitted`; provably absent after
//!   [`SendConfig::reconcile_grace`] → not sent, queued again (at most
//!   [`SendConfig::max_attempts`] attempts, then `failed`); undecidable → left for an
//!   operator's [`resolve`].
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
mod reconcile;
mod request;

pub use dispatch::{DispatchReport, dispatch_due};
pub use reconcile::{ReconcileReport, SendMetricTargets, metric_targets, reconcile};
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
/// Most target segments of one send.
pub const MAX_TARGETS: usize = 20;
/// Customer.io's limit on a trigger's `data`, in bytes of JSON.
pub const MAX_TRIGGER_DATA_BYTES: usize = 50_000;
/// Largest newsletter body we send, in bytes.
pub const MAX_NEWSLETTER_BODY_BYTES: usize = 500_000;
/// Longest ResolveSend actor and reason, in characters.
pub const MAX_ACTOR_CHARS: usize = 200;
pub const MAX_REASON_CHARS: usize = 2_000;

/// How sends are dispatched and reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendConfig {
    /// Time between two triggers of one broadcast. Customer.io allows one per 10 s; the default
    /// keeps a second of margin for clock and network jitter.
    pub trigger_spacing: Duration,
    /// How long a dispatcher holds a submission; one that has not recorded an outcome by then is
    /// taken to have died (and the submission becomes uncertain). Longer than any request.
    pub claim_ttl: Duration,
    /// How long after an attempt a submission not found in Customer.io is still given to
    /// appear before it is settled as not sent.
    pub reconcile_grace: Duration,
    /// Attempts (requests that may have reached Customer.io) before a submission that keeps
    /// not arriving is failed.
    pub max_attempts: i32,
}

impl Default for SendConfig {
    fn default() -> Self {
        Self {
            trigger_spacing: Duration::from_secs(11),
            claim_ttl: Duration::from_secs(120),
            reconcile_grace: Duration::from_secs(60),
            max_attempts: 3,
        }
    }
}

/// How the caller wants the assignment delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Broadcast {
        broadcast_id: i64,
    },
    /// `from_id` 0: the workspace's default sender.
    Newsletter {
        from_id: i64,
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
const RESERVED_DATA_KEYS: [&str; 7] = [
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
