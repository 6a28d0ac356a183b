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
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use sharpsend_core::{
    AppContext,
    error::error_chain,
    jobs::{self, Job, JobOutcome, RunError},
    settings::Schedule,
    tenants::Tenants,
};
use tokio_cron_scheduler::{JobScheduler, JobSchedulerError};

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the job scheduler: {0}")]
pub struct StartError(#[from] JobSchedulerError);

/// How often the outbox supervisor looks for workspaces created (or enabled) since it started.
pub const WORKSPACE_SCAN: std::time::Duration = std::time::Duration::from_secs(10);

/// The running scheduler: cron jobs plus one continuous outbox worker per workspace.
pub struct RunningScheduler {
    scheduler: JobScheduler,
    supervisor: tokio::task::JoinHandle<()>,
    stop_workers: tokio::sync::watch::Sender<bool>,
}

impl RunningScheduler {
    /// Stops the outbox workers (each finishes the step in progress) and the cron scheduler.
    pub async fn shutdown(mut self) -> Result<(), JobSchedulerError> {
        let _ = self.stop_workers.send(true);
        if let Err(e) = (&mut self.supervisor).await {
            tracing::warn!(error = %e, "outbox supervisor task ended abnormally");
        }
        self.scheduler.shutdown().await
    }
}

/// Registers every schedule of the settings, starts the scheduler and an outbox worker per
/// workspace (each wakes on in-process writes of its workspace and polls for writes from other
/// processes). Each tick runs its job for every enabled workspace ([`Tenants::all`]) at once, so a
/// long run in one workspace does not hold back another's. Jobs run as `holder`.
pub async fn start(
    tenants: impl Into<Tenants>,
    holder: String,
) -> Result<RunningScheduler, StartError> {
    let tenants: Tenants = tenants.into();
    let settings = tenants.default_context().settings.clone();
    let (stop_workers, stopped) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(supervise_workers(
        tenants.clone(),
        format!("{holder}/outbox"),
        stopped,
    ));
    let scheduler = JobScheduler::new().await?;
    let running: Running = Arc::default();
    for Schedule { job, cron } in settings.schedules.clone() {
        let tenants = tenants.clone();
        let holder = holder.clone();
        let running = running.clone();
        let cron_job = tokio_cron_scheduler::Job::new_async(cron.as_str(), move |_, _| {
            let tenants = tenants.clone();
            let holder = holder.clone();
            let running = running.clone();
            Box::pin(async move {
                run_everywhere(&tenants, job, &holder, &running).await;
            })
        })?;
        scheduler.add(cron_job).await?;
        tracing::info!(job = job.name(), cron = %cron, "job scheduled");
    }
    scheduler.start().await?;
    Ok(RunningScheduler {
        scheduler,
        supervisor,
        stop_workers,
    })
}

/// The (job, workspace) pairs this process is running.
type Running = Arc<Mutex<HashSet<(Job, i64)>>>;

/// Runs `job` in every enabled workspace concurrently.
async fn run_everywhere(tenants: &Tenants, job: Job, holder: &str, running: &Running) {
    if job.spans_workspaces() {
        run_unless_running(tenants.default_context(), job, holder, running).await;
        return;
    }
    let contexts = match tenants.all().await {
        Ok(contexts) => contexts,
        Err(e) => {
            tracing::error!(job = job.name(), error = %error_chain(&e), "could not list the workspaces; this tick is skipped");
            return;
        }
    };
    let runs = contexts
        .iter()
        .map(|ctx| run_unless_running(ctx, job, holder, running));
    futures::future::join_all(runs).await;
}

/// One workspace's outbox worker, with the context it was started with.
struct Worker {
    ctx: AppContext,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    fn start(ctx: AppContext, name: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(sharpsend_core::outbox::run_worker(
            ctx.clone(),
            name,
            ctx.settings.delivery.clone(),
            async move {
                let _ = stopped.wait_for(|stopped| *stopped).await;
            },
        ));
        Self { ctx, stop, task }
    }

    /// Tells the worker to stop after the step in progress (a drain can be long: nobody waits
    /// for it here); answers its task.
    fn stop(self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.send(true);
        self.task
    }
}

/// Keeps one outbox worker per enabled workspace until `stop` says so, then waits for them. A
/// workspace disabled (or gone) has its worker stopped; one whose context was rebuilt (rotated
/// credentials or limits) has its worker restarted with the new context.
async fn supervise_workers(
    tenants: Tenants,
    worker: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut workers: HashMap<i64, Worker> = HashMap::new();
    let mut stopping = Vec::new();
    loop {
        match tenants.all().await {
            Ok(contexts) => {
                let enabled: HashSet<i64> = contexts.iter().map(AppContext::workspace_id).collect();
                let gone: Vec<i64> = workers
                    .keys()
                    .filter(|id| !enabled.contains(id))
                    .copied()
                    .collect();
                for id in gone {
                    if let Some(old) = workers.remove(&id) {
                        tracing::info!(
                            workspace = id,
                            "workspace disabled: its outbox worker stops"
                        );
                        stopping.push(old.stop());
                    }
                }
                for ctx in contexts {
                    let workspace = ctx.workspace_id();
                    if let Some(running) = workers.get(&workspace) {
                        let same = Arc::ptr_eq(&running.ctx.workspace, &ctx.workspace);
                        if same && !running.task.is_finished() {
                            continue;
                        }
                    }
                    if let Some(old) = workers.remove(&workspace) {
                        stopping.push(old.stop());
                    }
                    let name = if workspace == tenants.default_context().workspace_id() {
                        worker.clone()
                    } else {
                        format!("{worker}/{workspace}")
                    };
                    workers.insert(workspace, Worker::start(ctx, name));
                }
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "could not list the workspaces; outbox workers unchanged");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = tokio::time::sleep(WORKSPACE_SCAN) => {}
        }
    }
    stopping.extend(workers.into_values().map(Worker::stop));
    for task in stopping {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "outbox worker task ended abnormally");
        }
    }
}

/// Runs `job` unless this process is already running it; answers whether it ran.
async fn run_unless_running(
    ctx: &AppContext,
    job: Job,
    holder: &str,
    running: &Mutex<HashSet<(Job, i64)>>,
) -> bool {
    let key = (job, ctx.workspace_id());
    let newly_started = running
        .lock()
        .map(|mut set| set.insert(key))
        .unwrap_or(false);
    if !newly_started {
        tracing::info!(
            job = job.name(),
            workspace = ctx.workspace_id(),
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
        set.remove(&key);
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
            let running: Running = Arc::default();

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
