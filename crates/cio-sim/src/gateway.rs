//! The layer in front of both APIs: request counters and log, fault injection and rate limiting.
//! Control (`/_sim/`) requests pass straight through.
//!
//! Every App/Track request is counted on arrival (per API and per route template, e.g.
//! `POST /api/v2/batch`; `METHOD (no route)` for unknown paths); these counters never drop.
//! The request log is a ring buffer of the last `SimConfig::request_log_capacity` requests
//! whose bodies are kept raw (parsed when read): a body over `MAX_LOGGED_BODY_BYTES` (64 KiB) is
//! logged as `{"_truncated": <size in bytes>}`, and the oldest entries are also evicted while
//! the kept bodies exceed `MAX_LOGGED_BODIES_TOTAL` (64 MiB), so a long benchmark runs in
//! bounded memory (both constants are in [`crate::config`]).

use std::collections::{BTreeMap, VecDeque};
use std::io;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::Simulator;
use crate::config::{MAX_LOGGED_BODIES_TOTAL, MAX_LOGGED_BODY_BYTES, SimApi};
use crate::conn::ConnCtl;
use crate::error_bodies::{api_error, fault_response, rate_limited};
use crate::faults::Action;

/// Largest request body accepted (Customer.io's largest documented one is ~1 MB).
pub(crate) const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One request received on the App or Track API (see [`crate::Simulator::requests`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedRequest {
    /// When it arrived.
    pub at: DateTime<Utc>,
    /// Which API.
    pub api: SimApi,
    /// HTTP method, e.g. `PUT`.
    pub method: String,
    /// Path as received (percent-encoding kept), e.g. `/api/v1/customers/a%40b.com`, with
    /// literal `.`/`..` segments resolved as for routing.
    pub path: String,
    /// Raw query string without `?`.
    pub query: Option<String>,
    /// Status answered; 0 when the connection was dropped without a response.
    pub status: u16,
    /// Body: parsed JSON, a JSON string for non-JSON text, `None` when empty;
    /// `{"_truncated": size}` when larger than [`crate::config::MAX_LOGGED_BODY_BYTES`].
    pub body: Option<Value>,
}

enum LoggedBody {
    Empty,
    Raw(Bytes),
    Truncated(usize),
}

impl LoggedBody {
    fn new(bytes: &Bytes) -> Self {
        match bytes.len() {
            0 => LoggedBody::Empty,
            n if n > MAX_LOGGED_BODY_BYTES => LoggedBody::Truncated(n),
            _ => LoggedBody::Raw(bytes.clone()),
        }
    }

    fn kept_bytes(&self) -> usize {
        match self {
            LoggedBody::Raw(bytes) => bytes.len(),
            LoggedBody::Empty | LoggedBody::Truncated(_) => 0,
        }
    }

    fn value(&self) -> Option<Value> {
        match self {
            LoggedBody::Empty => None,
            LoggedBody::Raw(bytes) => body_value(bytes),
            LoggedBody::Truncated(size) => Some(serde_json::json!({ "_truncated": size })),
        }
    }
}

struct Entry {
    at: DateTime<Utc>,
    api: SimApi,
    method: String,
    path: String,
    query: Option<String>,
    status: u16,
    body: LoggedBody,
}

/// Request counters (never reset) and the bounded request log.
pub(crate) struct RequestLog {
    capacity: usize,
    entries: VecDeque<Entry>,
    body_bytes: usize,
    app: u64,
    track: u64,
    by_route: BTreeMap<String, u64>,
}

impl RequestLog {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: VecDeque::new(),
            body_bytes: 0,
            app: 0,
            track: 0,
            by_route: BTreeMap::new(),
        }
    }

    fn count(&mut self, api: SimApi, route: &str) {
        match api {
            SimApi::App => self.app += 1,
            SimApi::Track => self.track += 1,
        }
        match self.by_route.get_mut(route) {
            Some(n) => *n += 1,
            None => {
                self.by_route.insert(route.to_owned(), 1);
            }
        }
    }

    fn push(&mut self, entry: Entry) {
        if self.capacity == 0 {
            return;
        }
        self.body_bytes += entry.body.kept_bytes();
        self.entries.push_back(entry);
        while self.entries.len() > self.capacity || self.body_bytes > MAX_LOGGED_BODIES_TOTAL {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.body_bytes -= old.body.kept_bytes();
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<LoggedRequest> {
        self.entries
            .iter()
            .map(|e| LoggedRequest {
                at: e.at,
                api: e.api,
                method: e.method.clone(),
                path: e.path.clone(),
                query: e.query.clone(),
                status: e.status,
                body: e.body.value(),
            })
            .collect()
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.body_bytes = 0;
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn request_count(&self, api: SimApi) -> u64 {
        match api {
            SimApi::App => self.app,
            SimApi::Track => self.track,
        }
    }

    pub(crate) fn by_route(&self) -> &BTreeMap<String, u64> {
        &self.by_route
    }
}

/// Resolves literal `.` and `..` segments of the request path (RFC 3986 `remove_dot_segments`),
/// as an HTTP server in front of Customer.io would before routing; percent-encoded dots are
/// left alone (they are data, e.g. an id `..` sent as `%2E%2E`).
pub(crate) fn resolve_dot_segments(mut req: Request) -> Request {
    let Some(path) = without_dot_segments(req.uri().path()) else {
        return req;
    };
    let path_and_query = match req.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    match path_and_query.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return req,
    }
    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}

/// `path` with its literal dot segments resolved; `None` when it has none.
fn without_dot_segments(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if !segments.iter().any(|s| *s == "." || *s == "..") {
        return None;
    }
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            other => {
                out.push(other);
                continue;
            }
        }
        // A trailing dot segment leaves a trailing slash.
        if i == last {
            out.push("");
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// Which API a path belongs to (`None` for control and unknown paths).
pub(crate) fn classify(path: &str) -> Option<SimApi> {
    if path == "/api" || path.starts_with("/api/") {
        Some(SimApi::Track)
    } else if path == "/v1" || path.starts_with("/v1/") {
        Some(SimApi::App)
    } else {
        None
    }
}

fn body_value(bytes: &Bytes) -> Option<Value> {
    if bytes.is_empty() {
        return None;
    }
    Some(
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned())),
    )
}

/// A response that is never delivered: the connection is killed (when served by
/// [`crate::Simulator::serve`]) and its body fails, so hyper aborts the connection either way.
fn dropped(conn: Option<&ConnCtl>) -> Response {
    if let Some(conn) = conn {
        conn.kill();
    }
    let failing = futures::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection dropped by simulated fault",
        ))
    });
    Body::from_stream(failing).into_response()
}

