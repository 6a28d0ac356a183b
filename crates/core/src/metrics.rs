//! Campaign metrics: polling Customer.io's metrics series into snapshots ([`poll_due`], the
//! `metrics-poll` job), watching new targets ([`watch`]), and answering reads
//! ([`get_metrics`]: totals, rates and series from the latest snapshot).
//!
//! Window: every poll asks for version-2 metrics from the target's `window_start` (when it was
//! created in Customer.io, or a newsletter's send time: no delivery is older) to now, so the
//! summed series cover every delivery of the target; Customer.io counts whole buckets, the first
//! holding `start`, the last holding `end`. Resolution by the window's length: up to 2 days
//! `hours`, up to 180 days `days`, longer `weeks` (at most ~522 buckets; Customer.io refuses
//! windows over 10 years, so older starts are clamped to 3,650 days before now).
//!
//! Cadence by how long ago the target was last active (`active_since`: a newsletter's send, a
//! watched trigger, or the newest bucket with `sent` in its last series): under 1 day every
//! 5 minutes, under 7 days hourly, under 30 days daily, older weekly ([`poll_interval`]). A
//! failed poll is retried sooner (1 minute doubling, never later than the cadence); a target
//! Customer.io no longer knows is tried again a day later at the earliest.
//!
//! Rate: every request goes through the client's App API limiter (10/s, smooth), which every
//! client of the workspace in the process shares: the sweep, the other jobs, and reads that poll
//! on demand. A sweep keeps a few requests in flight only to overlap latency, so N targets take
//! about N/10 s, and at most 600 targets are polled per run (about a minute; the rest stay due).
//! A 429 with `Retry-After` pauses the limiter for everyone (the client waits it out); one the
//! client gives up on (over 60 s, or a daily quota) stops the sweep, leaving the rest due for the
//! next run. Separate processes (server and scheduler) each pace themselves: `CIO_APP_RATE_LIMIT`
//! splits the workspace's 10/s between them.
//!
//! Buckets are in the time zone the client sends as `tz` (`SHARPSEND_METRICS_TZ`, default
//! America/New_York, Customer.io's own default for version 2); [`zoned`] computes their starts
//! in that zone (with the IANA zone rules) to report `series_start`, slice a broadcast's series
//! from a trigger's bucket, and align newsletters' series when summing them ([`eastern`] is the
//! same for New York). A snapshot polled before the zone was changed is read in the new zone
//! until its target's next poll replaces it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;
use cio_client::{CioError, MetricSeries, MetricsOf, MetricsQuery, Resolution};
use futures::StreamExt;
use sharpsend_db::campaigns::{self as mirror, CampaignKind};
use sharpsend_db::metrics::{self as store, MetricTarget, NewSnapshot, Snapshot, TargetSeen};

use crate::{AppContext, CoreError};

/// Snapshots kept per target (older ones are deleted when a new one is stored): an hour of
/// 5-minute polls, 12 weeks of weekly ones. Reads use the newest; the rest show how late metrics
/// arrived.
pub const SNAPSHOTS_KEPT: u64 = 12;
/// Longest window asked for (Customer.io refuses more than 10 years between `start` and `end`).
const MAX_WINDOW: TimeDelta = TimeDelta::days(3650);

/// A campaign, API-triggered broadcast or newsletter, by Customer.io id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricsTarget {
    Campaign(i64),
    Broadcast(i64),
    Newsletter(i64),
}

impl MetricsTarget {
    pub fn new(kind: CampaignKind, id: i64) -> Self {
        match kind {
            CampaignKind::Campaign => Self::Campaign(id),
            CampaignKind::Broadcast => Self::Broadcast(id),
            CampaignKind::Newsletter => Self::Newsletter(id),
        }
    }

    pub fn kind(self) -> CampaignKind {
        match self {
            Self::Campaign(_) => CampaignKind::Campaign,
            Self::Broadcast(_) => CampaignKind::Broadcast,
            Self::Newsletter(_) => CampaignKind::Newsletter,
        }
    }

    pub fn id(self) -> i64 {
        match self {
            Self::Campaign(id) | Self::Broadcast(id) | Self::Newsletter(id) => id,
        }
    }

    fn metrics_of(self) -> MetricsOf {
        match self {
            Self::Campaign(id) => MetricsOf::Campaign(id),
            Self::Broadcast(id) => MetricsOf::Broadcast(id),
            Self::Newsletter(id) => MetricsOf::Newsletter(id),
        }
    }

    fn not_found(self) -> CoreError {
        CoreError::NotFound {
            what: self.kind().as_str(),
            id: self.id().to_string(),
        }
    }
}

impl std::fmt::Display for MetricsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.id())
    }
}

impl From<&MetricTarget> for MetricsTarget {
    fn from(t: &MetricTarget) -> Self {
        Self::new(t.kind, t.cio_id)
    }
}

