//! The segments mirror: Customer.io segments of a workspace as last seen by a sync.
//!
//! [`apply_sync`] writes a full listing from Customer.io (or [`apply_sync_batch`] one part at a
//! time, then [`mark_unseen_removed`]); [`list`], [`get`] and [`get_many`]
//! read the mirror (serving reads without touching Customer.io's rate-limited API).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, LikeExpr};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
};

use crate::DbError;
use crate::database::begin_write;
use crate::entities::segments::{ActiveModel, Column, Entity, Model};
use crate::entities::workspaces;
use crate::time::db_time;

/// Ids per `IN (…)` list / rows per multi-row insert: well under both backends' bind limits.
const CHUNK: usize = 500;
/// Rows per multi-row insert (13 values each).
const INSERT_CHUNK: usize = 200;
/// Escape character used in `LIKE` patterns built by [`like_contains`].
const LIKE_ESCAPE: char = '\\';

/// A mirrored segment, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRecord {
    pub workspace_id: i64,
    /// Customer.io's segment id.
    pub cio_id: i64,
    pub name: String,
    pub description: Option<String>,
    /// `dynamic` or `manual`.
    pub segment_type: String,
    /// Member count, if Customer.io has given one.
    pub member_count: Option<i64>,
    /// When `member_count` was counted.
    pub counted_at: Option<DateTime<Utc>>,
    /// When a sync last saw this segment in Customer.io.
    pub synced_at: DateTime<Utc>,
    /// The segment no longer exists in Customer.io (as of `removed_at`).
    pub removed: bool,
    pub removed_at: Option<DateTime<Utc>>,
}

impl From<Model> for SegmentRecord {
    fn from(m: Model) -> Self {
        Self {
            workspace_id: m.workspace_id,
            cio_id: m.cio_id,
            name: m.name,
            description: m.description,
            segment_type: m.segment_type,
            member_count: m.member_count,
            counted_at: m.counted_at,
            synced_at: m.synced_at,
            removed: m.removed,
            removed_at: m.removed_at,
        }
    }
}

/// One segment as listed by Customer.io during a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedSegment {
    pub cio_id: i64,
    pub name: String,
    pub description: Option<String>,
    /// `dynamic` or `manual` (anything else is rejected by the database).
    pub segment_type: String,
    pub member_count: Option<i64>,
    pub counted_at: Option<DateTime<Utc>>,
}

/// What [`apply_sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// Segments seen for the first time.
    pub created: u32,
    /// Known segments whose name, description, type or member count changed, or that
    /// reappeared after having been marked removed.
    pub updated: u32,
    /// Segments no longer listed by Customer.io, newly marked removed.
    pub removed: u32,
    /// Known segments seen again without any of the changes above (a new `counted_at` alone
    /// is stored but counts as unchanged).
    pub unchanged: u32,
}

/// Restricts [`list`] to one segment type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeFilter {
    Dynamic,
    Manual,
}

impl TypeFilter {
    /// The stored value: `dynamic` or `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            TypeFilter::Dynamic => "dynamic",
            TypeFilter::Manual => "manual",
        }
    }
}

/// Filters for [`list`]. The default lists every segment not marked removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Case-insensitive (Unicode lowercase) substring of the name; `%` and `_` match
    /// themselves. `None` or an empty string matches every name.
    pub name_contains: Option<String>,
    pub segment_type: Option<TypeFilter>,
    /// Also list segments marked removed.
    pub include_removed: bool,
}

/// Writes one complete listing of a workspace's segments from Customer.io, in one
/// transaction: creates unseen ones, updates changed ones, refreshes `synced_at` of every seen
/// one, marks every known, not yet removed segment missing from `seen` as removed (at
/// `synced_at`), and clears `removed` on a segment that reappears.
///
/// If `seen` lists a `cio_id` twice, the last entry wins. Fails with
/// `DbError::Db(DbErr::RecordNotFound)` if the workspace does not exist. Concurrent syncs of one
/// workspace run one after the other (row lock on PostgreSQL, `BEGIN IMMEDIATE` on SQLite).
///
/// A long sync writes its listing in parts instead: [`apply_sync_batch`] as each part is
/// fetched, then [`mark_unseen_removed`] once the whole listing has been read.
pub async fn apply_sync<C>(
    db: &C,
    workspace_id: i64,
    seen: &[SyncedSegment],
    synced_at: DateTime<Utc>,
) -> Result<SyncCounts, DbError>
where
    C: TransactionTrait,
{
    let synced_at = db_time(synced_at);
    let txn = begin_write(db).await?;
    lock_workspace(&txn, workspace_id).await?;
    let mut counts = upsert_in(&txn, workspace_id, seen, synced_at).await?;
    let seen_ids: HashSet<i64> = seen.iter().map(|s| s.cio_id).collect();
    counts.removed = remove_unseen_in(&txn, workspace_id, &seen_ids, synced_at).await?;
    txn.commit().await?;
    tracing::debug!(workspace_id, ?counts, "segments sync applied");
    Ok(counts)
}

