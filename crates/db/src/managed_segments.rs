//! SharpSend-managed segments: their definitions, their membership, evaluation, and the mirror
//! of Customer.io memberships that criteria read.
//!
//! - Definitions: [`create`], [`get`], [`get_many`], [`list`], [`update`], [`delete`];
//!   [`due`] lists the segments to evaluate; [`mark_due_for_attributes`], [`mark_all_due`] and
//!   [`mark_due`] flag them after profile changes.
//! - Evaluation: [`apply_evaluation`] computes, inside the database, who now matches a
//!   [`Filter`] and who no longer does, and in ONE transaction records the new membership
//!   (`segment_members`), queues the difference in the outbox as `segment_add` /
//!   `segment_remove` rows of at most [`IDS_PER_ROW`] ids, and updates the counts. Profiles are
//!   never loaded into memory: the difference goes from `SELECT` to `INSERT` in SQL
//!   (PostgreSQL: one statement with data-modifying CTEs, so everything reads one snapshot;
//!   SQLite: statements in a write transaction no other writer can interleave with).
//! - Manual membership: [`add_members`] / [`remove_members`] (segments without criteria), same
//!   transaction rule.
//! - Delivery support: [`members_among`] tells the outbox worker which of a row's ids are still
//!   members, so that a change delivered late (a retry, a re-queued dead letter) never undoes a
//!   newer one: an add is sent only for people still members, a remove only for people still
//!   not members.
//! - Mirrored memberships: [`replace_mirrored_membership`] stores the members of a Customer.io
//!   segment (read by the caller from Customer.io) for criteria that reference it;
//!   [`membership_synced_at`] tells when each was last stored.
//!
//! The membership of a managed segment lives in `segment_members` under its Customer.io id, the
//! same table as mirrored memberships, so a criteria condition "member of segment N" is one
//! `EXISTS` probe whichever kind N is.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement, TransactionSession, TransactionTrait,
};
use serde_json::{Value, json};

use crate::DbError;
use crate::criteria_sql::{Filter, SqlBuilder};
use crate::database::begin_write;
use crate::entities::managed_segments::{ActiveModel, Column, Entity, Model};
use crate::entities::{outbox, segment_member_syncs, segment_members, segments};
use crate::outbox::{Kind, Status};
use crate::sql::text_in;
use crate::time::db_time;

/// Customer.io's limit of ids per `add_customers` / `remove_customers` call, hence per outbox
/// row.
pub const IDS_PER_ROW: usize = 1000;
/// Rows per multi-row insert into `segment_members` (three values each).
const MEMBER_CHUNK: usize = 1000;

/// The `customer_id` of a segment outbox row: `segment:<Customer.io segment id>`.
pub fn outbox_label(cio_segment_id: i64) -> String {
    format!("segment:{cio_segment_id}")
}

/// The outcome of the last evaluation of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub evaluated_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub added: i64,
    pub removed: i64,
}

