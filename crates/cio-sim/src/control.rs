//! Control API under `/_sim/` for out-of-process use (binary, docker-compose, smoke tests).
//! Not authenticated, not rate limited, not faulted, not logged.
//!
//! | route | effect |
//! |---|---|
//! | `GET /_sim/health` | `{"status":"ok","people":n,"segments":n}` |
//! | `GET /_sim/stats` | `{"people","segments","events","duplicate_events_dropped","requests":{"app","track","by_route":{"POST /api/v2/batch":n,..}},"request_log":{"len","capacity"}}` |
//! | `GET /_sim/events[?person=id\|email\|cio_x][&anonymous_id=a]` | `{"events":[..]}` oldest first (unknown person: `[]`) |
//! | `GET /_sim/requests[?api=app\|track]` / `DELETE /_sim/requests` | request log / clear it |
//! | `POST /_sim/faults` | `{"api":"app"\|"track"\|null,"faults":[..],"chaos":{..}}` (see below) |
//! | `DELETE /_sim/faults` | clear queued faults and chaos |
//! | `GET /_sim/rate-limits`, `POST /_sim/rate-limits` | `{"app":10,"track":1000,"app_mode":"rolling"\|"token_bucket","track_mode":..,"trigger_interval_ms":10000,"trigger_scope":"workspace"\|"per_broadcast"}` (each key optional) |
//! | `GET /_sim/workspace`, `POST /_sim/workspace` | `{"region":"us","endpoint_region":"us","subscription_center":false}`; set `{"endpoint_region":"us"\|"eu"\|null,"subscription_center":bool}` (each optional; `null`: the workspace's region) |
//! | `GET /_sim/segments`, `POST /_sim/segments` | list; create `{"name","description","predicate"?}` (no predicate = manual) |
//! | `GET /_sim/segments/{id}`, `DELETE /_sim/segments/{id}` | segment with member ids; delete (any kind) |
//! | `GET /_sim/people/{id}`, `PUT /_sim/people/{id}`, `DELETE /_sim/people/{id}` | read; upsert attributes (JSON object); remove |
//! | `POST /_sim/people/{id}/attributes` | change an existing person's attributes without the Track API (a form fill, another system): JSON object; `{id}` is an id, an email or `cio_<cio_id>`; 404 unknown |
//! | `GET /_sim/activities[?person=id\|email\|cio_x]` | `{"activities":[..]}` the feed, newest first ([`crate::SimActivity`]) |
//! | `GET /_sim/campaigns` | `{"campaigns":[..]}` campaigns and broadcasts ([`crate::SimCampaign`]) |
//! | `GET /_sim/broadcasts`, `POST /_sim/broadcasts` | list; create `{"name","recipients":F,"subject"?,"state"?,"tags"?}` (201 `{"broadcast":{..}}`) |
//! | `GET /_sim/newsletters` | `{"newsletters":[..]}` ([`crate::SimNewsletter`]) |
//! | `GET /_sim/triggers[?broadcast_id=N]` | `{"triggers":[..]}` oldest first ([`crate::SimTrigger`]) |
//! | `GET /_sim/deliveries[?campaign_id=&broadcast_id=&trigger_id=&newsletter_id=&content_id=&subject=&person=&limit=100]` | `{"count","totals","eventual_totals","deliveries":[first limit]}` |
//! | `POST /_sim/advance` | `{"seconds":n}` or `{"ms":n}`: [`crate::Simulator::advance`]; answers `{"advanced_ms":total}` |
//! | `GET /_sim/engagement[?person=id]`, `POST /_sim/engagement` | `{"correlation":0.7}` (with `person`: that person's `{"percentile","prefetches","link_scanned"}`); set `{"correlation":x}` (0..=1) |
//! | `GET /_sim/webhooks`, `POST /_sim/webhooks`, `DELETE /_sim/webhooks` | `{"webhook":{"url","duplicate_rate","timeout_ms"}\|null,"queued":n,"ledger":[..]}` ([`crate::SimWebhook`]); set `{"url","signing_key","duplicate_rate"?,"timeout_ms"?}` (400 when invalid); stop |
//! | `GET /_sim/exports`, `POST /_sim/exports` | `{"exports":[..],"fail_next":n,"delay_ms":n}`; set `{"fail_next":n,"delay_ms":n}` (each optional): the next n exports fail, exports take this long |
//! | `GET /_sim/rates`, `POST /_sim/rates`, `DELETE /_sim/rates` | `{"default":{..},"rules":[{"key":{..},"rates":{..}}],"ledger":[{"key","deliveries","totals","eventual"}]}`; set `{"key"?:K,"rates":{..}}` (no key: the default; K as [`crate::RatesKey`], e.g. `{"subject_contains":"[B]"}`); clear the rules |
//!
//! Fault items: `{"kind":"status","status":503,"retry_after_secs":2}`, `{"kind":"delay","ms":1500}`,
//! `{"kind":"drop"}`, `{"kind":"accept_then_drop"}`, `{"kind":"accept_then_delay","ms":5000}`. Chaos: `{"error_rate":0.1,"error_status":503,
//! "latency_ms":200,"drop_rate":0.05}` (all optional).

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::audience::AudienceFilter;
use crate::config::{SimApi, TriggerScope};
use crate::error_bodies::ApiError;
use crate::faults::{Chaos, Fault, RateLimitMode};
use crate::sends::{CampaignState, DeliveryFilter, DeliveryRates, NewBroadcast, RatesKey};
use crate::state::Predicate;

