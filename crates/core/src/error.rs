//! The domain error every operation returns; the server maps it to gRPC status in one place.

use cio_client::CioError;
use sharpsend_db::DbError;

/// One problem with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field, e.g. `page_token` or `segment_ids[2]`.
    pub field: String,
    /// What is wrong with it, for the caller.
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request is malformed; each violation names its field.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The thing asked for does not exist.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    /// The request is well-formed but the system is not in a state to do it (e.g. targeting that
    /// cannot be sent, a send that is not uncertain); each violation names its subject.
    #[error("failed precondition: {}", describe(.0))]
    FailedPrecondition(Vec<FieldViolation>),
    /// Something with the same key exists and differs from what was asked.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A concurrent change won: what the request decided on changed before it was applied (e.g.
    /// ResolveSend on a submission the reconciler settled meanwhile). Read again, then decide.
    #[error("aborted: {0}")]
    Aborted(String),
    /// Customer.io answered with an error or could not be reached.
    #[error("Customer.io request failed")]
    Upstream(#[from] CioError),
    /// The database failed; the source holds the detail (never shown to callers).
    #[error("database failure")]
    Database(#[from] DbError),
    /// A bug or an impossible state; the text is for the log and is safe to show.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    /// A single-field `InvalidArgument`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `error: cause: cause` for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
