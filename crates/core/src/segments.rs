//! Segments: pull them from Customer.io into the mirror ([`sync_segments`]) and check the
//! segments an assignment targets ([`validate_targeting`]).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use cio_client::{CioError, SegmentType};
use futures::{StreamExt, TryStreamExt};
use sharpsend_db::segments::{self, SegmentRecord, SyncCounts, SyncedSegment};

use crate::{AppContext, CoreError, FieldViolation};

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub counts: SyncCounts,
    pub duration: Duration,
}

/// How many member counts are requested at once. They all pass the client's shared App API rate
/// limiter, so this only overlaps network latency; it cannot exceed the limit.
const COUNT_CONCURRENCY: usize = 4;

/// Pulls every segment and its member count from Customer.io and applies them to the mirror in
/// one transaction: new ones created, changed ones updated, missing ones marked removed.
///
/// Nothing is written unless every count was read (a segment deleted between the list and its
/// count is treated as gone), so a failed sync leaves the mirror as it was.
pub async fn sync_segments(ctx: &AppContext) -> Result<SyncReport, CoreError> {
    let started = Instant::now();
    let listed = ctx.cio.list_segments().await?;
    let seen: Vec<Option<SyncedSegment>> = futures::stream::iter(listed)
        .map(|segment| async move {
            match ctx.cio.segment_customer_count(segment.id).await {
                Ok(count) => Ok(Some(SyncedSegment {
                    cio_id: segment.id,
                    name: segment.name,
                    description: segment.description.filter(|d| !d.is_empty()),
                    segment_type: type_name(segment.segment_type).to_string(),
                    member_count: Some(i64::try_from(count).unwrap_or(i64::MAX)),
                    counted_at: Some(Utc::now()),
                })),
                Err(CioError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .buffered(COUNT_CONCURRENCY)
        .try_collect()
        .await?;
    let seen: Vec<SyncedSegment> = seen.into_iter().flatten().collect();
    let counts = segments::apply_sync(&ctx.db, ctx.workspace_id(), &seen, Utc::now()).await?;
    let report = SyncReport {
        counts,
        duration: started.elapsed(),
    };
    tracing::info!(
        created = report.counts.created,
        updated = report.counts.updated,
        removed = report.counts.removed,
        unchanged = report.counts.unchanged,
        duration_ms = report.duration.as_millis() as u64,
        "segments synced"
    );
    Ok(report)
}

fn type_name(kind: SegmentType) -> &'static str {
    match kind {
        SegmentType::Dynamic => "dynamic",
        SegmentType::Manual => "manual",
    }
}

/// At most this many segment ids in one targeting check.
pub const MAX_TARGETED_SEGMENTS: usize = 100;
/// A member count older than this is stale unless the caller says otherwise.
pub const DEFAULT_MAX_COUNT_AGE: Duration = Duration::from_secs(3600);

/// Why a targeted segment deserves attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetingWarning {
    /// Never seen in Customer.io. Blocks sending.
    UnknownSegment,
    /// Removed in Customer.io. Blocks sending.
    RemovedSegment,
    /// No members. Blocks sending.
    EmptySegment,
    /// Count older than the allowed age, or never measured.
    StaleCount,
    /// Listed more than once.
    DuplicateSegment,
}

impl TargetingWarning {
    pub fn blocks_sending(self) -> bool {
        matches!(
            self,
            Self::UnknownSegment | Self::RemovedSegment | Self::EmptySegment
        )
    }
}

/// The verdict on one targeted segment.
#[derive(Debug, Clone)]
pub struct SegmentTargeting {
    pub segment_id: i64,
    pub segment: Option<SegmentRecord>,
    pub count_age: Option<Duration>,
    pub warnings: Vec<TargetingWarning>,
}

impl SegmentTargeting {
    pub fn sendable(&self) -> bool {
        !self.warnings.iter().any(|w| w.blocks_sending())
    }
}

/// The verdict on a whole targeting.
#[derive(Debug, Clone)]
pub struct TargetingReport {
    pub segments: Vec<SegmentTargeting>,
    /// Sum of the member counts of the distinct sendable segments.
    pub total_member_count: i64,
}

impl TargetingReport {
    pub fn sendable(&self) -> bool {
        self.segments.iter().all(SegmentTargeting::sendable)
    }
}

/// Checks the segments an assignment targets against the mirror, as of `now`.
pub async fn validate_targeting(
    ctx: &AppContext,
    segment_ids: &[i64],
    max_count_age: Duration,
    now: DateTime<Utc>,
) -> Result<TargetingReport, CoreError> {
    let mut violations = Vec::new();
    if segment_ids.is_empty() {
        violations.push(FieldViolation::new(
            "segment_ids",
            "must list at least one segment id",
        ));
    } else if segment_ids.len() > MAX_TARGETED_SEGMENTS {
        violations.push(FieldViolation::new(
            "segment_ids",
            format!(
                "at most {MAX_TARGETED_SEGMENTS} segment ids, got {}",
                segment_ids.len()
            ),
        ));
    }
    for (i, id) in segment_ids.iter().enumerate() {
        if *id <= 0 {
            violations.push(FieldViolation::new(
                format!("segment_ids[{i}]"),
                "must be a positive Customer.io segment id",
            ));
        }
    }
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }

    let found = segments::get_many(&ctx.db, ctx.workspace_id(), segment_ids).await?;
    let mut seen = HashSet::new();
    let mut total_member_count = 0i64;
    let mut verdicts = Vec::with_capacity(segment_ids.len());
    for &id in segment_ids {
        let segment = found.iter().find(|s| s.cio_id == id).cloned();
        let first_time = seen.insert(id);
        let mut warnings = Vec::new();
        if !first_time {
            warnings.push(TargetingWarning::DuplicateSegment);
        }
        let count_age = segment
            .as_ref()
            .and_then(|s| s.counted_at)
            .map(|at| (now - at).to_std().unwrap_or(Duration::ZERO));
        match &segment {
            None => warnings.push(TargetingWarning::UnknownSegment),
            Some(s) => {
                if s.removed {
                    warnings.push(TargetingWarning::RemovedSegment);
                }
                if s.member_count == Some(0) {
                    warnings.push(TargetingWarning::EmptySegment);
                }
                if count_age.is_none_or(|age| age > max_count_age) {
                    warnings.push(TargetingWarning::StaleCount);
                }
            }
        }
        let verdict = SegmentTargeting {
            segment_id: id,
            segment,
            count_age,
            warnings,
        };
        if first_time && verdict.sendable() {
            total_member_count += verdict
                .segment
                .as_ref()
                .and_then(|s| s.member_count)
                .unwrap_or(0);
        }
        verdicts.push(verdict);
    }
    Ok(TargetingReport {
        segments: verdicts,
        total_member_count,
    })
}
