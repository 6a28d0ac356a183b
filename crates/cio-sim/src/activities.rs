//! The activity feed (journeys-api-2022 `GET /v1/activities` and
//! `GET /v1/customers/{customer_id}/activities`): what happened to people, newest first.
//!
//! Activities:
//! - `attribute_change`: one per attribute whose value changed, from any source (Track v1/v2
//!   identify, merges, the control API's upserts and "form fills"); `data` is
//!   `{"<attribute>": {"from": "old", "to": "new"}}` with values as Customer.io stores them
//!   (text; `""` when absent before or removed). `id` and `email` count as attributes. A value
//!   set again unchanged (also `80` over `"80"`) records nothing. The demo workspace's initial
//!   people record none.
//! - `event` (Track events of a person; `data` is the event's data).
//! - `sent_email`, `delivered_email`, `bounced_email`, `opened_email` (the first open, of
//!   either kind, or inferred from a click), `clicked_email` (first click), `converted_email`,
//!   `spammed_email`, `unsubscribed_email`: from the delivery ledger, each at the time it
//!   happened; `data` is `{"delivery_id", "delivered": unix|null, "opened": bool|null}` as of
//!   the request (`opened` null until delivered); `delivery_id` and `delivery_type` (`email`)
//!   are set.
//!
//! Each activity has `id` (a ULID: its time on the simulator's internal clock and a stable
//! random part, unique and the same on every read), `customer_id` (null for a person without
//! one), `customer_identifiers` `{"id","email","cio_id"}`, `type`, `timestamp` (unix seconds),
//! `data`, `delivery_id` and `delivery_type` (null unless a delivery), and `name` (attribute or
//! event name; not in the spec's schema, kept because the `name` filter reads it).
//!
//! Query: `type` (one of the spec's activity types, else 400), `name` (exact), `customer_id`
//! with `id_type` (`id` default, `email`, `cio_id`; on `/v1/activities` an unknown person
//! gives an empty list, on the customer route a 404), `limit` 1..=100 (default 10; else 400),
//! `start` (the `next` of the previous page; anything else is a 400), `deleted` (accepted;
//! activities of deleted people are gone with them, as their events are).
//!
//! Order and paging (the spec states neither): newest first, like the activity log; `next` is
//! an opaque cursor after the page's last activity, `""` on the last page. Activities that
//! happen after the first page was read appear at the top, so a reader that pages down to the
//! end never misses or repeats one; an incremental reader reads from the top until it meets
//! an id it has seen.
//!
//! Window: only activities of the last 30 days (on the simulator's clock, which
//! [`crate::Simulator::advance`] moves) are served, the docs' guarantee. A `start` cursor that
//! points past the window (older than 30 days by now) is not an error: it answers an empty page
//! with `next` `""`, as the listing has simply ended.

use std::collections::HashMap;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use ulid::Ulid;

use crate::Simulator;
use crate::auth::require_app;
use crate::campaigns_api::{not_found, query_map};
use crate::error_bodies::ApiError;
use crate::sends::{Delivery, DeliveryMetric};
use crate::state::{IdType, World};

/// How far back activities are served (Customer.io guarantees 30 days).
pub const ACTIVITY_WINDOW_SECS: i64 = 30 * 24 * 60 * 60;
const WINDOW_MS: i64 = ACTIVITY_WINDOW_SECS * 1000;
/// Default and largest page size.
pub(crate) const ACTIVITIES_DEFAULT_LIMIT: usize = 10;
pub(crate) const ACTIVITIES_MAX_LIMIT: usize = 100;

/// Every activity type the spec lists (the `type` filter accepts exactly these).
pub(crate) const ACTIVITY_TYPES: &[&str] = &[
    "page",
    "event",
    "attribute_change",
    "failed_attribute_change",
    "stripe_event",
    "drafted_email",
    "failed_email",
    "dropped_email",
    "sent_email",
    "spammed_email",
    "bounced_email",
    "delivered_email",
    "triggered_email",
    "opened_email",
    "clicked_email",
    "converted_email",
    "unsubscribed_email",
    "attempted_email",
    "undeliverable_email",
    "device_change",
    "attempted_action",
    "drafted_action",
    "sent_action",
    "delivered_action",
    "bounced_action",
    "failed_action",
    "converted_action",
    "undeliverable_action",
    "opened_action",
    "secondary:dropped_email",
    "secondary:spammed_email",
    "secondary:bounced_email",
    "secondary:delivered_email",
    "secondary:opened_email",
    "secondary:clicked_email",
    "secondary:failed_email",
];

