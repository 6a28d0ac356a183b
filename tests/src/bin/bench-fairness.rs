//! Fairness benchmark (issue #17): prints figures, asserts nothing about time.
//!
//! ```sh
//! cargo build --bin bench-fairness
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test target/debug/bench-fairness
//! target/debug/bench-fairness --backlog 100000 --database-url postgres://…/bench
//! ```
//!
//! One deployment, two publishers: workspace A (the default, from the `CIO_*`-style settings)
//! and workspace B (stored by `AdminService/CreateWorkspace`), each with its own Customer.io
//! simulator over real HTTP; A's Track API at Customer.io's limit (`--track-rate`, 1,000
//! requests/s). A real gRPC server and the scheduler (`sharpsend_scheduler::start` over
//! `Tenants`: one outbox worker per workspace, every job everywhere) run in this process.
//!
//! 1. **Baseline, A idle**: `--repeats` times, B's single `UpdateAttributes` over gRPC with B's
//!    writer key, timed until B's simulator has the attribute; and a `SendAssignment` in B (the
//!    demo API-triggered broadcast to a demo segment) with B's sender key, timed until B's
//!    simulator has the broadcast triggered.
//! 2. **A's backlog**: with the scheduler stopped, `--backlog` attribute updates are put pending
//!    in A's outbox through `sharpsend_core::profiles::update_attributes` with A's context (the
//!    function `BatchUpdateAttributes` calls, in batches of `--batch`), not over gRPC: a debug
//!    build would take too long to push a million updates through the RPC.
//! 3. **Under A's backlog**: the scheduler starts again; while A's backlog drains, the same
//!    measurements as 1, each with A's backlog remaining at that moment, and A's delivery rate
//!    over the measured window.
//!
//! The database is `--database-url` (migrated here) or else a fresh PostgreSQL database under
//! `SHARPSEND_TEST_POSTGRES_URL` (dropped afterwards), or else a fresh SQLite file. Prints the
//! peak RSS of this process (server, scheduler and both simulators).

use sharpsend_tests::proc_stats::peak_rss_kib;
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use cio_sim::{RunningSim, SimApi, SimConfig, Simulator};
use clap::Parser;
use serde_json::{Map, Value, json};
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::Migrations,
    jobs::{self, Job},
    profiles::{self, AttributeUpdate},
    tenants::Tenants,
};
use sharpsend_db::testing::{Backend, TestDatabase};
use sharpsend_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient,
    campaign_service_client::CampaignServiceClient, profile_service_client::ProfileServiceClient,
};
use sharpsend_server::convert::json_to_struct;
use sharpsend_tests::{Bearer, TEST_API_KEY, TEST_TRIGGER_INTERVAL, sim_settings, test_settings};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Fairness: another workspace's update and send while one has a big backlog")]
struct Args {
    /// Attribute updates pending in workspace A's outbox.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: usize,
    /// Distinct people A's backlog goes to.
    #[arg(long, default_value_t = 100_000)]
    people: usize,
    /// Updates per `update_attributes` call when putting A's backlog in place.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// A's Track API limit, requests/s (A's simulator enforces it; A's client paces to it).
    /// B's stays at Customer.io's 1,000. Lower it to make A's delivery bound by its own limit
    /// rather than by the database.
    #[arg(long, default_value_t = 1000)]
    track_rate: u32,
    /// Measurements of each kind, with A idle and under A's backlog.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Pause between two measurements under the backlog, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u64,
    /// Database; default a fresh PostgreSQL database under SHARPSEND_TEST_POSTGRES_URL (else
    /// SQLite).
    #[arg(long)]
    database_url: Option<String>,
}

/// Customer.io's Track API limit, requests/s: B's, whatever A's.
const CIO_TRACK_LIMIT: u32 = 1000;
/// The demo's API-triggered broadcast "Assignment Alert".
const BROADCAST: i64 = 3;
/// Longest wait for one delivery before the benchmark gives up.
const GIVE_UP: Duration = Duration::from_secs(120);

