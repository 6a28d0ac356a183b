//! The campaign mirror: Customer.io campaigns, API-triggered broadcasts and newsletters pulled
//! into the database ([`sync_campaigns`], the `campaign-sync` job) and read from there
//! ([`list_campaigns`], [`get_campaign`], which reads and mirrors an item Customer.io has but the
//! mirror does not yet).
//!
//! A sync reads the three listings (3 App API requests) and writes them in one transaction;
//! nothing is written unless all three were read. Items Customer.io no longer lists are marked
//! removed (`removed_at`): hidden from listings and `NotFound` to [`get_campaign`], restored if
//! they reappear, their metrics snapshots kept but no longer polled. Every mirrored item becomes
//! a metrics target (a newsletter once it is sent), see [`crate::metrics`].

use std::collections::HashSet;
use std::time::Instant;

use chrono::{DateTime, Utc};
use cio_client::{Campaign, CioError, Newsletter};
/// Customer.io's three kinds of message source: the mirror's vocabulary.
pub use sharpsend_db::campaigns::CampaignKind;
use sharpsend_db::campaigns::{self as mirror, CampaignRecord, SyncCounts, SyncedCampaign};
use sharpsend_db::metrics::{self as targets, TargetSyncCounts};

use crate::{AppContext, CoreError, paging::Page};

/// What a campaign sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CampaignSyncReport {
    /// Mirror changes: created, updated, removed, unchanged.
    #[serde(flatten)]
    pub counts: SyncCounts,
    /// Items listed by Customer.io, per kind.
    pub campaigns: u32,
    pub broadcasts: u32,
    pub newsletters: u32,
    /// Metrics targets added, reactivated, deactivated.
    pub targets: TargetSyncCounts,
    pub duration_ms: u64,
}

fn at(unix: Option<i64>) -> Option<DateTime<Utc>> {
    unix.and_then(|s| DateTime::from_timestamp(s, 0))
}

/// A campaign or broadcast as the mirror stores it.
fn synced_campaign(kind: CampaignKind, c: Campaign) -> SyncedCampaign {
    SyncedCampaign {
        kind,
        cio_id: c.id,
        name: c.name,
        campaign_type: c.kind.filter(|k| !k.is_empty()),
        state: c.state.filter(|s| !s.is_empty()),
        cio_created_at: at(c.created),
        cio_updated_at: at(c.updated),
        sent_at: None,
        tags: c.tags.unwrap_or_default(),
    }
}

/// A newsletter as the mirror stores it; its state is `sent` once it has a send time, else
/// `draft` (Customer.io's newsletter object has no state).
fn synced_newsletter(n: Newsletter) -> SyncedCampaign {
    let sent_at = at(n.sent_at);
    SyncedCampaign {
        kind: CampaignKind::Newsletter,
        cio_id: n.id,
        name: n.name,
        campaign_type: n.kind.filter(|k| !k.is_empty()),
        state: Some(if sent_at.is_some() { "sent" } else { "draft" }.to_string()),
        cio_created_at: at(n.created),
        cio_updated_at: at(n.updated),
        sent_at,
        tags: n.tags.unwrap_or_default(),
    }
}

/// A count for a job report.
pub(crate) fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Pulls campaigns, broadcasts and newsletters into the mirror and keeps their metrics targets
/// in step (new ones due at once, removed ones no longer polled).
///
/// Campaigns and broadcasts share Customer.io's id sequence: an id listed as a broadcast is
/// mirrored as a broadcast only, even if `/v1/campaigns` lists it too.
pub async fn sync_campaigns(ctx: &AppContext) -> Result<CampaignSyncReport, CoreError> {
    let started = Instant::now();
    let campaigns = ctx.cio.list_campaigns().await?;
    let broadcasts = ctx.cio.list_broadcasts().await?;
    let newsletters = ctx.cio.list_newsletters().await?;
    let broadcast_ids: HashSet<i64> = broadcasts.iter().map(|b| b.id).collect();

    let mut report = CampaignSyncReport {
        broadcasts: count(broadcasts.len()),
        newsletters: count(newsletters.len()),
        ..Default::default()
    };
    let mut seen: Vec<SyncedCampaign> =
        Vec::with_capacity(campaigns.len() + broadcasts.len() + newsletters.len());
    for c in campaigns
        .into_iter()
        .filter(|c| !broadcast_ids.contains(&c.id))
    {
        report.campaigns += 1;
        seen.push(synced_campaign(CampaignKind::Campaign, c));
    }
    seen.extend(
        broadcasts
            .into_iter()
            .map(|b| synced_campaign(CampaignKind::Broadcast, b)),
    );
    seen.extend(newsletters.into_iter().map(synced_newsletter));

    let now = ctx.now();
    let (counts, removed) = mirror::apply_sync(&ctx.db, ctx.workspace_id(), &seen, now).await?;
    let watched: Vec<_> = seen
        .iter()
        .filter_map(|item| crate::metrics::target_seen(item, now))
        .collect();
    report.targets =
        targets::apply_sync_targets(&ctx.db, ctx.workspace_id(), &watched, &removed, now).await?;
    report.counts = counts;
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        created = counts.created,
        updated = counts.updated,
        removed = counts.removed,
        unchanged = counts.unchanged,
        targets_added = report.targets.added,
        duration_ms = report.duration_ms,
        "campaigns synced"
    );
    Ok(report)
}