pub(crate) fn routes() -> Router<Simulator> {
    Router::new()
        .route("/_sim/health", get(health))
        .route("/_sim/stats", get(stats))
        .route("/_sim/events", get(events))
        .route("/_sim/requests", get(requests).delete(clear_requests))
        .route(
            "/_sim/faults",
            get(faults).post(push_faults).delete(clear_faults),
        )
        .route("/_sim/rate-limits", get(rate_limits).post(set_rate_limits))
        .route("/_sim/workspace", get(workspace).post(set_workspace))
        .route("/_sim/segments", get(segments).post(create_segment))
        .route("/_sim/segments/{id}", get(segment).delete(delete_segment))
        .route(
            "/_sim/people/{id}",
            get(person).put(put_person).delete(delete_person),
        )
        .route("/_sim/people/{id}/attributes", post(change_attributes))
        .route("/_sim/activities", get(activities))
        .route("/_sim/campaigns", get(campaigns))
        .route("/_sim/broadcasts", get(broadcasts).post(create_broadcast))
        .route("/_sim/newsletters", get(newsletters))
        .route("/_sim/triggers", get(triggers))
        .route("/_sim/deliveries", get(deliveries))
        .route("/_sim/advance", post(advance))
        .route("/_sim/exports", get(exports).post(set_exports))
        .route("/_sim/engagement", get(engagement).post(set_engagement))
        .route(
            "/_sim/webhooks",
            get(webhooks).post(set_webhooks).delete(stop_webhooks),
        )
        .route(
            "/_sim/rates",
            get(rates).post(set_rates).delete(clear_rates),
        )
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|err| {
        ApiError::control(StatusCode::BAD_REQUEST, format!("invalid JSON body: {err}"))
    })
}

async fn health(State(sim): State<Simulator>) -> Response {
    let (people, segments) = sim.with_world(|w| (w.people_count(), w.segment_list().count()));
    Json(json!({ "status": "ok", "people": people, "segments": segments })).into_response()
}

async fn stats(State(sim): State<Simulator>) -> Response {
    let (people, segments, events, duplicates) = sim.with_world(|w| {
        (
            w.people_count(),
            w.segment_list().count(),
            w.events().len(),
            w.events().duplicates(),
        )
    });
    let (app, track, by_route, len, capacity) = sim.with_log(|log| {
        (
            log.request_count(SimApi::App),
            log.request_count(SimApi::Track),
            log.by_route().clone(),
            log.len(),
            log.capacity(),
        )
    });
    Json(json!({
        "people": people,
        "segments": segments,
        "events": events,
        "duplicate_events_dropped": duplicates,
        "requests": { "app": app, "track": track, "by_route": by_route },
        "request_log": { "len": len, "capacity": capacity },
    }))
    .into_response()
}

