//! App API: campaigns, API-triggered broadcasts, broadcast triggers and their metrics
//! (journeys-api-2022.openapi.yaml, with the 2026 `state` field).
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/campaigns` | `{"campaigns":[campaign]}` (campaigns only, not broadcasts) |
//! | `GET /v1/campaigns/{id}` | `{"campaign":{..}}`; 404 for an unknown id or a broadcast id |
//! | `GET /v1/campaigns/{id}/metrics` | series (see `metrics`); 404 unless a campaign |
//! | `GET /v1/broadcasts`, `/v1/broadcasts/{id}` | `{"broadcasts":[..]}`, `{"broadcast":{..}}` |
//! | `GET /v1/broadcasts/{id}/metrics` | series of all its triggers' deliveries |
//! | `GET /v1/broadcasts/{id}/triggers` | `{"triggers":[{"id","broadcast_id","created_at","processed_at"}]}`, newest first |
//! | `POST /v1/campaigns/{broadcast_id}/triggers` | `{"id": trigger_id}` |
//! | `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}` | status (flat object) |
//! | `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}/errors?start=&limit=` | `{"errors":["line N: .."],"next":n?}` |
//!
//! Trigger request: a JSON object (an empty body is `{}`) with at most one of `recipients`
//! (audience filter), `ids`, `emails`, `per_user_data` (`[{"id"|"email", "data"}]`) or
//! `data_file_url`; `{}` (none) reaches the broadcast's UI audience. Options `data` (object, at
//! most 50,000 bytes serialized), `id_ignore_missing`, `email_ignore_missing`,
//! `email_add_duplicates` (booleans). Checked in this order:
//! 1. unknown id, or the id of a campaign or newsletter: 404;
//! 2. within `trigger_interval` (10 s) of the previous trigger request that got past this check
//!    (accepted or 422) in the trigger scope: by default any broadcast of the workspace
//!    (`TriggerScope::Workspace`), or only the same broadcast (`TriggerScope::PerBroadcast`,
//!    other broadcasts not affected): 429 with `Retry-After` (whole seconds, at least 1),
//!    nothing recorded;
//! 3. broadcast not `running`, two audience keys, an invalid or empty filter (`{}`,
//!    `{"and":[]}`, a bad operator...), a filter naming a segment that does not exist, `ids`/
//!    `emails`/`per_user_data` empty, over 10,000 entries or malformed, `data` not an object or
//!    too large, `data_file_url` (not supported by the simulator): 422 with `source.pointer`,
//!    nothing recorded;
//! 4. ids or emails not found (without `*_ignore_missing`): 422 whose detail names the trigger
//!    id; the trigger IS recorded (listed, status with `recipients_count` 0, `/errors` lists
//!    `line N: ...`) and nothing is sent;
//! 5. otherwise the trigger is recorded and processed at once: one delivery per recipient
//!    (duplicates once; people without an email or with `unsubscribed` true skipped); a filter
//!    matching nobody is accepted with `recipients_count` 0.
//!
//! The status echoes the request body as `recipients_filter` (audience, `data` and options), so
//! a sender can find its own trigger after a lost response by a marker it put in `data`. Its
//! `id` is a string, as the spec types it (an integer in the trigger answer and the list).
//! A non-integer id in a path identifies nothing: 404.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::auth::require_app;
use crate::config::TriggerScope;
use crate::error_bodies::{ApiError, app_error};
use crate::metrics;
use crate::sends::{
    Campaign, CampaignKind, CampaignState, Scope, SendStore, TriggerError, trigger_status_json,
};

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route("/v1/campaigns", get(list_campaigns))
        .route("/v1/campaigns/{campaign_id}", get(get_campaign))
        .route("/v1/campaigns/{campaign_id}/metrics", get(campaign_metrics))
        .route("/v1/campaigns/{broadcast_id}/triggers", post(trigger))
        .route(
            "/v1/campaigns/{broadcast_id}/triggers/{trigger_id}",
            get(trigger_status),
        )
        .route(
            "/v1/campaigns/{broadcast_id}/triggers/{trigger_id}/errors",
            get(trigger_errors),
        )
        .route("/v1/broadcasts", get(list_broadcasts))
        .route("/v1/broadcasts/{broadcast_id}", get(get_broadcast))
        .route(
            "/v1/broadcasts/{broadcast_id}/metrics",
            get(broadcast_metrics),
        )
        .route("/v1/broadcasts/{broadcast_id}/triggers", get(list_triggers))
        .route_layer(from_fn_with_state(sim.clone(), require_app))
}

type AppResult = Result<Response, ApiError>;

pub(crate) fn not_found(what: &str) -> ApiError {
    ApiError::app(StatusCode::NOT_FOUND, format!("{what} not found"), None)
}

/// A positive integer path id; anything else identifies nothing (404).
pub(crate) fn path_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| not_found(what))
}

fn one_id(path: Result<Path<String>, PathRejection>, what: &str) -> Result<i64, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(not_found(what));
    };
    path_id(&raw, what)
}

fn two_ids(path: Result<Path<(String, String)>, PathRejection>) -> Result<(i64, i64), ApiError> {
    let Ok(Path((broadcast, trigger))) = path else {
        return Err(not_found("trigger"));
    };
    Ok((
        path_id(&broadcast, "broadcast")?,
        path_id(&trigger, "trigger")?,
    ))
}

pub(crate) fn query_map(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query.map(|Query(q)| q).map_err(|err| {
        ApiError::app(
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {err}"),
            None,
        )
    })
}

fn email_actions(c: &Campaign) -> Value {
    json!([{ "id": c.action_id, "type": "email" }])
}

fn campaign_json(store: &SendStore, c: &Campaign) -> Value {
    let updated = store.present_secs(c.updated_ms);
    let kind = match c.trigger {
        Some(crate::sends::CampaignTrigger::Segment) => "segment",
        _ => "event",
    };
    json!({
        "id": c.id,
        "deduplicate_id": format!("{}:{updated}", c.id),
        "name": c.name,
        "type": kind,
        "created": store.present_secs(c.created_ms),
        "updated": updated,
        "active": c.state == CampaignState::Running,
        "state": c.state.as_str(),
        "actions": email_actions(c),
        "msg_templates": email_actions(c),
        "first_started": store.present_secs(c.created_ms),
        "created_by": "simulator@customer.io",
        "tags": c.tags,
        "filter_segment_ids": [],
        "trigger_segment_ids": c.trigger_segment_ids,
    })
}

fn broadcast_json(store: &SendStore, c: &Campaign) -> Value {
    let updated = store.present_secs(c.updated_ms);
    json!({
        "id": c.id,
        "deduplicate_id": format!("{}:{updated}", c.id),
        "name": c.name,
        "created": store.present_secs(c.created_ms),
        "updated": updated,
        "active": c.state == CampaignState::Running,
        "state": c.state.as_str(),
        "msg_template_ids": email_actions(c),
        "actions": email_actions(c),
        "tags": c.tags,
    })
}

fn of_kind(store: &SendStore, id: i64, kind: CampaignKind) -> Option<&Campaign> {
    store.campaign(id).filter(|c| c.kind == kind)
}

async fn list_campaigns(State(sim): State<Simulator>) -> Response {
    let campaigns: Vec<Value> = sim.with_world(|w| {
        w.settle_sends();
        let store = &w.sends;
        store
            .campaigns()
            .filter(|c| c.kind == CampaignKind::Campaign)
            .map(|c| campaign_json(store, c))
            .collect()
    });
    Json(json!({ "campaigns": campaigns })).into_response()
}

async fn get_campaign(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = one_id(path, "campaign")?;
    let campaign = sim.with_world(|w| {
        of_kind(&w.sends, id, CampaignKind::Campaign).map(|c| campaign_json(&w.sends, c))
    });
    let campaign = campaign.ok_or_else(|| not_found("campaign"))?;
    Ok(Json(json!({ "campaign": campaign })).into_response())
}

async fn list_broadcasts(State(sim): State<Simulator>) -> Response {
    let broadcasts: Vec<Value> = sim.with_world(|w| {
        let store = &w.sends;
        store
            .campaigns()
            .filter(|c| c.kind == CampaignKind::Broadcast)
            .map(|c| broadcast_json(store, c))
            .collect()
    });
    Json(json!({ "broadcasts": broadcasts })).into_response()
}

async fn get_broadcast(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = one_id(path, "broadcast")?;
    let broadcast = sim.with_world(|w| {
        of_kind(&w.sends, id, CampaignKind::Broadcast).map(|c| broadcast_json(&w.sends, c))
    });
    let broadcast = broadcast.ok_or_else(|| not_found("broadcast"))?;
    Ok(Json(json!({ "broadcast": broadcast })).into_response())
}

fn metrics_of(
    sim: &Simulator,
    id: i64,
    kind: CampaignKind,
    query: &HashMap<String, String>,
) -> AppResult {
    let what = match kind {
        CampaignKind::Campaign => "campaign",
        CampaignKind::Broadcast => "broadcast",
    };
    let answer = sim.with_world(|w| {
        w.settle_sends();
        of_kind(&w.sends, id, kind)?;
        Some(metrics::answer(&w.sends, Scope::Campaign(id), query))
    });
    let answer = answer.ok_or_else(|| not_found(what))??;
    Ok(Json(answer).into_response())
}

async fn campaign_metrics(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = one_id(path, "campaign")?;
    let query = query_map(query)?;
    metrics_of(&sim, id, CampaignKind::Campaign, &query)
}

async fn broadcast_metrics(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = one_id(path, "broadcast")?;
    let query = query_map(query)?;
    metrics_of(&sim, id, CampaignKind::Broadcast, &query)
}

async fn list_triggers(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = one_id(path, "broadcast")?;
    let triggers = sim.with_world(|w| {
        let store = &w.sends;
        of_kind(store, id, CampaignKind::Broadcast)?;
        let triggers: Vec<Value> = store
            .triggers()
            .rev()
            .filter(|t| t.broadcast_id == id)
            .map(|t| {
                json!({
                    "id": t.id,
                    "broadcast_id": t.broadcast_id,
                    "created_at": store.present_secs(t.created_ms),
                    "processed_at": t.processed_ms.map(|p| store.present_secs(p)),
                })
            })
            .collect();
        Some(triggers)
    });
    let triggers = triggers.ok_or_else(|| not_found("broadcast"))?;
    Ok(Json(json!({ "triggers": triggers })).into_response())
}

fn unprocessable(detail: impl Into<String>, pointer: &str) -> Response {
    app_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        detail,
        Some(json!({ "pointer": pointer })),
    )
}

async fn trigger(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Response {
    let id = match one_id(path, "broadcast") {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    let body: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => map,
            _ => {
                return app_error(
                    StatusCode::BAD_REQUEST,
                    "request body must be a JSON object",
                    Some(json!({ "pointer": "" })),
                );
            }
        }
    };
    match sim.with_world(|w| w.trigger_broadcast(id, &body)) {
        Ok(trigger_id) => Json(json!({ "id": trigger_id })).into_response(),
        Err(TriggerError::NotFound) => not_found("broadcast").into_response(),
        Err(TriggerError::RateLimited(wait_ms)) => {
            let secs = u64::try_from(wait_ms).unwrap_or(0).div_ceil(1000).max(1);
            let interval = sim.trigger_interval().as_secs_f64();
            let scope = match sim.trigger_scope() {
                TriggerScope::Workspace => "in this workspace".to_owned(),
                TriggerScope::PerBroadcast => format!("for broadcast {id}"),
            };
            let mut response = app_error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limited to 1 trigger per {interval}s {scope}, retry after {secs}s"),
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
        Err(TriggerError::Invalid(pointer, message)) => unprocessable(message, &pointer),
        Err(TriggerError::Rejected {
            trigger_id,
            pointer,
            errors,
        }) => unprocessable(
            format!(
                "trigger {trigger_id} has {errors} error(s) and was not sent; see \
                 GET /v1/campaigns/{id}/triggers/{trigger_id}/errors"
            ),
            &pointer,
        ),
    }
}

async fn trigger_status(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> AppResult {
    let (broadcast_id, trigger_id) = two_ids(path)?;
    let status = sim.with_world(|w| {
        let store = &w.sends;
        of_kind(store, broadcast_id, CampaignKind::Broadcast)?;
        store
            .trigger(trigger_id)
            .filter(|t| t.broadcast_id == broadcast_id)
            .map(|t| trigger_status_json(store, t))
    });
    let status = status.ok_or_else(|| not_found("trigger"))?;
    Ok(Json(status).into_response())
}

const ERRORS_DEFAULT_LIMIT: usize = 100;
const ERRORS_MAX_LIMIT: usize = 1000;

async fn trigger_errors(
    State(sim): State<Simulator>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let (broadcast_id, trigger_id) = two_ids(path)?;
    let query = query_map(query)?;
    let number = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
            None => Ok(default),
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    ApiError::app(
                        StatusCode::BAD_REQUEST,
                        format!("{name} must be an integer between 0 and {max}"),
                        Some(json!({ "parameter": name })),
                    )
                }),
        }
    };
    let start = number("start", 0, usize::MAX)?;
    let limit = number("limit", ERRORS_DEFAULT_LIMIT, ERRORS_MAX_LIMIT)?.max(1);
    let errors = sim.with_world(|w| {
        of_kind(&w.sends, broadcast_id, CampaignKind::Broadcast)?;
        w.sends
            .trigger(trigger_id)
            .filter(|t| t.broadcast_id == broadcast_id)
            .map(|t| t.errors.clone())
    });
    let errors = errors.ok_or_else(|| not_found("trigger"))?;
    let page: Vec<&String> = errors.iter().skip(start).take(limit).collect();
    let mut body = json!({ "errors": page });
    let end = start.saturating_add(limit);
    if end < errors.len()
        && let Some(obj) = body.as_object_mut()
    {
        obj.insert("next".to_owned(), json!(end));
    }
    Ok(Json(body).into_response())
}
