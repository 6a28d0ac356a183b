//! `sharpsend.cio.v1.OpsService`: the background jobs for operators — list them with their
//! schedules, list recent runs, run one now. Mapping only: jobs run through
//! `sharpsend_core::jobs::run_job` (lease + run record, exactly as the scheduler runs them) and
//! runs are read from `sharpsend_db::jobs`.

use std::sync::Arc;

use sharpsend_core::{
    AppContext, CoreError,
    config::{Env, ProcessEnv},
    jobs::{self, Job, JobOutcome, RunError},
};
use sharpsend_db::jobs::{self as job_store, JobRun, RunOutcome};
use sharpsend_proto::v1::{self as pb, ops_service_server::OpsService};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::{
    auth::Caller,
    convert::{json_to_struct, limit, timestamp},
    status::to_status,
};

/// Runs listed by ListJobRuns unless the caller says otherwise, and the most it may ask for.
pub const DEFAULT_RUNS_LIMIT: u64 = 20;
pub const MAX_RUNS_LIMIT: u64 = 500;

pub struct Ops {
    ctx: AppContext,
    env: Arc<dyn Env + Send + Sync>,
}

impl Ops {
    /// Schedules are read from the process environment (the scheduler's variables).
    pub fn new(ctx: AppContext) -> Self {
        Self::with_env(ctx, Arc::new(ProcessEnv))
    }

    /// Schedules read from `env`.
    pub fn with_env(ctx: AppContext, env: Arc<dyn Env + Send + Sync>) -> Self {
        Self { ctx, env }
    }
}

fn parse_job(name: &str) -> Result<Job, CoreError> {
    name.trim()
        .parse::<Job>()
        .map_err(|e| CoreError::invalid("job", e.to_string()))
}

fn outcome(outcome: RunOutcome) -> pb::JobRunOutcome {
    match outcome {
        RunOutcome::Running => pb::JobRunOutcome::Running,
        RunOutcome::Succeeded => pb::JobRunOutcome::Succeeded,
        RunOutcome::Failed => pb::JobRunOutcome::Failed,
        RunOutcome::Skipped => pb::JobRunOutcome::Skipped,
    }
}

fn to_proto(run: &JobRun) -> pb::JobRun {
    let duration = run.finished_at.map(|end| {
        let d = end - run.started_at;
        let seconds = d.num_seconds();
        let nanos = (d - chrono::Duration::seconds(seconds))
            .num_nanoseconds()
            .unwrap_or(0);
        prost_types::Duration {
            seconds,
            nanos: i32::try_from(nanos).unwrap_or(0),
        }
    });
    pb::JobRun {
        id: run.id,
        job: run.job.clone(),
        holder: run.holder.clone(),
        outcome: outcome(run.outcome) as i32,
        started_at: Some(timestamp(run.started_at)),
        finished_at: run.finished_at.map(timestamp),
        duration,
        details: run.details.as_object().map(json_to_struct),
        error: run.error.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl OpsService for Ops {
    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = Job::ALL
            .iter()
            .map(|&job| pb::JobInfo {
                name: job.name().to_string(),
                description: job.description().to_string(),
                schedule: self
                    .env
                    .var(job.schedule_variable())
                    .unwrap_or_else(|| job.default_schedule().to_string()),
                schedule_variable: job.schedule_variable().to_string(),
                default_schedule: job.default_schedule().to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn list_job_runs(
        &self,
        request: Request<pb::ListJobRunsRequest>,
    ) -> Result<Response<pb::ListJobRunsResponse>, Status> {
        let req = request.into_inner();
        let job = if req.job.trim().is_empty() {
            None
        } else {
            Some(parse_job(&req.job).map_err(to_status)?)
        };
        let limit = limit(
            "limit",
            i64::from(req.limit),
            DEFAULT_RUNS_LIMIT,
            MAX_RUNS_LIMIT,
        )
        .map_err(to_status)?;
        let runs = job_store::recent_runs(
            &self.ctx.db,
            self.ctx.workspace_id(),
            job.map(Job::name),
            limit,
        )
        .await
        .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::ListJobRunsResponse {
            runs: runs.iter().map(to_proto).collect(),
        }))
    }

    async fn run_job(
        &self,
        request: Request<pb::RunJobRequest>,
    ) -> Result<Response<pb::RunJobResponse>, Status> {
        let caller = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "unknown".into());
        let job = parse_job(&request.into_inner().job).map_err(to_status)?;
        let holder = jobs::default_holder(&format!("server-ops({caller})"));
        tracing::info!(job = job.name(), caller = %caller, "job run requested");

        // A task of its own: the run finishes (and releases its lease and records its end) even
        // if the caller stops waiting or the call's deadline passes.
        let ctx = self.ctx.clone();
        let task = tokio::spawn(
            async move { jobs::run_job(&ctx, job, &holder).await }
                .instrument(tracing::Span::current()),
        );
        let result = task.await.map_err(|e| {
            tracing::error!(job = job.name(), error = %e, "job task ended abnormally");
            Status::internal(format!(
                "the {job} run ended abnormally; see the server log"
            ))
        })?;
        let run_id = match result {
            Ok(JobOutcome::Succeeded { run_id, .. } | JobOutcome::Skipped { run_id }) => run_id,
            Err(RunError::Failed(failed)) => failed.run_id,
            Err(RunError::Bookkeeping(e)) => return Err(to_status(e.into())),
        };
        // The run as recorded: a handful of runs can start between ours and this read.
        let recent =
            job_store::recent_runs(&self.ctx.db, self.ctx.workspace_id(), Some(job.name()), 100)
                .await
                .map_err(|e| to_status(e.into()))?;
        let run = recent.iter().find(|r| r.id == run_id).ok_or_else(|| {
            Status::internal(format!(
                "the {job} run {run_id} was not found after it ended"
            ))
        })?;
        Ok(Response::new(pb::RunJobResponse {
            run: Some(to_proto(run)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;

    #[test]
    fn a_run_maps_with_its_duration_and_an_unknown_job_names_the_field() {
        let started = Utc
            .with_ymd_and_hms(2026, 11, 28, 10, 0, 0)
            .single()
            .unwrap_or_default();
        let run = JobRun {
            id: 7,
            workspace_id: 1,
            job: "segment-sync".into(),
            holder: "scheduler@h:1:x".into(),
            started_at: started,
            finished_at: Some(started + chrono::Duration::milliseconds(2500)),
            outcome: RunOutcome::Failed,
            details: json!({"created": 3}),
            error: Some("Customer.io is unavailable".into()),
        };
        let proto = to_proto(&run);
        assert_eq!(proto.outcome, pb::JobRunOutcome::Failed as i32);
        assert_eq!(
            proto.duration,
            Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000
            })
        );
        assert_eq!(proto.error, "Customer.io is unavailable");
        assert!(
            proto
                .details
                .is_some_and(|d| d.fields.contains_key("created"))
        );

        let running = JobRun {
            finished_at: None,
            outcome: RunOutcome::Running,
            error: None,
            ..run
        };
        let proto = to_proto(&running);
        assert!(proto.duration.is_none() && proto.finished_at.is_none() && proto.error.is_empty());

        let status = to_status(
            parse_job("segment-synk")
                .err()
                .unwrap_or_else(|| CoreError::invalid("x", "y")),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("job") && status.message().contains("segment-synk"),
            "{}",
            status.message()
        );
        assert_eq!(
            parse_job(" outbox-delivery ").ok(),
            Some(Job::OutboxDelivery)
        );
    }
}
