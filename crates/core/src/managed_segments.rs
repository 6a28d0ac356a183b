//! SharpSend-managed segments: segments whose membership this service decides (from
//! [`Criteria`] evaluated over the profile mirror, or set by hand) and keeps in Customer.io as a
//! MANUAL segment — Customer.io's API cannot create data-driven segments, and its audience
//! filters know only `eq` and `exists`.
//!
//! - [`create_segment`], [`update_segment`], [`delete_segment`], [`preview`],
//!   [`add_members`], [`remove_members`], [`get`], [`list`]: what `SegmentService` calls.
//! - [`evaluate_due`]: the `segment-evaluation` job. It re-reads from Customer.io the
//!   membership of the Customer.io segments that due criteria reference (into
//!   `segment_members`), then evaluates each due segment inside the database
//!   ([`sharpsend_db::managed_segments::apply_evaluation`]): the membership difference is
//!   recorded and queued in the outbox in one transaction, as `segment_add` / `segment_remove`
//!   rows of at most 1000 ids, which the outbox worker delivers in order per segment
//!   ([`deliver_change`]).
//! - [`profiles_changed`], [`profiles_imported`]: a profile change marks due the segments that
//!   read it (after an evaluation running meanwhile, so the mark is never lost under it).
//!
//! Evaluation covers the profile mirror: people must be in it (ImportProfiles, or any write
//! through ProfileService) to be evaluated.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cio_client::{CioError, IdType};
use futures::TryStreamExt;
use serde_json::Value;
use sharpsend_db::criteria_sql::{self, MatchingProfile};
use sharpsend_db::idempotency::KeyRef;
use sharpsend_db::managed_segments::{
    self as store, Applied, EvaluationOutcome, ManagedSegment, ManualChange, NewManagedSegment,
    Scope, SegmentUpdate, StoredCriteria,
};
use sharpsend_db::segments as mirror;

use crate::criteria::{self, Criteria, RawCriteria};
use crate::{AppContext, CoreError, FieldViolation};

/// Limits of the segment API.
pub mod limits {
    /// Characters in a segment name.
    pub const NAME_CHARS: usize = 200;
    /// Characters in a description.
    pub const DESCRIPTION_CHARS: usize = 1000;
    /// Ids in one AddSegmentMembers / RemoveSegmentMembers call.
    pub const MEMBERS_PER_CALL: usize = 10_000;
    /// Bytes in a customer id (Customer.io's limit).
    pub const CUSTOMER_ID_BYTES: usize = 150;
    /// Largest preview sample.
    pub const MAX_SAMPLE: u32 = 100;
    /// Preview sample when none is asked for.
    pub const DEFAULT_SAMPLE: u32 = 10;
}

/// Members per membership page read from Customer.io (its maximum).
const MEMBERSHIP_PAGE: u32 = cio_client::MAX_MEMBERSHIP_PAGE;

/// How the evaluation job behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluationConfig {
    /// A segment with criteria is re-evaluated at least this often even when nothing marked
    /// it due — relative times move on, and referenced Customer.io segments change in
    /// Customer.io (`SHARPSEND_SEGMENT_REEVALUATE_SECS`, default 3600). Also the age beyond
    /// which a preview re-reads a referenced Customer.io segment's membership.
    pub max_age: Duration,
    /// Evaluations are incremental (only people who changed are re-checked); a segment not
    /// fully evaluated for this long gets a full evaluation instead, which checks the
    /// incremental ones and reports any drift (`SHARPSEND_SEGMENT_FULL_CHECK_SECS`, default
    /// 86400).
    pub full_check_every: Duration,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(3600),
            full_check_every: Duration::from_secs(86_400),
        }
    }
}

/// A managed segment as callers see it, with its parsed criteria.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedView {
    /// The manual segment in Customer.io that holds the membership.
    pub segment_id: i64,
    pub name: String,
    pub description: Option<String>,
    /// `None`: members are set by hand (or stored criteria no longer parse; logged).
    pub criteria: Option<Criteria>,
    /// Members as SharpSend recorded them (changes may still be on their way to Customer.io).
    pub member_count: i64,
    pub evaluation_due: bool,
    pub last_evaluation: Option<EvaluationSummary>,
    /// Why the last attempt to evaluate failed (cleared by a successful evaluation).
    pub last_evaluation_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What the last evaluation of a managed segment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluationSummary {
    pub evaluated_at: DateTime<Utc>,
    pub duration: Duration,
    pub added: i64,
    pub removed: i64,
}

