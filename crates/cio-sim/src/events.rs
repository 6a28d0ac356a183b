//! Events: the store behind [`crate::Simulator::events`] (with Customer.io's deduplication by
//! event `id`) and the field checks shared by the v1 event endpoints and the v2 event actions.
//!
//! Customer.io drops an event whose `id` (a ULID) it has already received in the workspace and
//! still answers 200; the store does the same and counts the drop. Event ids are compared in
//! canonical (upper-case) form, as ULIDs are case-insensitive. Seen ids are kept even when the
//! person the event belonged to is deleted, as deduplication is per workspace.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error_bodies::Violation;

/// Longest event name (bytes, after trimming leading and trailing spaces as Customer.io does).
pub(crate) const MAX_EVENT_NAME_BYTES: usize = 100;
/// Largest serialized event `data` object (bytes).
pub(crate) const MAX_EVENT_DATA_BYTES: usize = 100_000;

/// One event as recorded (see [`crate::Simulator::events`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimEvent {
    /// The person's id, `cio_<cio_id>` for a person without an id; `None` for anonymous events.
    /// Follows the person: an id assigned later (or a merge) shows here.
    pub person_id: Option<String>,
    /// `anonymous_id` of an anonymous event (`POST /api/v1/events`).
    pub anonymous_id: Option<String>,
    /// Event name (trimmed).
    pub name: String,
    /// Deduplication id (a ULID, upper-cased), if one was sent.
    pub id: Option<String>,
    /// `timestamp` as sent (unix seconds).
    pub timestamp: Option<i64>,
    /// Event data: v1 `data`, v2 `attributes`; `{}` when absent.
    pub data: Value,
    /// When the simulator received it.
    pub received_at: DateTime<Utc>,
}

/// A validated event, not yet recorded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewEvent {
    pub(crate) name: String,
    pub(crate) id: Option<String>,
    pub(crate) timestamp: Option<i64>,
    pub(crate) data: Value,
    pub(crate) anonymous_id: Option<String>,
}

/// What happened to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventOutcome {
    Recorded,
    /// Its `id` was seen before: dropped (answered 200 like Customer.io).
    Duplicate,
    /// Suppressed identifier or unknown `cio_id`: dropped.
    Dropped,
}

pub(crate) struct StoredEvent {
    /// Person sequence number; `None` for anonymous events.
    pub(crate) person: Option<u64>,
    pub(crate) anonymous_id: Option<String>,
    pub(crate) name: String,
    pub(crate) id: Option<String>,
    pub(crate) timestamp: Option<i64>,
    pub(crate) data: Value,
    pub(crate) received_at: DateTime<Utc>,
}

/// Recorded events in arrival order, a per-person index and the seen event ids.
#[derive(Default)]
pub(crate) struct EventStore {
    events: BTreeMap<u64, StoredEvent>,
    by_person: HashMap<u64, Vec<u64>>,
    seen_ids: HashSet<String>,
    next: u64,
    duplicates: u64,
}

impl EventStore {
    /// True (and counted as a dropped duplicate) when `id` was already received.
    pub(crate) fn check_duplicate(&mut self, id: Option<&str>) -> bool {
        let duplicate = id.is_some_and(|id| self.seen_ids.contains(id));
        if duplicate {
            self.duplicates += 1;
        }
        duplicate
    }

    pub(crate) fn insert(&mut self, person: Option<u64>, event: NewEvent, at: DateTime<Utc>) {
        let seq = self.next;
        self.next += 1;
        if let Some(id) = &event.id {
            self.seen_ids.insert(id.clone());
        }
        if let Some(person) = person {
            self.by_person.entry(person).or_default().push(seq);
        }
        self.events.insert(
            seq,
            StoredEvent {
                person,
                anonymous_id: event.anonymous_id,
                name: event.name,
                id: event.id,
                timestamp: event.timestamp,
                data: event.data,
                received_at: at,
            },
        );
    }

    /// Forgets a deleted person's events (their ids stay seen).
    pub(crate) fn remove_person(&mut self, person: u64) {
        for seq in self.by_person.remove(&person).unwrap_or_default() {
            self.events.remove(&seq);
        }
    }

