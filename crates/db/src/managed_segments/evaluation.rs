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
//! [`apply_incremental`] brings many segments up to date in one pass over the union of their
//! re-check sets: each person's profile and memberships are read once, whatever the number of
//! segments (the `segment-evaluation` job evaluates its due segments that way).
//! [`Scope::Check`] is a full evaluation that also counts as drift the membership changes an
//! incremental one would have missed (people outside its re-check set).
//! [`prune_changes`] drops the log below every segment's watermark.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement, TransactionSession, TransactionTrait,
};

use super::definitions::{lock, mark_dependents_due};
use super::{IDS_PER_ROW, outbox_label};
use crate::DbError;
use crate::criteria_sql::{Filter, SqlBuilder, TimeWindow};
use crate::database::begin_write;
use crate::entities::managed_segments::{Column, Entity, Model};
use crate::entities::segments;
use crate::outbox::{Kind, Status, workspace_key};
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
    /// segment's watermark on, and those with a value in one of `windows` (see
    /// [`apply_incremental`], which does it for several segments at once). Answers
    /// [`Applied::Stale`] when the segment has no watermark (it needs a full evaluation) or was
    /// evaluated again since `since` (`windows` would be wrong).
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
    if let Scope::Incremental { since, windows } = scope {
        let segment = Incremental {
            cio_segment_id,
            revision,
            filter: filter.clone(),
            since: *since,
            windows: windows.clone(),
        };
        let mut applied = apply_incremental(db, workspace_id, &[segment], now).await?;
        return Ok(applied.pop().unwrap_or(Applied::Stale));
    }
    let started = Instant::now();
    let now = db_time(now);
    let txn = begin_write(db).await?;
    lock_change_log(&txn, workspace_id, false).await?;
    let current = match lock(&txn, workspace_id, cio_segment_id).await? {
        Some(m) if m.revision == revision && m.criteria.as_ref().is_some_and(|c| !c.is_null()) => m,
        _ => return Ok(Applied::Stale),
    };
    // Read before the difference: every change below it is visible to what follows.
    let watermark = current_watermark(&txn).await?;
    let changes = match (scope, current.change_watermark) {
        (Scope::Check { since, windows }, Some(from)) => {
            if current.last_evaluated_at != Some(db_time(*since)) {
                return Ok(Applied::Stale);
            }
            Some(Changes {
                from: vec![Watermark {
                    position: from,
                    snapshot: current.change_snapshot.clone(),
                }],
                segments: filter.segments(),
                windows: windows.clone(),
            })
        }
        _ => None,
    };
    let mut ctx = DiffContext {
        workspace_id,
        segment_id: cio_segment_id,
        now,
        recheck: None,
    };
    let check = changes.is_some();
    if let Some(changes) = &changes {
        ctx.recheck = Some(recheck_set(&txn, workspace_id, changes).await?);
    }
    let (added, removed, outbox_rows, drift) = match txn.get_database_backend() {
        DbBackend::Postgres => apply_postgres(&txn, &ctx, filter).await?,
        _ => apply_sqlite(&txn, &ctx, filter).await?,
    };
    let outcome = EvaluationOutcome {
        added,
        removed,
        member_count: current.member_count + to_i64(added) - to_i64(removed),
        outbox_rows,
        duration_ms: elapsed_ms(started),
        incremental: false,
        drift: check.then_some(drift),
    };
    record(&txn, &current, &outcome, &watermark, now).await?;
    if added + removed > 0 {
        mark_dependents_due(&txn, workspace_id, &[cio_segment_id]).await?;
    }
    txn.commit().await?;
    tracing::debug!(workspace_id, cio_segment_id, ?outcome, "segment evaluated");
    Ok(Applied::Done(outcome))
}

/// One segment for [`apply_incremental`]: its criteria at `revision` as `filter`, last
/// evaluated at `since`, and the windows the clock moved its relative-time conditions across
/// since then.
#[derive(Debug, Clone, PartialEq)]
pub struct Incremental {
    pub cio_segment_id: i64,
    pub revision: i64,
    pub filter: Filter,
    pub since: DateTime<Utc>,
    pub windows: Vec<TimeWindow>,
}

