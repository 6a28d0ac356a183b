//! Customer exports (journeys-api-2022 `Exports`, with the current docs' `attributes`): a
//! point-in-time CSV of the people matching an audience filter, built asynchronously and
//! downloaded from a signed link that needs no Customer.io credentials.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/exports/customers` | `{"filters":F,"attributes":["name",..]?}` → `{"export":{..}}` (pending, `total` 0) |
//! | `GET /v1/exports` | `{"exports":[..]}`, by id |
//! | `GET /v1/exports/{export_id}` | `{"export":{..}}`; 404 unknown |
//! | `GET /v1/exports/{export_id}/download` | `{"url":".."}` valid 15 minutes; 404 unknown, 400 not done or failed |
//! | `GET /_files/exports/{export_id}?expires=&signature=` | the CSV (`text/csv`), no credentials |
//!
//! Export object: `id`, `user_id` (0), `user_email`, `total` (rows; 0 until done),
//! `deduplicate_id` (`id:created_at`), `type` (`customers`), `failed`, `done` (the project
//! docs' flag), `status` (`pending`|`done`|`failed`, the spec's), `description`, `downloads`
//! (times the file was fetched), `created_at`, `updated_at` (unix seconds).
//!
//! Request checks (400 with `source.pointer`, nothing created): body a JSON object; `filters`
//! required and a valid audience filter (the `recipients` shape: one key per object, `and`/`or`
//! non-empty, `eq` with a value, ...) naming only existing segments; `attributes` absent or an
//! array of non-empty strings. Customer.io documents no "all attributes" option: the file has
//! the requested attributes only.
//!
//! Completion: an export is `pending` until [`crate::SimConfig::export_delay`] has passed on
//! the simulator's clock ([`crate::Simulator::advance`] moves it), then `done` with the people
//! matching the filter at that moment, or `failed` when a failure was injected
//! ([`crate::Simulator::fail_next_exports`]).
//!
//! The file (the spec and docs name no columns): a header row `id,email,cio_id` followed by the
//! requested attributes in request order (each once; `id`, `email` and `cio_id` are not
//! repeated), then one row per person in creation order; RFC 4180 quoting (fields holding `,`,
//! `"`, CR or LF are quoted, quotes doubled), lines end with `\n`. Values are text as
//! Customer.io stores them: strings as is, numbers and booleans in JSON notation, arrays and
//! objects as JSON; an absent attribute or identifier is an empty field.
//!
//! The download link: `{files base}/_files/exports/{id}?expires={unix}&signature={hex}` where
//! the base is [`crate::SimConfig::files_base_url`] or else the host the App request came to,
//! and the signature an HMAC of the id and expiry under a key of the simulator's own. Like a
//! presigned object-store link it is refused with 403 when the signature does not match or the
//! link has expired (the simulator's clock is past `expires`), and with 400 when the request
//! carries an `Authorization` header (an object store allows only one auth mechanism). It is
//! served outside the App API: no rate limit, no faults, not logged.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::Simulator;
use crate::audience::AudienceFilter;
use crate::auth::require_app;
use crate::campaigns_api::{not_found, path_id, query_map};
use crate::error_bodies::ApiError;
use crate::signing::{hmac_hex, hmac_matches};
use crate::state::{Person, World};

/// How long a download link stays valid (Customer.io: 15 minutes).
pub const DOWNLOAD_LINK_TTL_SECS: i64 = 15 * 60;
/// Bytes per chunk of a served file.
const FILE_CHUNK_BYTES: usize = 16 * 1024;

/// The state of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportStatus {
    /// Being built.
    Pending,
    /// Built: downloadable.
    Done,
    /// Failed: never downloadable.
    Failed,
}

impl ExportStatus {
    fn as_str(self) -> &'static str {
        match self {
            ExportStatus::Pending => "pending",
            ExportStatus::Done => "done",
            ExportStatus::Failed => "failed",
        }
    }
}

/// Snapshot of an export ([`crate::Simulator::exports`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimExport {
    /// Export id.
    pub id: i64,
    /// Pending, done or failed.
    pub status: ExportStatus,
    /// Rows in the file (0 until done).
    pub total: u64,
    /// The requested attribute columns.
    pub attributes: Vec<String>,
    /// The filter, as JSON.
    pub filters: Value,
    /// Times the file was fetched.
    pub downloads: u64,
}

/// A download link given out.
#[derive(Clone, Copy)]
struct Link {
    export: i64,
    /// `expires` as in the URL (presented unix seconds).
    expires: i64,
    /// Its number, signed with it so every link is distinct.
    serial: usize,
    /// When it expires on the internal clock (ms).
    expiry_ms: i64,
}

