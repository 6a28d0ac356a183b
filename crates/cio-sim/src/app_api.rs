//! App API (`/v1/...`, Bearer auth): segments and customer lookups, answered from the same state
//! the Track API writes.
//!
//! Customers (journeys-api-2022.openapi.yaml `/v1/customers*`, plus `id_type` as in the current
//! App API docs): `GET /v1/customers?email=` → `{"results":[{"email","id","cio_id"}]}` (email
//! required: 400 without it; matched case-insensitively); `GET /v1/customers/{id}/attributes`
//! and `POST /v1/customers/attributes` `{"ids":[1..=100 strings]}` →
//! `{"customers":[{"customer":{..}}]}` for the ids found (in request order, each once; unknown
//! ids omitted; no ids, more than 100, or non-strings: 400); `GET /v1/customers/{id}/segments`
//! → `{"segments":[..]}` with the segment objects of `/v1/segments` (integer ids), dynamic and
//! manual memberships; 404 for an unknown person. `id_type` is `id` (default), `email` or
//! `cio_id`; anything else (e.g. `phone`, not enabled here) is a 400.

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
use crate::auth::require_app;
use crate::error_bodies::ApiError;
use crate::state::{IdType, Membership, Person, Segment, SegmentKind};

/// Most ids of one `POST /v1/customers/attributes`.
pub(crate) const MAX_ATTRIBUTE_IDS: usize = 100;

/// Default and largest page size of `GET /v1/segments/{id}/membership`.
pub(crate) const MEMBERSHIP_DEFAULT_LIMIT: usize = 1000;
pub(crate) const MEMBERSHIP_MAX_LIMIT: usize = 30_000;

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route("/v1/segments", get(list_segments).post(create_segment))
        .route(
            "/v1/segments/{segment_id}",
            get(get_segment).delete(delete_segment),
        )
        .route(
            "/v1/segments/{segment_id}/customer_count",
            get(customer_count),
        )
        .route("/v1/segments/{segment_id}/membership", get(membership))
        .route("/v1/customers", get(customers_by_email))
        .route("/v1/customers/attributes", post(customers_attributes))
        .route(
            "/v1/customers/{customer_id}/attributes",
            get(customer_attributes),
        )
        .route(
            "/v1/customers/{customer_id}/segments",
            get(customer_segments),
        )
        .route_layer(from_fn_with_state(sim.clone(), require_app))
}

type AppResult = Result<Response, ApiError>;

pub(crate) fn segment_json(segment: &Segment) -> Value {
    let kind = match segment.kind() {
        SegmentKind::Dynamic => "dynamic",
        SegmentKind::Manual => "manual",
    };
    json!({
        "id": segment.id,
        "deduplicate_id": format!("{}:{}", segment.id, segment.created_at),
        "name": segment.name,
        "description": segment.description,
        "state": "finished",
        "progress": null,
        "type": kind,
        "tags": segment.tags,
        "created_at": segment.created_at,
        "updated_at": segment.updated_at,
    })
}

fn not_found(what: &str) -> ApiError {
    ApiError::app(StatusCode::NOT_FOUND, format!("{what} not found"), None)
}

/// Segment ids are int32 in the spec, whose only error for these paths is 404 ("the
/// segment_id does not exist"): a non-integer id identifies no segment, so it is a 404 too.
fn segment_id(path: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(not_found("segment"));
    };
    raw.parse::<i32>()
        .ok()
        .filter(|id| *id > 0)
        .map(i64::from)
        .ok_or_else(|| not_found("segment"))
}