/// Writes one part of a listing, in one transaction committed at once: creates unseen segments,
/// updates changed ones and refreshes `synced_at` of the others (as [`apply_sync`], but marks
/// nothing removed; `removed` in the answer is 0). A sync that fails later keeps what its
/// earlier parts wrote.
pub async fn apply_sync_batch<C>(
    db: &C,
    workspace_id: i64,
    batch: &[SyncedSegment],
    synced_at: DateTime<Utc>,
) -> Result<SyncCounts, DbError>
where
    C: TransactionTrait,
{
    let synced_at = db_time(synced_at);
    let txn = begin_write(db).await?;
    lock_workspace(&txn, workspace_id).await?;
    let counts = upsert_in(&txn, workspace_id, batch, synced_at).await?;
    txn.commit().await?;
    Ok(counts)
}

/// Ends a sync written with [`apply_sync_batch`]: marks every known, not yet removed segment of
/// the workspace whose id is not in `seen` (the complete listing) as removed at `synced_at`.
/// Returns how many were newly marked.
pub async fn mark_unseen_removed<C>(
    db: &C,
    workspace_id: i64,
    seen: &HashSet<i64>,
    synced_at: DateTime<Utc>,
) -> Result<u32, DbError>
where
    C: TransactionTrait,
{
    let synced_at = db_time(synced_at);
    let txn = begin_write(db).await?;
    lock_workspace(&txn, workspace_id).await?;
    let removed = remove_unseen_in(&txn, workspace_id, seen, synced_at).await?;
    txn.commit().await?;
    Ok(removed)
}

/// Serialises syncs of this workspace on PostgreSQL (no-op on SQLite, whose IMMEDIATE
/// transaction already holds the write lock), and checks that the workspace exists.
async fn lock_workspace(txn: &impl ConnectionTrait, workspace_id: i64) -> Result<(), DbError> {
    workspaces::Entity::find_by_id(workspace_id)
        .lock_exclusive()
        .one(txn)
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(format!("workspace {workspace_id}")))?;
    Ok(())
}

async fn upsert_in(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    seen: &[SyncedSegment],
    synced_at: DateTime<Utc>,
) -> Result<SyncCounts, DbError> {
    // Last entry per cio_id wins; keep first-seen order for deterministic inserts.
    let mut latest: HashMap<i64, &SyncedSegment> = HashMap::with_capacity(seen.len());
    let mut order = Vec::with_capacity(seen.len());
    for s in seen {
        if latest.insert(s.cio_id, s).is_none() {
            order.push(s.cio_id);
        }
    }

    let mut existing: HashMap<i64, Model> = HashMap::with_capacity(order.len());
    for chunk in order.chunks(CHUNK) {
        let rows = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace_id))
            .filter(Column::CioId.is_in(chunk.iter().copied()))
            .all(txn)
            .await?;
        existing.extend(rows.into_iter().map(|m| (m.cio_id, m)));
    }

    let mut counts = SyncCounts::default();
    let mut inserts = Vec::new();
    let mut touched = Vec::new();
    for cio_id in order {
        let Some(s) = latest.get(&cio_id).copied() else {
            continue;
        };
        let counted_at = s.counted_at.map(db_time);
        match existing.remove(&cio_id) {
            None => {
                counts.created += 1;
                inserts.push(ActiveModel {
                    workspace_id: Set(workspace_id),
                    cio_id: Set(cio_id),
                    name: Set(s.name.clone()),
                    name_lower: Set(s.name.to_lowercase()),
                    description: Set(s.description.clone()),
                    segment_type: Set(s.segment_type.clone()),
                    member_count: Set(s.member_count),
                    counted_at: Set(counted_at),
                    synced_at: Set(synced_at),
                    removed: Set(false),
                    removed_at: Set(None),
                    created_at: Set(synced_at),
                    updated_at: Set(synced_at),
                    ..Default::default()
                });
            }
            Some(m) => {
                let changed = m.name != s.name
                    || m.description != s.description
                    || m.segment_type != s.segment_type
                    || m.member_count != s.member_count;
                if changed || m.removed {
                    counts.updated += 1;
                } else {
                    counts.unchanged += 1;
                }
                if changed || m.removed || m.counted_at != counted_at {
                    let mut a = m.into_active_model();
                    a.name = Set(s.name.clone());
                    a.name_lower = Set(s.name.to_lowercase());
                    a.description = Set(s.description.clone());
                    a.segment_type = Set(s.segment_type.clone());
                    a.member_count = Set(s.member_count);
                    a.counted_at = Set(counted_at);
                    a.synced_at = Set(synced_at);
                    a.removed = Set(false);
                    a.removed_at = Set(None);
                    a.updated_at = Set(synced_at);
                    a.update(txn).await?;
                } else {
                    touched.push(m.id);
                }
            }
        }
    }

    for chunk in touched.chunks(CHUNK) {
        Entity::update_many()
            .col_expr(Column::SyncedAt, Expr::value(synced_at))
            .filter(Column::Id.is_in(chunk.iter().copied()))
            .exec(txn)
            .await?;
    }

    let mut inserts = inserts.into_iter().peekable();
    while inserts.peek().is_some() {
        let chunk: Vec<ActiveModel> = inserts.by_ref().take(INSERT_CHUNK).collect();
        Entity::insert_many(chunk)
            .exec_without_returning(txn)
            .await?;
    }
    Ok(counts)
}

