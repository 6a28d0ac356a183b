//! The one place where domain errors become gRPC status. Callers never see database text or
//! Customer.io credentials; the full cause chain goes to the log.
//!
//! Handlers write `core_call().await.or_status()?` ([`OrStatus`]) or `to_status(error)`; no other
//! module builds a `Status`: the access layer (authentication, roles), the load shedding and the deadline
//! of the serving stack use the constructors here too ([`unauthenticated`], [`overloaded`],
//! [`deadline_exceeded`]).
//!
//! Every status built here
//! - carries `google.rpc.ErrorInfo` with the domain [`DOMAIN`] and a stable reason ([`reasons`],
//!   or the reason core attached to the first violation), so clients can tell kinds of one code
//!   apart (e.g. `UNKNOWN_SEGMENT` from `SEND_NOT_UNCERTAIN`, both `FAILED_PRECONDITION`);
//! - is bounded: at most [`MAX_VIOLATIONS`] field or precondition violations (then one `…`
//!   entry saying how many more), each field and description cut, the message cut to
//!   [`MAX_MESSAGE_BYTES`], so message and details stay well under 8 KB on the wire (the
//!   metadata limit of default Python clients); values repeated from the request are cut by core
//!   (`sharpsend_core::error::shown`) and here.

use std::{collections::HashMap, time::Duration};

use cio_client::{Api, CioError};
use sharpsend_core::{
    CoreError, FieldViolation,
    error::{error_chain, shown},
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `google.rpc.ErrorInfo.domain` of every error this service answers.
pub const DOMAIN: &str = "sharpsend.cio.v1";
/// Violations listed in one status; more are summed up in one last `…` entry.
pub const MAX_VIOLATIONS: usize = 20;
/// Bytes of a status message.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Bytes of one violation's field and of its description.
const MAX_FIELD_BYTES: usize = 160;
const MAX_DESCRIPTION_BYTES: usize = 320;
/// Bytes of fields and descriptions listed in one status, all violations together.
const VIOLATION_BUDGET_BYTES: usize = 2_800;

/// The stable reasons of `google.rpc.ErrorInfo` this module sets itself. Core attaches more
/// specific ones to violations (`sharpsend_core::error::reasons`: `UNKNOWN_SEGMENT`,
/// `REMOVED_SEGMENT`, `EMPTY_SEGMENT`, `BROADCAST_INACTIVE`, `SEND_NOT_UNCERTAIN`,
/// `INVALID_PAGE_TOKEN`).
pub mod reasons {
    /// INVALID_ARGUMENT: one or more fields are wrong (google.rpc.BadRequest names them).
    pub const INVALID_FIELD: &str = "INVALID_FIELD";
    /// FAILED_PRECONDITION without a more specific reason.
    pub const FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";
    /// ALREADY_EXISTS: the key (e.g. assignment_id + request_id) was used with other content.
    pub const KEY_REUSED: &str = "KEY_REUSED";
    /// ABORTED: the change lost a race with another (e.g. ResolveSend vs reconciliation); read
    /// the current state and decide again.
    pub const CONFLICT: &str = "CONFLICT";
    /// NOT_FOUND, by what was not found.
    pub const UNKNOWN_SEGMENT: &str = "UNKNOWN_SEGMENT";
    pub const UNKNOWN_MANAGED_SEGMENT: &str = "UNKNOWN_MANAGED_SEGMENT";
    pub const UNKNOWN_SEND: &str = "UNKNOWN_SEND";
    pub const UNKNOWN_CUSTOMER: &str = "UNKNOWN_CUSTOMER";
    pub const UNKNOWN_BROADCAST: &str = "UNKNOWN_BROADCAST";
    pub const UNKNOWN_CAMPAIGN: &str = "UNKNOWN_CAMPAIGN";
    pub const UNKNOWN_NEWSLETTER: &str = "UNKNOWN_NEWSLETTER";
    /// NOT_FOUND of anything else.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// UNAVAILABLE: Customer.io could not be reached, timed out or answered 5xx.
    pub const CUSTOMERIO_UNAVAILABLE: &str = "CUSTOMERIO_UNAVAILABLE";
    /// UNAVAILABLE (+ RetryInfo when known): Customer.io is rate limiting this workspace.
    pub const CUSTOMERIO_RATE_LIMITED: &str = "CUSTOMERIO_RATE_LIMITED";
    /// FAILED_PRECONDITION: Customer.io refused this workspace's credentials.
    pub const CUSTOMERIO_CREDENTIALS_REJECTED: &str = "CUSTOMERIO_CREDENTIALS_REJECTED";
    /// FAILED_PRECONDITION: Customer.io refused the request itself.
    pub const CUSTOMERIO_REJECTED: &str = "CUSTOMERIO_REJECTED";
    /// NOT_FOUND: Customer.io does not know the addressed resource.
    pub const CUSTOMERIO_NOT_FOUND: &str = "CUSTOMERIO_NOT_FOUND";
    /// INTERNAL: Customer.io answered something this service does not understand.
    pub const CUSTOMERIO_UNEXPECTED_ANSWER: &str = "CUSTOMERIO_UNEXPECTED_ANSWER";
    /// INTERNAL: the database failed (the cause is in the server log).
    pub const DATABASE_FAILURE: &str = "DATABASE_FAILURE";
    /// INTERNAL: a bug or an impossible state (the cause is in the server log).
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
    /// UNAUTHENTICATED: no `authorization` metadata.
    pub const API_KEY_MISSING: &str = "API_KEY_MISSING";
    /// UNAUTHENTICATED: `authorization` is not `Bearer <key>`.
    pub const API_KEY_MALFORMED: &str = "API_KEY_MALFORMED";
    /// UNAUTHENTICATED: the key is not one of the configured keys.
    pub const API_KEY_INVALID: &str = "API_KEY_INVALID";
    /// UNAVAILABLE + RetryInfo: the server is handling as many calls as it may; retry later.
    pub const OVERLOADED: &str = "OVERLOADED";
    /// DEADLINE_EXCEEDED: the call ran past the server's deadline (or the caller's, if shorter).
    pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";
}

/// `Result<T, CoreError>` → `Result<T, Status>` through [`to_status`].
pub trait OrStatus<T> {
    fn or_status(self) -> Result<T, Status>;
}

impl<T> OrStatus<T> for Result<T, CoreError> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(to_status)
    }
}