fn query_map(
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

async fn list_segments(State(sim): State<Simulator>) -> Response {
    let segments: Vec<Value> = sim.with_world(|w| w.segment_list().map(segment_json).collect());
    Json(json!({ "segments": segments })).into_response()
}

async fn get_segment(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = segment_id(path)?;
    let segment = sim.with_world(|w| w.segment(id).map(segment_json));
    let segment = segment.ok_or_else(|| not_found("segment"))?;
    Ok(Json(json!({ "segment": segment })).into_response())
}

async fn create_segment(State(sim): State<Simulator>, body: Bytes) -> AppResult {
    let bad = |detail: &str, pointer: &str| {
        ApiError::app(
            StatusCode::BAD_REQUEST,
            detail,
            Some(json!({ "pointer": pointer })),
        )
    };
    let body: Value =
        serde_json::from_slice(&body).map_err(|_| bad("request body must be valid JSON", ""))?;
    let segment = body
        .get("segment")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("segment is required", "/segment"))?;
    let name = match segment.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(bad("name can't be blank", "/segment/name"));
        }
        Some(_) => return Err(bad("name must be a string", "/segment/name")),
    };
    let description = match segment.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(d)) => d.clone(),
        Some(_) => {
            return Err(bad("description must be a string", "/segment/description"));
        }
    };
    // Whatever else is sent (e.g. criteria), the API only creates manual segments.
    let now = chrono::Utc::now().timestamp();
    let segment = sim.with_world(|w| {
        let id = w.add_segment(
            &name,
            &description,
            Membership::Manual(Default::default()),
            None,
            now,
        );
        w.segment(id).map(segment_json)
    });
    let segment = segment.ok_or_else(|| not_found("segment"))?;
    Ok(Json(json!({ "segment": segment })).into_response())
}

async fn delete_segment(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = segment_id(path)?;
    let outcome = sim.with_world(|w| match w.segment(id).map(Segment::kind) {
        None => Err(not_found("segment")),
        Some(SegmentKind::Dynamic) => Err(ApiError::app(
            StatusCode::BAD_REQUEST,
            "only manual segments can be deleted through the API; delete data-driven segments in the UI",
            None,
        )),
        Some(SegmentKind::Manual) => {
            w.delete_segment(id);
            Ok(())
        }
    });
    outcome?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn customer_count(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = segment_id(path)?;
    let count = sim.with_world(|w| w.segment(id).map(|s| w.member_count(s)));
    let count = count.ok_or_else(|| not_found("segment"))?;
    Ok(Json(json!({ "count": count })).into_response())
}

const CURSOR_PREFIX: &str = "m1:";

fn encode_cursor(seq: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{seq}"))
}

fn decode_cursor(raw: &str) -> Option<u64> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.strip_prefix(CURSOR_PREFIX)?.parse().ok()
}

fn identifiers_json(p: &Person) -> Value {
    json!({ "id": p.id, "email": p.email, "cio_id": p.cio_id })
}

async fn membership(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = segment_id(path)?;
    let query = query_map(query)?;
    let limit = match query.get("limit").map(|l| l.trim()) {
        None | Some("") => MEMBERSHIP_DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<usize>() {
            Ok(limit) if (1..=MEMBERSHIP_MAX_LIMIT).contains(&limit) => limit,
            _ => {
                return Err(ApiError::app(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be an integer between 1 and {MEMBERSHIP_MAX_LIMIT}"),
                    Some(json!({ "parameter": "limit" })),
                ));
            }
        },
    };
    let after = match query.get("start").map(|s| s.trim()) {
        None | Some("") => None,
        Some(raw) => Some(decode_cursor(raw).ok_or_else(|| {
            ApiError::app(
                StatusCode::BAD_REQUEST,
                "start is not a valid cursor: pass the `next` value of the previous page",
                Some(json!({ "parameter": "start" })),
            )
        })?),
    };
    let page = sim.with_world(|w| {
        let segment = w.segment(id)?;
        let (people, next) = w.members_page(segment, after, limit);
        let identifiers: Vec<Value> = people.iter().map(|p| identifiers_json(p)).collect();
        let ids: Vec<String> = people
            .iter()
            .map(|p| p.id.clone().unwrap_or_default())
            .collect();
        Some(json!({
            "identifiers": identifiers,
            "ids": ids,
            "next": next.map(encode_cursor).unwrap_or_default(),
        }))
    });
    let page = page.ok_or_else(|| not_found("segment"))?;
    Ok(Json(page).into_response())
}

/// Attribute values as Customer.io returns them: all strings.
fn stringify(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The `customer` object of the attribute lookups.
fn customer_json(person: &Person) -> Value {
    let mut attributes: Map<String, Value> = person
        .attributes
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(stringify(v))))
        .collect();
    if let Some(id) = &person.id {
        attributes.insert("id".to_owned(), Value::String(id.clone()));
    }
    attributes.insert("cio_id".to_owned(), Value::String(person.cio_id.clone()));
    let unsubscribed = person
        .attributes
        .get("unsubscribed")
        .is_some_and(|v| v.as_bool() == Some(true) || v.as_str() == Some("true"));
    json!({
        "id": person.id,
        "identifiers": identifiers_json(person),
        "attributes": attributes,
        "timestamps": person.timestamps,
        "unsubscribed": unsubscribed,
        "devices": [],
    })
}

