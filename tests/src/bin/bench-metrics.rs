//! Sweep benchmark (metrics-poll and segment-sync): prints figures, asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/bench-metrics                          # SQLite; --database-url postgres://… for PostgreSQL
//! target/release/bench-metrics --targets 500 --app-rate 10
//! ```
//!
//! Starts the Customer.io simulator in this process (App API limited to `--app-rate`
//! requests/s, Customer.io's 10/s by default) with `--targets` newsletters, each sent to a small
//! manual segment so its metrics are not empty, mirrors them with the `campaign-sync` step, then
//! runs one full `metrics-poll` sweep (every newsletter due, the per-run cap lifted) and prints
//! the number of targets N, the sweep's time against the ideal N / rate, the 429s the simulator
//! answered, and the App API requests the sweep made. Then, with `--segments` S > 0, one
//! `segment-sync` of S more manual segments (one member count request each), with the same
//! figures against the ideal requests / rate.

use std::time::Instant;

use anyhow::ensure;
use cio_sim::{AudienceFilter, NewNewsletter, SimApi, SimConfig, Simulator};
use clap::Parser;
use sharpsend_core::{AppContext, campaigns, context::Migrations, jobs::Progress, metrics};

#[derive(Debug, Parser)]
#[command(about = "One metrics-poll sweep of N targets against the simulator's App API limit")]
struct Args {
    /// Newsletters to create and poll.
    #[arg(long, default_value_t = 200)]
    targets: usize,
    /// App API limit, requests/s (the simulator enforces it; the client paces to it).
    #[arg(long, default_value_t = 10)]
    app_rate: u32,
    /// Metrics requests in flight at once during the sweep.
    #[arg(long, default_value_t = metrics::PollOptions::default().concurrency)]
    concurrency: usize,
    /// Segments for the segment-sync sweep (0: skip it).
    #[arg(long, default_value_t = 0)]
    segments: usize,
    /// Database; default a fresh SQLite file.
    #[arg(long)]
    database_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cio_client::install_crypto_provider();
    let sim = Simulator::spawn(SimConfig {
        app_rate_limit_per_sec: args.app_rate,
        ..SimConfig::empty()
    })
    .await?;
    let readers = ["r1", "r2", "r3"];
    for (i, id) in readers.iter().enumerate() {
        let attributes = serde_json::json!({ "email": format!("reader{i}@bench.example") });
        sim.upsert_person(id, attributes.as_object().cloned().unwrap_or_default());
    }
    let segment = sim.create_manual_segment("Bench readers", "");
    sim.add_to_manual_segment(segment, &readers)?;
    for i in 0..args.targets {
        let newsletter = NewNewsletter::new(
            &format!("Bench note {i}"),
            "Note",
            "<p>n</p>",
            AudienceFilter::segment(segment),
        );
        let id = sim.add_newsletter(newsletter)?;
        sim.send_newsletter(id)?;
    }

    let dir = tempfile::tempdir()?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()));
    let mut settings = sharpsend_tests::sim_settings(&sim);
    settings.app_requests_per_sec = args.app_rate;
    let ctx = AppContext::bootstrap(
        sharpsend_tests::test_settings(&database_url, settings),
        Migrations::Apply,
        sharpsend_core::clock::Clock::system(),
    )
    .await?;
    let synced = campaigns::sync_campaigns(&ctx).await?;
    ensure!(
        synced.targets.added as usize >= args.targets,
        "only {} targets: {synced:?}",
        synced.targets.added
    );

    sim.clear_requests();
    let before = sim.request_count(SimApi::App);
    let options = metrics::PollOptions {
        max_targets: u64::MAX,
        concurrency: args.concurrency,
    };
    let started = Instant::now();
    let report = metrics::poll_due_with(&ctx, &options).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = sim.request_count(SimApi::App) - before;
    let limited = sim
        .requests()
        .iter()
        .filter(|r| r.api == SimApi::App && r.status == 429)
        .count();
    ensure!(report.failed == 0 && report.deferred == 0, "{report:?}");

    let n = report.polled as f64;
    let ideal = n / f64::from(args.app_rate);
    println!(
        "metrics sweep: App API limited to {} requests/s, {} in flight, database {}",
        args.app_rate,
        args.concurrency,
        if args.database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );
    println!(
        "{:>8} {:>10} {:>10} {:>8} {:>6} {:>9}",
        "N", "elapsed s", "N/rate s", "ratio", "429s", "requests"
    );
    println!(
        "{:>8} {:>10.2} {:>10.2} {:>8.3} {:>6} {:>9}",
        report.polled,
        elapsed,
        ideal,
        elapsed / ideal,
        limited,
        requests
    );
    let sample =
        sharpsend_db::metrics::due(&ctx.db, ctx.workspace_id(), chrono::Utc::now(), 1).await?;
    println!("left due after the sweep: {}", sample.len());

    if args.segments > 0 {
        segment_sync_sweep(&sim, &ctx, &args).await?;
    }
    Ok(())
}

/// One segment-sync of `--segments` more segments, timed against requests / rate.
async fn segment_sync_sweep(
    sim: &cio_sim::Simulator,
    ctx: &AppContext,
    args: &Args,
) -> anyhow::Result<()> {
    for i in 0..args.segments {
        sim.create_manual_segment(&format!("Bench segment {i}"), "");
    }
    sim.clear_requests();
    let before = sim.request_count(SimApi::App);
    let started = Instant::now();
    let report = sharpsend_core::segments::sync_segments(ctx, &Progress::untracked()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let requests = sim.request_count(SimApi::App) - before;
    let limited = sim
        .requests()
        .iter()
        .filter(|r| r.api == SimApi::App && r.status == 429)
        .count();
    ensure!(
        report.synced as usize > args.segments,
        "only {} segments synced",
        report.synced
    );
    let ideal = requests as f64 / f64::from(args.app_rate);
    println!();
    println!(
        "segment-sync sweep: App API limited to {} requests/s",
        args.app_rate
    );
    println!(
        "{:>8} {:>10} {:>14} {:>8} {:>6} {:>9}",
        "N", "elapsed s", "requests/rate", "ratio", "429s", "requests"
    );
    println!(
        "{:>8} {:>10.2} {:>14.2} {:>8.3} {:>6} {:>9}",
        report.synced,
        elapsed,
        ideal,
        elapsed / ideal,
        limited,
        requests
    );
    Ok(())
}
