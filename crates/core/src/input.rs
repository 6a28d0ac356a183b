//! The bounds every request string is held to, before (and besides) the rules of the operation
//! that reads it: strings are bounded and free of NUL characters (PostgreSQL cannot store them,
//! and an unbounded string ends up in queries, logs and error messages), and identifiers are
//! taken exactly as given.
//!
//! Identifiers and enum-like names (ids, job and event names, attribute names, idempotency keys,
//! page tokens) are never trimmed: a value with leading or trailing whitespace is refused. So
//! one thing has one spelling (`" segment-sync"` is not `segment-sync`, `" u1"` is not `u1`),
//! and nothing a caller sends is silently changed. Free text (names, descriptions, titles,
//! subjects, bodies, search strings) is bounded but kept as given.
//!
//! Core's own validation uses these rules; the server applies them to the fields it maps before
//! calling operations whose own checks do not cover them.

use crate::{CoreError, FieldViolation};

/// Bounds of request fields that no Customer.io limit covers.
pub mod limits {
    /// Bytes in an id of this service or of SharpSend (send ids, assignment and request ids).
    pub const ID_BYTES: usize = 200;
    /// Bytes in a page token (the tokens this service issues are far shorter).
    pub const PAGE_TOKEN_BYTES: usize = 512;
    /// Characters in a search string such as `name_contains` (a segment name has at most 200).
    pub const SEARCH_CHARS: usize = 200;
    /// Bytes in a job name (the longest is 18).
    pub const JOB_NAME_BYTES: usize = 64;
    /// Outbox ids in one RetryDeadLetters call.
    pub const OUTBOX_IDS: usize = 1000;
}

/// What is wrong with identifier `value` (at most `max_bytes` bytes; `required`: not empty),
/// if anything.
pub fn identifier_problem(value: &str, max_bytes: usize, required: bool) -> Option<String> {
    if value.is_empty() {
        return required.then(|| "is required".to_owned());
    }
    if value.len() > max_bytes {
        return Some(format!("is {} bytes; at most {max_bytes}", value.len()));
    }
    if value.contains('\0') {
        return Some("must not contain NUL characters".to_owned());
    }
    if value.chars().any(char::is_control) {
        return Some("must not contain control characters".to_owned());
    }
    if value.trim().is_empty() {
        return Some("must not be blank".to_owned());
    }
    if value.trim() != value {
        return Some(
            "must not begin or end with whitespace (identifiers are taken exactly as given)"
                .to_owned(),
        );
    }
    None
}

/// Adds a violation on `field` when identifier `value` breaks [`identifier_problem`]'s rules.
pub fn identifier(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    value: &str,
    max_bytes: usize,
    required: bool,
) {
    if let Some(problem) = identifier_problem(value, max_bytes, required) {
        violations.push(FieldViolation::new(field, problem));
    }
}

/// Adds a violation on `field` when free text `value` holds NUL characters or more than
/// `max_chars` characters. Whitespace is the caller's business.
pub fn text(violations: &mut Vec<FieldViolation>, field: &str, value: &str, max_chars: usize) {
    // Four bytes per character at most: longer is too long without counting.
    let chars = if value.len() > max_chars.saturating_mul(4) {
        None
    } else {
        Some(value.chars().count())
    };
    match chars {
        Some(n) if n <= max_chars => {
            if value.contains('\0') {
                violations.push(FieldViolation::new(
                    field,
                    "must not contain NUL characters",
                ));
            }
        }
        _ => violations.push(FieldViolation::new(
            field,
            format!("is {} bytes; at most {max_chars} characters", value.len()),
        )),
    }
}

/// `Ok` when nothing was found, else `InvalidArgument` with every violation.
pub fn finish(violations: Vec<FieldViolation>) -> Result<(), CoreError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(CoreError::InvalidArgument(violations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_taken_exactly_as_given() {
        assert_eq!(identifier_problem("segment-sync", 64, true), None);
        assert_eq!(identifier_problem("a/b c", 64, true), None);
        assert_eq!(identifier_problem("", 64, false), None);
        for bad in [
            "",
            " segment-sync",
            "segment-sync\n",
            "   ",
            "a\0b",
            "a\u{7}b",
        ] {
            assert!(identifier_problem(bad, 64, true).is_some(), "{bad:?}");
        }
        let long = "x".repeat(1_000_000);
        let problem = identifier_problem(&long, 200, true).unwrap_or_default();
        assert!(problem.len() < 100, "{problem}");
    }

    #[test]
    fn free_text_is_bounded_and_free_of_nul() {
        let mut v = Vec::new();
        text(&mut v, "name_contains", "  Growth ", 200);
        text(&mut v, "name_contains", &"é".repeat(200), 200);
        assert!(v.is_empty(), "{v:?}");
        text(&mut v, "name_contains", &"é".repeat(201), 200);
        text(&mut v, "name_contains", &"x".repeat(50_000), 200);
        text(&mut v, "name_contains", "a\0", 200);
        assert_eq!(v.len(), 3);
        assert!(finish(v).is_err());
        assert!(finish(Vec::new()).is_ok());
    }
}
