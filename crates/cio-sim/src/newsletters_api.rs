//! App API: newsletters (journeys-api-2022 reads; 2026 create, send and schedule).
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/newsletters[?sort=asc\|desc][&limit=1..1000][&start=cursor]` | `{"newsletters":[newsletter],"next":cursor\|""}` (by id, ascending unless `sort=desc`; all when no `limit`) |
//! | `POST /v1/newsletters` | create: `{"newsletter":{..}}` |
//! | `GET /v1/newsletters/{id}` | `{"newsletter":{..}}` |
//! | `POST /v1/newsletters/{id}/send` | send a draft now: `{"newsletter":{..}}` with `sent_at` |
//! | `POST /v1/newsletters/{id}/schedule` | `{"scheduled_at": unix}` (future): `{"newsletter":{..}}` |
//! | `GET /v1/newsletters/{id}/contents`, `/contents/{content_id}` | `{"contents":[..]}`, `{"content":{..}}` |
//! | `GET /v1/newsletters/{id}/metrics`, `/contents/{content_id}/metrics` (also the 2022 spelling `/content/{content_id}/metrics`) | series (see `metrics`) |
//!
//! Newsletter object (as `GET /v1/newsletters/{id}` documents it): `id`, `deduplicate_id`,
//! `type` (`email`), `name`, `subject`, `content_ids` (one), `msg_template_ids`, `sent_at`
//! (unix, `null` until sent), `created`, `updated`, `recipient_segment_ids` (segments of the
//! recipients filter), `tags`, `subscription_topic_id`.
//!
//! Create body (an email newsletter; request under 1 MB, else 413): `type: "email"` (other
//! channels: 400, not simulated), `name` (1..=190 characters), `recipients` (audience filter;
//! a segment that does not exist is a 400), `subject` and `body` (non-blank strings), at most one
//! of `from` (an address) or `from_id` (positive integer), optional `preheader_text`,
//! `body_plain`, `layout_id`, `subscription_topic_id`, `send_now` (boolean) or `scheduled_at`
//! (future unix seconds) but not both, and the rate-limit options `rate_limit_email_rate` (>= 1)
//! with `rate_limit_time_period` (60, 3600, 86400) together, `rate_limit_spread` (accepted, not
//! applied). Without `send_now`/`scheduled_at` it is a draft. When the workspace's
//! subscription center is on (`SimConfig::subscription_center`), `subscription_topic_id` is
//! required: without it, 400 `{"errors":[{"detail":"subscription_topic_id is required"}]}` (the
//! 2026 spec's `newsletterErrorResponse` example; the spec names no status, 400 is this
//! endpoint's status for every other invalid body), nothing created. The API has no `tags`
//! (ignored): to find a newsletter again, put a unique marker in its `name`. Errors are 400
//! with `source.pointer`.
//!
//! Send and schedule: 404 unknown; 400 when it is not a draft (already sent or scheduled).
//! The send body is `{}` or rate-limit options; an empty body is accepted too (no spec says
//! Customer.io refuses it), and the request log shows which one a client sent.
//! A scheduled newsletter goes out (recipients evaluated then) once the clock passes its time.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::audience::AudienceFilter;
use crate::auth::require_app;
use crate::campaigns_api::{not_found, path_id, query_map};
use crate::error_bodies::{ApiError, newsletter_error};
use crate::metrics;
use crate::sends::{Newsletter, NewsletterSpec, Scope, SendStore};

/// Requests to create a newsletter must be smaller than this.
pub(crate) const MAX_NEWSLETTER_REQUEST_BYTES: usize = 1024 * 1024;
/// Longest newsletter name (characters).
pub(crate) const MAX_NEWSLETTER_NAME: usize = 190;
const LIST_MAX_LIMIT: usize = 1000;

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route("/v1/newsletters", get(list).post(create))
        .route("/v1/newsletters/{newsletter_id}", get(get_one))
        .route("/v1/newsletters/{newsletter_id}/send", post(send))
        .route("/v1/newsletters/{newsletter_id}/schedule", post(schedule))
        .route("/v1/newsletters/{newsletter_id}/metrics", get(metrics_all))
        .route("/v1/newsletters/{newsletter_id}/contents", get(contents))
        .route(
            "/v1/newsletters/{newsletter_id}/contents/{content_id}",
            get(content),
        )
        .route(
            "/v1/newsletters/{newsletter_id}/contents/{content_id}/metrics",
            get(content_metrics),
        )
        .route(
            "/v1/newsletters/{newsletter_id}/content/{content_id}/metrics",
            get(content_metrics),
        )
        .route_layer(from_fn_with_state(sim.clone(), require_app))
}

type AppResult = Result<Response, ApiError>;

fn bad(pointer: &str, detail: impl Into<String>) -> ApiError {
    ApiError::app(
        StatusCode::BAD_REQUEST,
        detail,
        Some(json!({ "pointer": pointer })),
    )
}

pub(crate) fn newsletter_json(store: &SendStore, n: &Newsletter) -> Value {
    let updated = store.present_secs(n.updated_ms);
    json!({
        "id": n.id,
        "deduplicate_id": format!("{}:{updated}", n.id),
        "type": "email",
        "name": n.name,
        "subject": n.subject,
        "content_ids": [n.content_id],
        "msg_template_ids": [n.content_id],
        "sent_at": n.sent_ms.map(|t| store.present_secs(t)),
        "created": store.present_secs(n.created_ms),
        "updated": updated,
        "recipient_segment_ids": n.recipients.segment_ids(),
        "tags": n.tags,
        "subscription_topic_id": n.subscription_topic_id,
    })
}

fn content_json(store: &SendStore, n: &Newsletter) -> Value {
    json!({
        "id": n.content_id,
        "newsletter_id": n.id,
        "deduplicate_id": format!("{}:{}", n.content_id, store.present_secs(n.updated_ms)),
        "name": "",
        "layout": "",
        "body": n.body,
        "type": "email",
        "from": n.from,
        "from_id": n.from_id,
        "reply_to": null,
        "reply_to_id": null,
        "preprocessor": "premailer",
        "recipient": "{{customer.email}}",
        "subject": n.subject,
        "bcc": "",
        "fake_bcc": false,
        "preheader_text": n.preheader_text.clone().unwrap_or_default(),
        "headers": [],
    })
}

fn newsletter_id(path: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(not_found("newsletter"));
    };
    path_id(&raw, "newsletter")
}

fn with_content(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(i64, i64), ApiError> {
    let Ok(Path((newsletter, content))) = path else {
        return Err(not_found("newsletter content"));
    };
    Ok((
        path_id(&newsletter, "newsletter")?,
        path_id(&content, "newsletter content")?,
    ))
}

const CURSOR_PREFIX: &str = "n1:";

fn encode_cursor(offset: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{offset}"))
}

fn decode_cursor(raw: &str) -> Option<usize> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim())
        .ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix(CURSOR_PREFIX)?
        .parse()
        .ok()
}

async fn list(
    State(sim): State<Simulator>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let query = query_map(query)?;
    let param = |name: &str| query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let parameter_error = |name: &str, detail: &str| {
        ApiError::app(
            StatusCode::BAD_REQUEST,
            detail,
            Some(json!({ "parameter": name })),
        )
    };
    let descending = match param("sort") {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(_) => return Err(parameter_error("sort", "sort must be asc or desc")),
    };
    let limit = match param("limit") {
        None => None,
        Some(raw) => Some(
            raw.parse::<usize>()
                .ok()
                .filter(|l| (1..=LIST_MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    parameter_error("limit", "limit must be an integer between 1 and 1000")
                })?,
        ),
    };
    let offset = match param("start") {
        None => 0,
        Some(raw) => decode_cursor(raw).ok_or_else(|| {
            parameter_error(
                "start",
                "start is not a valid cursor: pass the `next` value of the previous page",
            )
        })?,
    };
    let (page, more) = sim.with_world(|w| {
        w.settle_sends();
        let store = &w.sends;
        let mut all: Vec<&Newsletter> = store.newsletters().collect();
        if descending {
            all.reverse();
        }
        let take = limit.unwrap_or(usize::MAX);
        let page: Vec<Value> = all
            .iter()
            .skip(offset)
            .take(take)
            .map(|n| newsletter_json(store, n))
            .collect();
        let more = offset.saturating_add(page.len()) < all.len();
        (page, more)
    });
    let next = if more {
        encode_cursor(offset + page.len())
    } else {
        String::new()
    };
    Ok(Json(json!({ "newsletters": page, "next": next })).into_response())
}

async fn get_one(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = newsletter_id(path)?;
    let newsletter = sim.with_world(|w| {
        w.settle_sends();
        w.sends.newsletter(id).map(|n| newsletter_json(&w.sends, n))
    });
    let newsletter = newsletter.ok_or_else(|| not_found("newsletter"))?;
    Ok(Json(json!({ "newsletter": newsletter })).into_response())
}

fn optional_string(body: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(&format!("/{key}"), format!("{key} must be a string"))),
    }
}

fn required_text(body: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    optional_string(body, key)?
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| bad(&format!("/{key}"), format!("{key} is required")))
}

fn optional_positive(body: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().filter(|n| *n > 0).map(Some).ok_or_else(|| {
            bad(
                &format!("/{key}"),
                format!("{key} must be a positive integer"),
            )
        }),
    }
}

fn optional_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(&format!("/{key}"), format!("{key} must be a boolean"))),
    }
}

/// The optional rate-limit options of create, send and schedule (validated, not applied).
fn check_rate_limit(body: &Map<String, Value>) -> Result<(), ApiError> {
    let rate = optional_positive(body, "rate_limit_email_rate")?;
    let period = match body.get("rate_limit_time_period") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|p| [60, 3600, 86400].contains(p))
                .ok_or_else(|| {
                    bad(
                        "/rate_limit_time_period",
                        "rate_limit_time_period must be 60, 3600 or 86400",
                    )
                })?,
        ),
    };
    if rate.is_some() != period.is_some() {
        return Err(bad(
            "/rate_limit_email_rate",
            "set rate_limit_email_rate and rate_limit_time_period together",
        ));
    }
    optional_bool(body, "rate_limit_spread")?;
    Ok(())
}

/// A future `scheduled_at` (unix seconds) as an internal instant.
fn scheduled_at(store: &SendStore, value: &Value) -> Result<i64, ApiError> {
    let secs = value.as_i64().ok_or_else(|| {
        bad(
            "/scheduled_at",
            "scheduled_at must be a unix timestamp (integer)",
        )
    })?;
    let at = store.internal_from_secs(secs);
    if at <= store.now_ms() {
        return Err(bad("/scheduled_at", "scheduled_at must be in the future"));
    }
    Ok(at)
}

fn parse_object(body: &Bytes, empty_ok: bool) -> Result<Map<String, Value>, ApiError> {
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(bad("", "request body must be a JSON object")),
    }
}

enum Timing {
    Draft,
    Now,
    At(Value),
}

/// Validates a create body (everything but the segment existence and the schedule time).
fn parse_create(body: &Map<String, Value>) -> Result<(NewsletterSpec, Timing), ApiError> {
    match body.get("type") {
        Some(Value::String(t)) if t == "email" => {}
        Some(Value::String(t))
            if ["twilio", "push", "in_app", "webhook", "sms"].contains(&t.as_str()) =>
        {
            return Err(bad(
                "/type",
                format!("type {t:?}: the simulator only creates email newsletters"),
            ));
        }
        None | Some(Value::Null) => return Err(bad("/type", "type is required (email)")),
        Some(_) => {
            return Err(bad(
                "/type",
                "type must be one of email, twilio, push, in_app, webhook",
            ));
        }
    }
    let name = required_text(body, "name")?;
    if name.chars().count() > MAX_NEWSLETTER_NAME {
        return Err(bad(
            "/name",
            format!("name is longer than {MAX_NEWSLETTER_NAME} characters"),
        ));
    }
    let recipients = match body.get("recipients") {
        None | Some(Value::Null) => return Err(bad("/recipients", "recipients is required")),
        Some(raw) => AudienceFilter::parse(raw, "")
            .map_err(|e| bad(&format!("/recipients{}", e.pointer), e.message))?,
    };
    let subject = required_text(body, "subject")?;
    let html = required_text(body, "body")?;
    let from = optional_string(body, "from")?;
    let from_id = optional_positive(body, "from_id")?;
    if from.is_some() && from_id.is_some() {
        return Err(bad("/from_id", "set from or from_id, not both"));
    }
    if let Some(from) = &from
        && !from.contains('@')
    {
        return Err(bad(
            "/from",
            "from must be an address like `Name <email@domain.com>`",
        ));
    }
    let preheader_text = optional_string(body, "preheader_text")?;
    optional_string(body, "body_plain")?;
    optional_positive(body, "layout_id")?;
    let subscription_topic_id = optional_positive(body, "subscription_topic_id")?;
    check_rate_limit(body)?;
    let send_now = optional_bool(body, "send_now")?.unwrap_or(false);
    let timing = match (send_now, body.get("scheduled_at").filter(|v| !v.is_null())) {
        (true, Some(_)) => {
            return Err(bad(
                "/scheduled_at",
                "set send_now or scheduled_at, not both",
            ));
        }
        (true, None) => Timing::Now,
        (false, Some(at)) => Timing::At(at.clone()),
        (false, None) => Timing::Draft,
    };
    let spec = NewsletterSpec {
        name,
        subject,
        body: html,
        preheader_text,
        from,
        from_id,
        recipients,
        tags: Vec::new(),
        subscription_topic_id,
    };
    Ok((spec, timing))
}

async fn create(State(sim): State<Simulator>, body: Bytes) -> AppResult {
    if body.len() >= MAX_NEWSLETTER_REQUEST_BYTES {
        return Err(ApiError::app(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request is {} bytes; newsletter requests must be less than 1 MB",
                body.len()
            ),
            None,
        ));
    }
    let body = parse_object(&body, false)?;
    let (spec, timing) = parse_create(&body)?;
    if spec.subscription_topic_id.is_none() && sim.subscription_center() {
        return Ok(newsletter_error(
            StatusCode::BAD_REQUEST,
            "subscription_topic_id is required",
        ));
    }
    let created = sim.with_world(|w| {
        w.settle_sends();
        if let Some(missing) = w.unknown_segment(&spec.recipients) {
            return Err(bad(
                "/recipients",
                format!("segment {missing} does not exist"),
            ));
        }
        let scheduled = match &timing {
            Timing::At(raw) => Some(scheduled_at(&w.sends, raw)?),
            _ => None,
        };
        let now = w.sends.now_ms();
        let id = w.sends.add_newsletter(spec, now);
        match (timing, scheduled) {
            (Timing::Now, _) => {
                let _ = w.send_newsletter_now(id);
            }
            (_, Some(at)) => {
                let _ = w.schedule_newsletter(id, at);
            }
            _ => {}
        }
        w.sends
            .newsletter(id)
            .map(|n| newsletter_json(&w.sends, n))
            .ok_or_else(|| not_found("newsletter"))
    })?;
    Ok(Json(json!({ "newsletter": created })).into_response())
}

fn not_draft(id: i64) -> ApiError {
    ApiError::app(
        StatusCode::BAD_REQUEST,
        format!("newsletter {id} is not a draft: it was already sent or scheduled"),
        None,
    )
}

async fn send(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> AppResult {
    let id = newsletter_id(path)?;
    let body = parse_object(&body, true)?;
    check_rate_limit(&body)?;
    let sent = sim.with_world(|w| match w.send_newsletter_now(id) {
        Ok(_) => w
            .sends
            .newsletter(id)
            .map(|n| newsletter_json(&w.sends, n))
            .ok_or_else(|| not_found("newsletter")),
        Err(false) => Err(not_found("newsletter")),
        Err(true) => Err(not_draft(id)),
    })?;
    Ok(Json(json!({ "newsletter": sent })).into_response())
}

async fn schedule(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> AppResult {
    let id = newsletter_id(path)?;
    let body = parse_object(&body, false)?;
    check_rate_limit(&body)?;
    let raw = body
        .get("scheduled_at")
        .filter(|v| !v.is_null())
        .ok_or_else(|| bad("/scheduled_at", "scheduled_at is required"))?;
    let scheduled = sim.with_world(|w| {
        w.settle_sends();
        if w.sends.newsletter(id).is_none() {
            return Err(not_found("newsletter"));
        }
        let at = scheduled_at(&w.sends, raw)?;
        match w.schedule_newsletter(id, at) {
            Ok(()) => w
                .sends
                .newsletter(id)
                .map(|n| newsletter_json(&w.sends, n))
                .ok_or_else(|| not_found("newsletter")),
            Err(false) => Err(not_found("newsletter")),
            Err(true) => Err(not_draft(id)),
        }
    })?;
    Ok(Json(json!({ "newsletter": scheduled })).into_response())
}

async fn contents(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = newsletter_id(path)?;
    let contents = sim.with_world(|w| {
        w.sends
            .newsletter(id)
            .map(|n| vec![content_json(&w.sends, n)])
    });
    let contents = contents.ok_or_else(|| not_found("newsletter"))?;
    Ok(Json(json!({ "contents": contents })).into_response())
}

async fn content(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> AppResult {
    let (id, content_id) = with_content(path)?;
    let content = sim.with_world(|w| {
        w.sends
            .newsletter(id)
            .filter(|n| n.content_id == content_id)
            .map(|n| content_json(&w.sends, n))
    });
    let content = content.ok_or_else(|| not_found("newsletter content"))?;
    Ok(Json(json!({ "content": content })).into_response())
}

async fn metrics_all(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = newsletter_id(path)?;
    let query = query_map(query)?;
    let answer = sim.with_world(|w| {
        w.settle_sends();
        w.sends.newsletter(id)?;
        Some(metrics::answer(&w.sends, Scope::Newsletter(id), &query))
    });
    let answer = answer.ok_or_else(|| not_found("newsletter"))??;
    Ok(Json(answer).into_response())
}

async fn content_metrics(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let (id, content_id) = with_content(path)?;
    let query = query_map(query)?;
    let answer = sim.with_world(|w| {
        w.settle_sends();
        w.sends
            .newsletter(id)
            .filter(|n| n.content_id == content_id)?;
        Some(metrics::answer(
            &w.sends,
            Scope::Content(content_id),
            &query,
        ))
    });
    let answer = answer.ok_or_else(|| not_found("newsletter content"))??;
    Ok(Json(answer).into_response())
}
