//! [`CioError`], the one error type of this crate, and parsing of Customer.io's error bodies.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Api;

/// One error item reported by Customer.io, normalised across the API shapes:
///
/// * App API: `{"errors":[{"detail","status","source":{"pointer"}}]}`
/// * Track v1: `{"meta":{"errors":["..."]}}` or `{"meta":{"error":"..."}}` (also transactional)
/// * Track v2: `{"errors":[{"reason","field","message","batch_index"}]}`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable text (`detail` or `message`, or the string itself).
    pub message: String,
    /// HTTP status the item reports (App API `status`), as given.
    pub status: Option<String>,
    /// The offending field (`source.pointer` in the App API, `field` in Track v2).
    pub field: Option<String>,
    /// Machine-readable reason (Track v2 `reason`).
    pub reason: Option<String>,
    /// Index of the failed operation in a Track v2 batch.
    pub batch_index: Option<u64>,
}

impl ErrorDetail {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(ErrorDetail {
                message: s.clone(),
                ..ErrorDetail::default()
            }),
            Value::Object(map) => {
                let text = |keys: &[&str]| {
                    keys.iter()
                        .find_map(|k| map.get(*k).and_then(scalar_to_string))
                };
                let source = map.get("source");
                let field = source
                    .and_then(|s| s.get("pointer").or_else(|| s.get("parameter")))
                    .and_then(scalar_to_string)
                    .or_else(|| text(&["field"]));
                let reason = text(&["reason", "code"]);
                let message = text(&["detail", "message", "title", "error"])
                    .or_else(|| reason.clone())
                    .unwrap_or_default();
                Some(ErrorDetail {
                    message,
                    status: text(&["status"]),
                    field,
                    reason,
                    batch_index: map.get("batch_index").and_then(Value::as_u64),
                })
            }
            _ => None,
        }
    }
}

fn scalar_to_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Longest non-JSON error body kept as a detail (bytes, cut at a char boundary).
const MAX_TEXT_DETAIL: usize = 200;

/// Parses any of Customer.io's error body shapes into details. Never fails: an unknown JSON
/// shape gives no details, a non-JSON body becomes one (truncated) text detail.
pub fn parse_error_details(body: &[u8]) -> Vec<ErrorDetail> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                return Vec::new();
            }
            let mut end = text.len().min(MAX_TEXT_DETAIL);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            return vec![ErrorDetail {
                message: text[..end].to_owned(),
                ..ErrorDetail::default()
            }];
        }
    };

    fn push_all(details: &mut Vec<ErrorDetail>, v: &Value) {
        match v {
            Value::Array(items) => details.extend(items.iter().filter_map(ErrorDetail::from_value)),
            other => details.extend(ErrorDetail::from_value(other)),
        }
    }
    let mut details = Vec::new();
    let meta = value.get("meta");
    let sources = [
        value.get("errors"),
        meta.and_then(|m| m.get("errors")),
        meta.and_then(|m| m.get("error")),
    ];
    for v in sources.into_iter().flatten() {
        push_all(&mut details, v);
    }
    if details.is_empty() {
        for key in ["error", "message", "detail"] {
            if let Some(v) = value.get(key) {
                push_all(&mut details, v);
            }
        }
    }
    details
}