/// Brings several segments up to date at once, incrementally, in ONE transaction: the people
/// who may have changed for any of them (the union of their re-check sets: the change log from
/// each one's watermark on, membership changes of the segments they read, the people in their
/// time windows) are read once and re-checked against every segment's criteria in one pass —
/// one probe of each person's profile and one of their memberships, whatever the number of
/// segments. Re-checking a person who did not change for some segment is harmless (it
/// confirms their membership). The differences are applied as [`apply_evaluation`] applies
/// one (members, outbox rows per segment, counts, due marks of the segments reading them).
///
/// The answer has one [`Applied`] per segment, in order: `Stale` (nothing written for it) when
/// it was deleted, lost its criteria, its criteria changed since `revision`, it was evaluated
/// since `since`, or it has no watermark (a full evaluation is needed). Each evaluated
/// segment's `duration_ms` is the whole batch's.
pub async fn apply_incremental(
    db: &impl TransactionTrait,
    workspace_id: i64,
    segments: &[Incremental],
    now: DateTime<Utc>,
) -> Result<Vec<Applied>, DbError> {
    let started = Instant::now();
    let now = db_time(now);
    let mut applied = vec![Applied::Stale; segments.len()];
    if segments.is_empty() {
        return Ok(applied);
    }
    let txn = begin_write(db).await?;
    lock_change_log(&txn, workspace_id, false).await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        // The pass's statement reads a few thousand rows, but its plan's cost (one probe per
        // person, estimated from a guessed list length) passes the JIT thresholds at a million
        // profiles: compiling ~600 expressions on every run costs more than it saves.
        txn.execute_unprepared("SET LOCAL jit = off").await?;
    }
    // Row order: two batches lock their common segments in the same order.
    let locked: HashMap<i64, Model> = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.is_in(segments.iter().map(|s| s.cio_segment_id)))
        .order_by_asc(Column::Id)
        .lock_exclusive()
        .all(&txn)
        .await?
        .into_iter()
        .map(|m| (m.cio_segment_id, m))
        .collect();
    let mut live: Vec<(usize, &Incremental, Model)> = Vec::new();
    let mut changes = Changes {
        from: Vec::new(),
        segments: Vec::new(),
        windows: Vec::new(),
    };
    for (i, segment) in segments.iter().enumerate() {
        let Some(current) = locked.get(&segment.cio_segment_id) else {
            continue;
        };
        let Some(position) = current.change_watermark else {
            continue;
        };
        if current.revision != segment.revision
            || current.criteria.as_ref().is_none_or(|c| c.is_null())
            || current.last_evaluated_at != Some(db_time(segment.since))
            || live
                .iter()
                .any(|(_, s, _)| s.cio_segment_id == segment.cio_segment_id)
        {
            continue;
        }
        let from = Watermark {
            position,
            snapshot: current.change_snapshot.clone(),
        };
        if !changes.from.contains(&from) {
            changes.from.push(from);
        }
        changes.segments.extend(segment.filter.segments());
        changes.windows.extend(segment.windows.iter().cloned());
        live.push((i, segment, current.clone()));
    }
    if live.is_empty() {
        return Ok(applied);
    }
    changes.segments.sort_unstable();
    changes.segments.dedup();
    // Read before the re-check set: every change below it is visible to what follows.
    let watermark = current_watermark(&txn).await?;
    let recheck = recheck_set(&txn, workspace_id, &changes).await?;
    let filters: Vec<(i64, &Filter)> = live
        .iter()
        .map(|(_, s, _)| (s.cio_segment_id, &s.filter))
        .collect();
    let counts = match txn.get_database_backend() {
        _ if recheck.len == 0 => HashMap::new(),
        DbBackend::Postgres => batch_postgres(&txn, workspace_id, &filters, &recheck, now).await?,
        _ => batch_sqlite(&txn, workspace_id, &filters, &recheck, now).await?,
    };
    let duration_ms = elapsed_ms(started);
    let mut changed = Vec::new();
    for (i, segment, current) in &live {
        let (added, removed) = counts
            .get(&segment.cio_segment_id)
            .copied()
            .unwrap_or_default();
        let outcome = EvaluationOutcome {
            added,
            removed,
            member_count: current.member_count + to_i64(added) - to_i64(removed),
            outbox_rows: added.div_ceil(IDS_PER_ROW as u64) + removed.div_ceil(IDS_PER_ROW as u64),
            duration_ms,
            incremental: true,
            drift: None,
        };
        record(&txn, current, &outcome, &watermark, now).await?;
        if added + removed > 0 {
            changed.push(segment.cio_segment_id);
        }
        applied[*i] = Applied::Done(outcome);
    }
    mark_dependents_due(&txn, workspace_id, &changed).await?;
    txn.commit().await?;
    tracing::debug!(
        workspace_id,
        segments = live.len(),
        rechecked = recheck.len,
        duration_ms,
        "segments evaluated incrementally"
    );
    Ok(applied)
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// Records an evaluation of the segment `current` (its row, locked by the caller): the new
/// member count, `evaluation_due = false`, the outcome, the watermark read before the
/// difference, and (full or check) the time of the last full evaluation; and the count in the
/// segments mirror.
async fn record(
    txn: &impl ConnectionTrait,
    current: &Model,
    outcome: &EvaluationOutcome,
    watermark: &Watermark,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    Entity::update_many()
        .col_expr(Column::MemberCount, Expr::value(outcome.member_count))
        .col_expr(Column::EvaluationDue, Expr::value(false))
        .col_expr(Column::LastEvaluatedAt, Expr::value(now))
        .col_expr(Column::LastEvaluationMs, Expr::value(outcome.duration_ms))
        .col_expr(Column::LastAdded, Expr::value(to_i64(outcome.added)))
        .col_expr(Column::LastRemoved, Expr::value(to_i64(outcome.removed)))
        .col_expr(Column::LastEvaluationError, Expr::value(None::<String>))
        .col_expr(Column::ChangeWatermark, Expr::value(watermark.position))
        .col_expr(
            Column::ChangeSnapshot,
            Expr::value(watermark.snapshot.clone()),
        )
        .col_expr(
            Column::LastFullAt,
            Expr::value(if outcome.incremental {
                current.last_full_at
            } else {
                Some(now)
            }),
        )
        .filter(Column::Id.eq(current.id))
        .exec(txn)
        .await?;
    set_mirror_count(
        txn,
        current.workspace_id,
        current.cio_segment_id,
        outcome.member_count,
        now,
    )
    .await
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

/// The log rows not yet seen from one or more watermarks: those at or above `from`, and those
/// written by one of `running`.
///
/// A PostgreSQL watermark's snapshot (`xmin:xmax:xip,…`) has seen every transaction below its
/// `xmax` except the ones it lists as running (`xip`): what it has not seen is `pos >= xmax`
/// or `pos IN (xip)`. Reading that, rather than "at or above `xmin` and not visible in the
/// snapshot", keeps the read to two index ranges near the log's end: a transaction left open
/// anywhere on the server (another database's, a backup's) holds `xmin` back and made every
/// evaluation walk the whole log written since it began. For several watermarks, the union
/// ([`Unseen::union`]). A watermark without a snapshot (SQLite) or with one that does not parse
/// has not seen anything at or above its position.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unseen {
    from: i64,
    running: Vec<i64>,
}

