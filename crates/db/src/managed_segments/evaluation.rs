//! Evaluation: the membership difference computed inside the database and applied, with its
//! outbox rows and counts, in one transaction (one statement on PostgreSQL, a write transaction
//! on SQLite).
//!
//! An evaluation is full (every profile of the workspace) or incremental ([`Scope`]): only the
//! people who may have changed since the segment's last evaluation are re-checked — those in
//! the `profile_changes` log from the segment's watermark on (profile writes, and membership
//! changes of the segments the criteria read), and those whose time attribute lies in a window
//! the clock moved a relative-time condition across. Everyone else keeps their membership.
//! Each evaluation records the log position it read up to ([`current_watermark`]).
//! [`Scope::Check`] is a full evaluation that also counts as drift the membership changes an
//! incremental one would have missed (people outside its re-check set).
//! [`prune_changes`] drops the log below every segment's watermark.

use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QuerySelect,
    Statement, TransactionSession, TransactionTrait,
};

use super::definitions::{lock, mark_dependents_due};
use super::{IDS_PER_ROW, outbox_label};
use crate::DbError;
use crate::criteria_sql::{Filter, SqlBuilder, TimeWindow};
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
    /// Whether only the changed people were re-checked.
    pub incremental: bool,
    /// [`Scope::Check`]: how many memberships it changed for people an incremental evaluation
    /// would not have re-checked (0: no drift). `None` for other evaluations.
    pub drift: Option<u64>,
}

/// Which people an evaluation re-checks.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// Every profile of the workspace.
    Full,
    /// Only people who may have changed since the segment's last evaluation, which ran at
    /// `since` (the segment's `last_evaluated_at`): those logged in `profile_changes` from the
    /// segment's watermark on, and those with a value in one of `windows`. Falls back to a
    /// full evaluation when the segment has no watermark; answers [`Applied::Stale`] when the
    /// segment was evaluated again since `since` (`windows` would be wrong).
    Incremental {
        since: DateTime<Utc>,
        windows: Vec<TimeWindow>,
    },
    /// A full evaluation that checks the incremental ones: as [`Scope::Full`], and counts as
    /// drift the changes of people [`Scope::Incremental`] with the same `since` and `windows`
    /// would not have re-checked.
    Check {
        since: DateTime<Utc>,
        windows: Vec<TimeWindow>,
    },
}

/// What [`apply_evaluation`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done(EvaluationOutcome),
    /// The segment was deleted, lost its criteria, its criteria changed (`revision`) since
    /// `filter` was built, or (incremental) it was evaluated since `since`: nothing was
    /// written.
    Stale,
}

