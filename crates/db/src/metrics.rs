//! Metric targets and snapshots: what the metrics poller watches, when each is next due, and
//! the series it polled.
//!
//! Targets are keyed by ([`CampaignKind`], Customer.io id). [`watch`] registers one (or makes a
//! known one due now); [`apply_sync_targets`] follows the campaign mirror; [`due`] lists what
//! to poll; [`record_poll`] stores a snapshot (keeping a bounded history) and schedules the
//! next poll; [`record_failure`] notes a failed poll.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
};

use crate::DbError;
use crate::campaigns::CampaignKind;
use crate::entities::{metric_snapshots, metric_targets};
use crate::sql::MAX_ROW_LIMIT;
use crate::time::db_time;

/// Longest `last_error` stored (characters).
const MAX_ERROR_CHARS: usize = 1000;

/// A watched target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricTarget {
    pub id: i64,
    pub workspace_id: i64,
    pub kind: CampaignKind,
    pub cio_id: i64,
    /// Where polled series start: no delivery of the target is older.
    pub window_start: DateTime<Utc>,
    /// Last known send activity (drives the cadence).
    pub active_since: DateTime<Utc>,
    /// `None`: not polled any more (removed in Customer.io).
    pub next_poll_at: Option<DateTime<Utc>>,
    pub last_polled_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Failed polls since the last successful one.
    pub failures: i32,
}

impl TryFrom<metric_targets::Model> for MetricTarget {
    type Error = DbError;

    fn try_from(m: metric_targets::Model) -> Result<Self, DbError> {
        let kind = m.kind.parse().map_err(sea_orm::DbErr::from)?;
        Ok(Self {
            id: m.id,
            workspace_id: m.workspace_id,
            kind,
            cio_id: m.cio_id,
            window_start: m.window_start,
            active_since: m.active_since,
            next_poll_at: m.next_poll_at,
            last_polled_at: m.last_polled_at,
            last_error: m.last_error,
            failures: m.failures,
        })
    }
}

/// A polled series, to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    pub polled_at: DateTime<Utc>,
    /// `hours`, `days`, `weeks` or `months`.
    pub res: String,
    pub start_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    /// Start of the first bucket.
    pub series_start: DateTime<Utc>,
    /// Metric name → counts per bucket, oldest first.
    pub series: BTreeMap<String, Vec<u64>>,
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: i64,
    pub target_id: i64,
    pub polled_at: DateTime<Utc>,
    pub res: String,
    pub start_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub series_start: DateTime<Utc>,
    pub series: BTreeMap<String, Vec<u64>>,
}

impl From<metric_snapshots::Model> for Snapshot {
    fn from(m: metric_snapshots::Model) -> Self {
        Self {
            id: m.id,
            target_id: m.target_id,
            polled_at: m.polled_at,
            res: m.res,
            start_at: m.start_at,
            end_at: m.end_at,
            series_start: m.series_start,
            // Written by this module from the same type; anything else reads as empty.
            series: serde_json::from_value(m.series).unwrap_or_default(),
        }
    }
}

/// A target as the campaign mirror knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetSeen {
    pub kind: CampaignKind,
    pub cio_id: i64,
    /// From Customer.io's own times (creation, or a newsletter's send time).
    pub window_start: DateTime<Utc>,
    /// Latest send activity Customer.io's times show.
    pub active_since: DateTime<Utc>,
}

/// What [`apply_sync_targets`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TargetSyncCounts {
    /// New targets (due at once).
    pub added: u32,
    /// Targets that were not polled any more and are again (due at once).
    pub reactivated: u32,
    /// Targets no longer polled (removed in Customer.io).
    pub deactivated: u32,
}

fn kind_and_id(workspace_id: i64, kind: CampaignKind, cio_id: i64) -> Condition {
    Condition::all()
        .add(metric_targets::Column::WorkspaceId.eq(workspace_id))
        .add(metric_targets::Column::Kind.eq(kind.as_str()))
        .add(metric_targets::Column::CioId.eq(cio_id))
}

/// Inserts the target unless it exists (nothing changes then); returns whether it was new.
async fn insert_if_new(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    kind: CampaignKind,
    cio_id: i64,
    window_start: DateTime<Utc>,
    active_since: DateTime<Utc>,
    due_at: DateTime<Utc>,
) -> Result<bool, DbError> {
    let row = metric_targets::ActiveModel {
        workspace_id: Set(workspace_id),
        kind: Set(kind.as_str().to_owned()),
        cio_id: Set(cio_id),
        window_start: Set(window_start),
        active_since: Set(active_since),
        next_poll_at: Set(Some(due_at)),
        last_polled_at: Set(None),
        last_error: Set(None),
        failures: Set(0),
        created_at: Set(due_at),
        updated_at: Set(due_at),
        ..Default::default()
    };
    let inserted = metric_targets::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                metric_targets::Column::WorkspaceId,
                metric_targets::Column::Kind,
                metric_targets::Column::CioId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(inserted > 0)
}

