//! Customer.io → SharpSend profile sync: keeps the profiles mirror current with what happens in
//! Customer.io (form fills, other systems, new subscribers). The `profile-sync` job
//! ([`sync`]) does one of three things per run:
//!
//! 1. **Backfill** when the workspace never synced, when the feed cursor is older than
//!    Customer.io's 30-day activity window, when more changes wait than
//!    [`ProfileSyncConfig::max_feed_pages`] pages, or to finish a backfill a previous run
//!    started. The audience is the configured segments, else every mirrored segment:
//!    - up to [`ProfileSyncConfig::paging_max`] people (by the mirrored member counts): the
//!      paging path, membership pages (1,000 ids a request) and `POST /v1/customers/attributes`
//!      (100 people a request);
//!    - more: an export (`POST /v1/exports/customers`, `GET /v1/exports/{id}` until done, a
//!      signed download link, the CSV streamed without credentials): a handful of App API
//!      requests for any number of people. The file is loaded 1,000 rows per transaction, two
//!      transactions at a time (a person's rows always in the same one), in bounded memory; progress is kept in the sync state, so a run that waits for the export
//!      or dies half-way is taken up by the next run with the same export.
//!
//!    The feed's newest activity is read before the audience, and becomes the cursor when the
//!    backfill is loaded: changes made meanwhile are read again by the next run (applying them
//!    again gives the same result).
//! 2. **Incremental**: reads `GET /v1/activities?type=attribute_change` (100 a page, newest
//!    first) down to the cursor, and applies the changes oldest first together with the new
//!    cursor in ONE transaction (`sharpsend_db::profile_sync::apply_changes`): a crash (kill -9)
//!    loses nothing and re-applies nothing out of order, the next run simply reads the same
//!    changes again.
//!
//! Who wins, per attribute, is `sharpsend_db::profile_sync::customer_io_wins`. Changed
//! attributes mark the managed segments reading them due, through
//! [`crate::managed_segments::profiles_changed`] (as SharpSend's own writes do). Memberships of
//! the Customer.io segments that managed criteria read are re-read by `segment-evaluation`
//! itself before it evaluates. Every Customer.io request goes through the client's shared App
//! API limiter.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use cio_client::{ActivityQuery, ActivityType, CioError, DownloadError, ExportRow};
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use serde_json::{Value, json};
use sharpsend_db::profile_sync::{
    self as store, BackfillInProgress, FeedChange, FeedPosition, LoadCounts, SnapshotRow,
};

use crate::{AppContext, CoreError};

/// How long Customer.io keeps activities.
pub const FEED_WINDOW: TimeDelta = TimeDelta::days(30);
/// Activities per feed page (Customer.io's maximum).
const FEED_PAGE: u32 = cio_client::MAX_ACTIVITIES_PAGE;
/// Export rows per load transaction.
pub const LOAD_CHUNK: usize = 1000;
/// Members per membership page (paging path).
const MEMBERSHIP_PAGE: u32 = 1000;
/// Identifier columns: never requested as attributes.
const IDENTIFIERS: [&str; 3] = ["id", "email", "cio_id"];

/// Settings of the profile sync (`SHARPSEND_PROFILE_SYNC_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSyncConfig {
    /// Customer.io segments whose people are backfilled; empty: every mirrored segment.
    pub segments: Vec<i64>,
    /// Attributes requested in an export; empty: every attribute the mirror holds and every
    /// attribute a managed segment's criteria read.
    pub attributes: Vec<String>,
    /// Most feed pages read in one run; more waiting changes mean a backfill is cheaper.
    pub max_feed_pages: u32,
    /// Audiences of at most this many people are backfilled by paging instead of an export.
    pub paging_max: u64,
    /// How long one run waits for Customer.io to build an export before leaving it to the
    /// next run.
    pub export_wait: Duration,
}

impl Default for ProfileSyncConfig {
    fn default() -> Self {
        Self {
            segments: Vec::new(),
            attributes: Vec::new(),
            max_feed_pages: 50,
            paging_max: 1000,
            export_wait: Duration::from_secs(60),
        }
    }
}

/// What one `profile-sync` run did (the job run's details).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProfileSyncReport {
    /// `incremental`, `backfill-export`, `backfill-paging` or `waiting-for-export`.
    pub mode: String,
    /// Why a backfill ran (empty for incremental runs).
    pub reason: String,
    /// Activities (incremental) or people (backfill) read.
    pub read: u64,
    /// Profiles created / changed (created included).
    pub created: u64,
    pub changed: u64,
    /// Attribute values kept because SharpSend's undelivered write of them is newer.
    pub kept_pending: u64,
    /// Export rows without a customer id (not mirrored).
    pub skipped: u64,
    /// Managed segments marked due.
    pub segments_marked: u64,
    /// App API requests made.
    pub requests: u64,
    /// The export used (backfill by export).
    pub export_id: Option<i64>,
}