/// Evaluates `filter` (the segment's criteria at `revision`) over the workspace's profiles and
/// applies the result, in ONE transaction: records who now matches as members and who no
/// longer does as non-members, queues the difference in the outbox (`segment_add` /
/// `segment_remove`, ids sorted, at most [`IDS_PER_ROW`] per row, due at `now`), updates the
/// member counts (managed segment and segments mirror), clears `evaluation_due`, records the
/// evaluation, and marks due the segments whose criteria read this one. A crash before the
/// commit leaves everything as it was (the segment still due); after it, every change is in
/// the outbox. `scope` chooses who is re-checked (see [`Scope`]).
pub async fn apply_evaluation(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    revision: i64,
    filter: &Filter,
    scope: &Scope,
    now: DateTime<Utc>,
) -> Result<Applied, DbError> {
    let started = Instant::now();
    let now = db_time(now);
    let txn = begin_write(db).await?;
    let current = match lock(&txn, workspace_id, cio_segment_id).await? {
        Some(m) if m.revision == revision && m.criteria.as_ref().is_some_and(|c| !c.is_null()) => m,
        _ => return Ok(Applied::Stale),
    };
    // Read before the difference: every change below it is visible to what follows.
    let watermark = current_watermark(&txn).await?;
    let changes = match (scope, current.change_watermark) {
        (Scope::Incremental { since, windows } | Scope::Check { since, windows }, Some(from)) => {
            if current.last_evaluated_at != Some(db_time(*since)) {
                return Ok(Applied::Stale);
            }
            Some(Changes {
                from: Watermark {
                    position: from,
                    snapshot: current.change_snapshot.clone(),
                },
                segments: filter.segments(),
                windows: windows.clone(),
            })
        }
        _ => None,
    };
    let incremental = changes.is_some() && matches!(scope, Scope::Incremental { .. });
    let check = changes.is_some() && matches!(scope, Scope::Check { .. });
    let mut ctx = DiffContext {
        workspace_id,
        segment_id: cio_segment_id,
        now,
        changes,
        full: !incremental,
        recheck: None,
    };
    ctx.recheck = recheck_set(&txn, &ctx).await?;
    let nothing_to_do = incremental && ctx.recheck.as_ref().is_some_and(|r| r.len == 0);
    let (added, removed, outbox_rows, drift) = match txn.get_database_backend() {
        _ if nothing_to_do => (0, 0, 0, 0),
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
        .col_expr(Column::ChangeWatermark, Expr::value(watermark.position))
        .col_expr(Column::ChangeSnapshot, Expr::value(watermark.snapshot))
        .col_expr(
            Column::LastFullAt,
            Expr::value(if incremental {
                current.last_full_at
            } else {
                Some(now)
            }),
        )
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
        incremental,
        drift: check.then_some(drift),
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

/// Where a reader stands in the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watermark {
    /// Changes below it were all seen.
    pub position: i64,
    /// PostgreSQL: of the changes at or above `position`, those of the transactions this
    /// snapshot shows as committed were seen too.
    pub snapshot: Option<String>,
}

impl Watermark {
    /// ` AND <alias>.pos …`: the log rows not yet seen from this watermark.
    fn unseen(&self, b: &mut SqlBuilder, alias: &str) {
        b.sql(" AND ")
            .sql(alias)
            .sql(".pos >= ")
            .param(self.position);
        if let Some(snapshot) = &self.snapshot {
            b.sql(" AND NOT pg_visible_in_snapshot(")
                .sql(alias)
                .sql(".pos::text::xid8, CAST(")
                .param(snapshot.as_str())
                .sql(" AS pg_snapshot))");
        }
    }
}

/// Where a statement that starts after this read stands in the change log: PostgreSQL, the
/// oldest transaction still running (every older one has ended, and every one that may still
/// commit logs at or above it) with the current snapshot; SQLite (one writer at a time, and
/// this one holds the write lock), the next log id.
pub(super) async fn current_watermark(txn: &impl ConnectionTrait) -> Result<Watermark, DbErr> {
    let backend = txn.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT pg_snapshot_xmin(s)::text::bigint AS w, s::text AS snapshot \
             FROM (SELECT pg_current_snapshot() AS s) x"
        }
        _ => {
            "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'profile_changes'), 0) \
             + 1 AS w, NULL AS snapshot"
        }
    };
    let row = txn
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("change-log watermark".into()))?;
    Ok(Watermark {
        position: row.try_get("", "w")?,
        snapshot: row.try_get("", "snapshot")?,
    })
}

/// Drops the workspace's `profile_changes` below every managed segment's watermark (no
/// incremental evaluation reads them again). Holds off evaluations meanwhile (PostgreSQL: an
/// `EXCLUSIVE` lock on `managed_segments`, which waits for running evaluations — they hold a
/// segment row — and makes new ones wait; SQLite: the write lock): a full evaluation that has
/// read its watermark but not yet recorded it could otherwise lose rows it needs. A segment
/// without a watermark evaluates fully next, so it needs none. Returns the rows dropped.
pub async fn prune_changes(db: &impl TransactionTrait, workspace_id: i64) -> Result<u64, DbError> {
    let txn = begin_write(db).await?;
    let backend = txn.get_database_backend();
    if backend == DbBackend::Postgres {
        txn.execute_unprepared("LOCK TABLE managed_segments IN EXCLUSIVE MODE")
            .await?;
    }
    let mut bound = current_watermark(&txn).await?.position;
    let lowest: Option<i64> = Entity::find()
        .select_only()
        .column_as(Column::ChangeWatermark.min(), "w")
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Criteria.is_not_null())
        .into_tuple::<Option<i64>>()
        .one(&txn)
        .await?
        .flatten();
    if let Some(lowest) = lowest {
        bound = bound.min(lowest);
    }
    let mut b = SqlBuilder::new(backend);
    b.sql("DELETE FROM profile_changes WHERE workspace_id = ")
        .param(workspace_id)
        .sql(" AND pos < ")
        .param(bound);
    let dropped = txn.execute_raw(b.build()).await?.rows_affected();
    txn.commit().await?;
    Ok(dropped)
}

