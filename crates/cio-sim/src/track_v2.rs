//! Track API v2: `POST /api/v2/entity` (one operation) and `POST /api/v2/batch`
//! (`{"batch":[op,...]}`), written to `track-api.openapi.json` (2026).
//!
//! - Sizes: an entity request, and each op of a batch (its raw JSON text), at most 32 KiB; a
//!   batch body at most 500 KiB ("kb" read as KiB).
//! - Answers: 200 `{}` when every op is applied. An invalid entity op, or a batch that is
//!   malformed, too large or empty, is a 400 `{"errors":[{"reason","field","message"}]}` (the
//!   spec lists no 413 for these endpoints) and applies nothing. A batch with invalid ops answers
//!   207 `{"errors":[{"batch_index","reason","field","message"},..]}` (one entry per violation,
//!   so an index can repeat) and applies every valid op, in order.
//! - Person ops (`person_common`: exactly one of `id`/`email`/`cio_id` in `identifiers`; `phone`
//!   is not enabled in the simulated workspace): `identify` merges `attributes` (v1 identify
//!   limits and semantics, `_update` inside `attributes`, `null`/`""` remove); `event`/`page`/
//!   `screen` record an event whose data is `attributes` (v1 event rules: name, ULID `id`
//!   deduplicated across v1 and v2, unknown person created); `delete`; `suppress`/`unsuppress`;
//!   `merge` (`primary`/`secondary` instead of `identifiers`). `add_device`/`delete_device`
//!   (need `device.token`) and `add_relationships`/`delete_relationships` (need a
//!   `cio_relationships` array) are validated and accepted without a modelled effect.
//! - `object` ops (need `identifiers` and a known action) and `delivery` ops (`event` named
//!   `opened`/`converted`/`delivered` with `attributes.device_token`) are validated and accepted
//!   without a modelled effect.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::error_bodies::{ApiError, Violation};
use crate::events::{NewEvent, parse_event};
use crate::state::{IdType, World};
use crate::track_api::{attribute_violations, person_reference};

/// Largest entity request, and largest op inside a batch.
pub(crate) const MAX_OP_BYTES: usize = 32 * 1024;
/// Largest batch request body.
pub(crate) const MAX_BATCH_BYTES: usize = 500 * 1024;

type Who = (IdType, String);

/// A validated operation.
#[derive(Debug)]
enum Op {
    Identify {
        who: Who,
        attributes: Map<String, Value>,
    },
    Event {
        who: Who,
        event: NewEvent,
    },
    Delete(Who),
    Suppress(Who),
    Unsuppress(Who),
    Merge {
        primary: Who,
        secondary: Who,
    },
    /// Valid, but nothing the simulator models (devices, relationships, objects, deliveries).
    Accepted,
}

fn too_large(size: usize, limit: usize, what: &str) -> Violation {
    Violation::new(
        "too_large",
        "",
        format!("{what} is {size} bytes; the limit is {limit} bytes"),
    )
}

/// Parses and validates one op from its raw JSON text.
fn parse_op(raw: &str) -> Result<Op, Vec<Violation>> {
    if raw.len() > MAX_OP_BYTES {
        return Err(vec![too_large(raw.len(), MAX_OP_BYTES, "the operation")]);
    }
    let op = match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(op)) => op,
        Ok(_) => {
            return Err(vec![Violation::new(
                "invalid",
                "",
                "an operation must be a JSON object",
            )]);
        }
        Err(err) => {
            return Err(vec![Violation::new(
                "invalid",
                "",
                format!("invalid JSON: {err}"),
            )]);
        }
    };
    let action = match op.get("action") {
        Some(Value::String(action)) => Ok(action.clone()),
        None | Some(Value::Null) => Err(Violation::new("required", "action", "action is required")),
        Some(_) => Err(Violation::new(
            "invalid",
            "action",
            "action must be a string",
        )),
    };
    match op.get("type") {
        Some(Value::String(t)) if t == "person" => parse_person(op, action),
        Some(Value::String(t)) if t == "object" => parse_object(&op, action),
        Some(Value::String(t)) if t == "delivery" => parse_delivery(&op, action),
        None | Some(Value::Null) => Err(vec![Violation::new(
            "required",
            "type",
            "type is required (person, object or delivery)",
        )]),
        Some(_) => Err(vec![Violation::new(
            "invalid",
            "type",
            "type must be one of person, object, delivery",
        )]),
    }
}

fn optional_integer(op: &Map<String, Value>, name: &str, violations: &mut Vec<Violation>) {
    match op.get(name) {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_i64().is_some_and(|t| t >= 0) => {}
        Some(_) => violations.push(Violation::new(
            "invalid",
            name,
            format!("{name} must be a unix timestamp in seconds (a non-negative integer)"),
        )),
    }
}

