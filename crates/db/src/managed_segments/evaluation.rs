//! Evaluation: the membership difference computed inside the database and applied, with its
//! outbox rows and counts, in one transaction (one statement on PostgreSQL, a write transaction
//! on SQLite).

use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, Statement,
    TransactionSession, TransactionTrait,
};

use super::definitions::{lock, mark_dependents_due};
use super::{IDS_PER_ROW, outbox_label};
use crate::DbError;
use crate::criteria_sql::{Filter, SqlBuilder};
use crate::database::begin_write;
use crate::entities::managed_segments::{Column, Entity};
use crate::entities::segments;
use crate::outbox::{Kind, Status};
use crate::time::db_time;

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

pub(super) fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) async fn set_mirror_count(
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