/// Maps a domain error to the status the caller sees.
pub fn to_status(error: CoreError) -> Status {
    match error {
        CoreError::InvalidArgument(violations) => {
            with_violations(Code::InvalidArgument, reasons::INVALID_FIELD, violations)
        }
        CoreError::FailedPrecondition(violations) => with_violations(
            Code::FailedPrecondition,
            reasons::FAILED_PRECONDITION,
            violations,
        ),
        CoreError::AlreadyExists(message) => build(
            Code::AlreadyExists,
            message,
            reasons::KEY_REUSED,
            ErrorDetails::new(),
        ),
        CoreError::Aborted(message) => build(
            Code::Aborted,
            message,
            reasons::CONFLICT,
            ErrorDetails::new(),
        ),
        CoreError::NotFound { what, id } => build(
            Code::NotFound,
            format!("{what} {} not found", shown(&id)),
            not_found_reason(what),
            ErrorDetails::new(),
        ),
        CoreError::Upstream(e) => upstream(e),
        CoreError::Database(e) => {
            tracing::error!(error = %error_chain(&e), "database failure");
            build(
                Code::Internal,
                "internal error (database); see the server log".into(),
                reasons::DATABASE_FAILURE,
                ErrorDetails::new(),
            )
        }
        CoreError::Internal(what) => {
            tracing::error!(error = %what, "internal error");
            build(
                Code::Internal,
                format!("internal error: {what}; see the server log"),
                reasons::INTERNAL_ERROR,
                ErrorDetails::new(),
            )
        }
    }
}

/// `UNAUTHENTICATED` with `reason` (one of the `API_KEY_*` [`reasons`]).
pub fn unauthenticated(reason: &'static str, message: &str) -> Status {
    build(
        Code::Unauthenticated,
        message.to_owned(),
        reason,
        ErrorDetails::new(),
    )
}

/// `PERMISSION_DENIED` with no details (nothing about what the key could do instead): the
/// caller's role is below what the RPC needs, or the RPC has no rule.
pub fn permission_denied() -> Status {
    Status::permission_denied("permission denied")
}