fn id_type(query: &HashMap<String, String>) -> Result<IdType, ApiError> {
    IdType::parse(query.get("id_type").map(String::as_str)).ok_or_else(|| {
        ApiError::app(
            StatusCode::BAD_REQUEST,
            "id_type must be one of id, email, cio_id",
            Some(json!({ "parameter": "id_type" })),
        )
    })
}

async fn customer_attributes(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let Ok(Path(customer_id)) = path else {
        return Err(not_found("customer"));
    };
    let id_type = id_type(&query_map(query)?)?;
    let customer = sim.with_world(|w| {
        let person = w.resolve(&customer_id, id_type).and_then(|s| w.person(s))?;
        Some(json!({ "customer": customer_json(person) }))
    });
    let customer = customer.ok_or_else(|| not_found("customer"))?;
    Ok(Json(customer).into_response())
}

async fn customer_segments(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let Ok(Path(customer_id)) = path else {
        return Err(not_found("customer"));
    };
    let id_type = id_type(&query_map(query)?)?;
    let segments = sim.with_world(|w| {
        let seq = w.resolve(&customer_id, id_type)?;
        let segments: Vec<Value> = w.segments_of(seq).into_iter().map(segment_json).collect();
        Some(segments)
    });
    let segments = segments.ok_or_else(|| not_found("customer"))?;
    Ok(Json(json!({ "segments": segments })).into_response())
}

async fn customers_attributes(
    State(sim): State<Simulator>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    body: Bytes,
) -> AppResult {
    let id_type = id_type(&query_map(query)?)?;
    let bad = |detail: String| {
        ApiError::app(
            StatusCode::BAD_REQUEST,
            detail,
            Some(json!({ "pointer": "/ids" })),
        )
    };
    let body: Value = serde_json::from_slice(&body)
        .map_err(|_| bad("request body must be a JSON object with ids".to_owned()))?;
    let ids = match body.get("ids") {
        Some(Value::Array(ids)) => ids,
        Some(_) => return Err(bad("ids must be an array of strings".to_owned())),
        None => return Err(bad("ids is required".to_owned())),
    };
    if ids.is_empty() || ids.len() > MAX_ATTRIBUTE_IDS {
        return Err(bad(format!(
            "ids must contain between 1 and {MAX_ATTRIBUTE_IDS} items; got {}",
            ids.len()
        )));
    }
    let ids: Vec<&str> = ids
        .iter()
        .map(Value::as_str)
        .collect::<Option<_>>()
        .ok_or_else(|| bad("ids must be an array of strings".to_owned()))?;
    let customers = sim.with_world(|w| {
        let mut seen = std::collections::HashSet::new();
        ids.iter()
            .filter_map(|id| w.resolve(id, id_type))
            .filter(|seq| seen.insert(*seq))
            .filter_map(|seq| w.person(seq))
            .map(|p| json!({ "customer": customer_json(p) }))
            .collect::<Vec<Value>>()
    });
    Ok(Json(json!({ "customers": customers })).into_response())
}

async fn customers_by_email(
    State(sim): State<Simulator>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let query = query_map(query)?;
    let email = query
        .get("email")
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .ok_or_else(|| {
            ApiError::app(
                StatusCode::BAD_REQUEST,
                "email is required",
                Some(json!({ "parameter": "email" })),
            )
        })?;
    let results: Vec<Value> = sim.with_world(|w| {
        w.resolve(email, IdType::Email)
            .and_then(|seq| w.person(seq))
            .map(|p| json!({ "email": p.email, "id": p.id, "cio_id": p.cio_id }))
            .into_iter()
            .collect()
    });
    Ok(Json(json!({ "results": results })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(1234)), Some(1234));
        assert_eq!(decode_cursor("not-a-cursor!"), None);
        assert_eq!(decode_cursor("MTIz"), None); // "123" without prefix
    }
}