/// A managed segment, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedSegment {
    pub workspace_id: i64,
    /// The manual segment in Customer.io.
    pub cio_segment_id: i64,
    pub name: String,
    pub description: Option<String>,
    /// Criteria in their JSON form (opaque here); `None`: members are set by hand.
    pub criteria: Option<Value>,
    pub referenced_attributes: Vec<String>,
    pub referenced_segments: Vec<i64>,
    /// Bumped whenever the criteria change.
    pub revision: i64,
    /// Members as SharpSend recorded them (changes may still be on their way to Customer.io).
    pub member_count: i64,
    pub evaluation_due: bool,
    pub last_evaluation: Option<Evaluation>,
    /// Why the last attempt to evaluate failed (cleared by a successful evaluation).
    pub last_evaluation_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TryFrom<Model> for ManagedSegment {
    type Error = DbErr;

    fn try_from(m: Model) -> Result<Self, DbErr> {
        let referenced_attributes: Vec<String> = serde_json::from_value(m.referenced_attributes)
            .map_err(|e| DbErr::Json(e.to_string()))?;
        let referenced_segments: Vec<i64> = serde_json::from_value(m.referenced_segments)
            .map_err(|e| DbErr::Json(e.to_string()))?;
        let last_evaluation = m.last_evaluated_at.map(|evaluated_at| Evaluation {
            evaluated_at,
            duration_ms: m.last_evaluation_ms.unwrap_or(0),
            added: m.last_added.unwrap_or(0),
            removed: m.last_removed.unwrap_or(0),
        });
        Ok(Self {
            workspace_id: m.workspace_id,
            cio_segment_id: m.cio_segment_id,
            name: m.name,
            description: m.description,
            criteria: m.criteria.filter(|c| !c.is_null()),
            referenced_attributes,
            referenced_segments,
            revision: m.revision,
            member_count: m.member_count,
            evaluation_due: m.evaluation_due,
            last_evaluation,
            last_evaluation_error: m.last_evaluation_error,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

/// Criteria and what they read.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCriteria {
    /// The criteria's JSON form.
    pub criteria: Value,
    pub referenced_attributes: Vec<String>,
    pub referenced_segments: Vec<i64>,
}

/// A managed segment to record (its Customer.io segment already exists).
#[derive(Debug, Clone, PartialEq)]
pub struct NewManagedSegment {
    pub cio_segment_id: i64,
    pub name: String,
    pub description: Option<String>,
    pub criteria: Option<StoredCriteria>,
}

/// Records a managed segment and its row in the segments mirror (a manual segment with no
/// members yet), in one transaction. A segment with criteria starts due for evaluation.
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
async fn lock(
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
/// nothing afterwards ([`members_among`] answers `None`). `false` if it did not exist.
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
/// for some profile). Returns how many were newly marked. A handful of rows: read, filtered
/// here, one update.
pub async fn mark_due_for_attributes(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    attributes: &[&str],
) -> Result<u64, DbError> {
    if attributes.is_empty() {
        return Ok(0);
    }
    let changed: HashSet<&str> = attributes.iter().copied().collect();
    let candidates: Vec<(i64, Value)> = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::ReferencedAttributes)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Criteria.is_not_null())
        .filter(Column::EvaluationDue.eq(false))
        .into_tuple()
        .all(db)
        .await?;
    let ids: Vec<i64> = candidates
        .into_iter()
        .filter(|(_, refs)| {
            refs.as_array().is_some_and(|names| {
                names
                    .iter()
                    .any(|n| n.as_str().is_some_and(|n| changed.contains(n)))
            })
        })
        .map(|(id, _)| id)
        .collect();
    mark_ids_due(db, &ids).await
}

/// Marks due every segment with criteria (after a bulk import replaced profiles).
pub async fn mark_all_due(db: &impl ConnectionTrait, workspace_id: i64) -> Result<u64, DbError> {
    Ok(Entity::update_many()
        .col_expr(Column::EvaluationDue, Expr::value(true))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Criteria.is_not_null())
        .filter(Column::EvaluationDue.eq(false))
        .exec(db)
        .await?
        .rows_affected)
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

async fn mark_ids_due(db: &impl ConnectionTrait, ids: &[i64]) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(Entity::update_many()
        .col_expr(Column::EvaluationDue, Expr::value(true))
        .filter(crate::sql::id_in(
            db.get_database_backend(),
            Column::Id,
            ids,
        ))
        .exec(db)
        .await?
        .rows_affected)
}

/// Marks due the segments whose criteria read `cio_segment_id`'s membership (it changed).
async fn mark_dependents_due(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
) -> Result<(), DbErr> {
    let candidates: Vec<(i64, Value)> = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::ReferencedSegments)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Criteria.is_not_null())
        .filter(Column::EvaluationDue.eq(false))
        .into_tuple()
        .all(txn)
        .await?;
    let ids: Vec<i64> = candidates
        .into_iter()
        .filter(|(_, refs)| {
            refs.as_array()
                .is_some_and(|ids| ids.iter().any(|v| v.as_i64() == Some(cio_segment_id)))
        })
        .map(|(id, _)| id)
        .collect();
    if !ids.is_empty() {
        Entity::update_many()
            .col_expr(Column::EvaluationDue, Expr::value(true))
            .filter(crate::sql::id_in(
                txn.get_database_backend(),
                Column::Id,
                &ids,
            ))
            .exec(txn)
            .await?;
    }
    Ok(())
}

