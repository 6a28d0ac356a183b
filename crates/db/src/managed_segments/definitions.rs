//! Definitions: creating, reading, updating and deleting managed segments, and marking them due
//! for evaluation.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, TransactionSession, TransactionTrait,
};
use serde_json::{Value, json};

use super::{ManagedSegment, NewManagedSegment, StoredCriteria};
use crate::DbError;
use crate::criteria_sql::SqlBuilder;
use crate::database::begin_write;
use crate::entities::managed_segments::{ActiveModel, Column, Entity, Model};
use crate::entities::{segment_members, segments};
use crate::time::db_time;

/// Records a managed segment and its row in the segments mirror (a manual segment with no
/// members yet), and completes the idempotency key it [`NewManagedSegment::completes`], in one
/// transaction. A segment with criteria starts due for evaluation.
pub async fn create(
    db: &impl TransactionTrait,
    workspace_id: i64,
    new: &NewManagedSegment,
    now: DateTime<Utc>,
) -> Result<ManagedSegment, DbError> {
    let now = db_time(now);
    let (criteria, attributes, segment_refs) = match &new.criteria {
        Some(c) => (
            Some(c.criteria.clone()),
            json!(c.referenced_attributes),
            json!(c.referenced_segments),
        ),
        None => (None, json!([]), json!([])),
    };
    let row = ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        cio_segment_id: Set(new.cio_segment_id),
        name: Set(new.name.clone()),
        description: Set(new.description.clone()),
        criteria: Set(criteria),
        referenced_attributes: Set(attributes),
        referenced_segments: Set(segment_refs),
        revision: Set(0),
        member_count: Set(0),
        evaluation_due: Set(new.criteria.is_some()),
        last_evaluated_at: Set(None),
        last_evaluation_ms: Set(None),
        last_added: Set(None),
        last_removed: Set(None),
        last_evaluation_error: Set(None),
        change_watermark: Set(None),
        change_snapshot: Set(None),
        last_full_at: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let mirror = segments::ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        cio_id: Set(new.cio_segment_id),
        name: Set(new.name.clone()),
        name_lower: Set(new.name.to_lowercase()),
        description: Set(new.description.clone()),
        segment_type: Set("manual".to_owned()),
        member_count: Set(Some(0)),
        counted_at: Set(Some(now)),
        synced_at: Set(now),
        removed: Set(false),
        removed_at: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let txn = begin_write(db).await?;
    let stmt = Entity::insert(row).into_query();
    txn.execute(&stmt).await?;
    let stmt = segments::Entity::insert(mirror)
        .on_conflict(
            OnConflict::columns([segments::Column::WorkspaceId, segments::Column::CioId])
                .update_columns([
                    segments::Column::Name,
                    segments::Column::NameLower,
                    segments::Column::Description,
                    segments::Column::SegmentType,
                    segments::Column::Removed,
                    segments::Column::RemovedAt,
                    segments::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .into_query();
    txn.execute(&stmt).await?;
    if let Some(key) = &new.completes {
        crate::idempotency::complete(
            &txn,
            workspace_id,
            &key.operation,
            &key.request_id,
            new.cio_segment_id,
            now,
        )
        .await?;
    }
    let created = find(&txn, workspace_id, new.cio_segment_id)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("managed segment just created".into()))?;
    txn.commit().await?;
    Ok(created)
}

async fn find(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
) -> Result<Option<ManagedSegment>, DbErr> {
    Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.eq(cio_segment_id))
        .one(db)
        .await?
        .map(ManagedSegment::try_from)
        .transpose()
}

/// Locks the segment's row until the transaction ends (PostgreSQL; SQLite's write
/// transaction already excludes other writers).
pub(super) async fn lock(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
) -> Result<Option<Model>, DbErr> {
    Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.eq(cio_segment_id))
        .lock_exclusive()
        .one(txn)
        .await
}

/// The managed segment with this Customer.io id.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
) -> Result<Option<ManagedSegment>, DbError> {
    Ok(find(db, workspace_id, cio_segment_id).await?)
}

/// The managed segments among `cio_segment_ids` (unknown ids absent), by Customer.io id.
pub async fn get_many(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_ids: &[i64],
) -> Result<Vec<ManagedSegment>, DbError> {
    if cio_segment_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(crate::sql::id_in(
            db.get_database_backend(),
            Column::CioSegmentId,
            cio_segment_ids,
        ))
        .order_by_asc(Column::CioSegmentId)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(ManagedSegment::try_from)
        .collect::<Result<_, _>>()?)
}

