//! Background jobs. Each job is one step: a plain async function over an [`AppContext`]. The
//! scheduler's cron, `sharpsend-scheduler --once <job>`, dev mode and tests all run it through
//! [`run_job`], which takes the job's lease in the database (so two scheduler replicas never run
//! the same job at once) and records the run (start, end, outcome, counts, error).

use std::{fmt, str::FromStr, time::Duration};

use serde_json::json;
use sharpsend_db::jobs::{self as job_store, RunOutcome};

use tracing::Instrument as _;

use crate::{AppContext, CoreError, error::error_chain, segments};

/// Every background job the service has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// Pull segments and their member counts from Customer.io into the mirror.
    SegmentSync,
    /// Deliver accepted writes from the outbox to Customer.io until none is due. The scheduler
    /// also runs a continuous worker that wakes on new writes; this job is its `--once` form and
    /// its safety net.
    OutboxDelivery,
    /// Re-evaluate due SharpSend-managed segments (criteria over the profile mirror) and queue
    /// their membership changes for Customer.io.
    SegmentEvaluation,
    /// Pull campaigns, API-triggered broadcasts and newsletters into the mirror.
    CampaignSync,
    /// Poll the metrics of campaigns, broadcasts and newsletters that are due (recent ones often,
    /// old ones rarely) into snapshots.
    MetricsPoll,
    /// Submit due send submissions (pending ones whose broadcast window is open).
    SendDispatch,
    /// Settle uncertain submissions by looking for them in Customer.io, and follow submitted
    /// ones to completion.
    SendReconcile,
    /// Read the per-delivery records of recent sends into delivery events (the path without
    /// reporting webhooks; nothing is counted twice when both run).
    DeliveryPoll,
    /// Score each person's engagement from delivery events and write the scores that changed
    /// to the mirror and the outbox.
    EngagementScoring,
    /// Bring Customer.io's changes into the profile mirror: the activity feed, or a backfill
    /// by export when the feed cannot tell (see [`crate::profile_sync`]).
    ProfileSync,
}