impl Unseen {
    /// What `watermark` has not seen.
    fn of(watermark: &Watermark) -> Unseen {
        let (from, running) = watermark
            .snapshot
            .as_deref()
            .and_then(parse_snapshot)
            .unwrap_or((watermark.position, Vec::new()));
        Unseen { from, running }
    }

    /// What one of `self` and `other` has not seen: from the lower bound on, and every running
    /// transaction below it.
    fn union(self, other: Unseen) -> Unseen {
        let from = self.from.min(other.from);
        let mut running: Vec<i64> = self
            .running
            .into_iter()
            .chain(other.running)
            .filter(|xid| *xid < from)
            .collect();
        running.sort_unstable();
        running.dedup();
        Unseen { from, running }
    }

    /// `SELECT <columns> FROM profile_changes pc WHERE …` the unseen rows of the workspace's
    /// log whose `segment_id` is 0 (profile writes) or one of `segments`: one index range per
    /// part, joined by `UNION ALL`.
    fn select(&self, b: &mut SqlBuilder, columns: &str, workspace_id: i64, segments: &[i64]) {
        let part = |b: &mut SqlBuilder, rows: &dyn Fn(&mut SqlBuilder)| {
            b.sql("SELECT ")
                .sql(columns)
                .sql(" FROM profile_changes pc WHERE pc.workspace_id = ")
                .param(workspace_id)
                .sql(" AND pc.segment_id IN (0");
            for id in segments {
                b.sql(", ").param(*id);
            }
            b.sql(") AND ");
            rows(b);
        };
        part(b, &|b| {
            b.sql("pc.pos >= ").param(self.from);
        });
        if !self.running.is_empty() {
            b.sql(" UNION ALL ");
            part(b, &|b| {
                b.sql("pc.pos IN (");
                for (i, xid) in self.running.iter().enumerate() {
                    if i > 0 {
                        b.sql(", ");
                    }
                    b.param(*xid);
                }
                b.sql(")");
            });
        }
    }
}

