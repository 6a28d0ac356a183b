//! Requests: validating and recording a send (with its fingerprint and its submissions), reading
//! sends, and an operator's resolution of uncertain ones.

use std::{collections::HashSet, sync::Arc};

use cio_client::CioError;
use serde_json::{Map, Value, json};
use sharpsend_db::sends::{
    self as store, Created, Delivery, NewSend, NewSubmission, SendRecord, SendState, Submission,
    Transition,
};

use super::dispatch::dispatch_now;
use super::{
    DeliveryMode, MAX_ACTOR_CHARS, MAX_CONTENT_TYPE_CHARS, MAX_CONTENT_TYPES, MAX_ID_CHARS,
    MAX_NEWSLETTER_BODY_BYTES, MAX_REASON_CHARS, MAX_SUBJECT_CHARS, MAX_TARGETS, MAX_TITLE_CHARS,
    MAX_TRIGGER_DATA_BYTES, RESERVED_DATA_KEYS, SendFilter, SendRequest, SendView, TriggerData,
    Variation,
};
use crate::error::reasons;
use crate::paging::Page;
use crate::segments;
use crate::{AppContext, CoreError, FieldViolation};

/// Records the send of an approved assignment (or finds the one already recorded under the same
/// key) and dispatches what is due. Returns the send and whether it was created by this call.
pub async fn send_assignment(
    ctx: &AppContext,
    request: SendRequest,
) -> Result<(SendView, bool), CoreError> {
    match prepare_send(ctx, &request).await? {
        Prepared::Answered(answer) => Ok(*answer),
        Prepared::New(new) => {
            let created = store::create(&ctx.db, ctx.workspace_id(), &new, ctx.now()).await?;
            finish_send(ctx, created, &new).await
        }
    }
}

/// A validated send request: already answered (its key was recorded), or ready to record.
pub(crate) enum Prepared {
    Answered(Box<(SendView, bool)>),
    New(Box<NewSend>),
}

/// Validates `request` and checks its targets; answers the send already recorded under its
/// key, or what to record ([`finish_send`] completes it once recorded).
pub(crate) async fn prepare_send(
    ctx: &AppContext,
    request: &SendRequest,
) -> Result<Prepared, CoreError> {
    let delivery = validate(request)?;
    let fingerprint = fingerprint(request, delivery);
    let ws = ctx.workspace_id();
    if let Some(existing) =
        store::get_by_key(&ctx.db, ws, &request.assignment_id, &request.request_id).await?
    {
        return Ok(Prepared::Answered(Box::new(
            answer_existing(ctx, existing, &fingerprint).await?,
        )));
    }

    check_targeting(ctx, &request.segment_ids).await?;
    if let DeliveryMode::Broadcast { broadcast_id } = delivery {
        check_broadcast(ctx, broadcast_id).await?;
    }

    let public_id = format!("snd_{}", ulid::Ulid::new());
    Ok(Prepared::New(Box::new(NewSend {
        public_id: public_id.clone(),
        assignment_id: request.assignment_id.clone(),
        request_id: request.request_id.clone(),
        title: request.title.clone(),
        subject: request.subject.clone(),
        delivery: match delivery {
            DeliveryMode::Broadcast { broadcast_id } => Delivery::Broadcast { broadcast_id },
            DeliveryMode::Newsletter {
                from_id,
                subscription_topic_id,
            } => Delivery::Newsletter {
                from_id: (from_id > 0).then_some(from_id),
                subscription_topic_id,
            },
        },
        request: fingerprint,
        created_by: request.created_by.clone(),
        submissions: submissions_of(request, &public_id),
    })))
}

