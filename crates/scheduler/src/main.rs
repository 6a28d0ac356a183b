//! `sharpsend-scheduler`: runs the background jobs on their cron schedules beside the server.
//!
//! `--list` prints the jobs and schedules; `--once <job>` runs one job once and exits non-zero if
//! it failed. Refuses to start while database migrations are pending.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::{Migrations, shutdown_signal},
    error::error_chain,
    jobs::{self, Job, JobOutcome},
    settings::{self, Binary, Mode, ProcessEnv, Settings},
    telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "sharpsend-scheduler",
    version,
    about = "Runs SharpSend ↔ Customer.io background jobs",
    after_help = settings::help(Binary::Scheduler)
)]
struct Args {
    /// Run this job once and exit (non-zero on failure) instead of scheduling.
    #[arg(long, value_name = "JOB")]
    once: Option<Job>,
    /// List the jobs with their schedules and exit.
    #[arg(long, conflicts_with = "once")]
    list: bool,
    /// Log one JSON object per line (or SHARPSEND_LOG_JSON=true).
    #[arg(long)]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mode = if args.list {
        Mode::Maintenance
    } else {
        Mode::Production
    };
    // Every setting is read and checked here, once; a bad one stops start-up naming it.
    let mut settings = match Settings::from_env(&ProcessEnv, Binary::Scheduler, mode) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    settings.telemetry.json_logs |= args.json_logs;
    // `--list` logs only; running jobs exports over OTLP when configured.
    let mut telemetry_config = settings.telemetry.clone();
    if args.list {
        telemetry_config.otlp = None;
    }
    let _telemetry = match telemetry::init(telemetry_config) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(args, settings).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "sharpsend-scheduler stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    if args.list {
        println!(
            "{:<20} {:<20} {:<36} description",
            "job", "schedule", "variable"
        );
        for s in &settings.schedules {
            println!(
                "{:<20} {:<20} {:<36} {}",
                s.job.name(),
                s.cron,
                s.job.schedule_variable(),
                s.job.description()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = AppContext::bootstrap(settings, Migrations::RequireCurrent, Clock::system())
        .await
        .context("start-up failed")?;
    sharpsend_core::context::check_customer_io(&ctx).await?;
    let holder = ctx.holder("scheduler");

    if let Some(job) = args.once {
        return Ok(match jobs::run_job(&ctx, job, &holder).await {
            Ok(JobOutcome::Succeeded { run_id, details }) => {
                println!("{job}: succeeded (run {run_id}) {details}");
                ExitCode::SUCCESS
            }
            Ok(JobOutcome::Skipped { run_id }) => {
                println!("{job}: skipped (run {run_id}): another scheduler holds its lease");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{job}: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        });
    }

    let scheduler = sharpsend_scheduler::start(ctx, holder).await?;
    tracing::info!(
        jobs = Job::ALL.len(),
        "scheduler running; Ctrl-C or SIGTERM stops it"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    scheduler.shutdown().await.context("scheduler shutdown")?;
    Ok(ExitCode::SUCCESS)
}