/// Records why evaluating a segment failed (it stays due).
pub async fn record_evaluation_error(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    error: &str,
) -> Result<(), DbError> {
    Entity::update_many()
        .col_expr(Column::LastEvaluationError, Expr::value(error))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.eq(cio_segment_id))
        .exec(db)
        .await?;
    Ok(())
}

/// What one evaluation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvaluationOutcome {
    /// People who now match and were not members.
    pub added: u64,
    /// Members who no longer match.
    pub removed: u64,
    /// Members after the evaluation.
    pub member_count: i64,
    /// Outbox rows queued (`segment_add` and `segment_remove`, at most 1000 ids each).
    pub outbox_rows: u64,
    pub duration_ms: i64,
}

/// What [`apply_evaluation`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done(EvaluationOutcome),
    /// The segment was deleted, lost its criteria, or its criteria changed (`revision`) since
    /// `filter` was built: nothing was written.
    Stale,
}

/// Evaluates `filter` (the segment's criteria at `revision`) over the workspace's profiles and
/// applies the result, in ONE transaction: records who now matches as members and who no
/// longer does as non-members, queues the difference in the outbox (`segment_add` /
/// `segment_remove`, ids sorted, at most [`IDS_PER_ROW`] per row, due at `now`), updates the
/// member counts (managed segment and segments mirror), clears `evaluation_due`, records the
/// evaluation, and marks due the segments whose criteria read this one. A crash before the
/// commit leaves everything as it was (the segment still due); after it, every change is in
/// the outbox.
pub async fn apply_evaluation(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    revision: i64,
    filter: &Filter,
    now: DateTime<Utc>,
) -> Result<Applied, DbError> {
    let started = Instant::now();
    let now = db_time(now);
    let txn = begin_write(db).await?;
    let current = match lock(&txn, workspace_id, cio_segment_id).await? {
        Some(m) if m.revision == revision && m.criteria.as_ref().is_some_and(|c| !c.is_null()) => m,
        _ => return Ok(Applied::Stale),
    };
    let ctx = DiffContext {
        workspace_id,
        segment_id: cio_segment_id,
        now,
    };
    let (added, removed, outbox_rows) = match txn.get_database_backend() {
        DbBackend::Postgres => apply_postgres(&txn, &ctx, filter).await?,
        _ => apply_sqlite(&txn, &ctx, filter).await?,
    };
    let member_count = current.member_count + to_i64(added) - to_i64(removed);
    let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    Entity::update_many()
        .col_expr(Column::MemberCount, Expr::value(member_count))
        .col_expr(Column::EvaluationDue, Expr::value(false))
        .col_expr(Column::LastEvaluatedAt, Expr::value(now))
        .col_expr(Column::LastEvaluationMs, Expr::value(duration_ms))
        .col_expr(Column::LastAdded, Expr::value(to_i64(added)))
        .col_expr(Column::LastRemoved, Expr::value(to_i64(removed)))
        .col_expr(Column::LastEvaluationError, Expr::value(None::<String>))
        .filter(Column::Id.eq(current.id))
        .exec(&txn)
        .await?;
    set_mirror_count(&txn, workspace_id, cio_segment_id, member_count, now).await?;
    if added + removed > 0 {
        mark_dependents_due(&txn, workspace_id, cio_segment_id).await?;
    }
    txn.commit().await?;
    let outcome = EvaluationOutcome {
        added,
        removed,
        member_count,
        outbox_rows,
        duration_ms,
    };
    tracing::debug!(workspace_id, cio_segment_id, ?outcome, "segment evaluated");
    Ok(Applied::Done(outcome))
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn set_mirror_count(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    member_count: i64,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    segments::Entity::update_many()
        .col_expr(segments::Column::MemberCount, Expr::value(member_count))
        .col_expr(segments::Column::CountedAt, Expr::value(now))
        .col_expr(segments::Column::UpdatedAt, Expr::value(now))
        .filter(segments::Column::WorkspaceId.eq(workspace_id))
        .filter(segments::Column::CioId.eq(cio_segment_id))
        .exec(txn)
        .await?;
    Ok(())
}

struct DiffContext {
    workspace_id: i64,
    segment_id: i64,
    now: DateTime<Utc>,
}

impl DiffContext {
    /// `SELECT p.customer_id FROM profiles p WHERE … matches AND NOT a member`.
    fn additions(&self, b: &mut SqlBuilder, filter: &Filter) {
        b.sql("SELECT p.customer_id FROM profiles p WHERE p.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND ");
        b.filter(filter, "p");
        b.sql(" AND NOT EXISTS (SELECT 1 FROM segment_members x WHERE x.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND x.segment_id = ")
            .param(self.segment_id)
            .sql(" AND x.customer_id = p.customer_id)");
    }

    /// `NOT EXISTS (a matching profile for <member>.customer_id)`.
    fn no_longer_matches(&self, b: &mut SqlBuilder, filter: &Filter, member: &str) {
        b.sql("NOT EXISTS (SELECT 1 FROM profiles p WHERE p.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND p.customer_id = ")
            .sql(member)
            .sql(".customer_id AND ");
        b.filter(filter, "p");
        b.sql(")");
    }

    /// `SELECT x.customer_id FROM segment_members x WHERE … member AND no longer matches`.
    fn removals(&self, b: &mut SqlBuilder, filter: &Filter) {
        b.sql("SELECT x.customer_id FROM segment_members x WHERE x.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND x.segment_id = ")
            .param(self.segment_id)
            .sql(" AND ");
        self.no_longer_matches(b, filter, "x");
    }

    /// `INSERT INTO outbox … SELECT` one row per 1000 ids of `source` (a query or CTE name
    /// with a `customer_id` column).
    fn queue(&self, b: &mut SqlBuilder, kind: Kind, source: impl FnOnce(&mut SqlBuilder)) {
        let postgres = b.backend() == DbBackend::Postgres;
        b.sql(
            "INSERT INTO outbox (workspace_id, kind, customer_id, payload, status, attempts, \
             next_attempt_at, created_at) SELECT ",
        )
        .param(self.workspace_id)
        .sql(", ")
        .param(kind.as_str())
        .sql(", ")
        .param(outbox_label(self.segment_id))
        .sql(", ");
        if postgres {
            b.sql("jsonb_build_object('segment_id', ")
                .param(self.segment_id)
                .sql("::bigint, 'ids', jsonb_agg(c.customer_id ORDER BY c.customer_id))");
        } else {
            b.sql("json_object('segment_id', ")
                .param(self.segment_id)
                .sql(", 'ids', json_group_array(c.customer_id ORDER BY c.customer_id))");
        }
        b.sql(", ")
            .param(Status::Pending.as_str())
            .sql(", 0, ")
            .param(self.now)
            .sql(", ")
            .param(self.now)
            .sql(" FROM (SELECT s.customer_id, (ROW_NUMBER() OVER (ORDER BY s.customer_id) - 1) / ")
            .sql(&IDS_PER_ROW.to_string())
            .sql(" AS chunk FROM (");
        source(b);
        b.sql(") s) c GROUP BY c.chunk ORDER BY c.chunk");
    }
}

/// PostgreSQL: one statement, so that every part reads the same snapshot of the profiles.
async fn apply_postgres(
    txn: &impl ConnectionTrait,
    ctx: &DiffContext,
    filter: &Filter,
) -> Result<(u64, u64, u64), DbErr> {
    let mut b = SqlBuilder::new(DbBackend::Postgres);
    b.sql("WITH added AS (INSERT INTO segment_members (workspace_id, segment_id, customer_id) SELECT ")
        .param(ctx.workspace_id)
        .sql(", ")
        .param(ctx.segment_id)
        .sql(", a.customer_id FROM (");
    ctx.additions(&mut b, filter);
    b.sql(") a RETURNING customer_id), removed AS (DELETE FROM segment_members x WHERE x.workspace_id = ")
        .param(ctx.workspace_id)
        .sql(" AND x.segment_id = ")
        .param(ctx.segment_id)
        .sql(" AND ");
    ctx.no_longer_matches(&mut b, filter, "x");
    b.sql(" RETURNING x.customer_id), queued_adds AS (");
    ctx.queue(&mut b, Kind::SegmentAdd, |b| {
        b.sql("SELECT customer_id FROM added");
    });
    b.sql(" RETURNING id), queued_removes AS (");
    ctx.queue(&mut b, Kind::SegmentRemove, |b| {
        b.sql("SELECT customer_id FROM removed");
    });
    b.sql(
        " RETURNING id) SELECT (SELECT COUNT(*) FROM added) AS added, \
         (SELECT COUNT(*) FROM removed) AS removed, \
         (SELECT COUNT(*) FROM queued_adds) + (SELECT COUNT(*) FROM queued_removes) AS rows",
    );
    let row = txn
        .query_one_raw(b.build())
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("evaluation counts".into()))?;
    let count = |name: &str| -> Result<u64, DbErr> {
        let n: i64 = row.try_get("", name)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok((count("added")?, count("removed")?, count("rows")?))
}

/// SQLite: the write transaction keeps every other writer out, so its statements all see the
/// same profiles. The criteria are evaluated once per direction: the difference is queued in the
/// outbox first, then the membership is updated from the ids of the rows just queued (the
/// outbox rows above `before`, which only this transaction can have written).
async fn apply_sqlite(
    txn: &impl ConnectionTrait,
    ctx: &DiffContext,
    filter: &Filter,
) -> Result<(u64, u64, u64), DbErr> {
    let backend = DbBackend::Sqlite;
    let before: i64 = txn
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT COALESCE(MAX(id), 0) AS n FROM outbox",
        ))
        .await?
        .map(|row| row.try_get("", "n"))
        .transpose()?
        .unwrap_or(0);
    let mut rows = 0;
    let mut b = SqlBuilder::new(backend);
    ctx.queue(&mut b, Kind::SegmentAdd, |b| ctx.additions(b, filter));
    rows += txn.execute_raw(b.build()).await?.rows_affected();
    let mut b = SqlBuilder::new(backend);
    ctx.queue(&mut b, Kind::SegmentRemove, |b| ctx.removals(b, filter));
    rows += txn.execute_raw(b.build()).await?.rows_affected();

    let queued = |b: &mut SqlBuilder, kind: Kind| {
        b.sql("SELECT j.value FROM outbox o, json_each(o.payload, '$.ids') j WHERE o.id > ")
            .param(before)
            .sql(" AND o.workspace_id = ")
            .param(ctx.workspace_id)
            .sql(" AND o.kind = ")
            .param(kind.as_str())
            .sql(" AND o.customer_id = ")
            .param(outbox_label(ctx.segment_id));
    };
    let mut b = SqlBuilder::new(backend);
    b.sql("INSERT INTO segment_members (workspace_id, segment_id, customer_id) SELECT ")
        .param(ctx.workspace_id)
        .sql(", ")
        .param(ctx.segment_id)
        .sql(", q.value FROM (");
    queued(&mut b, Kind::SegmentAdd);
    b.sql(") q");
    let added = txn.execute_raw(b.build()).await?.rows_affected();

    let mut b = SqlBuilder::new(backend);
    b.sql("DELETE FROM segment_members WHERE workspace_id = ")
        .param(ctx.workspace_id)
        .sql(" AND segment_id = ")
        .param(ctx.segment_id)
        .sql(" AND customer_id IN (");
    queued(&mut b, Kind::SegmentRemove);
    b.sql(")");
    let removed = txn.execute_raw(b.build()).await?.rows_affected();
    Ok((added, removed, rows))
}

