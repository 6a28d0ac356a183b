//! Assignment analytics (issue #15) and the engagement watch (issue #13 §5).
//!
//! - [`assignment_analytics`]: per send and target segment counts, rates and an hourly-then-daily
//!   series (local hours and days of the workspace's reporting time zone) from delivery events (aggregated in SQL, `sharpsend_db::analytics`), or from the
//!   polled metric series for a send without events; deliverability against the workspace's
//!   baseline ([`flag`]).
//! - [`performance`]: assignments over a period ranked by a rate.
//! - [`export_page`] and [`ReportFormat`]: the per-delivery report, one bounded page at a time.
//! - [`suggest_segments`]: segments ranked by how they engaged with similar past assignments,
//!   with Wilson intervals ([`wilson`]); too little history is said, not guessed.
//! - [`WatchCursor`]: what a WatchEngagement stream has delivered (late commits included).
//!
//! Rates are `None` when their denominator is 0.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;
use cio_client::Resolution;
use serde_json::{Value, json};
use sharpsend_db::abtests::{self, REMAINDER, TestState};
use sharpsend_db::analytics::{self as store, BucketCount, DeliveryRow, Scope, Totals};

use crate::abtest::manage::{self, TestSpec};

use crate::metrics::{self, MetricsSubject, zoned};
use crate::{AppContext, CoreError, FieldViolation, input};

/// Buckets are hourly for this many local days from the day of the first send, then daily
/// (in the workspace's reporting time zone).
pub const HOURLY_DAYS: i64 = 3;
/// The baseline covers other assignments' deliveries sent in this many days before now.
pub const BASELINE_DAYS: i64 = 90;
/// A baseline of fewer deliveries flags nothing (`Unknown`).
pub const MIN_BASELINE: i64 = 100;
/// A segment needs this many delivered deliveries of similar assignments to be ranked.
pub const MIN_HISTORY_DELIVERED: i64 = 50;
/// Longest period ListAssignmentPerformance and ExportReport accept.
pub const MAX_PERIOD_DAYS: i64 = 366;
/// Rows of one export chunk.
pub const EXPORT_CHUNK_ROWS: u64 = 1000;
/// Most sends read as candidates for "similar past assignments".
const MAX_CANDIDATE_SENDS: u64 = 10_000;

/// Where figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    DeliveryEvents,
    PolledMetrics,
    None,
}

/// Deliveries counted per metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub recipients: i64,
    pub delivered: i64,
    pub bounced: i64,
    pub spam_reports: i64,
    pub unsubscribes: i64,
    pub human_opens: i64,
    pub human_clicks: i64,
    pub conversions: i64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.recipients += o.recipients;
        self.delivered += o.delivered;
        self.bounced += o.bounced;
        self.spam_reports += o.spam_reports;
        self.unsubscribes += o.unsubscribes;
        self.human_opens += o.human_opens;
        self.human_clicks += o.human_clicks;
        self.conversions += o.conversions;
    }

    /// Adds `n` to the count of `metric` (a `sharpsend_db::analytics::BUCKET_METRICS` name).
    fn add_metric(&mut self, metric: &str, n: i64) {
        let slot = match metric {
            "sent" => &mut self.recipients,
            "delivered" => &mut self.delivered,
            "human_opened" => &mut self.human_opens,
            "human_clicked" => &mut self.human_clicks,
            "bounced" => &mut self.bounced,
            "spammed" => &mut self.spam_reports,
            "unsubscribed" => &mut self.unsubscribes,
            "converted" => &mut self.conversions,
            _ => return,
        };
        *slot += n;
    }

    fn from_totals(t: &Totals) -> Self {
        Self {
            recipients: t.sent,
            delivered: t.delivered,
            bounced: t.bounced,
            spam_reports: t.spammed,
            unsubscribes: t.unsubscribed,
            human_opens: t.human_opened,
            human_clicks: t.human_clicked,
            conversions: t.converted,
        }
    }

    pub fn rates(&self) -> Rates {
        Rates {
            open_rate: ratio(self.human_opens, self.delivered),
            click_rate: ratio(self.human_clicks, self.delivered),
            click_to_open_rate: ratio(self.human_clicks, self.human_opens),
            bounce_rate: ratio(self.bounced, self.recipients),
            spam_rate: ratio(self.spam_reports, self.delivered),
            unsubscribe_rate: ratio(self.unsubscribes, self.delivered),
            conversion_rate: ratio(self.conversions, self.delivered),
        }
    }
}

/// `n / d`, `None` when `d` is 0.
pub fn ratio(n: i64, d: i64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// Rates of [`Counts`]; `None`: zero denominator.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub open_rate: Option<f64>,
    pub click_rate: Option<f64>,
    pub click_to_open_rate: Option<f64>,
    pub bounce_rate: Option<f64>,
    pub spam_rate: Option<f64>,
    pub unsubscribe_rate: Option<f64>,
    pub conversion_rate: Option<f64>,
}

/// One time bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub size_seconds: i64,
    pub counts: Counts,
}

/// One send to one target segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentPerformance {
    /// `snd_…`
    pub send_id: String,
    /// 0: the whole send (polled metrics).
    pub segment_id: i64,
    pub source: Source,
    pub counts: Counts,
    pub engaged_people: i64,
    pub series: Vec<Bucket>,
    pub as_of: Option<DateTime<Utc>>,
}

/// Deliverability against the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Normal,
    High,
    Unknown,
}