async fn events(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let events = match query.get("person") {
        Some(person) => sim.events_for(person),
        None => sim.events(),
    };
    let events: Vec<_> = match query.get("anonymous_id") {
        Some(anonymous) => events
            .into_iter()
            .filter(|e| e.anonymous_id.as_deref() == Some(anonymous.as_str()))
            .collect(),
        None => events,
    };
    Json(json!({ "events": events })).into_response()
}

async fn requests(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let filter = match query.get("api").map(String::as_str) {
        None => None,
        Some("app") => Some(SimApi::App),
        Some("track") => Some(SimApi::Track),
        Some(_) => return error(StatusCode::BAD_REQUEST, "api must be app or track"),
    };
    let requests: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| filter.is_none_or(|api| r.api == api))
        .collect();
    Json(json!({ "requests": requests })).into_response()
}

async fn clear_requests(State(sim): State<Simulator>) -> StatusCode {
    sim.clear_requests();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum FaultSpec {
    Status {
        status: u16,
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    Delay {
        ms: u64,
    },
    Drop,
    AcceptThenDrop,
    AcceptThenDelay {
        ms: u64,
    },
}

fn default_error_status() -> u16 {
    500
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChaosSpec {
    #[serde(default)]
    error_rate: f64,
    #[serde(default = "default_error_status")]
    error_status: u16,
    #[serde(default)]
    latency_ms: u64,
    #[serde(default)]
    drop_rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsRequest {
    #[serde(default)]
    api: Option<SimApi>,
    #[serde(default)]
    faults: Vec<FaultSpec>,
    #[serde(default)]
    chaos: Option<ChaosSpec>,
}

fn valid_status(status: u16) -> bool {
    (100..=599).contains(&status)
}

async fn faults(State(sim): State<Simulator>) -> Response {
    Json(json!({ "queued": sim.queued_faults() })).into_response()
}

async fn push_faults(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: FaultsRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    let mut faults = Vec::with_capacity(request.faults.len());
    for spec in request.faults {
        faults.push(match spec {
            FaultSpec::Status {
                status,
                retry_after_secs,
            } => {
                if !valid_status(status) {
                    return error(StatusCode::BAD_REQUEST, "status must be 100..=599");
                }
                Fault::Status {
                    status,
                    retry_after_secs,
                }
            }
            FaultSpec::Delay { ms } => Fault::Delay(Duration::from_millis(ms)),
            FaultSpec::Drop => Fault::Drop,
            FaultSpec::AcceptThenDrop => Fault::AcceptThenDrop,
            FaultSpec::AcceptThenDelay { ms } => Fault::AcceptThenDelay(Duration::from_millis(ms)),
        });
    }
    let chaos = match request.chaos {
        None => None,
        Some(c) => {
            let rates_ok =
                (0.0..=1.0).contains(&c.error_rate) && (0.0..=1.0).contains(&c.drop_rate);
            if !rates_ok || !valid_status(c.error_status) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "error_rate and drop_rate must be within 0..=1, error_status within 100..=599",
                );
            }
            Some(Chaos {
                error_rate: c.error_rate,
                error_status: c.error_status,
                latency: Duration::from_millis(c.latency_ms),
                drop_rate: c.drop_rate,
            })
        }
    };
    sim.push_faults(request.api, faults);
    if let Some(chaos) = chaos {
        sim.set_chaos(request.api, chaos);
    }
    Json(json!({ "queued": sim.queued_faults() })).into_response()
}

async fn clear_faults(State(sim): State<Simulator>) -> StatusCode {
    sim.clear_faults();
    StatusCode::NO_CONTENT
}

fn limits_json(sim: &Simulator) -> Value {
    json!({
        "app": sim.rate_limit(SimApi::App),
        "track": sim.rate_limit(SimApi::Track),
        "app_mode": sim.rate_limit_mode(SimApi::App),
        "track_mode": sim.rate_limit_mode(SimApi::Track),
        "trigger_interval_ms": sim.trigger_interval().as_millis() as u64,
        "trigger_scope": sim.trigger_scope(),
    })
}

async fn rate_limits(State(sim): State<Simulator>) -> Response {
    Json(limits_json(&sim)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitsRequest {
    app: Option<u32>,
    track: Option<u32>,
    app_mode: Option<RateLimitMode>,
    track_mode: Option<RateLimitMode>,
    trigger_interval_ms: Option<u64>,
    trigger_scope: Option<TriggerScope>,
}

async fn set_rate_limits(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: RateLimitsRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    if let Some(app) = request.app {
        sim.set_rate_limit(SimApi::App, app);
    }
    if let Some(track) = request.track {
        sim.set_rate_limit(SimApi::Track, track);
    }
    if let Some(mode) = request.app_mode {
        sim.set_rate_limit_mode(SimApi::App, mode);
    }
    if let Some(mode) = request.track_mode {
        sim.set_rate_limit_mode(SimApi::Track, mode);
    }
    if let Some(ms) = request.trigger_interval_ms {
        sim.set_trigger_interval(Duration::from_millis(ms));
    }
    if let Some(scope) = request.trigger_scope {
        sim.set_trigger_scope(scope);
    }
    Json(limits_json(&sim)).into_response()
}

fn workspace_json(sim: &Simulator) -> Value {
    json!({
        "region": sim.region(),
        "endpoint_region": sim.endpoint_region(),
        "subscription_center": sim.subscription_center(),
    })
}

async fn workspace(State(sim): State<Simulator>) -> Response {
    Json(workspace_json(&sim)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceRequest {
    /// Absent: unchanged; `null`: the workspace's own region.
    #[serde(default, deserialize_with = "present")]
    endpoint_region: Option<Option<String>>,
    subscription_center: Option<bool>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent key (`None`, via `default`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

async fn set_workspace(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: WorkspaceRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    if let Some(region) = request.endpoint_region
        && let Err(err) = sim.set_endpoint_region(region.as_deref())
    {
        return error(StatusCode::BAD_REQUEST, err.to_string());
    }
    if let Some(enabled) = request.subscription_center {
        sim.set_subscription_center(enabled);
    }
    Json(workspace_json(&sim)).into_response()
}

async fn segments(State(sim): State<Simulator>) -> Response {
    Json(json!({ "segments": sim.segments() })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSegment {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    predicate: Option<Predicate>,
}

async fn create_segment(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: CreateSegment = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    let id = match request.predicate {
        Some(p) => sim.add_dynamic_segment(&request.name, &request.description, p),
        None => sim.create_manual_segment(&request.name, &request.description),
    };
    let segment = sim.segments().into_iter().find(|s| s.id == id);
    (StatusCode::CREATED, Json(json!({ "segment": segment }))).into_response()
}

fn parse_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::control(StatusCode::NOT_FOUND, "segment not found"))
}

async fn segment(State(sim): State<Simulator>, Path(raw): Path<String>) -> Response {
    let id = match parse_id(&raw) {
        Ok(id) => id,
        Err(err) => return err.into_response(),
    };
    let segment = sim.segments().into_iter().find(|s| s.id == id);
    match (segment, sim.segment_members(id)) {
        (Some(segment), Some(members)) => {
            Json(json!({ "segment": segment, "members": members })).into_response()
        }
        _ => error(StatusCode::NOT_FOUND, "segment not found"),
    }
}

async fn delete_segment(State(sim): State<Simulator>, Path(raw): Path<String>) -> Response {
    match parse_id(&raw) {
        Ok(id) if sim.delete_segment(id) => StatusCode::NO_CONTENT.into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, "segment not found"),
        Err(err) => err.into_response(),
    }
}

async fn person(State(sim): State<Simulator>, Path(id): Path<String>) -> Response {
    match sim.person(&id) {
        Some(person) => Json(json!({ "person": person })).into_response(),
        None => error(StatusCode::NOT_FOUND, "person not found"),
    }
}

async fn put_person(State(sim): State<Simulator>, Path(id): Path<String>, body: Bytes) -> Response {
    let attributes: Map<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match parse(&body) {
            Ok(a) => a,
            Err(err) => return err.into_response(),
        }
    };
    sim.upsert_person(&id, attributes);
    Json(json!({ "person": sim.person(&id) })).into_response()
}

async fn change_attributes(
    State(sim): State<Simulator>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let attributes: Map<String, Value> = match parse(&body) {
        Ok(a) => a,
        Err(err) => return err.into_response(),
    };
    if !sim.change_attributes(&id, attributes) {
        return error(StatusCode::NOT_FOUND, "person not found");
    }
    let (kind, value) = crate::state::parse_identifier(&id);
    let person = sim.with_world(|w| {
        w.resolve(value, kind)
            .and_then(|seq| w.person(seq))
            .map(crate::state::Person::snapshot)
    });
    Json(json!({ "person": person })).into_response()
}

async fn activities(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let activities = sim.activities(query.get("person").map(String::as_str));
    Json(json!({ "activities": activities })).into_response()
}

async fn delete_person(State(sim): State<Simulator>, Path(id): Path<String>) -> Response {
    if sim.remove_person(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "person not found")
    }
}

async fn campaigns(State(sim): State<Simulator>) -> Response {
    Json(json!({ "campaigns": sim.campaigns() })).into_response()
}

async fn broadcasts(State(sim): State<Simulator>) -> Response {
    Json(json!({ "broadcasts": sim.broadcasts() })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBroadcast {
    name: String,
    recipients: Value,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    state: Option<CampaignState>,
    #[serde(default)]
    tags: Vec<String>,
}

async fn create_broadcast(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: CreateBroadcast = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    let audience = match AudienceFilter::from_json(&request.recipients) {
        Ok(a) => a,
        Err(message) => return error(StatusCode::BAD_REQUEST, format!("recipients: {message}")),
    };
    let mut broadcast = NewBroadcast::new(&request.name, audience);
    if let Some(subject) = request.subject {
        broadcast.subject = subject;
    }
    if let Some(state) = request.state {
        broadcast.state = state;
    }
    broadcast.tags = request.tags;
    match sim.add_broadcast(broadcast) {
        Ok(id) => (
            StatusCode::CREATED,
            Json(json!({ "broadcast": sim.campaign(id) })),
        )
            .into_response(),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

async fn newsletters(State(sim): State<Simulator>) -> Response {
    Json(json!({ "newsletters": sim.newsletters() })).into_response()
}

fn id_param(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match query.get(name) {
        None => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|_| {
            ApiError::control(
                StatusCode::BAD_REQUEST,
                format!("{name} must be an integer"),
            )
        }),
    }
}

async fn triggers(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match id_param(&query, "broadcast_id") {
        Ok(broadcast) => Json(json!({ "triggers": sim.triggers(broadcast) })).into_response(),
        Err(err) => err.into_response(),
    }
}

fn delivery_filter(query: &HashMap<String, String>) -> Result<DeliveryFilter, ApiError> {
    Ok(DeliveryFilter {
        campaign_id: id_param(query, "campaign_id")?,
        broadcast_id: id_param(query, "broadcast_id")?,
        trigger_id: id_param(query, "trigger_id")?,
        newsletter_id: id_param(query, "newsletter_id")?,
        content_id: id_param(query, "content_id")?,
        subject: query.get("subject").cloned(),
        person_id: query.get("person").cloned(),
    })
}

async fn deliveries(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let filter = match delivery_filter(&query) {
        Ok(f) => f,
        Err(err) => return err.into_response(),
    };
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(l)) => l,
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit must be an integer"),
    };
    let all = sim.deliveries(&filter);
    let count = all.len();
    let page: Vec<_> = all.into_iter().take(limit).collect();
    Json(json!({
        "count": count,
        "totals": sim.delivery_totals(&filter),
        "eventual_totals": sim.eventual_delivery_totals(&filter),
        "deliveries": page,
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceRequest {
    #[serde(default)]
    seconds: Option<u64>,
    #[serde(default)]
    ms: Option<u64>,
}

async fn advance(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: AdvanceRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    let by = match (request.seconds, request.ms) {
        (Some(s), None) => Duration::from_secs(s),
        (None, Some(ms)) => Duration::from_millis(ms),
        _ => return error(StatusCode::BAD_REQUEST, "give exactly one of seconds or ms"),
    };
    sim.advance(by);
    Json(json!({ "advanced_ms": sim.advanced().as_millis() as u64 })).into_response()
}

fn rates_json(sim: &Simulator) -> Value {
    let (default, rules) = sim.rates();
    let rules: Vec<Value> = rules
        .into_iter()
        .map(|(key, rates)| json!({ "key": key, "rates": rates }))
        .collect();
    json!({ "default": default, "rules": rules, "ledger": sim.totals_by_rates_rule() })
}

async fn rates(State(sim): State<Simulator>) -> Response {
    Json(rates_json(&sim)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RatesRequest {
    #[serde(default)]
    key: Option<RatesKey>,
    rates: DeliveryRates,
}

async fn set_rates(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: RatesRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    let result = match request.key {
        Some(key) => sim.set_rates(key, request.rates),
        None => sim.set_default_rates(request.rates),
    };
    match result {
        Ok(()) => Json(rates_json(&sim)).into_response(),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

async fn clear_rates(State(sim): State<Simulator>) -> StatusCode {
    sim.clear_rates();
    StatusCode::NO_CONTENT
}

fn exports_json(sim: &Simulator) -> Value {
    json!({
        "exports": sim.exports(),
        "fail_next": sim.export_failures_queued(),
        "delay_ms": sim.export_delay().as_millis() as u64,
    })
}

async fn exports(State(sim): State<Simulator>) -> Response {
    Json(exports_json(&sim)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportsRequest {
    fail_next: Option<u32>,
    delay_ms: Option<u64>,
}

async fn set_exports(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: ExportsRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    if let Some(count) = request.fail_next {
        sim.fail_next_exports(count);
    }
    if let Some(ms) = request.delay_ms {
        sim.set_export_delay(Duration::from_millis(ms));
    }
    Json(exports_json(&sim)).into_response()
}

async fn engagement(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match query.get("person") {
        None => Json(json!({ "correlation": sim.engagement_correlation() })).into_response(),
        Some(person) => match sim.engagement(person) {
            Some(e) => Json(json!({ "person": person, "engagement": e })).into_response(),
            None => error(StatusCode::NOT_FOUND, "person not found"),
        },
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngagementRequest {
    correlation: f64,
}

async fn set_engagement(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: EngagementRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    if !(0.0..=1.0).contains(&request.correlation) {
        return error(StatusCode::BAD_REQUEST, "correlation must be within 0..=1");
    }
    sim.set_engagement_correlation(request.correlation);
    Json(json!({ "correlation": sim.engagement_correlation() })).into_response()
}

fn webhooks_json(sim: &Simulator) -> Value {
    let webhook = sim.reporting_webhook().map(|w| {
        json!({
            "url": w.url,
            "duplicate_rate": w.duplicate_rate,
            "timeout_ms": w.timeout.as_millis() as u64,
        })
    });
    json!({
        "webhook": webhook,
        "queued": sim.webhooks_queued(),
        "ledger": sim.webhook_ledger(),
    })
}

async fn webhooks(State(sim): State<Simulator>) -> Response {
    Json(webhooks_json(&sim)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookRequest {
    url: String,
    signing_key: String,
    #[serde(default)]
    duplicate_rate: f64,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn set_webhooks(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: WebhookRequest = match parse(&body) {
        Ok(r) => r,
        Err(err) => return err.into_response(),
    };
    let mut config = crate::ReportingWebhook::new(&request.url, &request.signing_key);
    config.duplicate_rate = request.duplicate_rate;
    if let Some(ms) = request.timeout_ms {
        config.timeout = Duration::from_millis(ms);
    }
    match sim.set_reporting_webhook(Some(config)) {
        Ok(()) => Json(webhooks_json(&sim)).into_response(),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}

async fn stop_webhooks(State(sim): State<Simulator>) -> Response {
    match sim.set_reporting_webhook(None) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(err) => error(StatusCode::BAD_REQUEST, err.to_string()),
    }
}
