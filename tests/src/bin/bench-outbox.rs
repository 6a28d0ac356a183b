//! Outbox throughput benchmark: prints figures, asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/bench-outbox                       # SQLite; --database-url postgres://… for PostgreSQL
//! ```
//!
//! Starts `cio-sim` (Track API limited to `--track-rate` requests/s), `sharpsend-server` and
//! `sharpsend-scheduler` as real processes (binaries next to this one), pushes `--updates`
//! attribute updates for `--people` people through gRPC (`BatchUpdateAttributes`, 1,000 per
//! call), and waits until the scheduler's outbox worker has delivered them all. Then it sends a
//! sample of the same updates the way the official SDKs do (one `PUT /api/v1/customers/{id}` per
//! update) under the same limit, and prints both rates and their ratio, the HTTP requests used,
//! and the peak RSS of the server and the scheduler. `--sizes` runs the pipeline at several sizes
//! so memory can be compared across N.

use sharpsend_tests::proc_stats::status_kib;
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use cio_client::{CioClient, ClientConfig, Credentials, Region};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Map, Value, json};
use sharpsend_proto::v1::{
    BatchTrackEventsRequest, BatchUpdateAttributesRequest, GetSyncStatusRequest, TrackEventRequest,
    UpdateAttributesRequest, profile_service_client::ProfileServiceClient,
};
use tokio::process::{Child, Command};
use tonic::{metadata::MetadataValue, transport::Channel};

#[derive(Debug, Parser)]
#[command(about = "End-to-end outbox benchmark against the simulator")]
struct Args {
    /// Attribute updates to push (at the largest size).
    #[arg(long, default_value_t = 100_000)]
    updates: usize,
    /// Distinct people the updates go to.
    #[arg(long, default_value_t = 20_000)]
    people: usize,
    /// Extra, smaller runs (updates) before the main one, to compare memory across N.
    #[arg(long, value_delimiter = ',', default_value = "20000")]
    sizes: Vec<usize>,
    /// Track API limit, requests/s (the simulator enforces it; the client paces to it).
    #[arg(long, default_value_t = 100)]
    track_rate: u32,
    /// Updates sent one request each, the SDK way.
    #[arg(long, default_value_t = 3000)]
    sdk_sample: usize,
    /// Database; default a fresh SQLite file per run.
    #[arg(long)]
    database_url: Option<String>,
    /// BatchUpdateAttributes calls in flight at once (SharpSend's services call concurrently).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Single calls of 1,000 updates (and of 1,000 events) timed one after another, for the
    /// latency of one call (p50, p99).
    #[arg(long, default_value_t = 20)]
    call_samples: usize,
}

const API_KEY: &str = "bench-key-0123456789";
const SITE: &str = "sim-site";
const TRACK_KEY: &str = "sim-track-key";
const APP_KEY: &str = "sim-app-key";

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} not found: build with `cargo build --release --bins` first",
        path.display()
    );
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Stack {
    _sim: Child,
    server: Child,
    scheduler: Child,
    sim_url: String,
    grpc: String,
    _dir: tempfile::TempDir,
}