/// How often a target last active `active_for` ago is polled.
pub fn poll_interval(active_for: Duration) -> Duration {
    const DAY: u64 = 24 * 3600;
    match active_for.as_secs() {
        s if s < DAY => Duration::from_secs(5 * 60),
        s if s < 7 * DAY => Duration::from_secs(3600),
        s if s < 30 * DAY => Duration::from_secs(DAY),
        _ => Duration::from_secs(7 * DAY),
    }
}

/// When to try again after the `failures`-th failed poll in a row: 1 minute doubling, never
/// later than the cadence.
fn retry_delay(failures: i32, cadence: Duration) -> Duration {
    let exponent = u32::try_from(failures.clamp(1, 16) - 1).unwrap_or(0);
    Duration::from_secs(60u64 << exponent).min(cadence)
}

/// What one poll asks Customer.io for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub res: Resolution,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Start of the bucket holding `start`.
    pub series_start: DateTime<Utc>,
}

/// The time zone the client asks Customer.io to bucket metrics in (checked when the client was
/// built; New York if it somehow does not parse).
pub fn metrics_zone(ctx: &AppContext) -> Tz {
    ctx.cio
        .metrics_tz()
        .parse()
        .unwrap_or(chrono_tz::America::New_York)
}

/// [`window_in`] New York.
pub fn window(window_start: DateTime<Utc>, now: DateTime<Utc>) -> Window {
    window_in(chrono_tz::America::New_York, window_start, now)
}

/// The window covering every delivery since `window_start`, up to `now` (whole seconds), with
/// buckets in `tz`.
pub fn window_in(tz: Tz, window_start: DateTime<Utc>, now: DateTime<Utc>) -> Window {
    let end = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
    let start = DateTime::from_timestamp(window_start.timestamp(), 0)
        .unwrap_or(window_start)
        .clamp(end - MAX_WINDOW, end);
    let span = end - start;
    let res = if span <= TimeDelta::days(2) {
        Resolution::Hours
    } else if span <= TimeDelta::days(180) {
        Resolution::Days
    } else {
        Resolution::Weeks
    };
    Window {
        res,
        start,
        end,
        series_start: zoned::floor(tz, res, start),
    }
}

/// What [`watch`] and a sync derive from Customer.io's times: where series start and when the
/// target was last active. `None`: nothing to poll yet (a newsletter not sent).
pub(crate) fn target_seen(item: &mirror::SyncedCampaign, now: DateTime<Utc>) -> Option<TargetSeen> {
    let (window_start, active_since) = match item.kind {
        CampaignKind::Newsletter => {
            let sent = item.sent_at?;
            (sent, sent)
        }
        CampaignKind::Campaign | CampaignKind::Broadcast => {
            let created = item
                .cio_created_at
                .or(item.cio_updated_at)
                .unwrap_or(now - MAX_WINDOW);
            (
                created,
                item.cio_updated_at.map_or(created, |u| u.max(created)),
            )
        }
    };
    Some(TargetSeen {
        kind: item.kind,
        cio_id: item.cio_id,
        window_start,
        active_since,
    })
}

fn positive(field: &str, id: i64) -> Result<(), CoreError> {
    if id <= 0 {
        return Err(CoreError::invalid(
            field,
            "must be a positive Customer.io id",
        ));
    }
    Ok(())
}

/// Polls `target`'s metrics from now on (e.g. a newsletter just created or a broadcast just
/// triggered): due at the next `metrics-poll` run, its window reaching back to `active_since`
/// at least, and polled at the cadence of something active since then.
pub async fn watch(
    ctx: &AppContext,
    target: MetricsTarget,
    active_since: DateTime<Utc>,
) -> Result<(), CoreError> {
    positive("id", target.id())?;
    let ws = ctx.workspace_id();
    store::watch(
        &ctx.db,
        ws,
        target.kind(),
        target.id(),
        active_since,
        active_since,
        ctx.now(),
    )
    .await?;
    Ok(())
}

/// Options of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollOptions {
    /// At most this many targets per run (the rest stay due for the next run): 600 take about a
    /// minute at 10 requests/s, the job's schedule.
    pub max_targets: u64,
    /// Requests in flight at once. They all pass the shared limiter, so this only overlaps
    /// latency; it cannot exceed the rate.
    pub concurrency: usize,
}

impl Default for PollOptions {
    fn default() -> Self {
        Self {
            max_targets: 600,
            concurrency: 4,
        }
    }
}

/// What a metrics poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsPollReport {
    /// Targets due when the run started (at most `max_targets`).
    pub due: u32,
    /// Polled and stored.
    pub polled: u32,
    /// Failed (Customer.io error other than rate limiting); retried sooner.
    pub failed: u32,
    /// Of `failed`: Customer.io no longer knows them.
    pub not_found: u32,
    /// Left due because Customer.io rate limited beyond what the client waits out.
    pub deferred: u32,
    /// Targets asked of Customer.io (`polled` + `failed`; the client's own retries not counted).
    pub requests: u32,
    pub duration_ms: u64,
}

