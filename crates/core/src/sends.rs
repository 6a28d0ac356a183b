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
//! - [`reconcile`] looks for uncertain submissions in Customer.io by the marker they carry (the
//!   trigger `data` field [`MARKER_FIELD`], echoed by the trigger status; the newsletter name)
//!   and settles them: found → `submitted`; provably absent after [`SendConfig::reconcile_grace`]
//!   → not sent, queued again (at most [`SendConfig::max_attempts`] attempts, then `failed`);
//!   undecidable → left for an operator's [`resolve`].
//!
//! The server dispatches a new send at once ([`send_assignment`]) and follows it in the
//! background while later submissions wait for their broadcast window; the scheduler's
//! `send-dispatch` and `send-reconcile` jobs are the safety net across restarts.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cio_client::{CioError, NewNewsletter, Recipients, Trigger};
use serde_json::{Map, Value, json};
use sharpsend_db::sends::{
    self as store, Claim, Created, Delivery, HistoryEntry, NewSend, NewSubmission, SendRecord,
    SendState, Submission, Transition, Window,
};

use crate::config::{ConfigError, Env, positive};
use crate::metrics::MetricsTarget;
use crate::segments::{self, TargetingWarning};
use crate::{AppContext, CoreError, FieldViolation};

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
/// How far before an attempt Customer.io's clock may put the trigger it created.
const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Who the service's own transitions are recorded as.
const RECONCILER: &str = "reconciler";

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

impl SendConfig {
    /// Defaults, overridden by `SHARPSEND_TRIGGER_SPACING_MS`, `SHARPSEND_SEND_CLAIM_TTL_SECS`,
    /// `SHARPSEND_SEND_RECONCILE_GRACE_SECS` and `SHARPSEND_SEND_MAX_ATTEMPTS`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        let positive = |variable: &'static str| positive(env, variable);
        if let Some(ms) = positive("SHARPSEND_TRIGGER_SPACING_MS")? {
            config.trigger_spacing = Duration::from_millis(ms);
        }
        if let Some(s) = positive("SHARPSEND_SEND_CLAIM_TTL_SECS")? {
            config.claim_ttl = Duration::from_secs(s);
        }
        if let Some(s) = positive("SHARPSEND_SEND_RECONCILE_GRACE_SECS")? {
            config.reconcile_grace = Duration::from_secs(s);
        }
        if let Some(n) = positive("SHARPSEND_SEND_MAX_ATTEMPTS")? {
            config.max_attempts = i32::try_from(n).unwrap_or(i32::MAX);
        }
        Ok(config)
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
    pub send: SendRecord,
    pub submissions: Vec<Submission>,
    pub history: Vec<HistoryEntry>,
}

impl SendView {
    /// Sum of the submissions' recipient counts, when all are known.
    pub fn recipients_count(&self) -> Option<i64> {
        self.submissions.iter().map(|s| s.recipients_count).sum()
    }
}

/// Records the send of an approved assignment (or finds the one already recorded under the same
/// key) and dispatches what is due. Returns the send and whether it was created by this call.
pub async fn send_assignment(
    ctx: &AppContext,
    request: SendRequest,
) -> Result<(SendView, bool), CoreError> {
    let delivery = validate(&request)?;
    let fingerprint = fingerprint(&request, delivery);
    let ws = ctx.workspace_id();
    if let Some(existing) =
        store::get_by_key(&ctx.db, ws, &request.assignment_id, &request.request_id).await?
    {
        return answer_existing(ctx, existing, &fingerprint).await;
    }

    check_targeting(ctx, &request.segment_ids).await?;
    if let DeliveryMode::Broadcast { broadcast_id } = delivery {
        check_broadcast(ctx, broadcast_id).await?;
    }

    let public_id = format!("snd_{}", ulid::Ulid::new());
    let new = NewSend {
        public_id: public_id.clone(),
        assignment_id: request.assignment_id.clone(),
        request_id: request.request_id.clone(),
        title: request.title.clone(),
        subject: request.subject.clone(),
        delivery: match delivery {
            DeliveryMode::Broadcast { broadcast_id } => Delivery::Broadcast { broadcast_id },
            DeliveryMode::Newsletter { from_id } => Delivery::Newsletter {
                from_id: (from_id > 0).then_some(from_id),
            },
        },
        request: fingerprint.clone(),
        created_by: request.created_by.clone(),
        submissions: submissions_of(&request, &public_id),
    };
    match store::create(&ctx.db, ws, &new, Utc::now()).await? {
        Created::New(send) => {
            dispatch_now(ctx, send.id).await?;
            Ok((view(ctx, send, true).await?, true))
        }
        Created::Existing(existing) => answer_existing(ctx, existing, &fingerprint).await,
    }
}