/// `(xmax, xip)` of a PostgreSQL snapshot's text form `xmin:xmax:xip1,xip2,…`.
fn parse_snapshot(text: &str) -> Option<(i64, Vec<i64>)> {
    let mut fields = text.split(':');
    let (_xmin, xmax, xip) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() {
        return None;
    }
    let running = xip
        .split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().ok())
        .collect::<Option<Vec<i64>>>()?;
    Some((xmax.parse().ok()?, running))
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

/// First key of the PostgreSQL advisory lock on a workspace's change log ("plog" in ASCII; the
/// second key is the workspace's, as the outbox's): evaluations hold it shared from before they
/// read their watermark until they commit; [`prune_changes`] takes it exclusively or not at all.
const CHANGE_LOG_LOCK: i32 = 0x706c_6f67;

/// Takes the workspace's change-log lock until the transaction ends: shared (an evaluation;
/// waits only while a prune runs) or, `exclusive`, only if free (a prune; `false`: an
/// evaluation is running). SQLite: the write transaction already excludes the others.
async fn lock_change_log(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    exclusive: bool,
) -> Result<bool, DbErr> {
    if txn.get_database_backend() != DbBackend::Postgres {
        return Ok(true);
    }
    let sql = if exclusive {
        "SELECT pg_try_advisory_xact_lock($1, $2) AS held"
    } else {
        "SELECT TRUE AS held FROM (SELECT pg_advisory_xact_lock_shared($1, $2)) l"
    };
    let row = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [CHANGE_LOG_LOCK.into(), workspace_key(workspace_id).into()],
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get("", "held"))
        .transpose()?
        .unwrap_or(false))
}

/// Drops the workspace's `profile_changes` below every managed segment's watermark (no
/// incremental evaluation reads them again). Only when no evaluation of the workspace is
/// running, and new ones wait until it commits (PostgreSQL: the change-log lock, see
/// [`lock_change_log`]; a busy log is pruned by a later call; SQLite: the write lock): a full
/// evaluation that has read its watermark but not yet recorded it could otherwise lose rows it
/// needs. A segment without a watermark evaluates fully next, so it needs none. Nothing else
/// waits for a prune: the due marks of profile writes never do (it used to lock
/// `managed_segments`, and every write call's marks queued behind it). Returns the rows dropped.
pub async fn prune_changes(db: &impl TransactionTrait, workspace_id: i64) -> Result<u64, DbError> {
    let txn = begin_write(db).await?;
    let backend = txn.get_database_backend();
    if !lock_change_log(&txn, workspace_id, true).await? {
        return Ok(0);
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
    b.sql("SELECT 1 AS found FROM (");
    Unseen::of(&from).select(
        &mut b,
        "pc.pos",
        segment.workspace_id,
        &segment.referenced_segments,
    );
    b.sql(") x LIMIT 1");
    Ok(db.query_one_raw(b.build()).await?.is_some())
}

/// The ids of the re-check set of `changes`, read in their own statement so that the
/// difference is planned for a list of known size (a subquery over the log is estimated from
/// the log's statistics, and a large log made PostgreSQL scan every profile). Changes
/// committed after this read and before the difference are not seen by the watermark either:
/// they are re-checked next time.
async fn recheck_set(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    changes: &Changes,
) -> Result<Recheck, DbErr> {
    let mut b = SqlBuilder::new(txn.get_database_backend());
    b.sql("SELECT DISTINCT c.customer_id FROM (");
    changes.candidates(&mut b, workspace_id);
    b.sql(") c");
    let rows = txn.query_all_raw(b.build()).await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get::<String>("", "customer_id")?);
    }
    let json = serde_json::to_string(&ids).map_err(|e| DbErr::Json(e.to_string()))?;
    Ok(Recheck {
        len: ids.len(),
        json,
    })
}

