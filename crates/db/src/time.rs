//! Timestamp normalisation shared by the repositories.

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};

/// Truncates to microseconds, the precision PostgreSQL stores, so that a value written through
/// this crate reads back identically on SQLite and PostgreSQL.
pub(crate) fn db_time(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Longest lease (or other) duration accepted; longer ones are clamped. Keeps timestamps in a
/// range where SQLite's RFC 3339 text still sorts like time.
const MAX_SPAN: TimeDelta = TimeDelta::days(365 * 100);

/// `now + span`, clamped to [`MAX_SPAN`], truncated to microseconds.
pub(crate) fn add_span(now: DateTime<Utc>, span: std::time::Duration) -> DateTime<Utc> {
    let span = TimeDelta::from_std(span).unwrap_or(MAX_SPAN).min(MAX_SPAN);
    db_time(now.checked_add_signed(span).unwrap_or(now))
}