    /// Moves a person's events to another person (merge).
    pub(crate) fn reassign(&mut self, from: u64, to: u64) {
        let moved = self.by_person.remove(&from).unwrap_or_default();
        for seq in &moved {
            if let Some(event) = self.events.get_mut(seq) {
                event.person = Some(to);
            }
        }
        let target = self.by_person.entry(to).or_default();
        target.extend(moved);
        target.sort_unstable();
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &StoredEvent> {
        self.events.values()
    }

    pub(crate) fn of_person(&self, person: u64) -> impl Iterator<Item = &StoredEvent> {
        self.by_person
            .get(&person)
            .into_iter()
            .flatten()
            .filter_map(|seq| self.events.get(seq))
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

/// A ULID: 26 Crockford base32 characters (case-insensitive, no I, L, O, U), the first at most
/// `7` (128 bits).
pub(crate) fn is_ulid(s: &str) -> bool {
    s.len() == 26
        && s.bytes().enumerate().all(|(i, b)| {
            let b = b.to_ascii_uppercase();
            let digit = b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b));
            digit && (i > 0 || (b'0'..=b'7').contains(&b))
        })
}

fn field(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// Checks the event fields of a v1 body (`data_field` = `"data"`) or a v2 op (`"attributes"`):
/// `name` required, at most 100 bytes after trimming; `data` an object of at most 100,000
/// serialized bytes; `timestamp` a non-negative integer; `id` a ULID. Every violation is
/// reported.
pub(crate) fn parse_event(
    obj: &Map<String, Value>,
    data_field: &str,
    prefix: &str,
) -> Result<NewEvent, Vec<Violation>> {
    let mut violations = Vec::new();
    let name = match obj.get("name") {
        Some(Value::String(name)) if !name.trim().is_empty() => {
            let name = name.trim();
            if name.len() > MAX_EVENT_NAME_BYTES {
                violations.push(Violation::new(
                    "too_long",
                    field(prefix, "name"),
                    format!(
                        "event name is {} bytes; the limit is {MAX_EVENT_NAME_BYTES} bytes",
                        name.len()
                    ),
                ));
            }
            name.to_owned()
        }
        None | Some(Value::Null) | Some(Value::String(_)) => {
            violations.push(Violation::new(
                "required",
                field(prefix, "name"),
                "event name is required",
            ));
            String::new()
        }
        Some(_) => {
            violations.push(Violation::new(
                "invalid",
                field(prefix, "name"),
                "event name must be a string",
            ));
            String::new()
        }
    };
    let data = match obj.get(data_field) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(data @ Value::Object(_)) => {
            let size = data.to_string().len();
            if size > MAX_EVENT_DATA_BYTES {
                violations.push(Violation::new(
                    "too_large",
                    field(prefix, data_field),
                    format!(
                        "event {data_field} is {size} bytes; the limit is {MAX_EVENT_DATA_BYTES} bytes"
                    ),
                ));
            }
            data.clone()
        }
        Some(_) => {
            violations.push(Violation::new(
                "invalid",
                field(prefix, data_field),
                format!("{data_field} must be an object"),
            ));
            Value::Null
        }
    };
    let timestamp = match obj.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_i64().is_some_and(|t| t >= 0) => n.as_i64(),
        Some(_) => {
            violations.push(Violation::new(
                "invalid",
                field(prefix, "timestamp"),
                "timestamp must be a unix timestamp in seconds (a non-negative integer)",
            ));
            None
        }
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if is_ulid(id) => Some(id.to_ascii_uppercase()),
        Some(_) => {
            violations.push(Violation::new(
                "invalid",
                field(prefix, "id"),
                "event id must be a ULID (26 Crockford base32 characters)",
            ));
            None
        }
    };
    if violations.is_empty() {
        Ok(NewEvent {
            name,
            id,
            timestamp,
            data,
            anonymous_id: None,
        })
    } else {
        Err(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn ulids_are_recognised() {
        assert!(is_ulid("01ARZ3NDEKTSV4RRFFQ69G5FAV"));
        assert!(is_ulid("01arz3ndektsv4rrffq69g5fav"));
        assert!(is_ulid("7ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert!(!is_ulid("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert!(!is_ulid("01ARZ3NDEKTSV4RRFFQ69G5FA"));
        assert!(!is_ulid("01ARZ3NDEKTSV4RRFFQ69G5FAU"));
        assert!(!is_ulid("customer-42-purchase-000001"));
    }

    #[test]
    fn event_fields_are_checked() {
        let ok = parse_event(
            &obj(
                json!({"name": "  buy ", "data": {"a": 1}, "timestamp": 5, "id": "01arz3ndektsv4rrffq69g5fav"}),
            ),
            "data",
            "",
        );
        assert_eq!(
            ok.map(|e| (e.name, e.id, e.timestamp)),
            Ok((
                "buy".to_owned(),
                Some("01ARZ3NDEKTSV4RRFFQ69G5FAV".to_owned()),
                Some(5)
            ))
        );
        let bad = parse_event(
            &obj(json!({"name": "x".repeat(101), "data": [1], "timestamp": "now", "id": 7})),
            "data",
            "",
        );
        assert_eq!(bad.map_err(|v| v.len()), Err(4));
        let missing = parse_event(&obj(json!({"name": "   "})), "data", "");
        assert!(missing.is_err());
        let big = json!({"name": "n", "data": {"blob": "x".repeat(MAX_EVENT_DATA_BYTES)}});
        assert!(parse_event(&obj(big), "data", "").is_err());
    }

    #[test]
    fn store_dedups_and_follows_people() {
        let mut store = EventStore::default();
        let event = |id: Option<&str>| NewEvent {
            name: "e".into(),
            id: id.map(str::to_owned),
            timestamp: None,
            data: json!({}),
            anonymous_id: None,
        };
        let now = Utc::now();
        assert!(!store.check_duplicate(Some("A")));
        store.insert(Some(1), event(Some("A")), now);
        assert!(store.check_duplicate(Some("A")));
        assert!(!store.check_duplicate(None));
        store.insert(Some(2), event(None), now);
        store.insert(None, event(None), now);
        assert_eq!((store.len(), store.duplicates()), (3, 1));
        store.reassign(2, 1);
        assert_eq!(store.of_person(1).count(), 2);
        store.remove_person(1);
        assert_eq!(store.len(), 1);
        assert!(store.check_duplicate(Some("A")), "ids stay seen");
    }
}
