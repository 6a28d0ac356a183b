//! Segments: pull them from Customer.io into the mirror ([`sync_segments`]), read them
//! ([`list_segments`], [`get_segment`]: the mirror joined with SharpSend's managed segments) and
//! check the segments an assignment targets ([`validate_targeting`]).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use cio_client::{CioError, SegmentType};
use futures::StreamExt;
use sharpsend_db::segments::{
    self, ListFilter, SegmentRecord, SyncCounts, SyncedSegment, TypeFilter,
};

use crate::{
    AppContext, CoreError, FieldViolation,
    jobs::Progress,
    managed_segments::{self as managed, ManagedView},
    paging::Page,
};

/// Customer.io's two kinds of segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    /// Data-driven, built in Customer.io's UI.
    Dynamic,
    /// Membership set through the API (SharpSend's managed segments are manual ones).
    Manual,
}

/// A segment as callers see it: the mirror's record, with SharpSend's name, description, count
/// and criteria when it is a managed segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentView {
    /// Customer.io's segment id.
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    /// `None` when Customer.io reported a kind this service does not know.
    pub kind: Option<SegmentKind>,
    pub member_count: Option<i64>,
    /// When `member_count` was counted.
    pub counted_at: Option<DateTime<Utc>>,
    /// When a sync last saw it in Customer.io (a managed segment not synced yet: its creation).
    pub synced_at: DateTime<Utc>,
    pub removed: bool,
    pub removed_at: Option<DateTime<Utc>>,
    pub managed: Option<ManagedView>,
}

impl SegmentView {
    fn new(record: SegmentRecord, managed: Option<ManagedView>) -> Self {
        let mut view = Self {
            id: record.cio_id,
            name: record.name,
            description: record.description,
            kind: match record.segment_type.as_str() {
                "dynamic" => Some(SegmentKind::Dynamic),
                "manual" => Some(SegmentKind::Manual),
                _ => None,
            },
            member_count: record.member_count,
            counted_at: record.counted_at,
            synced_at: record.synced_at,
            removed: record.removed,
            removed_at: record.removed_at,
            managed: None,
        };
        if let Some(m) = managed {
            view.name = m.name.clone();
            view.description = m.description.clone();
            view.member_count = Some(m.member_count);
            view.managed = Some(m);
        }
        view
    }

    /// A managed segment the mirror has not seen yet.
    fn managed_only(m: ManagedView) -> Self {
        Self {
            id: m.segment_id,
            name: m.name.clone(),
            description: m.description.clone(),
            kind: Some(SegmentKind::Manual),
            member_count: Some(m.member_count),
            counted_at: None,
            synced_at: m.created_at,
            removed: false,
            removed_at: None,
            managed: Some(m),
        }
    }
}

/// Which segments [`list_segments`] answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SegmentFilter {
    /// Case-insensitive substring of the name (`%` and `_` match themselves).
    pub name_contains: Option<String>,
    pub kind: Option<SegmentKind>,
    /// Also list segments removed in Customer.io.
    pub include_removed: bool,
}

/// One page of mirrored segments in id order, after the segment id `after`.
pub async fn list_segments(
    ctx: &AppContext,
    filter: &SegmentFilter,
    after: Option<i64>,
    limit: u64,
) -> Result<Arc<Page<SegmentView, i64>>, CoreError> {
    let key = crate::cache::PageKey {
        filter: filter.clone(),
        after,
        limit,
    };
    ctx.read_cache
        .segment_page(&ctx.db, ctx.workspace_id(), key, || {
            load_segment_page(ctx, filter, after, limit)
        })
        .await
}

async fn load_segment_page(
    ctx: &AppContext,
    filter: &SegmentFilter,
    after: Option<i64>,
    limit: u64,
) -> Result<Page<SegmentView, i64>, CoreError> {
    let filter = ListFilter {
        name_contains: filter
            .name_contains
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        segment_type: filter.kind.map(|k| match k {
            SegmentKind::Dynamic => TypeFilter::Dynamic,
            SegmentKind::Manual => TypeFilter::Manual,
        }),
        include_removed: filter.include_removed,
    };
    let rows = segments::list(
        &ctx.db,
        ctx.workspace_id(),
        &filter,
        after,
        Page::<(), ()>::fetch(limit),
    )
    .await?;
    let page = Page::cut(rows, limit, |r| r.cio_id);
    let ids: Vec<i64> = page.items.iter().map(|r| r.cio_id).collect();
    let mut managed = managed::get_many(ctx, &ids).await?;
    Ok(page.map(|r| {
        let m = managed.remove(&r.cio_id);
        SegmentView::new(r, m)
    }))
}

/// One segment: from the mirror (with its managed part), or a managed segment the mirror has
/// not seen yet; `NotFound` otherwise.
pub async fn get_segment(ctx: &AppContext, id: i64) -> Result<Arc<SegmentView>, CoreError> {
    if id <= 0 {
        return Err(CoreError::invalid(
            "segment_id",
            "must be a positive Customer.io segment id",
        ));
    }
    ctx.read_cache
        .segment(&ctx.db, ctx.workspace_id(), id, || load_segment(ctx, id))
        .await
}

