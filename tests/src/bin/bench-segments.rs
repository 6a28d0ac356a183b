//! Managed segments under sustained attribute writes (issue #18), PostgreSQL: prints figures,
//! asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bins
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test target/release/bench-segments
//! target/release/bench-segments --profiles 100000 --secs 30 --database-url postgres://…/db
//! ```
//!
//! Loads `--profiles` profiles into a fresh PostgreSQL database (under
//! `SHARPSEND_TEST_POSTGRES_URL`, dropped at the end; or `--database-url`, migrated here), then
//! creates `--segments` managed segments through `managed_segments::create_segment` (a manual
//! segment in the in-process Customer.io simulator, then a full evaluation). Their criteria
//! vary over seven attributes: number thresholds on `engagement_score` (JSON numbers and
//! numeric strings) and `sharpsend_engagement_score`, text equality and `in`, `and` / `or` /
//! `not`, exactly one relative-time condition (`last_opened_at` within the last 7 days) and
//! one segment-membership condition (members of the `sharpsend_engagement_score` segment with
//! more than 5 interactions).
//!
//! Then, for `--secs` seconds, it writes `--rate` attribute updates per second in batches of
//! `--batch` through `sharpsend_core::profiles::update_attributes` — the function the server's
//! `BatchUpdateAttributes` calls: validation, the profile mirror and the outbox in one
//! transaction, then the due marks of the segments reading the written attributes. Each update
//! sets one or two of the criteria's attributes of a random person to a random value, so the
//! writes move people in and out of segments. Meanwhile the real `segment-evaluation` job
//! (`jobs::run_job`, with its lease and run record) runs on a tick every `--tick-ms` as the
//! scheduler runs it: a tick that comes while the previous run is still going is skipped (the
//! scheduler's cron would need `SHARPSEND_SEGMENT_EVALUATION_CRON="* * * * * *"` for a 1 s
//! tick; its default is once a minute).
//!
//! **Evaluation lag.** Some updates are tracers (`--tracers` per second, part of the rate): a
//! person of a reserved pool, never written otherwise, whose `engagement_score` and
//! `sharpsend_engagement_score` go from 5 to 95, which by construction changes their
//! membership of every threshold segment on those attributes (and maybe of others). A
//! tracer's lag is the time from sending its batch (an upper bound on its commit, off by at
//! most the write's latency, reported too) to the first moment an observer sees that, for
//! **every** segment, the person's recorded membership (`segment_members`) equals what the
//! segment's criteria say of the person's current profile (the evaluator's own filter,
//! relative times resolved at the observation; a segment-membership condition reads the
//! referenced segment's recorded membership, so a chained segment agrees only after both
//! evaluations). The observer looks every `--poll-ms` at the tracers whose write was
//! acknowledged (before that the update may not be committed), so lags are rounded up to its
//! period; a tracer still not reflected `--settle-secs` after the writes stop is reported as
//! such.
//!
//! **Database time of the evaluation.** The job runs on a pool of its own
//! (`application_name=sharpsend-bench-eval`), the writes on another (`sharpsend-bench-write`).
//! Printed per minute of the timed window: the job's summed run time (every statement of a run
//! is sequential, so this is the wall time its database work took, round trips included), and
//! the CPU time of the PostgreSQL backends serving each pool (`/proc/<pid>/stat`, so the
//! database must run on this machine; the observer's backend is in neither).
//!
//! At the end, after one more job run, the membership of `--verify` segments (the
//! relative-time, the `sharpsend_engagement_score` and the chained one first) is compared with
//! the criteria evaluated over every profile: any difference fails the benchmark.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::Utc;
use cio_sim::{SimConfig, Simulator};
use clap::Parser;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};
use serde_json::{Map, Value, json};
use sharpsend_core::criteria::Criteria;
use sharpsend_core::jobs::{self, Job, JobOutcome};
use sharpsend_core::managed_segments::{self, CriteriaInput, NewSegment};
use sharpsend_core::profiles::{self, AttributeUpdate};
use sharpsend_core::{AppContext, clock::Clock, context::Migrations};
use sharpsend_db::criteria_sql::{Filter, SqlBuilder};
use sharpsend_db::testing::{Backend, TestDatabase};
use sharpsend_tests::bench_data::{INVESTOR_TYPES, Rng, load_profiles};
use sharpsend_tests::proc_stats::process_cpu_seconds;

