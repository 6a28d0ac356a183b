//! `sharpsend-scheduler`: runs the background jobs on their cron schedules beside the server.
//!
//! `--list` prints the jobs and schedules; `--once <job>` runs one job once and exits non-zero if
//! it failed. Refuses to start while database migrations are pending.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sharpsend_core::{
    AppContext,
    config::{self, CioSettings, ProcessEnv},
    context::{Migrations, shutdown_signal},
    jobs::{self, Job, JobOutcome},
    outbox::DeliveryConfig,
    sends::SendConfig,
    telemetry::{self, TelemetryConfig},
};

#[derive(Debug, Parser)]
#[command(
    name = "sharpsend-scheduler",
    version,
    about = "Runs SharpSend ↔ Customer.io background jobs"
)]
struct Args {
    /// Run this job once and exit (non-zero on failure) instead of scheduling.
    #[arg(long, value_name = "JOB")]
    once: Option<Job>,
    /// List the jobs with their schedules and exit.
    #[arg(long, conflicts_with = "once")]
    list: bool,
    /// Log one JSON object per line.
    #[arg(long, env = "SHARPSEND_LOG_JSON")]
    json_logs: bool,
}

/// `service.name` of exported telemetry unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "sharpsend-scheduler";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // `--list` logs only; running jobs exports over OTLP when configured.
    let telemetry_config = if args.list {
        Ok(TelemetryConfig::logs_only(SERVICE_NAME, args.json_logs))
    } else {
        TelemetryConfig::from_env(&ProcessEnv, SERVICE_NAME, args.json_logs)
    };
    let _telemetry = match telemetry_config
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(telemetry::init(c)?))
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "sharpsend-scheduler stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let schedules = sharpsend_scheduler::schedules_from_env(&ProcessEnv)?;
    if args.list {
        println!(
            "{:<20} {:<20} {:<36} description",
            "job", "schedule", "variable"
        );
        for s in &schedules {
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
    let cio = CioSettings::from_env(&ProcessEnv)?;
    let database_url = config::database_url(&ProcessEnv);
    let mut ctx = AppContext::bootstrap(&database_url, &cio, Migrations::RequireCurrent)
        .await
        .context("start-up failed")?;
    ctx.delivery = std::sync::Arc::new(DeliveryConfig::from_env(&ProcessEnv)?);
    ctx.sends = std::sync::Arc::new(SendConfig::from_env(&ProcessEnv)?);
    let holder = jobs::default_holder("scheduler");

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
                eprintln!("{job}: {}", jobs::error_chain(&e));
                ExitCode::FAILURE
            }
        });
    }

    let scheduler = sharpsend_scheduler::start(ctx, schedules, holder).await?;
    tracing::info!(
        jobs = Job::ALL.len(),
        "scheduler running; Ctrl-C or SIGTERM stops it"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    scheduler.shutdown().await.context("scheduler shutdown")?;
    Ok(ExitCode::SUCCESS)
}