/// What [`add_members`] / [`remove_members`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// People whose recorded membership changed (new members, or members removed).
    pub changed: u64,
    /// Distinct ids queued for Customer.io (all of them: adding a member again is harmless
    /// and repairs a membership Customer.io lost).
    pub queued_ids: u64,
    pub outbox_rows: u64,
    pub member_count: i64,
}

/// What happened to a manual membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManualChange {
    Done(MembershipChange),
    /// No managed segment with this id.
    NotFound,
    /// The segment has criteria: its membership is computed, not set by hand.
    HasCriteria,
}

/// Adds people to a managed segment without criteria, in one transaction: records them as
/// members and queues `segment_add` rows (at most 1000 ids each) for every distinct id given.
pub async fn add_members(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[String],
    now: DateTime<Utc>,
) -> Result<ManualChange, DbError> {
    change_members(db, workspace_id, cio_segment_id, customer_ids, true, now).await
}

/// Removes people from a managed segment without criteria (as [`add_members`], with
/// `segment_remove` rows).
pub async fn remove_members(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[String],
    now: DateTime<Utc>,
) -> Result<ManualChange, DbError> {
    change_members(db, workspace_id, cio_segment_id, customer_ids, false, now).await
}

async fn change_members(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[String],
    add: bool,
    now: DateTime<Utc>,
) -> Result<ManualChange, DbError> {
    let now = db_time(now);
    let ids: Vec<&str> = customer_ids
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let txn = begin_write(db).await?;
    let current = match lock(&txn, workspace_id, cio_segment_id).await? {
        None => return Ok(ManualChange::NotFound),
        Some(m) if m.criteria.as_ref().is_some_and(|c| !c.is_null()) => {
            return Ok(ManualChange::HasCriteria);
        }
        Some(m) => m,
    };
    let backend = txn.get_database_backend();
    let mut changed = 0;
    for chunk in ids.chunks(MEMBER_CHUNK) {
        if add {
            let rows = chunk.iter().map(|id| segment_members::ActiveModel {
                workspace_id: Set(workspace_id),
                segment_id: Set(cio_segment_id),
                customer_id: Set((*id).to_owned()),
            });
            let stmt = segment_members::Entity::insert_many(rows)
                .on_conflict(
                    OnConflict::columns([
                        segment_members::Column::WorkspaceId,
                        segment_members::Column::SegmentId,
                        segment_members::Column::CustomerId,
                    ])
                    .do_nothing()
                    .to_owned(),
                )
                .into_query();
            changed += txn.execute(&stmt).await?.rows_affected();
        } else {
            changed += segment_members::Entity::delete_many()
                .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
                .filter(segment_members::Column::SegmentId.eq(cio_segment_id))
                .filter(text_in(backend, segment_members::Column::CustomerId, chunk))
                .exec(&txn)
                .await?
                .rows_affected;
        }
    }
    let kind = if add {
        Kind::SegmentAdd
    } else {
        Kind::SegmentRemove
    };
    let rows: Vec<outbox::ActiveModel> = ids
        .chunks(IDS_PER_ROW)
        .map(|chunk| outbox_row(workspace_id, cio_segment_id, kind, chunk, now))
        .collect();
    let outbox_rows = rows.len() as u64;
    for chunk in rows.chunks(100) {
        let stmt = outbox::Entity::insert_many(chunk.to_vec()).into_query();
        txn.execute(&stmt).await?;
    }
    let member_count = if add {
        current.member_count + to_i64(changed)
    } else {
        current.member_count - to_i64(changed)
    };
    Entity::update_many()
        .col_expr(Column::MemberCount, Expr::value(member_count))
        .filter(Column::Id.eq(current.id))
        .exec(&txn)
        .await?;
    set_mirror_count(&txn, workspace_id, cio_segment_id, member_count, now).await?;
    if changed > 0 {
        mark_dependents_due(&txn, workspace_id, cio_segment_id).await?;
    }
    txn.commit().await?;
    Ok(ManualChange::Done(MembershipChange {
        changed,
        queued_ids: ids.len() as u64,
        outbox_rows,
        member_count,
    }))
}