/// The re-check set: how many people, and their ids as one JSON array (serialised once, bound
/// by every part of the difference that reads the list).
struct Recheck {
    len: usize,
    json: String,
}

impl Recheck {
    /// `SELECT` of the ids, one `id` column.
    fn select(&self, b: &mut SqlBuilder) {
        if b.backend() == DbBackend::Postgres {
            b.sql("SELECT jsonb_array_elements_text(CAST(")
                .param(self.json.clone())
                .sql(" AS jsonb)) AS id");
        } else {
            b.sql("SELECT value AS id FROM json_each(")
                .param(self.json.clone())
                .sql(")");
        }
    }
}

/// Who an incremental evaluation re-checks.
struct Changes {
    /// The watermarks of the segments evaluated: the log rows one of them has not seen.
    from: Vec<Watermark>,
    /// Segments whose membership changes count (besides profile writes).
    segments: Vec<i64>,
    windows: Vec<TimeWindow>,
}

impl Changes {
    /// `SELECT customer_id …`: the log rows not seen from one of the watermarks, and the
    /// people with a value in one of the windows.
    fn candidates(&self, b: &mut SqlBuilder, workspace_id: i64) {
        match self.from.iter().map(Unseen::of).reduce(Unseen::union) {
            Some(unseen) => unseen.select(b, "pc.customer_id", workspace_id, &self.segments),
            // No watermark: no log row (the windows alone).
            None => {
                b.sql("SELECT p.customer_id FROM profiles p WHERE 1 = 0");
            }
        }
        for window in &self.windows {
            b.sql(" UNION SELECT w.customer_id FROM profiles w WHERE w.workspace_id = ")
                .param(workspace_id)
                .sql(" AND ");
            b.time_window(window, "w");
        }
    }
}

/// A full evaluation of one segment.
struct DiffContext {
    workspace_id: i64,
    segment_id: i64,
    now: DateTime<Utc>,
    /// [`Scope::Check`]: the re-check set of the incremental evaluation it checks.
    recheck: Option<Recheck>,
}

impl DiffContext {
    /// `(SELECT COUNT(*) FROM <source> d WHERE d.<column> NOT IN (re-check set))`: the changes
    /// an incremental evaluation would have missed (0 without a re-check set).
    fn drift(&self, b: &mut SqlBuilder, source: impl FnOnce(&mut SqlBuilder), column: &str) {
        let Some(recheck) = &self.recheck else {
            b.sql("CAST(0 AS BIGINT)");
            return;
        };
        b.sql("(SELECT COUNT(*) FROM (");
        source(b);
        b.sql(") d WHERE d.").sql(column).sql(" NOT IN (");
        recheck.select(b);
        b.sql("))");
    }

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

    /// [`queue`] for this segment: `source` has a `customer_id` column.
    fn queue(&self, b: &mut SqlBuilder, kind: Kind, source: impl FnOnce(&mut SqlBuilder)) {
        let segment_id = self.segment_id;
        queue(b, self.workspace_id, kind, self.now, |b| {
            b.sql("SELECT CAST(")
                .param(segment_id)
                .sql(" AS BIGINT) AS segment_id, q.customer_id FROM (");
            source(b);
            b.sql(") q");
        });
    }
}

/// `INSERT INTO outbox … SELECT` one row per segment and 1000 ids of `source` (a query with
/// `segment_id` and `customer_id` columns), ids sorted, rows in the order of their ids.
fn queue(
    b: &mut SqlBuilder,
    workspace_id: i64,
    kind: Kind,
    now: DateTime<Utc>,
    source: impl FnOnce(&mut SqlBuilder),
) {
    let postgres = b.backend() == DbBackend::Postgres;
    b.sql(
        "INSERT INTO outbox (workspace_id, kind, customer_id, payload, status, attempts, \
         next_attempt_at, created_at) SELECT ",
    )
    .param(workspace_id)
    .sql(", ")
    .param(kind.as_str())
    .sql(", 'segment:' || c.segment_id, ");
    if postgres {
        b.sql(
            "jsonb_build_object('segment_id', c.segment_id, \
             'ids', jsonb_agg(c.customer_id ORDER BY c.customer_id))",
        );
    } else {
        b.sql(
            "json_object('segment_id', c.segment_id, \
             'ids', json_group_array(c.customer_id ORDER BY c.customer_id))",
        );
    }
    b.sql(", ")
        .param(Status::Pending.as_str())
        .sql(", 0, ")
        .param(now)
        .sql(", ")
        .param(now)
        .sql(
            " FROM (SELECT s.segment_id, s.customer_id, (ROW_NUMBER() OVER \
             (PARTITION BY s.segment_id ORDER BY s.customer_id) - 1) / ",
        )
        .sql(&IDS_PER_ROW.to_string())
        .sql(" AS chunk FROM (");
    source(b);
    b.sql(") s) c GROUP BY c.segment_id, c.chunk ORDER BY c.segment_id, c.chunk");
}