/// `rate` against `baseline` (of `baseline_n` deliveries): `High` at twice the baseline and
/// half a percentage point above it; `Unknown` without a rate or with a baseline of fewer than
/// [`MIN_BASELINE`] deliveries.
pub fn flag(rate: Option<f64>, baseline: Option<f64>, baseline_n: i64) -> Flag {
    match (rate, baseline) {
        (Some(r), Some(b)) if baseline_n >= MIN_BASELINE => {
            if r >= 2.0 * b && r - b >= 0.005 {
                Flag::High
            } else {
                Flag::Normal
            }
        }
        _ => Flag::Unknown,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Deliverability {
    pub bounce: Flag,
    pub spam: Flag,
    pub unsubscribe: Flag,
    pub baseline: Rates,
    pub baseline_recipients: i64,
}

/// One arm of an A/B test (a variant, or the remainder): its send's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantPerformance {
    /// The variant's name, or [`REMAINDER_NAME`].
    pub name: String,
    pub remainder: bool,
    /// Its send (`snd_…`), once sent.
    pub send_id: Option<String>,
    /// Its manual segment in Customer.io, once created.
    pub segment_id: Option<i64>,
    pub source: Source,
    pub counts: Counts,
    pub engaged_people: i64,
    pub as_of: Option<DateTime<Utc>>,
}

/// One A/B test of the assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct TestPerformance {
    /// `abt_…`
    pub test_id: String,
    pub title: String,
    pub state: TestState,
    /// The winning variant's name, once decided with one.
    pub winner: Option<String>,
    /// The variants in order, then the remainder (once started).
    pub variants: Vec<VariantPerformance>,
}

/// What the remainder arm is called (the report's `variant` column, VariantPerformance).
pub const REMAINDER_NAME: &str = "remainder";
/// Most A/B tests of one assignment GetAssignmentAnalytics reports (newest first).
pub const MAX_TESTS: u64 = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentAnalytics {
    pub assignment_id: String,
    pub counts: Counts,
    pub engaged_people: i64,
    pub series: Vec<Bucket>,
    pub segments: Vec<SegmentPerformance>,
    /// Its A/B tests, newest first, each arm with its send's figures.
    pub tests: Vec<TestPerformance>,
    pub deliverability: Deliverability,
    pub source: Source,
    pub computed_at: DateTime<Utc>,
}

fn check_id(field: &str, value: &str) -> Result<(), CoreError> {
    let mut v = Vec::new();
    input::identifier(&mut v, field, value, input::limits::ID_BYTES, true);
    input::finish(v)
}

/// Where an assignment's series buckets fall, in the workspace's reporting time zone (the one
/// its metrics are polled in, `SHARPSEND_METRICS_TZ`): local hours until the
/// [`HOURLY_DAYS`]th local midnight after the day of the first send, local days after (23 or 25
/// hours across a clock change). All in unix seconds.
#[derive(Debug, Clone, Copy)]
struct Buckets {
    tz: Tz,
    hourly_until: i64,
    /// How far a local hour starts before a UTC hour: the zone's UTC offset within an hour, at
    /// the first send (1,800 for UTC+5:30, 0 for whole-hour zones).
    hour_shift: i64,
}

impl Buckets {
    fn new(tz: Tz, first: DateTime<Utc>) -> Self {
        let mut until = zoned::floor(tz, Resolution::Days, first);
        for _ in 0..HOURLY_DAYS {
            until = zoned::next(tz, Resolution::Days, until);
        }
        Self {
            tz,
            hourly_until: until.timestamp(),
            hour_shift: zoned::offset(tz, first).num_seconds().rem_euclid(3600),
        }
    }

    /// The start of the bucket holding the local hour starting at `hour`.
    fn start_of(&self, hour: i64) -> i64 {
        if hour < self.hourly_until {
            return hour;
        }
        DateTime::from_timestamp(hour, 0).map_or(hour, |t| {
            zoned::floor(self.tz, Resolution::Days, t).timestamp()
        })
    }

    fn bucket(&self, start: i64, counts: Counts) -> Bucket {
        let at = DateTime::from_timestamp(start, 0).unwrap_or_default();
        let size_seconds = if start < self.hourly_until {
            3600
        } else {
            (zoned::next(self.tz, Resolution::Days, at) - at).num_seconds()
        };
        Bucket {
            start: at,
            size_seconds,
            counts,
        }
    }
}

/// Everything `assignment_id` did (see the module doc). Unknown assignment: `NotFound`.
pub async fn assignment_analytics(
    ctx: &AppContext,
    assignment_id: &str,
) -> Result<AssignmentAnalytics, CoreError> {
    check_id("assignment_id", assignment_id)?;
    let ws = ctx.workspace_id();
    let sends = store::sends_of(&ctx.db, ws, &[assignment_id.to_string()]).await?;
    let Some(first) = sends.iter().map(|s| s.created_at).min() else {
        return Err(CoreError::NotFound {
            what: "assignment",
            id: assignment_id.to_string(),
        });
    };
    let buckets = Buckets::new(metrics::metrics_zone(ctx), first);
    let scope = Scope {
        assignment_id: Some(assignment_id.to_string()),
        ..Default::default()
    };
    let counts = store::bucket_counts(&ctx.db, ws, &scope, buckets.hour_shift, |hour| {
        buckets.start_of(hour)
    })
    .await?;
    let public: HashMap<i64, &str> = sends.iter().map(|s| (s.id, s.public_id.as_str())).collect();
    let mut groups = group_buckets(&counts, &buckets, &public);
    let with_events: HashSet<&str> = groups.iter().map(|g| g.send_id.as_str()).collect();
    let mut polled = Vec::new();
    for send in sends
        .iter()
        .filter(|s| !with_events.contains(s.public_id.as_str()))
    {
        polled.push(polled_send(ctx, &send.public_id).await);
    }
    groups.extend(polled);
    let tests = tests_of(ctx, assignment_id, &groups).await?;

    let mut total = Counts::default();
    let mut engaged = 0;
    let mut series: BTreeMap<i64, Counts> = BTreeMap::new();
    for g in &groups {
        total.add(&g.counts);
        engaged += g.engaged_people;
        for b in &g.series {
            series
                .entry(b.start.timestamp())
                .or_default()
                .add(&b.counts);
        }
    }
    let source = if groups.iter().any(|g| g.source == Source::DeliveryEvents) {
        Source::DeliveryEvents
    } else if groups.iter().any(|g| g.source == Source::PolledMetrics) {
        Source::PolledMetrics
    } else {
        Source::None
    };
    let now = ctx.now();
    let baseline_scope = Scope {
        other_than_assignment: Some(assignment_id.to_string()),
        sent_from: Some(now - TimeDelta::days(BASELINE_DAYS)),
        ..Default::default()
    };
    let mut baseline = Counts::default();
    for t in store::assignment_counts(&ctx.db, ws, &baseline_scope, false).await? {
        baseline.add(&Counts::from_totals(&t));
    }
    let (rates, base) = (total.rates(), baseline.rates());
    let deliverability = Deliverability {
        bounce: flag(rates.bounce_rate, base.bounce_rate, baseline.recipients),
        spam: flag(rates.spam_rate, base.spam_rate, baseline.recipients),
        unsubscribe: flag(
            rates.unsubscribe_rate,
            base.unsubscribe_rate,
            baseline.recipients,
        ),
        baseline: base,
        baseline_recipients: baseline.recipients,
    };
    Ok(AssignmentAnalytics {
        assignment_id: assignment_id.to_string(),
        counts: total,
        engaged_people: engaged,
        series: series
            .into_iter()
            .map(|(start, counts)| buckets.bucket(start, counts))
            .collect(),
        segments: groups,
        tests,
        deliverability,
        source,
        computed_at: now,
    })
}