enum Outcome {
    Polled,
    Failed { not_found: bool },
    Deferred,
}

/// Polls the metrics of every target that is due (see the module docs for cadence and rate).
pub async fn poll_due(ctx: &AppContext) -> Result<MetricsPollReport, CoreError> {
    poll_due_with(ctx, &PollOptions::default()).await
}

/// [`poll_due`] with explicit options.
pub async fn poll_due_with(
    ctx: &AppContext,
    options: &PollOptions,
) -> Result<MetricsPollReport, CoreError> {
    let started = Instant::now();
    let due = store::due(&ctx.db, ctx.workspace_id(), ctx.now(), options.max_targets).await?;
    let due_count = due.len();
    let halted = AtomicBool::new(false);
    let outcomes: Vec<Result<Outcome, CoreError>> = futures::stream::iter(due)
        .map(|target| poll_one(ctx, target, &halted))
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;

    let mut report = MetricsPollReport {
        due: crate::campaigns::count(due_count),
        ..Default::default()
    };
    for outcome in outcomes {
        match outcome? {
            Outcome::Polled => report.polled += 1,
            Outcome::Failed { not_found } => {
                report.failed += 1;
                report.not_found += u32::from(not_found);
            }
            Outcome::Deferred => report.deferred += 1,
        }
    }
    report.requests = report.polled + report.failed;
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        due = report.due,
        polled = report.polled,
        failed = report.failed,
        deferred = report.deferred,
        duration_ms = report.duration_ms,
        "metrics polled"
    );
    Ok(report)
}

/// One target of a sweep; after a rate limit the client would not wait out (or a credentials
/// failure), the rest of the sweep is deferred.
async fn poll_one(
    ctx: &AppContext,
    target: MetricTarget,
    halted: &AtomicBool,
) -> Result<Outcome, CoreError> {
    if halted.load(Ordering::Relaxed) {
        return Ok(Outcome::Deferred);
    }
    match poll_target(ctx, &target, ctx.now()).await {
        Ok(_) => Ok(Outcome::Polled),
        Err(CoreError::Upstream(e @ CioError::RateLimited { .. })) => {
            tracing::warn!(subject = %MetricsTarget::from(&target), error = %e, "rate limited; sweep stops");
            halted.store(true, Ordering::Relaxed);
            Ok(Outcome::Deferred)
        }
        Err(CoreError::Upstream(e @ CioError::Unauthorized { .. })) => {
            halted.store(true, Ordering::Relaxed);
            Err(CoreError::Upstream(e))
        }
        Err(CoreError::Upstream(e)) => {
            let not_found = matches!(e, CioError::NotFound { .. });
            record_failure(ctx, &target, &e, not_found).await?;
            Ok(Outcome::Failed { not_found })
        }
        Err(other) => Err(other),
    }
}

async fn record_failure(
    ctx: &AppContext,
    target: &MetricTarget,
    error: &CioError,
    not_found: bool,
) -> Result<(), CoreError> {
    let now = ctx.now();
    let cadence = poll_interval((now - target.active_since).to_std().unwrap_or_default());
    let delay = if not_found {
        cadence.max(Duration::from_secs(24 * 3600))
    } else {
        retry_delay(target.failures.saturating_add(1), cadence)
    };
    let next = now + TimeDelta::from_std(delay).unwrap_or(TimeDelta::hours(1));
    tracing::warn!(subject = %MetricsTarget::from(target), error = %error, "metrics poll failed");
    store::record_failure(&ctx.db, target.id, &error.to_string(), next, now).await?;
    Ok(())
}

/// Polls one target now and stores the snapshot.
async fn poll_target(
    ctx: &AppContext,
    target: &MetricTarget,
    now: DateTime<Utc>,
) -> Result<Snapshot, CoreError> {
    let tz = metrics_zone(ctx);
    let w = window_in(tz, target.window_start, now);
    let query = MetricsQuery {
        res: w.res,
        start: w.start.timestamp(),
        end: w.end.timestamp(),
    };
    let polled = ctx
        .cio
        .metrics(MetricsTarget::from(target).metrics_of(), query)
        .await?;
    let polled_at = ctx.now();
    let active_since = last_send_bucket(tz, w.res, w.series_start, &polled.series)
        .map_or(target.active_since, |at| at.max(target.active_since));
    let cadence = poll_interval((polled_at - active_since).to_std().unwrap_or_default());
    let next = polled_at + TimeDelta::from_std(cadence).unwrap_or(TimeDelta::hours(1));
    let snapshot = NewSnapshot {
        polled_at,
        res: w.res.as_str().to_string(),
        start_at: w.start,
        end_at: w.end,
        series_start: w.series_start,
        series: polled.series,
    };
    Ok(store::record_poll(
        &ctx.db,
        target,
        &snapshot,
        active_since,
        next,
        SNAPSHOTS_KEPT,
    )
    .await?)
}

