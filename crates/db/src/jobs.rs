//! Background-job bookkeeping: leases (at most one runner per workspace and job at a time,
//! across scheduler replicas) and the history of runs.
//!
//! A runner calls [`try_acquire_lease`] before a run, [`renew_lease`] while a long run goes on,
//! and [`release_lease`] at the end; [`start_run`] / [`finish_run`] record what happened.
//! All times come from the caller (`now`), so tests need no sleeping.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionSession, TransactionTrait,
};

use crate::DbError;
use crate::database::begin_write;
use crate::entities::{job_leases, job_runs};
use crate::idempotency::{self, Claim, StoredKey};
use crate::time::{add_span, db_time};

stored_enum! {
    /// How a job run ended (or that it has not yet).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum RunOutcome {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// The run decided there was nothing to do (or could not take the lease).
        Skipped = "skipped",
    }
}

/// One recorded run of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRun {
    pub id: i64,
    pub workspace_id: i64,
    pub job: String,
    /// Who ran it (scheduler instance id).
    pub holder: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: RunOutcome,
    /// Job-specific counts, e.g. `{"created": 3, "removed": 1}`; `{}` while running.
    pub details: serde_json::Value,
    /// Error message of a failed run (no secrets: the job decides what to store).
    pub error: Option<String>,
}

impl TryFrom<job_runs::Model> for JobRun {
    type Error = DbErr;

    fn try_from(m: job_runs::Model) -> Result<Self, DbErr> {
        let outcome = m.outcome.parse().map_err(DbErr::from)?;
        Ok(Self {
            id: m.id,
            workspace_id: m.workspace_id,
            job: m.job,
            holder: m.holder,
            started_at: m.started_at,
            finished_at: m.finished_at,
            outcome,
            details: m.details,
            error: m.error,
        })
    }
}

/// The current lease row of a job (possibly expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub workspace_id: i64,
    pub job: String,
    pub holder: String,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl From<job_leases::Model> for Lease {
    fn from(m: job_leases::Model) -> Self {
        Self {
            workspace_id: m.workspace_id,
            job: m.job,
            holder: m.holder,
            acquired_at: m.acquired_at,
            expires_at: m.expires_at,
        }
    }
}

/// Takes the lease of `job` in the workspace for `holder` until `now + ttl`, if nobody else
/// holds an unexpired lease. Returns whether `holder` now holds it.
///
/// One atomic statement on both backends:
/// `INSERT … ON CONFLICT (workspace_id, job) DO UPDATE … WHERE job_leases.expires_at <= now
/// OR job_leases.holder = holder`; exactly one of any number of concurrent callers wins a free
/// lease. Re-acquiring one's own lease extends it and keeps its `acquired_at`.
pub async fn try_acquire_lease(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: &str,
    holder: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    use job_leases::{ActiveModel, Column, Entity};

    let now = db_time(now);
    let row = ActiveModel {
        workspace_id: Set(workspace_id),
        job: Set(job.to_owned()),
        holder: Set(holder.to_owned()),
        acquired_at: Set(now),
        expires_at: Set(add_span(now, ttl)),
    };
    let current = |c: Column| Expr::col((Entity, c));
    let excluded = |c: Column| Expr::col((Alias::new("excluded"), c));
    let on_conflict = OnConflict::columns([Column::WorkspaceId, Column::Job])
        .value(Column::Holder, excluded(Column::Holder))
        .value(Column::ExpiresAt, excluded(Column::ExpiresAt))
        .value(
            Column::AcquiredAt,
            Expr::case(
                current(Column::Holder).eq(holder),
                current(Column::AcquiredAt),
            )
            .finally(excluded(Column::AcquiredAt)),
        )
        .action_and_where(
            current(Column::ExpiresAt)
                .lte(now)
                .or(current(Column::Holder).eq(holder)),
        )
        .to_owned();
    let affected = Entity::insert(row)
        .on_conflict(on_conflict)
        .exec_without_returning(db)
        .await?;
    Ok(affected == 1)
}

/// Extends `holder`'s lease to `now + ttl`. Returns `false` if `holder` no longer holds it
/// (released, or expired and taken by someone else): the run should stop.
///
/// An expired lease nobody has taken over yet is still `holder`'s and is renewed.
pub async fn renew_lease(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: &str,
    holder: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    use job_leases::{Column, Entity};

    let res = Entity::update_many()
        .col_expr(Column::ExpiresAt, Expr::value(add_span(db_time(now), ttl)))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Job.eq(job))
        .filter(Column::Holder.eq(holder))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Gives the lease up so that another holder can take it at once. Does nothing if `holder`
/// does not hold it.
pub async fn release_lease(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: &str,
    holder: &str,
) -> Result<(), DbError> {
    use job_leases::{Column, Entity};

    Entity::delete_many()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Job.eq(job))
        .filter(Column::Holder.eq(holder))
        .exec(db)
        .await?;
    Ok(())
}

/// The lease row of a job, expired or not (for diagnostics; decisions use the functions above).
pub async fn get_lease(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: &str,
) -> Result<Option<Lease>, DbError> {
    Ok(
        job_leases::Entity::find_by_id((workspace_id, job.to_owned()))
            .one(db)
            .await?
            .map(Into::into),
    )
}