/// `RESOURCE_EXHAUSTED`: an audited request body over `limit` bytes (as tonic refuses a message
/// over its limit).
pub fn request_too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!("the request is larger than {limit} bytes"))
}

/// `UNAVAILABLE` + `RetryInfo(retry_after)`, reason `OVERLOADED`: a call shed because the server
/// is handling `limit` calls already.
pub fn overloaded(limit: usize, retry_after: Duration) -> Status {
    build(
        Code::Unavailable,
        format!(
            "the server is handling {limit} calls (SHARPSEND_MAX_IN_FLIGHT); retry after {} ms",
            retry_after.as_millis()
        ),
        reasons::OVERLOADED,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// `DEADLINE_EXCEEDED`, reason `DEADLINE_EXCEEDED`: the call ran longer than `deadline`.
pub fn deadline_exceeded(deadline: Duration) -> Status {
    build(
        Code::DeadlineExceeded,
        format!(
            "the call did not finish within its deadline of {} ms (the server's \
             SHARPSEND_REQUEST_TIMEOUT_SECS, or the caller's deadline if shorter)",
            deadline.as_millis()
        ),
        reasons::DEADLINE_EXCEEDED,
        ErrorDetails::new(),
    )
}

/// The status: `message` cut to [`MAX_MESSAGE_BYTES`], `details` with `ErrorInfo` added.
fn build(code: Code, message: String, reason: &str, mut details: ErrorDetails) -> Status {
    build_with_metadata(code, message, reason, HashMap::new(), &mut details)
}

fn build_with_metadata(
    code: Code,
    message: String,
    reason: &str,
    metadata: HashMap<String, String>,
    details: &mut ErrorDetails,
) -> Status {
    details.set_error_info(reason, DOMAIN, metadata);
    Status::with_error_details(
        code,
        cut(&message, MAX_MESSAGE_BYTES),
        std::mem::take(details),
    )
}

/// `text` cut to at most `max` bytes at a character boundary, `…` marking a cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// An `INVALID_ARGUMENT` (BadRequest) or `FAILED_PRECONDITION` (PreconditionFailure) status
/// listing the first violations within the bounds, then how many more there were. The reason is
/// the first violation's, else `general`.
fn with_violations(code: Code, general: &'static str, violations: Vec<FieldViolation>) -> Status {
    let total = violations.len();
    let reason = violations.first().and_then(|v| v.reason).unwrap_or(general);
    let mut shown_violations: Vec<(String, String, &'static str)> = Vec::new();
    let mut budget = VIOLATION_BUDGET_BYTES;
    for v in &violations {
        if shown_violations.len() == MAX_VIOLATIONS {
            break;
        }
        let field = cut(&v.field, MAX_FIELD_BYTES);
        let description = cut(&v.description, MAX_DESCRIPTION_BYTES);
        let size = field.len() + description.len();
        if size > budget {
            break;
        }
        budget -= size;
        shown_violations.push((field, description, v.reason.unwrap_or(general)));
    }
    let omitted = total - shown_violations.len();
    let mut message = shown_violations
        .iter()
        .map(|(field, description, _)| format!("{field}: {description}"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for (field, description, kind) in &shown_violations {
        if code == Code::FailedPrecondition {
            details.add_precondition_failure_violation(*kind, field.clone(), description.clone());
        } else {
            details.add_bad_request_violation(field.clone(), description.clone());
        }
    }
    let mut metadata = HashMap::new();
    if omitted > 0 {
        let more = format!("and {omitted} more of {total} violations, not listed");
        if code == Code::FailedPrecondition {
            details.add_precondition_failure_violation(general, "…", more.clone());
        } else {
            details.add_bad_request_violation("…", more.clone());
        }
        message = format!("{}; {more}", cut(&message, MAX_MESSAGE_BYTES - 100));
        metadata.insert("violations".to_owned(), total.to_string());
    }
    build_with_metadata(code, message, reason, metadata, &mut details)
}

/// The reason of a `NotFound { what }` (core's stable names of things).
fn not_found_reason(what: &str) -> &'static str {
    match what {
        "segment" | "Customer.io segment" => reasons::UNKNOWN_SEGMENT,
        "SharpSend-managed segment" => reasons::UNKNOWN_MANAGED_SEGMENT,
        "send" => reasons::UNKNOWN_SEND,
        "customer" => reasons::UNKNOWN_CUSTOMER,
        "broadcast" => reasons::UNKNOWN_BROADCAST,
        "campaign" => reasons::UNKNOWN_CAMPAIGN,
        "newsletter" => reasons::UNKNOWN_NEWSLETTER,
        _ => reasons::NOT_FOUND,
    }
}

fn credential_variable(api: Api) -> &'static str {
    match api {
        Api::Track => "CIO_SITE_ID / CIO_TRACK_API_KEY",
        Api::App => "CIO_APP_API_KEY",
    }
}

fn upstream(error: CioError) -> Status {
    tracing::warn!(error = %error_chain(&error), "Customer.io request failed");
    match &error {
        CioError::Unauthorized { api, .. } => build(
            Code::FailedPrecondition,
            format!(
                "Customer.io rejected this workspace's {api} API credentials; check {} (and CIO_REGION)",
                credential_variable(*api)
            ),
            reasons::CUSTOMERIO_CREDENTIALS_REJECTED,
            ErrorDetails::new(),
        ),
        CioError::RateLimited { retry_after, .. } => build(
            Code::Unavailable,
            "Customer.io is rate limiting this workspace; retry later".into(),
            reasons::CUSTOMERIO_RATE_LIMITED,
            match retry_after {
                Some(_) => ErrorDetails::with_retry_info(*retry_after),
                None => ErrorDetails::new(),
            },
        ),
        CioError::Server { .. } | CioError::Timeout { .. } | CioError::Transport { .. } => build(
            Code::Unavailable,
            format!("Customer.io is unavailable: {error}"),
            reasons::CUSTOMERIO_UNAVAILABLE,
            ErrorDetails::new(),
        ),
        CioError::NotFound { .. } => build(
            Code::NotFound,
            format!("not found in Customer.io: {error}"),
            reasons::CUSTOMERIO_NOT_FOUND,
            ErrorDetails::new(),
        ),
        CioError::Rejected { .. } => build(
            Code::FailedPrecondition,
            format!("Customer.io rejected the request: {error}"),
            reasons::CUSTOMERIO_REJECTED,
            ErrorDetails::new(),
        ),
        _ => build(
            Code::Internal,
            "unexpected answer from Customer.io; see the server log".into(),
            reasons::CUSTOMERIO_UNEXPECTED_ANSWER,
            ErrorDetails::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use sharpsend_core::error::reasons as core_reasons;

    use super::*;

    fn reason(status: &Status) -> (String, String) {
        let info = status.get_error_details();
        info.error_info()
            .map(|i| (i.reason.clone(), i.domain.clone()))
            .unwrap_or_default()
    }

    /// Bytes the status takes in a response's headers (what a client's metadata limit counts).
    fn wire_bytes(status: &Status) -> usize {
        let mut headers = http::HeaderMap::new();
        status
            .add_header(&mut headers)
            .unwrap_or_else(|s| panic!("{s:?}"));
        headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum()
    }

    #[test]
    fn invalid_argument_carries_field_violations_and_error_info() {
        let status = to_status(CoreError::invalid(
            "page_token",
            "is not a token from this service",
        ));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("page_token"));
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        assert_eq!(fields, vec!["page_token".to_string()]);
        assert_eq!(
            reason(&status),
            (reasons::INVALID_FIELD.to_string(), DOMAIN.to_string())
        );
    }

    #[test]
    fn preconditions_carry_core_reasons_as_error_info_and_violation_types() {
        let status = to_status(CoreError::FailedPrecondition(vec![
            FieldViolation::new("segment_ids[0]", "segment 9 is not known")
                .because(core_reasons::UNKNOWN_SEGMENT),
            FieldViolation::new("segment_ids[1]", "segment 4 has no members")
                .because(core_reasons::EMPTY_SEGMENT),
        ]));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(reason(&status).0, "UNKNOWN_SEGMENT");
        let types: Vec<String> = status
            .get_error_details()
            .precondition_failure()
            .map(|p| p.violations.iter().map(|v| v.r#type.clone()).collect())
            .unwrap_or_default();
        assert_eq!(types, ["UNKNOWN_SEGMENT", "EMPTY_SEGMENT"]);
        let status = to_status(CoreError::FailedPrecondition(vec![
            FieldViolation::new("send_id", "nothing uncertain")
                .because(core_reasons::SEND_NOT_UNCERTAIN),
        ]));
        assert_eq!(reason(&status).0, "SEND_NOT_UNCERTAIN");
    }

    #[test]
    fn every_kind_of_error_has_a_reason() {
        let cases = [
            (
                CoreError::NotFound {
                    what: "segment",
                    id: "7".into(),
                },
                "UNKNOWN_SEGMENT",
            ),
            (
                CoreError::NotFound {
                    what: "send",
                    id: "snd_1".into(),
                },
                "UNKNOWN_SEND",
            ),
            (CoreError::AlreadyExists("x".into()), "KEY_REUSED"),
            (CoreError::Internal("x".into()), "INTERNAL_ERROR"),
            (
                CoreError::Upstream(CioError::Server {
                    api: Api::App,
                    status: 503,
                }),
                "CUSTOMERIO_UNAVAILABLE",
            ),
        ];
        for (error, want) in cases {
            assert_eq!(reason(&to_status(error)).0, want);
        }
        assert_eq!(
            reason(&unauthenticated(reasons::API_KEY_MISSING, "x")).0,
            "API_KEY_MISSING"
        );
        let shed = overloaded(512, Duration::from_secs(1));
        assert_eq!(shed.code(), Code::Unavailable);
        assert_eq!(reason(&shed).0, "OVERLOADED");
        assert!(shed.get_error_details().retry_info().is_some());
        assert_eq!(
            deadline_exceeded(Duration::from_secs(30)).code(),
            Code::DeadlineExceeded
        );
    }

    #[test]
    fn statuses_stay_small_whatever_the_input() {
        // 100 violations, each echoing a huge value: the 24 KB of metadata.
        let huge = "ü".repeat(100_000);
        let violations: Vec<FieldViolation> = (0..100)
            .map(|i| FieldViolation::new(format!("segment_ids[{i}].{huge}"), huge.clone()))
            .collect();
        for error in [
            CoreError::InvalidArgument(violations.clone()),
            CoreError::FailedPrecondition(violations),
            CoreError::NotFound {
                what: "send",
                id: huge.clone(),
            },
            CoreError::AlreadyExists(huge.clone()),
            CoreError::Internal(huge.clone()),
        ] {
            let status = to_status(error);
            let wire = wire_bytes(&status);
            assert!(wire < 8 * 1024, "{:?}: {wire} bytes", status.code());
            assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        }

        let many: Vec<FieldViolation> = (0..100)
            .map(|i| FieldViolation::new(format!("segment_ids[{i}]"), "must be positive"))
            .collect();
        let status = to_status(CoreError::InvalidArgument(many));
        let fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        assert_eq!(fields.len(), MAX_VIOLATIONS + 1);
        assert_eq!(fields[0], "segment_ids[0]");
        assert_eq!(fields[MAX_VIOLATIONS], "…");
        assert!(
            status.message().contains("and 80 more of 100"),
            "{}",
            status.message()
        );
        let total = status
            .get_error_details()
            .error_info()
            .and_then(|i| i.metadata.get("violations").cloned());
        assert_eq!(total.as_deref(), Some("100"));
    }

    #[test]
    fn upstream_errors_map_to_the_documented_codes() {
        let cases = [
            (
                CioError::Unauthorized {
                    api: Api::App,
                    status: 401,
                },
                Code::FailedPrecondition,
                "CUSTOMERIO_CREDENTIALS_REJECTED",
            ),
            (
                CioError::RateLimited {
                    api: Api::App,
                    retry_after: Some(std::time::Duration::from_secs(2)),
                },
                Code::Unavailable,
                "CUSTOMERIO_RATE_LIMITED",
            ),
            (
                CioError::Server {
                    api: Api::App,
                    status: 503,
                },
                Code::Unavailable,
                "CUSTOMERIO_UNAVAILABLE",
            ),
        ];
        for (error, code, want) in cases {
            let status = to_status(CoreError::Upstream(error));
            assert_eq!((status.code(), reason(&status).0.as_str()), (code, want));
        }
    }
}