/// `r` (the re-check list), `p` (their profiles) and `v` (who of them each segment's criteria
/// select: `segment_id`, `customer_id`) as common table expressions, after `WITH `.
fn batch_verdicts(
    b: &mut SqlBuilder,
    workspace_id: i64,
    filters: &[(i64, &Filter)],
    recheck: &Recheck,
) {
    b.sql("r AS MATERIALIZED (");
    recheck.select(b);
    b.sql("), p AS MATERIALIZED (");
    if b.backend() == DbBackend::Postgres {
        // One index probe per listed person (`LIMIT 1` keeps the subquery a per-row probe:
        // the planner cannot turn it into a join driven from the table).
        b.sql("SELECT t.* FROM r CROSS JOIN LATERAL (SELECT * FROM profiles q WHERE q.workspace_id = ")
            .param(workspace_id)
            .sql(" AND q.customer_id = r.id LIMIT 1) t");
    } else {
        b.sql("SELECT q.* FROM profiles q WHERE q.workspace_id = ")
            .param(workspace_id)
            .sql(" AND q.customer_id IN (SELECT id FROM r)");
    }
    b.sql("), v AS MATERIALIZED (");
    for (i, (segment_id, filter)) in filters.iter().enumerate() {
        if i > 0 {
            b.sql(" UNION ALL ");
        }
        b.sql("SELECT CAST(")
            .param(*segment_id)
            .sql(" AS BIGINT) AS segment_id, p.customer_id FROM p WHERE ");
        b.filter(filter, "p");
    }
    b.sql(")");
}

/// ` IN (<the batch's segment ids>)`.
fn in_segments(b: &mut SqlBuilder, filters: &[(i64, &Filter)]) {
    b.sql(" IN (");
    for (i, (segment_id, _)) in filters.iter().enumerate() {
        if i > 0 {
            b.sql(", ");
        }
        b.param(*segment_id);
    }
    b.sql(")");
}