/// Records the start of a run (outcome `running`, details `{}`); returns the run id.
pub async fn start_run(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: &str,
    holder: &str,
    started_at: DateTime<Utc>,
) -> Result<i64, DbError> {
    let row = job_runs::ActiveModel {
        workspace_id: Set(workspace_id),
        job: Set(job.to_owned()),
        holder: Set(holder.to_owned()),
        started_at: Set(db_time(started_at)),
        finished_at: Set(None),
        outcome: Set(RunOutcome::Running.as_str().to_owned()),
        details: Set(serde_json::Value::Object(serde_json::Map::new())),
        error: Set(None),
        ..Default::default()
    };
    Ok(job_runs::Entity::insert(row).exec(db).await?.last_insert_id)
}

/// Records how a run ended. Fails with `DbError::Db(DbErr::RecordNotUpdated)` if there is no
/// run `run_id`.
pub async fn finish_run(
    db: &impl ConnectionTrait,
    run_id: i64,
    outcome: RunOutcome,
    finished_at: DateTime<Utc>,
    details: serde_json::Value,
    error: Option<&str>,
) -> Result<(), DbError> {
    use job_runs::{Column, Entity};

    let res = Entity::update_many()
        .col_expr(Column::Outcome, Expr::value(outcome.as_str()))
        .col_expr(Column::FinishedAt, Expr::value(db_time(finished_at)))
        .col_expr(Column::Details, Expr::value(details))
        .col_expr(Column::Error, Expr::value(error.map(str::to_owned)))
        .filter(Column::Id.eq(run_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Err(DbErr::RecordNotUpdated.into());
    }
    Ok(())
}

/// Why [`abandon_stale_runs`] closed a run.
pub const ABANDONED: &str =
    "abandoned: the process running it stopped before recording how it ended (its lease lapsed)";

/// Closes as failed ([`ABANDONED`]) the runs of `job` still recorded as running that started
/// before `started_before`: runs whose process died (kill -9, a lost machine) and so never
/// recorded how they ended. Called by the holder of the job's lease with `started_before` one
/// lease term ago: a run that old and alive would still hold the lease. Returns how many.
pub async fn abandon_stale_runs(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: &str,
    started_before: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    use job_runs::{Column, Entity};

    let res = Entity::update_many()
        .col_expr(Column::Outcome, Expr::value(RunOutcome::Failed.as_str()))
        .col_expr(Column::FinishedAt, Expr::value(db_time(now)))
        .col_expr(Column::Error, Expr::value(ABANDONED))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Job.eq(job))
        .filter(Column::Outcome.eq(RunOutcome::Running.as_str()))
        .filter(Column::StartedAt.lt(db_time(started_before)))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// The latest runs of a workspace (of one job, or of all), newest first, at most `limit`.
pub async fn recent_runs(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    job: Option<&str>,
    limit: u64,
) -> Result<Vec<JobRun>, DbError> {
    use job_runs::{Column, Entity};

    let mut query = Entity::find().filter(Column::WorkspaceId.eq(workspace_id));
    if let Some(job) = job {
        query = query.filter(Column::Job.eq(job));
    }
    let rows = query
        .order_by_desc(Column::StartedAt)
        .order_by_desc(Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(JobRun::try_from)
        .collect::<Result<_, _>>()?)
}

/// One run of a workspace by id.
pub async fn get_run(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    id: i64,
) -> Result<Option<JobRun>, DbError> {
    use job_runs::{Column, Entity};

    let row = Entity::find_by_id(id)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .one(db)
        .await?;
    Ok(row.map(JobRun::try_from).transpose()?)
}

/// Records how far a running run has got (its `details` so far), so that callers following it
/// (and a failed run's record) show the progress. Does nothing once the run has ended: returns
/// whether the run was still running.
pub async fn record_progress(
    db: &impl ConnectionTrait,
    run_id: i64,
    details: serde_json::Value,
) -> Result<bool, DbError> {
    use job_runs::{Column, Entity};

    let res = Entity::update_many()
        .col_expr(Column::Details, Expr::value(details))
        .filter(Column::Id.eq(run_id))
        .filter(Column::Outcome.eq(RunOutcome::Running.as_str()))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// What [`start_run_once`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum StartedRun {
    /// A new run was recorded under the key.
    New(i64),
    /// The key was there already: the run it started is its `result_id`.
    Existing(StoredKey),
}

/// Records the start of a run (as [`start_run`]) under the idempotency key (`operation`,
/// `request_id`) with `request`, in one transaction: of any number of calls with one key, even
/// concurrent ones, exactly one records a run; the others find the key (and its run).
#[allow(clippy::too_many_arguments)]
pub async fn start_run_once<C: TransactionTrait>(
    db: &C,
    workspace_id: i64,
    job: &str,
    holder: &str,
    started_at: DateTime<Utc>,
    operation: &str,
    request_id: &str,
    request: &serde_json::Value,
) -> Result<StartedRun, DbError> {
    let txn = begin_write(db).await?;
    let claim = idempotency::claim(
        &txn,
        workspace_id,
        operation,
        request_id,
        request,
        started_at,
    )
    .await?;
    if let Claim::Existing(key) = claim {
        txn.commit().await?;
        return Ok(StartedRun::Existing(key));
    }
    let run_id = start_run(&txn, workspace_id, job, holder, started_at).await?;
    idempotency::complete(
        &txn,
        workspace_id,
        operation,
        request_id,
        run_id,
        started_at,
    )
    .await?;
    txn.commit().await?;
    Ok(StartedRun::New(run_id))
}
