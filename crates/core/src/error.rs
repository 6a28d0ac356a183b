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
    /// A stable, machine-readable cause (UPPER_SNAKE_CASE, e.g. [`reasons::UNKNOWN_SEGMENT`]);
    /// `None`: the error kind's general reason. Callers see it as `google.rpc.ErrorInfo.reason`
    /// (the first violation's) and as each precondition violation's `type`.
    pub reason: Option<&'static str>,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
            reason: None,
        }
    }

    /// The same violation with a stable reason.
    pub fn because(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }
}

/// Stable error reasons (`google.rpc.ErrorInfo.reason`, domain `sharpsend.cio.v1`) that core
/// attaches to violations. The server adds the general ones of each error kind.
pub mod reasons {
    /// A targeted segment is not in the mirror (never seen in Customer.io).
    pub const UNKNOWN_SEGMENT: &str = "UNKNOWN_SEGMENT";
    /// A targeted segment was removed in Customer.io.
    pub const REMOVED_SEGMENT: &str = "REMOVED_SEGMENT";
    /// A targeted segment has no members.
    pub const EMPTY_SEGMENT: &str = "EMPTY_SEGMENT";
    /// The broadcast to trigger is not active in Customer.io.
    pub const BROADCAST_INACTIVE: &str = "BROADCAST_INACTIVE";
    /// ResolveSend on a send with nothing uncertain.
    pub const SEND_NOT_UNCERTAIN: &str = "SEND_NOT_UNCERTAIN";
    /// A person whose id (`.` or `..`) Customer.io's URL-path endpoints cannot address.
    pub const ID_NOT_ADDRESSABLE: &str = "ID_NOT_ADDRESSABLE";
    /// A page token from another listing, or from the same listing with other filters.
    pub const INVALID_PAGE_TOKEN: &str = "INVALID_PAGE_TOKEN";
}

/// At most this many characters of a caller's value are repeated in an error message.
pub const SHOWN_CHARS: usize = 64;

/// `value` as an error message may repeat it: at most [`SHOWN_CHARS`] characters, then `…`
/// (errors never echo unbounded input).
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_CHARS) {
        None => value.to_owned(),
        Some((end, _)) => format!("{}…", &value[..end]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_values_are_cut_at_a_character_boundary() {
        assert_eq!(shown("snd_1"), "snd_1");
        let long = "é".repeat(1000);
        let cut = shown(&long);
        assert_eq!(cut.chars().count(), SHOWN_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