pub(crate) struct Export {
    id: i64,
    filter: AudienceFilter,
    attributes: Vec<String>,
    created_ms: i64,
    updated_ms: i64,
    ready_ms: i64,
    fail: bool,
    status: ExportStatus,
    csv: Bytes,
    total: u64,
    downloads: u64,
}

/// Exports of the workspace (lives in [`World`]).
pub(crate) struct ExportStore {
    exports: BTreeMap<i64, Export>,
    /// Issued download links by signature.
    links: std::collections::HashMap<String, Link>,
    next_id: i64,
    delay_ms: i64,
    fail_next: u32,
}

impl Default for ExportStore {
    fn default() -> Self {
        Self {
            exports: BTreeMap::new(),
            links: std::collections::HashMap::new(),
            next_id: 1,
            delay_ms: 2_000,
            fail_next: 0,
        }
    }
}

impl ExportStore {
    pub(crate) fn set_delay(&mut self, delay: std::time::Duration) {
        self.delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    }

    pub(crate) fn delay(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.delay_ms).unwrap_or(0))
    }

    pub(crate) fn fail_next(&mut self, count: u32) {
        self.fail_next = count;
    }

    pub(crate) fn failures_queued(&self) -> u32 {
        self.fail_next
    }

    pub(crate) fn snapshots(&self) -> Vec<SimExport> {
        self.exports.values().map(Export::snapshot).collect()
    }

    pub(crate) fn csv(&self, id: i64) -> Option<Bytes> {
        self.exports
            .get(&id)
            .filter(|e| e.status == ExportStatus::Done)
            .map(|e| e.csv.clone())
    }
}

impl Export {
    fn snapshot(&self) -> SimExport {
        SimExport {
            id: self.id,
            status: self.status,
            total: self.total,
            attributes: self.attributes.clone(),
            filters: self.filter.to_json(),
            downloads: self.downloads,
        }
    }
}

/// Appends one CSV field, quoted when needed (RFC 4180).
fn push_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

fn push_row<'a>(out: &mut String, fields: impl IntoIterator<Item = &'a str>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_field(out, field);
    }
    out.push('\n');
}

/// An attribute value as text, the way Customer.io stores it.
pub(crate) fn attribute_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The identifier columns every file starts with.
const ID_COLUMNS: [&str; 3] = ["id", "email", "cio_id"];

fn csv_of(people: &[&Person], attributes: &[String]) -> String {
    let mut out = String::new();
    push_row(
        &mut out,
        ID_COLUMNS
            .iter()
            .copied()
            .chain(attributes.iter().map(String::as_str)),
    );
    for person in people {
        let mut fields: Vec<String> = vec![
            person.id.clone().unwrap_or_default(),
            person.email.clone().unwrap_or_default(),
            person.cio_id.clone(),
        ];
        fields.extend(attributes.iter().map(|name| {
            person
                .attributes
                .get(name)
                .map(attribute_text)
                .unwrap_or_default()
        }));
        push_row(&mut out, fields.iter().map(String::as_str));
    }
    out
}

impl World {
    /// Records a new pending export; returns its id.
    pub(crate) fn create_export(&mut self, filter: AudienceFilter, attributes: Vec<String>) -> i64 {
        let now = self.sends.now_ms();
        let store = &mut self.exports;
        let id = store.next_id;
        store.next_id += 1;
        let fail = store.fail_next > 0;
        if fail {
            store.fail_next -= 1;
        }
        store.exports.insert(
            id,
            Export {
                id,
                filter,
                attributes,
                created_ms: now,
                updated_ms: now,
                ready_ms: now.saturating_add(store.delay_ms),
                fail,
                status: ExportStatus::Pending,
                csv: Bytes::new(),
                total: 0,
                downloads: 0,
            },
        );
        id
    }

    /// Completes the exports whose time has come (people as they are now).
    pub(crate) fn settle_exports(&mut self) {
        let now = self.sends.now_ms();
        let due: Vec<i64> = self
            .exports
            .exports
            .values()
            .filter(|e| e.status == ExportStatus::Pending && e.ready_ms <= now)
            .map(|e| e.id)
            .collect();
        for id in due {
            let Some(export) = self.exports.exports.get(&id) else {
                continue;
            };
            let done = if export.fail {
                None
            } else {
                let people = self.audience(&export.filter);
                Some((
                    Bytes::from(csv_of(&people, &export.attributes)),
                    people.len() as u64,
                ))
            };
            if let Some(export) = self.exports.exports.get_mut(&id) {
                export.updated_ms = export.ready_ms;
                match done {
                    Some((csv, total)) => {
                        export.status = ExportStatus::Done;
                        export.csv = csv;
                        export.total = total;
                    }
                    None => export.status = ExportStatus::Failed,
                }
            }
        }
    }
}