/// The name of `arm` of a test with `spec` (variants by index, [`REMAINDER`] the remainder).
fn arm_name(spec: &TestSpec, arm: i32) -> String {
    if arm == REMAINDER {
        return REMAINDER_NAME.to_string();
    }
    usize::try_from(arm)
        .ok()
        .and_then(|i| spec.variants.get(i))
        .map_or_else(|| format!("arm {arm}"), |v| v.name.clone())
}

/// The A/B tests of `assignment_id`, each arm with the figures of its send (`groups`: the
/// assignment's per send and segment figures; an arm's send has one segment, its own).
async fn tests_of(
    ctx: &AppContext,
    assignment_id: &str,
    groups: &[SegmentPerformance],
) -> Result<Vec<TestPerformance>, CoreError> {
    let records = abtests::list(
        &ctx.db,
        ctx.workspace_id(),
        Some(assignment_id),
        None,
        MAX_TESTS,
    )
    .await?;
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let spec = manage::spec_of(&record)?;
        let winner = manage::decision_of(&record)?
            .and_then(|d| d.winner)
            .and_then(|w| spec.variants.get(w))
            .map(|v| v.name.clone());
        let arms = abtests::arms(&ctx.db, record.id).await?;
        let mut variants = Vec::new();
        let order = (0..spec.variants.len())
            .filter_map(|i| i32::try_from(i).ok())
            .chain(std::iter::once(REMAINDER));
        for arm in order {
            let row = arms.iter().find(|a| a.arm == arm);
            if arm == REMAINDER && row.is_none() {
                continue;
            }
            let send_id = row.and_then(|a| a.send_public_id.clone());
            let mut v = VariantPerformance {
                name: arm_name(&spec, arm),
                remainder: arm == REMAINDER,
                send_id: send_id.clone(),
                segment_id: row.and_then(|a| a.cio_segment_id),
                source: Source::None,
                counts: Counts::default(),
                engaged_people: 0,
                as_of: None,
            };
            for g in groups
                .iter()
                .filter(|g| Some(&g.send_id) == send_id.as_ref())
            {
                v.counts.add(&g.counts);
                v.engaged_people += g.engaged_people;
                v.as_of = v.as_of.max(g.as_of);
                if v.source != Source::DeliveryEvents && g.source != Source::None {
                    v.source = g.source;
                }
            }
            variants.push(v);
        }
        out.push(TestPerformance {
            test_id: record.public_id,
            title: record.title,
            state: record.state,
            winner,
            variants,
        });
    }
    Ok(out)
}

/// Groups bucket counts per (send, segment).
fn group_buckets(
    counts: &[BucketCount],
    buckets: &Buckets,
    public: &HashMap<i64, &str>,
) -> Vec<SegmentPerformance> {
    let mut out: BTreeMap<(i64, i64), SegmentPerformance> = BTreeMap::new();
    let mut series: BTreeMap<(i64, i64), BTreeMap<i64, Counts>> = BTreeMap::new();
    for c in counts {
        let key = (c.send_id, c.segment_id.unwrap_or(0));
        let g = out.entry(key).or_insert_with(|| SegmentPerformance {
            send_id: public
                .get(&c.send_id)
                .map_or_else(String::new, |s| s.to_string()),
            segment_id: key.1,
            source: Source::DeliveryEvents,
            counts: Counts::default(),
            engaged_people: 0,
            series: Vec::new(),
            as_of: None,
        });
        match c.metric.as_str() {
            "engaged_people" => g.engaged_people = c.count,
            "last_event_at" => g.as_of = DateTime::from_timestamp(c.count, 0),
            metric => {
                g.counts.add_metric(metric, c.count);
                series
                    .entry(key)
                    .or_default()
                    .entry(c.bucket)
                    .or_default()
                    .add_metric(metric, c.count);
            }
        }
    }
    for (key, g) in out.iter_mut() {
        g.series = series
            .remove(key)
            .unwrap_or_default()
            .into_iter()
            .map(|(start, counts)| buckets.bucket(start, counts))
            .collect();
    }
    out.into_values().collect()
}

