//! Reporting-webhook ingest and engagement-scoring benchmark: prints figures, asserts nothing
//! about time.
//!
//! ```sh
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p sharpsend-tests --bin bench-webhooks
//! ```
//!
//! On a fresh test database (PostgreSQL when `SHARPSEND_TEST_POSTGRES_URL` is set, else SQLite)
//! with the simulator and a real send (so events are attributed):
//!
//! 1. Ingest: `--senders` concurrent HTTP clients (50) POST `--events` signed reporting
//!    webhooks (10% of them a second time, as Customer.io's at-least-once delivery does) to
//!    `POST /webhooks/customerio`; prints events/s and the latency p50/p99/max of the answers,
//!    and checks every distinct event was stored once.
//! 2. Scoring: stores `--scoring-events` delivery events (10 per person) directly, then runs
//!    the `engagement-scoring` job; prints its time and this process's peak RSS during the job
//!    (VmHWM reset before it), at each of `--sizes` so memory can be compared across N.
//! 3. Analytics (issue #15): one assignment with `--analytics-events` / 4 deliveries (each
//!    sent and delivered; half opened, a quarter clicked: 2.75 stored events a delivery), then times `GetAssignmentAnalytics` over gRPC (`--analytics-runs`, p50 and max)
//!    and streams `ExportReport` as CSV (rows/s, bytes, peak RSS of this process, which serves
//!    the call, with VmHWM reset before it). `--only-analytics` skips 1 and 2.

use sharpsend_tests::proc_stats::{peak_rss_kib, reset_peak_rss};
use std::time::Instant;

use anyhow::{Context, ensure};
use clap::Parser;
use secrecy::SecretString;
use sharpsend_core::jobs::Job;
use sharpsend_db::engagement::{self as store, EventSource, NewDeliveryEvent};
use sharpsend_db::testing::{Backend, TestDatabase};
use sharpsend_proto::v1 as pb;
use sharpsend_tests::TestApp;

const KEY: &str = "bench-webhook-key";
const BROADCAST: i64 = 3;

#[derive(Debug, Parser)]
#[command(about = "Reporting-webhook ingest and engagement-scoring benchmark")]
struct Args {
    /// Distinct webhook events to send.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Concurrent senders.
    #[arg(long, default_value_t = 50)]
    senders: usize,
    /// Delivery events to score (largest size).
    #[arg(long, default_value_t = 1_000_000)]
    scoring_events: usize,
    /// Smaller scoring sizes to compare memory against.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    sizes: Vec<usize>,
    /// Delivery events of the analytics phase (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    analytics_events: usize,
    /// GetAssignmentAnalytics calls timed.
    #[arg(long, default_value_t = 5)]
    analytics_runs: usize,
    /// Run only the analytics phase.
    #[arg(long)]
    only_analytics: bool,
}

async fn database() -> anyhow::Result<(TestDatabase, &'static str)> {
    if let Some(db) = TestDatabase::create_migrated(Backend::Postgres).await? {
        return Ok((db, "PostgreSQL"));
    }
    let db = TestDatabase::create_migrated(Backend::Sqlite)
        .await?
        .context("SQLite test database")?;
    Ok((db, "SQLite"))
}

/// A real send through the demo broadcast; answers its trigger id.
async fn send(app: &TestApp) -> anyhow::Result<i64> {
    let got = app
        .send_to_high_engagement("bench", "growth", BROADCAST)
        .await?;
    got.submissions
        .iter()
        .map(|s| s.cio_trigger_id)
        .find(|t| *t > 0)
        .context("a submission with a trigger")
}

fn body(i: usize, trigger: i64, now: i64) -> String {
    let metric = ["delivered", "opened", "clicked", "sent"][i % 4];
    serde_json::json!({
        "event_id": format!("bench-{i:09}"), "object_type": "email", "metric": metric,
        "timestamp": now,
        "data": {"delivery_id": format!("dl-{}", i / 4), "customer_id": format!("p{:07}", i / 40),
                 "broadcast_id": BROADCAST, "trigger_id": trigger, "action_id": 1,
                 "identifiers": {"id": format!("p{:07}", i / 40)}, "prefetched": false}
    })
    .to_string()
}