pub(crate) fn routes(sim: &Simulator) -> Router<Simulator> {
    let app = Router::new()
        .route("/v1/exports", get(list))
        .route("/v1/exports/customers", post(create))
        .route("/v1/exports/{export_id}", get(get_one))
        .route("/v1/exports/{export_id}/download", get(download_link))
        .route_layer(from_fn_with_state(sim.clone(), require_app));
    app.route("/_files/exports/{export_id}", get(file))
}

type AppResult = Result<Response, ApiError>;

fn bad(pointer: &str, detail: impl Into<String>) -> ApiError {
    ApiError::app(
        StatusCode::BAD_REQUEST,
        detail,
        Some(json!({ "pointer": pointer })),
    )
}

fn export_json(world: &World, e: &Export) -> Value {
    let store = &world.sends;
    let created = store.present_secs(e.created_ms);
    let filter = e.filter.to_json();
    json!({
        "id": e.id,
        "user_id": 0,
        "user_email": "simulator@customer.io",
        "total": e.total,
        "deduplicate_id": format!("{}:{created}", e.id),
        "type": "customers",
        "failed": e.status == ExportStatus::Failed,
        "done": e.status == ExportStatus::Done,
        "status": e.status.as_str(),
        "description": format!("Customers matching {filter}"),
        "downloads": e.downloads,
        "created_at": created,
        "updated_at": store.present_secs(e.updated_ms),
    })
}

fn export_id(path: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(not_found("export"));
    };
    path_id(&raw, "export")
}

async fn list(State(sim): State<Simulator>) -> Response {
    let exports: Vec<Value> = sim.with_world(|w| {
        w.settle_exports();
        w.exports
            .exports
            .values()
            .map(|e| export_json(w, e))
            .collect()
    });
    Json(json!({ "exports": exports })).into_response()
}

fn parse_attributes(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let items = match body.get("attributes") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("/attributes", "attributes must be an array of strings")),
    };
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.as_str().map(str::trim) {
            Some(name) if !name.is_empty() => {
                if !ID_COLUMNS.contains(&name) && !names.iter().any(|n| n == name) {
                    names.push(name.to_owned());
                }
            }
            _ => {
                return Err(bad(
                    &format!("/attributes/{i}"),
                    "attributes must be non-empty strings",
                ));
            }
        }
    }
    Ok(names)
}

async fn create(State(sim): State<Simulator>, body: Bytes) -> AppResult {
    let body: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => map,
        _ => return Err(bad("", "request body must be a JSON object with filters")),
    };
    let raw = match body.get("filters") {
        None | Some(Value::Null) => return Err(bad("/filters", "filters is required")),
        Some(raw) => raw,
    };
    let filter = AudienceFilter::parse(raw, "/filters").map_err(|e| bad(&e.pointer, e.message))?;
    let attributes = parse_attributes(&body)?;
    let export = sim.with_world(|w| {
        if let Some(missing) = w.unknown_segment(&filter) {
            return Err(bad("/filters", format!("segment {missing} does not exist")));
        }
        let id = w.create_export(filter, attributes);
        w.settle_exports();
        Ok(w.exports.exports.get(&id).map(|e| export_json(w, e)))
    })?;
    let export = export.ok_or_else(|| not_found("export"))?;
    Ok(Json(json!({ "export": export })).into_response())
}

async fn get_one(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
) -> AppResult {
    let id = export_id(path)?;
    let export = sim.with_world(|w| {
        w.settle_exports();
        w.exports.exports.get(&id).map(|e| export_json(w, e))
    });
    let export = export.ok_or_else(|| not_found("export"))?;
    Ok(Json(json!({ "export": export })).into_response())
}

/// The key download links are signed with (the simulator's own; never given out).
fn link_key(sim: &Simulator) -> Vec<u8> {
    let config = sim.config();
    format!("cio-sim files:{}:{}", config.app_api_key, config.seed).into_bytes()
}

fn link_message(id: i64, expires: i64, serial: usize) -> Vec<u8> {
    format!("exports/{id}:{expires}:{serial}").into_bytes()
}

