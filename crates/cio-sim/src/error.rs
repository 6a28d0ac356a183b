//! The crate's error type (state operations used by tests and by the HTTP handlers).

/// Errors of the simulator's state operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No segment with this id.
    #[error("segment {0} not found")]
    SegmentNotFound(i64),
    /// The segment is data-driven (dynamic): its membership cannot be changed directly.
    #[error("segment {0} is a data-driven segment; only manual segments can be changed")]
    NotManual(i64),
}
