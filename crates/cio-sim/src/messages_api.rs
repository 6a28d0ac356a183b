//! App API: deliveries ("messages") from the delivery ledger (journeys-api-2022).
//!
//! | route | lists |
//! |---|---|
//! | `GET /v1/campaigns/{campaign_id}/messages` | a campaign's deliveries (404 unless a campaign) |
//! | `GET /v1/broadcasts/{broadcast_id}/messages` | an API-triggered broadcast's, all triggers (404 unless a broadcast) |
//! | `GET /v1/newsletters/{newsletter_id}/messages` | a newsletter's (404 unknown) |
//! | `GET /v1/customers/{customer_id}/messages` | one person's (`id_type`; 404 unknown person) |
//!
//! Answer: `{"messages":[message],"next":cursor|""}`, newest first (the spec states no order;
//! the UI lists messages newest first). A message: `id` (the delivery id), `deduplicate_id`,
//! `message_template_id` (the action, or the newsletter content), `customer_id` (null for a
//! person without one or deleted since), `customer_identifiers` `{"id","email","cio_id"}`,
//! `recipient`, `subject`, `metrics` (unix times of what has happened by now, only those:
//! `created` and `sent` at the send, then `delivered`, `opened` (first open of either kind,
//! or inferred from a click), `clicked` (first click), `converted`, `bounced`, `spammed`,
//! `unsubscribed`), `created`, `failure_message` (bounces; else null), every parent key
//! (`campaign_id`, `action_id`, `broadcast_id`, `newsletter_id`, `content_id`; null unless a
//! parent of this delivery, as the spec describes), `type` (`email`), `forgotten` (false).
//! There is no `trigger_id` in the spec's message object, so none here: a broadcast delivery
//! is tied to its trigger by reporting webhooks (`trigger_id`) or by its `created` time.
//!
//! Query (400 with `source.parameter` when invalid): `limit` 1..=1000 (default 50), `start`
//! (the previous `next`), `metric` (one of the spec's: only deliveries that reached it;
//! `created`/`sent`: all; `attempted`, `dropped`, `failed`, `undeliverable` never happen here),
//! `type` (the spec's channels; only `email` exists here), `state` on broadcasts (`sent`: all;
//! `failed`, `drafted`, `attempted`: none), `drafts` (a boolean, accepted). The customer route
//! takes `id_type`, `start`, `limit` only.

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
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::activities::{id_type_param, limit_param};
use crate::auth::require_app;
use crate::campaigns_api::{not_found, path_id, query_map};
use crate::error_bodies::ApiError;
use crate::sends::{CampaignKind, Delivery, DeliveryMetric, Scope, Source};
use crate::state::World;

/// Default and largest page size.
pub(crate) const MESSAGES_DEFAULT_LIMIT: usize = 50;
pub(crate) const MESSAGES_MAX_LIMIT: usize = 1000;

/// What a bounced delivery reports.
pub(crate) const BOUNCE_MESSAGE: &str =
    "550 5.1.1 The email account that you tried to reach does not exist";

/// The `metric` values the spec lists.
const METRICS: &[&str] = &[
    "created",
    "attempted",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "converted",
    "bounced",
    "spammed",
    "unsubscribed",
    "dropped",
    "failed",
    "undeliverable",
];
const TYPES: &[&str] = &[
    "email",
    "webhook",
    "twilio",
    "urban_airship",
    "slack",
    "push",
];
const STATES: &[&str] = &["failed", "sent", "drafted", "attempted"];

/// The ledger metric a message `metrics` key reads (`created` is the send).
fn ledger_metric(name: &str) -> Option<DeliveryMetric> {
    Some(match name {
        "created" | "sent" => DeliveryMetric::Sent,
        "delivered" => DeliveryMetric::Delivered,
        "opened" => DeliveryMetric::Opened,
        "clicked" => DeliveryMetric::Clicked,
        "converted" => DeliveryMetric::Converted,
        "bounced" => DeliveryMetric::Bounced,
        "spammed" => DeliveryMetric::Spammed,
        "unsubscribed" => DeliveryMetric::Unsubscribed,
        _ => return None,
    })
}