fn relationships(
    op: &Map<String, Value>,
    required: bool,
    violations: &mut Vec<Violation>,
) -> Option<()> {
    match op.get("cio_relationships") {
        None | Some(Value::Null) if !required => Some(()),
        Some(Value::Array(items)) if !required || !items.is_empty() => {
            let all_objects = items.iter().all(Value::is_object);
            if !all_objects {
                violations.push(Violation::new(
                    "invalid",
                    "cio_relationships",
                    "each relationship must be an object with identifiers",
                ));
            }
            Some(())
        }
        None | Some(Value::Null) => {
            violations.push(Violation::new(
                "required",
                "cio_relationships",
                "cio_relationships is required",
            ));
            None
        }
        Some(_) => {
            violations.push(Violation::new(
                "invalid",
                "cio_relationships",
                "cio_relationships must be a non-empty array",
            ));
            None
        }
    }
}

fn parse_person(
    mut op: Map<String, Value>,
    action: Result<String, Violation>,
) -> Result<Op, Vec<Violation>> {
    let action = action.map_err(|v| vec![v])?;
    let mut violations = Vec::new();
    if action == "merge" {
        let primary = person_reference(op.get("primary"), "primary");
        let secondary = person_reference(op.get("secondary"), "secondary");
        return match (primary, secondary) {
            (Ok(primary), Ok(secondary)) => Ok(Op::Merge { primary, secondary }),
            (primary, secondary) => Err(primary.err().into_iter().chain(secondary.err()).collect()),
        };
    }
    let who = person_reference(op.get("identifiers"), "identifiers")
        .map_err(|v| violations.push(v))
        .ok();
    enum Kind {
        Identify(Map<String, Value>),
        Event(NewEvent),
        Delete,
        Suppress,
        Unsuppress,
        Accepted,
    }
    let kind = match action.as_str() {
        "identify" => {
            let attributes = match op.remove("attributes") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(attributes)) => attributes,
                Some(_) => {
                    violations.push(Violation::new(
                        "invalid",
                        "attributes",
                        "attributes must be an object",
                    ));
                    Map::new()
                }
            };
            violations.extend(attribute_violations(&attributes, "attributes."));
            optional_integer(&op, "timestamp", &mut violations);
            relationships(&op, false, &mut violations);
            Some(Kind::Identify(attributes))
        }
        "event" | "page" | "screen" => match parse_event(&op, "attributes", "") {
            Ok(event) => Some(Kind::Event(event)),
            Err(more) => {
                violations.extend(more);
                None
            }
        },
        "delete" => Some(Kind::Delete),
        "suppress" => Some(Kind::Suppress),
        "unsuppress" => Some(Kind::Unsuppress),
        "add_device" | "delete_device" => {
            let token = op
                .get("device")
                .and_then(|d| d.get("token"))
                .and_then(Value::as_str);
            if token.is_none_or(|t| t.trim().is_empty()) {
                violations.push(Violation::new(
                    "required",
                    "device.token",
                    "device.token is required",
                ));
            }
            Some(Kind::Accepted)
        }
        "add_relationships" | "delete_relationships" => {
            relationships(&op, true, &mut violations).map(|()| Kind::Accepted)
        }
        other => {
            violations.push(Violation::new(
                "invalid",
                "action",
                format!("unknown person action '{other}'"),
            ));
            None
        }
    };
    match (who, kind) {
        (Some(who), Some(kind)) if violations.is_empty() => Ok(match kind {
            Kind::Identify(attributes) => Op::Identify { who, attributes },
            Kind::Event(event) => Op::Event { who, event },
            Kind::Delete => Op::Delete(who),
            Kind::Suppress => Op::Suppress(who),
            Kind::Unsuppress => Op::Unsuppress(who),
            Kind::Accepted => Op::Accepted,
        }),
        _ => Err(violations),
    }
}

fn parse_object(
    op: &Map<String, Value>,
    action: Result<String, Violation>,
) -> Result<Op, Vec<Violation>> {
    let mut violations = Vec::new();
    match action {
        Ok(a)
            if [
                "identify",
                "identify_anonymous",
                "delete",
                "add_relationships",
                "delete_relationships",
            ]
            .contains(&a.as_str()) => {}
        Ok(a) => violations.push(Violation::new(
            "invalid",
            "action",
            format!("unknown object action '{a}'"),
        )),
        Err(v) => violations.push(v),
    }
    let identifiers = op.get("identifiers").and_then(Value::as_object);
    let has = |key: &str| {
        identifiers
            .and_then(|i| i.get(key))
            .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()) || v.is_number())
    };
    if !has("object_type_id") || !(has("object_id") || has("cio_object_id")) {
        violations.push(Violation::new(
            "required",
            "identifiers",
            "object identifiers need object_type_id and object_id",
        ));
    }
    if violations.is_empty() {
        Ok(Op::Accepted)
    } else {
        Err(violations)
    }
}

