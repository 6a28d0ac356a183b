//! Error BODIES in Customer.io's shapes: what the simulated APIs answer on failure (not to be
//! confused with `error::SimError`, the error of the simulator's own state operations).
//!
//! - App API: `{"errors":[{"detail":..,"status":"404","source":{..}}]}`.
//! - Track API v1: `{"meta":{"errors":["..."]}}` (merge_customers: `{"meta":{"error":".."}}`).
//! - Track API v2: `{"errors":[{"reason":..,"field":..,"message":..}]}`; a batch's 207 adds
//!   `batch_index` to each.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::config::SimApi;

/// App API error with an optional JSON:API `source` object.
pub(crate) fn app_error(
    status: StatusCode,
    detail: impl Into<String>,
    source: Option<Value>,
) -> Response {
    let mut error = json!({
        "detail": detail.into(),
        "status": status.as_u16().to_string(),
    });
    if let (Some(source), Some(obj)) = (source, error.as_object_mut()) {
        obj.insert("source".to_owned(), source);
    }
    (status, Json(json!({ "errors": [error] }))).into_response()
}

/// A newsletter endpoint's error as the 2026 spec's `newsletterErrorResponse` shows it:
/// `{"errors":[{"detail":".."}]}` (no `status`, no `source`).
pub(crate) fn newsletter_error(status: StatusCode, detail: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "errors": [{ "detail": detail.into() }] })),
    )
        .into_response()
}

/// Track API v1 error.
pub(crate) fn track_error(status: StatusCode, messages: Vec<String>) -> Response {
    (status, Json(json!({ "meta": { "errors": messages } }))).into_response()
}

/// One invalid field of a Track request: rendered as a v1 message or a v2 error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    /// Short machine-readable reason (`required`, `invalid`, `too_long`, `too_large`, ...).
    pub(crate) reason: &'static str,
    /// The offending field as a dotted path (`name`, `attributes.plan`, `identifiers`); empty
    /// for the whole operation.
    pub(crate) field: String,
    /// Human-readable detail.
    pub(crate) message: String,
}

impl Violation {
    pub(crate) fn new(
        reason: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            reason,
            field: field.into(),
            message: message.into(),
        }
    }

    /// The v2 error object, with `batch_index` when the op was part of a batch.
    pub(crate) fn to_v2(&self, batch_index: Option<usize>) -> Value {
        let mut error = json!({
            "reason": self.reason,
            "field": self.field,
            "message": self.message,
        });
        if let (Some(index), Some(obj)) = (batch_index, error.as_object_mut()) {
            obj.insert("batch_index".to_owned(), json!(index));
        }
        error
    }
}

/// Track API v2 error (`/api/v2/entity`, `/api/v2/batch` as a whole).
pub(crate) fn track_v2_error(status: StatusCode, violations: &[Violation]) -> Response {
    let errors: Vec<Value> = violations.iter().map(|v| v.to_v2(None)).collect();
    (status, Json(json!({ "errors": errors }))).into_response()
}

/// Error body for `api` with a single message.
pub(crate) fn api_error(api: SimApi, status: StatusCode, detail: impl Into<String>) -> Response {
    match api {
        SimApi::App => app_error(status, detail, None),
        SimApi::Track => track_error(status, vec![detail.into()]),
    }
}

/// 429 with `Retry-After`.
pub(crate) fn rate_limited(api: SimApi, limit: u32, retry_after_secs: u64) -> Response {
    let detail =
        format!("rate limited to {limit} requests per 1s, retry after {retry_after_secs}s");
    let mut response = match api {
        SimApi::App => app_error(StatusCode::TOO_MANY_REQUESTS, detail, None),
        // Customer.io's gateway answers both APIs' rate limits in this shape.
        SimApi::Track => (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"errors":[{"detail": detail, "status": "429"}]})),
        )
            .into_response(),
    };
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// Answer of a `Fault::Status`.
pub(crate) fn fault_response(api: SimApi, status: u16, retry_after_secs: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let detail = status.canonical_reason().map_or_else(
        || "simulated fault".to_owned(),
        |r| format!("{r} (simulated fault)"),
    );
    let mut response = if status == StatusCode::TOO_MANY_REQUESTS {
        (
            status,
            Json(json!({"errors":[{"detail": format!("rate limited (simulated fault): {detail}"), "status": "429"}]})),
        )
            .into_response()
    } else {
        api_error(api, status, detail)
    };
    if let Some(secs) = retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A handler error rendered in the shape of the API it belongs to.
#[derive(Debug)]
pub(crate) enum ApiError {
    App {
        status: StatusCode,
        detail: String,
        source: Option<Value>,
    },
    Track {
        status: StatusCode,
        messages: Vec<String>,
    },
    /// `{"meta":{"error":".."}}`: the 400 of `POST /api/v1/merge_customers`.
    TrackSingle {
        status: StatusCode,
        message: String,
    },
    TrackV2 {
        status: StatusCode,
        violations: Vec<Violation>,
    },
    Control {
        status: StatusCode,
        message: String,
    },
}

impl ApiError {
    pub(crate) fn app(
        status: StatusCode,
        detail: impl Into<String>,
        source: Option<Value>,
    ) -> Self {
        ApiError::App {
            status,
            detail: detail.into(),
            source,
        }
    }

    pub(crate) fn track(status: StatusCode, messages: Vec<String>) -> Self {
        ApiError::Track { status, messages }
    }

    pub(crate) fn track_v2(status: StatusCode, violations: Vec<Violation>) -> Self {
        ApiError::TrackV2 { status, violations }
    }

    pub(crate) fn control(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError::Control {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::App {
                status,
                detail,
                source,
            } => app_error(status, detail, source),
            ApiError::Track { status, messages } => track_error(status, messages),
            ApiError::TrackSingle { status, message } => {
                (status, Json(json!({ "meta": { "error": message } }))).into_response()
            }
            ApiError::TrackV2 { status, violations } => track_v2_error(status, &violations),
            ApiError::Control { status, message } => {
                (status, Json(json!({ "error": message }))).into_response()
            }
        }
    }
}