fn service(cmd: &Path, database_url: &str, sim_url: &str, track_rate: u32) -> Command {
    let mut c = Command::new(cmd);
    c.env("DATABASE_URL", database_url)
        .env("CIO_SITE_ID", SITE)
        .env("CIO_TRACK_API_KEY", TRACK_KEY)
        .env("CIO_APP_API_KEY", APP_KEY)
        .env("CIO_TRACK_BASE_URL", sim_url)
        .env("CIO_APP_BASE_URL", sim_url)
        .env("CIO_TRACK_RATE_LIMIT", track_rate.to_string())
        .env("SHARPSEND_API_KEYS", API_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn start_stack(args: &Args) -> anyhow::Result<Stack> {
    let dir = tempfile::tempdir()?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()));
    let sim_port = free_port()?;
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let sim = Command::new(bin("cio-sim")?)
        .args([
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--empty",
            "--track-rate-limit",
            &args.track_rate.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let http = reqwest::Client::new();
    wait_for(|| async {
        http.get(format!("{sim_url}/_sim/health"))
            .send()
            .await
            .is_ok()
    })
    .await?;

    let server_bin = bin("sharpsend-server")?;
    let migrated = service(&server_bin, &database_url, &sim_url, args.track_rate)
        .arg("migrate")
        .status()
        .await?;
    ensure!(migrated.success(), "migrate failed");
    let grpc_port = free_port()?;
    let grpc = format!("127.0.0.1:{grpc_port}");
    let server = service(&server_bin, &database_url, &sim_url, args.track_rate)
        .env("SHARPSEND_LISTEN", &grpc)
        .spawn()?;
    let scheduler = service(
        &bin("sharpsend-scheduler")?,
        &database_url,
        &sim_url,
        args.track_rate,
    )
    .spawn()?;
    let probe = grpc.clone();
    wait_for(|| {
        let probe = probe.clone();
        async move {
            Channel::from_shared(format!("http://{probe}"))
                .map(|e| e.connect_lazy())
                .is_ok()
                && tokio::net::TcpStream::connect(&probe).await.is_ok()
        }
    })
    .await?;
    Ok(Stack {
        _sim: sim,
        server,
        scheduler,
        sim_url,
        grpc,
        _dir: dir,
    })
}

async fn wait_for<F, Fut>(mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..300 {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("a process did not come up")
}

fn update(i: usize, people: usize) -> (String, Map<String, Value>) {
    let person = format!("bench-{:06}", i % people);
    let round = i / people;
    let attrs = json!({ "engagement_score": (i * 7919) % 100, "sharpsend_round": round, "sharpsend_segment": format!("s{}", i % 13) });
    (person, attrs.as_object().cloned().unwrap_or_default())
}

async fn track_requests(sim_url: &str) -> anyhow::Result<u64> {
    let stats: Value = reqwest::get(format!("{sim_url}/_sim/stats"))
        .await?
        .json()
        .await?;
    let counts = stats
        .get("requests")
        .context("/_sim/stats has no request counts")?;
    Ok(counts.get("track").and_then(Value::as_u64).unwrap_or(0))
}

struct RunFigures {
    updates: usize,
    seconds: f64,
    requests: u64,
    server_rss_kib: u64,
    scheduler_rss_kib: u64,
}

async fn pipeline_run(args: &Args, updates: usize) -> anyhow::Result<(RunFigures, Stack)> {
    let stack = start_stack(args).await?;
    let channel = Channel::from_shared(format!("http://{}", stack.grpc))?
        .connect()
        .await?;
    let key: MetadataValue<_> = format!("Bearer {API_KEY}").parse()?;
    let mut client =
        ProfileServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", key.clone());
            Ok(req)
        });
    let before = track_requests(&stack.sim_url).await?;
    let baseline = client
        .get_sync_status(GetSyncStatusRequest::default())
        .await?
        .into_inner()
        .delivered as usize;
    let started = Instant::now();
    let calls = (0..updates).step_by(1000).map(|chunk_start| {
        let mut client = client.clone();
        let updates = (chunk_start..(chunk_start + 1000).min(updates))
            .map(|i| {
                let (customer_id, attrs) = update(i, args.people);
                UpdateAttributesRequest {
                    customer_id,
                    attributes: Some(sharpsend_server::convert::json_to_struct(&attrs)),
                }
            })
            .collect();
        async move {
            client
                .batch_update_attributes(BatchUpdateAttributesRequest { updates })
                .await
        }
    });
    let results: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    for result in results {
        result?;
    }
    let accepted_after = started.elapsed();
    loop {
        let status = client
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        ensure!(status.dead == 0, "dead letters: {status:?}");
        if status.delivered as usize >= baseline + updates
            && status.pending == 0
            && status.in_flight == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests = track_requests(&stack.sim_url).await? - before;
    let server_rss_kib = stack
        .server
        .id()
        .and_then(|pid| status_kib(Some(pid), "VmHWM:"))
        .unwrap_or(0);
    let scheduler_rss_kib = stack
        .scheduler
        .id()
        .and_then(|pid| status_kib(Some(pid), "VmHWM:"))
        .unwrap_or(0);
    eprintln!(
        "  accepted {updates} updates over gRPC in {:.2}s",
        accepted_after.as_secs_f64()
    );
    Ok((
        RunFigures {
            updates,
            seconds,
            requests,
            server_rss_kib,
            scheduler_rss_kib,
        },
        stack,
    ))
}

/// Milliseconds at the `q` quantile of sorted `ms`.
fn quantile(ms: &[f64], q: f64) -> f64 {
    if ms.is_empty() {
        return f64::NAN;
    }
    ms[((ms.len() - 1) as f64 * q).round() as usize]
}

/// Times `samples` single calls of 1,000 updates and of 1,000 events, one after another
/// (people shared with the pipeline run, so profiles exist as in steady state). Returns the
/// sorted milliseconds of each.
async fn call_latency(args: &Args, grpc: &str) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let channel = Channel::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let key: MetadataValue<_> = format!("Bearer {API_KEY}").parse()?;
    let mut client =
        ProfileServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", key.clone());
            Ok(req)
        });
    let (mut updates_ms, mut events_ms) = (Vec::new(), Vec::new());
    for sample in 0..args.call_samples {
        let updates = (0..1000)
            .map(|i| {
                let (customer_id, attrs) = update(sample * 1000 + i, args.people);
                UpdateAttributesRequest {
                    customer_id,
                    attributes: Some(sharpsend_server::convert::json_to_struct(&attrs)),
                }
            })
            .collect();
        let started = Instant::now();
        client
            .batch_update_attributes(BatchUpdateAttributesRequest { updates })
            .await?;
        updates_ms.push(started.elapsed().as_secs_f64() * 1000.0);

        let events = (0..1000)
            .map(|i| {
                let (customer_id, attrs) = update(sample * 1000 + i, args.people);
                TrackEventRequest {
                    customer_id,
                    name: "bench_event".into(),
                    data: Some(sharpsend_server::convert::json_to_struct(&attrs)),
                    timestamp: None,
                    idempotency_key: format!("bench-{sample}-{i}"),
                }
            })
            .collect();
        let started = Instant::now();
        client
            .batch_track_events(BatchTrackEventsRequest { events })
            .await?;
        events_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    updates_ms.sort_by(f64::total_cmp);
    events_ms.sort_by(f64::total_cmp);
    Ok((updates_ms, events_ms))
}