/// A send without delivery events, from its polled metric series (no per-segment split and no
/// series here: the polled resolution is days once a send is two days old, too coarse for the
/// hourly part of [`Buckets`]). A failure to read them is
/// logged and answered as `Source::None`.
async fn polled_send(ctx: &AppContext, public_id: &str) -> SegmentPerformance {
    let mut g = SegmentPerformance {
        send_id: public_id.to_string(),
        segment_id: 0,
        source: Source::None,
        counts: Counts::default(),
        engaged_people: 0,
        series: Vec::new(),
        as_of: None,
    };
    match metrics::get_metrics(ctx, &MetricsSubject::Send(public_id.to_string()), false).await {
        Ok(m) if m.last_polled_at.is_some() => {
            let get = |k: &str| i64::try_from(m.totals.get(k).copied().unwrap_or(0)).unwrap_or(0);
            let human = |human: &str, any: &str| {
                if m.totals.contains_key(human) {
                    get(human)
                } else {
                    get(any)
                }
            };
            g.source = Source::PolledMetrics;
            g.counts = Counts {
                recipients: get("sent"),
                delivered: get("delivered"),
                bounced: get("bounced"),
                spam_reports: get("spammed"),
                unsubscribes: get("unsubscribed"),
                human_opens: human("human_opened", "opened"),
                human_clicks: human("human_clicked", "clicked"),
                conversions: get("converted"),
            };
            g.as_of = m.last_polled_at;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(
            send_id = public_id,
            error = %crate::error::error_chain(&e),
            "polled metrics unavailable for analytics"
        ),
    }
    g
}

/// What [`performance`] ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RankBy {
    OpenRate,
    #[default]
    ClickRate,
    ClickToOpenRate,
    BounceRate,
    UnsubscribeRate,
    Recipients,
}

impl RankBy {
    fn value(self, c: &Counts) -> Option<f64> {
        let r = c.rates();
        match self {
            RankBy::OpenRate => r.open_rate,
            RankBy::ClickRate => r.click_rate,
            RankBy::ClickToOpenRate => r.click_to_open_rate,
            RankBy::BounceRate => r.bounce_rate,
            RankBy::UnsubscribeRate => r.unsubscribe_rate,
            RankBy::Recipients => Some(c.recipients as f64),
        }
    }
}

/// A period [from, until).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