impl ProfileSyncReport {
    fn absorb(&mut self, counts: &LoadCounts) {
        self.read += counts.read;
        self.created += counts.created;
        self.changed += counts.changed;
        self.kept_pending += counts.kept_pending;
    }
}

/// The `profile-sync` job: a backfill if one is needed or under way, else the feed.
pub async fn sync(ctx: &AppContext) -> Result<ProfileSyncReport, CoreError> {
    let state = store::state(&ctx.db, ctx.workspace_id()).await?;
    if let Some(backfill) = state.backfill {
        return continue_export(ctx, backfill, "resuming the backfill under way", 0).await;
    }
    let reason = match state.feed_read_at {
        None => Some("never synced".to_string()),
        Some(read_at) if ctx.now() - read_at > FEED_WINDOW => {
            Some("cursor older than the activity feed's 30-day window".to_string())
        }
        Some(_) => None,
    };
    if let Some(reason) = reason {
        return backfill(ctx, &reason).await;
    }
    follow_feed(ctx, state.cursor).await
}

/// Starts a backfill now, whatever the cursor (operators: after restoring a database).
pub async fn backfill(ctx: &AppContext, reason: &str) -> Result<ProfileSyncReport, CoreError> {
    let mut requests = 0;
    let top = feed_top(ctx, &mut requests).await?;
    let segments = audience(ctx).await?;
    tracing::info!(reason, segments = ?segments.ids, people = ?segments.people, "profile backfill");
    if segments.ids.is_empty() {
        let counts =
            store::apply_changes(&ctx.db, ctx.workspace_id(), &[], top.as_ref(), ctx.now()).await?;
        return Ok(ProfileSyncReport {
            mode: "backfill-paging".into(),
            reason: format!("{reason}; no segment to read"),
            read: counts.read,
            requests,
            ..ProfileSyncReport::default()
        });
    }
    match segments.people {
        Some(people) if people <= ctx.settings.profile_sync.paging_max => {
            backfill_by_paging(ctx, &segments.ids, top, reason, requests).await
        }
        _ => {
            let attributes = export_attributes(ctx).await?;
            let filter = audience_filter(&segments.ids);
            let export = ctx.cio.create_customer_export(&filter, &attributes).await?;
            requests += 1;
            let started = ctx.now();
            store::start_backfill(
                &ctx.db,
                ctx.workspace_id(),
                export.id,
                top.as_ref(),
                started,
            )
            .await?;
            let backfill = BackfillInProgress {
                export_id: export.id,
                requested_at: started,
                top,
                loaded: 0,
            };
            continue_export(ctx, backfill, reason, requests).await
        }
    }
}

/// The newest `attribute_change` activity (one request), if any.
async fn feed_top(ctx: &AppContext, requests: &mut u64) -> Result<Option<FeedPosition>, CoreError> {
    let query = ActivityQuery::new()
        .of_type(ActivityType::AttributeChange)
        .with_limit(1);
    let page = ctx.cio.activities_page(&query, None).await?;
    *requests += 1;
    Ok(page.items.first().and_then(|a| {
        Some(FeedPosition {
            id: a.id.clone(),
            at: a.timestamp?,
        })
    }))
}

/// The backfill's segments and their people (the sum of mirrored member counts; `None` when a
/// count is unknown).
struct Audience {
    ids: Vec<i64>,
    people: Option<u64>,
}

async fn audience(ctx: &AppContext) -> Result<Audience, CoreError> {
    let configured = &ctx.settings.profile_sync.segments;
    let mirrored = sharpsend_db::segments::list(
        &ctx.db,
        ctx.workspace_id(),
        &sharpsend_db::segments::ListFilter::default(),
        None,
        u64::from(u32::MAX),
    )
    .await?;
    let chosen: Vec<_> = if configured.is_empty() {
        mirrored.iter().collect()
    } else {
        mirrored
            .iter()
            .filter(|s| configured.contains(&s.cio_id))
            .collect()
    };
    let mut ids: Vec<i64> = chosen.iter().map(|s| s.cio_id).collect();
    // A configured segment not mirrored yet: its size is unknown, so the export path reads it.
    let unmirrored: Vec<i64> = configured
        .iter()
        .copied()
        .filter(|id| !ids.contains(id))
        .collect();
    let unknown = unmirrored.len();
    ids.extend(unmirrored);
    ids.sort_unstable();
    ids.dedup();
    let people = if unknown > 0 {
        None
    } else {
        chosen
            .iter()
            .map(|s| s.member_count.and_then(|n| u64::try_from(n).ok()))
            .sum::<Option<u64>>()
    };
    Ok(Audience { ids, people })
}