/// Where files are served from: the configured base, else the host the request came to.
fn files_base(sim: &Simulator, headers: &HeaderMap) -> String {
    if let Some(base) = &sim.config().files_base_url {
        return base.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

async fn download_link(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> AppResult {
    let id = export_id(path)?;
    let key = link_key(&sim);
    let issued = sim.with_world(|w| {
        w.settle_exports();
        let status = w.exports.exports.get(&id).map(|e| e.status);
        if status != Some(ExportStatus::Done) {
            return (status, None);
        }
        // The expiry is presented like any time (wall clock); the link is checked against the
        // simulator's clock, so advancing it 15 minutes expires the link.
        let now = w.sends.now_ms();
        let expires = w.sends.present_secs(now) + DOWNLOAD_LINK_TTL_SECS;
        let serial = w.exports.links.len();
        let signature = hmac_hex(&key, &link_message(id, expires, serial));
        w.exports.links.insert(
            signature.clone(),
            Link {
                export: id,
                expires,
                serial,
                expiry_ms: now.saturating_add(DOWNLOAD_LINK_TTL_SECS * 1000),
            },
        );
        (status, Some((expires, signature)))
    });
    match issued.0 {
        None => Err(not_found("export")),
        Some(ExportStatus::Pending) => Err(ApiError::app(
            StatusCode::BAD_REQUEST,
            format!("export {id} is not done yet: poll GET /v1/exports/{id} until done"),
            None,
        )),
        Some(ExportStatus::Failed) => Err(ApiError::app(
            StatusCode::BAD_REQUEST,
            format!("export {id} failed and cannot be downloaded"),
            None,
        )),
        Some(ExportStatus::Done) => {
            let Some((expires, signature)) = issued.1 else {
                return Err(not_found("export"));
            };
            let mut url = files_base(&sim, &headers);
            let _ = write!(
                url,
                "/_files/exports/{id}?expires={expires}&signature={signature}"
            );
            Ok(Json(json!({ "url": url })).into_response())
        }
    }
}

/// An object-store style error (XML body).
fn store_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        )],
        body,
    )
        .into_response()
}

async fn file(
    State(sim): State<Simulator>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key(header::AUTHORIZATION) {
        return store_error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "Only one auth mechanism allowed; only the signature in the link is accepted, not an Authorization header",
        );
    }
    let denied = || {
        store_error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature does not match",
        )
    };
    let key = link_key(&sim);
    let (Ok(Path(raw)), Ok(query)) = (path, query_map(query)) else {
        return denied();
    };
    let (Ok(id), Some(expires), Some(signature)) = (
        raw.parse::<i64>(),
        query.get("expires").and_then(|e| e.parse::<i64>().ok()),
        query.get("signature"),
    ) else {
        return denied();
    };
    // Err(true): expired; Err(false): not a link given out for this file.
    let csv = sim.with_world(|w| {
        let Some(link) = w.exports.links.get(signature.as_str()).copied() else {
            return Err(false);
        };
        let message = link_message(id, expires, link.serial);
        if link.export != id || link.expires != expires || !hmac_matches(&key, &message, signature)
        {
            return Err(false);
        }
        if w.sends.now_ms() > link.expiry_ms {
            return Err(true);
        }
        let csv = w.exports.csv(id);
        if csv.is_some()
            && let Some(export) = w.exports.exports.get_mut(&id)
        {
            export.downloads += 1;
        }
        Ok(csv)
    });
    let csv = match csv {
        Ok(Some(csv)) => csv,
        Ok(None) => {
            return store_error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            );
        }
        Err(true) => {
            return store_error(StatusCode::FORBIDDEN, "AccessDenied", "Request has expired");
        }
        Err(false) => return denied(),
    };
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..csv.len())
        .step_by(FILE_CHUNK_BYTES)
        .map(|start| Ok(csv.slice(start..(start + FILE_CHUNK_BYTES).min(csv.len()))))
        .collect();
    let mut response = Body::from_stream(futures::stream::iter(chunks)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv"));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"export_{id}.csv\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_only_when_needed() {
        let mut out = String::new();
        push_row(&mut out, ["a", "b,c", "say \"hi\"", "x\ny", ""]);
        assert_eq!(out, "a,\"b,c\",\"say \"\"hi\"\"\",\"x\ny\",\n");
        assert_eq!(attribute_text(&json!(3)), "3");
        assert_eq!(attribute_text(&json!(["a", 1])), "[\"a\",1]");
        assert_eq!(attribute_text(&json!(true)), "true");
    }
}