fn object(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

/// Milliseconds at the `q` quantile of sorted `ms`.
fn quantile(ms: &[f64], q: f64) -> f64 {
    if ms.is_empty() {
        return f64::NAN;
    }
    ms[((ms.len() - 1) as f64 * q).round() as usize]
}

fn summary(ms: &[f64]) -> String {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "min {:>8.1} ms  p50 {:>8.1} ms  max {:>8.1} ms  (n={})",
        quantile(&sorted, 0.0),
        quantile(&sorted, 0.5),
        quantile(&sorted, 1.0),
        sorted.len()
    )
}

/// The server (workspace A's context as the default) on a free port, until `shutdown` fires.
struct Stack {
    sim_a: RunningSim,
    sim_b: RunningSim,
    ctx: AppContext,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), sharpsend_server::app::ServeError>>,
}

impl Stack {
    async fn start(database_url: &str, track_rate: u32) -> anyhow::Result<Self> {
        let sim_a = Simulator::spawn(SimConfig {
            track_rate_limit_per_sec: track_rate,
            ..SimConfig::demo()
        })
        .await?;
        sim_a.sim.set_trigger_interval(TEST_TRIGGER_INTERVAL);
        let mut cio = sim_settings(&sim_a);
        cio.track_requests_per_sec = track_rate;
        let ctx = AppContext::bootstrap(
            test_settings(database_url, cio),
            Migrations::Apply,
            Clock::system(),
        )
        .await?;
        let sim_b = Simulator::spawn(SimConfig {
            site_id: "publisher-b".into(),
            track_api_key: "track-key-of-publisher-b".into(),
            app_api_key: "app-key-of-publisher-b".into(),
            track_rate_limit_per_sec: CIO_TRACK_LIMIT,
            ..SimConfig::demo()
        })
        .await?;
        sim_b.sim.set_trigger_interval(TEST_TRIGGER_INTERVAL);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(sharpsend_server::serve(listener, ctx.clone(), async move {
            let _ = rx.await;
        }));
        Ok(Self {
            sim_a,
            sim_b,
            ctx,
            addr,
            shutdown: Some(tx),
            server,
        })
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?)
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.server).await??;
        self.sim_a.shutdown().await;
        self.sim_b.shutdown().await;
        Ok(())
    }
}

/// Workspace B as publisher B's operator would set it up: stored with its credentials, its
/// segments synced, a writer key and a sender key bound to it.
struct PublisherB {
    ctx: AppContext,
    writer: String,
    sender: String,
    segment: i64,
}