/// `{"or":[{"segment":{"id":N}},…]}`.
fn audience_filter(segment_ids: &[i64]) -> Value {
    json!({ "or": segment_ids.iter().map(|id| json!({"segment": {"id": id}})).collect::<Vec<_>>() })
}

/// The attributes an export asks for: the configured ones, else those the mirror holds and
/// those managed criteria read (never the identifier columns).
async fn export_attributes(ctx: &AppContext) -> Result<Vec<String>, CoreError> {
    let configured = &ctx.settings.profile_sync.attributes;
    let mut names: BTreeSet<String> = if configured.is_empty() {
        let mut names: BTreeSet<String> = store::known_attributes(&ctx.db, ctx.workspace_id())
            .await?
            .into_iter()
            .collect();
        for segment in sharpsend_db::managed_segments::list(&ctx.db, ctx.workspace_id()).await? {
            names.extend(segment.referenced_attributes);
        }
        names
    } else {
        configured.iter().cloned().collect()
    };
    names.retain(|n| !IDENTIFIERS.contains(&n.as_str()));
    Ok(names.into_iter().collect())
}

/// Waits (up to the configured time) for the export, then loads its file and ends the backfill.
async fn continue_export(
    ctx: &AppContext,
    backfill: BackfillInProgress,
    reason: &str,
    mut requests: u64,
) -> Result<ProfileSyncReport, CoreError> {
    let mut report = ProfileSyncReport {
        mode: "backfill-export".into(),
        reason: reason.to_string(),
        export_id: Some(backfill.export_id),
        ..ProfileSyncReport::default()
    };
    let waited = std::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        let export = match ctx.cio.get_export(backfill.export_id).await {
            Ok(export) => export,
            Err(CioError::NotFound { .. }) => {
                store::abandon_backfill(&ctx.db, ctx.workspace_id(), ctx.now()).await?;
                return Err(CoreError::Internal(format!(
                    "export {} vanished from Customer.io; the next run starts another",
                    backfill.export_id
                )));
            }
            Err(e) => return Err(e.into()),
        };
        requests += 1;
        if export.is_failed() {
            store::abandon_backfill(&ctx.db, ctx.workspace_id(), ctx.now()).await?;
            return Err(CoreError::Internal(format!(
                "Customer.io could not build export {}; the next run starts another",
                backfill.export_id
            )));
        }
        if export.is_done() {
            break;
        }
        let budget = ctx.settings.profile_sync.export_wait;
        if waited.elapsed() + pause > budget {
            report.mode = "waiting-for-export".into();
            report.requests = requests;
            return Ok(report);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    let url = ctx.cio.export_download_url(backfill.export_id).await?;
    requests += 1;
    let loaded = load_export_rows(ctx, ctx.cio.export_rows(&url), backfill.requested_at).await?;
    report.absorb(&loaded.counts);
    report.skipped = loaded.skipped;
    report.requests = requests;
    store::finish_backfill(&ctx.db, ctx.workspace_id(), &backfill, ctx.now()).await?;
    report.segments_marked = mark_due(ctx, &loaded.counts.changed_attributes).await;
    tracing::info!(?report, "profile backfill loaded");
    Ok(report)
}

/// What [`load_export_rows`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedExport {
    pub counts: LoadCounts,
    /// Rows without a customer id (not mirrored).
    pub skipped: u64,
}

/// Load transactions of a backfill in flight at once. Rows are split between them by customer
/// id, so all rows of one person go through the same lane, in file order.
const LOAD_LANES: usize = 2;