impl Period {
    /// Checks `from` not before 1970, `until` after it and at most [`MAX_PERIOD_DAYS`] apart.
    pub fn new(from: DateTime<Utc>, until: DateTime<Utc>) -> Result<Self, CoreError> {
        if from.timestamp() < 0 {
            return Err(CoreError::invalid(
                "start_time",
                "must not be before 1970-01-01T00:00:00Z (no delivery is)",
            ));
        }
        if until <= from {
            return Err(CoreError::invalid("end_time", "must be after start_time"));
        }
        if until - from > TimeDelta::days(MAX_PERIOD_DAYS) {
            return Err(CoreError::invalid(
                "end_time",
                format!("at most {MAX_PERIOD_DAYS} days after start_time"),
            ));
        }
        Ok(Self { from, until })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PerformanceQuery {
    pub period: Period,
    pub rank_by: RankBy,
    pub segment_id: Option<i64>,
    pub content_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentPerformance {
    pub assignment_id: String,
    pub title: String,
    pub content_types: Vec<String>,
    pub counts: Counts,
    pub first_sent_at: Option<DateTime<Utc>>,
    /// 1-based.
    pub rank: u64,
}

fn content_types(request: &Value) -> Vec<String> {
    request
        .get("content_types")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Assignments with deliveries first sent in the period, ranked (highest first, no value last,
/// then by assignment id), the page of `limit` after `offset`.
pub async fn performance(
    ctx: &AppContext,
    q: &PerformanceQuery,
    offset: u64,
    limit: u64,
) -> Result<crate::paging::Page<AssignmentPerformance, u64>, CoreError> {
    if let Some(ct) = &q.content_type {
        check_id("content_type", ct)?;
    }
    let ws = ctx.workspace_id();
    let scope = Scope {
        segment_id: q.segment_id,
        sent_from: Some(q.period.from),
        sent_until: Some(q.period.until),
        ..Default::default()
    };
    let totals = store::assignment_counts(&ctx.db, ws, &scope, false).await?;
    let ids: Vec<String> = totals.iter().map(|t| t.assignment_id.clone()).collect();
    let mut info: HashMap<String, (String, BTreeSet<String>)> = HashMap::new();
    for chunk in ids.chunks(500) {
        for s in store::sends_of(&ctx.db, ws, chunk).await? {
            let entry = info
                .entry(s.assignment_id.clone())
                .or_insert_with(|| (s.title.clone(), BTreeSet::new()));
            entry.1.extend(content_types(&s.request));
        }
    }
    let wanted = q.content_type.as_deref().map(str::to_lowercase);
    let mut rows: Vec<(Option<f64>, AssignmentPerformance)> = totals
        .iter()
        .filter_map(|t| {
            let (title, kinds) = info.get(&t.assignment_id).cloned().unwrap_or_default();
            if let Some(w) = &wanted
                && !kinds.iter().any(|k| k.to_lowercase() == *w)
            {
                return None;
            }
            let counts = Counts::from_totals(t);
            Some((
                q.rank_by.value(&counts),
                AssignmentPerformance {
                    assignment_id: t.assignment_id.clone(),
                    title,
                    content_types: kinds.into_iter().collect(),
                    counts,
                    first_sent_at: DateTime::from_timestamp(t.first_at, 0),
                    rank: 0,
                },
            ))
        })
        .collect();
    rows.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => y
            .total_cmp(&x)
            .then_with(|| a.1.assignment_id.cmp(&b.1.assignment_id)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.assignment_id.cmp(&b.1.assignment_id),
    });
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let items: Vec<AssignmentPerformance> = rows
        .into_iter()
        .enumerate()
        .skip(start)
        .take(usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX))
        .map(|(i, (_, mut p))| {
            p.rank = i as u64 + 1;
            p
        })
        .collect();
    Ok(crate::paging::Page::cut(items, limit, |p| p.rank))
}

/// What an export covers (at least one part set; together they narrow it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportScope {
    pub assignment_id: Option<String>,
    pub period: Option<Period>,
    pub segment_id: Option<i64>,
    /// An A/B test (`abt_…`): the deliveries of its arms' sends.
    pub test_id: Option<String>,
}

impl ExportScope {
    /// Checks the scope and finds its test: a malformed id is `InvalidArgument`, an unknown
    /// test or assignment (one never sent, or another workspace's) `NotFound`, as
    /// [`assignment_analytics`] says. Answers what the report reads.
    pub async fn resolve(&self, ctx: &AppContext) -> Result<Scope, CoreError> {
        if let Some(a) = &self.assignment_id {
            check_id("assignment_id", a)?;
            let sends = store::sends_of(&ctx.db, ctx.workspace_id(), std::slice::from_ref(a));
            if sends.await?.is_empty() {
                return Err(CoreError::NotFound {
                    what: "assignment",
                    id: a.clone(),
                });
            }
        }
        if self.assignment_id.is_none()
            && self.period.is_none()
            && self.segment_id.is_none()
            && self.test_id.is_none()
        {
            return Err(CoreError::invalid(
                "assignment_id",
                "give an assignment, a period (start_time and end_time), a segment or a test",
            ));
        }
        let send_ids = match &self.test_id {
            Some(t) => {
                check_id("test_id", t)?;
                let record = manage::find(ctx, t).await?;
                let arms = abtests::arms(&ctx.db, record.id).await?;
                Some(arms.iter().filter_map(|a| a.send_id).collect())
            }
            None => None,
        };
        Ok(Scope {
            assignment_id: self.assignment_id.clone(),
            segment_id: self.segment_id,
            send_ids,
            sent_from: self.period.map(|p| p.from),
            sent_until: self.period.map(|p| p.until),
            ..Default::default()
        })
    }
}

/// Report formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Csv,
    JsonLines,
}

/// The report's columns, in order (documented in the README; never renamed or reordered,
/// new ones only appended).
pub const REPORT_COLUMNS: [&str; 15] = [
    "assignment_id",
    "send_id",
    "segment_id",
    "delivery_id",
    "customer_id",
    "sent_at",
    "delivered_at",
    "human_opened_at",
    "human_clicked_at",
    "bounced_at",
    "spam_reported_at",
    "unsubscribed_at",
    "converted_at",
    "source",
    "variant",
];

/// The header line of a CSV report (JSON lines have none).
pub fn report_header(format: ReportFormat) -> String {
    match format {
        ReportFormat::Csv => format!("{}\r\n", REPORT_COLUMNS.join(",")),
        ReportFormat::JsonLines => String::new(),
    }
}

fn iso(t: Option<i64>) -> String {
    t.and_then(|s| DateTime::from_timestamp(s, 0))
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// What a report row says of its send: the public id (`snd_…`) and, for an A/B test arm's
/// send, the variant's name ([`REMAINDER_NAME`] for the remainder; empty otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendLabel {
    pub public_id: String,
    pub variant: String,
}

/// One row's values, in [`REPORT_COLUMNS`] order.
fn row_values(r: &DeliveryRow, send: &SendLabel) -> [String; 15] {
    let source = match (r.webhook != 0, r.poll != 0) {
        (true, true) => "webhook+poll",
        (true, false) => "webhook",
        _ => "poll",
    };
    [
        r.assignment_id.clone().unwrap_or_default(),
        send.public_id.clone(),
        r.segment_id.map(|s| s.to_string()).unwrap_or_default(),
        r.delivery_id.clone(),
        r.customer_id.clone().unwrap_or_default(),
        iso(Some(r.first_at)),
        iso(r.delivered_at),
        iso(r.open_at),
        iso(r.click_at),
        iso(r.bounced_at),
        iso(r.spammed_at),
        iso(r.unsubscribed_at),
        iso(r.converted_at),
        source.to_string(),
        send.variant.clone(),
    ]
}

/// Appends one row in `format`.
pub fn write_row(out: &mut String, format: ReportFormat, r: &DeliveryRow, send: &SendLabel) {
    let values = row_values(r, send);
    match format {
        ReportFormat::Csv => {
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                csv_field(out, v);
            }
            out.push_str("\r\n");
        }
        ReportFormat::JsonLines => {
            let mut map = serde_json::Map::new();
            for (k, v) in REPORT_COLUMNS.iter().zip(values) {
                let value = if v.is_empty() {
                    Value::Null
                } else if *k == "segment_id" {
                    v.parse::<i64>()
                        .map_or(Value::String(v.clone()), Value::from)
                } else {
                    Value::String(v)
                };
                map.insert((*k).to_string(), value);
            }
            out.push_str(&Value::Object(map).to_string());
            out.push('\n');
        }
    }
}