/// Start of the newest bucket with something sent.
fn last_send_bucket(
    tz: Tz,
    res: Resolution,
    series_start: DateTime<Utc>,
    series: &BTreeMap<String, Vec<u64>>,
) -> Option<DateTime<Utc>> {
    let sent = series.get("sent")?;
    let last = sent.iter().rposition(|n| *n > 0)?;
    zoned::starts(tz, res, series_start, last + 1).pop()
}

/// Rates from totals; each is 0 when its denominator is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricRates {
    /// delivered / sent
    pub delivery_rate: f64,
    /// opened / delivered
    pub open_rate: f64,
    /// clicked / delivered
    pub click_rate: f64,
    /// clicked / opened
    pub click_to_open_rate: f64,
    /// bounced / sent
    pub bounce_rate: f64,
    /// unsubscribed / delivered
    pub unsubscribe_rate: f64,
    /// converted / delivered
    pub conversion_rate: f64,
}

impl MetricRates {
    pub fn from_totals(totals: &BTreeMap<String, u64>) -> Self {
        let get = |k: &str| totals.get(k).copied().unwrap_or(0);
        let ratio = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
        let (sent, delivered, opened, clicked) =
            (get("sent"), get("delivered"), get("opened"), get("clicked"));
        Self {
            delivery_rate: ratio(delivered, sent),
            open_rate: ratio(opened, delivered),
            click_rate: ratio(clicked, delivered),
            click_to_open_rate: ratio(clicked, opened),
            bounce_rate: ratio(get("bounced"), sent),
            unsubscribe_rate: ratio(get("unsubscribed"), delivered),
            conversion_rate: ratio(get("converted"), delivered),
        }
    }
}

/// Metrics as answered to a reader.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignMetrics {
    /// Metric name → sum of its series.
    pub totals: BTreeMap<String, u64>,
    pub rates: MetricRates,
    /// Metric name → one value per bucket, oldest first.
    pub series: BTreeMap<String, Vec<u64>>,
    /// Bucket size; `None` when nothing was polled (e.g. a send not submitted yet).
    pub resolution: Option<Resolution>,
    pub series_start: Option<DateTime<Utc>>,
    /// When the figures were polled (several targets: the oldest of their polls).
    pub last_polled_at: Option<DateTime<Utc>>,
    /// What the figures cover.
    pub scope: String,
}

impl CampaignMetrics {
    fn from_series(
        series: BTreeMap<String, Vec<u64>>,
        resolution: Option<Resolution>,
        series_start: Option<DateTime<Utc>>,
        last_polled_at: Option<DateTime<Utc>>,
        scope: String,
    ) -> Self {
        let series = MetricSeries { series };
        let totals = series.totals();
        Self {
            rates: MetricRates::from_totals(&totals),
            totals,
            series: series.series,
            resolution,
            series_start,
            last_polled_at,
            scope,
        }
    }

    fn empty(scope: String) -> Self {
        Self::from_series(BTreeMap::new(), None, None, None, scope)
    }
}

/// Whose metrics a reader asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsSubject {
    Target(MetricsTarget),
    /// A send: its newsletters' metrics summed, or its broadcast's since its first trigger.
    Send(String),
}

/// Metrics of `subject` from the latest snapshot(s); a target never polled (or every target
/// when `refresh`) is polled now. Unknown targets: `NotFound`.
pub async fn get_metrics(
    ctx: &AppContext,
    subject: &MetricsSubject,
    refresh: bool,
) -> Result<CampaignMetrics, CoreError> {
    match subject {
        MetricsSubject::Target(target) => {
            let field = match target {
                MetricsTarget::Campaign(_) => "campaign_id",
                MetricsTarget::Broadcast(_) => "broadcast_id",
                MetricsTarget::Newsletter(_) => "newsletter_id",
            };
            positive(field, target.id())?;
            let snapshot = current_snapshot(ctx, *target, refresh, None).await?;
            Ok(from_snapshot(snapshot, target.to_string()))
        }
        MetricsSubject::Send(send_id) => {
            if send_id.trim().is_empty() {
                return Err(CoreError::invalid("send_id", "must not be empty"));
            }
            send_metrics(ctx, send_id, refresh).await
        }
    }
}

fn from_snapshot(s: Snapshot, scope: String) -> CampaignMetrics {
    CampaignMetrics::from_series(
        s.series,
        s.res.parse::<Resolution>().ok(),
        Some(s.series_start),
        Some(s.polled_at),
        scope,
    )
}

