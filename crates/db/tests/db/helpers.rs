//! Shared fixtures for the integration tests.

use chrono::{DateTime, TimeZone, Utc};
use sharpsend_db::segments::SyncedSegment;
use sharpsend_db::testing::TestDatabase;
use sharpsend_db::{DbError, workspaces};

/// A fixed instant `secs` seconds after 2026-11-28T00:00:00Z.
pub fn ts(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_795_824_000 + secs, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// A workspace for `site` in region `us`; returns its id.
pub async fn workspace(db: &TestDatabase, site: &str) -> Result<i64, DbError> {
    Ok(workspaces::ensure(&db.conn, site, "us").await?.id)
}

/// A synced segment with no description and no count.
pub fn seg(cio_id: i64, name: &str, segment_type: &str) -> SyncedSegment {
    SyncedSegment {
        cio_id,
        name: name.to_owned(),
        description: None,
        segment_type: segment_type.to_owned(),
        member_count: None,
        counted_at: None,
    }
}

/// A synced segment with a member count counted at `counted_at`.
pub fn counted(cio_id: i64, name: &str, count: i64, counted_at: DateTime<Utc>) -> SyncedSegment {
    SyncedSegment {
        member_count: Some(count),
        counted_at: Some(counted_at),
        ..seg(cio_id, name, "dynamic")
    }
}

/// The JSON object `value` as an attribute map (empty if `value` is not an object).
pub fn attrs(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}