impl Job {
    pub const ALL: &'static [Job] = &[
        Job::SegmentSync,
        Job::OutboxDelivery,
        Job::SegmentEvaluation,
        Job::CampaignSync,
        Job::MetricsPoll,
        Job::SendDispatch,
        Job::SendReconcile,
        Job::DeliveryPoll,
        Job::EngagementScoring,
        Job::ProfileSync,
    ];

    /// The name used on the command line, in job runs and in leases.
    pub fn name(self) -> &'static str {
        match self {
            Job::SegmentSync => "segment-sync",
            Job::OutboxDelivery => "outbox-delivery",
            Job::SegmentEvaluation => "segment-evaluation",
            Job::CampaignSync => "campaign-sync",
            Job::MetricsPoll => "metrics-poll",
            Job::SendDispatch => "send-dispatch",
            Job::SendReconcile => "send-reconcile",
            Job::DeliveryPoll => "delivery-poll",
            Job::EngagementScoring => "engagement-scoring",
            Job::ProfileSync => "profile-sync",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Job::SegmentSync => "pull segments and member counts from Customer.io into the mirror",
            Job::OutboxDelivery => "deliver accepted attribute updates and events to Customer.io",
            Job::SegmentEvaluation => {
                "re-evaluate due managed segments and queue their membership changes"
            }
            Job::CampaignSync => {
                "pull campaigns, API-triggered broadcasts and newsletters into the mirror"
            }
            Job::MetricsPoll => {
                "poll due campaign, broadcast and newsletter metrics into snapshots"
            }
            Job::SendDispatch => {
                "submit due assignment sends to Customer.io (one trigger per broadcast window)"
            }
            Job::SendReconcile => {
                "settle uncertain sends from Customer.io's records; follow submitted ones to completion"
            }
            Job::DeliveryPoll => "read per-delivery records of recent sends into delivery events",
            Job::EngagementScoring => {
                "score engagement per person; write changed scores to the mirror and Customer.io"
            }
            Job::ProfileSync => {
                "bring Customer.io's attribute changes into the profile mirror (feed, or backfill by export)"
            }
        }
    }

    /// The environment variable holding the schedule (declared with its default in
    /// [`crate::settings::VARIABLES`]).
    pub fn schedule_variable(self) -> &'static str {
        match self {
            Job::SegmentSync => "SHARPSEND_SEGMENT_SYNC_CRON",
            Job::OutboxDelivery => "SHARPSEND_OUTBOX_DELIVERY_CRON",
            Job::SegmentEvaluation => "SHARPSEND_SEGMENT_EVALUATION_CRON",
            Job::CampaignSync => "SHARPSEND_CAMPAIGN_SYNC_CRON",
            Job::MetricsPoll => "SHARPSEND_METRICS_POLL_CRON",
            Job::SendDispatch => "SHARPSEND_SEND_DISPATCH_CRON",
            Job::SendReconcile => "SHARPSEND_SEND_RECONCILE_CRON",
            Job::DeliveryPoll => "SHARPSEND_DELIVERY_POLL_CRON",
            Job::EngagementScoring => "SHARPSEND_ENGAGEMENT_SCORING_CRON",
            Job::ProfileSync => "SHARPSEND_PROFILE_SYNC_CRON",
        }
    }
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A job name that is not one of [`Job::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job `{0}`; known jobs: {known}", known = known_jobs())]
pub struct UnknownJob(pub String);

fn known_jobs() -> String {
    Job::ALL
        .iter()
        .map(|j| j.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Job {
    type Err = UnknownJob;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Job::ALL
            .iter()
            .copied()
            .find(|j| j.name() == s)
            .ok_or_else(|| UnknownJob(s.to_string()))
    }
}

/// How long a lease lasts without renewal; a crashed holder's lease lapses after this.
pub const LEASE_TTL: Duration = Duration::from_secs(120);

/// What [`run_job`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// The job ran; `details` holds its counts.
    Succeeded {
        run_id: i64,
        details: serde_json::Value,
    },
    /// Another holder has the lease; the job did not run here.
    Skipped { run_id: i64 },
}

/// A job run that failed; the run is recorded as failed with `summary`.
#[derive(Debug, thiserror::Error)]
#[error("job {job} failed (run {run_id}): {summary}")]
pub struct JobFailed {
    pub job: Job,
    pub run_id: i64,
    pub summary: String,
    #[source]
    pub source: CoreError,
}

/// Runs `job` once under its lease, recording the run. `holder` names this process.
///
/// The whole run (lease, work, record) is one `job` span, a child of the caller's span (e.g. an
/// `OpsService/RunJob` call) or a root span under the scheduler; its outcome and duration are
/// counted in `sharpsend.job.runs` / `sharpsend.job.duration`.
pub async fn run_job(ctx: &AppContext, job: Job, holder: &str) -> Result<JobOutcome, RunError> {
    let span = tracing::info_span!(
        "job",
        otel.name = %format_args!("job {}", job.name()),
        job = job.name(),
        run_id = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let result = run_job_recorded(ctx, job, holder)
        .instrument(span.clone())
        .await;
    let outcome = match &result {
        Ok(JobOutcome::Succeeded { .. }) => RunOutcome::Succeeded.as_str(),
        Ok(JobOutcome::Skipped { .. }) => RunOutcome::Skipped.as_str(),
        Err(RunError::Failed(_)) => RunOutcome::Failed.as_str(),
        Err(RunError::Bookkeeping(_)) => "not_recorded",
    };
    span.record("outcome", outcome);
    if result.is_err() {
        span.record("otel.status_code", "error");
    }
    crate::telemetry::metrics::job_run(job.name(), outcome, started.elapsed());
    result
}

async fn run_job_recorded(
    ctx: &AppContext,
    job: Job,
    holder: &str,
) -> Result<JobOutcome, RunError> {
    let ws = ctx.workspace_id();
    let started_at = ctx.now();
    let run_id = job_store::start_run(&ctx.db, ws, job.name(), holder, started_at).await?;
    tracing::Span::current().record("run_id", run_id);
    let acquired =
        job_store::try_acquire_lease(&ctx.db, ws, job.name(), holder, LEASE_TTL, started_at)
            .await?;
    if !acquired {
        job_store::finish_run(
            &ctx.db,
            run_id,
            RunOutcome::Skipped,
            ctx.now(),
            json!({"reason": "lease held by another holder"}),
            None,
        )
        .await?;
        tracing::info!(
            job = job.name(),
            run_id,
            "skipped: another holder has the lease"
        );
        return Ok(JobOutcome::Skipped { run_id });
    }

    tracing::info!(job = job.name(), run_id, "job started");
    let result = with_lease_renewal(ctx, job, holder, execute(ctx, job)).await;
    let finished_at = ctx.now();
    let outcome = match result {
        Ok(details) => {
            job_store::finish_run(
                &ctx.db,
                run_id,
                RunOutcome::Succeeded,
                finished_at,
                details.clone(),
                None,
            )
            .await?;
            tracing::info!(job = job.name(), run_id, %details, "job succeeded");
            Ok(JobOutcome::Succeeded { run_id, details })
        }
        Err(source) => {
            let summary = summarize(&source);
            tracing::warn!(job = job.name(), run_id, error = %summary, "job failed");
            job_store::finish_run(
                &ctx.db,
                run_id,
                RunOutcome::Failed,
                finished_at,
                json!({}),
                Some(&summary),
            )
            .await?;
            Err(RunError::Failed(JobFailed {
                job,
                run_id,
                summary,
                source,
            }))
        }
    };
    if let Err(e) = job_store::release_lease(&ctx.db, ws, job.name(), holder).await {
        tracing::warn!(job = job.name(), error = %error_chain(&e), "could not release lease; it lapses by itself");
    }
    outcome
}

/// Why [`run_job`] returned an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job ran and failed.
    #[error(transparent)]
    Failed(JobFailed),
    /// The lease or the run record could not be written.
    #[error("could not record the job run")]
    Bookkeeping(#[from] sharpsend_db::DbError),
}

/// The one step of each job.
async fn execute(ctx: &AppContext, job: Job) -> Result<serde_json::Value, CoreError> {
    match job {
        Job::SegmentSync => {
            let report = segments::sync_segments(ctx).await?;
            Ok(json!({
                "created": report.counts.created,
                "updated": report.counts.updated,
                "removed": report.counts.removed,
                "unchanged": report.counts.unchanged,
                "duration_ms": report.duration.as_millis() as u64,
            }))
        }
        Job::OutboxDelivery => {
            let report =
                crate::outbox::drain(ctx, &ctx.holder("outbox-job"), &ctx.settings.delivery)
                    .await?;
            crate::telemetry::metrics::refresh_outbox_gauges(ctx).await;
            Ok(json!({
                "claimed": report.claimed,
                "delivered": report.delivered,
                "retried": report.retried,
                "dead": report.dead,
                "requests": report.requests,
            }))
        }
        Job::SegmentEvaluation => {
            let report =
                crate::managed_segments::evaluate_due(ctx, &ctx.settings.evaluation).await?;
            Ok(json!({
                "evaluated": report.evaluated,
                "added": report.added,
                "removed": report.removed,
                "outbox_rows": report.outbox_rows,
                "memberships_refreshed": report.memberships_refreshed,
                "failed": report.failed,
            }))
        }
        Job::CampaignSync => Ok(report_details(
            &crate::campaigns::sync_campaigns(ctx).await?,
        )),
        Job::MetricsPoll => Ok(report_details(&crate::metrics::poll_due(ctx).await?)),
        Job::SendDispatch => Ok(report_details(&crate::sends::dispatch_due(ctx).await?)),
        Job::SendReconcile => Ok(report_details(&crate::sends::reconcile(ctx).await?)),
        Job::DeliveryPoll => Ok(report_details(&crate::engagement::poll(ctx).await?)),
        Job::EngagementScoring => Ok(report_details(&crate::engagement::score(ctx).await?)),
        Job::ProfileSync => Ok(report_details(&crate::profile_sync::sync(ctx).await?)),
    }
}

/// A job report as the run's details (its fields as a JSON object).
fn report_details(report: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(report)
        .unwrap_or_else(|e| json!({ "report": format!("unserializable: {e}") }))
}

/// Runs `work` while renewing the lease every third of its lifetime.
async fn with_lease_renewal<T>(
    ctx: &AppContext,
    job: Job,
    holder: &str,
    work: impl Future<Output = T>,
) -> T {
    let renew = async {
        let mut every = tokio::time::interval(LEASE_TTL / 3);
        every.tick().await;
        loop {
            every.tick().await;
            match job_store::renew_lease(
                &ctx.db,
                ctx.workspace_id(),
                job.name(),
                holder,
                LEASE_TTL,
                ctx.now(),
            )
            .await
            {
                Ok(true) => {}
                Ok(false) => tracing::warn!(job = job.name(), "lease lost while running"),
                Err(e) => {
                    tracing::warn!(job = job.name(), error = %error_chain(&e), "lease renewal failed")
                }
            }
        }
    };
    tokio::select! {
        out = work => out,
        never = renew => never,
    }
}

/// A short, caller-safe description of a failure for the job-run record: upstream errors in full
/// (they carry no secrets), database errors without their text (that goes to the log only).
fn summarize(error: &CoreError) -> String {
    match error {
        CoreError::Database(e) => {
            tracing::error!(error = %error_chain(e), "database failure in job");
            "database failure (see the scheduler's log)".to_string()
        }
        other => error_chain(other),
    }
}

/// A job with its schedule, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub job: Job,
    /// The schedule in force (its variable's value, or the default).
    pub schedule: String,
    pub default_schedule: &'static str,
}

/// Every job with its schedule from the settings.
pub fn list_jobs(ctx: &AppContext) -> Vec<JobInfo> {
    Job::ALL
        .iter()
        .map(|&job| JobInfo {
            job,
            schedule: ctx
                .settings
                .schedules
                .iter()
                .find(|s| s.job == job)
                .map(|s| s.cron.clone())
                .unwrap_or_default(),
            default_schedule: crate::settings::declared_default(job.schedule_variable())
                .unwrap_or_default(),
        })
        .collect()
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    /// Another runner held the lease.
    Skipped,
}

/// One recorded run of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRunView {
    pub id: i64,
    pub job: String,
    /// Who ran it (`component@host:pid:ulid`).
    pub holder: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub state: RunState,
    /// Job-specific counts; `{}` while running.
    pub details: serde_json::Value,
    pub error: Option<String>,
}

impl From<job_store::JobRun> for JobRunView {
    fn from(run: job_store::JobRun) -> Self {
        Self {
            id: run.id,
            job: run.job,
            holder: run.holder,
            started_at: run.started_at,
            finished_at: run.finished_at,
            state: match run.outcome {
                RunOutcome::Running => RunState::Running,
                RunOutcome::Succeeded => RunState::Succeeded,
                RunOutcome::Failed => RunState::Failed,
                RunOutcome::Skipped => RunState::Skipped,
            },
            details: run.details,
            error: run.error,
        }
    }
}

/// The latest runs (of one job, or of all), newest first, at most `limit`.
pub async fn recent_runs(
    ctx: &AppContext,
    job: Option<Job>,
    limit: u64,
) -> Result<Vec<JobRunView>, CoreError> {
    let runs =
        job_store::recent_runs(&ctx.db, ctx.workspace_id(), job.map(Job::name), limit).await?;
    Ok(runs.into_iter().map(JobRunView::from).collect())
}

/// Runs `job` now for `caller` (through its lease, as the scheduler would) and answers the run
/// as recorded. The run goes on in a task of its own, so it finishes (releasing its lease and
/// recording its end) even if the caller stops waiting.
pub async fn run_now(ctx: &AppContext, job: Job, caller: &str) -> Result<JobRunView, CoreError> {
    let holder = ctx.holder(&format!("server-ops({caller})"));
    tracing::info!(job = job.name(), caller = %caller, "job run requested");
    let task = tokio::spawn({
        let ctx = ctx.clone();
        async move { run_job(&ctx, job, &holder).await }.instrument(tracing::Span::current())
    });
    let result = match task.await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(job = job.name(), error = %e, "job task ended abnormally");
            return Err(CoreError::Internal(format!(
                "the {job} run ended abnormally"
            )));
        }
    };
    let run_id = match result {
        Ok(JobOutcome::Succeeded { run_id, .. } | JobOutcome::Skipped { run_id }) => run_id,
        Err(RunError::Failed(failed)) => failed.run_id,
        Err(RunError::Bookkeeping(e)) => return Err(e.into()),
    };
    job_store::get_run(&ctx.db, ctx.workspace_id(), run_id)
        .await?
        .map(JobRunView::from)
        .ok_or_else(|| CoreError::Internal(format!("the {job} run {run_id} was not recorded")))
}

/// A holder name for this process: `component@host:pid:ulid`, unique among replicas.
pub fn holder_name(component: &str, host: &str) -> String {
    format!(
        "{component}@{host}:{}:{}",
        std::process::id(),
        ulid::Ulid::new()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_round_trip_and_unknown_names_list_the_known_ones() {
        for job in Job::ALL {
            assert_eq!(job.name().parse::<Job>(), Ok(*job));
        }
        let err = "segment-synk"
            .parse::<Job>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("segment-synk") && err.contains("segment-sync"),
            "{err}"
        );
    }
}