/// Whether the change log holds anything `segment` would re-check from its watermark on: a
/// profile write, or a membership change of a segment its criteria read (always `true` without
/// a watermark). Clock-relative conditions are not considered (the caller knows them).
pub async fn has_changes(
    db: &impl ConnectionTrait,
    segment: &super::ManagedSegment,
) -> Result<bool, DbError> {
    let Some(position) = segment.change_watermark else {
        return Ok(true);
    };
    let from = Watermark {
        position,
        snapshot: segment.change_snapshot.clone(),
    };
    let mut b = SqlBuilder::new(db.get_database_backend());
    b.sql("SELECT 1 AS found FROM profile_changes pc WHERE pc.workspace_id = ")
        .param(segment.workspace_id);
    from.unseen(&mut b, "pc");
    b.sql(" AND pc.segment_id IN (0");
    for id in &segment.referenced_segments {
        b.sql(", ").param(*id);
    }
    b.sql(") LIMIT 1");
    Ok(db.query_one_raw(b.build()).await?.is_some())
}

/// The ids of the re-check set (`None` without one), read in their own statement so that
/// the difference is planned for a list of known size (a subquery over the log is estimated
/// from the log's statistics, and a large log made PostgreSQL scan every profile). Changes
/// committed after this read and before the difference are not seen by the watermark either:
/// they are re-checked next time.
async fn recheck_set(
    txn: &impl ConnectionTrait,
    ctx: &DiffContext,
) -> Result<Option<Recheck>, DbErr> {
    if ctx.changes.is_none() {
        return Ok(None);
    }
    let mut b = SqlBuilder::new(txn.get_database_backend());
    b.sql("SELECT DISTINCT c.customer_id FROM (");
    ctx.candidates(&mut b);
    b.sql(") c");
    let rows = txn.query_all_raw(b.build()).await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get::<String>("", "customer_id")?);
    }
    let json = serde_json::to_string(&ids).map_err(|e| DbErr::Json(e.to_string()))?;
    Ok(Some(Recheck {
        len: ids.len(),
        json,
    }))
}

/// The re-check set: how many people, and their ids as one JSON array (serialised once, bound
/// by every part of the difference that reads the list).
struct Recheck {
    len: usize,
    json: String,
}

/// What an incremental evaluation re-checks.
struct Changes {
    /// The segment's watermark: the log rows it has not seen.
    from: Watermark,
    /// Segments whose membership changes count (besides profile writes).
    segments: Vec<i64>,
    windows: Vec<TimeWindow>,
}

struct DiffContext {
    workspace_id: i64,
    segment_id: i64,
    now: DateTime<Utc>,
    /// The re-check set of an incremental evaluation (or of the one a check checks).
    changes: Option<Changes>,
    /// Every profile is evaluated (`changes` then only counts drift).
    full: bool,
    /// The ids of the re-check set ([`recheck_set`]).
    recheck: Option<Recheck>,
}

impl DiffContext {
    /// ` AND <column> IN (people who may have changed)` for an incremental evaluation; nothing
    /// for a full one.
    fn scope(&self, b: &mut SqlBuilder, column: &str) {
        if self.full || self.recheck.is_none() {
            return;
        }
        b.sql(" AND ").sql(column).sql(" IN (");
        self.recheck_list(b);
        b.sql(")");
    }

    /// `SELECT` of the re-check set's ids, bound as one JSON array.
    fn recheck_list(&self, b: &mut SqlBuilder) {
        let ids = self
            .recheck
            .as_ref()
            .map_or_else(|| "[]".to_owned(), |r| r.json.clone());
        if b.backend() == DbBackend::Postgres {
            b.sql("SELECT jsonb_array_elements_text(CAST(")
                .param(ids)
                .sql(" AS jsonb)) AS id");
        } else {
            b.sql("SELECT value AS id FROM json_each(")
                .param(ids)
                .sql(")");
        }
    }

