//! Profile backfill benchmark: prints figures, asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bin bench-backfill
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test target/release/bench-backfill
//! target/release/bench-backfill --profiles 200000 --sizes 50000,100000
//! ```
//!
//! Two parts, both on PostgreSQL (a fresh database per run under
//! `SHARPSEND_TEST_POSTGRES_URL`):
//!
//! 1. **App API requests**: the whole `profile-sync` backfill against the simulator
//!    (`--sim-people` demo people, export path forced): segment-sync, then profile-sync until
//!    the export is loaded. Prints the App API requests the backfill used, by route.
//! 2. **Load rate and memory**: an export file of N profiles (`--sizes`, then `--profiles`;
//!    id, email, cio_id and six attributes, written to a temporary file first) is served over
//!    HTTP by this process, read with `CioClient::export_rows` (the signed-link download,
//!    streamed) and loaded by `sharpsend_core::profile_sync::load_export_rows` — the code the
//!    job runs after the download — into an empty mirror. Prints profiles/s (target ≥ 50,000/s)
//!    and the peak RSS of this process during the load (VmHWM reset before it; PostgreSQL works
//!    in its own processes), so memory can be compared across N.

use sharpsend_tests::proc_stats::{cpu_seconds, mib, peak_rss_kib, reset_peak_rss, rss_kib};
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use chrono::Utc;
use cio_sim::{SimConfig, Simulator};
use clap::Parser;
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::Migrations,
    jobs::{self, Job, JobOutcome},
    profile_sync::{ProfileSyncConfig, load_export_rows},
};
use sharpsend_db::testing::{Backend, TestDatabase};
use sharpsend_tests::{sim_settings, test_settings};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

#[derive(Debug, Parser)]
#[command(about = "Profile backfill: export file into PostgreSQL, and the App API requests used")]
struct Args {
    /// Profiles in the largest export file.
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
    /// Smaller files loaded first, to compare memory across N.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    sizes: Vec<usize>,
    /// Demo people in the simulator for the request count.
    #[arg(long, default_value_t = 5000)]
    sim_people: usize,
}

const INVESTOR_TYPES: [&str; 5] = ["growth", "value", "crypto", "dividend", "index"];
const PLANS: [&str; 3] = ["free", "pro", "premium"];

/// Writes an export file (the simulator's layout) of `n` people; returns its path and size.
fn write_export(dir: &std::path::Path, n: usize) -> anyhow::Result<(PathBuf, u64)> {
    let path = dir.join(format!("export-{n}.csv"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(
        out,
        "id,email,cio_id,first_name,investor_type,plan,engagement_score,created_at,interests"
    )?;
    for i in 0..n {
        writeln!(
            out,
            "reader-{i:07},reader{i}@example.com,cio{i:010x},Name{},{},{},{},{},\"[\"\"stocks\"\",\"\"etfs\"\"]\"",
            i % 977,
            INVESTOR_TYPES[i % INVESTOR_TYPES.len()],
            PLANS[i % PLANS.len()],
            (i * 37) % 101,
            1_600_000_000 + i,
        )?;
    }
    out.flush()?;
    let size = std::fs::metadata(&path)?.len();
    Ok((path, size))
}

/// Serves `path` to every connection (HTTP/1.1, body until close), like an object store's
/// signed link.
async fn serve_file(path: PathBuf) -> anyhow::Result<url::Url> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let path = path.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let Ok(mut file) = tokio::fs::File::open(&path).await else {
                    return;
                };
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/csv\r\nconnection: close\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut file, &mut socket).await;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(url::Url::parse(&format!(
        "http://{addr}/_files/exports/1?signature=bench"
    ))?)
}

async fn context(db: &TestDatabase, sim: &cio_sim::RunningSim) -> anyhow::Result<AppContext> {
    let mut cio = sim_settings(sim);
    cio.app_requests_per_sec = 10;
    let mut settings = test_settings(&db.url, cio);
    settings.profile_sync = ProfileSyncConfig {
        paging_max: 0,
        export_wait: Duration::from_secs(30),
        ..ProfileSyncConfig::default()
    };
    Ok(AppContext::bootstrap(settings, Migrations::Apply, Clock::system()).await?)
}