#[derive(Debug, Parser)]
#[command(about = "Managed segments' evaluation lag and database time under sustained writes")]
struct Args {
    /// Profiles to load.
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
    /// Managed segments (at least 3).
    #[arg(long, default_value_t = 100)]
    segments: usize,
    /// Attribute updates per second.
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    /// Updates per BatchUpdateAttributes call (at most 1000).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Length of the timed window, seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Tracer updates per second (part of `--rate`).
    #[arg(long, default_value_t = 4)]
    tracers: usize,
    /// Period of the segment-evaluation tick, ms.
    #[arg(long, default_value_t = 1000)]
    tick_ms: u64,
    /// Period of the lag observer, ms.
    #[arg(long, default_value_t = 100)]
    poll_ms: u64,
    /// How long to wait for the last tracers after the writes stop, seconds.
    #[arg(long, default_value_t = 60)]
    settle_secs: u64,
    /// Segments whose membership is checked against a full evaluation at the end.
    #[arg(long, default_value_t = 10)]
    verify: usize,
    /// PostgreSQL database to use (migrated here). Default: a fresh database under
    /// SHARPSEND_TEST_POSTGRES_URL, dropped at the end.
    #[arg(long)]
    database_url: Option<String>,
}

const TIERS: [&str; 3] = ["free", "premium", "pro"];
const DAY: u64 = 86_400;
/// Application names of the two pools, to find their backends.
const EVAL_APP: &str = "sharpsend-bench-eval";
const WRITE_APP: &str = "sharpsend-bench-write";

/// The n-th person; the tracer pool (from `tracer_from` on) starts with both scores at 5.
fn person(rng: &mut Rng, n: usize, now: u64, tracer_from: usize) -> Value {
    let tracer = n >= tracer_from;
    let score = if tracer { 5 } else { rng.below(101) };
    // Half written by SharpSend (numbers), half imported from Customer.io (strings).
    let score = if n.is_multiple_of(2) {
        json!(score)
    } else {
        json!(score.to_string())
    };
    let sharpsend_score = if tracer { 5 } else { rng.below(101) };
    let last_opened = if tracer {
        now - DAY
    } else {
        now - rng.below(30 * DAY)
    };
    json!({
        "id": customer_id(n),
        "email": format!("reader{n}@example.com"),
        "attributes": {
            "email": format!("reader{n}@example.com"),
            "investor_type": INVESTOR_TYPES[rng.below(8) as usize],
            "engagement_score": score,
            "sharpsend_engagement_score": sharpsend_score,
            "sharpsend_assignment_interactions": rng.below(13),
            "subscription_tier": TIERS[rng.below(3) as usize],
            "portfolio_size_usd": rng.below(2_000_000),
            "last_opened_at": last_opened,
        }
    })
}

fn customer_id(n: usize) -> String {
    format!("p{n:07}")
}

/// The i-th segment's criteria; `chained` is the segment the chained one reads.
fn criteria_of(i: usize, chained: Option<i64>) -> Value {
    let attr = |field: &str, op: &str, value: Value| json!({"attribute": {"field": field, "operator": op, "value": value}});
    let n = i as u64;
    match i {
        0 => json!({"and": [
            attr("last_opened_at", "gte", json!({"ago": "7d"})),
            attr("engagement_score", "gt", json!(50)),
        ]}),
        1 => attr("sharpsend_engagement_score", "gte", json!(60)),
        2 => json!({"and": [
            {"segment": {"id": chained.unwrap_or_default()}},
            attr("sharpsend_assignment_interactions", "gt", json!(5)),
        ]}),
        _ => match i % 6 {
            0 => attr("engagement_score", "gt", json!(50 + n % 45)),
            1 => attr("sharpsend_engagement_score", "gt", json!(40 + n % 55)),
            2 => json!({"and": [
                attr("investor_type", "eq", json!(INVESTOR_TYPES[i % 8])),
                attr("engagement_score", "gt", json!(30 + n % 60)),
            ]}),
            3 => json!({"or": [
                attr("subscription_tier", "eq", json!("pro")),
                attr("sharpsend_assignment_interactions", "gte", json!(6 + n % 7)),
            ]}),
            4 => json!({"and": [
                attr("portfolio_size_usd", "gte", json!(n * 10_000)),
                attr("sharpsend_engagement_score", "lt", json!(20 + n % 50)),
            ]}),
            _ => json!({"and": [
                attr("subscription_tier", "in", json!(["premium", "pro"])),
                attr("engagement_score", "gte", json!(20 + n % 70)),
                {"not": attr("investor_type", "eq", json!("crypto"))},
            ]}),
        },
    }
}

