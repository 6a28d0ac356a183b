//! This crate's OpenTelemetry instruments: job runs and outbox delivery. They come from the
//! global meter provider on first use (after [`super::init`]); without an exporter they are the
//! API's no-ops and cost next to nothing. Attribute values are job names, outcomes and outbox
//! states only: never ids, emails or payloads.
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `sharpsend.job.runs` | counter | `job`, `outcome` (`succeeded`, `failed`, `skipped`) |
//! | `sharpsend.job.duration` | histogram, s | `job`, `outcome` |
//! | `sharpsend.outbox.delivered` | counter, rows | |
//! | `sharpsend.outbox.retried` | counter, rows | |
//! | `sharpsend.outbox.dead_lettered` | counter, rows | |
//! | `sharpsend.outbox.depth` | gauge, rows | `status` (`pending`, `in_flight`, `dead`) |
//! | `sharpsend.outbox.oldest_age` | gauge, s | (age of the oldest row not yet delivered) |

use std::{
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram},
};
use sharpsend_db::outbox::SyncStats;

use crate::AppContext;

/// Histogram boundaries in seconds, from 5 ms to 10 min.
pub const SECONDS_BOUNDARIES: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

struct Instruments {
    job_runs: Counter<u64>,
    job_duration: Histogram<f64>,
    delivered: Counter<u64>,
    retried: Counter<u64>,
    dead_lettered: Counter<u64>,
    depth: Gauge<u64>,
    oldest_age: Gauge<f64>,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("sharpsend-core");
    Instruments {
        job_runs: meter
            .u64_counter("sharpsend.job.runs")
            .with_description("Background job runs by outcome")
            .build(),
        job_duration: meter
            .f64_histogram("sharpsend.job.duration")
            .with_description("Duration of background job runs")
            .with_unit("s")
            .with_boundaries(SECONDS_BOUNDARIES.to_vec())
            .build(),
        delivered: meter
            .u64_counter("sharpsend.outbox.delivered")
            .with_description("Outbox rows delivered to Customer.io")
            .build(),
        retried: meter
            .u64_counter("sharpsend.outbox.retried")
            .with_description("Outbox rows put back for a later attempt")
            .build(),
        dead_lettered: meter
            .u64_counter("sharpsend.outbox.dead_lettered")
            .with_description("Outbox rows given up on (dead letters)")
            .build(),
        depth: meter
            .u64_gauge("sharpsend.outbox.depth")
            .with_description("Outbox rows by status (pending, in_flight, dead)")
            .build(),
        oldest_age: meter
            .f64_gauge("sharpsend.outbox.oldest_age")
            .with_description(
                "Age of the oldest outbox row not yet delivered nor dead (0 when none)",
            )
            .with_unit("s")
            .build(),
    }
});

/// Records one finished job run.
pub fn job_run(job: &'static str, outcome: &'static str, duration: Duration) {
    let attributes = [KeyValue::new("job", job), KeyValue::new("outcome", outcome)];
    INSTRUMENTS.job_runs.add(1, &attributes);
    INSTRUMENTS
        .job_duration
        .record(duration.as_secs_f64(), &attributes);
}

/// Records what one outbox delivery step did.
pub fn outbox_step(delivered: u64, retried: u64, dead: u64) {
    if delivered > 0 {
        INSTRUMENTS.delivered.add(delivered, &[]);
    }
    if retried > 0 {
        INSTRUMENTS.retried.add(retried, &[]);
    }
    if dead > 0 {
        INSTRUMENTS.dead_lettered.add(dead, &[]);
    }
}

/// Records the outbox's depth and lag.
pub fn outbox_stats(stats: &SyncStats, now: chrono::DateTime<chrono::Utc>) {
    let i = &*INSTRUMENTS;
    i.depth
        .record(stats.pending, &[KeyValue::new("status", "pending")]);
    i.depth
        .record(stats.in_flight, &[KeyValue::new("status", "in_flight")]);
    i.depth
        .record(stats.dead, &[KeyValue::new("status", "dead")]);
    let age = stats
        .oldest_pending_at
        .map(|at| (now - at).to_std().unwrap_or(Duration::ZERO).as_secs_f64())
        .unwrap_or(0.0);
    i.oldest_age.record(age, &[]);
}

/// How often [`refresh_outbox_gauges_every`] reads the outbox's statistics at most.
pub const OUTBOX_GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// Reads the outbox's statistics and records the gauges. A failure is logged and skipped
/// (the next refresh tries again).
pub async fn refresh_outbox_gauges(ctx: &AppContext) {
    match sharpsend_db::outbox::stats(&ctx.db, ctx.workspace_id()).await {
        Ok(stats) => outbox_stats(&stats, ctx.now()),
        Err(e) => {
            tracing::debug!(error = %crate::error::error_chain(&e), "could not read outbox statistics for metrics")
        }
    }
}

/// [`refresh_outbox_gauges`] unless this process refreshed them less than `interval` ago: cheap
/// enough to call after every step of a busy worker.
pub async fn refresh_outbox_gauges_every(ctx: &AppContext, interval: Duration) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let due = match LAST.lock() {
        Ok(mut last) => {
            let due = last.is_none_or(|at| at.elapsed() >= interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        }
        Err(_) => true,
    };
    if due {
        refresh_outbox_gauges(ctx).await;
    }
}
