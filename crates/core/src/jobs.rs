//! Background jobs. Each job is one step: a plain async function over an [`AppContext`]. The
//! scheduler's cron, `sharpsend-scheduler --once <job>`, dev mode and tests all run it through
//! [`run_job`], which takes the job's lease in the database (so two scheduler replicas never run
//! the same job at once) and records the run (start, end, outcome, counts, error). Callers that
//! must not wait (OpsService/RunJob, SegmentService/SyncSegments) use [`start`], which answers
//! the run at once and lets the work go on in this process; [`get_run`] follows it, and a job
//! may record its [`Progress`] in the run as it goes.

use std::{fmt, str::FromStr, time::Duration};

use serde_json::json;
use sharpsend_db::jobs::{self as job_store, RunOutcome, StartedRun};

use tracing::Instrument as _;

use crate::{AppContext, CoreError, error::error_chain, idempotency, segments};

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
    /// Advance running A/B tests (variant segments and sends), look at their results with the
    /// sequential rule, decide, and send the winner to the remainder (see
    /// [`crate::abtest::run`]).
    AbTestEvaluation,
    /// Re-seal stored workspace credentials sealed under an older master key with the current
    /// one (`SHARPSEND_MASTER_KEY`'s first), one guarded update per workspace (see
    /// [`crate::workspaces::rekey`]).
    SecretsRekey,
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
        Job::AbTestEvaluation,
        Job::SecretsRekey,
    ];

    /// Whether one run covers every workspace (secrets-rekey re-seals all stored credentials),
    /// so the scheduler runs it once, in the default workspace's context, not once per workspace.
    pub fn spans_workspaces(self) -> bool {
        matches!(self, Job::SecretsRekey)
    }

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
            Job::AbTestEvaluation => "abtest-evaluation",
            Job::SecretsRekey => "secrets-rekey",
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
            Job::AbTestEvaluation => {
                "advance A/B tests: variant segments and sends, sequential looks, decisions, the winner to the remainder"
            }
            Job::SecretsRekey => {
                "re-seal stored workspace credentials under the current master key"
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
            Job::AbTestEvaluation => "SHARPSEND_ABTEST_EVALUATION_CRON",
            Job::SecretsRekey => "SHARPSEND_SECRETS_REKEY_CRON",
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

/// Runs `job` once under its lease, recording the run, and answers when it has ended. `holder`
/// names this process. (The scheduler and tests; a caller that must not wait uses [`start`].)
///
/// The whole run (lease, work, record) is one `job` span, a child of the caller's span or a root
/// span under the scheduler; its outcome and duration are counted in `sharpsend.job.runs` /
/// `sharpsend.job.duration`.
pub async fn run_job(ctx: &AppContext, job: Job, holder: &str) -> Result<JobOutcome, RunError> {
    let span = job_span(job);
    let started = std::time::Instant::now();
    let result = async {
        match begin(ctx, job, holder).await? {
            Begun::Skipped(run_id) => Ok(JobOutcome::Skipped { run_id }),
            Begun::Leased(run_id) => work_and_record(ctx, job, holder, run_id).await,
        }
    }
    .instrument(span.clone())
    .await;
    record_outcome(&span, job, &result, started);
    result
}

/// Starts `job` under its lease and answers its run at once: RUNNING (the work goes on in a task
/// of this process, which records its end, counts and progress in the run), or SKIPPED when
/// another holder has the lease. Callers follow the run with [`get_run`].
pub async fn start(ctx: &AppContext, job: Job, holder: &str) -> Result<JobRunView, CoreError> {
    let run_id =
        job_store::start_run(&ctx.db, ctx.workspace_id(), job.name(), holder, ctx.now()).await?;
    launch(ctx, job, holder, run_id).await
}

/// Takes the lease for the recorded run `run_id` and lets the work go on in a task of its own
/// (or records the run as skipped); answers the run as it stands.
async fn launch(
    ctx: &AppContext,
    job: Job,
    holder: &str,
    run_id: i64,
) -> Result<JobRunView, CoreError> {
    let span = job_span(job);
    let started = std::time::Instant::now();
    let begun = lease_or_skip(ctx, job, holder, run_id)
        .instrument(span.clone())
        .await;
    match begun {
        Ok(Begun::Skipped(run_id)) => {
            record_outcome(&span, job, &Ok(JobOutcome::Skipped { run_id }), started);
        }
        Ok(Begun::Leased(run_id)) => {
            let ctx = ctx.clone();
            let holder = holder.to_string();
            tokio::spawn(async move {
                let result = work_and_record(&ctx, job, &holder, run_id)
                    .instrument(span.clone())
                    .await;
                record_outcome(&span, job, &result, started);
            });
        }
        Err(e) => {
            span.record("outcome", "not_recorded");
            span.record("otel.status_code", "error");
            crate::telemetry::metrics::job_run(job.name(), "not_recorded", started.elapsed());
            return Err(e.into());
        }
    }
    get_run(ctx, run_id).await
}

fn job_span(job: Job) -> tracing::Span {
    tracing::info_span!(
        "job",
        otel.name = %format_args!("job {}", job.name()),
        job = job.name(),
        run_id = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

fn record_outcome(
    span: &tracing::Span,
    job: Job,
    result: &Result<JobOutcome, RunError>,
    started: std::time::Instant,
) {
    let outcome = match result {
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
}

/// How [`begin`] left a run.
enum Begun {
    /// Recorded and leased: the work may go on.
    Leased(i64),
    /// Recorded as skipped: another holder has the lease.
    Skipped(i64),
}

/// Records the start of a run and takes the job's lease (or records the run as skipped).
async fn begin(ctx: &AppContext, job: Job, holder: &str) -> Result<Begun, sharpsend_db::DbError> {
    let ws = ctx.workspace_id();
    let started_at = ctx.now();
    let run_id = job_store::start_run(&ctx.db, ws, job.name(), holder, started_at).await?;
    lease_or_skip(ctx, job, holder, run_id).await
}

/// Takes the lease for the recorded run `run_id`, or records it as skipped.
async fn lease_or_skip(
    ctx: &AppContext,
    job: Job,
    holder: &str,
    run_id: i64,
) -> Result<Begun, sharpsend_db::DbError> {
    let ws = ctx.workspace_id();
    tracing::Span::current().record("run_id", run_id);
    let acquired =
        job_store::try_acquire_lease(&ctx.db, ws, job.name(), holder, LEASE_TTL, ctx.now()).await?;
    if acquired {
        // Holding the lease, no other run of this job is alive: older runs still recorded as
        // running died without recording their end.
        let started_before = ctx.now() - chrono::TimeDelta::seconds(LEASE_TTL.as_secs() as i64);
        let abandoned =
            job_store::abandon_stale_runs(&ctx.db, ws, job.name(), started_before, ctx.now())
                .await?;
        if abandoned > 0 {
            tracing::warn!(
                job = job.name(),
                abandoned,
                "closed runs whose process stopped without recording their end"
            );
        }
        return Ok(Begun::Leased(run_id));
    }
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
    Ok(Begun::Skipped(run_id))
}

/// Does the work of a leased run, releases the lease and records how the run ended.
async fn work_and_record(
    ctx: &AppContext,
    job: Job,
    holder: &str,
    run_id: i64,
) -> Result<JobOutcome, RunError> {
    tracing::info!(job = job.name(), run_id, "job started");
    let progress = Progress {
        run_id: Some(run_id),
    };
    let result = with_lease_renewal(ctx, job, holder, execute(ctx, job, &progress)).await;
    // The lease goes before the run's end is recorded: whoever sees the run ended may start the
    // job again at once (released after, that next run could find the lease still held and be
    // skipped). A run that outlived its lease term may meanwhile be closed as abandoned by the
    // next holder; the outcome recorded below replaces that.
    if let Err(e) = job_store::release_lease(&ctx.db, ctx.workspace_id(), job.name(), holder).await
    {
        tracing::warn!(job = job.name(), error = %error_chain(&e), "could not release lease; it lapses by itself");
    }
    let finished_at = ctx.now();
    match result {
        Ok(details) => job_store::finish_run(
            &ctx.db,
            run_id,
            RunOutcome::Succeeded,
            finished_at,
            details.clone(),
            None,
        )
        .await
        .map_err(RunError::Bookkeeping)
        .map(|()| {
            tracing::info!(job = job.name(), run_id, %details, "job succeeded");
            JobOutcome::Succeeded { run_id, details }
        }),
        Err(source) => {
            let summary = summarize(&source);
            tracing::warn!(job = job.name(), run_id, error = %summary, "job failed");
            // A failed run keeps the progress it recorded (how far it got).
            let details = match job_store::get_run(&ctx.db, ctx.workspace_id(), run_id).await {
                Ok(Some(run)) => run.details,
                _ => json!({}),
            };
            match job_store::finish_run(
                &ctx.db,
                run_id,
                RunOutcome::Failed,
                finished_at,
                details,
                Some(&summary),
            )
            .await
            {
                Ok(()) => Err(RunError::Failed(JobFailed {
                    job,
                    run_id,
                    summary,
                    source,
                })),
                Err(e) => Err(RunError::Bookkeeping(e)),
            }
        }
    }
}

/// Where a job reports how far it has got: its run's details while it runs (a failed run keeps
/// the last ones). A job run outside any recorded run (a direct call) reports nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    run_id: Option<i64>,
}

impl Progress {
    /// Reports nowhere.
    pub fn untracked() -> Self {
        Self::default()
    }

    /// Records `details` as the run's progress (best effort: a failure is logged, and the run's
    /// end is recorded anyway).
    pub async fn report(&self, ctx: &AppContext, details: serde_json::Value) {
        let Some(run_id) = self.run_id else {
            return;
        };
        if let Err(e) = job_store::record_progress(&ctx.db, run_id, details).await {
            tracing::warn!(run_id, error = %error_chain(&e), "could not record a job's progress");
        }
    }
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
async fn execute(
    ctx: &AppContext,
    job: Job,
    progress: &Progress,
) -> Result<serde_json::Value, CoreError> {
    match job {
        Job::SegmentSync => Ok(segments::sync_segments(ctx, progress).await?.details()),
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
                "incremental": report.incremental,
                "drift_found": report.drift_found,
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
        Job::AbTestEvaluation => Ok(report_details(&crate::abtest::run::evaluate(ctx).await?)),
        Job::SecretsRekey => Ok(report_details(&crate::workspaces::rekey(ctx).await?)),
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
///
/// Customer.io's refusals say what to do, as the gRPC statuses do: rejected credentials name the
/// variable to check, an outage or a rate limit says so.
fn summarize(error: &CoreError) -> String {
    use cio_client::{Api, CioError};
    match error {
        CoreError::Database(e) => {
            tracing::error!(error = %error_chain(e), "database failure in job");
            "database failure (see the log)".to_string()
        }
        CoreError::Upstream(CioError::Unauthorized { api, .. }) => format!(
            "Customer.io rejected this workspace's {api} API credentials; check {} (and CIO_REGION)",
            match api {
                Api::Track => "CIO_SITE_ID / CIO_TRACK_API_KEY",
                Api::App => "CIO_APP_API_KEY",
            }
        ),
        CoreError::Upstream(
            e @ (CioError::Server { .. } | CioError::Timeout { .. } | CioError::Transport { .. }),
        ) => format!("Customer.io is unavailable: {}", error_chain(e)),
        CoreError::Upstream(e @ CioError::RateLimited { .. }) => {
            format!(
                "Customer.io is rate limiting this workspace: {}",
                error_chain(e)
            )
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

/// One run by id; `NotFound` for a run this workspace does not have.
pub async fn get_run(ctx: &AppContext, run_id: i64) -> Result<JobRunView, CoreError> {
    job_store::get_run(&ctx.db, ctx.workspace_id(), run_id)
        .await?
        .map(JobRunView::from)
        .ok_or_else(|| CoreError::NotFound {
            what: "job run",
            id: run_id.to_string(),
        })
}

/// The operation name of RunJob's idempotency keys.
pub const RUN_JOB_OPERATION: &str = "RunJob";

/// Starts `job` now for `caller` (through its lease, as the scheduler would) and answers its run
/// at once (see [`start`]); the caller follows it with [`get_run`].
///
/// With a `request_id` (see [`crate::idempotency`]) at most one run is started per request id,
/// even by concurrent calls: a retry answers the first call's run as it stands now (`false`: not
/// started by this call); the request id used for another job is `AlreadyExists`.
pub async fn run_now(
    ctx: &AppContext,
    job: Job,
    caller: &str,
    request_id: &str,
) -> Result<(JobRunView, bool), CoreError> {
    idempotency::check_request_id(request_id)?;
    let holder = ctx.holder(&format!("server-ops({caller})"));
    tracing::info!(job = job.name(), caller = %caller, "job run requested");
    if request_id.is_empty() {
        return Ok((start(ctx, job, &holder).await?, true));
    }
    let request = json!({ "job": job.name() });
    let started = job_store::start_run_once(
        &ctx.db,
        ctx.workspace_id(),
        job.name(),
        &holder,
        ctx.now(),
        RUN_JOB_OPERATION,
        request_id,
        &request,
    )
    .await?;
    match started {
        StartedRun::New(run_id) => Ok((launch(ctx, job, &holder, run_id).await?, true)),
        StartedRun::Existing(key) => {
            let describe = |id: i64| format!("job run {id}");
            idempotency::same_request(
                RUN_JOB_OPERATION,
                request_id,
                &key.request,
                &request,
                key.result_id.map(describe),
            )?;
            let run_id = key.result_id.ok_or_else(|| {
                CoreError::Internal("a RunJob request_id was recorded without its run".into())
            })?;
            Ok((get_run(ctx, run_id).await?, false))
        }
    }
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
