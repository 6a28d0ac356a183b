//! Track API (`/api/...`, Basic auth): region, identify, manual-segment membership.
//! Later: delete/suppress, events, merge, v2 entity/batch.

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
use crate::error::SimError;
use crate::errors::ApiError;
use crate::state::IdType;

/// Customer.io Track limits.
pub(crate) const MAX_ID_BYTES: usize = 150;
pub(crate) const MAX_ATTRIBUTE_NAME_BYTES: usize = 150;
pub(crate) const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1000;
pub(crate) const MAX_ATTRIBUTES_PER_CALL: usize = 300;
pub(crate) const MAX_SEGMENT_IDS: usize = 1000;

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route("/api/v1/accounts/region", get(region))
        .route("/api/v1/customers/{identifier}", put(identify))
        .route(
            "/api/v1/segments/{segment_id}/add_customers",
            post(add_customers),
        )
        .route(
            "/api/v1/segments/{segment_id}/remove_customers",
            post(remove_customers),
        )
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
    let region = if config.region.eq_ignore_ascii_case("eu") {
        "eu"
    } else {
        "us"
    };
    Json(json!({
        "url": config.track_url(),
        "region": region,
        "environment_id": sim.environment_id(),
    }))
    .into_response()
}

fn value_len(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    }
}

/// Customer.io's identify limits; every violation is reported.
fn check_identify(identifier: &str, body: &Map<String, Value>) -> Vec<String> {
    let mut errors = Vec::new();
    if identifier.len() > MAX_ID_BYTES {
        errors.push(format!(
            "identifier is {} bytes; the limit is {MAX_ID_BYTES} bytes",
            identifier.len()
        ));
    }
    if let Some(id) = body.get("id")
        && value_len(id) > MAX_ID_BYTES
    {
        errors.push(format!("id is longer than {MAX_ID_BYTES} bytes"));
    }
    if body.len() > MAX_ATTRIBUTES_PER_CALL {
        errors.push(format!(
            "{} attributes sent; at most {MAX_ATTRIBUTES_PER_CALL} unique attributes per request",
            body.len()
        ));
    }
    for (name, value) in body {
        if name.len() > MAX_ATTRIBUTE_NAME_BYTES {
            errors.push(format!(
                "attribute name '{}…' is longer than {MAX_ATTRIBUTE_NAME_BYTES} bytes",
                name.chars().take(20).collect::<String>()
            ));
        }
        if name == "cio_relationships" || name == "cio_subscription_preferences" {
            continue;
        }
        if value_len(value) > MAX_ATTRIBUTE_VALUE_BYTES {
            errors.push(format!(
                "attribute '{}' value is {} bytes; the limit is {MAX_ATTRIBUTE_VALUE_BYTES} bytes",
                name.chars().take(40).collect::<String>(),
                value_len(value)
            ));
        }
    }
    errors
}

async fn identify(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> TrackResult {
    let Path(identifier) =
        path.map_err(|_| bad_request(vec!["invalid customer identifier".to_owned()]))?;
    if identifier.trim().is_empty() {
        return Err(bad_request(vec![
            "customer identifier is required".to_owned(),
        ]));
    }
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
        Err(err @ (SimError::SegmentNotFound(_) | SimError::NotManual(_))) => {
            Err(bad_request(vec![err.to_string()]))
        }
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