/// A mirrored campaign, API-triggered broadcast or newsletter.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignView {
    pub kind: CampaignKind,
    /// Customer.io's id.
    pub id: i64,
    pub name: String,
    /// Customer.io's `type`, if it gave one.
    pub campaign_type: Option<String>,
    /// Customer.io's `state`; newsletters: `sent` or `draft`.
    pub state: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Newsletters: when it was sent.
    pub sent_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    /// When the mirror last saw it in Customer.io.
    pub synced_at: DateTime<Utc>,
}

impl From<CampaignRecord> for CampaignView {
    fn from(r: CampaignRecord) -> Self {
        let item = r.item;
        Self {
            kind: item.kind,
            id: item.cio_id,
            name: item.name,
            campaign_type: item.campaign_type,
            state: item.state,
            created_at: item.cio_created_at,
            updated_at: item.cio_updated_at,
            sent_at: item.sent_at,
            tags: item.tags,
            synced_at: r.synced_at,
        }
    }
}

/// One page of mirrored items (not removed) by kind (campaigns, broadcasts, newsletters) then
/// id; only `kind` when given; after `after` (the last (kind, id) of the previous page).
pub async fn list_campaigns(
    ctx: &AppContext,
    kind: Option<CampaignKind>,
    after: Option<(CampaignKind, i64)>,
    limit: u64,
) -> Result<Page<CampaignView, (CampaignKind, i64)>, CoreError> {
    let rows = mirror::list(
        &ctx.db,
        ctx.workspace_id(),
        kind,
        after,
        Page::<(), ()>::fetch(limit),
    )
    .await?;
    Ok(Page::cut(rows, limit, |r| (r.item.kind, r.item.cio_id)).map(CampaignView::from))
}

/// One item, from the mirror; one not mirrored yet (e.g. a newsletter a send created since the
/// last `campaign-sync`) is read from Customer.io and mirrored. Removed in Customer.io, or
/// unknown there: `NotFound`.
pub async fn get_campaign(
    ctx: &AppContext,
    kind: CampaignKind,
    id: i64,
) -> Result<CampaignView, CoreError> {
    get_record(ctx, kind, id).await.map(CampaignView::from)
}

/// [`get_campaign`]'s record.
pub(crate) async fn get_record(
    ctx: &AppContext,
    kind: CampaignKind,
    id: i64,
) -> Result<CampaignRecord, CoreError> {
    if id <= 0 {
        return Err(CoreError::invalid(
            "id",
            "must be a positive Customer.io id",
        ));
    }
    let ws = ctx.workspace_id();
    let not_found = || CoreError::NotFound {
        what: kind.as_str(),
        id: id.to_string(),
    };
    if let Some(record) = mirror::get(&ctx.db, ws, kind, id).await? {
        return if record.removed_at.is_none() {
            Ok(record)
        } else {
            Err(not_found())
        };
    }
    let fetched = match kind {
        CampaignKind::Campaign => ctx
            .cio
            .get_campaign(id)
            .await
            .map(|c| synced_campaign(kind, c)),
        CampaignKind::Broadcast => ctx
            .cio
            .get_broadcast(id)
            .await
            .map(|c| synced_campaign(kind, c)),
        CampaignKind::Newsletter => ctx.cio.get_newsletter(id).await.map(synced_newsletter),
    };
    let item = match fetched {
        Err(CioError::NotFound { .. }) => return Err(not_found()),
        other => other?,
    };
    mirror::upsert_one(&ctx.db, ws, &item, ctx.now()).await?;
    mirror::get(&ctx.db, ws, kind, id)
        .await?
        .ok_or_else(not_found)
}