async fn sdk_way(args: &Args, sim_url: &str) -> anyhow::Result<(f64, u64)> {
    let before = track_requests(sim_url).await?;
    let mut config = ClientConfig::new(Credentials::new(SITE, TRACK_KEY, APP_KEY), Region::Us)
        .with_base_url(sim_url.parse()?);
    config.track_requests_per_sec = args.track_rate;
    let client = CioClient::new(config)?;
    let started = Instant::now();
    for i in 0..args.sdk_sample {
        let (person, attrs) = update(i, args.people);
        client.identify(&person, &attrs).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        args.sdk_sample as f64 / seconds,
        track_requests(sim_url).await? - before,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cio_client::install_crypto_provider();
    let mut sizes: Vec<usize> = args
        .sizes
        .iter()
        .copied()
        .filter(|&n| n > 0 && n < args.updates)
        .collect();
    sizes.push(args.updates);
    println!(
        "outbox benchmark: {} people, Track API limited to {} requests/s, database {}, {} calls in flight",
        args.people,
        args.track_rate,
        if args.database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        args.concurrency
    );
    println!(
        "{:>9} {:>9} {:>12} {:>9} {:>16} {:>19}",
        "updates", "seconds", "updates/s", "requests", "server peak RSS", "scheduler peak RSS"
    );
    let mut last = None;
    for n in sizes {
        let (figures, stack) = pipeline_run(&args, n).await?;
        println!(
            "{:>9} {:>9.2} {:>12.0} {:>9} {:>12.1} MiB {:>15.1} MiB",
            figures.updates,
            figures.seconds,
            figures.updates as f64 / figures.seconds,
            figures.requests,
            figures.server_rss_kib as f64 / 1024.0,
            figures.scheduler_rss_kib as f64 / 1024.0
        );
        last = Some((figures, stack));
    }
    let (figures, stack) = last.context("no run")?;
    if args.call_samples > 0 {
        let (updates_ms, events_ms) = call_latency(&args, &stack.grpc).await?;
        for (what, ms) in [
            ("BatchUpdateAttributes", &updates_ms),
            ("BatchTrackEvents", &events_ms),
        ] {
            println!(
                "one {what} call of 1000, {} calls one at a time: p50 {:.1} ms, p99 {:.1} ms",
                ms.len(),
                quantile(ms, 0.5),
                quantile(ms, 0.99)
            );
        }
    }
    let (sdk_rate, sdk_requests) = sdk_way(&args, &stack.sim_url).await?;
    let ours = figures.updates as f64 / figures.seconds;
    println!(
        "SDK way: {} updates, one PUT /api/v1/customers/{{id}} each: {:.1} updates/s ({} requests)",
        args.sdk_sample, sdk_rate, sdk_requests
    );
    println!("ratio: {:.0}x the per-request way", ours / sdk_rate);
    drop(stack);
    Ok(())
}