/// Every failure of a Customer.io call.
///
/// `endpoint` fields hold the endpoint TEMPLATE (`/v1/segments/{segment_id}`), never a concrete
/// path, so errors carry no ids or emails; no variant ever holds a key or an auth header.
#[derive(Debug, thiserror::Error)]
pub enum CioError {
    /// 401 or 403: bad or insufficient credentials, or the wrong region (Customer.io refuses
    /// both alike; [`CioClient::check_account`](crate::CioClient::check_account) tells which).
    #[error("Customer.io {api} API refused the credentials (HTTP {status})")]
    Unauthorized {
        /// Which API answered.
        api: Api,
        /// 401 or 403.
        status: u16,
    },
    /// 404: the addressed resource does not exist.
    #[error("Customer.io {api} API: not found ({endpoint})")]
    NotFound {
        /// Which API answered.
        api: Api,
        /// Endpoint template.
        endpoint: &'static str,
    },
    /// 429 that outlasted the retries (or was not retried).
    #[error("Customer.io {api} API rate limit exceeded{}", fmt_retry_after(*.retry_after))]
    RateLimited {
        /// Which API answered.
        api: Api,
        /// The server's `Retry-After`, if it sent one (absent on daily quotas).
        retry_after: Option<Duration>,
    },
    /// 400, 422 or another 4xx: the request itself was refused.
    #[error("Customer.io {api} API rejected the request (HTTP {status}){}", fmt_details(.details))]
    Rejected {
        /// Which API answered.
        api: Api,
        /// HTTP status.
        status: u16,
        /// Customer.io's error items.
        details: Vec<ErrorDetail>,
    },
    /// 5xx that outlasted the retries (or was not retried).
    #[error("Customer.io {api} API server error (HTTP {status})")]
    Server {
        /// Which API answered.
        api: Api,
        /// HTTP status.
        status: u16,
    },
    /// No complete answer within the client timeout. The request may have been processed.
    #[error("timed out waiting for Customer.io {api} API ({endpoint})")]
    Timeout {
        /// Which API was called.
        api: Api,
        /// Endpoint template.
        endpoint: &'static str,
    },
    /// Connection-level failure (refused, reset, closed mid-answer, TLS...).
    #[error("transport error calling Customer.io {api} API ({endpoint}): {message}")]
    Transport {
        /// Which API was called.
        api: Api,
        /// Endpoint template.
        endpoint: &'static str,
        /// Cause chain, without the URL.
        message: String,
        /// `false` only when the connection could not even be established, so the request
        /// provably never left; `true` when it may have reached Customer.io.
        maybe_sent: bool,
    },
    /// A 2xx answer whose body does not have the expected shape.
    #[error("unexpected response from Customer.io {api} API ({endpoint}): {message}")]
    Decode {
        /// Which API answered.
        api: Api,
        /// Endpoint template.
        endpoint: &'static str,
        /// What did not fit.
        message: String,
    },
    /// Invalid client configuration or arguments (no request was sent).
    #[error("Customer.io client configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
}

fn fmt_retry_after(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!(" (retry after {:.3}s)", d.as_secs_f64()),
        None => String::new(),
    }
}

fn fmt_details(details: &[ErrorDetail]) -> String {
    const SHOWN: usize = 3;
    let mut out = String::new();
    for (i, d) in details.iter().take(SHOWN).enumerate() {
        out.push_str(if i == 0 { ": " } else { "; " });
        let text = if d.message.is_empty() {
            d.reason.as_deref().unwrap_or("(no message)")
        } else {
            &d.message
        };
        out.push_str(text);
        if let Some(field) = &d.field {
            let _ = write!(out, " [{field}]");
        }
    }
    if details.len() > SHOWN {
        let _ = write!(out, " (+{} more)", details.len() - SHOWN);
    }
    out
}