async fn ingest(args: &Args, app: &TestApp, trigger: i64) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}{}",
        listener.local_addr()?,
        sharpsend_server::webhooks::WEBHOOK_PATH
    );
    tokio::spawn(sharpsend_server::webhooks::serve(
        listener,
        app.ctx.clone(),
        SecretString::from(KEY),
        std::future::pending(),
    ));
    // Every 10th event is sent twice.
    let total = args.events + args.events / 10;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.senders {
        let (next, url) = (next.clone(), url.clone());
        let now = app.ctx.now().timestamp();
        let events = args.events;
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(latencies);
                }
                let i = if n < events { n } else { (n - events) * 10 };
                let body = body(i, trigger, now);
                let t = Instant::now();
                let answer = http
                    .post(&url)
                    .header("X-CIO-Timestamp", now.to_string())
                    .header(
                        "X-CIO-Signature",
                        cio_sim::sign_webhook(KEY, now, body.as_bytes()),
                    )
                    .body(body)
                    .send()
                    .await?;
                ensure!(answer.status().is_success(), "answered {}", answer.status());
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let stored = store::events_after(&app.ctx.db, app.ctx.workspace_id(), 0, None, u64::MAX >> 1)
        .await?
        .len();
    println!(
        "ingest: {} requests ({} distinct events) from {} senders in {:.2}s: {:.0} events/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; stored {}",
        latencies.len(),
        args.events,
        args.senders,
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        stored
    );
    ensure!(
        stored == args.events,
        "stored {stored} of {} distinct events",
        args.events
    );
    Ok(())
}