    /// `(SELECT COUNT(*) FROM <source> d WHERE d.<column> NOT IN (re-check set))`: the changes
    /// an incremental evaluation would have missed (0 without a re-check set).
    fn drift(&self, b: &mut SqlBuilder, source: impl FnOnce(&mut SqlBuilder), column: &str) {
        if self.recheck.is_none() || !self.full {
            b.sql("CAST(0 AS BIGINT)");
            return;
        }
        b.sql("(SELECT COUNT(*) FROM (");
        source(b);
        b.sql(") d WHERE d.").sql(column).sql(" NOT IN (");
        self.recheck_list(b);
        b.sql("))");
    }

    /// `SELECT customer_id …`: who an incremental evaluation re-checks.
    fn candidates(&self, b: &mut SqlBuilder) {
        let Some(changes) = &self.changes else {
            return;
        };
        b.sql("SELECT pc.customer_id FROM profile_changes pc WHERE pc.workspace_id = ")
            .param(self.workspace_id);
        changes.from.unseen(b, "pc");
        b.sql(" AND pc.segment_id IN (0");
        for id in &changes.segments {
            b.sql(", ").param(*id);
        }
        b.sql(")");
        for window in &changes.windows {
            b.sql(" UNION SELECT w.customer_id FROM profiles w WHERE w.workspace_id = ")
                .param(self.workspace_id)
                .sql(" AND ");
            b.filter(&window.filter(), "w");
        }
    }

    /// Whether only the re-check set is evaluated (an incremental evaluation with a list).
    fn listed(&self) -> bool {
        !self.full && self.recheck.is_some()
    }

    /// PostgreSQL, [`DiffContext::listed`]: `(re-check ids) r CROSS JOIN LATERAL (<the row of
    /// `table` for r.id>) <alias>`, one index probe per listed person (`LIMIT 1` keeps the
    /// subquery a per-row probe: the planner cannot turn it into a join driven from the table).
    fn listed_rows(&self, b: &mut SqlBuilder, table: &str, select: &str, key: &str, alias: &str) {
        b.sql("(");
        self.recheck_list(b);
        b.sql(") r CROSS JOIN LATERAL (SELECT ")
            .sql(select)
            .sql(" FROM ")
            .sql(table)
            .sql(" t WHERE t.workspace_id = ")
            .param(self.workspace_id);
        if table == "segment_members" {
            b.sql(" AND t.segment_id = ").param(self.segment_id);
        }
        b.sql(" AND t.")
            .sql(key)
            .sql(" = r.id LIMIT 1) ")
            .sql(alias);
    }

    /// `SELECT p.customer_id FROM profiles p WHERE … matches AND NOT a member`.
    ///
    /// PostgreSQL, incremental: driven from the re-check list (see [`DiffContext::listed_rows`]),
    /// the membership test a per-row probe.
    fn additions(&self, b: &mut SqlBuilder, filter: &Filter) {
        if self.listed() && b.backend() == DbBackend::Postgres {
            b.sql("SELECT p.customer_id FROM ");
            self.listed_rows(b, "profiles", "t.*", "customer_id", "p");
            b.sql(" WHERE ");
        } else {
            b.sql("SELECT p.customer_id FROM profiles p WHERE p.workspace_id = ")
                .param(self.workspace_id);
            self.scope(b, "p.customer_id");
            b.sql(" AND ");
        }
        b.filter(filter, "p");
        b.sql(" AND NOT EXISTS (SELECT 1 FROM segment_members x WHERE x.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND x.segment_id = ")
            .param(self.segment_id)
            .sql(" AND x.customer_id = p.customer_id");
        b.probe_fence();
        b.sql(")");
    }

    /// `NOT EXISTS (a matching profile for <member>.customer_id)`.
    fn no_longer_matches(&self, b: &mut SqlBuilder, filter: &Filter, member: &str) {
        b.sql("NOT EXISTS (SELECT 1 FROM profiles p WHERE p.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND p.customer_id = ")
            .sql(member)
            .sql(".customer_id AND ");
        b.filter(filter, "p");
        b.probe_fence();
        b.sql(")");
    }