/// Loads export rows (taken at `taken_at`) into the mirror, [`LOAD_CHUNK`] rows per
/// transaction, [`LOAD_LANES`] transactions at a time, holding a few chunks in memory (so the
/// file is read and parsed while the database writes); progress is recorded in the sync state
/// every ten chunks. Does not mark segments due (the caller does, once).
pub async fn load_export_rows<S>(
    ctx: &AppContext,
    rows: S,
    taken_at: DateTime<Utc>,
) -> Result<LoadedExport, CoreError>
where
    S: Stream<Item = Result<ExportRow, DownloadError>>,
{
    let chunks_done = std::sync::atomic::AtomicU64::new(0);
    let rows_done = std::sync::atomic::AtomicU64::new(0);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..LOAD_LANES)
        .map(|_| tokio::sync::mpsc::channel::<Vec<SnapshotRow>>(1))
        .unzip();
    let writers = receivers.into_iter().map(|mut batches| {
        let (chunks_done, rows_done) = (&chunks_done, &rows_done);
        async move {
            let mut counts = LoadCounts::default();
            while let Some(batch) = batches.recv().await {
                let loaded =
                    store::load_snapshot(&ctx.db, ctx.workspace_id(), &batch, taken_at, ctx.now())
                        .await?;
                let read = loaded.read;
                counts.absorb(loaded);
                let total = rows_done.fetch_add(read, Ordering::Relaxed) + read;
                if (chunks_done.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(10) {
                    store::record_backfill_progress(&ctx.db, ctx.workspace_id(), total, ctx.now())
                        .await?;
                    tracing::info!(loaded = total, "profile backfill progress");
                }
            }
            Ok::<_, CoreError>(counts)
        }
    });
    let reader = async move {
        let mut rows = std::pin::pin!(rows);
        let mut lanes: Vec<Vec<SnapshotRow>> = vec![Vec::new(); LOAD_LANES];
        let mut skipped = 0u64;
        while let Some(row) = rows.next().await {
            let Some(row) = snapshot_row(&row.map_err(download_failed)?) else {
                skipped += 1;
                continue;
            };
            let lane = lane_of(&row.customer_id);
            lanes[lane].push(row);
            if lanes[lane].len() == LOAD_CHUNK {
                let batch = std::mem::replace(&mut lanes[lane], Vec::with_capacity(LOAD_CHUNK));
                if senders[lane].send(batch).await.is_err() {
                    // The lane's writer failed: its error is the one reported.
                    return Ok(skipped);
                }
            }
        }
        for (lane, batch) in lanes.into_iter().enumerate() {
            if !batch.is_empty() && senders[lane].send(batch).await.is_err() {
                return Ok(skipped);
            }
        }
        Ok::<_, CoreError>(skipped)
    };
    let (skipped, counts) = tokio::join!(reader, futures::future::try_join_all(writers));
    let mut loaded = LoadedExport {
        skipped: skipped?,
        ..LoadedExport::default()
    };
    for lane in counts? {
        loaded.counts.absorb(lane);
    }
    Ok(loaded)
}

/// The lane of a customer id (a stable hash; any spread will do).
fn lane_of(customer_id: &str) -> usize {
    let hash = customer_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % LOAD_LANES as u64) as usize
}

fn download_failed(e: DownloadError) -> CoreError {
    // The error never shows the signed link.
    CoreError::Internal(format!("reading the export file failed: {e}"))
}

/// An export row as the mirror takes it (`None` without a customer id).
fn snapshot_row(row: &ExportRow) -> Option<SnapshotRow> {
    Some(SnapshotRow {
        customer_id: row.id()?.to_owned(),
        email: row.email().map(str::to_owned),
        cio_id: row.cio_id().map(str::to_owned),
        attributes: row
            .attributes()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    })
}

/// Customer.io's text form of an attribute value (as in an export).
fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The paging path: membership pages, then 100 people per attributes request, loaded as a
/// snapshot taken now; the feed position read before becomes the cursor.
async fn backfill_by_paging(
    ctx: &AppContext,
    segment_ids: &[i64],
    top: Option<FeedPosition>,
    reason: &str,
    mut requests: u64,
) -> Result<ProfileSyncReport, CoreError> {
    let taken_at = ctx.now();
    let mut ids = BTreeSet::new();
    for segment in segment_ids {
        let mut pages = std::pin::pin!(ctx.cio.segment_membership(*segment, MEMBERSHIP_PAGE));
        let mut members = 0u64;
        while let Some(member) = pages.try_next().await? {
            members += 1;
            if let Some(id) = member.id {
                ids.insert(id);
            }
        }
        requests += members / u64::from(MEMBERSHIP_PAGE) + 1;
    }
    let ids: Vec<String> = ids.into_iter().collect();
    let wanted = ctx.settings.profile_sync.attributes.clone();
    let mut counts = LoadCounts::default();
    for chunk in ids.chunks(cio_client::MAX_CUSTOMERS_PER_LOOKUP) {
        let people = ctx.cio.customers_attributes(chunk).await?;
        requests += 1;
        let rows: Vec<SnapshotRow> = people
            .into_iter()
            .filter_map(|p| {
                let customer_id = p.id.clone().or_else(|| p.identifiers.id.clone())?;
                let mut attributes: Vec<(String, String)> = p
                    .attributes
                    .iter()
                    .filter(|(k, _)| !IDENTIFIERS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), as_text(v)))
                    .collect();
                for name in &wanted {
                    if !p.attributes.contains_key(name) && !IDENTIFIERS.contains(&name.as_str()) {
                        attributes.push((name.clone(), String::new()));
                    }
                }
                Some(SnapshotRow {
                    customer_id,
                    email: p.identifiers.email.clone(),
                    cio_id: p.identifiers.cio_id.clone(),
                    attributes,
                })
            })
            .collect();
        counts.absorb(
            store::load_snapshot(&ctx.db, ctx.workspace_id(), &rows, taken_at, ctx.now()).await?,
        );
    }
    store::apply_changes(&ctx.db, ctx.workspace_id(), &[], top.as_ref(), taken_at).await?;
    let mut report = ProfileSyncReport {
        mode: "backfill-paging".into(),
        reason: reason.to_string(),
        requests,
        ..ProfileSyncReport::default()
    };
    report.absorb(&counts);
    report.segments_marked = mark_due(ctx, &counts.changed_attributes).await;
    Ok(report)
}