/// Every managed segment of the workspace, by Customer.io id.
pub async fn list(
    db: &impl ConnectionTrait,
    workspace_id: i64,
) -> Result<Vec<ManagedSegment>, DbError> {
    let rows = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .order_by_asc(Column::CioSegmentId)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(ManagedSegment::try_from)
        .collect::<Result<_, _>>()?)
}

/// Segments with criteria that should be evaluated now: marked due, never evaluated, or last
/// evaluated before `stale_before` (criteria with relative times, or reading Customer.io
/// segments, change without any profile changing). By Customer.io id.
pub async fn due(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    stale_before: DateTime<Utc>,
) -> Result<Vec<ManagedSegment>, DbError> {
    let rows = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Criteria.is_not_null())
        .filter(
            sea_orm::Condition::any()
                .add(Column::EvaluationDue.eq(true))
                .add(Column::LastEvaluatedAt.is_null())
                .add(Column::LastEvaluatedAt.lt(db_time(stale_before))),
        )
        .order_by_asc(Column::CioSegmentId)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .filter(|m| m.criteria.as_ref().is_some_and(|c| !c.is_null()))
        .map(ManagedSegment::try_from)
        .collect::<Result<_, _>>()?)
}

/// What [`update`] changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentUpdate {
    pub name: Option<String>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
    /// `Some(Some(c))` sets new criteria (the segment becomes due, its revision moves on);
    /// `Some(None)` removes them (the members stay, now set by hand).
    pub criteria: Option<Option<StoredCriteria>>,
}

/// Applies `changes` to a managed segment. `None` if it does not exist.
pub async fn update(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    changes: &SegmentUpdate,
    now: DateTime<Utc>,
) -> Result<Option<ManagedSegment>, DbError> {
    let now = db_time(now);
    let txn = begin_write(db).await?;
    let Some(current) = lock(&txn, workspace_id, cio_segment_id).await? else {
        return Ok(None);
    };
    let mut row: ActiveModel = current.clone().into();
    if let Some(name) = &changes.name {
        row.name = Set(name.clone());
    }
    if let Some(description) = &changes.description {
        row.description = Set(description.clone());
    }
    if let Some(criteria) = &changes.criteria {
        row.revision = Set(current.revision + 1);
        match criteria {
            Some(c) => {
                row.criteria = Set(Some(c.criteria.clone()));
                row.referenced_attributes = Set(json!(c.referenced_attributes));
                row.referenced_segments = Set(json!(c.referenced_segments));
                row.evaluation_due = Set(true);
            }
            None => {
                row.criteria = Set(None);
                row.referenced_attributes = Set(json!([]));
                row.referenced_segments = Set(json!([]));
                row.evaluation_due = Set(false);
            }
        }
        row.last_evaluation_error = Set(None);
        // New criteria: the recorded membership says nothing about them (full evaluation).
        row.change_watermark = Set(None);
        row.change_snapshot = Set(None);
    }
    row.updated_at = Set(now);
    let stmt = Entity::update(row)
        .validate()?
        .filter(Column::Id.eq(current.id))
        .into_query();
    txn.execute(&stmt).await?;
    let updated = find(&txn, workspace_id, cio_segment_id).await?;
    txn.commit().await?;
    Ok(updated)
}

/// Forgets a managed segment, in one transaction: its definition, its recorded membership, and
/// its row in the segments mirror is marked removed. Outbox rows still queued for it deliver
/// nothing afterwards ([`members_among`](super::members_among) answers `None`). `false` if it
/// did not exist.
pub async fn delete(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let now = db_time(now);
    let txn = begin_write(db).await?;
    let Some(current) = lock(&txn, workspace_id, cio_segment_id).await? else {
        return Ok(false);
    };
    Entity::delete_many()
        .filter(Column::Id.eq(current.id))
        .exec(&txn)
        .await?;
    segment_members::Entity::delete_many()
        .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
        .filter(segment_members::Column::SegmentId.eq(cio_segment_id))
        .exec(&txn)
        .await?;
    segments::Entity::update_many()
        .col_expr(segments::Column::Removed, Expr::value(true))
        .col_expr(segments::Column::RemovedAt, Expr::value(now))
        .col_expr(segments::Column::UpdatedAt, Expr::value(now))
        .filter(segments::Column::WorkspaceId.eq(workspace_id))
        .filter(segments::Column::CioId.eq(cio_segment_id))
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(true)
}