const SHOWN_METRICS: [&str; 9] = [
    "created",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "converted",
    "bounced",
    "spammed",
    "unsubscribed",
];

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    Router::new()
        .route(
            "/v1/campaigns/{campaign_id}/messages",
            get(campaign_messages),
        )
        .route(
            "/v1/broadcasts/{broadcast_id}/messages",
            get(broadcast_messages),
        )
        .route(
            "/v1/newsletters/{newsletter_id}/messages",
            get(newsletter_messages),
        )
        .route(
            "/v1/customers/{customer_id}/messages",
            get(customer_messages),
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

const CURSOR_PREFIX: &str = "msg1:";

fn encode_cursor(seq: usize) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{seq}"))
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

/// A message's happened metric, if it has.
fn happened(d: &Delivery, metric: DeliveryMetric, now: i64) -> Option<i64> {
    d.events
        .iter()
        .find(|(m, at)| *m == metric && *at <= now)
        .map(|(_, at)| *at)
}

pub(crate) fn message_json(world: &World, d: &Delivery, now: i64) -> Value {
    let store = &world.sends;
    let created = store.present_secs(d.sent_ms);
    let mut metrics = Map::new();
    for name in SHOWN_METRICS {
        if let Some(at) = ledger_metric(name).and_then(|m| happened(d, m, now)) {
            metrics.insert(name.to_owned(), json!(store.present_secs(at)));
        }
    }
    let (campaign_id, broadcast_id, _, newsletter_id, content_id) = d.source_ids();
    let action_id = match d.source {
        Source::Campaign { action_id, .. } | Source::Broadcast { action_id, .. } => Some(action_id),
        Source::Newsletter { .. } => None,
    };
    let person = world.person(d.person_seq);
    let identifiers = match person {
        Some(p) => json!({ "id": p.id, "email": p.email, "cio_id": p.cio_id }),
        None => {
            let id = (!d.person_id.starts_with("cio_")).then(|| d.person_id.clone());
            json!({ "id": id, "email": d.email, "cio_id": d.cio_id })
        }
    };
    let bounced = happened(d, DeliveryMetric::Bounced, now).is_some();
    json!({
        "id": d.id,
        "deduplicate_id": format!("{}:{created}", d.id),
        "message_template_id": action_id.or(content_id),
        "customer_id": person.and_then(|p| p.id.clone()),
        "customer_identifiers": identifiers,
        "recipient": d.email,
        "subject": &*d.subject,
        "metrics": metrics,
        "created": created,
        "failure_message": bounced.then_some(BOUNCE_MESSAGE),
        "campaign_id": campaign_id,
        "action_id": action_id,
        "broadcast_id": broadcast_id,
        "newsletter_id": newsletter_id,
        "content_id": content_id,
        "type": "email",
        "forgotten": false,
    })
}

struct Listing {
    before: Option<usize>,
    limit: usize,
    /// `None`: no filter; `Some(None)`: a metric that never happens here.
    metric: Option<Option<DeliveryMetric>>,
    /// A channel or state nothing here has.
    nothing: bool,
}

fn listing(query: &HashMap<String, String>, with_filters: bool) -> Result<Listing, ApiError> {
    let param = |name: &str| query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let limit = limit_param(query, MESSAGES_DEFAULT_LIMIT, MESSAGES_MAX_LIMIT)?;
    let before = match param("start") {
        None => None,
        Some(raw) => Some(decode_cursor(raw).ok_or_else(|| {
            parameter(
                "start",
                "start is not a valid cursor: pass the `next` value of the previous page",
            )
        })?),
    };
    let mut listing = Listing {
        before,
        limit,
        metric: None,
        nothing: false,
    };
    if !with_filters {
        return Ok(listing);
    }
    if let Some(metric) = param("metric") {
        if !METRICS.contains(&metric) {
            return Err(parameter(
                "metric",
                format!("metric must be one of {}", METRICS.join(", ")),
            ));
        }
        listing.metric = Some(ledger_metric(metric));
    }
    if let Some(kind) = param("type") {
        if !TYPES.contains(&kind) {
            return Err(parameter(
                "type",
                format!("type must be one of {}", TYPES.join(", ")),
            ));
        }
        listing.nothing |= kind != "email";
    }
    if let Some(state) = param("state") {
        if !STATES.contains(&state) {
            return Err(parameter(
                "state",
                format!("state must be one of {}", STATES.join(", ")),
            ));
        }
        listing.nothing |= state != "sent";
    }
    if let Some(drafts) = param("drafts")
        && !["true", "false"].contains(&drafts)
    {
        return Err(parameter("drafts", "drafts must be true or false"));
    }
    Ok(listing)
}

fn page<'a>(
    world: &World,
    deliveries: impl DoubleEndedIterator<Item = &'a Delivery>,
    listing: &Listing,
) -> Value {
    let now = world.sends.now_ms();
    let mut chosen: Vec<&Delivery> = Vec::new();
    let mut more = false;
    if !listing.nothing {
        for d in deliveries.rev() {
            if listing.before.is_some_and(|b| d.seq >= b) {
                continue;
            }
            let wanted = match listing.metric {
                None => true,
                Some(None) => false,
                Some(Some(metric)) => happened(d, metric, now).is_some(),
            };
            if !wanted {
                continue;
            }
            if chosen.len() == listing.limit {
                more = true;
                break;
            }
            chosen.push(d);
        }
    }
    let next = match (more, chosen.last()) {
        (true, Some(last)) => encode_cursor(last.seq),
        _ => String::new(),
    };
    let messages: Vec<Value> = chosen.iter().map(|d| message_json(world, d, now)).collect();
    json!({ "messages": messages, "next": next })
}