/// One random update of a non-tracer person: one or two of the criteria's attributes.
fn random_update(rng: &mut Rng, people: usize, now: u64) -> AttributeUpdate {
    let mut attributes = Map::new();
    for _ in 0..1 + rng.below(2) {
        let (key, value) = match rng.below(5) {
            0 => ("engagement_score", json!(rng.below(101))),
            1 => ("sharpsend_engagement_score", json!(rng.below(101))),
            2 => ("sharpsend_assignment_interactions", json!(rng.below(13))),
            3 => ("subscription_tier", json!(TIERS[rng.below(3) as usize])),
            _ => ("last_opened_at", json!(now - rng.below(14 * DAY))),
        };
        attributes.insert(key.into(), value);
    }
    AttributeUpdate {
        customer_id: customer_id(rng.below(people as u64) as usize),
        attributes,
    }
}

fn tracer_update(n: usize) -> AttributeUpdate {
    let mut attributes = Map::new();
    attributes.insert("engagement_score".into(), json!(95));
    attributes.insert("sharpsend_engagement_score".into(), json!(95));
    AttributeUpdate {
        customer_id: customer_id(n),
        attributes,
    }
}

/// A created segment: its Customer.io id and parsed criteria.
struct Segment {
    id: i64,
    criteria: Criteria,
}

/// A tracer in flight: when its batch was sent, when the write was acknowledged.
struct Tracer {
    sent: Instant,
    acked: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    tracers: HashMap<String, Tracer>,
    lags: Vec<Duration>,
    write_latencies: Vec<Duration>,
    updates_written: usize,
    write_errors: usize,
}

fn unix_now() -> u64 {
    u64::try_from(Utc::now().timestamp()).unwrap_or(0)
}

fn with_app(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.segments >= 3, "--segments must be at least 3");
    ensure!((1..=1000).contains(&args.batch), "--batch must be 1..=1000");
    ensure!(args.rate >= args.batch, "--rate must be at least --batch");
    ensure!(args.tick_ms > 0 && args.poll_ms > 0, "periods must be > 0");
    cio_client::install_crypto_provider();
    let (url, test_db) = match &args.database_url {
        Some(url) => (url.clone(), None),
        None => match TestDatabase::create_migrated(Backend::Postgres).await? {
            Some(db) => (db.url.clone(), Some(db)),
            None => bail!("set SHARPSEND_TEST_POSTGRES_URL or --database-url (PostgreSQL only)"),
        },
    };
    let result = run(&args, &url).await;
    if let Some(db) = test_db {
        db.cleanup().await;
    }
    result
}