impl CioError {
    /// The HTTP status behind the error, when Customer.io answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            CioError::Unauthorized { status, .. }
            | CioError::Rejected { status, .. }
            | CioError::Server { status, .. } => Some(*status),
            CioError::NotFound { .. } => Some(404),
            CioError::RateLimited { .. } => Some(429),
            CioError::Timeout { .. }
            | CioError::Transport { .. }
            | CioError::Decode { .. }
            | CioError::Config { .. } => None,
        }
    }

    /// The server's `Retry-After` on a rate-limit error.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CioError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the condition is transient (408, 429, 5xx, timeout, transport), so the same
    /// request could succeed later. This says nothing about whether re-sending is SAFE: for
    /// message-sending calls check [`is_outcome_unknown`](Self::is_outcome_unknown) first.
    pub fn is_retryable(&self) -> bool {
        match self {
            CioError::RateLimited { .. }
            | CioError::Server { .. }
            | CioError::Timeout { .. }
            | CioError::Transport { .. } => true,
            CioError::Rejected { status, .. } => *status == 408,
            CioError::Unauthorized { .. }
            | CioError::NotFound { .. }
            | CioError::Decode { .. }
            | CioError::Config { .. } => false,
        }
    }

    /// True when the request may have reached Customer.io but no answer came back (timeout,
    /// connection lost after sending). For a send, the message may or may not have gone out:
    /// do not re-send blindly.
    pub fn is_outcome_unknown(&self) -> bool {
        match self {
            CioError::Timeout { .. } => true,
            CioError::Transport { maybe_sent, .. } => *maybe_sent,
            _ => false,
        }
    }

    /// The API involved (`None` for configuration errors).
    pub fn api(&self) -> Option<Api> {
        match self {
            CioError::Unauthorized { api, .. }
            | CioError::NotFound { api, .. }
            | CioError::RateLimited { api, .. }
            | CioError::Rejected { api, .. }
            | CioError::Server { api, .. }
            | CioError::Timeout { api, .. }
            | CioError::Transport { api, .. }
            | CioError::Decode { api, .. } => Some(*api),
            CioError::Config { .. } => None,
        }
    }

    /// Customer.io's error items (only [`CioError::Rejected`] carries any).
    pub fn details(&self) -> &[ErrorDetail] {
        match self {
            CioError::Rejected { details, .. } => details,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn app_api_shape() {
        let body = br#"{"errors":[{"detail":"name is required","status":"422","source":{"pointer":"/segment/name"}}]}"#;
        let d = parse_error_details(body);
        assert_eq!(
            d,
            vec![ErrorDetail {
                message: "name is required".into(),
                status: Some("422".into()),
                field: Some("/segment/name".into()),
                reason: None,
                batch_index: None,
            }]
        );
    }

    #[test]
    fn app_api_rate_limit_shape() {
        let body =
            br#"{"errors":[{"detail":"rate limited to 10 requests per 1s","status":"429"}]}"#;
        let d = parse_error_details(body);
        assert_eq!(d.len(), 1);
        assert!(d[0].message.starts_with("rate limited"));
        assert_eq!(d[0].status.as_deref(), Some("429"));
    }

    #[test]
    fn track_v1_meta_errors_shape() {
        let body = br#"{"meta":{"errors":["invalid email","attribute too long"]}}"#;
        let d = parse_error_details(body);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].message, "invalid email");
        assert_eq!(d[1].message, "attribute too long");
    }

    #[test]
    fn track_v1_meta_error_shape() {
        let d = parse_error_details(br#"{"meta":{"error":"missing transactional_message_id"}}"#);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].message, "missing transactional_message_id");
    }

    #[test]
    fn track_v2_shape() {
        let body = br#"{"errors":[{"batch_index":3,"reason":"required","field":"identifiers","message":"identifiers are required"}]}"#;
        let d = parse_error_details(body);
        assert_eq!(
            d,
            vec![ErrorDetail {
                message: "identifiers are required".into(),
                status: None,
                field: Some("identifiers".into()),
                reason: Some("required".into()),
                batch_index: Some(3),
            }]
        );
    }

    #[test]
    fn numeric_status_and_reason_only() {
        let d = parse_error_details(br#"{"errors":[{"status":400,"reason":"bad"}]}"#);
        assert_eq!(d[0].status.as_deref(), Some("400"));
        assert_eq!(d[0].message, "bad");
    }

    #[test]
    fn non_json_and_empty_bodies() {
        assert!(parse_error_details(b"").is_empty());
        assert!(parse_error_details(b"{}").is_empty());
        let d = parse_error_details(b"<html>Bad Gateway</html>");
        assert_eq!(d[0].message, "<html>Bad Gateway</html>");
        let long = "é".repeat(500);
        let d = parse_error_details(long.as_bytes());
        assert!(d[0].message.len() <= MAX_TEXT_DETAIL);
    }

    #[test]
    fn error_methods() {
        let rl = CioError::RateLimited {
            api: Api::App,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(rl.status(), Some(429));
        assert_eq!(rl.retry_after(), Some(Duration::from_secs(2)));
        assert!(rl.is_retryable());
        assert!(!rl.is_outcome_unknown());
        assert!(rl.to_string().contains("retry after 2.000s"));

        let t = CioError::Timeout {
            api: Api::App,
            endpoint: "/v1/x",
        };
        assert!(t.is_outcome_unknown() && t.is_retryable() && t.status().is_none());

        let refused = CioError::Transport {
            api: Api::Track,
            endpoint: "/v1/x",
            message: "connection refused".into(),
            maybe_sent: false,
        };
        assert!(!refused.is_outcome_unknown());

        let rejected = CioError::Rejected {
            api: Api::App,
            status: 422,
            details: parse_error_details(
                br#"{"errors":[{"detail":"bad filter","source":{"pointer":"/recipients"}}]}"#,
            ),
        };
        assert_eq!(rejected.status(), Some(422));
        assert!(!rejected.is_retryable());
        assert_eq!(
            rejected.to_string(),
            "Customer.io app API rejected the request (HTTP 422): bad filter [/recipients]"
        );
        assert!(
            CioError::Unauthorized {
                api: Api::Track,
                status: 401
            }
            .to_string()
            .contains("track")
        );
    }
}