/// The latest snapshot of `target`, polled now if there is none, if `refresh`, or if the
/// target's window does not reach back to `reach_back`.
async fn current_snapshot(
    ctx: &AppContext,
    target: MetricsTarget,
    refresh: bool,
    reach_back: Option<DateTime<Utc>>,
) -> Result<Snapshot, CoreError> {
    let ws = ctx.workspace_id();
    let mut known = match store::get_target(&ctx.db, ws, target.kind(), target.id()).await? {
        Some(t) => t,
        None => register(ctx, target).await?,
    };
    let mut poll = refresh;
    if let Some(at) = reach_back
        && known.window_start > at
    {
        known = store::watch(
            &ctx.db,
            ws,
            target.kind(),
            target.id(),
            at,
            known.active_since,
            ctx.now(),
        )
        .await?;
        poll = true;
    }
    if !poll && let Some(latest) = store::latest_snapshot(&ctx.db, known.id).await? {
        return Ok(latest);
    }
    match poll_target(ctx, &known, ctx.now()).await {
        Err(CoreError::Upstream(CioError::NotFound { .. })) => Err(target.not_found()),
        other => other,
    }
}

/// Starts watching a target asked for by a reader (see [`crate::campaigns::get_campaign`] for
/// where it is found); unknown: `NotFound`.
async fn register(ctx: &AppContext, target: MetricsTarget) -> Result<MetricTarget, CoreError> {
    let ws = ctx.workspace_id();
    let now = ctx.now();
    let item = crate::campaigns::get_record(ctx, target.kind(), target.id())
        .await?
        .item;
    // A newsletter not sent yet has nothing to count; watch it from its creation.
    let seen = target_seen(&item, now).unwrap_or(TargetSeen {
        kind: item.kind,
        cio_id: item.cio_id,
        window_start: item.cio_created_at.unwrap_or(now),
        active_since: item.cio_created_at.unwrap_or(now),
    });
    Ok(store::watch(
        &ctx.db,
        ws,
        target.kind(),
        target.id(),
        seen.window_start,
        seen.active_since,
        now,
    )
    .await?)
}

async fn send_metrics(
    ctx: &AppContext,
    send_id: &str,
    refresh: bool,
) -> Result<CampaignMetrics, CoreError> {
    let targets = crate::sends::metric_targets(ctx, send_id).await?;
    if let Some((broadcast_id, first_trigger)) = targets.broadcast {
        let Some(first_trigger) = first_trigger else {
            return Ok(CampaignMetrics::empty(format!(
                "send {send_id}: broadcast {broadcast_id}, not triggered yet"
            )));
        };
        let target = MetricsTarget::Broadcast(broadcast_id);
        let snapshot = current_snapshot(ctx, target, refresh, Some(first_trigger)).await?;
        return Ok(slice_from(
            metrics_zone(ctx),
            snapshot,
            first_trigger,
            |from| {
                format!(
                    "send {send_id}: broadcast {broadcast_id} since {} (includes other triggers of that broadcast)",
                    from.to_rfc3339_opts(SecondsFormat::Secs, true)
                )
            },
        ));
    }
    if targets.newsletter_ids.is_empty() {
        return Ok(CampaignMetrics::empty(format!(
            "send {send_id}: no newsletter created yet"
        )));
    }
    let mut snapshots = Vec::with_capacity(targets.newsletter_ids.len());
    for id in &targets.newsletter_ids {
        snapshots.push(current_snapshot(ctx, MetricsTarget::Newsletter(*id), refresh, None).await?);
    }
    let ids: Vec<String> = targets.newsletter_ids.iter().map(i64::to_string).collect();
    let noun = if ids.len() == 1 {
        "newsletter"
    } else {
        "newsletters"
    };
    Ok(merge(
        metrics_zone(ctx),
        snapshots,
        format!("send {send_id}: {noun} {}", ids.join(", ")),
    ))
}

/// The snapshot's buckets from the one holding `from` on.
fn slice_from(
    tz: Tz,
    s: Snapshot,
    from: DateTime<Utc>,
    scope: impl FnOnce(DateTime<Utc>) -> String,
) -> CampaignMetrics {
    let Some(res) = s.res.parse::<Resolution>().ok() else {
        return from_snapshot(s, scope(from));
    };
    let len = s.series.values().map(Vec::len).max().unwrap_or(0);
    let starts = zoned::starts(tz, res, s.series_start, len);
    let first = starts.partition_point(|b| *b <= from).saturating_sub(1);
    let series_start = starts.get(first).copied().unwrap_or(s.series_start);
    let series = s
        .series
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().skip(first).collect()))
        .collect();
    CampaignMetrics::from_series(
        series,
        Some(res),
        Some(series_start),
        Some(s.polled_at),
        scope(series_start),
    )
}