/// Reads the feed down to `cursor` and applies what is new; falls back to a backfill when
/// more than the configured pages wait.
async fn follow_feed(
    ctx: &AppContext,
    cursor: Option<FeedPosition>,
) -> Result<ProfileSyncReport, CoreError> {
    let query = ActivityQuery::new()
        .of_type(ActivityType::AttributeChange)
        .with_limit(FEED_PAGE);
    let max_pages = ctx.settings.profile_sync.max_feed_pages;
    let mut newest_first = Vec::new();
    let mut top: Option<FeedPosition> = None;
    let mut start: Option<String> = None;
    let mut requests = 0u64;
    'pages: loop {
        if requests >= u64::from(max_pages) {
            let reason = format!("more than {max_pages} pages of changes since the cursor");
            return backfill(ctx, &reason).await;
        }
        let page = ctx.cio.activities_page(&query, start.as_deref()).await?;
        requests += 1;
        for activity in page.items {
            let Some(at) = activity.timestamp else {
                continue;
            };
            if let Some(c) = &cursor
                && (activity.id == c.id || at < c.at)
            {
                break 'pages;
            }
            top.get_or_insert_with(|| FeedPosition {
                id: activity.id.clone(),
                at,
            });
            newest_first.push(activity);
        }
        match page.next.filter(|n| !n.is_empty()) {
            Some(next) => start = Some(next),
            None => break,
        }
    }
    let mut changes = Vec::new();
    for activity in newest_first.iter().rev() {
        let (Some(customer_id), Some(at)) = (&activity.customer_id, activity.timestamp) else {
            continue;
        };
        let Some(changed_at) = DateTime::from_timestamp(at, 0) else {
            continue;
        };
        for change in activity.attribute_changes() {
            changes.push(FeedChange {
                customer_id: customer_id.clone(),
                attribute: change.name,
                value: change.to,
                changed_at,
            });
        }
    }
    let counts = store::apply_changes(
        &ctx.db,
        ctx.workspace_id(),
        &changes,
        top.as_ref(),
        ctx.now(),
    )
    .await?;
    let mut report = ProfileSyncReport {
        mode: "incremental".into(),
        requests,
        ..ProfileSyncReport::default()
    };
    report.absorb(&counts);
    report.read = newest_first.len() as u64;
    report.segments_marked = mark_due(ctx, &counts.changed_attributes).await;
    Ok(report)
}

/// Marks due the managed segments reading `attributes` (as SharpSend's own writes do); a
/// failure is logged (the segments are re-evaluated when their age runs out).
async fn mark_due(ctx: &AppContext, attributes: &BTreeSet<String>) -> u64 {
    if attributes.is_empty() {
        return 0;
    }
    let names: Vec<&str> = attributes.iter().map(String::as_str).collect();
    match crate::managed_segments::profiles_changed(ctx, &names).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "could not mark managed segments due");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audience_filter_names_every_segment() {
        assert_eq!(
            audience_filter(&[3, 7]),
            json!({"or": [{"segment": {"id": 3}}, {"segment": {"id": 7}}]})
        );
    }

    #[test]
    fn values_become_customer_io_text() {
        assert_eq!(as_text(&json!("pro")), "pro");
        assert_eq!(as_text(&json!(80)), "80");
        assert_eq!(as_text(&json!(true)), "true");
        assert_eq!(as_text(&Value::Null), "");
        assert_eq!(as_text(&json!(["a"])), "[\"a\"]");
    }
}
