//! Track API v1 (`/api/v1/...`, Basic auth): region, identify, delete, suppress/unsuppress,
//! events (person and anonymous), merge, manual-segment membership. The v2 endpoints are in
//! `track_v2` (routed here, behind the same auth).
//!
//! Events (spec: `track-api.openapi.json` `eventsRequest`/`anonymousEventsRequest`, `dedupe_id`):
//! `name` required (at most 100 bytes after trimming), `data` an object (at most 100,000 bytes
//! serialized), `timestamp` unix seconds, `type` one of `event`/`page`/`screen`, `id` a ULID; any
//! violation is a 400. An event whose `id` was seen before is dropped with a 200. The spec does
//! not say what an event for an unknown person does; the simulator creates the person (by id or
//! email, as identify would), and drops the event for an unknown `cio_` identifier or a
//! suppressed identifier (the spec: calls referencing a suppressed identifier are ignored).

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::auth::require_track;
use crate::error_bodies::{ApiError, Violation};
use crate::events::{NewEvent, parse_event};
use crate::state::{IdType, parse_identifier};
use crate::track_v2;

/// Customer.io Track limits.
pub(crate) const MAX_ID_BYTES: usize = 150;
pub(crate) const MAX_ATTRIBUTE_NAME_BYTES: usize = 150;
pub(crate) const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1000;
pub(crate) const MAX_ATTRIBUTES_PER_CALL: usize = 300;
pub(crate) const MAX_SEGMENT_IDS: usize = 1000;

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route("/api/v1/accounts/region", get(region))
        .route(
            "/api/v1/customers/{identifier}",
            put(identify).delete(delete_customer),
        )
        .route("/api/v1/customers/{identifier}/events", post(track_event))
        .route("/api/v1/customers/{identifier}/suppress", post(suppress))
        .route(
            "/api/v1/customers/{identifier}/unsuppress",
            post(unsuppress),
        )
        .route("/api/v1/events", post(track_anonymous))
        .route("/api/v1/merge_customers", post(merge_customers))
        .route(
            "/api/v1/segments/{segment_id}/add_customers",
            post(add_customers),
        )
        .route(
            "/api/v1/segments/{segment_id}/remove_customers",
            post(remove_customers),
        )
        .route("/api/v2/entity", post(track_v2::entity))
        .route("/api/v2/batch", post(track_v2::batch))
        .route_layer(from_fn_with_state(sim.clone(), require_track))
}

type TrackResult = Result<Response, ApiError>;

fn bad_request(messages: Vec<String>) -> ApiError {
    ApiError::track(StatusCode::BAD_REQUEST, messages)
}

fn ok() -> Response {
    Json(json!({})).into_response()
}

/// Parses a JSON object body; an empty body is `{}` when `empty_ok`.
fn object_body(body: &Bytes, empty_ok: bool) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) && empty_ok {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad_request(vec![
            "request body must be a JSON object".to_owned(),
        ])),
        Err(err) => Err(bad_request(vec![format!("invalid JSON body: {err}")])),
    }
}

async fn region(State(sim): State<Simulator>) -> Response {
    let config = sim.config();
    let region = sim.region();
    Json(json!({
        "url": config.track_url(),
        "region": region,
        "environment_id": sim.environment_id(),
    }))
    .into_response()
}

/// Size of an attribute value as Customer.io measures it: a string's bytes, otherwise the
/// serialized JSON.
pub(crate) fn value_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    }
}

fn identifier_violation(identifier: &str, field: &str) -> Option<Violation> {
    (identifier.len() > MAX_ID_BYTES).then(|| {
        Violation::new(
            "too_long",
            field,
            format!(
                "identifier is {} bytes; the limit is {MAX_ID_BYTES} bytes",
                identifier.len()
            ),
        )
    })
}