fn outbox_row(
    workspace_id: i64,
    cio_segment_id: i64,
    kind: Kind,
    ids: &[&str],
    now: DateTime<Utc>,
) -> outbox::ActiveModel {
    outbox::ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        kind: Set(kind.as_str().to_owned()),
        customer_id: Set(outbox_label(cio_segment_id)),
        payload: Set(json!({ "segment_id": cio_segment_id, "ids": ids })),
        event_id: Set(None),
        idempotency_key: Set(None),
        status: Set(Status::Pending.as_str().to_owned()),
        attempts: Set(0),
        next_attempt_at: Set(now),
        claimed_by: NotSet,
        claim_expires_at: NotSet,
        last_error: NotSet,
        last_attempt_at: NotSet,
        created_at: Set(now),
        delivered_at: NotSet,
    }
}

/// The ids among `customer_ids` that are recorded members of managed segment
/// `cio_segment_id`; `None` when it is not (or no longer) a managed segment.
pub async fn members_among(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[&str],
) -> Result<Option<HashSet<String>>, DbError> {
    let managed = Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.eq(cio_segment_id))
        .into_tuple::<i64>()
        .one(db)
        .await?;
    if managed.is_none() {
        return Ok(None);
    }
    let backend = db.get_database_backend();
    let mut members = HashSet::new();
    for chunk in customer_ids.chunks(MEMBER_CHUNK) {
        let found: Vec<String> = segment_members::Entity::find()
            .select_only()
            .column(segment_members::Column::CustomerId)
            .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
            .filter(segment_members::Column::SegmentId.eq(cio_segment_id))
            .filter(text_in(backend, segment_members::Column::CustomerId, chunk))
            .into_tuple()
            .all(db)
            .await?;
        members.extend(found);
    }
    Ok(Some(members))
}

