//! The job scheduler: runs every [`Job`] on its cron schedule with tokio-cron-scheduler.
//!
//! - [`start`]: registers every job on its schedule from the context's settings
//!   (`SHARPSEND_*_CRON`, six fields, seconds first) and starts the scheduler; used by the
//!   `sharpsend-scheduler`
//!   binary and by `sharpsend-server --dev`.
//!
//! A job is the one-step function in `sharpsend_core::jobs`; this crate only decides *when* it
//! runs. A run still going when its next tick comes is not started again in this process, and the
//! database lease keeps other replicas from running it at the same time.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use sharpsend_core::{
    AppContext,
    error::error_chain,
    jobs::{self, Job, JobOutcome, RunError},
    settings::Schedule,
};
use tokio_cron_scheduler::{JobScheduler, JobSchedulerError};

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the job scheduler: {0}")]
pub struct StartError(#[from] JobSchedulerError);

/// The running scheduler: cron jobs plus the continuous outbox worker.
pub struct RunningScheduler {
    scheduler: JobScheduler,
    worker: tokio::task::JoinHandle<()>,
    stop_worker: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningScheduler {
    /// Stops the outbox worker (it finishes the step in progress) and the cron scheduler.
    pub async fn shutdown(mut self) -> Result<(), JobSchedulerError> {
        if let Some(stop) = self.stop_worker.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.worker).await {
            tracing::warn!(error = %e, "outbox worker task ended abnormally");
        }
        self.scheduler.shutdown().await
    }
}

/// Registers every schedule of `ctx.settings`, starts the scheduler and the continuous outbox
/// worker (which wakes on in-process writes and polls for writes from other processes). Jobs run
/// as `holder`.
pub async fn start(ctx: AppContext, holder: String) -> Result<RunningScheduler, StartError> {
    let (stop_worker, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(sharpsend_core::outbox::run_worker(
        ctx.clone(),
        format!("{holder}/outbox"),
        ctx.settings.delivery.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let scheduler = JobScheduler::new().await?;
    let running: Arc<Mutex<HashSet<Job>>> = Arc::default();
    for Schedule { job, cron } in ctx.settings.schedules.clone() {
        let ctx = ctx.clone();
        let holder = holder.clone();
        let running = running.clone();
        let cron_job = tokio_cron_scheduler::Job::new_async(cron.as_str(), move |_, _| {
            let ctx = ctx.clone();
            let holder = holder.clone();
            let running = running.clone();
            Box::pin(async move {
                run_unless_running(&ctx, job, &holder, &running).await;
            })
        })?;
        scheduler.add(cron_job).await?;
        tracing::info!(job = job.name(), cron = %cron, "job scheduled");
    }
    scheduler.start().await?;
    Ok(RunningScheduler {
        scheduler,
        worker,
        stop_worker: Some(stop_worker),
    })
}

/// Runs `job` unless this process is already running it; answers whether it ran.
async fn run_unless_running(
    ctx: &AppContext,
    job: Job,
    holder: &str,
    running: &Mutex<HashSet<Job>>,
) -> bool {
    let newly_started = running
        .lock()
        .map(|mut set| set.insert(job))
        .unwrap_or(false);
    if !newly_started {
        tracing::info!(
            job = job.name(),
            "previous run still going; this tick is skipped"
        );
        return false;
    }
    match jobs::run_job(ctx, job, holder).await {
        Ok(JobOutcome::Succeeded { .. } | JobOutcome::Skipped { .. }) => {}
        // run_job has logged and recorded the failure; the next tick tries again.
        Err(RunError::Failed(_)) => {}
        Err(e @ RunError::Bookkeeping(_)) => {
            tracing::error!(job = job.name(), error = %error_chain(&e), "job run could not be recorded");
        }
    }
    if let Ok(mut set) = running.lock() {
        set.remove(&job);
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cio_sim::{Fault, SimApi, SimConfig, Simulator};
    use sharpsend_core::{
        clock::Clock,
        context::Migrations,
        settings::{CioSettings, Settings},
    };
    use sharpsend_db::{db_test, testing::TestDatabase};

    use super::*;

    db_test!(
        a_tick_while_the_job_is_still_running_is_skipped,
        |db: TestDatabase| async move {
            let sim = Simulator::spawn(SimConfig::demo()).await?;
            let config = sim.sim.config().clone();
            let settings = CioSettings::for_simulator(
                sim.base_url().parse()?,
                &config.site_id,
                &config.track_api_key,
                &config.app_api_key,
            );
            let settings = Settings {
                database_url: db.url.clone(),
                cio: Some(settings),
                ..Settings::default()
            };
            let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::system()).await?;
            // The first run is slow, so the next tick comes while it is still going.
            sim.sim.push_faults(
                Some(SimApi::App),
                [Fault::Delay(Duration::from_millis(1200))],
            );
            let running: Arc<Mutex<HashSet<Job>>> = Arc::default();

            let first = tokio::spawn({
                let (ctx, running) = (ctx.clone(), running.clone());
                async move { run_unless_running(&ctx, Job::SegmentSync, "tick-1", &running).await }
            });
            // The second tick comes once the first run is under way (its request has arrived).
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while sim.sim.request_count(SimApi::App) == 0 {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the first run never started"
                );
                tokio::task::yield_now().await;
            }
            let started = std::time::Instant::now();
            let second = run_unless_running(&ctx, Job::SegmentSync, "tick-2", &running).await;
            anyhow::ensure!(!second, "a second run started while the first was going");
            anyhow::ensure!(
                started.elapsed() < Duration::from_millis(500),
                "the skipped tick waited"
            );
            // Another job is not held back by it.
            anyhow::ensure!(
                run_unless_running(&ctx, Job::OutboxDelivery, "tick-3", &running).await
            );
            anyhow::ensure!(first.await?, "the first run did not run");

            // Only the first tick recorded a run of the job (no skipped run: it never got that far).
            let runs = sharpsend_db::jobs::recent_runs(
                &ctx.db,
                ctx.workspace_id(),
                Some("segment-sync"),
                10,
            )
            .await?;
            anyhow::ensure!(runs.len() == 1 && runs[0].holder == "tick-1", "{runs:?}");
            let lists = sim
                .sim
                .requests()
                .iter()
                .filter(|r| r.method == "GET" && r.path == "/v1/segments")
                .count();
            anyhow::ensure!(lists == 1, "listed segments {lists} times");
            // Once it finished, the next tick runs it again.
            anyhow::ensure!(run_unless_running(&ctx, Job::SegmentSync, "tick-4", &running).await);
            sim.shutdown().await;
            Ok::<(), anyhow::Error>(())
        }
    );
}