fn parse_delivery(
    op: &Map<String, Value>,
    action: Result<String, Violation>,
) -> Result<Op, Vec<Violation>> {
    let mut violations = Vec::new();
    match action {
        Ok(a) if a == "event" => {}
        Ok(_) => violations.push(Violation::new(
            "invalid",
            "action",
            "delivery operations support only the event action",
        )),
        Err(v) => violations.push(v),
    }
    fn text(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|s| !s.is_empty())
    }
    if text(op.get("identifiers").and_then(|i| i.get("id"))).is_none() {
        violations.push(Violation::new(
            "required",
            "identifiers.id",
            "identifiers.id (the delivery id) is required",
        ));
    }
    if !text(op.get("name")).is_some_and(|n| ["opened", "converted", "delivered"].contains(&n)) {
        violations.push(Violation::new(
            "invalid",
            "name",
            "name must be one of opened, converted, delivered",
        ));
    }
    if text(op.get("attributes").and_then(|a| a.get("device_token"))).is_none() {
        violations.push(Violation::new(
            "required",
            "attributes.device_token",
            "attributes.device_token is required",
        ));
    }
    if violations.is_empty() {
        Ok(Op::Accepted)
    } else {
        Err(violations)
    }
}

fn apply(world: &mut World, op: Op) {
    let now = chrono::Utc::now();
    match op {
        Op::Identify { who, attributes } => {
            let outcome = world.identify_as(who.0, &who.1, attributes, now.timestamp());
            tracing::debug!(identifier = %who.1, ?outcome, "v2 identify");
        }
        Op::Event { who, event } => {
            let outcome = world.person_event(who.0, &who.1, event, now);
            tracing::debug!(identifier = %who.1, ?outcome, "v2 event");
        }
        Op::Delete(who) => {
            world.delete_as(who.0, &who.1);
        }
        Op::Suppress(who) => world.suppress_as(who.0, &who.1),
        Op::Unsuppress(who) => world.unsuppress_as(who.0, &who.1),
        Op::Merge { primary, secondary } => {
            world.merge_people(
                (primary.0, &primary.1),
                (secondary.0, &secondary.1),
                now.timestamp(),
            );
        }
        Op::Accepted => {}
    }
}

fn bad_request(violations: Vec<Violation>) -> ApiError {
    ApiError::track_v2(StatusCode::BAD_REQUEST, violations)
}

/// Body bytes as UTF-8 text (JSON must be).
fn text(body: &Bytes) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| {
        bad_request(vec![Violation::new(
            "invalid",
            "",
            "request body must be UTF-8 JSON",
        )])
    })
}

/// `POST /api/v2/entity`: one op, at most 32 KiB; any violation is a 400.
pub(crate) async fn entity(
    State(sim): State<Simulator>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let op = parse_op(text(&body)?).map_err(bad_request)?;
    sim.with_world(|w| apply(w, op));
    Ok(Json(json!({})).into_response())
}