/// Customer.io's limits on an attribute map (v1 identify body, v2 `attributes`): `id` at most
/// 150 bytes, at most 300 attributes, names at most 150 bytes, values at most 1000 bytes
/// (`cio_relationships` and `cio_subscription_preferences` are structured and exempt from the
/// value limit). Field names are prefixed with `prefix`. Every violation is reported.
pub(crate) fn attribute_violations(attrs: &Map<String, Value>, prefix: &str) -> Vec<Violation> {
    let mut violations = Vec::new();
    if let Some(id) = attrs.get("id")
        && value_len(id) > MAX_ID_BYTES
    {
        violations.push(Violation::new(
            "too_long",
            format!("{prefix}id"),
            format!("id is longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    if attrs.len() > MAX_ATTRIBUTES_PER_CALL {
        violations.push(Violation::new(
            "too_many",
            prefix.trim_end_matches('.'),
            format!(
                "{} attributes sent; at most {MAX_ATTRIBUTES_PER_CALL} unique attributes per request",
                attrs.len()
            ),
        ));
    }
    for (name, value) in attrs {
        if name.len() > MAX_ATTRIBUTE_NAME_BYTES {
            violations.push(Violation::new(
                "too_long",
                format!("{prefix}{name}"),
                format!(
                    "attribute name '{}…' is longer than {MAX_ATTRIBUTE_NAME_BYTES} bytes",
                    name.chars().take(20).collect::<String>()
                ),
            ));
        }
        if name == "cio_relationships" || name == "cio_subscription_preferences" {
            continue;
        }
        if value_len(value) > MAX_ATTRIBUTE_VALUE_BYTES {
            violations.push(Violation::new(
                "too_long",
                format!("{prefix}{name}"),
                format!(
                    "attribute '{}' value is {} bytes; the limit is {MAX_ATTRIBUTE_VALUE_BYTES} bytes",
                    name.chars().take(40).collect::<String>(),
                    value_len(value)
                ),
            ));
        }
    }
    violations
}

/// Customer.io's identify limits; every violation is reported.
fn check_identify(identifier: &str, body: &Map<String, Value>) -> Vec<String> {
    identifier_violation(identifier, "identifier")
        .into_iter()
        .chain(attribute_violations(body, ""))
        .map(|v| v.message)
        .collect()
}

/// Reads one person reference `{"id"|"email"|"cio_id": "value"}` (v2 `identifiers`, merge
/// `primary`/`secondary`): exactly one of those keys with a non-empty string. `phone` is not an
/// identifier in the simulated workspace (the spec allows it only when enabled).
pub(crate) fn person_reference(
    value: Option<&Value>,
    field: &str,
) -> Result<(IdType, String), Violation> {
    let obj = match value {
        Some(Value::Object(obj)) => obj,
        None | Some(Value::Null) => {
            return Err(Violation::new(
                "required",
                field,
                format!("{field} is required"),
            ));
        }
        Some(_) => {
            return Err(Violation::new(
                "invalid",
                field,
                format!("{field} must be an object"),
            ));
        }
    };
    if obj.len() != 1 {
        return Err(Violation::new(
            "invalid",
            field,
            format!(
                "{field} must contain exactly one of id, email, cio_id; got {}",
                obj.len()
            ),
        ));
    }
    let Some((key, raw)) = obj.iter().next() else {
        return Err(Violation::new(
            "invalid",
            field,
            format!("{field} is empty"),
        ));
    };
    let kind = match key.as_str() {
        "id" => IdType::Id,
        "email" => IdType::Email,
        "cio_id" => IdType::CioId,
        "phone" => {
            return Err(Violation::new(
                "invalid",
                format!("{field}.phone"),
                "phone is not enabled as an identifier in this workspace",
            ));
        }
        other => {
            return Err(Violation::new(
                "invalid",
                format!("{field}.{other}"),
                format!("unknown identifier '{other}'; use id, email or cio_id"),
            ));
        }
    };
    let text = match raw {
        Value::String(s) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(Violation::new(
                "invalid",
                format!("{field}.{key}"),
                format!("{field}.{key} must be a non-empty string"),
            ));
        }
    };
    if let Some(v) = identifier_violation(&text, &format!("{field}.{key}")) {
        return Err(v);
    }
    Ok((kind, text))
}

async fn identify(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> TrackResult {
    let identifier = path_value(path)?;
    let body = object_body(&body, true)?;
    let errors = check_identify(&identifier, &body);
    if !errors.is_empty() {
        return Err(bad_request(errors));
    }
    let now = chrono::Utc::now().timestamp();
    let outcome = sim.with_world(|w| w.identify(&identifier, body, now));
    tracing::debug!(identifier = %identifier, ?outcome, "identify");
    Ok(ok())
}

/// The decoded `{identifier}` path value (present).
fn path_value(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(identifier) =
        path.map_err(|_| bad_request(vec!["invalid customer identifier".to_owned()]))?;
    if identifier.trim().is_empty() {
        return Err(bad_request(vec![
            "customer identifier is required".to_owned(),
        ]));
    }
    Ok(identifier)
}

/// The decoded `{identifier}` path value: present and at most 150 bytes.
fn path_identifier(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let identifier = path_value(path)?;
    if let Some(v) = identifier_violation(&identifier, "identifier") {
        return Err(bad_request(vec![v.message]));
    }
    Ok(identifier)
}

async fn delete_customer(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> TrackResult {
    let identifier = path_identifier(path)?;
    let (kind, value) = parse_identifier(&identifier);
    let deleted = sim.with_world(|w| w.delete_as(kind, value));
    tracing::debug!(identifier = %identifier, deleted, "delete person");
    Ok(ok())
}

async fn suppress(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> TrackResult {
    let identifier = path_identifier(path)?;
    let (kind, value) = parse_identifier(&identifier);
    sim.with_world(|w| w.suppress_as(kind, value));
    Ok(ok())
}

async fn unsuppress(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> TrackResult {
    let identifier = path_identifier(path)?;
    let (kind, value) = parse_identifier(&identifier);
    sim.with_world(|w| w.unsuppress_as(kind, value));
    Ok(ok())
}

/// v1 event body checks (fields shared with v2, plus `type`).
fn check_v1_event(body: &Map<String, Value>) -> Result<NewEvent, ApiError> {
    let mut messages = Vec::new();
    match body.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if ["event", "page", "screen"].contains(&t.as_str()) => {}
        Some(_) => messages.push("type must be one of event, page, screen".to_owned()),
    }
    match parse_event(body, "data", "") {
        Ok(event) if messages.is_empty() => Ok(event),
        Ok(_) => Err(bad_request(messages)),
        Err(violations) => {
            messages.extend(violations.into_iter().map(|v| v.message));
            Err(bad_request(messages))
        }
    }
}

async fn track_event(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> TrackResult {
    let identifier = path_identifier(path)?;
    let body = object_body(&body, false)?;
    let event = check_v1_event(&body)?;
    let (kind, value) = parse_identifier(&identifier);
    let now = chrono::Utc::now();
    let outcome = sim.with_world(|w| w.person_event(kind, value, event, now));
    tracing::debug!(identifier = %identifier, ?outcome, "event");
    Ok(ok())
}

async fn track_anonymous(State(sim): State<Simulator>, body: Bytes) -> TrackResult {
    let body = object_body(&body, false)?;
    let anonymous_id = match body.get("anonymous_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(a)) if a.is_empty() => None,
        Some(Value::String(a)) => Some(a.clone()),
        Some(_) => {
            return Err(bad_request(vec![
                "anonymous_id must be a string".to_owned(),
            ]));
        }
    };
    let event = check_v1_event(&body)?;
    let event = NewEvent {
        anonymous_id,
        ..event
    };
    let now = chrono::Utc::now();
    let outcome = sim.with_world(|w| w.anonymous_event(event, now));
    tracing::debug!(?outcome, "anonymous event");
    Ok(ok())
}

/// `POST /api/v1/merge_customers`: its 400 is `{"meta":{"error":".."}}` (one message), e.g. for
/// several identifiers in `primary` or `secondary`. An unknown primary or secondary makes the
/// request do nothing (200), as the spec says.
async fn merge_customers(State(sim): State<Simulator>, body: Bytes) -> TrackResult {
    let single = |message: String| ApiError::TrackSingle {
        status: StatusCode::BAD_REQUEST,
        message,
    };
    let body = object_body(&body, false).map_err(|_| single("invalid JSON body".to_owned()))?;
    let primary =
        person_reference(body.get("primary"), "primary").map_err(|v| single(v.message))?;
    let secondary =
        person_reference(body.get("secondary"), "secondary").map_err(|v| single(v.message))?;
    let now = chrono::Utc::now().timestamp();
    let merged = sim
        .with_world(|w| w.merge_people((primary.0, &primary.1), (secondary.0, &secondary.1), now));
    tracing::debug!(merged, "merge customers");
    Ok(ok())
}

async fn add_customers(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> TrackResult {
    change_segment(sim, path, query, body, true)
}

async fn remove_customers(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> TrackResult {
    change_segment(sim, path, query, body, false)
}

/// The spec answers invalid input to these endpoints with 400 only (no 404): an unknown or
/// data-driven segment, a bad `id_type`, or `ids` outside 1..=1000 are all 400s. Ids that match
/// no person are ignored.
fn change_segment(
    sim: Simulator,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
    add: bool,
) -> TrackResult {
    let segment_id = path
        .ok()
        .and_then(|Path(raw): Path<String>| raw.parse::<i32>().ok())
        .filter(|id| *id > 0)
        .map(i64::from)
        .ok_or_else(|| bad_request(vec!["segment_id must be a positive integer".to_owned()]))?;
    let Query(query) =
        query.map_err(|err| bad_request(vec![format!("invalid query string: {err}")]))?;
    let id_type = IdType::parse(query.get("id_type").map(String::as_str))
        .ok_or_else(|| bad_request(vec!["id_type must be one of id, email, cio_id".to_owned()]))?;
    let body = object_body(&body, false)?;
    let ids = match body.get("ids") {
        Some(Value::Array(ids)) => ids,
        Some(_) => return Err(bad_request(vec!["ids must be an array".to_owned()])),
        None => return Err(bad_request(vec!["ids is required".to_owned()])),
    };
    if ids.is_empty() || ids.len() > MAX_SEGMENT_IDS {
        return Err(bad_request(vec![format!(
            "ids must contain between 1 and {MAX_SEGMENT_IDS} items; got {}",
            ids.len()
        )]));
    }
    let ids: Vec<String> = ids
        .iter()
        .filter_map(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    let now = chrono::Utc::now().timestamp();
    let result = sim.with_world(|w| {
        let people: Vec<u64> = ids.iter().filter_map(|i| w.resolve(i, id_type)).collect();
        w.change_manual(segment_id, &people, add, now)
    });
    match result {
        Ok(changed) => {
            tracing::debug!(segment_id, add, changed, "manual segment membership");
            Ok(ok())
        }
        // change_manual only fails with SegmentNotFound or NotManual.
        Err(err) => Err(bad_request(vec![err.to_string()])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_limits() {
        let mut body = Map::new();
        body.insert("a".repeat(151), json!(1));
        body.insert("big".into(), json!("x".repeat(1001)));
        body.insert("ok".into(), json!("x".repeat(1000)));
        let errors = check_identify(&"i".repeat(151), &body);
        assert_eq!(errors.len(), 3, "{errors:?}");
        let mut many = Map::new();
        for i in 0..301 {
            many.insert(format!("k{i}"), json!(i));
        }
        assert_eq!(check_identify("u1", &many).len(), 1);
        many.remove("k0");
        assert!(check_identify("u1", &many).is_empty());
    }
}