/// The activity type of a ledger metric (`None`: not an activity of its own).
pub(crate) fn delivery_activity(metric: DeliveryMetric) -> Option<&'static str> {
    Some(match metric {
        DeliveryMetric::Sent => "sent_email",
        DeliveryMetric::Delivered => "delivered_email",
        DeliveryMetric::Bounced => "bounced_email",
        DeliveryMetric::Opened => "opened_email",
        DeliveryMetric::Clicked => "clicked_email",
        DeliveryMetric::Converted => "converted_email",
        DeliveryMetric::Spammed => "spammed_email",
        DeliveryMetric::Unsubscribed => "unsubscribed_email",
        DeliveryMetric::HumanOpened
        | DeliveryMetric::PrefetchOpened
        | DeliveryMetric::HumanClicked
        | DeliveryMetric::PrefetchClicked => return None,
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    AttributeChange { from: String, to: String },
    Event { data: Value },
}

#[derive(Debug, Clone)]
struct Stored {
    seq: u64,
    person: u64,
    name: String,
    kind: Kind,
    at_ms: i64,
}

/// Recorded activities (attribute changes and events); delivery activities are read from the
/// ledger.
pub(crate) struct ActivityStore {
    items: Vec<Stored>,
    next_seq: u64,
    recording: bool,
}

impl Default for ActivityStore {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            next_seq: 1,
            recording: true,
        }
    }
}

impl ActivityStore {
    /// Turns recording off (demo population) or back on.
    pub(crate) fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    fn push(&mut self, person: u64, name: &str, kind: Kind, at_ms: i64) {
        if !self.recording {
            return;
        }
        // Forget what can no longer be served (kept in time order, oldest first).
        let horizon = at_ms.saturating_sub(2 * WINDOW_MS);
        if self.items.first().is_some_and(|a| a.at_ms < horizon) {
            self.items.retain(|a| a.at_ms >= horizon);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.items.push(Stored {
            seq,
            person,
            name: name.to_owned(),
            kind,
            at_ms,
        });
    }

    /// A deleted person's activities go with them.
    pub(crate) fn remove_person(&mut self, person: u64) {
        self.items.retain(|a| a.person != person);
    }

    /// A merge: the secondary's activities become the primary's.
    pub(crate) fn reassign(&mut self, from: u64, to: u64) {
        for a in &mut self.items {
            if a.person == from {
                a.person = to;
            }
        }
    }
}

/// SplitMix64 finaliser: a stable hash of its input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A ULID whose time is `at_ms`: like a monotonic ULID generator's, the random part orders the
/// activities of one millisecond (by `tag`, then `ordinal`), and a stable hash of `salt`
/// fills the rest.
pub(crate) fn stable_ulid(at_ms: i64, tag: u8, ordinal: u64, salt: &[u64]) -> Ulid {
    let mut h = 0x0123_4567_89AB_CDEF_u64 ^ ordinal;
    for part in salt {
        h = mix(h ^ part);
    }
    let random = (u128::from(tag) << 72)
        | (u128::from(ordinal & 0xFF_FFFF_FFFF) << 32)
        | u128::from(h & 0xFFFF_FFFF);
    Ulid::from_parts(u64::try_from(at_ms).unwrap_or(0), random)
}

const STORED_TAG: u8 = 0xA7;
const DELIVERY_TAG: u8 = 0xDE;

/// One activity, ready to be shown.
pub(crate) struct View {
    pub(crate) id: Ulid,
    pub(crate) person: u64,
    pub(crate) kind: &'static str,
    pub(crate) name: Option<String>,
    pub(crate) at_ms: i64,
    pub(crate) data: Value,
    pub(crate) delivery_id: Option<String>,
}

/// Which activities a listing wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wanted {
    pub(crate) person: Option<u64>,
    pub(crate) kind: Option<String>,
    pub(crate) name: Option<String>,
}

impl Wanted {
    fn accepts(&self, kind: &str, name: Option<&str>) -> bool {
        self.kind.as_deref().is_none_or(|k| k == kind)
            && self.name.as_deref().is_none_or(|n| Some(n) == name)
    }
}

fn delivery_data(world: &World, d: &Delivery, now: i64) -> Value {
    let happened = |m: DeliveryMetric| {
        d.events
            .iter()
            .find(|(metric, at)| *metric == m && *at <= now)
            .map(|(_, at)| *at)
    };
    let delivered = happened(DeliveryMetric::Delivered);
    json!({
        "delivery_id": d.id,
        "delivered": delivered.map(|at| world.sends.present_secs(at)),
        "opened": delivered.map(|_| happened(DeliveryMetric::Opened).is_some()),
    })
}

impl World {
    /// Records one attribute change of a person (nothing when the text is unchanged).
    pub(crate) fn record_attribute_change(
        &mut self,
        person: u64,
        name: &str,
        from: &Value,
        to: &Value,
    ) {
        let (from, to) = (
            crate::exports::attribute_text(from),
            crate::exports::attribute_text(to),
        );
        if from == to {
            return;
        }
        let at = self.sends.now_ms();
        self.activities
            .push(person, name, Kind::AttributeChange { from, to }, at);
    }