pub(crate) async fn gateway(State(sim): State<Simulator>, req: Request, next: Next) -> Response {
    let Some(api) = classify(req.uri().path()) else {
        return next.run(req).await;
    };
    let at = Utc::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let route = match req.extensions().get::<MatchedPath>() {
        Some(matched) => format!("{method} {}", matched.as_str()),
        None => format!("{method} (no route)"),
    };
    sim.with_log(|log| log.count(api, &route));
    let conn = req
        .extensions()
        .get::<ConnectInfo<ConnCtl>>()
        .map(|info| info.0.clone());
    let (parts, body) = req.into_parts();

    let log = |status: u16, body: LoggedBody| {
        sim.with_log(|log| {
            log.push(Entry {
                at,
                api,
                method: method.clone(),
                path: path.clone(),
                query: query.clone(),
                status,
                body,
            })
        });
    };

    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::debug!(error = %err, "request body rejected");
            let response = api_error(api, StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            log(response.status().as_u16(), LoggedBody::Empty);
            return response;
        }
    };
    let logged_body = LoggedBody::new(&bytes);

    let (delay, action) = sim.decide(api);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match action {
        Action::Status {
            status,
            retry_after_secs,
        } => {
            let response = fault_response(api, status, retry_after_secs);
            log(response.status().as_u16(), logged_body);
            return response;
        }
        Action::Drop => {
            log(0, logged_body);
            return dropped(conn.as_ref());
        }
        Action::Pass | Action::AcceptThenDrop | Action::AcceptThenDelay(_) => {}
    }

    if let Err((limit, retry_after)) = sim.take_token(api) {
        let response = rate_limited(api, limit, retry_after);
        log(response.status().as_u16(), logged_body);
        return response;
    }

    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if action == Action::AcceptThenDrop {
        log(0, logged_body);
        return dropped(conn.as_ref());
    }
    if let Action::AcceptThenDelay(delay) = action {
        tokio::time::sleep(delay).await;
    }
    log(response.status().as_u16(), logged_body);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_by_prefix() {
        assert_eq!(classify("/api/v1/customers/x"), Some(SimApi::Track));
        assert_eq!(classify("/v1/segments"), Some(SimApi::App));
        assert_eq!(classify("/v10/x"), None);
        assert_eq!(classify("/apix"), None);
        assert_eq!(classify("/_sim/health"), None);
    }

    #[test]
    fn literal_dot_segments_are_resolved_encoded_ones_kept() {
        let cases = [
            ("/api/v1/customers/..", Some("/api/v1/")),
            ("/api/v1/customers/.", Some("/api/v1/customers/")),
            ("/api/v1/customers/../x/events", Some("/api/v1/x/events")),
            ("/a/./b", Some("/a/b")),
            ("/..", Some("/")),
            ("/../..", Some("/")),
            ("/api/v1/customers/%2E%2E", None),
            ("/api/v1/customers/..%2Fx", None),
            ("/api/v1/customers/...", None),
            ("*", None),
        ];
        for (path, want) in cases {
            assert_eq!(without_dot_segments(path).as_deref(), want, "{path}");
        }
        let req = Request::builder()
            .uri("/api/v1/customers/x/../y?id_type=id")
            .body(Body::empty())
            .unwrap_or_default();
        let req = resolve_dot_segments(req);
        assert_eq!(req.uri().path(), "/api/v1/customers/y");
        assert_eq!(req.uri().query(), Some("id_type=id"));
    }
}