/// Added and removed members per segment, from a statement returning `segment_id`, `added`,
/// `removed` rows.
async fn counts_by_segment(
    txn: &impl ConnectionTrait,
    b: SqlBuilder,
) -> Result<HashMap<i64, (u64, u64)>, DbErr> {
    let mut counts = HashMap::new();
    for row in txn.query_all_raw(b.build()).await? {
        let n = |name: &str| -> Result<u64, DbErr> {
            let n: i64 = row.try_get("", name)?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        counts.insert(row.try_get("", "segment_id")?, (n("added")?, n("removed")?));
    }
    Ok(counts)
}

/// PostgreSQL, [`apply_incremental`]'s difference: one statement, so that every part reads
/// the same snapshot. Each listed person's profile and memberships are read by one index
/// probe each; the verdicts are compared with the memberships by hash joins.
async fn batch_postgres(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    filters: &[(i64, &Filter)],
    recheck: &Recheck,
    now: DateTime<Utc>,
) -> Result<HashMap<i64, (u64, u64)>, DbErr> {
    let mut b = SqlBuilder::new(DbBackend::Postgres);
    b.probing(true);
    b.sql("WITH ");
    batch_verdicts(&mut b, workspace_id, filters, recheck);
    // The listed people's memberships of the batch's segments, with their row addresses (read
    // in this statement's snapshot, which keeps them in place) to delete by. Each person's
    // memberships are read whole through `(workspace_id, customer_id)` and filtered after: with
    // the segment list inside the probe, PostgreSQL chose at 1,000,000 profiles one primary-key
    // descent per person AND segment (~1 ms a person).
    b.sql(", m AS MATERIALIZED (SELECT x.row_id, x.segment_id, x.customer_id FROM r CROSS JOIN LATERAL (SELECT q.ctid AS row_id, q.segment_id, q.customer_id FROM segment_members q WHERE q.workspace_id = ")
        .param(workspace_id)
        .sql(" AND q.customer_id = r.id OFFSET 0) x WHERE x.segment_id");
    in_segments(&mut b, filters);
    b.sql(
        "), added AS (INSERT INTO segment_members (workspace_id, segment_id, customer_id) SELECT ",
    )
    .param(workspace_id)
    .sql(
        ", v.segment_id, v.customer_id FROM v WHERE NOT EXISTS (SELECT 1 FROM m \
             WHERE m.segment_id = v.segment_id AND m.customer_id = v.customer_id) \
             RETURNING segment_id, customer_id), \
             removed AS (DELETE FROM segment_members x WHERE x.ctid = ANY(ARRAY(\
             SELECT m.row_id FROM m WHERE NOT EXISTS (SELECT 1 FROM v \
             WHERE v.segment_id = m.segment_id AND v.customer_id = m.customer_id))) \
             RETURNING x.segment_id, x.customer_id), queued_adds AS (",
    );
    queue(&mut b, workspace_id, Kind::SegmentAdd, now, |b| {
        b.sql("SELECT segment_id, customer_id FROM added");
    });
    b.sql(" RETURNING id), queued_removes AS (");
    queue(&mut b, workspace_id, Kind::SegmentRemove, now, |b| {
        b.sql("SELECT segment_id, customer_id FROM removed");
    });
    b.sql(
        " RETURNING id) SELECT c.segment_id, SUM(c.a)::bigint AS added, \
         SUM(c.r)::bigint AS removed FROM (SELECT segment_id, 1 AS a, 0 AS r FROM added \
         UNION ALL SELECT segment_id, 0, 1 FROM removed) c GROUP BY c.segment_id",
    );
    counts_by_segment(txn, b).await
}

/// SQLite, [`apply_incremental`]'s difference: the write transaction keeps every other writer
/// out, so its statements all see the same profiles. As [`apply_sqlite`]: the differences are
/// queued in the outbox first, then the memberships follow from the rows just queued.
async fn batch_sqlite(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    filters: &[(i64, &Filter)],
    recheck: &Recheck,
    now: DateTime<Utc>,
) -> Result<HashMap<i64, (u64, u64)>, DbErr> {
    let backend = DbBackend::Sqlite;
    let before = last_outbox_id(txn).await?;
    let mut b = SqlBuilder::new(backend);
    b.sql("WITH ");
    batch_verdicts(&mut b, workspace_id, filters, recheck);
    b.sql(" ");
    queue(&mut b, workspace_id, Kind::SegmentAdd, now, |b| {
        b.sql("SELECT v.segment_id, v.customer_id FROM v WHERE NOT EXISTS (SELECT 1 FROM segment_members x WHERE x.workspace_id = ")
            .param(workspace_id)
            .sql(" AND x.segment_id = v.segment_id AND x.customer_id = v.customer_id)");
    });
    txn.execute_raw(b.build()).await?;
    let mut b = SqlBuilder::new(backend);
    b.sql("WITH ");
    batch_verdicts(&mut b, workspace_id, filters, recheck);
    b.sql(" ");
    queue(&mut b, workspace_id, Kind::SegmentRemove, now, |b| {
        b.sql("SELECT x.segment_id, x.customer_id FROM segment_members x WHERE x.workspace_id = ")
            .param(workspace_id)
            .sql(" AND x.customer_id IN (SELECT id FROM r) AND x.segment_id");
        in_segments(b, filters);
        b.sql(" AND NOT EXISTS (SELECT 1 FROM v WHERE v.segment_id = x.segment_id AND v.customer_id = x.customer_id)");
    });
    txn.execute_raw(b.build()).await?;

    let queued = |b: &mut SqlBuilder, kind: Kind| {
        b.sql(
            "SELECT o.workspace_id, json_extract(o.payload, '$.segment_id') AS segment_id, \
             j.value AS customer_id FROM outbox o, json_each(o.payload, '$.ids') j WHERE o.id > ",
        )
        .param(before)
        .sql(" AND o.workspace_id = ")
        .param(workspace_id)
        .sql(" AND o.kind = ")
        .param(kind.as_str());
    };
    let mut b = SqlBuilder::new(backend);
    b.sql("INSERT INTO segment_members (workspace_id, segment_id, customer_id) ");
    queued(&mut b, Kind::SegmentAdd);
    txn.execute_raw(b.build()).await?;
    let mut b = SqlBuilder::new(backend);
    b.sql("DELETE FROM segment_members WHERE (workspace_id, segment_id, customer_id) IN (");
    queued(&mut b, Kind::SegmentRemove);
    b.sql(")");
    txn.execute_raw(b.build()).await?;

    let mut b = SqlBuilder::new(backend);
    b.sql("SELECT json_extract(o.payload, '$.segment_id') AS segment_id, SUM(CASE WHEN o.kind = ")
        .param(Kind::SegmentAdd.as_str())
        .sql(" THEN json_array_length(o.payload, '$.ids') ELSE 0 END) AS added, SUM(CASE WHEN o.kind = ")
        .param(Kind::SegmentRemove.as_str())
        .sql(" THEN json_array_length(o.payload, '$.ids') ELSE 0 END) AS removed FROM outbox o WHERE o.id > ")
        .param(before)
        .sql(" AND o.workspace_id = ")
        .param(workspace_id)
        .sql(" GROUP BY 1");
    counts_by_segment(txn, b).await
}

/// SQLite: the highest outbox id (this write transaction's rows come after it).
async fn last_outbox_id(txn: &impl ConnectionTrait) -> Result<i64, DbErr> {
    Ok(txn
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT COALESCE(MAX(id), 0) AS n FROM outbox",
        ))
        .await?
        .map(|row| row.try_get("", "n"))
        .transpose()?
        .unwrap_or(0))
}