/// Marks due every segment with criteria that reads one of `attributes` (after those changed
/// for some profile). Returns how many segments read them.
///
/// A mark never waits: on PostgreSQL a segment being evaluated (its row held by the evaluation
/// until it commits `evaluation_due = false`) is skipped. That loses nothing: the change is in
/// the change log above the watermark the evaluation records, so the `segment-evaluation` job
/// finds it ([`super::has_changes`]) and evaluates the segment again. (Waiting for the
/// evaluation, as before, made every write call wait for the evaluations of the segments
/// reading what it wrote, one after the other: that capped the write rate.) The mark itself
/// is what the API shows as "evaluation due" and what the job reads first.
pub async fn mark_due_for_attributes(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    attributes: &[&str],
) -> Result<u64, DbError> {
    if attributes.is_empty() {
        return Ok(0);
    }
    let changed: HashSet<&str> = attributes.iter().copied().collect();
    let ids: Vec<i64> = readers(db, workspace_id)
        .await?
        .into_iter()
        .filter(|s| s.attributes.iter().any(|a| changed.contains(a.as_str())))
        .map(|s| s.id)
        .collect();
    mark_ids_due(db, &ids).await?;
    Ok(ids.len() as u64)
}

/// Marks due every segment with criteria (after a bulk import replaced profiles), without
/// waiting, as [`mark_due_for_attributes`]. Returns how many.
pub async fn mark_all_due(db: &impl ConnectionTrait, workspace_id: i64) -> Result<u64, DbError> {
    let ids: Vec<i64> = readers(db, workspace_id)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    mark_ids_due(db, &ids).await?;
    Ok(ids.len() as u64)
}

/// Marks one segment due (if it has criteria). `false` if there is no such segment.
pub async fn mark_due(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
) -> Result<bool, DbError> {
    let found = Entity::update_many()
        .col_expr(Column::EvaluationDue, Expr::value(true))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.eq(cio_segment_id))
        .filter(Column::Criteria.is_not_null())
        .exec(db)
        .await?
        .rows_affected;
    Ok(found > 0)
}

/// A segment with criteria, as the due marks need it.
struct Reader {
    /// Row id.
    id: i64,
    attributes: Vec<String>,
    segments: Vec<i64>,
}

/// The workspace's segments with criteria and what they read.
async fn readers(db: &impl ConnectionTrait, workspace_id: i64) -> Result<Vec<Reader>, DbErr> {
    let rows: Vec<(i64, Value, Value)> = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::ReferencedAttributes)
        .column(Column::ReferencedSegments)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Criteria.is_not_null())
        .order_by_asc(Column::Id)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, attrs, segs)| Reader {
            id,
            attributes: serde_json::from_value(attrs).unwrap_or_default(),
            segments: serde_json::from_value(segs).unwrap_or_default(),
        })
        .collect())
}

/// `evaluation_due = true` for those of `ids` not yet due, in one statement that waits for
/// nobody: PostgreSQL skips the rows a running evaluation holds (see
/// [`mark_due_for_attributes`]); SQLite has one writer at a time.
async fn mark_ids_due(db: &impl ConnectionTrait, ids: &[i64]) -> Result<(), DbErr> {
    if ids.is_empty() {
        return Ok(());
    }
    let backend = db.get_database_backend();
    let mut b = SqlBuilder::new(backend);
    b.sql("UPDATE managed_segments SET evaluation_due = TRUE WHERE id IN (SELECT m.id FROM managed_segments m WHERE m.criteria IS NOT NULL AND NOT m.evaluation_due AND m.id IN (");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            b.sql(", ");
        }
        b.param(*id);
    }
    b.sql(")");
    if backend == DbBackend::Postgres {
        b.sql(" FOR UPDATE SKIP LOCKED");
    }
    b.sql(")");
    db.execute_raw(b.build()).await?;
    Ok(())
}

/// Marks due the segments whose criteria read the membership of one of `cio_segment_ids`
/// (it changed), inside the caller's transaction, without waiting, as
/// [`mark_due_for_attributes`].
pub(super) async fn mark_dependents_due(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_ids: &[i64],
) -> Result<(), DbErr> {
    if cio_segment_ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = readers(txn, workspace_id)
        .await?
        .into_iter()
        .filter(|s| s.segments.iter().any(|id| cio_segment_ids.contains(id)))
        .map(|s| s.id)
        .collect();
    mark_ids_due(txn, &ids).await
}