async fn load_segment(ctx: &AppContext, id: i64) -> Result<SegmentView, CoreError> {
    let record = segments::get(&ctx.db, ctx.workspace_id(), id).await?;
    let managed = managed::get_many(ctx, &[id]).await?.remove(&id);
    match (record, managed) {
        (Some(record), managed) => Ok(SegmentView::new(record, managed)),
        (None, Some(managed)) => Ok(SegmentView::managed_only(managed)),
        (None, None) => Err(CoreError::NotFound {
            what: "segment",
            id: id.to_string(),
        }),
    }
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub counts: SyncCounts,
    /// Segments Customer.io listed.
    pub listed: u32,
    /// Segments written to the mirror (listed ones deleted before they could be counted are
    /// not).
    pub synced: u32,
    pub duration: Duration,
}

impl SyncReport {
    /// The report as a job run's details (also its progress while it runs).
    pub fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "listed": self.listed,
            "synced": self.synced,
            "created": self.counts.created,
            "updated": self.counts.updated,
            "removed": self.counts.removed,
            "unchanged": self.counts.unchanged,
            "duration_ms": u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// How many member counts are requested at once. They all pass the client's shared App API rate
/// limiter, so this only overlaps network latency; it cannot exceed the limit.
const COUNT_CONCURRENCY: usize = 4;

/// Segments written to the mirror per transaction during a sync.
pub const SYNC_BATCH: usize = 25;

/// Pulls every segment and its member count from Customer.io into the mirror, committing as it
/// goes: every [`SYNC_BATCH`] counted segments are written (created or updated) in a transaction
/// of their own, and `progress` hears how far the sync has got. Only once every listed segment
/// has been counted are the segments Customer.io no longer lists marked removed.
///
/// A failure (Customer.io unavailable at segment 900) first commits every segment counted
/// before it, then answers the error: the mirror keeps the first 899, nothing is marked removed,
/// and the next sync goes over them again. A segment deleted between the listing and its count
/// is treated as gone.
pub async fn sync_segments(ctx: &AppContext, progress: &Progress) -> Result<SyncReport, CoreError> {
    let started = Instant::now();
    let listed = ctx.cio.list_segments().await?;
    let synced_at = ctx.now();
    let mut report = SyncReport {
        counts: SyncCounts::default(),
        listed: u32::try_from(listed.len()).unwrap_or(u32::MAX),
        synced: 0,
        duration: Duration::ZERO,
    };
    progress.report(ctx, report.details()).await;
    let mut seen_ids = HashSet::with_capacity(listed.len());
    let mut counted = futures::stream::iter(listed)
        .map(|segment| async move {
            match ctx.cio.segment_customer_count(segment.id).await {
                Ok(count) => Ok(Some(SyncedSegment {
                    cio_id: segment.id,
                    name: segment.name,
                    description: segment.description.filter(|d| !d.is_empty()),
                    segment_type: type_name(segment.segment_type).to_string(),
                    member_count: Some(i64::try_from(count).unwrap_or(i64::MAX)),
                    counted_at: Some(ctx.now()),
                })),
                Err(CioError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .buffered(COUNT_CONCURRENCY);
    let mut batch = Vec::with_capacity(SYNC_BATCH);
    let mut failure = None;
    while let Some(next) = counted.next().await {
        match next {
            Ok(Some(segment)) => batch.push(segment),
            Ok(None) => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if batch.len() >= SYNC_BATCH {
            commit_batch(ctx, &mut batch, synced_at, &mut seen_ids, &mut report).await?;
            report.duration = started.elapsed();
            progress.report(ctx, report.details()).await;
        }
    }
    drop(counted);
    commit_batch(ctx, &mut batch, synced_at, &mut seen_ids, &mut report).await?;
    report.duration = started.elapsed();
    if let Some(e) = failure {
        progress.report(ctx, report.details()).await;
        tracing::warn!(
            listed = report.listed,
            synced = report.synced,
            "segment sync stopped partway; the segments counted so far are kept"
        );
        return Err(e.into());
    }
    report.counts.removed =
        segments::mark_unseen_removed(&ctx.db, ctx.workspace_id(), &seen_ids, synced_at).await?;
    report.duration = started.elapsed();
    tracing::info!(
        listed = report.listed,
        created = report.counts.created,
        updated = report.counts.updated,
        removed = report.counts.removed,
        unchanged = report.counts.unchanged,
        duration_ms = report.duration.as_millis() as u64,
        "segments synced"
    );
    Ok(report)
}

/// Writes `batch` (emptying it) in one transaction and adds it to the report.
async fn commit_batch(
    ctx: &AppContext,
    batch: &mut Vec<SyncedSegment>,
    synced_at: DateTime<Utc>,
    seen_ids: &mut HashSet<i64>,
    report: &mut SyncReport,
) -> Result<(), CoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let counts = segments::apply_sync_batch(&ctx.db, ctx.workspace_id(), batch, synced_at).await?;
    seen_ids.extend(batch.iter().map(|s| s.cio_id));
    report.synced = report
        .synced
        .saturating_add(u32::try_from(batch.len()).unwrap_or(u32::MAX));
    report.counts.created += counts.created;
    report.counts.updated += counts.updated;
    report.counts.unchanged += counts.unchanged;
    batch.clear();
    Ok(())
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
    pub segment: Option<SegmentView>,
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

    /// `FailedPrecondition` naming `field[i]` for every segment that cannot be sent to (unknown,
    /// removed, empty), with a stable reason each; `Ok` when all can.
    pub fn refuse_unsendable(&self, field: &str) -> Result<(), CoreError> {
        let mut refusals = Vec::new();
        for (i, t) in self.segments.iter().enumerate() {
            for warning in t.warnings.iter().filter(|w| w.blocks_sending()) {
                let (why, reason) = match warning {
                    TargetingWarning::UnknownSegment => (
                        "is not a known Customer.io segment (sync segments if it is new)",
                        crate::error::reasons::UNKNOWN_SEGMENT,
                    ),
                    TargetingWarning::RemovedSegment => (
                        "was removed in Customer.io",
                        crate::error::reasons::REMOVED_SEGMENT,
                    ),
                    TargetingWarning::EmptySegment => {
                        ("has no members", crate::error::reasons::EMPTY_SEGMENT)
                    }
                    _ => continue,
                };
                refusals.push(
                    FieldViolation::new(
                        format!("{field}[{i}]"),
                        format!("segment {} {why}", t.segment_id),
                    )
                    .because(reason),
                );
            }
        }
        if refusals.is_empty() {
            Ok(())
        } else {
            Err(CoreError::FailedPrecondition(refusals))
        }
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
        let segment = found
            .iter()
            .find(|s| s.cio_id == id)
            .cloned()
            .map(|r| SegmentView::new(r, None));
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

/// The operation name of CreateSegment's idempotency keys.
pub const CREATE_SEGMENT_OPERATION: &str = "CreateSegment";

/// Creates a SharpSend-managed segment ([`managed::create_segment`]) at most once per
/// `request_id` (see [`crate::idempotency`]): a retry with the same request answers the segment
/// the first call created (`false`: not created by this call) and creates nothing in
/// Customer.io; the same request_id with another name, description or criteria is
/// `AlreadyExists` naming them. An empty `request_id` always creates.
pub async fn create_segment_once(
    ctx: &AppContext,
    new: managed::NewSegment,
    request_id: &str,
) -> Result<(ManagedView, bool), CoreError> {
    let request = serde_json::json!({
        "name": new.name.trim(),
        "description": new.description.trim(),
        "criteria": criteria_fingerprint(new.criteria.as_ref()),
    });
    let made = crate::idempotency::once(
        ctx,
        CREATE_SEGMENT_OPERATION,
        request_id,
        &request,
        |id| format!("segment {id}"),
        |claimed| async move {
            let adopt = match claimed.taken_over {
                Some(since) => find_orphan(ctx, &new.name, since).await?,
                None => None,
            };
            if let Some(orphan) = adopt {
                tracing::warn!(
                    segment_id = orphan,
                    "adopting the Customer.io segment of a CreateSegment that died"
                );
            }
            managed::create_or_adopt(ctx, new, adopt, claimed.key)
                .await
                .map(|view| view.segment_id)
        },
    )
    .await?;
    Ok((managed::get(ctx, made.id).await?, made.created))
}

/// A manual segment named `name` in Customer.io that no managed segment records, created (when
/// Customer.io says) no earlier than a few minutes before `since`: what a CreateSegment that died
/// between Customer.io's create and the local record left behind. The newest, if several.
async fn find_orphan(
    ctx: &AppContext,
    name: &str,
    since: DateTime<Utc>,
) -> Result<Option<i64>, CoreError> {
    let earliest = (since - chrono::Duration::minutes(5)).timestamp();
    let candidates: Vec<i64> = ctx
        .cio
        .list_segments()
        .await?
        .into_iter()
        .filter(|s| {
            s.segment_type == SegmentType::Manual
                && s.name == name.trim()
                && s.created_at.is_none_or(|at| at >= earliest)
        })
        .map(|s| s.id)
        .collect();
    let managed = managed::get_many(ctx, &candidates).await?;
    Ok(candidates
        .into_iter()
        .filter(|id| !managed.contains_key(id))
        .max())
}

/// The criteria of a create request in a comparable form: the canonical JSON of valid criteria
/// (a message), the parsed JSON text, or the raw input when it does not parse (such a request
/// fails anyway, and its key is forgotten).
fn criteria_fingerprint(input: Option<&managed::CriteriaInput>) -> serde_json::Value {
    use managed::CriteriaInput;
    match input {
        None => serde_json::Value::Null,
        Some(CriteriaInput::Message(raw, field)) => crate::criteria::validate(raw, field)
            .map(|c| c.to_json())
            .unwrap_or_else(|_| serde_json::Value::String(format!("{raw:?}"))),
        Some(CriteriaInput::Json(text, _)) => {
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()))
        }
    }
}