impl ManagedView {
    fn of(record: ManagedSegment) -> Self {
        let criteria = record
            .criteria
            .as_ref()
            .and_then(|c| match Criteria::from_stored(c) {
                Ok(c) => Some(c),
                Err(violations) => {
                    tracing::error!(
                        segment_id = record.cio_segment_id,
                        ?violations,
                        "stored criteria do not parse"
                    );
                    None
                }
            });
        Self {
            segment_id: record.cio_segment_id,
            name: record.name,
            description: record.description,
            criteria,
            member_count: record.member_count,
            evaluation_due: record.evaluation_due,
            last_evaluation: record.last_evaluation.map(|e| EvaluationSummary {
                evaluated_at: e.evaluated_at,
                duration: Duration::from_millis(u64::try_from(e.duration_ms).unwrap_or(0)),
                added: e.added,
                removed: e.removed,
            }),
            last_evaluation_error: record.last_evaluation_error,
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

/// Criteria given by a caller: the message form (already mapped) or the JSON text.
#[derive(Debug, Clone)]
pub enum CriteriaInput {
    /// Mapped from the protobuf message; the string names its field (`criteria`).
    Message(RawCriteria, &'static str),
    /// The JSON form; the string names its field (`criteria_json`).
    Json(String, &'static str),
}

impl CriteriaInput {
    fn field(&self) -> &'static str {
        match self {
            CriteriaInput::Message(_, f) | CriteriaInput::Json(_, f) => f,
        }
    }

    /// The form, which names the groups in violation paths.
    fn form(&self) -> criteria::Form {
        match self {
            CriteriaInput::Message(..) => criteria::Form::Message,
            CriteriaInput::Json(..) => criteria::Form::Json,
        }
    }

    /// Parses and validates, adding problems to `violations`.
    fn validate(&self, violations: &mut Vec<FieldViolation>) -> Option<Criteria> {
        let raw = match self {
            CriteriaInput::Message(raw, _) => raw.clone(),
            CriteriaInput::Json(text, field) => match criteria::parse_json(text, field) {
                Ok(raw) => raw,
                Err(v) => {
                    violations.extend(v);
                    return None;
                }
            },
        };
        match criteria::validate_in(&raw, self.field(), self.form()) {
            Ok(c) => Some(c),
            Err(v) => {
                violations.extend(v);
                None
            }
        }
    }
}

fn check_text(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    text: &str,
    max_chars: usize,
    required: bool,
) {
    if text.contains('\0') {
        violations.push(FieldViolation::new(
            field,
            "must not contain NUL characters",
        ));
    } else if required && text.trim().is_empty() {
        violations.push(FieldViolation::new(field, "must not be empty"));
    } else if text.chars().count() > max_chars {
        violations.push(FieldViolation::new(
            field,
            format!(
                "is {} characters; at most {max_chars}",
                text.chars().count()
            ),
        ));
    }
}

fn check_segment_id(segment_id: i64) -> Result<(), CoreError> {
    if segment_id <= 0 {
        return Err(CoreError::invalid(
            "segment_id",
            "must be a positive Customer.io segment id",
        ));
    }
    Ok(())
}

fn not_managed(segment_id: i64) -> CoreError {
    CoreError::NotFound {
        what: "SharpSend-managed segment",
        id: segment_id.to_string(),
    }
}

/// Checks that the segments `criteria` reads exist (in the segments mirror or as managed
/// segments), are not `self_id`, and do not read `self_id` back through other managed criteria.
async fn check_references(
    ctx: &AppContext,
    criteria: &Criteria,
    input: &CriteriaInput,
    self_id: Option<i64>,
    violations: &mut Vec<FieldViolation>,
) -> Result<(), CoreError> {
    let refs = criteria.segment_paths_in(input.field(), input.form());
    if refs.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = refs.iter().map(|(id, _)| *id).collect();
    let known: HashMap<i64, mirror::SegmentRecord> =
        mirror::get_many(&ctx.db, ctx.workspace_id(), &ids)
            .await?
            .into_iter()
            .map(|s| (s.cio_id, s))
            .collect();
    let managed = store::list(&ctx.db, ctx.workspace_id()).await?;
    let reads: HashMap<i64, Vec<i64>> = managed
        .iter()
        .map(|m| (m.cio_segment_id, m.referenced_segments.clone()))
        .collect();
    for (id, path) in refs {
        if Some(id) == self_id {
            violations.push(FieldViolation::new(
                path,
                "a segment's criteria cannot read its own membership",
            ));
            continue;
        }
        match known.get(&id) {
            None if !reads.contains_key(&id) => {
                violations.push(FieldViolation::new(
                    path,
                    format!(
                        "segment {id} is not known; run SyncSegments if it is new in Customer.io"
                    ),
                ));
                continue;
            }
            Some(s) if s.removed => {
                violations.push(FieldViolation::new(
                    path,
                    format!("segment {id} was removed in Customer.io"),
                ));
                continue;
            }
            _ => {}
        }
        if let Some(me) = self_id
            && reaches(&reads, id, me)
        {
            violations.push(FieldViolation::new(
                path,
                format!(
                    "segment {id} reads segment {me} through its criteria: that would be a cycle"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether managed segment `from`'s criteria read `target`, directly or through others.
fn reaches(reads: &HashMap<i64, Vec<i64>>, from: i64, target: i64) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![from];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        for &next in reads.get(&id).map(Vec::as_slice).unwrap_or_default() {
            if next == target {
                return true;
            }
            stack.push(next);
        }
    }
    false
}

fn stored(criteria: &Criteria) -> StoredCriteria {
    StoredCriteria {
        criteria: criteria.to_json(),
        referenced_attributes: criteria.attributes().into_iter().collect(),
        referenced_segments: criteria.segments().into_iter().collect(),
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct NewSegment {
    pub name: String,
    pub description: String,
    /// `None`: a segment whose members are set with [`add_members`] / [`remove_members`].
    pub criteria: Option<CriteriaInput>,
}

/// Creates a manual segment in Customer.io (`POST /v1/segments`), records it with its
/// criteria, and — with criteria — evaluates it at once (its membership then goes to
/// Customer.io through the outbox). If that first evaluation fails (e.g. Customer.io cannot be
/// read), the segment is still created, stays due, and carries the error.
pub async fn create_segment(ctx: &AppContext, new: NewSegment) -> Result<ManagedView, CoreError> {
    create_or_adopt(ctx, new, None, None).await
}

/// As [`create_segment`]; with `adopt`, records that existing manual segment of Customer.io (one
/// a call that died created, see `crate::segments::create_segment_once`) instead of creating
/// one; with `completes`, completes that idempotency key in the record's transaction.
pub async fn create_or_adopt(
    ctx: &AppContext,
    new: NewSegment,
    adopt: Option<i64>,
    completes: Option<KeyRef>,
) -> Result<ManagedView, CoreError> {
    let mut violations = Vec::new();
    check_text(&mut violations, "name", &new.name, limits::NAME_CHARS, true);
    check_text(
        &mut violations,
        "description",
        &new.description,
        limits::DESCRIPTION_CHARS,
        false,
    );
    let criteria = new
        .criteria
        .as_ref()
        .and_then(|c| c.validate(&mut violations));
    if let (Some(c), Some(input)) = (&criteria, &new.criteria) {
        check_references(ctx, c, input, None, &mut violations).await?;
    }
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let name = new.name.trim().to_owned();
    let description = Some(new.description.trim().to_owned()).filter(|d| !d.is_empty());
    let cio_segment_id = match adopt {
        Some(id) => id,
        None => {
            ctx.cio
                .create_manual_segment(&name, description.as_deref())
                .await?
                .id
        }
    };
    let record = NewManagedSegment {
        cio_segment_id,
        name,
        description,
        criteria: criteria.as_ref().map(stored),
        completes,
    };
    let saved = match store::create(&ctx.db, ctx.workspace_id(), &record, ctx.now()).await {
        Ok(saved) => saved,
        Err(e) => {
            // Do not leave an orphan in Customer.io (best effort; the error is what matters).
            if adopt.is_none()
                && let Err(cleanup) = ctx.cio.delete_segment(cio_segment_id).await
            {
                tracing::warn!(segment_id = cio_segment_id, error = %crate::error::error_chain(&cleanup), "could not delete the Customer.io segment of a failed create");
            }
            return Err(e.into());
        }
    };
    tracing::info!(
        segment_id = saved.cio_segment_id,
        criteria = criteria.is_some(),
        "managed segment created"
    );
    if criteria.is_some() {
        evaluate_now(ctx, saved.cio_segment_id).await?;
    }
    get(ctx, saved.cio_segment_id).await
}

/// Evaluates one segment now (after create / update), refreshing the Customer.io memberships
/// its criteria read when they are missing or old. An upstream failure is recorded on the
/// segment (which stays due for the job) instead of failing the caller's request.
async fn evaluate_now(ctx: &AppContext, segment_id: i64) -> Result<(), CoreError> {
    let config = &ctx.settings.evaluation;
    let Some(segment) = store::get(&ctx.db, ctx.workspace_id(), segment_id).await? else {
        return Ok(());
    };
    let Some(criteria) = ManagedView::of(segment.clone()).criteria else {
        return Ok(());
    };
    let refresh = refresh_memberships(
        ctx,
        &criteria.segments(),
        Some(before(ctx.now(), config.max_age)),
    )
    .await;
    let result = match refresh {
        Ok(_) => evaluate_one(ctx, &segment).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(()),
        Err(CoreError::Database(e)) => Err(CoreError::Database(e)),
        Err(e) => {
            let text = crate::error::error_chain(&e);
            tracing::warn!(segment_id, error = %text, "segment evaluation deferred to the segment-evaluation job");
            store::record_evaluation_error(&ctx.db, ctx.workspace_id(), segment_id, &text).await?;
            Ok(())
        }
    }
}

/// `now - d`, or the Unix epoch if that is out of range.
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|span| now.checked_sub_signed(span))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Re-reads from Customer.io the membership of `segment_ids` that are not managed segments
/// (whose membership is SharpSend's own record) into `segment_members`; with `older_than`, only
/// those never read or last read before it. Returns how many were read. The ids of one segment
/// are held in memory while it is read (30,000 per App API call), then replace the mirrored
/// membership in one transaction.
async fn refresh_memberships(
    ctx: &AppContext,
    segment_ids: &BTreeSet<i64>,
    older_than: Option<DateTime<Utc>>,
) -> Result<usize, CoreError> {
    if segment_ids.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = segment_ids.iter().copied().collect();
    let managed: HashSet<i64> = store::get_many(&ctx.db, ctx.workspace_id(), &ids)
        .await?
        .into_iter()
        .map(|m| m.cio_segment_id)
        .collect();
    let synced = store::membership_synced_at(&ctx.db, ctx.workspace_id(), &ids).await?;
    let mut refreshed = 0;
    for id in ids {
        if managed.contains(&id) {
            continue;
        }
        if let (Some(threshold), Some(at)) = (older_than, synced.get(&id))
            && *at >= threshold
        {
            continue;
        }
        let members: Vec<String> = match ctx
            .cio
            .segment_membership(id, MEMBERSHIP_PAGE)
            .try_collect::<Vec<_>>()
            .await
        {
            Ok(m) => m.into_iter().filter_map(|m| m.id).collect(),
            Err(CioError::NotFound { .. }) => {
                return Err(CoreError::NotFound {
                    what: "Customer.io segment",
                    id: id.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let count = store::replace_mirrored_membership(
            &ctx.db,
            ctx.workspace_id(),
            id,
            &members,
            ctx.now(),
        )
        .await?;
        tracing::debug!(segment_id = id, members = ?count, "segment membership mirrored");
        refreshed += 1;
    }
    Ok(refreshed)
}

/// Evaluates one managed segment's stored criteria and applies the result (retrying once if
/// its criteria changed meanwhile). `None` when it vanished or lost its criteria.
async fn evaluate_one(
    ctx: &AppContext,
    segment: &ManagedSegment,
) -> Result<Option<EvaluationOutcome>, CoreError> {
    let mut current = segment.clone();
    for _ in 0..2 {
        let Some(criteria) = ManagedView::of(current.clone()).criteria else {
            return Ok(None);
        };
        let now = ctx.now();
        let filter = criteria.to_filter(now);
        let scope = scope_of(&current, &criteria, &ctx.settings.evaluation, now);
        match store::apply_evaluation(
            &ctx.db,
            ctx.workspace_id(),
            current.cio_segment_id,
            current.revision,
            &filter,
            &scope,
            now,
        )
        .await?
        {
            Applied::Done(outcome) => {
                if outcome.outbox_rows > 0 {
                    ctx.wake_outbox();
                }
                if let Some(drift) = outcome.drift.filter(|n| *n > 0) {
                    tracing::warn!(
                        segment_id = current.cio_segment_id,
                        corrected = drift,
                        added = outcome.added,
                        removed = outcome.removed,
                        "full check of an incrementally evaluated segment found drift"
                    );
                }
                tracing::info!(
                    segment_id = current.cio_segment_id,
                    added = outcome.added,
                    removed = outcome.removed,
                    members = outcome.member_count,
                    duration_ms = outcome.duration_ms,
                    incremental = outcome.incremental,
                    "segment evaluated"
                );
                return Ok(Some(outcome));
            }
            Applied::Stale => {
                match store::get(&ctx.db, ctx.workspace_id(), current.cio_segment_id).await? {
                    Some(fresh) => current = fresh,
                    None => return Ok(None),
                }
            }
        }
    }
    Ok(None)
}

/// Who an evaluation of `segment` at `now` re-checks: only the people who changed; everyone if
/// it was never evaluated or has no change-log watermark (new criteria); everyone, counting
/// drift, when its last full evaluation is older than `config.full_check_every` (the periodic
/// check).
fn scope_of(
    segment: &ManagedSegment,
    criteria: &Criteria,
    config: &EvaluationConfig,
    now: DateTime<Utc>,
) -> Scope {
    let (Some(last), Some(_), Some(full)) = (
        &segment.last_evaluation,
        segment.change_watermark,
        segment.last_full_at,
    ) else {
        return Scope::Full;
    };
    let since = last.evaluated_at;
    let windows = criteria.time_windows(since, now);
    if full < before(now, config.full_check_every) {
        Scope::Check { since, windows }
    } else {
        Scope::Incremental { since, windows }
    }
}

/// What one run of the evaluation job did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvaluationReport {
    pub evaluated: u64,
    pub added: u64,
    pub removed: u64,
    pub outbox_rows: u64,
    /// Customer.io segment memberships re-read.
    pub memberships_refreshed: u64,
    /// Segments that could not be evaluated (their error is recorded; they stay due).
    pub failed: u64,
    /// Of `evaluated`: those that re-checked only the people who changed.
    pub incremental: u64,
    /// Full checks of incrementally evaluated segments that corrected memberships.
    pub drift_found: u64,
}

impl EvaluationReport {
    fn count(&mut self, outcome: &EvaluationOutcome) {
        self.evaluated += 1;
        self.incremental += u64::from(outcome.incremental);
        self.drift_found += u64::from(outcome.drift.is_some_and(|n| n > 0));
        self.added += outcome.added;
        self.removed += outcome.removed;
        self.outbox_rows += outcome.outbox_rows;
    }
}

/// Segments per [`store::apply_incremental`] call.
const SEGMENTS_PER_PASS: usize = 100;

/// Evaluates together, in one pass over the people who changed ([`store::apply_incremental`]),
/// those of `due` that read no other segment's membership and need no full evaluation (see
/// [`scope_of`]), adding to `changed` those whose membership moved. Returns the others, and
/// those whose definition changed meanwhile, for [`evaluate_one`].
async fn evaluate_together(
    ctx: &AppContext,
    due: Vec<ManagedSegment>,
    config: &EvaluationConfig,
    report: &mut EvaluationReport,
    changed: &mut HashSet<i64>,
) -> Result<Vec<ManagedSegment>, CoreError> {
    let now = ctx.now();
    let mut rest = Vec::new();
    let mut together = Vec::new();
    for segment in due {
        let incremental = ManagedView::of(segment.clone())
            .criteria
            .filter(|_| segment.referenced_segments.is_empty())
            .and_then(
                |criteria| match scope_of(&segment, &criteria, config, now) {
                    Scope::Incremental { since, windows } => Some(store::Incremental {
                        cio_segment_id: segment.cio_segment_id,
                        revision: segment.revision,
                        filter: criteria.to_filter(now),
                        since,
                        windows,
                    }),
                    _ => None,
                },
            );
        match incremental {
            Some(item) => together.push((segment, item)),
            None => rest.push(segment),
        }
    }
    let before = report.outbox_rows;
    for pass in together.chunks(SEGMENTS_PER_PASS) {
        let items: Vec<store::Incremental> = pass.iter().map(|(_, item)| item.clone()).collect();
        let applied = store::apply_incremental(&ctx.db, ctx.workspace_id(), &items, now).await?;
        for ((segment, _), applied) in pass.iter().zip(applied) {
            match applied {
                Applied::Done(outcome) => {
                    tracing::debug!(
                        segment_id = segment.cio_segment_id,
                        added = outcome.added,
                        removed = outcome.removed,
                        members = outcome.member_count,
                        "segment evaluated incrementally"
                    );
                    report.count(&outcome);
                    if outcome.added + outcome.removed > 0 {
                        changed.insert(segment.cio_segment_id);
                    }
                }
                Applied::Stale => rest.push(segment.clone()),
            }
        }
    }
    if report.outbox_rows > before {
        ctx.wake_outbox();
    }
    if !together.is_empty() {
        tracing::info!(
            segments = together.len(),
            evaluated = report.evaluated,
            added = report.added,
            removed = report.removed,
            "segments evaluated incrementally in one pass"
        );
    }
    Ok(rest)
}

/// Evaluation rounds per run: the due segments, then those whose segment conditions read a
/// membership that the round before changed, and so on.
const MAX_ROUNDS: usize = 8;

/// The `segment-evaluation` job: evaluates every due segment (marked due, never evaluated, or
/// older than `config.max_age`) and every segment with conditions relative to the evaluation
/// time (their membership moves with the clock), incrementally where it can (see
/// [`scope_of`]), then prunes the change log. Memberships of the Customer.io segments they read are re-read
/// first (once each). A segment whose inputs cannot be read is skipped with its error
/// recorded; the run then fails with the first such error after doing all it could.
pub async fn evaluate_due(
    ctx: &AppContext,
    config: &EvaluationConfig,
) -> Result<EvaluationReport, CoreError> {
    let now = ctx.now();
    let mut due = store::due(&ctx.db, ctx.workspace_id(), before(now, config.max_age)).await?;
    // The Customer.io memberships read by segments due by the marks or by age are re-read.
    let referenced: BTreeSet<i64> = due
        .iter()
        .flat_map(|s| s.referenced_segments.iter().copied())
        .collect();
    // Not due by the marks, but changed: the log holds a profile write (a new person can match
    // criteria reading none of the written attributes, e.g. a negation) or a membership change
    // it reads, or the clock moved a relative-time condition. Cheap to find, cheap to evaluate.
    let due_ids: HashSet<i64> = due.iter().map(|s| s.cio_segment_id).collect();
    for segment in store::list(&ctx.db, ctx.workspace_id()).await? {
        if due_ids.contains(&segment.cio_segment_id) {
            continue;
        }
        let Some(criteria) = segment
            .criteria
            .as_ref()
            .and_then(|c| Criteria::from_stored(c).ok())
        else {
            continue;
        };
        if criteria.is_time_relative() || store::has_changes(&ctx.db, &segment).await? {
            due.push(segment);
        }
    }
    due.sort_by_key(|s| s.cio_segment_id);
    // The people a relative-time condition's window holds are found through an index on the
    // attribute (created once, when first needed).
    let time_attributes: BTreeSet<String> = due
        .iter()
        .filter_map(|s| {
            s.criteria
                .as_ref()
                .and_then(|c| Criteria::from_stored(c).ok())
        })
        .flat_map(|c| c.time_windows(now, now).into_iter().map(|w| w.attribute))
        .collect();
    for attribute in time_attributes {
        sharpsend_db::criteria_sql::ensure_time_index(&ctx.db, &attribute)
            .await
            .map_err(sharpsend_db::DbError::from)?;
    }
    let mut report = EvaluationReport::default();
    let mut first_error: Option<CoreError> = None;
    let mut unreadable: HashMap<i64, String> = HashMap::new();
    for id in referenced {
        match refresh_memberships(ctx, &BTreeSet::from([id]), None).await {
            Ok(n) => report.memberships_refreshed += n as u64,
            Err(e @ CoreError::Database(_)) => return Err(e),
            Err(e) => {
                unreadable.insert(id, crate::error::error_chain(&e));
                first_error.get_or_insert(e);
            }
        }
    }
    // Segments whose membership the round changed.
    let mut changed = HashSet::new();
    let mut round = evaluate_together(ctx, due, config, &mut report, &mut changed).await?;
    for _ in 0..MAX_ROUNDS {
        for segment in &round {
            if let Some((id, why)) = segment
                .referenced_segments
                .iter()
                .find_map(|id| unreadable.get(id).map(|w| (id, w)))
            {
                report.failed += 1;
                let text = format!("could not read segment {id}: {why}");
                store::record_evaluation_error(
                    &ctx.db,
                    ctx.workspace_id(),
                    segment.cio_segment_id,
                    &text,
                )
                .await?;
                continue;
            }
            if let Some(outcome) = evaluate_one(ctx, segment).await? {
                report.count(&outcome);
                if outcome.added + outcome.removed > 0 {
                    changed.insert(segment.cio_segment_id);
                }
            }
        }
        if changed.is_empty() {
            break;
        }
        // A segment reading another's membership (`{"segment": {"id": A}}`) changes when A's
        // evaluation just changed A: evaluate those too, until nothing moves (chains deeper
        // than MAX_ROUNDS finish in the next run, which finds their changes in the log).
        round = store::list(&ctx.db, ctx.workspace_id())
            .await?
            .into_iter()
            .filter(|s| s.referenced_segments.iter().any(|id| changed.contains(id)))
            .collect();
        changed.clear();
        if round.is_empty() {
            break;
        }
    }
    let pruned = store::prune_changes(&ctx.db, ctx.workspace_id()).await?;
    tracing::debug!(pruned, "change log pruned");
    match first_error {
        Some(e) => {
            tracing::warn!(?report, "segment evaluation finished with failures");
            Err(e)
        }
        None => Ok(report),
    }
}

/// A managed segment by Customer.io id.
pub async fn get(ctx: &AppContext, segment_id: i64) -> Result<ManagedView, CoreError> {
    check_segment_id(segment_id)?;
    store::get(&ctx.db, ctx.workspace_id(), segment_id)
        .await?
        .map(ManagedView::of)
        .ok_or_else(|| not_managed(segment_id))
}

/// The managed segments among `segment_ids` (for listing the mirror).
pub async fn get_many(
    ctx: &AppContext,
    segment_ids: &[i64],
) -> Result<HashMap<i64, ManagedView>, CoreError> {
    Ok(store::get_many(&ctx.db, ctx.workspace_id(), segment_ids)
        .await?
        .into_iter()
        .map(|m| (m.cio_segment_id, ManagedView::of(m)))
        .collect())
}

/// Every managed segment.
pub async fn list(ctx: &AppContext) -> Result<Vec<ManagedView>, CoreError> {
    Ok(store::list(&ctx.db, ctx.workspace_id())
        .await?
        .into_iter()
        .map(ManagedView::of)
        .collect())
}

/// What to change; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SegmentChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub criteria: Option<CriteriaInput>,
    /// Drop the criteria: the members stay and are from then on set by hand.
    pub remove_criteria: bool,
}

/// Changes a managed segment. New criteria are evaluated at once (as in [`create_segment`]).
/// Customer.io has no API to rename a segment: a new name or description is SharpSend's (shown
/// by this service); Customer.io keeps the one given at creation.
pub async fn update_segment(
    ctx: &AppContext,
    segment_id: i64,
    changes: SegmentChanges,
) -> Result<ManagedView, CoreError> {
    check_segment_id(segment_id)?;
    let current = store::get(&ctx.db, ctx.workspace_id(), segment_id)
        .await?
        .ok_or_else(|| not_managed(segment_id))?;
    let current_criteria = ManagedView::of(current.clone()).criteria;
    let mut violations = Vec::new();
    if let Some(name) = &changes.name {
        check_text(&mut violations, "name", name, limits::NAME_CHARS, true);
    }
    if let Some(description) = &changes.description {
        check_text(
            &mut violations,
            "description",
            description,
            limits::DESCRIPTION_CHARS,
            false,
        );
    }
    if changes.remove_criteria && changes.criteria.is_some() {
        violations.push(FieldViolation::new(
            "remove_criteria",
            "cannot be set together with new criteria",
        ));
    }
    let criteria = changes
        .criteria
        .as_ref()
        .and_then(|c| c.validate(&mut violations));
    if let (Some(c), Some(input)) = (&criteria, &changes.criteria) {
        check_references(ctx, c, input, Some(segment_id), &mut violations).await?;
    }
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let criteria_change = match (&criteria, changes.remove_criteria) {
        (Some(c), _) if current_criteria.as_ref() != Some(c) => Some(Some(stored(c))),
        (None, true) if current.criteria.is_some() => Some(None),
        _ => None,
    };
    let reevaluate = matches!(criteria_change, Some(Some(_)));
    let update = SegmentUpdate {
        name: changes.name.map(|n| n.trim().to_owned()),
        description: changes
            .description
            .map(|d| Some(d.trim().to_owned()).filter(|d| !d.is_empty())),
        criteria: criteria_change,
    };
    store::update(&ctx.db, ctx.workspace_id(), segment_id, &update, ctx.now())
        .await?
        .ok_or_else(|| not_managed(segment_id))?;
    if reevaluate {
        evaluate_now(ctx, segment_id).await?;
    }
    get(ctx, segment_id).await
}

/// Deletes a managed segment in Customer.io (`DELETE /v1/segments/{id}`; already gone there is
/// fine) and here. Refused while other managed criteria read it.
pub async fn delete_segment(ctx: &AppContext, segment_id: i64) -> Result<(), CoreError> {
    check_segment_id(segment_id)?;
    get(ctx, segment_id).await?;
    let readers: Vec<String> = store::list(&ctx.db, ctx.workspace_id())
        .await?
        .into_iter()
        .filter(|m| m.referenced_segments.contains(&segment_id))
        .map(|m| m.cio_segment_id.to_string())
        .collect();
    if !readers.is_empty() {
        return Err(CoreError::invalid(
            "segment_id",
            format!(
                "is read by the criteria of segment(s) {}; change those first",
                readers.join(", ")
            ),
        ));
    }
    match ctx.cio.delete_segment(segment_id).await {
        Ok(()) | Err(CioError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    store::delete(&ctx.db, ctx.workspace_id(), segment_id, ctx.now()).await?;
    tracing::info!(segment_id, "managed segment deleted");
    Ok(())
}

/// The result of [`preview`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub member_count: u64,
    pub sample: Vec<MatchingProfile>,
    pub evaluated_at: DateTime<Utc>,
    pub duration: Duration,
}

/// Counts the people the criteria select now, with a sample (by customer id), creating
/// nothing. Memberships of referenced Customer.io segments are read first if never read or
/// older than the re-evaluation age.
pub async fn preview(
    ctx: &AppContext,
    input: CriteriaInput,
    sample_size: i32,
) -> Result<Preview, CoreError> {
    let mut violations = Vec::new();
    let sample = match sample_size {
        n if n < 0 => {
            violations.push(FieldViolation::new("sample_size", "must not be negative"));
            0
        }
        0 => limits::DEFAULT_SAMPLE,
        n => u32::try_from(n).unwrap_or(u32::MAX).min(limits::MAX_SAMPLE),
    };
    let criteria = input.validate(&mut violations);
    if let Some(c) = &criteria {
        check_references(ctx, c, &input, None, &mut violations).await?;
    }
    let Some(criteria) = criteria.filter(|_| violations.is_empty()) else {
        return Err(CoreError::InvalidArgument(violations));
    };
    let started = std::time::Instant::now();
    let config = &ctx.settings.evaluation;
    refresh_memberships(
        ctx,
        &criteria.segments(),
        Some(before(ctx.now(), config.max_age)),
    )
    .await?;
    let now = ctx.now();
    let filter = criteria.to_filter(now);
    let member_count = criteria_sql::count_matching(&ctx.db, ctx.workspace_id(), &filter).await?;
    let sample = criteria_sql::matching_page(
        &ctx.db,
        ctx.workspace_id(),
        &filter,
        None,
        u64::from(sample),
    )
    .await?;
    Ok(Preview {
        member_count,
        sample,
        evaluated_at: now,
        duration: started.elapsed(),
    })
}

/// What a manual membership change did.
pub type MembershipChange = store::MembershipChange;

/// Adds people (Customer.io `id`s, 1 to 10,000) to a managed segment without criteria: recorded
/// and queued for Customer.io in one transaction.
pub async fn add_members(
    ctx: &AppContext,
    segment_id: i64,
    customer_ids: &[String],
) -> Result<MembershipChange, CoreError> {
    change_members(ctx, segment_id, customer_ids, true).await
}

/// Removes people from a managed segment without criteria (as [`add_members`]).
pub async fn remove_members(
    ctx: &AppContext,
    segment_id: i64,
    customer_ids: &[String],
) -> Result<MembershipChange, CoreError> {
    change_members(ctx, segment_id, customer_ids, false).await
}

async fn change_members(
    ctx: &AppContext,
    segment_id: i64,
    customer_ids: &[String],
    add: bool,
) -> Result<MembershipChange, CoreError> {
    check_segment_id(segment_id)?;
    let mut violations = Vec::new();
    if customer_ids.is_empty() || customer_ids.len() > limits::MEMBERS_PER_CALL {
        violations.push(FieldViolation::new(
            "customer_ids",
            format!(
                "takes 1 to {} ids; got {}",
                limits::MEMBERS_PER_CALL,
                customer_ids.len()
            ),
        ));
    }
    for (i, id) in customer_ids.iter().enumerate() {
        // The same rule as every customer id (ProfileService's).
        crate::profiles::check_customer_id(&mut violations, &format!("customer_ids[{i}]"), id);
    }
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let now = ctx.now();
    let result = if add {
        store::add_members(&ctx.db, ctx.workspace_id(), segment_id, customer_ids, now).await?
    } else {
        store::remove_members(&ctx.db, ctx.workspace_id(), segment_id, customer_ids, now).await?
    };
    match result {
        ManualChange::Done(change) => {
            ctx.wake_outbox();
            Ok(change)
        }
        ManualChange::NotFound => Err(not_managed(segment_id)),
        ManualChange::HasCriteria => Err(CoreError::invalid(
            "segment_id",
            format!(
                "segment {segment_id} is computed from criteria; its members cannot be set by hand (remove its criteria first)"
            ),
        )),
    }
}

/// Marks due the segments whose criteria read any of `attributes` (after UpdateAttributes).
pub async fn profiles_changed(ctx: &AppContext, attributes: &[&str]) -> Result<u64, CoreError> {
    Ok(store::mark_due_for_attributes(&ctx.db, ctx.workspace_id(), attributes).await?)
}

/// Marks every segment with criteria due (after profiles were imported wholesale).
pub async fn profiles_imported(ctx: &AppContext) -> Result<u64, CoreError> {
    Ok(store::mark_all_due(&ctx.db, ctx.workspace_id()).await?)
}

// ----- delivery (called by the outbox worker) -----

/// Why a segment membership row could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// Customer.io refused or failed; the worker decides between retry and dead letter.
    #[error(transparent)]
    Upstream(#[from] CioError),
    /// The database could not be read; retry.
    #[error("database failure")]
    Database(#[from] sharpsend_db::DbError),
    /// The row cannot ever be sent.
    #[error("{0}")]
    Invalid(String),
}

/// Delivers one `segment_add` (`add = true`) / `segment_remove` row: `payload` is
/// `{"segment_id", "ids"}`. The outbox hands a segment's rows out in order, one at a time: a
/// later change is not claimed while an earlier one of the same segment waits for a retry or
/// is in flight, so an add and a later remove never cross on their way. On top of that only
/// the ids whose recorded membership still agrees are sent — an add for people still members,
/// a remove for people still not members — so a row delivered after newer ones (a re-queued
/// dead letter) never undoes them; a segment no longer managed gets nothing. Returns the HTTP
/// requests made (0 or 1).
pub async fn deliver_change(
    ctx: &AppContext,
    add: bool,
    payload: &Value,
) -> Result<u64, DeliverError> {
    let segment_id = payload
        .get("segment_id")
        .and_then(Value::as_i64)
        .ok_or_else(|| DeliverError::Invalid("stored segment change has no segment_id".into()))?;
    let ids: Vec<&str> = payload
        .get("ids")
        .and_then(Value::as_array)
        .ok_or_else(|| DeliverError::Invalid("stored segment change has no ids".into()))?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if ids.len() > cio_client::MAX_SEGMENT_MEMBERS_PER_CALL {
        return Err(DeliverError::Invalid(format!(
            "stored segment change holds {} ids; at most 1000",
            ids.len()
        )));
    }
    let Some(members) = store::members_among(&ctx.db, ctx.workspace_id(), segment_id, &ids).await?
    else {
        tracing::debug!(segment_id, "segment no longer managed; change dropped");
        return Ok(0);
    };
    let send: Vec<&str> = ids
        .into_iter()
        .filter(|id| members.contains(*id) == add)
        .collect();
    if send.is_empty() {
        return Ok(0);
    }
    if add {
        ctx.cio
            .add_to_segment(segment_id, &send, IdType::Id)
            .await?;
    } else {
        ctx.cio
            .remove_from_segment(segment_id, &send, IdType::Id)
            .await?;
    }
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_through_other_segments() {
        let reads: HashMap<i64, Vec<i64>> =
            [(1, vec![2]), (2, vec![3]), (3, vec![]), (4, vec![1])].into();
        assert!(reaches(&reads, 1, 3));
        assert!(reaches(&reads, 4, 3));
        assert!(!reaches(&reads, 3, 1));
        assert!(!reaches(&reads, 9, 1));
    }
}