    /// Records a person's event.
    pub(crate) fn record_event_activity(&mut self, person: u64, name: &str, data: &Value) {
        let at = self.sends.now_ms();
        self.activities
            .push(person, name, Kind::Event { data: data.clone() }, at);
    }

    /// The activities wanted that the window holds, newest first, strictly older than
    /// `before` (a previous page's last id); at most `limit`, and whether more follow.
    pub(crate) fn activities_page(
        &self,
        wanted: &Wanted,
        before: Option<Ulid>,
        limit: usize,
    ) -> (Vec<View>, bool) {
        let now = self.sends.now_ms();
        let oldest = now.saturating_sub(WINDOW_MS);
        let seed = self.sends.seed();
        let in_range =
            |id: &Ulid, at: i64| at <= now && at >= oldest && before.is_none_or(|b| *id < b);
        let mut found: Vec<View> = Vec::new();
        for a in &self.activities.items {
            if wanted.person.is_some_and(|p| p != a.person) || self.person(a.person).is_none() {
                continue;
            }
            let (kind, data) = match &a.kind {
                Kind::AttributeChange { from, to } => (
                    "attribute_change",
                    json!({ a.name.clone(): { "from": from, "to": to } }),
                ),
                Kind::Event { data } => ("event", data.clone()),
            };
            if !wanted.accepts(kind, Some(&a.name)) {
                continue;
            }
            let id = stable_ulid(a.at_ms, STORED_TAG, a.seq, &[seed]);
            if in_range(&id, a.at_ms) {
                found.push(View {
                    id,
                    person: a.person,
                    kind,
                    name: Some(a.name.clone()),
                    at_ms: a.at_ms,
                    data,
                    delivery_id: None,
                });
            }
        }
        if wanted.name.is_none() {
            let deliveries: Box<dyn Iterator<Item = &Delivery>> = match wanted.person {
                Some(p) => Box::new(self.sends.ledger_of(p)),
                None => Box::new(self.sends.ledger().iter()),
            };
            for d in deliveries {
                if self.person(d.person_seq).is_none() {
                    continue;
                }
                for (metric, at) in &d.events {
                    let Some(kind) = delivery_activity(*metric) else {
                        continue;
                    };
                    if !wanted.accepts(kind, None) {
                        continue;
                    }
                    let ordinal = (d.seq as u64) << 4 | *metric as u64;
                    let id = stable_ulid(*at, DELIVERY_TAG, ordinal, &[seed]);
                    if in_range(&id, *at) {
                        found.push(View {
                            id,
                            person: d.person_seq,
                            kind,
                            name: None,
                            at_ms: *at,
                            data: delivery_data(self, d, now),
                            delivery_id: Some(d.id.clone()),
                        });
                    }
                }
            }
        }
        found.sort_unstable_by_key(|v| std::cmp::Reverse(v.id));
        let more = found.len() > limit;
        found.truncate(limit);
        (found, more)
    }

    pub(crate) fn activity_json(&self, v: &View) -> Value {
        let person = self.person(v.person);
        let identifiers = person.map_or_else(
            || json!({ "id": null, "email": null, "cio_id": null }),
            |p| json!({ "id": p.id, "email": p.email, "cio_id": p.cio_id }),
        );
        let mut out = json!({
            "id": v.id.to_string(),
            "customer_id": person.and_then(|p| p.id.clone()),
            "customer_identifiers": identifiers,
            "type": v.kind,
            "timestamp": self.sends.present_secs(v.at_ms),
            "data": v.data,
            "delivery_id": v.delivery_id,
            "delivery_type": v.delivery_id.as_ref().map(|_| "email"),
        });
        if let (Some(name), Some(obj)) = (&v.name, out.as_object_mut()) {
            obj.insert("name".to_owned(), json!(name));
        }
        out
    }

    pub(crate) fn activity_snapshot(&self, v: &View) -> SimActivity {
        SimActivity {
            id: v.id.to_string(),
            person_id: self.person(v.person).map(crate::state::Person::public_id),
            kind: v.kind.to_owned(),
            name: v.name.clone(),
            timestamp: self.sends.present(v.at_ms),
            data: v.data.clone(),
            delivery_id: v.delivery_id.clone(),
        }
    }
}

/// One activity as the feed shows it ([`crate::Simulator::activities`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimActivity {
    /// Activity id (a ULID).
    pub id: String,
    /// The person's id (`cio_<cio_id>` without one).
    pub person_id: Option<String>,
    /// Activity type (`attribute_change`, `event`, `opened_email`, ...).
    pub kind: String,
    /// Attribute or event name.
    pub name: Option<String>,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// `data` as served.
    pub data: Value,
    /// Delivery activities: the delivery.
    pub delivery_id: Option<String>,
}

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route("/v1/activities", get(list))
        .route(
            "/v1/customers/{customer_id}/activities",
            get(customer_activities),
        )
        .route_layer(from_fn_with_state(sim.clone(), require_app))
}

