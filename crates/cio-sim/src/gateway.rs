//! The layer in front of both APIs: request log, fault injection and rate limiting.
//! Control (`/_sim/`) requests pass straight through.

use std::io;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::Simulator;
use crate::config::SimApi;
use crate::conn::ConnCtl;
use crate::errors::{api_error, fault_response, rate_limited};
use crate::faults::Action;

/// Largest request body accepted (Customer.io's largest documented one is ~1 MB).
pub(crate) const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// The log keeps this many most recent requests.
pub(crate) const MAX_LOGGED: usize = 100_000;

/// One request received on the App or Track API (see [`crate::Simulator::requests`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggedRequest {
    /// When it arrived.
    pub at: DateTime<Utc>,
    /// Which API.
    pub api: SimApi,
    /// HTTP method, e.g. `PUT`.
    pub method: String,
    /// Path as received (percent-encoding kept), e.g. `/api/v1/customers/a%40b.com`.
    pub path: String,
    /// Raw query string without `?`.
    pub query: Option<String>,
    /// Status answered; 0 when the connection was dropped without a response.
    pub status: u16,
    /// Body: parsed JSON, a JSON string for non-JSON text, `None` when empty.
    pub body: Option<Value>,
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
    let conn = req
        .extensions()
        .get::<ConnectInfo<ConnCtl>>()
        .map(|info| info.0.clone());
    let (parts, body) = req.into_parts();

    let log = |status: u16, body: Option<Value>| {
        sim.log_request(LoggedRequest {
            at,
            api,
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            status,
            body,
        });
    };

    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(err) => {
            tracing::debug!(error = %err, "request body rejected");
            let response = api_error(api, StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            log(response.status().as_u16(), None);
            return response;
        }
    };
    let logged_body = body_value(&bytes);

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
        Action::Pass | Action::AcceptThenDrop => {}
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
}