/// One export page of `scope` ([`ExportScope::resolve`]): the rows after delivery `after`
/// with their sends' labels (`cache` grows by the sends met, a few per report), and where the
/// next page starts (`None`: done).
pub async fn export_page(
    ctx: &AppContext,
    scope: &Scope,
    after: Option<&str>,
    cache: &mut HashMap<i64, SendLabel>,
) -> Result<(Vec<(DeliveryRow, SendLabel)>, Option<String>), CoreError> {
    let (rows, next) =
        store::delivery_page(&ctx.db, ctx.workspace_id(), scope, after, EXPORT_CHUNK_ROWS).await?;
    let missing: Vec<i64> = rows
        .iter()
        .map(|r| r.send_id)
        .filter(|id| !cache.contains_key(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !missing.is_empty() {
        let ws = ctx.workspace_id();
        for (id, public_id) in store::send_public_ids(&ctx.db, ws, &missing).await? {
            cache.insert(
                id,
                SendLabel {
                    public_id,
                    variant: String::new(),
                },
            );
        }
        for (arm, test) in abtests::arms_of_sends(&ctx.db, ws, &missing).await? {
            let spec = manage::spec_of(&test)?;
            if let Some(label) = arm.send_id.and_then(|id| cache.get_mut(&id)) {
                label.variant = arm_name(&spec, arm.arm);
            }
        }
    }
    let rows = rows
        .into_iter()
        .map(|r| {
            let label = cache.get(&r.send_id).cloned().unwrap_or_default();
            (r, label)
        })
        .collect();
    Ok((rows, next))
}

/// A 95% Wilson score interval of `k` successes in `n` (`(0, 0)` for `n` = 0).
pub fn wilson(k: i64, n: i64) -> (f64, f64) {
    if n <= 0 {
        return (0.0, 0.0);
    }
    let z = 1.959_964_f64;
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Suggestion {
    pub segment_id: i64,
    pub name: String,
    pub member_count: i64,
    pub history_deliveries: i64,
    pub history_assignments: i64,
    pub enough_history: bool,
    pub open_rate: f64,
    pub open_interval: (f64, f64),
    pub click_rate: f64,
    pub click_interval: (f64, f64),
    pub reason: String,
    pub rank: u32,
}

/// Most content types one SuggestSegments call may name.
pub const MAX_SUGGEST_TYPES: usize = 20;

/// Segments ranked for a new assignment of `kinds` (content types / tags), at most `limit`.
/// Similar past assignments: those sent with one of `kinds` (case-insensitive). A segment's
/// history: the deliveries of similar assignments sent to it as a target.
pub async fn suggest_segments(
    ctx: &AppContext,
    kinds: &[String],
    title: &str,
    limit: usize,
) -> Result<(Vec<Suggestion>, usize), CoreError> {
    let mut violations = Vec::new();
    if kinds.is_empty() || kinds.len() > MAX_SUGGEST_TYPES {
        violations.push(FieldViolation::new(
            "content_types",
            format!("give 1 to {MAX_SUGGEST_TYPES}"),
        ));
    }
    for (i, k) in kinds.iter().enumerate() {
        input::identifier(
            &mut violations,
            &format!("content_types[{i}]"),
            k,
            100,
            true,
        );
    }
    input::text(&mut violations, "title", title, 500);
    input::finish(violations)?;
    let ws = ctx.workspace_id();
    let wanted: BTreeSet<String> = kinds.iter().map(|k| k.to_lowercase()).collect();
    let similar: BTreeSet<String> = store::assignments_with_sends(&ctx.db, ws, MAX_CANDIDATE_SENDS)
        .await?
        .into_iter()
        .filter(|s| {
            content_types(&s.request)
                .iter()
                .any(|k| wanted.contains(&k.to_lowercase()))
        })
        .map(|s| s.assignment_id)
        .collect();
    let mut per_segment: BTreeMap<i64, (Counts, i64)> = BTreeMap::new();
    if !similar.is_empty() {
        let scope = Scope {
            assignment_ids: Some(similar.iter().cloned().collect()),
            ..Default::default()
        };
        for t in store::assignment_counts(&ctx.db, ws, &scope, true).await? {
            let Some(seg) = t.segment_id else { continue };
            let e = per_segment.entry(seg).or_default();
            e.0.add(&Counts::from_totals(&t));
            e.1 += 1;
        }
    }
    let known = store::segments(&ctx.db, ws).await?;
    let mut names: BTreeMap<i64, (String, i64)> = known
        .into_iter()
        .map(|s| (s.cio_id, (s.name, s.member_count.unwrap_or(0))))
        .collect();
    for seg in per_segment.keys() {
        names.entry(*seg).or_insert_with(|| (String::new(), 0));
    }
    let topic = if title.trim().is_empty() {
        kinds.join(", ")
    } else {
        format!("\"{}\" ({})", title.trim(), kinds.join(", "))
    };
    let mut out: Vec<Suggestion> = names
        .into_iter()
        .map(|(segment_id, (name, member_count))| {
            let (c, n_assignments) = per_segment.get(&segment_id).copied().unwrap_or_default();
            let enough = c.delivered >= MIN_HISTORY_DELIVERED;
            let open = wilson(c.human_opens, c.delivered);
            let click = wilson(c.human_clicks, c.delivered);
            let (open_rate, click_rate) = (
                ratio(c.human_opens, c.delivered).unwrap_or(0.0),
                ratio(c.human_clicks, c.delivered).unwrap_or(0.0),
            );
            let reason = if enough {
                format!(
                    "{:.1}% of {} deliveries of {} similar assignment(s) were clicked by a person \
                     ({:.1}% opened); similar to {topic}",
                    click_rate * 100.0,
                    c.delivered,
                    n_assignments,
                    open_rate * 100.0
                )
            } else if c.delivered == 0 {
                format!("no history: never targeted by an assignment similar to {topic}")
            } else {
                format!(
                    "too little history: {} delivered of similar assignments (at least \
                     {MIN_HISTORY_DELIVERED} needed)",
                    c.delivered
                )
            };
            Suggestion {
                segment_id,
                name,
                member_count,
                history_deliveries: c.recipients,
                history_assignments: n_assignments,
                enough_history: enough,
                open_rate: if enough { open_rate } else { 0.0 },
                open_interval: if enough { open } else { (0.0, 0.0) },
                click_rate: if enough { click_rate } else { 0.0 },
                click_interval: if enough { click } else { (0.0, 0.0) },
                reason,
                rank: 0,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.enough_history
            .cmp(&a.enough_history)
            .then(b.click_interval.0.total_cmp(&a.click_interval.0))
            .then(b.open_interval.0.total_cmp(&a.open_interval.0))
            .then(b.history_deliveries.cmp(&a.history_deliveries))
            .then(a.segment_id.cmp(&b.segment_id))
    });
    out.truncate(limit);
    for (i, s) in out.iter_mut().enumerate() {
        if s.enough_history {
            s.rank = u32::try_from(i + 1).unwrap_or(u32::MAX);
        }
    }
    Ok((out, similar.len()))
}

/// How long a gap in event ids is waited for before the watch moves past it: an id is taken
/// when a transaction inserts, but becomes visible when it commits, so a later id can be seen
/// first; ids also stay unused for good (a duplicate webhook's `ON CONFLICT DO NOTHING`).
pub const WATCH_GAP_WAIT: Duration = Duration::from_secs(2);
/// Most ids a watch remembers above its low-water mark (past it, gaps are skipped at once).
const WATCH_MAX_PENDING: usize = 10_000;

/// What a WatchEngagement stream has delivered: everything up to `low` (seen or given up on),
/// and the ids above it already sent. Reading from `low` again catches events that committed
/// late, within [`WATCH_GAP_WAIT`].
#[derive(Debug, Clone)]
pub struct WatchCursor {
    low: i64,
    sent: BTreeSet<i64>,
    gap_since: Option<Instant>,
}

impl WatchCursor {
    pub fn new(after: i64) -> Self {
        Self {
            low: after,
            sent: BTreeSet::new(),
            gap_since: None,
        }
    }

    /// Where the next read starts (exclusive).
    pub fn read_after(&self) -> i64 {
        self.low
    }

    /// Keeps the ids not sent yet of a read (in order) and records them as sent.
    pub fn fresh(&mut self, ids: impl IntoIterator<Item = i64>) -> Vec<i64> {
        let fresh: Vec<i64> = ids
            .into_iter()
            .filter(|id| *id > self.low && self.sent.insert(*id))
            .collect();
        fresh
    }

    /// Moves the low-water mark over contiguous sent ids, and over a gap older than `wait`
    /// (or when too many ids are pending).
    pub fn settle(&mut self, now: Instant, wait: Duration) {
        loop {
            while self.sent.first() == Some(&(self.low + 1)) {
                self.sent.pop_first();
                self.low += 1;
            }
            let Some(&next) = self.sent.first() else {
                self.gap_since = None;
                return;
            };
            let since = *self.gap_since.get_or_insert(now);
            if now.duration_since(since) >= wait || self.sent.len() > WATCH_MAX_PENDING {
                self.low = next - 1;
                self.gap_since = None;
            } else {
                return;
            }
        }
    }
}

/// A watch stream: events after the cursor, one bounded batch per read.
pub async fn watch_read(
    ctx: &AppContext,
    cursor: &mut WatchCursor,
    assignment_id: Option<&str>,
) -> Result<Vec<crate::engagement::DeliveryEvent>, CoreError> {
    let rows = crate::engagement::events_after(
        ctx,
        cursor.read_after(),
        assignment_id,
        crate::engagement::MAX_EVENTS_PAGE,
    )
    .await?;
    let fresh: HashSet<i64> = cursor
        .fresh(rows.iter().map(|e| e.id))
        .into_iter()
        .collect();
    cursor.settle(Instant::now(), WATCH_GAP_WAIT);
    Ok(rows.into_iter().filter(|e| fresh.contains(&e.id)).collect())
}

/// The JSON of a report row (for tests and tools reading JSON lines).
pub fn row_json(r: &DeliveryRow, send: &SendLabel) -> Value {
    let mut line = String::new();
    write_row(&mut line, ReportFormat::JsonLines, r, send);
    serde_json::from_str(line.trim_end()).unwrap_or_else(|_| json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_denominators_give_no_rate() {
        let r = Counts::default().rates();
        assert_eq!(r, Rates::default());
        let c = Counts {
            recipients: 10,
            delivered: 8,
            human_opens: 4,
            human_clicks: 2,
            bounced: 2,
            ..Default::default()
        };
        let r = c.rates();
        assert_eq!(r.open_rate, Some(0.5));
        assert_eq!(r.click_to_open_rate, Some(0.5));
        assert_eq!(r.bounce_rate, Some(0.2));
        assert_eq!(r.spam_rate, Some(0.0));
    }

    #[test]
    fn flags_need_a_baseline_and_a_clear_excess() {
        assert_eq!(flag(Some(0.05), Some(0.02), 1000), Flag::High);
        assert_eq!(flag(Some(0.03), Some(0.02), 1000), Flag::Normal);
        // Twice a tiny baseline but within half a point: normal.
        assert_eq!(flag(Some(0.002), Some(0.001), 1000), Flag::Normal);
        assert_eq!(flag(Some(0.5), Some(0.02), 99), Flag::Unknown);
        assert_eq!(flag(None, Some(0.02), 1000), Flag::Unknown);
        assert_eq!(flag(Some(0.1), None, 1000), Flag::Unknown);
    }

    #[test]
    fn wilson_intervals_contain_the_rate_and_shrink_with_n() {
        let (lo, hi) = wilson(30, 100);
        assert!(lo < 0.3 && 0.3 < hi);
        let (lo2, hi2) = wilson(300, 1000);
        assert!(hi2 - lo2 < hi - lo);
        assert_eq!(wilson(0, 0), (0.0, 0.0));
        let (lo, hi) = wilson(0, 10);
        assert!(lo == 0.0 && hi > 0.0 && hi < 0.35);
    }

    fn at(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32, sec: u32) -> i64 {
        use chrono::TimeZone as _;
        tz.with_ymd_and_hms(y, mo, d, h, mi, sec)
            .earliest()
            .map(|t| t.timestamp())
            .unwrap_or_default()
    }

    #[test]
    fn buckets_are_hourly_until_the_third_midnight_then_daily_in_utc() {
        let t = DateTime::from_timestamp(86_400 * 10 + 23 * 3600 + 59 * 60, 0).unwrap_or_default();
        let b = Buckets::new(chrono_tz::UTC, t);
        assert_eq!(b.hourly_until, 86_400 * 13);
        assert_eq!(b.hour_shift, 0);
        let last_hour = b.hourly_until - 3600;
        assert_eq!(b.start_of(last_hour), last_hour);
        assert_eq!(b.bucket(last_hour, Counts::default()).size_seconds, 3600);
        assert_eq!(b.start_of(b.hourly_until + 5 * 3600), b.hourly_until);
        assert_eq!(
            b.bucket(b.hourly_until, Counts::default()).size_seconds,
            86_400
        );
    }

    #[test]
    fn daily_buckets_start_at_local_midnight_and_last_23_or_25_hours_across_a_clock_change() {
        let ny = chrono_tz::America::New_York;
        // First send Thursday 5 March 2026, 23:30 EST: hourly until Sunday 8 March 00:00 EST.
        let first = DateTime::from_timestamp(at(ny, 2026, 3, 5, 23, 30, 0), 0).unwrap_or_default();
        let b = Buckets::new(ny, first);
        assert_eq!(b.hourly_until, at(ny, 2026, 3, 8, 0, 0, 0));
        assert_eq!(b.hourly_until % 86_400, 5 * 3600, "05:00 UTC");
        // The clocks go forward on 8 March: that day has 23 hours.
        let sunday = b.bucket(b.hourly_until, Counts::default());
        assert_eq!(sunday.size_seconds, 23 * 3600);
        // Its last hour (23:00 EDT) is Sunday's; the next (00:00 EDT Monday) is Monday's.
        let last = at(ny, 2026, 3, 8, 23, 0, 0);
        let monday = at(ny, 2026, 3, 9, 0, 0, 0);
        assert_eq!(monday - last, 3600);
        assert_eq!(b.start_of(last), b.hourly_until);
        assert_eq!(b.start_of(monday), monday);
        assert_eq!(b.bucket(monday, Counts::default()).size_seconds, 86_400);
        // Autumn: 1 November 2026 has 25 hours, both 01:00s in it.
        let autumn = Buckets::new(
            ny,
            DateTime::from_timestamp(at(ny, 2026, 10, 20, 9, 0, 0), 0).unwrap_or_default(),
        );
        let sunday = at(ny, 2026, 11, 1, 0, 0, 0);
        assert_eq!(
            autumn.bucket(sunday, Counts::default()).size_seconds,
            25 * 3600
        );
        assert_eq!(
            autumn.start_of(sunday + 2 * 3600),
            sunday,
            "the second 01:00 (EST)"
        );
        assert_eq!(autumn.start_of(sunday + 24 * 3600), sunday, "23:00 EST");
        let monday = at(ny, 2026, 11, 2, 0, 0, 0);
        assert_eq!(monday - sunday, 25 * 3600);
        assert_eq!(autumn.start_of(monday), monday);
    }

    #[test]
    fn a_half_hour_zone_shifts_hours_and_days_by_its_offset() {
        let kolkata = chrono_tz::Asia::Kolkata;
        let first =
            DateTime::from_timestamp(at(kolkata, 2026, 6, 1, 10, 15, 0), 0).unwrap_or_default();
        let b = Buckets::new(kolkata, first);
        assert_eq!(b.hour_shift, 1800);
        // Local midnight is 18:30 UTC.
        assert_eq!(b.hourly_until, at(kolkata, 2026, 6, 4, 0, 0, 0));
        assert_eq!(b.hourly_until % 3600, 1800);
        assert_eq!(b.start_of(b.hourly_until + 23 * 3600), b.hourly_until);
        assert_eq!(
            b.start_of(b.hourly_until + 24 * 3600),
            b.hourly_until + 86_400
        );
    }

    #[test]
    fn the_watch_cursor_waits_for_late_commits_then_moves_on() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(2);
        let mut c = WatchCursor::new(10);
        assert_eq!(c.fresh([11, 12, 14]), vec![11, 12, 14]);
        c.settle(t0, wait);
        assert_eq!(c.read_after(), 12);
        // 13 commits late: read again from 12, only 13 is new.
        assert_eq!(c.fresh([13, 14, 15]), vec![13, 15]);
        c.settle(t0, wait);
        assert_eq!(c.read_after(), 15);
        // 16 never comes: after the wait the cursor moves past it.
        assert_eq!(c.fresh([17]), vec![17]);
        c.settle(t0, wait);
        assert_eq!(c.read_after(), 15);
        c.settle(t0 + wait, wait);
        assert_eq!(c.read_after(), 17);
        assert!(c.fresh([17]).is_empty());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let row = DeliveryRow {
            delivery_id: "d,1".into(),
            customer_id: Some("a\"b".into()),
            assignment_id: Some("asg".into()),
            send_id: 1,
            segment_id: Some(7),
            first_id: 1,
            first_at: 0,
            last_at: 0,
            delivered_at: Some(3600),
            open_at: None,
            click_at: None,
            bounced_at: None,
            spammed_at: None,
            unsubscribed_at: None,
            converted_at: None,
            webhook: 1,
            poll: 0,
        };
        let mut out = String::new();
        let label = SendLabel {
            public_id: "snd_1".into(),
            variant: String::new(),
        };
        write_row(&mut out, ReportFormat::Csv, &row, &label);
        assert_eq!(
            out,
            "asg,snd_1,7,\"d,1\",\"a\"\"b\",1970-01-01T00:00:00Z,1970-01-01T01:00:00Z,,,,,,,webhook,\r\n"
        );
        let variant = SendLabel {
            variant: "urgent, v2".into(),
            ..label.clone()
        };
        let mut out = String::new();
        write_row(&mut out, ReportFormat::Csv, &row, &variant);
        assert!(out.ends_with(",webhook,\"urgent, v2\"\r\n"), "{out}");
        assert_eq!(row_json(&row, &variant)["variant"], "urgent, v2");
        let j = row_json(&row, &label);
        assert_eq!(j["variant"], Value::Null);
        assert_eq!(j["segment_id"], 7);
        assert_eq!(j["human_opened_at"], Value::Null);
        assert_eq!(j["delivery_id"], "d,1");
    }
}