type AppResult = Result<Response, ApiError>;

fn parameter(name: &str, detail: impl Into<String>) -> ApiError {
    ApiError::app(
        StatusCode::BAD_REQUEST,
        detail,
        Some(json!({ "parameter": name })),
    )
}

const CURSOR_PREFIX: &str = "act1:";

fn encode_cursor(id: Ulid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{id}"))
}

fn decode_cursor(raw: &str) -> Option<Ulid> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    Ulid::from_string(text.strip_prefix(CURSOR_PREFIX)?).ok()
}

/// A page size parameter within `1..=max` (`default` when absent).
pub(crate) fn limit_param(
    query: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match query
        .get("limit")
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
    {
        None => Ok(default),
        Some(raw) => raw
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| {
                parameter(
                    "limit",
                    format!("limit must be an integer between 1 and {max}"),
                )
            }),
    }
}

pub(crate) fn id_type_param(query: &HashMap<String, String>) -> Result<IdType, ApiError> {
    IdType::parse(query.get("id_type").map(String::as_str))
        .ok_or_else(|| parameter("id_type", "id_type must be one of id, email, cio_id"))
}

struct Listing {
    wanted: Wanted,
    before: Option<Ulid>,
    limit: usize,
}

fn listing(query: &HashMap<String, String>) -> Result<Listing, ApiError> {
    let kind = match query
        .get("type")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
    {
        None => None,
        Some(t) if ACTIVITY_TYPES.contains(&t) => Some(t.to_owned()),
        Some(t) => {
            return Err(parameter(
                "type",
                format!("type {t:?} is not an activity type"),
            ));
        }
    };
    let before = match query
        .get("start")
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(raw) => Some(decode_cursor(raw).ok_or_else(|| {
            parameter(
                "start",
                "start is not a valid cursor: pass the `next` value of the previous page",
            )
        })?),
    };
    if let Some(deleted) = query.get("deleted")
        && !["true", "false"].contains(&deleted.as_str())
    {
        return Err(parameter("deleted", "deleted must be true or false"));
    }
    Ok(Listing {
        wanted: Wanted {
            person: None,
            kind,
            name: query.get("name").cloned().filter(|n| !n.is_empty()),
        },
        before,
        limit: limit_param(query, ACTIVITIES_DEFAULT_LIMIT, ACTIVITIES_MAX_LIMIT)?,
    })
}

fn page_json(world: &World, listing: &Listing) -> Value {
    let (page, more) = world.activities_page(&listing.wanted, listing.before, listing.limit);
    let next = match (more, page.last()) {
        (true, Some(last)) => encode_cursor(last.id),
        _ => String::new(),
    };
    let activities: Vec<Value> = page.iter().map(|v| world.activity_json(v)).collect();
    json!({ "activities": activities, "next": next })
}

async fn list(
    State(sim): State<Simulator>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let query = query_map(query)?;
    let mut listing = listing(&query)?;
    let id_type = id_type_param(&query)?;
    let customer = query
        .get("customer_id")
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let body = sim.with_world(|w| {
        w.settle_sends();
        if let Some(customer) = &customer {
            match w.resolve(customer, id_type) {
                Some(seq) => listing.wanted.person = Some(seq),
                None => return json!({ "activities": [], "next": "" }),
            }
        }
        page_json(w, &listing)
    });
    Ok(Json(body).into_response())
}

async fn customer_activities(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let Ok(Path(customer)) = path else {
        return Err(not_found("customer"));
    };
    let query = query_map(query)?;
    let mut listing = listing(&query)?;
    let id_type = id_type_param(&query)?;
    let body = sim.with_world(|w| {
        w.settle_sends();
        let seq = w.resolve(&customer, id_type)?;
        listing.wanted.person = Some(seq);
        Some(page_json(w, &listing))
    });
    let body = body.ok_or_else(|| not_found("customer"))?;
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_ulids_sort_by_time_then_hash() {
        let a = stable_ulid(1_000, 1, 5, &[2]);
        assert_eq!(a, stable_ulid(1_000, 1, 5, &[2]));
        assert_ne!(a, stable_ulid(1_000, 1, 5, &[3]));
        assert!(stable_ulid(999, 9, 9, &[9]) < a);
        assert!(
            stable_ulid(1_000, 1, 4, &[9]) < a,
            "the ordinal orders one millisecond"
        );
        assert_eq!(a.timestamp_ms(), 1_000);
        assert_eq!(decode_cursor(&encode_cursor(a)), Some(a));
        assert_eq!(decode_cursor("nope"), None);
    }
}