async fn answer_existing(
    ctx: &AppContext,
    existing: SendRecord,
    fingerprint: &Value,
) -> Result<(SendView, bool), CoreError> {
    if existing.request != *fingerprint {
        return Err(CoreError::AlreadyExists(format!(
            "assignment {} was already sent{} with different content (send {}); give a new request_id to send it again",
            existing.assignment_id,
            if existing.request_id.is_empty() {
                String::new()
            } else {
                format!(" under request_id {}", existing.request_id)
            },
            existing.public_id
        )));
    }
    Ok((view(ctx, existing, true).await?, false))
}

/// Field-by-field validation; answers the delivery mode.
fn validate(r: &SendRequest) -> Result<DeliveryMode, CoreError> {
    let mut v = Vec::new();
    let mut text = |field: &str, value: &str, required: bool, max: usize| {
        if required && value.trim().is_empty() {
            v.push(FieldViolation::new(field, "is required"));
        } else if value.chars().count() > max {
            v.push(FieldViolation::new(
                field,
                format!("at most {max} characters, got {}", value.chars().count()),
            ));
        } else if value.chars().any(char::is_control) {
            v.push(FieldViolation::new(
                field,
                "must not contain control characters",
            ));
        }
    };
    text("assignment_id", &r.assignment_id, true, MAX_ID_CHARS);
    text("request_id", &r.request_id, false, MAX_ID_CHARS);
    text("title", &r.title, true, MAX_TITLE_CHARS);
    let every_variation_has_subject =
        !r.variations.is_empty() && r.variations.iter().all(|x| !x.subject.trim().is_empty());
    text(
        "subject",
        &r.subject,
        !every_variation_has_subject,
        MAX_SUBJECT_CHARS,
    );

    if r.segment_ids.is_empty() {
        v.push(FieldViolation::new(
            "segment_ids",
            "must list at least one target segment",
        ));
    } else if r.segment_ids.len() > MAX_TARGETS {
        v.push(FieldViolation::new(
            "segment_ids",
            format!(
                "at most {MAX_TARGETS} target segments, got {}",
                r.segment_ids.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, id) in r.segment_ids.iter().enumerate() {
        if *id <= 0 {
            v.push(FieldViolation::new(
                format!("segment_ids[{i}]"),
                "must be a positive Customer.io segment id",
            ));
        } else if !seen.insert(*id) {
            v.push(FieldViolation::new(
                format!("segment_ids[{i}]"),
                format!("segment {id} is listed twice"),
            ));
        }
    }

    let delivery = match r.delivery {
        None => {
            v.push(FieldViolation::new(
                "delivery",
                "choose `broadcast` or `newsletter`",
            ));
            None
        }
        Some(DeliveryMode::Broadcast { broadcast_id }) if broadcast_id <= 0 => {
            v.push(FieldViolation::new(
                "broadcast.broadcast_id",
                "must be a positive Customer.io broadcast id",
            ));
            None
        }
        Some(DeliveryMode::Newsletter { from_id }) if from_id < 0 => {
            v.push(FieldViolation::new(
                "newsletter.from_id",
                "must not be negative",
            ));
            None
        }
        Some(mode) => Some(mode),
    };

    let mut covered = HashSet::new();
    for (i, x) in r.variations.iter().enumerate() {
        let at = |f: &str| format!("variations[{i}].{f}");
        if !seen.contains(&x.segment_id) {
            v.push(FieldViolation::new(
                at("segment_id"),
                format!("segment {} is not one of segment_ids", x.segment_id),
            ));
        } else if !covered.insert(x.segment_id) {
            v.push(FieldViolation::new(
                at("segment_id"),
                format!("segment {} has more than one variation", x.segment_id),
            ));
        }
        if x.body.trim().is_empty() {
            v.push(FieldViolation::new(
                at("body"),
                "is required (the content sent to this segment)",
            ));
        }
        if x.subject.chars().count() > MAX_SUBJECT_CHARS {
            v.push(FieldViolation::new(
                at("subject"),
                format!(
                    "at most {MAX_SUBJECT_CHARS} characters, got {}",
                    x.subject.chars().count()
                ),
            ));
        } else if x.subject.chars().any(char::is_control) {
            v.push(FieldViolation::new(
                at("subject"),
                "must not contain control characters",
            ));
        }
        match delivery {
            Some(DeliveryMode::Newsletter { .. }) => {
                if x.data.as_ref().is_some_and(|d| !d.is_empty()) {
                    v.push(FieldViolation::new(at("data"), "liquid data is for broadcast delivery; a newsletter carries its content itself"));
                }
                if x.body.len() > MAX_NEWSLETTER_BODY_BYTES {
                    v.push(FieldViolation::new(
                        at("body"),
                        format!(
                            "at most {MAX_NEWSLETTER_BODY_BYTES} bytes, got {}",
                            x.body.len()
                        ),
                    ));
                }
            }
            Some(DeliveryMode::Broadcast { .. }) => {
                if let Some(key) = x
                    .data
                    .as_ref()
                    .and_then(|d| d.keys().find(|k| RESERVED_DATA_KEYS.contains(&k.as_str())))
                {
                    v.push(FieldViolation::new(
                        format!("{}.{key}", at("data")),
                        "is set by the service",
                    ));
                }
                let size = crate::profiles::json_len(&Value::Object(trigger_data(
                    r,
                    x,
                    "snd_00000000000000000000000000",
                    "ss:snd_00000000000000000000000000:00",
                )));
                if size > MAX_TRIGGER_DATA_BYTES {
                    v.push(FieldViolation::new(
                        at("body"),
                        format!("the trigger data would be {size} bytes; Customer.io accepts at most {MAX_TRIGGER_DATA_BYTES}"),
                    ));
                }
            }
            None => {}
        }
    }
    for (i, id) in r.segment_ids.iter().enumerate() {
        let first = r.segment_ids.iter().position(|other| other == id) == Some(i);
        if *id > 0 && first && !covered.contains(id) {
            v.push(FieldViolation::new(
                format!("segment_ids[{i}]"),
                format!("segment {id} has no content variation"),
            ));
        }
    }
    match delivery {
        Some(mode) if v.is_empty() => Ok(mode),
        _ => Err(CoreError::InvalidArgument(v)),
    }
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

/// The subject a variation goes out with.
fn subject_of<'a>(r: &'a SendRequest, x: &'a Variation) -> &'a str {
    if x.subject.trim().is_empty() {
        &r.subject
    } else {
        &x.subject
    }
}

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

/// The trigger data a variation will go out with (the ids are placeholders of the final length).
fn trigger_data(r: &SendRequest, x: &Variation, send_id: &str, marker: &str) -> Map<String, Value> {
    TriggerData {
        extra: x.data.as_ref(),
        marker,
        send_id,
        assignment_id: &r.assignment_id,
        title: &r.title,
        subject: subject_of(r, x),
        body: &x.body,
        segment_id: x.segment_id,
    }
    .build()
}

/// The normalised request: what must match when the key is reused.
fn fingerprint(r: &SendRequest, delivery: DeliveryMode) -> Value {
    let variations: Vec<Value> = r
        .segment_ids
        .iter()
        .filter_map(|id| r.variations.iter().find(|x| x.segment_id == *id))
        .map(|x| json!({"segment_id": x.segment_id, "subject": subject_of(r, x), "body": x.body, "data": x.data}))
        .collect();
    let delivery = match delivery {
        DeliveryMode::Broadcast { broadcast_id } => json!({"broadcast_id": broadcast_id}),
        DeliveryMode::Newsletter { from_id } => json!({"newsletter_from_id": from_id}),
    };
    json!({"title": r.title, "subject": r.subject, "segment_ids": r.segment_ids, "variations": variations, "delivery": delivery})
}

/// One submission per target, in target order; each one's audience excludes earlier targets.
fn submissions_of(r: &SendRequest, public_id: &str) -> Vec<NewSubmission> {
    r.segment_ids
        .iter()
        .enumerate()
        .filter_map(|(position, id)| {
            let x = r.variations.iter().find(|x| x.segment_id == *id)?;
            let marker = format!("ss:{public_id}:{position}");
            let data = match &x.data {
                Some(d) if !d.is_empty() => Some(Value::Object(d.clone())),
                _ => None,
            };
            Some(NewSubmission {
                segment_id: *id,
                subject: subject_of(r, x).to_string(),
                body: x.body.clone(),
                data,
                recipients: exclusive_audience(*id, &r.segment_ids[..position]),
                marker,
            })
        })
        .collect()
}

/// `segment` minus everyone in `earlier`.
pub fn exclusive_audience(segment: i64, earlier: &[i64]) -> Value {
    let this = json!({"segment": {"id": segment}});
    match earlier {
        [] => this,
        [one] => json!({"and": [this, {"not": {"segment": {"id": one}}}]}),
        many => {
            let any: Vec<Value> = many
                .iter()
                .map(|id| json!({"segment": {"id": id}}))
                .collect();
            json!({"and": [this, {"not": {"or": any}}]})
        }
    }
}

/// Unknown, removed or empty target segments refuse the send, each with its reason.
async fn check_targeting(ctx: &AppContext, segment_ids: &[i64]) -> Result<(), CoreError> {
    let report = segments::validate_targeting(
        ctx,
        segment_ids,
        segments::DEFAULT_MAX_COUNT_AGE,
        Utc::now(),
    )
    .await?;
    let mut refusals = Vec::new();
    for (i, t) in report.segments.iter().enumerate() {
        for warning in t.warnings.iter().filter(|w| w.blocks_sending()) {
            let why = match warning {
                TargetingWarning::UnknownSegment => {
                    "is not a known Customer.io segment (sync segments if it is new)"
                }
                TargetingWarning::RemovedSegment => "was removed in Customer.io",
                TargetingWarning::EmptySegment => "has no members",
                _ => continue,
            };
            refusals.push(FieldViolation::new(
                format!("segment_ids[{i}]"),
                format!("segment {} {why}", t.segment_id),
            ));
        }
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(CoreError::FailedPrecondition(refusals))
    }
}

/// The broadcast must exist in Customer.io and be active.
async fn check_broadcast(ctx: &AppContext, broadcast_id: i64) -> Result<(), CoreError> {
    match ctx.cio.get_broadcast(broadcast_id).await {
        Ok(b) if b.active == Some(false) => {
            Err(CoreError::FailedPrecondition(vec![FieldViolation::new(
                "broadcast.broadcast_id",
                format!(
                    "broadcast {broadcast_id} is not active in Customer.io (state {}); it cannot be triggered",
                    b.state.as_deref().unwrap_or("unknown")
                ),
            )]))
        }
        Ok(_) => Ok(()),
        Err(CioError::NotFound { .. }) => Err(CoreError::NotFound {
            what: "broadcast",
            id: broadcast_id.to_string(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Builds the view of `send`; a single read (`with_history`) re-reads the send itself too, so
/// that its aggregate state includes what was dispatched since `send` was read.
async fn view(
    ctx: &AppContext,
    send: SendRecord,
    with_history: bool,
) -> Result<SendView, CoreError> {
    if !with_history {
        let submissions = store::submissions(&ctx.db, send.id).await?;
        return Ok(SendView {
            send,
            submissions,
            history: Vec::new(),
        });
    }
    let send = store::get_by_id(&ctx.db, send.id).await?.unwrap_or(send);
    let submissions = store::submissions(&ctx.db, send.id).await?;
    let history = store::history(&ctx.db, send.id).await?;
    Ok(SendView {
        send,
        submissions,
        history,
    })
}

/// How to find a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendKey {
    Id(String),
    Assignment {
        assignment_id: String,
        request_id: String,
    },
}

/// One send with its submissions and history.
pub async fn get_send(ctx: &AppContext, key: &SendKey) -> Result<SendView, CoreError> {
    let ws = ctx.workspace_id();
    let (found, shown) = match key {
        SendKey::Id(id) => (store::get(&ctx.db, ws, id).await?, id.clone()),
        SendKey::Assignment {
            assignment_id,
            request_id,
        } => (
            store::get_by_key(&ctx.db, ws, assignment_id, request_id).await?,
            format!("for assignment {assignment_id} (request id `{request_id}`)"),
        ),
    };
    let send = found.ok_or(CoreError::NotFound {
        what: "send",
        id: shown,
    })?;
    view(ctx, send, true).await
}

/// Sends matching `filter`, newest first, with submissions but without history.
pub async fn list_sends(
    ctx: &AppContext,
    filter: &store::ListFilter,
    limit: u64,
) -> Result<Vec<SendView>, CoreError> {
    let sends = store::list(&ctx.db, ctx.workspace_id(), filter, limit).await?;
    let mut views = Vec::with_capacity(sends.len());
    for send in sends {
        views.push(view(ctx, send, false).await?);
    }
    Ok(views)
}

/// An operator's decision on an uncertain send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// It went out: settle as submitted.
    MarkSent,
    /// It did not: allow one more attempt.
    AllowRetry,
}

/// Applies an operator's decision to the uncertain submissions of a send (all, or the one of
/// `segment_id`), recorded with `actor` and `reason`.
pub async fn resolve(
    ctx: &AppContext,
    send_id: &str,
    segment_id: Option<i64>,
    resolution: Option<Resolution>,
    actor: &str,
    reason: &str,
) -> Result<SendView, CoreError> {
    let mut v = Vec::new();
    if send_id.trim().is_empty() {
        v.push(FieldViolation::new("send_id", "is required"));
    }
    if resolution.is_none() {
        v.push(FieldViolation::new(
            "resolution",
            "choose RESOLUTION_MARK_SENT or RESOLUTION_ALLOW_RETRY",
        ));
    }
    for (field, value, max) in [
        ("actor", actor, MAX_ACTOR_CHARS),
        ("reason", reason, MAX_REASON_CHARS),
    ] {
        if value.trim().is_empty() {
            v.push(FieldViolation::new(
                field,
                "is required: who decides and why are recorded",
            ));
        } else if value.chars().count() > max {
            v.push(FieldViolation::new(
                field,
                format!("at most {max} characters"),
            ));
        }
    }
    if segment_id.is_some_and(|s| s < 0) {
        v.push(FieldViolation::new("segment_id", "must not be negative"));
    }
    let Some(resolution) = resolution.filter(|_| v.is_empty()) else {
        return Err(CoreError::InvalidArgument(v));
    };
    let send = store::get(&ctx.db, ctx.workspace_id(), send_id)
        .await?
        .ok_or_else(|| CoreError::NotFound {
            what: "send",
            id: send_id.to_string(),
        })?;
    let submissions = store::submissions(&ctx.db, send.id).await?;
    if let Some(segment) = segment_id
        && !submissions.iter().any(|s| s.segment_id == segment)
    {
        return Err(CoreError::invalid(
            "segment_id",
            format!("segment {segment} is not a target of send {send_id}"),
        ));
    }
    let chosen: Vec<&Submission> = submissions
        .iter()
        .filter(|s| {
            s.state == SendState::Uncertain && segment_id.is_none_or(|seg| seg == s.segment_id)
        })
        .collect();
    if chosen.is_empty() {
        let states: Vec<String> = submissions
            .iter()
            .map(|s| format!("segment {}: {}", s.segment_id, s.state))
            .collect();
        return Err(CoreError::FailedPrecondition(vec![FieldViolation::new(
            "send_id",
            format!(
                "send {send_id} has nothing uncertain to resolve ({})",
                states.join(", ")
            ),
        )]));
    }
    let now = Utc::now();
    for s in chosen {
        let t = match resolution {
            Resolution::MarkSent => Transition::new(
                SendState::Uncertain,
                SendState::Submitted,
                actor,
                format!("marked as sent: {reason}"),
            ),
            Resolution::AllowRetry => Transition {
                next_attempt_at: Some(now),
                ..Transition::new(
                    SendState::Uncertain,
                    SendState::Pending,
                    actor,
                    format!("one more attempt allowed: {reason}"),
                )
            },
        };
        store::transition(&ctx.db, s.id, &t, now).await?;
    }
    if resolution == Resolution::AllowRetry {
        dispatch_now(ctx, send.id).await?;
    }
    let send = store::get_by_id(&ctx.db, send.id).await?.unwrap_or(send);
    view(ctx, send, true).await
}

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
        let due = store::due(&ctx.db, ctx.workspace_id(), send_id, Utc::now(), 50).await?;
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
async fn dispatch_now(ctx: &AppContext, send_id: i64) -> Result<DispatchReport, CoreError> {
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
                    tracing::warn!(send_id, error = %crate::jobs::error_chain(&e), "following a send failed; the send-dispatch job takes over");
                    return;
                }
            };
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            if tokio::time::Instant::now() + wait > until {
                return;
            }
            tokio::time::sleep(wait).await;
            if let Err(e) = dispatch_send(&ctx, send_id).await {
                tracing::warn!(send_id, error = %crate::jobs::error_chain(&e), "dispatch failed; the send-dispatch job takes over");
                return;
            }
        }
    });
}

/// Claims `submission` and sends it once; records the outcome.
async fn submit(
    ctx: &AppContext,
    send: &SendRecord,
    submission: &Submission,
    holder: &str,
    report: &mut DispatchReport,
) -> Result<(), CoreError> {
    let window = match send.delivery {
        Delivery::Broadcast { broadcast_id } => Some(Window {
            broadcast_id,
            spacing: ctx.sends.trigger_spacing,
        }),
        Delivery::Newsletter { .. } => None,
    };
    let claimed = match store::claim(
        &ctx.db,
        ctx.workspace_id(),
        submission.id,
        holder,
        ctx.sends.claim_ttl,
        window,
        Utc::now(),
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
    let outcome = match send.delivery {
        Delivery::Broadcast { broadcast_id } => {
            let trigger = Trigger {
                recipients: Recipients::Filter(claimed.recipients.clone()),
                data: trigger_data_of(send, &claimed),
            };
            ctx.cio
                .trigger_broadcast(broadcast_id, &trigger)
                .await
                .map(Accepted::Trigger)
        }
        Delivery::Newsletter { from_id } => {
            send_newsletter(ctx, send, &claimed, holder, from_id).await
        }
    };
    let now = Utc::now();
    if let Some(window) = window {
        // The window was taken before the request; the request may have left later (waiting
        // for the App API rate limit), and Customer.io counts from its arrival.
        store::hold_window(
            &ctx.db,
            ctx.workspace_id(),
            window.broadcast_id,
            now + chrono::TimeDelta::from_std(window.spacing).unwrap_or_default(),
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
        Err(e) => settle_failure(ctx, send, &e, holder, now, report).await?,
    };
    let t = t.held_by(holder);
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
async fn watch_metrics(
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
        tracing::warn!(send = %send.public_id, error = %crate::jobs::error_chain(&e), "could not schedule metrics polling; the campaign sync will");
    }
}

enum Accepted {
    Trigger(i64),
    Newsletter(i64),
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

/// The newsletter's name: the title and the marker that finds it again.
fn newsletter_name(send: &SendRecord, s: &Submission) -> String {
    format!("{} [{}]", send.title, s.marker)
}

/// Creates the submission's newsletter (unless an earlier attempt did) and sends it.
async fn send_newsletter(
    ctx: &AppContext,
    send: &SendRecord,
    s: &Submission,
    holder: &str,
    from_id: Option<i64>,
) -> Result<Accepted, CioError> {
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
            let created = ctx.cio.create_newsletter(&new).await?;
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
            if let Err(e) = store::transition(&ctx.db, s.id, &t, Utc::now()).await {
                // The id is found again by the marker in its name.
                tracing::warn!(submission = s.id, error = %crate::jobs::error_chain(&e), "could not record the created newsletter");
            }
            created.id
        }
    };
    ctx.cio.send_newsletter(newsletter_id).await?;
    Ok(Accepted::Newsletter(newsletter_id))
}

/// The transition for a request that did not succeed.
async fn settle_failure(
    ctx: &AppContext,
    send: &SendRecord,
    error: &CioError,
    holder: &str,
    now: DateTime<Utc>,
    report: &mut DispatchReport,
) -> Result<Transition, CoreError> {
    let text = crate::jobs::error_chain(error);
    let requeue = |at: DateTime<Utc>, why: String| Transition {
        next_attempt_at: Some(at),
        uncount_attempt: true,
        ..Transition::new(SendState::Submitting, SendState::Pending, holder, why)
            .error(text.clone())
    };
    Ok(match error {
        CioError::RateLimited { retry_after, .. } => {
            report.requeued += 1;
            let wait = retry_after
                .unwrap_or(ctx.sends.trigger_spacing)
                .max(Duration::from_millis(100));
            let at =
                now + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::seconds(10));
            if let Delivery::Broadcast { broadcast_id } = send.delivery {
                store::hold_window(&ctx.db, ctx.workspace_id(), broadcast_id, at).await?;
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
    let expired = store::expire_claims(&ctx.db, ws, Utc::now()).await?;
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
                tracing::warn!(submission = s.id, error = %crate::jobs::error_chain(&e), "could not look up an uncertain submission");
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
                tracing::warn!(submission = s.id, error = %crate::jobs::error_chain(&e), "could not check a submitted submission");
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
    let now = Utc::now();
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
        Lookup::Newsletter { id, sent: false } => Transition {
            cio_newsletter_id: Some(id),
            next_attempt_at: Some(now),
            ..Transition::new(
                SendState::Uncertain,
                SendState::Pending,
                RECONCILER,
                format!("found newsletter {id}, not sent yet: queued to send it"),
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
            let grace = chrono::TimeDelta::from_std(ctx.sends.reconcile_grace)
                .unwrap_or(chrono::TimeDelta::seconds(60));
            if now - started < grace {
                return Ok(Settled::Left);
            }
            if s.attempts >= ctx.sends.max_attempts {
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
    let (done, recipients_count, what) =
        match (send.delivery, s.cio_trigger_id, s.cio_newsletter_id) {
            (Delivery::Broadcast { broadcast_id }, Some(trigger_id), _) => {
                let status = ctx.cio.trigger_status(broadcast_id, trigger_id).await?;
                (
                    status.processed_at.is_some(),
                    status.recipients_count,
                    format!("trigger {trigger_id} processed"),
                )
            }
            (Delivery::Newsletter { .. }, _, Some(newsletter_id)) => {
                let n = ctx.cio.get_newsletter(newsletter_id).await?;
                (
                    n.sent_at.is_some(),
                    None,
                    format!("newsletter {newsletter_id} sent"),
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
        ..Transition::new(SendState::Submitted, SendState::Completed, RECONCILER, what)
    };
    Ok(store::transition(&ctx.db, s.id, &t, Utc::now()).await?)
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
    Ok(match view.send.delivery {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> SendRequest {
        SendRequest {
            assignment_id: "asg-1".into(),
            request_id: String::new(),
            title: "Q4 Crypto Outlook".into(),
            subject: "Your Q4 outlook".into(),
            segment_ids: vec![3, 5],
            variations: vec![
                Variation {
                    segment_id: 3,
                    subject: String::new(),
                    body: "<p>growth</p>".into(),
                    data: None,
                },
                Variation {
                    segment_id: 5,
                    subject: "For crypto fans".into(),
                    body: "<p>crypto</p>".into(),
                    data: None,
                },
            ],
            delivery: Some(DeliveryMode::Broadcast { broadcast_id: 3 }),
            created_by: "e2e".into(),
        }
    }

    fn fields(r: &SendRequest) -> Vec<String> {
        match validate(r) {
            Err(CoreError::InvalidArgument(v)) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_passes() {
        assert_eq!(
            validate(&request()).unwrap(),
            DeliveryMode::Broadcast { broadcast_id: 3 }
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = request();
        r.variations[1].body = "  ".into();
        assert_eq!(fields(&r), ["variations[1].body"]);
        let mut r = request();
        r.subject = "x".repeat(MAX_SUBJECT_CHARS + 1);
        assert_eq!(fields(&r), ["subject"]);
        let mut r = request();
        r.variations[0].subject = "y".repeat(MAX_SUBJECT_CHARS + 1);
        assert_eq!(fields(&r), ["variations[0].subject"]);
        let mut r = request();
        r.segment_ids = vec![3, 3];
        r.variations.truncate(1);
        assert_eq!(fields(&r), ["segment_ids[1]"]);
        let mut r = request();
        r.variations.pop();
        assert_eq!(fields(&r), ["segment_ids[1]"]);
        let mut r = request();
        r.variations[1].segment_id = 9;
        assert_eq!(fields(&r), ["variations[1].segment_id", "segment_ids[1]"]);
        let mut r = request();
        r.delivery = None;
        assert_eq!(fields(&r), ["delivery"]);
        let mut r = request();
        r.delivery = Some(DeliveryMode::Broadcast { broadcast_id: 0 });
        assert_eq!(fields(&r), ["broadcast.broadcast_id"]);
        let mut r = request();
        r.assignment_id = String::new();
        r.title = String::new();
        assert_eq!(fields(&r), ["assignment_id", "title"]);
        let mut r = request();
        r.segment_ids.clear();
        r.variations.clear();
        assert_eq!(fields(&r), ["segment_ids"]);
    }

    #[test]
    fn subject_may_come_from_every_variation() {
        let mut r = request();
        r.subject = String::new();
        assert_eq!(fields(&r), ["subject"]);
        r.variations[0].subject = "Growth".into();
        assert!(validate(&r).is_ok());
    }

    #[test]
    fn trigger_data_is_bounded_and_reserved_keys_refused() {
        let mut r = request();
        r.variations[0].body = "z".repeat(MAX_TRIGGER_DATA_BYTES);
        assert_eq!(fields(&r), ["variations[0].body"]);
        let mut r = request();
        r.variations[0].data = Some(
            json!({"sharpsend_submission": "x", "cta": "Read"})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(fields(&r), ["variations[0].data.sharpsend_submission"]);
        let mut r = request();
        r.delivery = Some(DeliveryMode::Newsletter { from_id: 0 });
        r.variations[0].data = Some(json!({"cta": "Read"}).as_object().cloned().unwrap());
        assert_eq!(fields(&r), ["variations[0].data"]);
        r.variations[0].data = None;
        r.variations[0].body = "z".repeat(MAX_TRIGGER_DATA_BYTES);
        assert!(
            validate(&r).is_ok(),
            "newsletters are not bound by the trigger data limit"
        );
    }

    #[test]
    fn audiences_exclude_earlier_targets() {
        assert_eq!(exclusive_audience(3, &[]), json!({"segment": {"id": 3}}));
        assert_eq!(
            exclusive_audience(5, &[3]),
            json!({"and": [{"segment": {"id": 5}}, {"not": {"segment": {"id": 3}}}]})
        );
        assert_eq!(
            exclusive_audience(7, &[3, 5]),
            json!({"and": [{"segment": {"id": 7}}, {"not": {"or": [{"segment": {"id": 3}}, {"segment": {"id": 5}}]}}]})
        );
        let subs = submissions_of(&request(), "snd_X");
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[1].recipients, exclusive_audience(5, &[3]));
        assert_eq!(
            (subs[0].marker.as_str(), subs[1].subject.as_str()),
            ("ss:snd_X:0", "For crypto fans")
        );
        assert_eq!(subs[0].subject, "Your Q4 outlook");
    }

    #[test]
    fn the_fingerprint_ignores_who_asked_but_not_the_content() {
        let a = request();
        let mut b = request();
        b.created_by = "other".into();
        let mode = validate(&a).unwrap();
        assert_eq!(fingerprint(&a, mode), fingerprint(&b, mode));
        b.variations[0].body = "<p>changed</p>".into();
        assert_ne!(fingerprint(&a, mode), fingerprint(&b, mode));
    }
}