fn one_id(path: Result<Path<String>, PathRejection>, what: &str) -> Result<i64, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(not_found(what));
    };
    path_id(&raw, what)
}

fn scoped(
    sim: &Simulator,
    scope: Scope,
    exists: impl FnOnce(&World) -> bool,
    what: &str,
    query: &HashMap<String, String>,
) -> AppResult {
    let listing = listing(query, true)?;
    let body = sim.with_world(|w| {
        w.settle_sends();
        if !exists(w) {
            return None;
        }
        let deliveries = w.sends.ledger_of_scope(scope);
        Some(page(w, deliveries.into_iter(), &listing))
    });
    let body = body.ok_or_else(|| not_found(what))?;
    Ok(Json(body).into_response())
}

async fn campaign_messages(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = one_id(path, "campaign")?;
    let query = query_map(query)?;
    let exists = |w: &World| {
        w.sends
            .campaign(id)
            .is_some_and(|c| c.kind == CampaignKind::Campaign)
    };
    scoped(&sim, Scope::Campaign(id), exists, "campaign", &query)
}

async fn broadcast_messages(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = one_id(path, "broadcast")?;
    let query = query_map(query)?;
    let exists = |w: &World| {
        w.sends
            .campaign(id)
            .is_some_and(|c| c.kind == CampaignKind::Broadcast)
    };
    scoped(&sim, Scope::Campaign(id), exists, "broadcast", &query)
}

async fn newsletter_messages(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let id = one_id(path, "newsletter")?;
    let query = query_map(query)?;
    let exists = |w: &World| w.sends.newsletter(id).is_some();
    scoped(&sim, Scope::Newsletter(id), exists, "newsletter", &query)
}

async fn customer_messages(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> AppResult {
    let Ok(Path(customer)) = path else {
        return Err(not_found("customer"));
    };
    let query = query_map(query)?;
    let id_type = id_type_param(&query)?;
    let listing = listing(&query, false)?;
    let body = sim.with_world(|w| {
        w.settle_sends();
        let seq = w.resolve(&customer, id_type)?;
        Some(page(w, w.sends.ledger_of(seq), &listing))
    });
    let body = body.ok_or_else(|| not_found("customer"))?;
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("42"), None);
        assert_eq!(ledger_metric("created"), Some(DeliveryMetric::Sent));
        assert_eq!(ledger_metric("failed"), None);
    }
}