async fn run(args: &Args, url: &str) -> anyhow::Result<()> {
    let sim = Simulator::spawn(SimConfig::empty()).await?;
    let settings = |app: &str| {
        sharpsend_tests::test_settings(&with_app(url, app), sharpsend_tests::sim_settings(&sim))
    };
    let eval =
        AppContext::bootstrap(settings(EVAL_APP), Migrations::Apply, Clock::system()).await?;
    let write =
        AppContext::bootstrap(settings(WRITE_APP), Migrations::Apply, Clock::system()).await?;
    ensure!(
        eval.db.get_database_backend() == DbBackend::Postgres,
        "PostgreSQL only"
    );
    ensure!(
        eval.workspace_id() == write.workspace_id(),
        "two workspaces"
    );
    let ws = eval.workspace_id();
    println!(
        "bench-segments: {} profiles, {} managed segments, {} updates/s in batches of {}, {} s, evaluation tick {} ms",
        args.profiles, args.segments, args.rate, args.batch, args.secs, args.tick_ms
    );

    // Tracers: one pool never written by the random updates, large enough for the run.
    let tracer_pool = (args.tracers * (args.secs as usize + 1)).max(1);
    ensure!(
        args.profiles >= 2 * tracer_pool,
        "--profiles must be at least {} for {} tracers/s over {} s",
        2 * tracer_pool,
        args.tracers,
        args.secs
    );
    let tracer_from = args.profiles - tracer_pool;
    let now = unix_now();
    let loaded = load_profiles(&eval.db, ws, args.profiles, |rng, n| {
        person(rng, n, now, tracer_from)
    })
    .await?;
    println!(
        "load: {:.1} s ({:.0} profiles/s)",
        loaded.as_secs_f64(),
        args.profiles as f64 / loaded.as_secs_f64()
    );

    let started = Instant::now();
    let mut segments = Vec::with_capacity(args.segments);
    for i in 0..args.segments {
        let chained = segments.get(1).map(|s: &Segment| s.id);
        let criteria = criteria_of(i, chained);
        let view = managed_segments::create_segment(
            &eval,
            NewSegment {
                name: format!("bench {i}"),
                description: String::new(),
                criteria: Some(CriteriaInput::Json(criteria.to_string(), "criteria_json")),
            },
        )
        .await?;
        let criteria = view.criteria.context("created without criteria")?;
        segments.push(Segment {
            id: view.segment_id,
            criteria,
        });
    }
    println!(
        "create {} segments (each a full evaluation): {:.1} s",
        args.segments,
        started.elapsed().as_secs_f64()
    );
    // One run settles what the creations left (and prunes the change log of the load).
    let settle = Instant::now();
    run_evaluation(&eval).await?;
    println!(
        "first job run after the creations: {:.1} s",
        settle.elapsed().as_secs_f64()
    );

    let shared = Arc::new(Mutex::new(Shared::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_before = loadavg();
    let eval_cpu_before = backend_cpu(&eval.db, EVAL_APP).await?;
    let write_cpu_before = backend_cpu(&eval.db, WRITE_APP).await?;

    // The evaluation tick: as the scheduler, a tick during a run is skipped.
    let ticker = {
        let (ctx, stop) = (eval.clone(), stop.clone());
        let period = Duration::from_millis(args.tick_ms);
        tokio::spawn(async move {
            let mut runs: Vec<Duration> = Vec::new();
            let mut every = tokio::time::interval(period);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                every.tick().await;
                let started = Instant::now();
                run_evaluation(&ctx).await?;
                runs.push(started.elapsed());
            }
            anyhow::Ok(runs)
        })
    };
    let observer = {
        let (db, shared, stop) = (eval.db.clone(), shared.clone(), stop.clone());
        let segments: Vec<(i64, Criteria)> = segments
            .iter()
            .map(|s| (s.id, s.criteria.clone()))
            .collect();
        let period = Duration::from_millis(args.poll_ms);
        tokio::spawn(async move { observe(&db, ws, &segments, &shared, &stop, period).await })
    };

    // The writes: a batch every batch/rate seconds, each in its own task (at most 16 at once;
    // beyond that the rate falls and the achieved rate says so).
    let window = Instant::now();
    let period = Duration::from_secs_f64(args.batch as f64 / args.rate as f64);
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    let mut rng = Rng(7);
    let mut next_tracer = tracer_from;
    let mut tracer_credit = 0.0;
    let tracers_per_batch = args.tracers as f64 * args.batch as f64 / args.rate as f64;
    let mut writers = Vec::new();
    while window.elapsed() < Duration::from_secs(args.secs) {
        every.tick().await;
        let permit = slots.clone().acquire_owned().await?;
        tracer_credit += tracers_per_batch;
        let mut batch = Vec::with_capacity(args.batch);
        let mut traced = Vec::new();
        while tracer_credit >= 1.0 && next_tracer < args.profiles && batch.len() < args.batch {
            tracer_credit -= 1.0;
            traced.push(customer_id(next_tracer));
            batch.push(tracer_update(next_tracer));
            next_tracer += 1;
        }
        let now = unix_now();
        while batch.len() < args.batch {
            batch.push(random_update(&mut rng, tracer_from, now));
        }
        let (ctx, shared) = (write.clone(), shared.clone());
        writers.push(tokio::spawn(async move {
            let sent = Instant::now();
            if let Ok(mut s) = shared.lock() {
                for id in &traced {
                    s.tracers.insert(id.clone(), Tracer { sent, acked: None });
                }
            }
            let n = batch.len();
            let result = profiles::update_attributes(&ctx, batch, Some("updates")).await;
            let acked = Instant::now();
            if let Ok(mut s) = shared.lock() {
                s.write_latencies.push(acked - sent);
                match result {
                    Ok(_) => {
                        s.updates_written += n;
                        for id in &traced {
                            if let Some(t) = s.tracers.get_mut(id) {
                                t.acked = Some(acked);
                            }
                        }
                    }
                    Err(e) => {
                        s.write_errors += 1;
                        for id in &traced {
                            s.tracers.remove(id);
                        }
                        eprintln!("write failed: {e}");
                    }
                }
            }
            drop(permit);
        }));
    }
    for writer in writers {
        writer.await?;
    }
    let written_in = window.elapsed();
    let load_after_writes = loadavg();

    // Wait for the last tracers, then stop the tick.
    let settle_until = Instant::now() + Duration::from_secs(args.settle_secs);
    while Instant::now() < settle_until {
        let pending = shared.lock().map(|s| s.tracers.len()).unwrap_or(0);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let timed = window.elapsed();
    let runs = ticker.await??;
    observer.await??;
    let eval_cpu = backend_cpu(&eval.db, EVAL_APP).await?;
    let write_cpu = backend_cpu(&eval.db, WRITE_APP).await?;

    let (mut lags, mut latencies, written, write_errors, unreflected) = {
        let s = shared
            .lock()
            .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
        (
            s.lags.clone(),
            s.write_latencies.clone(),
            s.updates_written,
            s.write_errors,
            s.tracers.len(),
        )
    };
    lags.sort_unstable();
    latencies.sort_unstable();
    let minutes = timed.as_secs_f64() / 60.0;
    let run_total: Duration = runs.iter().sum();
    let mut run_sorted = runs.clone();
    run_sorted.sort_unstable();
    println!(
        "load average: {} before the window, {} when the writes stopped",
        load_before, load_after_writes
    );
    println!(
        "writes: {written} updates in {:.1} s = {:.0} updates/s ({write_errors} failed batches); batch of {} p50 {} p99 {} max {}",
        written_in.as_secs_f64(),
        written as f64 / written_in.as_secs_f64(),
        args.batch,
        ms(pct(&latencies, 0.50)),
        ms(pct(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default()),
    );
    println!(
        "evaluation lag ({} tracers, observed every {} ms): p50 {} p99 {} max {}{}",
        lags.len(),
        args.poll_ms,
        ms(pct(&lags, 0.50)),
        ms(pct(&lags, 0.99)),
        ms(lags.last().copied().unwrap_or_default()),
        if unreflected > 0 {
            format!(
                "; {unreflected} NOT reflected {} s after the writes stopped",
                args.settle_secs
            )
        } else {
            String::new()
        }
    );
    println!(
        "segment-evaluation runs: {} in {:.1} s, run time p50 {} p99 {} max {}",
        runs.len(),
        timed.as_secs_f64(),
        ms(pct(&run_sorted, 0.50)),
        ms(pct(&run_sorted, 0.99)),
        ms(run_sorted.last().copied().unwrap_or_default()),
    );
    println!(
        "database time per minute: evaluation job {:.1} s of run time; PostgreSQL backend CPU {:.1} s for the evaluation, {:.1} s for the writes",
        run_total.as_secs_f64() / minutes,
        (eval_cpu - eval_cpu_before).max(0.0) / minutes,
        (write_cpu - write_cpu_before).max(0.0) / minutes,
    );

    run_evaluation(&eval).await?;
    verify(&eval.db, ws, &segments, args.verify).await?;
    sim.shutdown().await;
    if unreflected > 0 {
        bail!("{unreflected} tracer updates were never reflected");
    }
    Ok(())
}

/// One run of the job, as the scheduler does it; a failed run fails the benchmark.
async fn run_evaluation(ctx: &AppContext) -> anyhow::Result<()> {
    match jobs::run_job(ctx, Job::SegmentEvaluation, "bench-segments").await {
        Ok(JobOutcome::Succeeded { .. }) => Ok(()),
        Ok(JobOutcome::Skipped { .. }) => bail!("segment-evaluation was skipped (lease held)"),
        Err(e) => Err(anyhow::anyhow!(
            "segment-evaluation failed: {}",
            sharpsend_core::error::error_chain(&e)
        )),
    }
}

/// Every `period`: which acknowledged tracers now agree with every segment; records their lag.
async fn observe(
    db: &DatabaseConnection,
    ws: i64,
    segments: &[(i64, Criteria)],
    shared: &Mutex<Shared>,
    stop: &std::sync::atomic::AtomicBool,
    period: Duration,
) -> anyhow::Result<()> {
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        every.tick().await;
        let pending: Vec<String> = shared
            .lock()
            .map(|s| {
                s.tracers
                    .iter()
                    .filter(|(_, t)| t.acked.is_some())
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        if pending.is_empty() {
            continue;
        }
        let now = Utc::now();
        let filters: Vec<(i64, Filter)> = segments
            .iter()
            .map(|(id, c)| (*id, c.to_filter(now)))
            .collect();
        let disagreements = disagreements(db, ws, &filters, &pending).await?;
        let seen = Instant::now();
        if let Ok(mut s) = shared.lock() {
            for id in pending {
                if disagreements.get(&id).copied().unwrap_or(1) == 0
                    && let Some(t) = s.tracers.remove(&id)
                {
                    s.lags.push(seen - t.sent);
                }
            }
        }
    }
    Ok(())
}

/// For each of `ids`: the number of segments whose recorded membership of the person differs
/// from what its criteria say of the person's profile now.
async fn disagreements(
    db: &DatabaseConnection,
    ws: i64,
    filters: &[(i64, Filter)],
    ids: &[String],
) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut b = SqlBuilder::new(DbBackend::Postgres);
    b.sql("SELECT p.customer_id, 0");
    for (segment, filter) in filters {
        b.sql(" + CASE WHEN COALESCE((");
        b.filter(filter, "p");
        b.sql("), FALSE) = EXISTS (SELECT 1 FROM segment_members x WHERE x.workspace_id = ")
            .param(ws)
            .sql(" AND x.segment_id = ")
            .param(*segment)
            // `OFFSET 0`: one probe per tracer; PostgreSQL may otherwise hash every segment's
            // members for each observation (~1 s a look at 100k profiles, a core of the machine
            // the evaluation is measured on).
            .sql(" AND x.customer_id = p.customer_id OFFSET 0) THEN 0 ELSE 1 END");
    }
    b.sql(" AS wrong FROM profiles p WHERE p.workspace_id = ")
        .param(ws)
        .sql(" AND p.customer_id IN (SELECT jsonb_array_elements_text(CAST(")
        .param(serde_json::to_string(ids)?)
        .sql(" AS jsonb)))");
    let mut out = BTreeMap::new();
    for row in db.query_all_raw(b.build()).await? {
        let id: String = row.try_get("", "customer_id")?;
        let wrong: i32 = row.try_get("", "wrong")?;
        out.insert(id, i64::from(wrong));
    }
    Ok(out)
}

/// Compares the recorded membership of the first `n` segments with their criteria over every
/// profile; fails on any difference.
async fn verify(
    db: &DatabaseConnection,
    ws: i64,
    segments: &[Segment],
    n: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let now = Utc::now();
    for segment in segments.iter().take(n) {
        let mut b = SqlBuilder::new(DbBackend::Postgres);
        b.sql("SELECT COUNT(*) AS n FROM (SELECT p.customer_id FROM profiles p WHERE p.workspace_id = ")
            .param(ws)
            .sql(" AND ");
        b.filter(&segment.criteria.to_filter(now), "p");
        b.sql(" EXCEPT SELECT x.customer_id FROM segment_members x WHERE x.workspace_id = ")
            .param(ws)
            .sql(" AND x.segment_id = ")
            .param(segment.id);
        b.sql(") missing");
        let missing = count(db, b).await?;
        let mut b = SqlBuilder::new(DbBackend::Postgres);
        b.sql("SELECT COUNT(*) AS n FROM segment_members x WHERE x.workspace_id = ")
            .param(ws)
            .sql(" AND x.segment_id = ")
            .param(segment.id)
            .sql(" AND NOT EXISTS (SELECT 1 FROM profiles p WHERE p.workspace_id = x.workspace_id AND p.customer_id = x.customer_id AND ");
        b.filter(&segment.criteria.to_filter(now), "p");
        b.sql(")");
        let extra = count(db, b).await?;
        ensure!(
            missing == 0 && extra == 0,
            "segment {}: {missing} matching people are not members, {extra} members do not match",
            segment.id
        );
    }
    println!(
        "membership of {} segments equals their criteria over every profile after the run ({:.1} s to check)",
        n.min(segments.len()),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn count(db: &DatabaseConnection, b: SqlBuilder) -> anyhow::Result<i64> {
    let row = db.query_one_raw(b.build()).await?.context("count")?;
    Ok(row.try_get("", "n")?)
}

/// CPU seconds (user + system) of the PostgreSQL backends of pools named `app` — read from
/// `/proc`, so only when the database runs on this machine (0 otherwise).
async fn backend_cpu(db: &DatabaseConnection, app: &str) -> anyhow::Result<f64> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            [app.into()],
        ))
        .await?;
    let mut total = 0.0;
    for row in rows {
        let pid: i32 = row.try_get("", "pid")?;
        total += u32::try_from(pid)
            .ok()
            .and_then(process_cpu_seconds)
            .unwrap_or(0.0);
    }
    Ok(total)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}