async fn publisher_b(stack: &Stack, tenants: &Tenants) -> anyhow::Result<PublisherB> {
    let mut admin = AdminServiceClient::with_interceptor(
        stack.channel().await?,
        Bearer::new(Some(TEST_API_KEY)),
    );
    let workspace = admin
        .create_workspace(pb::CreateWorkspaceRequest {
            site_id: "publisher-b".into(),
            region: "us".into(),
            track_api_key: "track-key-of-publisher-b".into(),
            app_api_key: "app-key-of-publisher-b".into(),
            track_base_url: stack.sim_b.base_url(),
            app_base_url: stack.sim_b.base_url(),
            track_requests_per_sec: CIO_TRACK_LIMIT,
            name: "Publisher B".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workspace
        .context("no workspace")?;
    let key = |name: &str, role: pb::Role| {
        let request = pb::CreateApiKeyRequest {
            name: name.into(),
            role: role as i32,
            workspace_id: workspace.id,
            ..Default::default()
        };
        let mut admin = admin.clone();
        async move { anyhow::Ok(admin.create_api_key(request).await?.into_inner().secret) }
    };
    let writer = key("publisher-b writer", pb::Role::Writer).await?;
    let sender = key("publisher-b sender", pb::Role::Sender).await?;
    let ctx = tenants.context(workspace.id).await?;
    jobs::run_job(&ctx, Job::SegmentSync, "bench-fairness").await?;
    let segment = stack
        .sim_b
        .sim
        .segments()
        .iter()
        .find(|s| s.name == "High Engagement")
        .map(|s| s.id)
        .context("no demo segment High Engagement")?;
    Ok(PublisherB {
        ctx,
        writer,
        sender,
        segment,
    })
}

/// B's single update over gRPC, timed until B's simulator has the attribute.
async fn time_update(stack: &Stack, b: &PublisherB, tag: &str) -> anyhow::Result<f64> {
    let mut profiles = ProfileServiceClient::with_interceptor(
        stack.channel().await?,
        Bearer::new(Some(&b.writer)),
    );
    let customer_id = format!("reader-of-b-{tag}");
    let started = Instant::now();
    profiles
        .update_attributes(pb::UpdateAttributesRequest {
            customer_id: customer_id.clone(),
            attributes: Some(json_to_struct(&object(
                json!({ "plan": "pro", "tag": tag }),
            ))),
        })
        .await?;
    loop {
        let arrived = stack
            .sim_b
            .sim
            .person(&customer_id)
            .is_some_and(|p| p.attributes.get("tag").and_then(Value::as_str) == Some(tag));
        if arrived {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        ensure!(
            started.elapsed() < GIVE_UP,
            "B's update {tag} not delivered in {GIVE_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A send in B (the demo API-triggered broadcast to a demo segment), timed until B's
/// simulator has the broadcast triggered for it.
async fn time_send(stack: &Stack, b: &PublisherB, tag: &str) -> anyhow::Result<f64> {
    let mut campaigns = CampaignServiceClient::with_interceptor(
        stack.channel().await?,
        Bearer::new(Some(&b.sender)),
    );
    let started = Instant::now();
    let send = campaigns
        .send_assignment(pb::SendAssignmentRequest {
            assignment_id: format!("bench-fairness-{tag}"),
            title: "Q4 Crypto Outlook".into(),
            subject: "Your Q4 outlook".into(),
            segment_ids: vec![b.segment],
            variations: vec![pb::ContentVariation {
                segment_id: b.segment,
                body: "<p>The Q4 outlook</p>".into(),
                ..Default::default()
            }],
            delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
                pb::BroadcastDelivery {
                    broadcast_id: BROADCAST,
                },
            )),
            ..Default::default()
        })
        .await?
        .into_inner()
        .send
        .context("SendAssignment answered no send")?;
    loop {
        let triggered = stack.sim_b.sim.triggers(Some(BROADCAST)).iter().any(|t| {
            t.data
                .as_ref()
                .and_then(|d| d.get("send_id"))
                .and_then(Value::as_str)
                == Some(send.id.as_str())
        });
        if triggered {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        ensure!(
            started.elapsed() < GIVE_UP,
            "B's send {tag} not triggered in {GIVE_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A's outbox: (pending + in flight, delivered).
async fn a_outbox(ctx: &AppContext) -> anyhow::Result<(u64, u64)> {
    let stats = sharpsend_db::outbox::stats(&ctx.db, ctx.workspace_id()).await?;
    ensure!(stats.dead == 0, "dead letters in A: {stats:?}");
    Ok((stats.pending + stats.in_flight, stats.delivered))
}

/// Puts `n` attribute updates pending in A's outbox, through the function
/// `BatchUpdateAttributes` calls, `batch` at a time.
async fn put_backlog(ctx: &AppContext, args: &Args) -> anyhow::Result<f64> {
    let started = Instant::now();
    let people = args.people.max(1);
    let batch = args.batch.max(1);
    let mut last_report = Instant::now();
    for start in (0..args.backlog).step_by(batch) {
        let updates = (start..(start + batch).min(args.backlog))
            .map(|i| AttributeUpdate {
                customer_id: format!("reader-a-{:07}", i % people),
                attributes: object(json!({
                    "engagement_score": (i * 7919) % 100,
                    "sharpsend_round": i / people,
                })),
            })
            .collect();
        profiles::update_attributes(ctx, updates, None).await?;
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  … {} of {} pending ({:.0}s)",
                start + batch,
                args.backlog,
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cio_client::install_crypto_provider();
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    let (database_url, test_db) = match &args.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let db = match TestDatabase::create(Backend::Postgres).await? {
                Some(db) => db,
                None => TestDatabase::create(Backend::Sqlite)
                    .await?
                    .context("a SQLite test database")?,
            };
            (db.url.clone(), Some(db))
        }
    };
    let backend = if database_url.starts_with("sqlite") {
        "SQLite"
    } else {
        "PostgreSQL"
    };
    let result = run(&args, &database_url, backend).await;
    if let Some(db) = test_db {
        db.cleanup().await;
    }
    result
}

async fn run(args: &Args, database_url: &str, backend: &str) -> anyhow::Result<()> {
    println!(
        "fairness: workspace A (default) with {} updates pending, workspace B measured; {backend}; \
         A's Track API at {} requests/s; {} {} build",
        args.backlog,
        args.track_rate,
        std::env::consts::ARCH,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    let stack = Stack::start(database_url, args.track_rate).await?;
    let tenants = Tenants::new(stack.ctx.clone());
    let b = publisher_b(&stack, &tenants).await?;
    ensure!(b.ctx.workspace_id() != stack.ctx.workspace_id());

    // 1. Baseline: A idle.
    let scheduler = sharpsend_scheduler::start(tenants.clone(), "bench-fairness-1".into()).await?;
    let (mut idle_updates, mut idle_sends) = (Vec::new(), Vec::new());
    for r in 0..args.repeats {
        idle_updates.push(time_update(&stack, &b, &format!("idle-{r}")).await?);
        idle_sends.push(time_send(&stack, &b, &format!("idle-{r}")).await?);
    }
    scheduler.shutdown().await?;

    // 2. A's backlog, with no worker running.
    let seconds = put_backlog(&stack.ctx, args).await?;
    let (pending, delivered_before) = a_outbox(&stack.ctx).await?;
    println!(
        "A's backlog: {} updates to {} people put pending in {seconds:.1}s through \
         sharpsend_core::profiles::update_attributes (the function BatchUpdateAttributes calls; \
         {} per call, not over gRPC); A's outbox pending: {pending}",
        args.backlog,
        args.people.min(args.backlog),
        args.batch,
    );
    let track_before = stack.sim_a.sim.request_count(SimApi::Track);

    // 3. Under the backlog.
    let scheduler = sharpsend_scheduler::start(tenants.clone(), "bench-fairness-2".into()).await?;
    let window = Instant::now();
    // Until A's worker is delivering.
    loop {
        let (_, delivered) = a_outbox(&stack.ctx).await?;
        if delivered > delivered_before {
            break;
        }
        if window.elapsed() > GIVE_UP {
            bail!("A's worker delivered nothing in {GIVE_UP:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut busy_updates, mut busy_sends) = (Vec::new(), Vec::new());
    let mut all_under_backlog = true;
    println!();
    println!("under A's backlog:   B update     B send   A remaining before → after");
    for r in 0..args.repeats {
        let (before, _) = a_outbox(&stack.ctx).await?;
        let update = time_update(&stack, &b, &format!("busy-{r}")).await?;
        let send = time_send(&stack, &b, &format!("busy-{r}")).await?;
        let (after, _) = a_outbox(&stack.ctx).await?;
        all_under_backlog &= after > 0;
        println!(
            "  {:>2}             {:>8.1} ms {:>8.1} ms   {before:>9} → {after}",
            r + 1,
            update,
            send
        );
        busy_updates.push(update);
        busy_sends.push(send);
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    let window_secs = window.elapsed().as_secs_f64();
    let (remaining, delivered_after) = a_outbox(&stack.ctx).await?;
    let track_requests = stack.sim_a.sim.request_count(SimApi::Track) - track_before;
    // A worker finishes the step in progress and stops, whatever A still has pending.
    scheduler.shutdown().await?;

    println!();
    println!(
        "B single update (UpdateAttributes → B's simulator has it), A idle:      {}",
        summary(&idle_updates)
    );
    println!(
        "B single update (UpdateAttributes → B's simulator has it), A's backlog: {}",
        summary(&busy_updates)
    );
    println!(
        "B send (SendAssignment → B's broadcast triggered), A idle:              {}",
        summary(&idle_sends)
    );
    println!(
        "B send (SendAssignment → B's broadcast triggered), A's backlog:         {}",
        summary(&busy_sends)
    );
    let a_delivered = delivered_after - delivered_before;
    println!(
        "A meanwhile: {a_delivered} updates delivered in {window_secs:.1}s ({:.0} updates/s, \
         {track_requests} Track requests, {:.0} requests/s); {remaining} still pending{}",
        a_delivered as f64 / window_secs,
        track_requests as f64 / window_secs,
        if all_under_backlog {
            ""
        } else {
            " — A's backlog ran out during a measurement: use a larger --backlog"
        },
    );
    println!(
        "peak RSS of this process (server, scheduler, both simulators): {:.1} MiB",
        peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    stack.stop().await
}
