//! The one place where domain errors become gRPC status. Callers never see database text or
//! Customer.io credentials; the full cause chain goes to the log.
//!
//! Handlers write `core_call().await.or_status()?` ([`OrStatus`]) or `to_status(error)`; no other
//! module builds a `Status`, except the authentication interceptor.

use cio_client::{Api, CioError};
use sharpsend_core::{CoreError, error::error_chain};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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
            let message = error_message(&violations);
            let mut details = ErrorDetails::new();
            for v in &violations {
                details.add_bad_request_violation(v.field.clone(), v.description.clone());
            }
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        CoreError::FailedPrecondition(violations) => {
            let message = error_message(&violations);
            let mut details = ErrorDetails::new();
            for v in &violations {
                details.add_precondition_failure_violation(
                    "PRECONDITION",
                    v.field.clone(),
                    v.description.clone(),
                );
            }
            Status::with_error_details(Code::FailedPrecondition, message, details)
        }
        CoreError::AlreadyExists(message) => Status::already_exists(message),
        CoreError::Aborted(message) => Status::aborted(message),
        CoreError::NotFound { what, id } => Status::not_found(format!("{what} {id} not found")),
        CoreError::Upstream(e) => upstream(e),
        CoreError::Database(e) => {
            tracing::error!(error = %error_chain(&e), "database failure");
            Status::internal("internal error (database); see the server log")
        }
        CoreError::Internal(what) => {
            tracing::error!(error = %what, "internal error");
            Status::internal(format!("internal error: {what}; see the server log"))
        }
    }
}

fn error_message(violations: &[sharpsend_core::FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
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
        CioError::Unauthorized { api, .. } => Status::failed_precondition(format!(
            "Customer.io rejected this workspace's {api} API credentials; check {} (and CIO_REGION)",
            credential_variable(*api)
        )),
        CioError::RateLimited { retry_after, .. } => Status::with_error_details(
            Code::Unavailable,
            "Customer.io is rate limiting this workspace; retry later",
            ErrorDetails::with_retry_info(*retry_after),
        ),
        CioError::Server { .. } | CioError::Timeout { .. } | CioError::Transport { .. } => {
            Status::unavailable(format!("Customer.io is unavailable: {error}"))
        }
        CioError::NotFound { .. } => {
            Status::not_found(format!("not found in Customer.io: {error}"))
        }
        CioError::Rejected { .. } => {
            Status::failed_precondition(format!("Customer.io rejected the request: {error}"))
        }
        _ => Status::internal("unexpected answer from Customer.io; see the server log"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_violations() {
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
            ),
            (
                CioError::RateLimited {
                    api: Api::App,
                    retry_after: Some(std::time::Duration::from_secs(2)),
                },
                Code::Unavailable,
            ),
            (
                CioError::Server {
                    api: Api::App,
                    status: 503,
                },
                Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(to_status(CoreError::Upstream(error)).code(), code);
        }
    }
}