/// Members recorded (or mirrored) for a segment, in `customer_id` order, after `after`, at most
/// `limit`.
pub async fn members_page(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    segment_id: i64,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<String>, DbError> {
    let mut query = segment_members::Entity::find()
        .select_only()
        .column(segment_members::Column::CustomerId)
        .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
        .filter(segment_members::Column::SegmentId.eq(segment_id));
    if let Some(after) = after {
        query = query.filter(segment_members::Column::CustomerId.gt(after));
    }
    Ok(query
        .order_by_asc(segment_members::Column::CustomerId)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Replaces the mirrored membership of Customer.io segment `segment_id` with `customer_ids`
/// (as just read from Customer.io), in one transaction, and records when. Refuses (`None`) a
/// managed segment: its membership is SharpSend's own record. Returns the member count.
pub async fn replace_mirrored_membership(
    db: &impl TransactionTrait,
    workspace_id: i64,
    segment_id: i64,
    customer_ids: &[String],
    now: DateTime<Utc>,
) -> Result<Option<u64>, DbError> {
    let now = db_time(now);
    let ids: BTreeSet<&str> = customer_ids
        .iter()
        .map(String::as_str)
        .filter(|id| !id.is_empty())
        .collect();
    let ids: Vec<&str> = ids.into_iter().collect();
    let txn = begin_write(db).await?;
    if lock(&txn, workspace_id, segment_id).await?.is_some() {
        return Ok(None);
    }
    segment_members::Entity::delete_many()
        .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
        .filter(segment_members::Column::SegmentId.eq(segment_id))
        .exec(&txn)
        .await?;
    for chunk in ids.chunks(MEMBER_CHUNK) {
        let rows = chunk.iter().map(|id| segment_members::ActiveModel {
            workspace_id: Set(workspace_id),
            segment_id: Set(segment_id),
            customer_id: Set((*id).to_owned()),
        });
        let stmt = segment_members::Entity::insert_many(rows).into_query();
        txn.execute(&stmt).await?;
    }
    let count = ids.len() as u64;
    let sync = segment_member_syncs::ActiveModel {
        workspace_id: Set(workspace_id),
        segment_id: Set(segment_id),
        synced_at: Set(now),
        member_count: Set(to_i64(count)),
    };
    let stmt = segment_member_syncs::Entity::insert(sync)
        .on_conflict(
            OnConflict::columns([
                segment_member_syncs::Column::WorkspaceId,
                segment_member_syncs::Column::SegmentId,
            ])
            .update_columns([
                segment_member_syncs::Column::SyncedAt,
                segment_member_syncs::Column::MemberCount,
            ])
            .to_owned(),
        )
        .into_query();
    txn.execute(&stmt).await?;
    txn.commit().await?;
    Ok(Some(count))
}

/// When the membership of each of `segment_ids` was last mirrored (absent: never).
pub async fn membership_synced_at(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    segment_ids: &[i64],
) -> Result<HashMap<i64, DateTime<Utc>>, DbError> {
    if segment_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, DateTime<Utc>)> = segment_member_syncs::Entity::find()
        .select_only()
        .column(segment_member_syncs::Column::SegmentId)
        .column(segment_member_syncs::Column::SyncedAt)
        .filter(segment_member_syncs::Column::WorkspaceId.eq(workspace_id))
        .filter(crate::sql::id_in(
            db.get_database_backend(),
            segment_member_syncs::Column::SegmentId,
            segment_ids,
        ))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}
