//! `sharpsend.cio.v1.OpsService`: the background jobs for operators — list them with their
//! schedules, list recent runs, start one now, follow one run. Mapping only: `sharpsend_core::jobs` runs them
//! (lease + run record, exactly as the scheduler runs them) and reads their runs.

use sharpsend_core::tenants::Tenants;
use sharpsend_core::{
    CoreError,
    input::{self, limits::JOB_NAME_BYTES},
    jobs::{self, Job, JobRunView, RunState},
};
use sharpsend_proto::v1::{self as pb, ops_service_server::OpsService};
use tonic::{Request, Response, Status};

use crate::{
    auth::Caller,
    convert::{json_to_struct, limit, timestamp},
    status::OrStatus,
};

/// Runs listed by ListJobRuns unless the caller says otherwise, and the most it may ask for.
pub const DEFAULT_RUNS_LIMIT: u64 = 20;
pub const MAX_RUNS_LIMIT: u64 = 500;

pub struct Ops {
    tenants: Tenants,
}

impl Ops {
    pub fn new(tenants: Tenants) -> Self {
        Self { tenants }
    }
}

/// A job name, exactly as ListJobs lists it: like every enum-like name it is never trimmed
/// (`" segment-sync"` is refused, not run).
fn parse_job(name: &str) -> Result<Job, CoreError> {
    if let Some(problem) = input::identifier_problem(name, JOB_NAME_BYTES, true) {
        return Err(CoreError::invalid("job", problem));
    }
    name.parse::<Job>()
        .map_err(|e| CoreError::invalid("job", e.to_string()))
}

fn outcome(state: RunState) -> pb::JobRunOutcome {
    match state {
        RunState::Running => pb::JobRunOutcome::Running,
        RunState::Succeeded => pb::JobRunOutcome::Succeeded,
        RunState::Failed => pb::JobRunOutcome::Failed,
        RunState::Skipped => pb::JobRunOutcome::Skipped,
    }
}

/// A run as the API shows it (also SegmentService/SyncSegments' answer).
pub(crate) fn to_proto(run: &JobRunView) -> pb::JobRun {
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
        outcome: outcome(run.state) as i32,
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
        let ctx = crate::tenancy::context(&self.tenants, &_request).await?;
        let jobs = jobs::list_jobs(&ctx)
            .into_iter()
            .map(|info| pb::JobInfo {
                name: info.job.name().to_string(),
                description: info.job.description().to_string(),
                schedule: info.schedule,
                schedule_variable: info.job.schedule_variable().to_string(),
                default_schedule: info.default_schedule.to_string(),
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn list_job_runs(
        &self,
        request: Request<pb::ListJobRunsRequest>,
    ) -> Result<Response<pb::ListJobRunsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let job = if req.job.is_empty() {
            None
        } else {
            Some(parse_job(&req.job).or_status()?)
        };
        let limit = limit(
            "limit",
            i64::from(req.limit),
            DEFAULT_RUNS_LIMIT,
            MAX_RUNS_LIMIT,
        )
        .or_status()?;
        let runs = jobs::recent_runs(&ctx, job, limit).await.or_status()?;
        Ok(Response::new(pb::ListJobRunsResponse {
            runs: runs.iter().map(to_proto).collect(),
        }))
    }

    async fn run_job(
        &self,
        request: Request<pb::RunJobRequest>,
    ) -> Result<Response<pb::RunJobResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let caller = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "unknown".into());
        let req = request.into_inner();
        let job = parse_job(&req.job).or_status()?;
        let (run, _) = jobs::run_now(&ctx, job, &caller, &req.request_id)
            .await
            .or_status()?;
        Ok(Response::new(pb::RunJobResponse {
            run: Some(to_proto(&run)),
        }))
    }

    async fn get_job_run(
        &self,
        request: Request<pb::GetJobRunRequest>,
    ) -> Result<Response<pb::GetJobRunResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let run_id = request.into_inner().run_id;
        if run_id <= 0 {
            return Err(crate::status::to_status(CoreError::invalid(
                "run_id",
                "must be a positive job run id",
            )));
        }
        let run = jobs::get_run(&ctx, run_id).await.or_status()?;
        Ok(Response::new(pb::GetJobRunResponse {
            run: Some(to_proto(&run)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;
    use crate::status::to_status;

    #[test]
    fn a_run_maps_with_its_duration_and_an_unknown_job_names_the_field() {
        let started = Utc
            .with_ymd_and_hms(2026, 11, 28, 10, 0, 0)
            .single()
            .unwrap_or_default();
        let run = JobRunView {
            id: 7,
            job: "segment-sync".into(),
            holder: "scheduler@h:1:x".into(),
            started_at: started,
            finished_at: Some(started + chrono::Duration::milliseconds(2500)),
            state: RunState::Failed,
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

        let running = JobRunView {
            finished_at: None,
            state: RunState::Running,
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
        assert_eq!(parse_job("outbox-delivery").ok(), Some(Job::OutboxDelivery));
        for padded in [" segment-sync", "segment-sync ", "segment-sync\n", "   "] {
            let status = to_status(
                parse_job(padded)
                    .err()
                    .unwrap_or_else(|| panic!("{padded:?} was accepted")),
            );
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{padded:?}");
        }
        let huge = "x".repeat(1_000_000);
        let status = to_status(
            parse_job(&huge)
                .err()
                .unwrap_or_else(|| CoreError::invalid("x", "y")),
        );
        assert!(status.message().len() < 200, "{}", status.message());
    }
}
