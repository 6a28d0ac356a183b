//! Journey event benchmark: prints figures; checks only the counts, nothing about time.
//!
//! ```sh
//! cargo build --release --bin bench-journey
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test target/release/bench-journey
//! target/release/bench-journey --backends sqlite --members 100000
//! ```
//!
//! For each backend (a fresh SQLite file; a fresh PostgreSQL database under
//! `SHARPSEND_TEST_POSTGRES_URL`), an in-process simulator holds `--members` people in a manual
//! Customer.io segment, and SharpSend manages a segment of as many people, half of them in the
//! Customer.io segment too. It times `sharpsend_core::journey::trigger_journey_event` (no
//! gRPC, no delivery) for: the Customer.io segment (members read from the simulator over HTTP),
//! the same again (everything already recorded), the managed segment (members read from the
//! database), and both segments at once (people in both get one event). It prints the peak RSS
//! growth of each call (VmHWM of this process, reset before it; SQLite works in this process,
//! PostgreSQL in its own).

use sharpsend_tests::proc_stats::status_kib;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use sharpsend_core::context::Migrations;
use sharpsend_core::journey::{JourneyEventReport, JourneyEventRequest, trigger_journey_event};
use sharpsend_core::managed_segments::{self, NewSegment};
use sharpsend_core::{AppContext, segments};
use sharpsend_db::testing::{Backend, TestDatabase};

#[derive(Debug, Parser)]
#[command(
    about = "TriggerJourneyEvent: time to record an event for every member of large segments"
)]
struct Args {
    /// Members of each segment.
    #[arg(long, default_value_t = 50_000)]
    members: usize,
    /// Backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
}

async fn timed(
    ctx: &AppContext,
    label: &str,
    request: JourneyEventRequest,
) -> anyhow::Result<JourneyEventReport> {
    let can_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let baseline = status_kib(None, "VmRSS:").unwrap_or(0);
    let started = Instant::now();
    let report = trigger_journey_event(ctx, request).await?;
    let took = started.elapsed();
    let peak = status_kib(None, "VmHWM:")
        .filter(|_| can_reset)
        .map(|p| p.saturating_sub(baseline) as f64 / 1024.0);
    println!(
        "{label:<44} {:>7.2} s  {:>8.0} members/s  members {:>7}  recorded {:>7}  already {:>7}  peak RSS +{}",
        took.as_secs_f64(),
        report.members as f64 / took.as_secs_f64().max(1e-9),
        report.members,
        report.recorded,
        report.already_recorded,
        peak.map_or_else(|| "n/a".to_string(), |p| format!("{p:.1} MiB")),
    );
    Ok(report)
}

fn request(assignment_id: &str, segment_ids: &[i64]) -> JourneyEventRequest {
    let data = serde_json::json!({"headline": "Buy the dip", "tickers": ["AAPL", "MSFT"]});
    JourneyEventRequest {
        assignment_id: assignment_id.into(),
        event_name: String::new(),
        segment_ids: segment_ids.to_vec(),
        data: data.as_object().cloned().unwrap_or_default(),
    }
}

async fn bench(backend: Backend, members: usize) -> anyhow::Result<()> {
    let Some(db) = TestDatabase::create_migrated(backend).await? else {
        println!("\n== {backend:?}: skipped (SHARPSEND_TEST_POSTGRES_URL is not set) ==");
        return Ok(());
    };
    println!("\n== {backend:?}: segments of {members} members ==");
    let sim = cio_sim::Simulator::spawn(cio_sim::SimConfig {
        app_rate_limit_per_sec: 0,
        ..cio_sim::SimConfig::empty()
    })
    .await?;
    let mut settings = sharpsend_tests::sim_settings(&sim);
    settings.app_requests_per_sec = 1000;
    let ctx = AppContext::bootstrap(
        sharpsend_tests::test_settings(&db.url, settings),
        Migrations::Apply,
        sharpsend_core::clock::Clock::system(),
    )
    .await?;

    let ids: Vec<String> = (0..members + members / 2)
        .map(|i| format!("member-{i:07}"))
        .collect();
    for id in &ids {
        sim.sim.upsert_person(id, serde_json::Map::new());
    }
    let in_cio: Vec<&str> = ids[..members].iter().map(String::as_str).collect();
    let cio_segment = sim.sim.create_manual_segment("Bench readers", "");
    sim.sim.add_to_manual_segment(cio_segment, &in_cio)?;
    segments::sync_segments(&ctx, &sharpsend_core::jobs::Progress::untracked()).await?;
    let managed = managed_segments::create_segment(
        &ctx,
        NewSegment {
            name: "Bench managed".into(),
            description: String::new(),
            criteria: None,
        },
    )
    .await?
    .segment_id;
    for chunk in ids[members / 2..].chunks(managed_segments::limits::MEMBERS_PER_CALL) {
        managed_segments::add_members(&ctx, managed, chunk).await?;
    }

    let n = members as u64;
    let first = timed(
        &ctx,
        "Customer.io segment, all new",
        request("a-1", &[cio_segment]),
    )
    .await?;
    ensure!(first.members == n && first.recorded == n, "{first:?}");
    let again = timed(
        &ctx,
        "Customer.io segment, all already recorded",
        request("a-1", &[cio_segment]),
    )
    .await?;
    ensure!(
        again.already_recorded == n && again.recorded == 0,
        "{again:?}"
    );
    let own = timed(&ctx, "managed segment, all new", request("a-2", &[managed])).await?;
    ensure!(own.members == n && own.recorded == n, "{own:?}");
    let both = timed(
        &ctx,
        "both (half overlap), all new",
        request("a-3", &[cio_segment, managed]),
    )
    .await?;
    ensure!(
        both.members == ids.len() as u64 && both.recorded == ids.len() as u64,
        "{both:?}"
    );

    ctx.db.clone().close().await.context("closing the pool")?;
    db.cleanup().await;
    sim.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for name in &args.backends {
        let backend = match name.as_str() {
            "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres,
            other => anyhow::bail!("unknown backend {other}: sqlite or postgres"),
        };
        bench(backend, args.members).await?;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