/// After `new` was recorded (or its key found taken): dispatches a new send at once; a send
/// found under the key is answered as [`send_assignment`] answers it.
pub(crate) async fn finish_send(
    ctx: &AppContext,
    created: Created,
    new: &NewSend,
) -> Result<(SendView, bool), CoreError> {
    match created {
        Created::New(send) => {
            dispatch_now(ctx, send.id).await?;
            Ok((view(ctx, send, true).await?, true))
        }
        Created::Existing(existing) => answer_existing(ctx, existing, &new.request).await,
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
    for (i, kind) in r.content_types.iter().enumerate() {
        text(
            &format!("content_types[{i}]"),
            kind,
            true,
            MAX_CONTENT_TYPE_CHARS,
        );
    }
    let every_variation_has_subject =
        !r.variations.is_empty() && r.variations.iter().all(|x| !x.subject.trim().is_empty());
    text(
        "subject",
        &r.subject,
        !every_variation_has_subject,
        MAX_SUBJECT_CHARS,
    );

    if r.content_types.len() > MAX_CONTENT_TYPES {
        v.push(FieldViolation::new(
            "content_types",
            format!("at most {MAX_CONTENT_TYPES}, got {}", r.content_types.len()),
        ));
    }
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
        Some(DeliveryMode::Newsletter { from_id, .. }) if from_id < 0 => {
            v.push(FieldViolation::new(
                "newsletter.from_id",
                "must not be negative",
            ));
            None
        }
        Some(DeliveryMode::Newsletter {
            subscription_topic_id: Some(topic),
            ..
        }) if topic <= 0 => {
            v.push(FieldViolation::new(
                "newsletter.subscription_topic_id",
                "must be a positive Customer.io subscription topic id (or left out)",
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

/// The subject a variation goes out with.
fn subject_of<'a>(r: &'a SendRequest, x: &'a Variation) -> &'a str {
    if x.subject.trim().is_empty() {
        &r.subject
    } else {
        &x.subject
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
        DeliveryMode::Newsletter {
            from_id,
            subscription_topic_id: None,
        } => json!({"newsletter_from_id": from_id}),
        DeliveryMode::Newsletter {
            from_id,
            subscription_topic_id: Some(topic),
        } => json!({"newsletter_from_id": from_id, "subscription_topic_id": topic}),
    };
    let mut normalised = json!({"title": r.title, "subject": r.subject, "segment_ids": r.segment_ids, "variations": variations, "delivery": delivery});
    // Only when given, so sends recorded before the field existed keep their fingerprint.
    if !r.content_types.is_empty()
        && let Some(map) = normalised.as_object_mut()
    {
        map.insert("content_types".into(), json!(r.content_types));
    }
    normalised
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
    let report =
        segments::validate_targeting(ctx, segment_ids, segments::DEFAULT_MAX_COUNT_AGE, ctx.now())
            .await?;
    report.refuse_unsendable("segment_ids")
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
            )
            .because(reasons::BROADCAST_INACTIVE)]))
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
        return Ok(SendView::new(send, submissions, Vec::new()));
    }
    let send = store::get_by_id(&ctx.db, send.id).await?.unwrap_or(send);
    let submissions = store::submissions(&ctx.db, send.id).await?;
    let history = store::history(&ctx.db, send.id).await?;
    Ok(SendView::new(send, submissions, history))
}

/// How to find a send.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SendKey {
    Id(String),
    Assignment {
        assignment_id: String,
        request_id: String,
    },
}

/// One send with its submissions and history.
pub async fn get_send(ctx: &AppContext, key: &SendKey) -> Result<SendView, CoreError> {
    ctx.read_cache
        .send(&ctx.db, ctx.workspace_id(), key.clone(), || {
            load_send(ctx, key)
        })
        .await
        .map(Arc::unwrap_or_clone)
}

async fn load_send(ctx: &AppContext, key: &SendKey) -> Result<SendView, CoreError> {
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

/// One page of sends matching `filter`, newest first (before the position `before`), with
/// submissions but without history.
pub async fn list_sends(
    ctx: &AppContext,
    filter: &SendFilter,
    before: Option<i64>,
    limit: u64,
) -> Result<Page<SendView, i64>, CoreError> {
    let filter = store::ListFilter {
        assignment_id: filter
            .assignment_id
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string),
        state: filter.state,
        before_id: before,
    };
    let sends = store::list(
        &ctx.db,
        ctx.workspace_id(),
        &filter,
        Page::<(), ()>::fetch(limit),
    )
    .await?;
    let page = Page::cut(sends, limit, |s| s.id);
    let mut views = Vec::with_capacity(page.items.len());
    for send in page.items {
        views.push(view(ctx, send, false).await?);
    }
    Ok(Page {
        items: views,
        next: page.next,
    })
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
        return Err(CoreError::FailedPrecondition(vec![
            FieldViolation::new(
                "send_id",
                format!(
                    "send {send_id} has nothing uncertain to resolve ({})",
                    states.join(", ")
                ),
            )
            .because(reasons::SEND_NOT_UNCERTAIN),
        ]));
    }
    let now = ctx.now();
    // Each decision applies only to a submission still uncertain: one that changed meanwhile (the
    // reconciler settled or re-queued it) is left as it is and reported.
    let mut changed = Vec::new();
    let mut applied = 0;
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
        if store::transition(&ctx.db, s.id, &t, now).await? {
            applied += 1;
        } else {
            changed.push(s);
        }
    }
    if resolution == Resolution::AllowRetry && applied > 0 {
        dispatch_now(ctx, send.id).await?;
    }
    if !changed.is_empty() {
        let mut now_states = Vec::new();
        for s in &changed {
            let state = store::submission(&ctx.db, s.id)
                .await?
                .map_or_else(|| "gone".to_string(), |x| x.state.to_string());
            now_states.push(format!("segment {}: now {state}", s.segment_id));
        }
        return Err(CoreError::Aborted(format!(
            "send {send_id} changed while it was being resolved ({}); nothing was done to {}; \
             read it again (GetSend) and decide on what is still uncertain",
            now_states.join(", "),
            if changed.len() == 1 {
                "that submission"
            } else {
                "those submissions"
            }
        )));
    }
    let send = store::get_by_id(&ctx.db, send.id).await?.unwrap_or(send);
    view(ctx, send, true).await
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
            content_types: vec!["growth".into()],
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
        r.delivery = Some(DeliveryMode::Newsletter {
            from_id: 0,
            subscription_topic_id: None,
        });
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
