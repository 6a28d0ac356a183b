//! [`SimError`], the crate's error type (state operations used by tests and by the HTTP
//! handlers). The HTTP error bodies answered to clients are in `error_bodies`.

/// Errors of the simulator's state operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No segment with this id.
    #[error("segment {0} not found")]
    SegmentNotFound(i64),
    /// The segment is data-driven (dynamic): its membership cannot be changed directly.
    #[error("segment {0} is a data-driven segment; only manual segments can be changed")]
    NotManual(i64),
    /// No campaign (of the expected kind) with this id.
    #[error("campaign {0} not found")]
    CampaignNotFound(i64),
    /// No API-triggered broadcast with this id.
    #[error("broadcast {0} not found")]
    BroadcastNotFound(i64),
    /// No newsletter with this id.
    #[error("newsletter {0} not found")]
    NewsletterNotFound(i64),
    /// The newsletter was already sent or scheduled.
    #[error("newsletter {0} is not a draft (already sent or scheduled)")]
    NewsletterNotDraft(i64),
    /// A rate outside `0..=1`.
    #[error("invalid delivery rates: {0}")]
    InvalidRates(String),
    /// A region other than `us` or `eu`.
    #[error("unknown region {0:?}: expected \"us\" or \"eu\"")]
    InvalidRegion(String),
    /// An audience filter referring to a segment that does not exist.
    #[error("the audience filter refers to segment {0}, which does not exist")]
    UnknownSegment(i64),
}