    /// `SELECT x.customer_id FROM segment_members x WHERE … member AND no longer matches`.
    fn removals(&self, b: &mut SqlBuilder, filter: &Filter) {
        b.sql("SELECT x.customer_id FROM segment_members x WHERE x.workspace_id = ")
            .param(self.workspace_id)
            .sql(" AND x.segment_id = ")
            .param(self.segment_id);
        self.scope(b, "x.customer_id");
        b.sql(" AND ");
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
) -> Result<(u64, u64, u64, u64), DbErr> {
    let mut b = SqlBuilder::new(DbBackend::Postgres);
    // Incremental: every part is driven from the re-check list and probes the tables once per
    // listed person, whatever the statistics say (see `SqlBuilder::probing`).
    b.probing(ctx.listed());
    b.sql("WITH added AS (INSERT INTO segment_members (workspace_id, segment_id, customer_id) SELECT ")
        .param(ctx.workspace_id)
        .sql(", ")
        .param(ctx.segment_id)
        .sql(", a.customer_id FROM (");
    ctx.additions(&mut b, filter);
    b.sql(") a RETURNING customer_id), removed AS (DELETE FROM segment_members x WHERE ");
    if ctx.listed() {
        // The listed members who no longer match, found by one probe each and deleted by
        // their row address (read in this statement's snapshot, which keeps them in place):
        // a join with the segment's rows could be planned as a walk over all of them.
        b.sql("x.ctid = ANY(ARRAY(SELECT m.ctid FROM ");
        ctx.listed_rows(
            &mut b,
            "segment_members",
            "t.ctid, t.customer_id",
            "customer_id",
            "m",
        );
        b.sql(" WHERE ");
        ctx.no_longer_matches(&mut b, filter, "m");
        b.sql("))");
    } else {
        b.sql("x.workspace_id = ")
            .param(ctx.workspace_id)
            .sql(" AND x.segment_id = ")
            .param(ctx.segment_id);
        ctx.scope(&mut b, "x.customer_id");
        b.sql(" AND ");
        ctx.no_longer_matches(&mut b, filter, "x");
    }
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
         (SELECT COUNT(*) FROM queued_adds) + (SELECT COUNT(*) FROM queued_removes) AS rows, ",
    );
    ctx.drift(
        &mut b,
        |b| {
            b.sql("SELECT customer_id FROM added UNION ALL SELECT customer_id FROM removed");
        },
        "customer_id",
    );
    b.sql(" AS drift");
    let row = txn
        .query_one_raw(b.build())
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("evaluation counts".into()))?;
    let count = |name: &str| -> Result<u64, DbErr> {
        let n: i64 = row.try_get("", name)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok((
        count("added")?,
        count("removed")?,
        count("rows")?,
        count("drift")?,
    ))
}

/// SQLite: the write transaction keeps every other writer out, so its statements all see the
/// same profiles. The criteria are evaluated once per direction: the difference is queued in the
/// outbox first, then the membership is updated from the ids of the rows just queued (the
/// outbox rows above `before`, which only this transaction can have written).
async fn apply_sqlite(
    txn: &impl ConnectionTrait,
    ctx: &DiffContext,
    filter: &Filter,
) -> Result<(u64, u64, u64, u64), DbErr> {
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
    // Drift, before the membership changes (the re-check set reads the change log, which
    // those write to).
    let mut b = SqlBuilder::new(backend);
    b.sql("SELECT ");
    ctx.drift(
        &mut b,
        |b| {
            b.sql("SELECT q.value AS customer_id FROM (");
            queued(b, Kind::SegmentAdd);
            b.sql(" UNION ALL ");
            queued(b, Kind::SegmentRemove);
            b.sql(") q");
        },
        "customer_id",
    );
    b.sql(" AS drift");
    let drift: i64 = txn
        .query_one_raw(b.build())
        .await?
        .map(|row| row.try_get("", "drift"))
        .transpose()?
        .unwrap_or(0);

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
    Ok((added, removed, rows, u64::try_from(drift).unwrap_or(0)))
}