/// PostgreSQL: one statement, so that every part reads the same snapshot of the profiles.
async fn apply_postgres(
    txn: &impl ConnectionTrait,
    ctx: &DiffContext,
    filter: &Filter,
) -> Result<(u64, u64, u64, u64), DbErr> {
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
    let before = last_outbox_id(txn).await?;
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

#[cfg(test)]
mod tests {
    use super::{Unseen, Watermark, parse_snapshot};

    /// What one of `watermarks` has not seen (as `Changes::candidates` reads it).
    fn unseen_by_any(watermarks: &[Watermark]) -> Option<Unseen> {
        watermarks.iter().map(Unseen::of).reduce(Unseen::union)
    }

    fn pg(position: i64, snapshot: &str) -> Watermark {
        Watermark {
            position,
            snapshot: Some(snapshot.to_string()),
        }
    }

    #[test]
    fn a_snapshot_has_not_seen_its_running_transactions_and_what_follows_its_xmax() {
        assert_eq!(parse_snapshot("10:20:"), Some((20, vec![])));
        assert_eq!(parse_snapshot("10:20:10,14"), Some((20, vec![10, 14])));
        for broken in ["", "10:20", "10:x:", "10:20:1,,y", "1:2:3:4"] {
            assert_eq!(parse_snapshot(broken), None, "{broken:?}");
        }
        // A transaction open since 10 (anywhere on the server): only 10, 14 and 20 on.
        assert_eq!(
            Unseen::of(&pg(10, "10:20:10,14")),
            Unseen {
                from: 20,
                running: vec![10, 14]
            }
        );
    }

    #[test]
    fn several_watermarks_have_not_seen_the_union_of_what_each_has_not_seen() {
        let unseen = unseen_by_any(&[
            pg(10, "10:20:10,14"),
            pg(10, "10:30:10,25"),
            pg(3, "3:17:3,16"),
        ]);
        // From 17 on (the lowest xmax); below it, the running ones of each.
        assert_eq!(
            unseen,
            Some(Unseen {
                from: 17,
                running: vec![3, 10, 14, 16]
            })
        );
        // SQLite (no snapshot), or a snapshot that does not parse: everything from the position.
        let sqlite = Watermark {
            position: 8,
            snapshot: None,
        };
        assert_eq!(
            Unseen::of(&sqlite),
            Unseen {
                from: 8,
                running: vec![]
            }
        );
        assert_eq!(
            unseen_by_any(&[pg(10, "10:20:10,14"), pg(5, "garbled")]),
            Some(Unseen {
                from: 5,
                running: vec![]
            })
        );
        assert_eq!(unseen_by_any(&[]), None);
    }
}