/// Several targets' series summed bucket by bucket, aligned on the coarsest resolution among
/// them (hours, days and weeks nest; a week is counted in the month holding its start).
fn merge(tz: Tz, snapshots: Vec<Snapshot>, scope: String) -> CampaignMetrics {
    let resolutions: Vec<Resolution> = snapshots
        .iter()
        .filter_map(|s| s.res.parse::<Resolution>().ok())
        .collect();
    let Some(res) = resolutions.iter().copied().max() else {
        return CampaignMetrics::empty(scope);
    };
    let last_polled_at = snapshots.iter().map(|s| s.polled_at).min();
    let mut buckets: BTreeMap<DateTime<Utc>, BTreeMap<String, u64>> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for s in &snapshots {
        let own = s.res.parse::<Resolution>().ok().unwrap_or(res);
        let len = s.series.values().map(Vec::len).max().unwrap_or(0);
        let starts = zoned::starts(tz, own, s.series_start, len);
        for (name, values) in &s.series {
            if !names.contains(name) {
                names.push(name.clone());
            }
            for (start, value) in starts.iter().zip(values) {
                *buckets
                    .entry(zoned::floor(tz, res, *start))
                    .or_default()
                    .entry(name.clone())
                    .or_default() += value;
            }
        }
    }
    let (Some(first), Some(last)) = (
        buckets.keys().next().copied(),
        buckets.keys().next_back().copied(),
    ) else {
        return CampaignMetrics::empty(scope);
    };
    let mut series: BTreeMap<String, Vec<u64>> =
        names.into_iter().map(|n| (n, Vec::new())).collect();
    let mut at = first;
    while at <= last {
        let counts = buckets.get(&at);
        for (name, values) in series.iter_mut() {
            values.push(counts.and_then(|c| c.get(name)).copied().unwrap_or(0));
        }
        let next = zoned::next(tz, res, at);
        if next <= at {
            break;
        }
        at = next;
    }
    CampaignMetrics::from_series(series, Some(res), Some(first), last_polled_at, scope)
}

/// Bucket boundaries in America/New_York, Customer.io's default time zone for version-2
/// metrics ([`zoned`] in New York).
pub mod eastern {
    use chrono::{DateTime, TimeDelta, Utc};
    use chrono_tz::America::New_York as ZONE;
    use cio_client::Resolution;

    use super::zoned;

    /// UTC offset at an instant.
    pub fn offset(utc: DateTime<Utc>) -> TimeDelta {
        zoned::offset(ZONE, utc)
    }

    /// Start of the bucket holding `t`.
    pub fn floor(res: Resolution, t: DateTime<Utc>) -> DateTime<Utc> {
        zoned::floor(ZONE, res, t)
    }

    /// Start of the bucket after the one starting at `bucket_start`.
    pub fn next(res: Resolution, bucket_start: DateTime<Utc>) -> DateTime<Utc> {
        zoned::next(ZONE, res, bucket_start)
    }

    /// The starts of `n` buckets from the one starting at `series_start`.
    pub fn starts(res: Resolution, series_start: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        zoned::starts(ZONE, res, series_start, n)
    }
}

/// Bucket boundaries in a time zone: the one metrics are requested in. Buckets are local hours,
/// days, weeks from Sunday, months; a local time that occurs twice means its first occurrence,
/// one skipped by the clock change the next valid one.
pub mod zoned {
    use chrono::{
        DateTime, Datelike, LocalResult, Months, NaiveDateTime, Offset as _, TimeDelta,
        TimeZone as _, Timelike, Utc,
    };
    use chrono_tz::Tz;
    use cio_client::Resolution;

    /// UTC offset at an instant.
    pub fn offset(tz: Tz, utc: DateTime<Utc>) -> TimeDelta {
        TimeDelta::seconds(i64::from(
            tz.offset_from_utc_datetime(&utc.naive_utc())
                .fix()
                .local_minus_utc(),
        ))
    }

    fn to_local(tz: Tz, utc: DateTime<Utc>) -> NaiveDateTime {
        utc.with_timezone(&tz).naive_local()
    }

    fn from_local(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
        let mut candidate = local;
        for _ in 0..4 {
            match tz.from_local_datetime(&candidate) {
                LocalResult::Single(t) => return t.with_timezone(&Utc),
                LocalResult::Ambiguous(earlier, _) => return earlier.with_timezone(&Utc),
                LocalResult::None => candidate += TimeDelta::minutes(30),
            }
        }
        (local - offset(tz, local.and_utc())).and_utc()
    }

    fn floor_local(res: Resolution, local: NaiveDateTime) -> NaiveDateTime {
        let date = local.date();
        let midnight = date.and_time(chrono::NaiveTime::MIN);
        match res {
            Resolution::Hours => date.and_hms_opt(local.hour(), 0, 0).unwrap_or(local),
            Resolution::Days => midnight,
            Resolution::Weeks => {
                midnight - TimeDelta::days(i64::from(date.weekday().num_days_from_sunday()))
            }
            Resolution::Months => date
                .with_day(1)
                .map_or(midnight, |d| d.and_time(chrono::NaiveTime::MIN)),
        }
    }

    /// Start of the bucket holding `t`.
    pub fn floor(tz: Tz, res: Resolution, t: DateTime<Utc>) -> DateTime<Utc> {
        from_local(tz, floor_local(res, to_local(tz, t)))
    }