async fn scoring(app: &TestApp, trigger: i64, n: usize, offset: usize) -> anyhow::Result<()> {
    let now = app.ctx.now();
    let insert_started = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    for i in 0..n {
        let person = format!("s{offset}-{:07}", i / 10);
        batch.push(NewDeliveryEvent {
            event_id: format!("score-{offset}-{i}"),
            metric: ["delivered", "opened", "delivered", "clicked", "delivered"][i % 5].into(),
            object_type: "email".into(),
            delivery_id: Some(format!("sd-{offset}-{}", i / 2)),
            customer_id: Some(person),
            broadcast_id: Some(BROADCAST),
            trigger_id: Some(trigger),
            occurred_at: now - chrono::TimeDelta::days((i % 90) as i64),
            prefetched: i % 7 == 0,
            ..NewDeliveryEvent::default()
        });
        if batch.len() == 5000 {
            store::insert_events(
                &app.ctx.db,
                app.ctx.workspace_id(),
                EventSource::Webhook,
                &batch,
                now,
            )
            .await?;
            batch.clear();
        }
    }
    store::insert_events(
        &app.ctx.db,
        app.ctx.workspace_id(),
        EventSource::Webhook,
        &batch,
        now,
    )
    .await?;
    let inserted = insert_started.elapsed();
    reset_peak_rss();
    let started = Instant::now();
    let outcome = app.run_job(Job::EngagementScoring).await?;
    let elapsed = started.elapsed();
    println!(
        "scoring: {n} new events ({} people) stored in {:.1}s; engagement-scoring took {:.1}s, peak RSS during it {:.1} MiB; {outcome:?}",
        n / 10,
        inserted.as_secs_f64(),
        elapsed.as_secs_f64(),
        peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

async fn analytics(args: &Args, app: &TestApp, trigger: i64) -> anyhow::Result<()> {
    let n = args.analytics_events;
    let now = app.ctx.now();
    let insert_started = Instant::now();
    let mut batch = Vec::with_capacity(5000);
    let mut stored = 0usize;
    for i in 0..n {
        let d = i / 4;
        let metric = ["sent", "delivered", "opened", "clicked"][i % 4];
        // Every delivery is sent and delivered; every 2nd opened, every 4th clicked (events
        // that did not happen are not stored).
        if (metric == "opened" && d % 2 != 0) || (metric == "clicked" && d % 4 != 0) {
            continue;
        }
        stored += 1;
        batch.push(NewDeliveryEvent {
            event_id: format!("an-{i}"),
            metric: metric.into(),
            object_type: "email".into(),
            delivery_id: Some(format!("ad-{d:09}")),
            customer_id: Some(format!("a{:08}", d)),
            broadcast_id: Some(BROADCAST),
            trigger_id: Some(trigger),
            occurred_at: now - chrono::TimeDelta::seconds(((d * 37) % (5 * 86_400)) as i64),
            ..NewDeliveryEvent::default()
        });
        if batch.len() == 5000 {
            store::insert_events(
                &app.ctx.db,
                app.ctx.workspace_id(),
                EventSource::Webhook,
                &batch,
                now,
            )
            .await?;
            batch.clear();
        }
    }
    store::insert_events(
        &app.ctx.db,
        app.ctx.workspace_id(),
        EventSource::Webhook,
        &batch,
        now,
    )
    .await?;
    println!(
        "analytics: {stored} events of {} deliveries stored in {:.1}s",
        n.div_ceil(4),
        insert_started.elapsed().as_secs_f64()
    );
    let mut client = app.analytics().await?;
    let mut times = Vec::new();
    let mut delivered = 0;
    for _ in 0..args.analytics_runs.max(1) {
        let t = Instant::now();
        let got = client
            .get_assignment_analytics(pb::GetAssignmentAnalyticsRequest {
                assignment_id: "bench".into(),
            })
            .await?
            .into_inner();
        times.push(t.elapsed());
        delivered = got.counts.map_or(0, |c| c.delivered);
    }
    times.sort();
    println!(
        "GetAssignmentAnalytics over {stored} events ({delivered} delivered): p50 {:.0} ms, max {:.0} ms ({} runs)",
        times[times.len() / 2].as_secs_f64() * 1000.0,
        times.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        times.len()
    );
    reset_peak_rss();
    let t = Instant::now();
    let mut stream = client
        .export_report(pb::ExportReportRequest {
            format: pb::ReportFormat::Csv as i32,
            assignment_id: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut rows, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = stream.message().await? {
        rows += u64::try_from(chunk.rows).unwrap_or(0);
        bytes += chunk.data.len() as u64;
    }
    let elapsed = t.elapsed();
    println!(
        "ExportReport CSV: {rows} rows, {:.1} MiB in {:.1}s: {:.0} rows/s; peak RSS during it {:.1} MiB",
        bytes as f64 / 1_048_576.0,
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
        peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    ensure!(rows == (n as u64).div_ceil(4), "exported {rows} rows");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cio_client::install_crypto_provider();
    let (db, backend) = database().await?;
    println!(
        "bench-webhooks on {backend}, {} cores (shared machine: figures vary with other load)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let app = TestApp::spawn(&db).await?;
    let result = async {
        let trigger = send(&app).await?;
        if args.only_analytics {
            return analytics(&args, &app, trigger).await;
        }
        ingest(&args, &app, trigger).await?;
        let mut sizes: Vec<usize> = args
            .sizes
            .iter()
            .copied()
            .filter(|&s| s > 0 && s < args.scoring_events)
            .collect();
        sizes.push(args.scoring_events);
        for (k, n) in sizes.into_iter().enumerate() {
            scoring(&app, trigger, n, k).await?;
        }
        if args.analytics_events > 0 {
            analytics(&args, &app, trigger).await?;
        }
        anyhow::Ok(())
    }
    .await;
    app.stop().await?;
    db.cleanup().await;
    result
}