/// `POST /api/v2/batch`.
pub(crate) async fn batch(State(sim): State<Simulator>, body: Bytes) -> Result<Response, ApiError> {
    if body.len() > MAX_BATCH_BYTES {
        return Err(bad_request(vec![too_large(
            body.len(),
            MAX_BATCH_BYTES,
            "the batch request",
        )]));
    }
    // Parsed once, with each op kept as its raw text: an op's size is that of the JSON sent.
    let top: HashMap<String, &RawValue> = serde_json::from_str(text(&body)?).map_err(|err| {
        bad_request(vec![Violation::new(
            "invalid",
            "",
            format!("request body must be a JSON object: {err}"),
        )])
    })?;
    let ops: Vec<&RawValue> = match top.get("batch").map(|raw| raw.get().trim_start()) {
        Some(raw) if raw.starts_with('[') => serde_json::from_str(raw).map_err(|err| {
            bad_request(vec![Violation::new("invalid", "batch", err.to_string())])
        })?,
        None | Some("null") => {
            return Err(bad_request(vec![Violation::new(
                "required",
                "batch",
                "batch is required",
            )]));
        }
        Some(_) => {
            return Err(bad_request(vec![Violation::new(
                "invalid",
                "batch",
                "batch must be an array of operations",
            )]));
        }
    };
    if ops.is_empty() {
        return Err(bad_request(vec![Violation::new(
            "required",
            "batch",
            "batch must contain at least one operation",
        )]));
    }
    let mut errors = Vec::new();
    let mut valid = Vec::with_capacity(ops.len());
    for (index, raw) in ops.iter().enumerate() {
        match parse_op(raw.get()) {
            Ok(op) => valid.push(op),
            Err(violations) => errors.extend(violations.iter().map(|v| v.to_v2(Some(index)))),
        }
    }
    let applied = valid.len();
    sim.with_world(|w| valid.into_iter().for_each(|op| apply(w, op)));
    tracing::debug!(ops = ops.len(), applied, "v2 batch");
    if errors.is_empty() {
        Ok(Json(json!({})).into_response())
    } else {
        Ok((StatusCode::MULTI_STATUS, Json(json!({ "errors": errors }))).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(raw: &str) -> Vec<(String, &'static str)> {
        match parse_op(raw) {
            Ok(_) => Vec::new(),
            Err(v) => v.into_iter().map(|v| (v.field, v.reason)).collect(),
        }
    }

    #[test]
    fn person_ops_are_validated() {
        let ok = r#"{"type":"person","identifiers":{"id":"42"},"action":"identify","attributes":{"a":1}}"#;
        assert!(matches!(parse_op(ok), Ok(Op::Identify { .. })));
        let event = r#"{"type":"person","identifiers":{"email":"a@b.c"},"action":"event","name":"buy","attributes":{"x":1}}"#;
        assert!(matches!(parse_op(event), Ok(Op::Event { .. })));
        let merge = r#"{"type":"person","action":"merge","primary":{"id":"1"},"secondary":{"email":"x@y.z"}}"#;
        assert!(matches!(parse_op(merge), Ok(Op::Merge { .. })));

        let two = r#"{"type":"person","identifiers":{"id":"1","email":"a@b.c"},"action":"delete"}"#;
        assert_eq!(reasons(two), vec![("identifiers".to_owned(), "invalid")]);
        let phone = r#"{"type":"person","identifiers":{"phone":"+1555"},"action":"delete"}"#;
        assert_eq!(
            reasons(phone),
            vec![("identifiers.phone".to_owned(), "invalid")]
        );
        let nameless = r#"{"type":"person","identifiers":{"id":"1"},"action":"event"}"#;
        assert_eq!(reasons(nameless), vec![("name".to_owned(), "required")]);
        let unknown = r#"{"type":"person","identifiers":{"id":"1"},"action":"fly"}"#;
        assert_eq!(reasons(unknown), vec![("action".to_owned(), "invalid")]);
        let numeric = r#"{"type":"person","identifiers":{"id":42},"action":"delete"}"#;
        assert_eq!(
            reasons(numeric),
            vec![("identifiers.id".to_owned(), "invalid")]
        );
        assert_eq!(
            reasons(r#"{"identifiers":{"id":"1"},"action":"delete"}"#),
            vec![("type".to_owned(), "required")]
        );
        let device =
            r#"{"type":"person","identifiers":{"id":"1"},"action":"add_device","device":{}}"#;
        assert_eq!(
            reasons(device),
            vec![("device.token".to_owned(), "required")]
        );
    }

    #[test]
    fn objects_and_deliveries_are_validated() {
        let object = r#"{"type":"object","identifiers":{"object_type_id":"1","object_id":"acme"},"action":"identify"}"#;
        assert!(matches!(parse_op(object), Ok(Op::Accepted)));
        let bad = r#"{"type":"object","identifiers":{"object_id":"acme"},"action":"identify"}"#;
        assert!(parse_op(bad).is_err());
        let delivery = r#"{"type":"delivery","identifiers":{"id":"d1"},"action":"event","name":"opened","attributes":{"device_token":"t"}}"#;
        assert!(matches!(parse_op(delivery), Ok(Op::Accepted)));
        let bad = r#"{"type":"delivery","identifiers":{"id":"d1"},"action":"event","name":"clicked","attributes":{}}"#;
        assert_eq!(parse_op(bad).map_err(|v| v.len()).err(), Some(2));
    }

    #[test]
    fn oversized_op_is_rejected() {
        let big = format!(
            r#"{{"type":"person","identifiers":{{"id":"1"}},"action":"identify","attributes":{{"a":"{}"}}}}"#,
            "x".repeat(MAX_OP_BYTES)
        );
        assert_eq!(reasons(&big), vec![(String::new(), "too_large")]);
    }
}