/// `column = value` where the row's `column` is before (`later` false: after) `value`.
async fn move_time(
    db: &impl ConnectionTrait,
    target: Condition,
    column: metric_targets::Column,
    value: DateTime<Utc>,
    later: bool,
) -> Result<u64, DbError> {
    let moved = if later {
        column.lt(value)
    } else {
        column.gt(value)
    };
    let res = metric_targets::Entity::update_many()
        .col_expr(column, Expr::value(value))
        .filter(target)
        .filter(moved)
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Watches (kind, id) from now on: a new target is due at `now`; a known one gets the earlier
/// `window_start`, the later `active_since`, and is due at `now` unless it is due earlier.
/// Safe to call concurrently.
pub async fn watch(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    kind: CampaignKind,
    cio_id: i64,
    window_start: DateTime<Utc>,
    active_since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<MetricTarget, DbError> {
    let (window_start, active_since, now) =
        (db_time(window_start), db_time(active_since), db_time(now));
    let key = kind_and_id(workspace_id, kind, cio_id);
    if !insert_if_new(
        db,
        workspace_id,
        kind,
        cio_id,
        window_start,
        active_since,
        now,
    )
    .await?
    {
        use metric_targets::Column as C;
        move_time(db, key.clone(), C::WindowStart, window_start, false).await?;
        move_time(db, key.clone(), C::ActiveSince, active_since, true).await?;
        metric_targets::Entity::update_many()
            .col_expr(C::NextPollAt, Expr::value(now))
            .col_expr(C::UpdatedAt, Expr::value(now))
            .filter(key.clone())
            .filter(
                Condition::any()
                    .add(C::NextPollAt.is_null())
                    .add(C::NextPollAt.gt(now)),
            )
            .exec(db)
            .await?;
    }
    get_by(db, key)
        .await?
        .ok_or_else(|| DbError::Db(sea_orm::DbErr::RecordNotFound(format!("{kind} {cio_id}"))))
}

/// Follows a campaign sync: each `seen` item becomes a target (due at `now`) if it is not one;
/// a known target takes `window_start` from Customer.io's times (they are authoritative), the
/// later `active_since`, and is due at `now` again if it was not polled any more. Targets of
/// `gone` items are not polled any more.
pub async fn apply_sync_targets<C>(
    db: &C,
    workspace_id: i64,
    seen: &[TargetSeen],
    gone: &[(CampaignKind, i64)],
    now: DateTime<Utc>,
) -> Result<TargetSyncCounts, DbError>
where
    C: TransactionTrait,
{
    use metric_targets::Column as Col;
    let now = db_time(now);
    let txn = db.begin().await?;
    let mut counts = TargetSyncCounts::default();
    for s in seen {
        let (window_start, active_since) = (db_time(s.window_start), db_time(s.active_since));
        if insert_if_new(
            &txn,
            workspace_id,
            s.kind,
            s.cio_id,
            window_start,
            active_since,
            now,
        )
        .await?
        {
            counts.added += 1;
            continue;
        }
        let key = kind_and_id(workspace_id, s.kind, s.cio_id);
        metric_targets::Entity::update_many()
            .col_expr(Col::WindowStart, Expr::value(window_start))
            .col_expr(Col::UpdatedAt, Expr::value(now))
            .filter(key.clone())
            .filter(Col::WindowStart.ne(window_start))
            .exec(&txn)
            .await?;
        move_time(&txn, key.clone(), Col::ActiveSince, active_since, true).await?;
        let res = metric_targets::Entity::update_many()
            .col_expr(Col::NextPollAt, Expr::value(now))
            .col_expr(Col::UpdatedAt, Expr::value(now))
            .filter(key)
            .filter(Col::NextPollAt.is_null())
            .exec(&txn)
            .await?;
        counts.reactivated += u32::try_from(res.rows_affected).unwrap_or(u32::MAX);
    }
    for (kind, cio_id) in gone {
        let res = metric_targets::Entity::update_many()
            .col_expr(Col::NextPollAt, Expr::value(None::<DateTime<Utc>>))
            .col_expr(Col::UpdatedAt, Expr::value(now))
            .filter(kind_and_id(workspace_id, *kind, *cio_id))
            .filter(Col::NextPollAt.is_not_null())
            .exec(&txn)
            .await?;
        counts.deactivated += u32::try_from(res.rows_affected).unwrap_or(u32::MAX);
    }
    txn.commit().await?;
    Ok(counts)
}

async fn get_by(
    db: &impl ConnectionTrait,
    key: Condition,
) -> Result<Option<MetricTarget>, DbError> {
    metric_targets::Entity::find()
        .filter(key)
        .one(db)
        .await?
        .map(MetricTarget::try_from)
        .transpose()
}

/// The target (kind, id) of a workspace, if watched.
pub async fn get_target(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    kind: CampaignKind,
    cio_id: i64,
) -> Result<Option<MetricTarget>, DbError> {
    get_by(db, kind_and_id(workspace_id, kind, cio_id)).await
}

/// Targets due at `now` (next poll at or before it), most overdue first, at most `limit`.
pub async fn due(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<MetricTarget>, DbError> {
    use metric_targets::Column as Col;
    metric_targets::Entity::find()
        .filter(Col::WorkspaceId.eq(workspace_id))
        .filter(Col::NextPollAt.lte(db_time(now)))
        .order_by_asc(Col::NextPollAt)
        .order_by_asc(Col::Id)
        .limit(Ord::min(limit, MAX_ROW_LIMIT))
        .all(db)
        .await?
        .into_iter()
        .map(MetricTarget::try_from)
        .collect()
}

/// Stores a successful poll of `target` in one transaction: the snapshot; `last_polled_at`;
/// `last_error` and `failures` cleared; `active_since` moved to `active_since` if later; the
/// next poll at `next_poll_at` (unless the target is not polled any more); and only the `keep`
/// newest snapshots of the target kept (at least one).
pub async fn record_poll<C>(
    db: &C,
    target: &MetricTarget,
    snapshot: &NewSnapshot,
    active_since: DateTime<Utc>,
    next_poll_at: DateTime<Utc>,
    keep: u64,
) -> Result<Snapshot, DbError>
where
    C: TransactionTrait,
{
    use metric_targets::Column as Col;
    let polled_at = db_time(snapshot.polled_at);
    let row = metric_snapshots::ActiveModel {
        workspace_id: Set(target.workspace_id),
        target_id: Set(target.id),
        polled_at: Set(polled_at),
        res: Set(snapshot.res.clone()),
        start_at: Set(db_time(snapshot.start_at)),
        end_at: Set(db_time(snapshot.end_at)),
        series_start: Set(db_time(snapshot.series_start)),
        series: Set(serde_json::to_value(&snapshot.series).unwrap_or_default()),
        ..Default::default()
    };
    let txn = db.begin().await?;
    let stored = metric_snapshots::Entity::insert(row)
        .exec_with_returning(&txn)
        .await?;
    let key = Condition::all().add(Col::Id.eq(target.id));
    metric_targets::Entity::update_many()
        .col_expr(Col::LastPolledAt, Expr::value(polled_at))
        .col_expr(Col::LastError, Expr::value(None::<String>))
        .col_expr(Col::Failures, Expr::value(0))
        .col_expr(Col::UpdatedAt, Expr::value(polled_at))
        .filter(key.clone())
        .exec(&txn)
        .await?;
    metric_targets::Entity::update_many()
        .col_expr(Col::NextPollAt, Expr::value(db_time(next_poll_at)))
        .filter(key.clone())
        .filter(Col::NextPollAt.is_not_null())
        .exec(&txn)
        .await?;
    move_time(&txn, key, Col::ActiveSince, db_time(active_since), true).await?;
    prune(&txn, target.id, Ord::max(keep, 1)).await?;
    txn.commit().await?;
    Ok(stored.into())
}

/// Deletes all but the `keep` newest snapshots of a target.
async fn prune(db: &impl ConnectionTrait, target_id: i64, keep: u64) -> Result<(), DbError> {
    use metric_snapshots::Column as Col;
    let oldest_kept: Option<i64> = metric_snapshots::Entity::find()
        .select_only()
        .column(Col::Id)
        .filter(Col::TargetId.eq(target_id))
        .order_by_desc(Col::Id)
        .offset(keep - 1)
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    if let Some(oldest_kept) = oldest_kept {
        metric_snapshots::Entity::delete_many()
            .filter(Col::TargetId.eq(target_id))
            .filter(Col::Id.lt(oldest_kept))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Notes a failed poll: `last_error` (shortened to 1,000 characters), one more failure, and the
/// next attempt at `next_poll_at` (unless the target is not polled any more).
pub async fn record_failure(
    db: &impl ConnectionTrait,
    target_id: i64,
    error: &str,
    next_poll_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    use metric_targets::Column as Col;
    let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
    metric_targets::Entity::update_many()
        .col_expr(Col::LastError, Expr::value(error))
        .col_expr(Col::Failures, Expr::col(Col::Failures).add(1))
        .col_expr(Col::UpdatedAt, Expr::value(db_time(now)))
        .filter(Col::Id.eq(target_id))
        .exec(db)
        .await?;
    metric_targets::Entity::update_many()
        .col_expr(Col::NextPollAt, Expr::value(db_time(next_poll_at)))
        .filter(Col::Id.eq(target_id))
        .filter(Col::NextPollAt.is_not_null())
        .exec(db)
        .await?;
    Ok(())
}

/// The newest snapshot of a target.
pub async fn latest_snapshot(
    db: &impl ConnectionTrait,
    target_id: i64,
) -> Result<Option<Snapshot>, DbError> {
    Ok(metric_snapshots::Entity::find()
        .filter(metric_snapshots::Column::TargetId.eq(target_id))
        .order_by_desc(metric_snapshots::Column::Id)
        .one(db)
        .await?
        .map(Into::into))
}

/// How many snapshots a target has.
pub async fn snapshot_count(db: &impl ConnectionTrait, target_id: i64) -> Result<u64, DbError> {
    Ok(metric_snapshots::Entity::find()
        .filter(metric_snapshots::Column::TargetId.eq(target_id))
        .count(db)
        .await?)
}