    /// Start of the bucket after the one starting at `bucket_start`.
    pub fn next(tz: Tz, res: Resolution, bucket_start: DateTime<Utc>) -> DateTime<Utc> {
        let local = floor_local(res, to_local(tz, bucket_start));
        let shifted = match res {
            Resolution::Hours => local.checked_add_signed(TimeDelta::hours(1)),
            Resolution::Days => local.checked_add_signed(TimeDelta::days(1)),
            Resolution::Weeks => local.checked_add_signed(TimeDelta::weeks(1)),
            Resolution::Months => local.checked_add_months(Months::new(1)),
        };
        let Some(shifted) = shifted else {
            return bucket_start;
        };
        let next = from_local(tz, shifted);
        if next > bucket_start {
            next
        } else {
            // The skipped hour of spring: the bucket after it.
            from_local(tz, shifted + TimeDelta::hours(1))
        }
    }

    /// The starts of `n` buckets from the one starting at `series_start`.
    pub fn starts(
        tz: Tz,
        res: Resolution,
        series_start: DateTime<Utc>,
        n: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = series_start;
        for _ in 0..n {
            out.push(at);
            at = next(tz, res, at);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use chrono::TimeZone;

    use super::*;

    const NY: Tz = chrono_tz::America::New_York;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn cadence_slows_down_with_age() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(poll_interval(h(0)), Duration::from_secs(300));
        assert_eq!(poll_interval(h(23)), Duration::from_secs(300));
        assert_eq!(poll_interval(h(24)), h(1));
        assert_eq!(poll_interval(h(24 * 7 - 1)), h(1));
        assert_eq!(poll_interval(h(24 * 7)), h(24));
        assert_eq!(poll_interval(h(24 * 30)), h(24 * 7));
        assert_eq!(retry_delay(1, h(1)), Duration::from_secs(60));
        assert_eq!(retry_delay(3, h(1)), Duration::from_secs(240));
        assert_eq!(
            retry_delay(30, Duration::from_secs(300)),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn window_resolution_follows_its_length_and_is_capped_at_ten_years() {
        let now = utc(2026, 11, 28, 15, 30);
        assert_eq!(
            window(now - TimeDelta::hours(30), now).res,
            Resolution::Hours
        );
        assert_eq!(window(now - TimeDelta::days(8), now).res, Resolution::Days);
        assert_eq!(
            window(now - TimeDelta::days(400), now).res,
            Resolution::Weeks
        );
        let ancient = window(utc(2001, 1, 1, 0, 0), now);
        assert_eq!(ancient.end - ancient.start, MAX_WINDOW);
        // A start in the future is clamped to now.
        assert_eq!(window(now + TimeDelta::days(1), now).start, now);
    }

    #[test]
    fn eastern_buckets_follow_new_york_time() {
        // 2026-11-28 15:30Z is 10:30 EST: the day starts at 05:00Z.
        assert_eq!(
            eastern::floor(Resolution::Days, utc(2026, 11, 28, 15, 30)),
            utc(2026, 11, 28, 5, 0)
        );
        // 2026-07-04 02:00Z is 22:00 EDT on July 3rd.
        assert_eq!(
            eastern::floor(Resolution::Days, utc(2026, 7, 4, 2, 0)),
            utc(2026, 7, 3, 4, 0)
        );
        // Weeks start on Sunday: Saturday 2026-11-28 → Sunday 2026-11-22 00:00 EST.
        assert_eq!(
            eastern::floor(Resolution::Weeks, utc(2026, 11, 28, 15, 30)),
            utc(2026, 11, 22, 5, 0)
        );
        assert_eq!(
            eastern::floor(Resolution::Hours, utc(2026, 11, 28, 15, 30)),
            utc(2026, 11, 28, 15, 0)
        );
        // Spring forward (2026-03-08): the local day has 23 hours.
        let day = eastern::floor(Resolution::Days, utc(2026, 3, 8, 12, 0));
        assert_eq!(day, utc(2026, 3, 8, 5, 0));
        assert_eq!(eastern::next(Resolution::Days, day), utc(2026, 3, 9, 4, 0));
        let hours = eastern::starts(Resolution::Hours, day, 24);
        assert_eq!(
            (hours[1], hours[2], hours[3]),
            (
                utc(2026, 3, 8, 6, 0),
                utc(2026, 3, 8, 7, 0),
                utc(2026, 3, 8, 8, 0)
            )
        );
        assert_eq!(
            (hours[22], hours[23]),
            (utc(2026, 3, 9, 3, 0), utc(2026, 3, 9, 4, 0))
        );
        // Fall back (2026-11-01): the local 01:00 bucket holds both 01:00s.
        let one_am = eastern::floor(Resolution::Hours, utc(2026, 11, 1, 6, 30));
        assert_eq!(one_am, utc(2026, 11, 1, 5, 0));
        assert_eq!(
            eastern::next(Resolution::Hours, one_am),
            utc(2026, 11, 1, 7, 0)
        );
        assert_eq!(
            eastern::next(Resolution::Months, utc(2026, 1, 1, 5, 0)),
            utc(2026, 2, 1, 5, 0)
        );
    }

    #[test]
    fn buckets_follow_the_configured_zone() {
        let paris: Tz = "Europe/Paris".parse().unwrap();
        // 2026-11-28 15:30Z is 16:30 in Paris: the day starts at 23:00Z the day before.
        assert_eq!(
            zoned::floor(paris, Resolution::Days, utc(2026, 11, 28, 15, 30)),
            utc(2026, 11, 27, 23, 0)
        );
        assert_eq!(
            window_in(paris, utc(2026, 11, 20, 15, 30), utc(2026, 11, 28, 15, 30)).series_start,
            utc(2026, 11, 19, 23, 0)
        );
        // Half-hour offsets: 15:50Z is 21:20 in Kolkata; its hour started at 15:30Z.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        assert_eq!(
            zoned::floor(kolkata, Resolution::Hours, utc(2026, 11, 28, 15, 50)),
            utc(2026, 11, 28, 15, 30)
        );
        // Summer time in Paris ends on 2026-10-25: that day has 25 hours.
        let day = zoned::floor(paris, Resolution::Days, utc(2026, 10, 25, 12, 0));
        assert_eq!(
            zoned::next(paris, Resolution::Days, day) - day,
            TimeDelta::hours(25)
        );
        // New York's buckets are the same as before.
        assert_eq!(
            zoned::floor(NY, Resolution::Days, utc(2026, 11, 28, 15, 30)),
            eastern::floor(Resolution::Days, utc(2026, 11, 28, 15, 30))
        );
    }

    fn snapshot(
        res: &str,
        series_start: DateTime<Utc>,
        sent: Vec<u64>,
        opened: Vec<u64>,
    ) -> Snapshot {
        Snapshot {
            id: 1,
            target_id: 1,
            polled_at: series_start + TimeDelta::days(10),
            res: res.into(),
            start_at: series_start,
            end_at: series_start + TimeDelta::days(10),
            series_start,
            series: BTreeMap::from([("sent".into(), sent), ("opened".into(), opened)]),
        }
    }

    #[test]
    fn rates_are_zero_without_a_denominator() {
        let totals = BTreeMap::from([
            ("sent".to_string(), 200),
            ("delivered".to_string(), 190),
            ("bounced".to_string(), 10),
            ("opened".to_string(), 95),
            ("clicked".to_string(), 19),
            ("unsubscribed".to_string(), 2),
            ("converted".to_string(), 1),
        ]);
        let r = MetricRates::from_totals(&totals);
        assert_eq!(r.delivery_rate, 0.95);
        assert_eq!(r.open_rate, 0.5);
        assert_eq!(r.click_rate, 0.1);
        assert_eq!(r.click_to_open_rate, 0.2);
        assert_eq!(r.bounce_rate, 0.05);
        assert_eq!(r.unsubscribe_rate, 2.0 / 190.0);
        assert_eq!(r.conversion_rate, 1.0 / 190.0);
        assert_eq!(
            MetricRates::from_totals(&BTreeMap::new()),
            MetricRates::default()
        );
    }

    #[test]
    fn a_broadcast_is_sliced_from_the_triggers_bucket() {
        let start = utc(2026, 11, 1, 4, 0); // midnight EDT
        let s = snapshot("days", start, vec![5, 0, 7, 1], vec![1, 2, 3, 4]);
        let m = slice_from(NY, s, utc(2026, 11, 3, 12, 0), |from| {
            format!("since {from}")
        });
        assert_eq!(m.series["sent"], vec![7, 1]);
        assert_eq!(m.totals["opened"], 7);
        // Nov 3 00:00 EST (after the clock change).
        assert_eq!(m.series_start, Some(utc(2026, 11, 3, 5, 0)));
        assert!(m.scope.contains("2026-11-03 05:00:00"), "{}", m.scope);
        // A trigger before the window: everything.
        let s = snapshot("days", start, vec![5, 0, 7, 1], vec![1, 2, 3, 4]);
        assert_eq!(
            slice_from(NY, s, start - TimeDelta::days(3), |_| String::new()).totals["sent"],
            13
        );
    }

    #[test]
    fn newsletters_are_merged_on_the_coarsest_resolution() {
        let day = utc(2026, 11, 20, 5, 0); // midnight EST
        let hourly = snapshot("hours", day + TimeDelta::hours(23), vec![3, 4], vec![0, 1]);
        let daily = snapshot("days", day, vec![10, 0, 2], vec![5, 5, 0]);
        let m = merge(NY, vec![hourly, daily], "both".into());
        assert_eq!(m.resolution, Some(Resolution::Days));
        assert_eq!(m.series_start, Some(day));
        // 23:00 falls on day 0, 00:00 the next day on day 1.
        assert_eq!(m.series["sent"], vec![13, 4, 2]);
        assert_eq!(m.totals["sent"], 19);
        assert_eq!(m.totals["opened"], 11);
        assert_eq!(merge(NY, Vec::new(), "none".into()).totals, BTreeMap::new());
    }
}