async fn postgres() -> anyhow::Result<TestDatabase> {
    TestDatabase::create_migrated(Backend::Postgres)
        .await?
        .context("set SHARPSEND_TEST_POSTGRES_URL to a PostgreSQL server")
}

/// Part 1: the whole backfill against the simulator; the App API requests it used.
async fn request_count(args: &Args) -> anyhow::Result<()> {
    let db = postgres().await?;
    let sim = Simulator::spawn(SimConfig {
        demo_people: args.sim_people,
        export_delay: Duration::from_millis(500),
        ..SimConfig::demo()
    })
    .await?;
    let ctx = context(&db, &sim).await?;
    jobs::run_job(&ctx, Job::SegmentSync, "bench").await?;
    sim.sim.clear_requests();
    let before = sim.sim.request_counts_by_route();
    let started = Instant::now();
    let details = match jobs::run_job(&ctx, Job::ProfileSync, "bench").await? {
        JobOutcome::Succeeded { details, .. } => details,
        other => anyhow::bail!("profile-sync did not run: {other:?}"),
    };
    let elapsed = started.elapsed();
    let after = sim.sim.request_counts_by_route();
    let used: BTreeMap<&String, u64> = after
        .iter()
        .map(|(route, n)| (route, n - before.get(route).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    println!(
        "\n== App API requests of a backfill by export ({} demo people, {} in the mirrored segments) ==",
        args.sim_people, details["read"]
    );
    println!(
        "mode {}, {:.2} s (the simulator builds the export in 0.5 s)",
        details["mode"],
        elapsed.as_secs_f64()
    );
    for (route, n) in &used {
        println!("  {n:>3}  {route}");
    }
    println!(
        "  total App API requests: {} (the paging path would need about {} for the same people)",
        used.values().sum::<u64>(),
        details["read"].as_u64().unwrap_or(0).div_ceil(100)
            + details["read"].as_u64().unwrap_or(0).div_ceil(1000)
    );
    sim.shutdown().await;
    db.cleanup().await;
    Ok(())
}

/// Part 2: one export file of `n` profiles into an empty PostgreSQL mirror.
async fn load(n: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    let (path, bytes) = write_export(dir, n)?;
    let url = serve_file(path.clone()).await?;
    let db = postgres().await?;
    let sim = Simulator::spawn(SimConfig::empty()).await?;
    let ctx = context(&db, &sim).await?;
    let baseline = rss_kib().unwrap_or(0);
    let peak_measured = reset_peak_rss();
    let cpu_before = cpu_seconds().unwrap_or(0.0);
    let started = Instant::now();
    let loaded = load_export_rows(&ctx, ctx.cio.export_rows(&url), Utc::now()).await?;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds().unwrap_or(0.0) - cpu_before;
    let peak = peak_rss_kib().unwrap_or(0);
    ensure!(
        loaded.counts.read == n as u64 && loaded.counts.created == n as u64,
        "loaded {:?}",
        loaded.counts
    );
    println!(
        "{n:>9} profiles ({:.0} MiB file): {:.1} s, {:.0} profiles/s; this process's CPU {:.1} s \
         ({:.1} µs a profile; PostgreSQL's is apart); peak RSS {:.1} MiB (before: {:.1} MiB){}",
        bytes as f64 / 1_048_576.0,
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        cpu,
        cpu * 1e6 / n as f64,
        mib(peak),
        mib(baseline),
        if peak_measured {
            ""
        } else {
            " [VmHWM not reset: peak since start]"
        }
    );
    sim.shutdown().await;
    db.cleanup().await;
    std::fs::remove_file(path)?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "bench-backfill on PostgreSQL (this machine is shared: figures vary with its load; {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    request_count(&args).await?;
    println!(
        "\n== Export file → profile mirror (streamed, 1,000 rows per transaction, 2 at a time) =="
    );
    let dir = tempfile::tempdir()?;
    let mut sizes = args.sizes.clone();
    sizes.push(args.profiles);
    for n in sizes {
        load(n, dir.path()).await?;
    }
    Ok(())
}