async fn remove_unseen_in(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    seen: &HashSet<i64>,
    synced_at: DateTime<Utc>,
) -> Result<u32, DbError> {
    let known: Vec<(i64, i64)> = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::CioId)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Removed.eq(false))
        .into_tuple()
        .all(txn)
        .await?;
    let vanished: Vec<i64> = known
        .into_iter()
        .filter(|(_, cio_id)| !seen.contains(cio_id))
        .map(|(id, _)| id)
        .collect();
    let mut removed = 0u32;
    for chunk in vanished.chunks(CHUNK) {
        let res = Entity::update_many()
            .col_expr(Column::Removed, Expr::value(true))
            .col_expr(Column::RemovedAt, Expr::value(synced_at))
            .col_expr(Column::UpdatedAt, Expr::value(synced_at))
            .filter(Column::Id.is_in(chunk.iter().copied()))
            .exec(txn)
            .await?;
        removed = removed.saturating_add(u32::try_from(res.rows_affected).unwrap_or(u32::MAX));
    }
    Ok(removed)
}

/// Segments of a workspace, ordered by `cio_id`, at most `limit`, starting after
/// `after_cio_id` (keyset paging: pass the last `cio_id` of the previous page).
pub async fn list(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    filter: &ListFilter,
    after_cio_id: Option<i64>,
    limit: u64,
) -> Result<Vec<SegmentRecord>, DbError> {
    let mut cond = Condition::all().add(Column::WorkspaceId.eq(workspace_id));
    if !filter.include_removed {
        cond = cond.add(Column::Removed.eq(false));
    }
    if let Some(t) = filter.segment_type {
        cond = cond.add(Column::SegmentType.eq(t.as_str()));
    }
    if let Some(needle) = filter.name_contains.as_deref().filter(|n| !n.is_empty()) {
        cond = cond.add(Column::NameLower.like(like_contains(&needle.to_lowercase())));
    }
    if let Some(after) = after_cio_id {
        cond = cond.add(Column::CioId.gt(after));
    }
    Ok(Entity::find()
        .filter(cond)
        .order_by_asc(Column::CioId)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// One segment of a workspace by Customer.io id, removed or not.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_id: i64,
) -> Result<Option<SegmentRecord>, DbError> {
    Ok(Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioId.eq(cio_id))
        .one(db)
        .await?
        .map(Into::into))
}

/// The segments among `cio_ids` that exist in the workspace (removed ones included), ordered
/// by `cio_id`. Unknown ids are simply absent; duplicates are returned once.
pub async fn get_many(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_ids: &[i64],
) -> Result<Vec<SegmentRecord>, DbError> {
    let mut ids = cio_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let rows = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace_id))
            .filter(Column::CioId.is_in(chunk.iter().copied()))
            .order_by_asc(Column::CioId)
            .all(db)
            .await?;
        out.extend(rows.into_iter().map(SegmentRecord::from));
    }
    Ok(out)
}

/// `%needle%` with `%`, `_` and the escape character itself escaped.
fn like_contains(needle: &str) -> LikeExpr {
    let mut pattern = String::with_capacity(needle.len() + 2);
    pattern.push('%');
    for c in needle.chars() {
        if matches!(c, '%' | '_') || c == LIKE_ESCAPE {
            pattern.push(LIKE_ESCAPE);
        }
        pattern.push(c);
    }
    pattern.push('%');
    LikeExpr::new(pattern).escape(LIKE_ESCAPE)
}
