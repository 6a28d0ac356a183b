//! Outbox delivery: claims due writes, turns them into as few Customer.io requests as the limits
//! allow, sends them, and records each row's fate.
//!
//! - Rows are claimed with `sharpsend_db::outbox::claim_due` (safe with many workers and
//!   replicas; a crashed worker's claim lapses and the rows are claimed again), per person in
//!   order: a person's later write is not claimed while an earlier one waits for a retry or
//!   anything of the person is in flight.
//! - Per person, in acceptance order: consecutive attribute updates (no event of the person
//!   between them) are coalesced into one identify (later value wins per attribute) at the
//!   place of the first of them; nothing is moved across an event. Events are never coalesced
//!   or dropped; each carries its ULID so Customer.io drops a repeat.
//! - Operations are packed into Track API v2 `/api/v2/batch` requests of at most 500 KB, each
//!   operation at most 32 KB and an identify at most 300 attributes (a larger one is split by
//!   attributes); a larger event (its data may reach 100,000 bytes) goes alone through the v1
//!   event endpoint. A person's operations go in one batch, in order, or — when they cannot —
//!   in a chain of requests of their own sent one after the other, never two at once; a request
//!   whose rows must be retried holds the rest of its chain back (given back unsent). See
//!   `plan`.
//! - A 207's `batch_index` errors dead-letter exactly their rows with Customer.io's reason; a
//!   whole-request 4xx is bisected to find the bad operation instead of failing its neighbours;
//!   a rejected identify coalesced from several rows is re-sent row by row so that only a bad
//!   row dies; 429/5xx/timeouts, 408 and 3xx retry the rows later with backoff (or
//!   Retry-After); after `max_attempts` a row is dead-lettered. Nothing is retried forever and
//!   nothing is dropped.
//! - A chain renews its claim before a request when less than three quarters of the claim TTL
//!   is left, and sends nothing more once its rows are no longer all its own.
//! - Managed segment membership changes (`segment_add` / `segment_remove` rows, at most 1000 ids
//!   each) go one call each, in order per segment, to `add_customers` / `remove_customers`
//!   through `managed_segments::deliver_change`, with the same retry / dead-letter rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use cio_client::{
    BATCH_ENVELOPE_BYTES, BatchOutcome, CioError, EncodedOp, Event, Identifier, MAX_BATCH_BYTES,
    MAX_OP_BYTES, PersonOp,
};
use futures::{StreamExt, future::BoxFuture};
use rand::Rng;
use serde_json::{Map, Value};
use sharpsend_db::outbox::{self, Kind, OutboxRow};

use crate::{AppContext, CoreError};

/// How the worker behaves.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Rows claimed per step (`SHARPSEND_OUTBOX_CLAIM_LIMIT`, default 5000).
    pub claim_limit: u64,
    /// How long a claim holds before another worker may take the rows, e.g. after a crash
    /// (`SHARPSEND_OUTBOX_CLAIM_TTL_SECS`, default 120 s).
    pub claim_ttl: Duration,
    /// Attempts before a row is dead-lettered (`SHARPSEND_OUTBOX_MAX_ATTEMPTS`, default 10).
    pub max_attempts: i32,
    /// First retry delay; doubles per attempt, jittered (default 2 s).
    pub retry_base: Duration,
    /// Longest retry delay (default 10 min).
    pub retry_max: Duration,
    /// Requests in flight at once per worker (`SHARPSEND_OUTBOX_CONCURRENCY`, default 4); the
    /// client's shared Track limiter still bounds the request rate.
    pub concurrency: usize,
    /// How often an idle worker looks for work written by other processes
    /// (`SHARPSEND_OUTBOX_POLL_MS`, default 500 ms); in-process writes wake it at once.
    pub poll_interval: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            claim_limit: 5000,
            claim_ttl: Duration::from_secs(120),
            max_attempts: 10,
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(600),
            concurrency: 4,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// What one step or a drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub claimed: u64,
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    /// Rows given back without an attempt: held back behind an earlier write of their person
    /// that must be retried first.
    pub held_back: u64,
    /// HTTP requests sent to Customer.io (bisection, one-by-one re-sends and v1 requests
    /// included).
    pub requests: u64,
    /// Ids of the rows this worker delivered.
    pub delivered_ids: Vec<i64>,
}

impl DeliveryReport {
    /// Adds `other`'s counts and delivered ids to this report.
    pub fn absorb(&mut self, other: DeliveryReport) {
        self.claimed += other.claimed;
        self.delivered += other.delivered;
        self.retried += other.retried;
        self.dead += other.dead;
        self.held_back += other.held_back;
        self.requests += other.requests;
        self.delivered_ids.extend(other.delivered_ids);
    }
}

/// Runs steps until no row is due.
pub async fn drain(
    ctx: &AppContext,
    worker: &str,
    config: &DeliveryConfig,
) -> Result<DeliveryReport, CoreError> {
    let mut total = DeliveryReport::default();
    loop {
        let step = deliver_step(ctx, worker, config).await?;
        let claimed = step.claimed;
        total.absorb(step);
        if claimed == 0 {
            return Ok(total);
        }
    }
}

/// Delivers until `shutdown`: runs steps until nothing is due, then sleeps until woken by an
/// in-process write or the poll interval passes. Errors are logged and retried after a pause.
/// `shutdown` is looked at between steps too, so a large backlog does not hold it back for more
/// than the step in progress (which is finished, never cut off: its requests are in flight).
pub async fn run_worker(
    ctx: AppContext,
    worker: String,
    config: DeliveryConfig,
    shutdown: impl Future<Output = ()>,
) {
    use futures::FutureExt as _;

    tokio::pin!(shutdown);
    tracing::info!(worker = %worker, "outbox worker started");
    let mut stopping = false;
    while !stopping {
        let woken = ctx.outbox_wakeup.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let mut report = DeliveryReport::default();
        let drained = loop {
            match deliver_step(&ctx, &worker, &config).await {
                Ok(step) => {
                    let claimed = step.claimed;
                    report.absorb(step);
                    if claimed == 0 {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
            if shutdown.as_mut().now_or_never().is_some() {
                stopping = true;
                break Ok(());
            }
        };
        if report.claimed > 0 {
            tracing::info!(
                claimed = report.claimed,
                delivered = report.delivered,
                retried = report.retried,
                dead = report.dead,
                held_back = report.held_back,
                requests = report.requests,
                "outbox delivered"
            );
        }
        let pause = match drained {
            Ok(()) => {
                crate::telemetry::metrics::refresh_outbox_gauges_every(
                    &ctx,
                    crate::telemetry::metrics::OUTBOX_GAUGE_INTERVAL,
                )
                .await;
                config.poll_interval
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "outbox delivery failed; retrying shortly");
                config.poll_interval.max(Duration::from_secs(2))
            }
        };
        if stopping {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => stopping = true,
            _ = &mut woken => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    tracing::info!(worker = %worker, "outbox worker stopped");
}

/// Most attributes Customer.io takes in one identify ("at most 300 unique attributes per
/// identify call").
const MAX_ATTRIBUTES_PER_OP: usize = 300;

/// One encoded v2 operation and the outbox rows it carries.
#[derive(Debug, Clone)]
struct PlannedOp {
    op: EncodedOp,
    rows: Vec<i64>,
}

/// One HTTP request to make.
#[derive(Debug, Clone)]
enum Planned {
    Batch(Vec<PlannedOp>),
    /// An event too large for a v2 operation, sent through the v1 endpoint.
    V1Event {
        customer_id: String,
        event: Event,
        rows: Vec<i64>,
    },
    /// A managed segment's membership change (`segment_add` / `segment_remove` row), sent as
    /// one `add_customers` / `remove_customers` call (see `managed_segments::deliver_change`).
    Segment {
        add: bool,
        payload: Value,
        rows: Vec<i64>,
    },
}

impl Planned {
    /// The rows this request carries, each once, in order.
    fn rows(&self) -> Vec<i64> {
        match self {
            Planned::Batch(ops) => {
                let mut rows: Vec<i64> = ops.iter().flat_map(|o| o.rows.iter().copied()).collect();
                rows.sort_unstable();
                rows.dedup();
                rows
            }
            Planned::V1Event { rows, .. } | Planned::Segment { rows, .. } => rows.clone(),
        }
    }
}

/// Requests that go out one after the other, each only once the one before it has been
/// answered; a request whose rows must be retried holds back the rest (see [`plan`]).
type Chain = Vec<Planned>;

/// Each request's rows with their fate, and the number of HTTP requests made.
type Sent = (Vec<(Vec<i64>, OpFate)>, u64);

/// What happened to one operation (and so to the rows it carries).
#[derive(Debug, Clone)]
enum OpFate {
    Delivered,
    Dead(String),
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Not sent: an earlier request of its chain must be retried first. Given back without an
    /// attempt.
    Held,
    /// Not sent: the claim on the rows was lost (it lapsed and another worker took them).
    /// Left to their new holder.
    Lost,
}

/// Claims one chunk of due rows and delivers it. A step that claimed rows is one `outbox_step`
/// span (its Customer.io requests are children) and is counted in the outbox metrics.
pub async fn deliver_step(
    ctx: &AppContext,
    worker: &str,
    config: &DeliveryConfig,
) -> Result<DeliveryReport, CoreError> {
    let ws = ctx.workspace_id();
    let rows = outbox::claim_due(
        &ctx.db,
        ws,
        worker,
        config.claim_limit,
        config.claim_ttl,
        ctx.now(),
    )
    .await?;
    if rows.is_empty() {
        return Ok(DeliveryReport::default());
    }
    let span = tracing::info_span!(
        "outbox_step",
        claimed = rows.len(),
        delivered = tracing::field::Empty,
        retried = tracing::field::Empty,
        dead = tracing::field::Empty,
        requests = tracing::field::Empty,
    );
    let report =
        tracing::Instrument::instrument(deliver_claimed(ctx, worker, config, rows), span.clone())
            .await?;
    span.record("delivered", report.delivered);
    span.record("retried", report.retried);
    span.record("dead", report.dead);
    span.record("requests", report.requests);
    crate::telemetry::metrics::outbox_step(report.delivered, report.retried, report.dead);
    Ok(report)
}

/// Delivers rows this worker claimed: plans them into chains of requests, sends the chains
/// concurrently (`config.concurrency` at a time, each chain one request at a time), and records
/// each chain's rows' fates as soon as the chain is done.
async fn deliver_claimed(
    ctx: &AppContext,
    worker: &str,
    config: &DeliveryConfig,
    rows: Vec<OutboxRow>,
) -> Result<DeliveryReport, CoreError> {
    let mut report = DeliveryReport {
        claimed: rows.len() as u64,
        ..Default::default()
    };
    let (chains, invalid) = plan(&rows);
    let by_id: HashMap<i64, &OutboxRow> = rows.iter().map(|r| (r.id, r)).collect();
    if !invalid.is_empty() {
        let fates = invalid
            .into_iter()
            .map(|(id, reason)| (vec![id], OpFate::Dead(reason)))
            .collect();
        report.absorb(settle(ctx, worker, config, &by_id, fates).await?);
    }
    let results: Vec<Result<DeliveryReport, CoreError>> = futures::stream::iter(chains)
        .map(|chain| run_chain(ctx, worker, config, &by_id, chain))
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    for result in results {
        report.absorb(result?);
    }
    Ok(report)
}

/// Sends one chain and settles its rows.
async fn run_chain(
    ctx: &AppContext,
    worker: &str,
    config: &DeliveryConfig,
    by_id: &HashMap<i64, &OutboxRow>,
    chain: Chain,
) -> Result<DeliveryReport, CoreError> {
    let mut ids: Vec<i64> = chain.iter().flat_map(Planned::rows).collect();
    ids.sort_unstable();
    ids.dedup();
    let expires = ids
        .iter()
        .filter_map(|id| by_id.get(id).and_then(|r| r.claim_expires_at))
        .min()
        .unwrap_or_else(|| ctx.now());
    let claim = ChainClaim {
        worker,
        ids,
        ttl: config.claim_ttl,
        expires_us: AtomicI64::new(expires.timestamp_micros()),
    };
    let (fates, requests) = send_all(ctx, &claim, by_id, chain).await;
    let mut report = settle(ctx, worker, config, by_id, fates).await?;
    report.requests += requests;
    Ok(report)
}

/// A chain's hold on its rows. Before each request the claim is renewed if less than three
/// quarters of the claim TTL is left, so that a request (with the client's own retries) has
/// most of a TTL before another worker could take its rows; if the rows are no longer all held
/// (the claim lapsed and someone took them), nothing more is sent.
struct ChainClaim<'a> {
    worker: &'a str,
    ids: Vec<i64>,
    ttl: Duration,
    /// When the claim expires, in Unix microseconds.
    expires_us: AtomicI64,
}

impl ChainClaim<'_> {
    async fn hold(&self, ctx: &AppContext) -> bool {
        let now = ctx.now();
        let left_us = self.expires_us.load(Ordering::Relaxed) - now.timestamp_micros();
        let ttl_us = i64::try_from(self.ttl.as_micros()).unwrap_or(i64::MAX);
        if left_us > ttl_us / 4 * 3 {
            return true;
        }
        let until = chrono::Duration::from_std(self.ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(now);
        match outbox::extend_claim(&ctx.db, self.worker, &self.ids, until).await {
            Ok(held) if held == self.ids.len() as u64 => {
                self.expires_us
                    .store(until.timestamp_micros(), Ordering::Relaxed);
                true
            }
            Ok(held) => {
                tracing::warn!(
                    held,
                    claimed = self.ids.len(),
                    "outbox claim lapsed mid-step; the rest is left to the worker that took it"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "could not renew an outbox claim; not sending");
                false
            }
        }
    }
}

/// Sends requests one after the other. After a request with a row to retry, the later ones are
/// [`OpFate::Held`]; after a lost claim, [`OpFate::Lost`].
fn send_all<'a>(
    ctx: &'a AppContext,
    claim: &'a ChainClaim<'a>,
    by_id: &'a HashMap<i64, &'a OutboxRow>,
    requests: Vec<Planned>,
) -> BoxFuture<'a, Sent> {
    Box::pin(async move {
        let mut out = Vec::new();
        let mut made = 0;
        let mut stop: Option<OpFate> = None;
        for request in requests {
            if let Some(fate) = &stop {
                out.push((request.rows(), fate.clone()));
                continue;
            }
            let (fates, n) = send(ctx, claim, by_id, request).await;
            made += n;
            stop = blocking(&fates);
            out.extend(fates);
        }
        (out, made)
    })
}

/// What the fates of one request impose on the requests after it in its chain.
fn blocking(fates: &[(Vec<i64>, OpFate)]) -> Option<OpFate> {
    if fates.iter().any(|(_, f)| matches!(f, OpFate::Lost)) {
        Some(OpFate::Lost)
    } else if fates
        .iter()
        .any(|(_, f)| matches!(f, OpFate::Retry { .. } | OpFate::Held))
    {
        Some(OpFate::Held)
    } else {
        None
    }
}

/// Sends one planned request; returns each operation's rows with their fate, and the number
/// of HTTP requests made (bisection and one-by-one re-sends included).
fn send<'a>(
    ctx: &'a AppContext,
    claim: &'a ChainClaim<'a>,
    by_id: &'a HashMap<i64, &'a OutboxRow>,
    request: Planned,
) -> BoxFuture<'a, Sent> {
    Box::pin(async move {
        if !claim.hold(ctx).await {
            return (vec![(request.rows(), OpFate::Lost)], 0);
        }
        match request {
            Planned::V1Event {
                customer_id,
                event,
                rows,
            } => {
                let fate = match ctx.cio.track_event(&customer_id, &event).await {
                    Ok(()) => OpFate::Delivered,
                    Err(e) => fate_of_error(&e),
                };
                (vec![(rows, fate)], 1)
            }
            Planned::Segment { add, payload, rows } => {
                match crate::managed_segments::deliver_change(ctx, add, &payload).await {
                    Ok(requests) => (vec![(rows, OpFate::Delivered)], requests),
                    Err(crate::managed_segments::DeliverError::Upstream(e)) => {
                        (vec![(rows, fate_of_error(&e))], 1)
                    }
                    Err(crate::managed_segments::DeliverError::Invalid(reason)) => {
                        (vec![(rows, OpFate::Dead(reason))], 0)
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::error::error_chain(&e), "segment membership change not sent; retrying");
                        (vec![(rows, OpFate::Retry { error: "database failure while reading the segment's membership (see the log)".into(), retry_after: None })], 0)
                    }
                }
            }
            Planned::Batch(mut ops) => {
                let payload: Vec<EncodedOp> = ops.iter().map(|o| o.op.clone()).collect();
                match ctx.cio.batch_encoded(&payload).await {
                    Ok(BatchOutcome { failures }) => {
                        let mut fates: Vec<OpFate> = vec![OpFate::Delivered; ops.len()];
                        for failure in failures {
                            if let Some(slot) = fates.get_mut(failure.batch_index) {
                                *slot = OpFate::Dead(describe_failure(
                                    failure.reason.as_deref(),
                                    failure.field.as_deref(),
                                    &failure.message,
                                ));
                            }
                        }
                        let (out, n) =
                            unmerge_rejected(ctx, claim, by_id, ops.into_iter().zip(fates)).await;
                        (out, 1 + n)
                    }
                    Err(CioError::Rejected { status, .. })
                        if !not_the_rows_fault(status) && ops.len() > 1 =>
                    {
                        // The whole request was refused: find the culprit instead of failing
                        // all. Halves in order; the right one waits if the left must be retried.
                        let right = ops.split_off(ops.len() / 2);
                        let (mut fates, left_n) =
                            send(ctx, claim, by_id, Planned::Batch(ops)).await;
                        if let Some(fate) = blocking(&fates) {
                            fates.push((Planned::Batch(right).rows(), fate));
                            return (fates, 1 + left_n);
                        }
                        let (more, right_n) = send(ctx, claim, by_id, Planned::Batch(right)).await;
                        fates.extend(more);
                        (fates, 1 + left_n + right_n)
                    }
                    Err(e) => {
                        let fate = fate_of_error(&e);
                        let fates = vec![fate; ops.len()];
                        let (out, n) =
                            unmerge_rejected(ctx, claim, by_id, ops.into_iter().zip(fates)).await;
                        (out, 1 + n)
                    }
                }
            }
        }
    })
}

/// Keeps each operation's fate, except for an identify coalesced from several rows that
/// Customer.io rejected: the merge must not kill rows that are fine alone, so those rows are
/// sent again one by one (each in its own operation, in order, right away — nothing of their
/// person follows them in this chain, see [`plan`]) and only the ones rejected alone die.
async fn unmerge_rejected(
    ctx: &AppContext,
    claim: &ChainClaim<'_>,
    by_id: &HashMap<i64, &OutboxRow>,
    ops: impl Iterator<Item = (PlannedOp, OpFate)>,
) -> Sent {
    let mut out = Vec::new();
    let mut again: BTreeSet<i64> = BTreeSet::new();
    for (op, fate) in ops {
        if matches!(fate, OpFate::Dead(_)) && op.rows.len() > 1 {
            again.extend(op.rows);
        } else {
            out.push((op.rows, fate));
        }
    }
    if again.is_empty() {
        return (out, 0);
    }
    let rows: Vec<&OutboxRow> = again
        .iter()
        .filter_map(|id| by_id.get(id).copied())
        .collect();
    tracing::info!(
        rows = rows.len(),
        "Customer.io rejected a coalesced identify; sending its rows one by one"
    );
    let (requests, invalid) = one_by_one(&rows);
    out.extend(
        invalid
            .into_iter()
            .map(|(id, reason)| (vec![id], OpFate::Dead(reason))),
    );
    let (fates, n) = send_all(ctx, claim, by_id, requests).await;
    out.extend(fates);
    (out, n)
}

/// Records the fates of one chain's rows. A row carried by several operations (a split
/// identify) takes the worst: lost (left alone), else dead, else retried, else held back
/// (given back without an attempt), else delivered. Retries go first, so that a person's
/// held-back rows are never claimable before the row they wait for is back in the queue.
async fn settle(
    ctx: &AppContext,
    worker: &str,
    config: &DeliveryConfig,
    by_id: &HashMap<i64, &OutboxRow>,
    fates: Vec<(Vec<i64>, OpFate)>,
) -> Result<DeliveryReport, CoreError> {
    let mut per_row: BTreeMap<i64, Vec<OpFate>> = BTreeMap::new();
    for (rows, fate) in fates {
        for row in rows {
            per_row.entry(row).or_default().push(fate.clone());
        }
    }
    let now = ctx.now();
    let mut report = DeliveryReport::default();
    let mut delivered = Vec::new();
    let mut dead = Vec::new();
    let mut held = Vec::new();
    let mut lost = 0;
    let mut retry: HashMap<(String, i64), Vec<i64>> = HashMap::new();
    for (id, row_fates) in per_row {
        let dead_reason = row_fates.iter().find_map(|f| match f {
            OpFate::Dead(r) => Some(r.clone()),
            _ => None,
        });
        let retry_error = row_fates.iter().find_map(|f| match f {
            OpFate::Retry { error, retry_after } => Some((error.clone(), *retry_after)),
            _ => None,
        });
        if row_fates.iter().any(|f| matches!(f, OpFate::Lost)) {
            lost += 1;
        } else if let Some(reason) = dead_reason {
            dead.push((id, reason));
        } else if let Some((error, retry_after)) = retry_error {
            let attempt = by_id.get(&id).map(|r| r.attempts).unwrap_or(0) + 1;
            if attempt >= config.max_attempts {
                dead.push((
                    id,
                    format!("gave up after {attempt} attempts; last error: {error}"),
                ));
            } else {
                let delay = retry_after.unwrap_or_else(|| backoff(config, attempt));
                let at = now
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
                retry
                    .entry((error, at.timestamp_millis()))
                    .or_default()
                    .push(id);
            }
        } else if row_fates.iter().any(|f| matches!(f, OpFate::Held)) {
            held.push(id);
        } else {
            delivered.push(id);
        }
    }
    for ((error, at_ms), ids) in retry {
        let at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_else(|| ctx.now());
        report.retried += outbox::mark_retry(&ctx.db, worker, &ids, &error, at, ctx.now()).await?;
    }
    if !held.is_empty() {
        report.held_back += outbox::release(&ctx.db, worker, &held, ctx.now()).await?;
    }
    if !delivered.is_empty() {
        report.delivered += outbox::mark_delivered(&ctx.db, worker, &delivered, ctx.now()).await?;
        report.delivered_ids = delivered;
    }
    if !dead.is_empty() {
        for (id, reason) in &dead {
            tracing::warn!(outbox_id = id, reason = %reason, "outbox row dead-lettered");
        }
        report.dead += outbox::mark_dead(&ctx.db, worker, &dead, ctx.now()).await?;
    }
    if lost > 0 {
        tracing::warn!(
            rows = lost,
            "outbox rows left to the worker that took them over"
        );
    }
    Ok(report)
}

fn backoff(config: &DeliveryConfig, attempt: i32) -> Duration {
    let factor = 2u32.saturating_pow(u32::try_from(attempt.saturating_sub(1)).unwrap_or(0));
    let ceiling = config
        .retry_base
        .saturating_mul(factor)
        .min(config.retry_max);
    let half = ceiling / 2;
    half + Duration::from_millis(
        rand::rng().random_range(0..=u64::try_from(half.as_millis()).unwrap_or(u64::MAX)),
    )
}

/// What is to be sent for one person (or one segment) at one point of its order.
enum Stage {
    /// v2 operations that may share one batch request, in order.
    Ops(Vec<PlannedOp>),
    /// A request of its own (a v1 event, a segment change).
    Alone(Planned),
}

/// Turns claimed rows into chains of requests, plus rows that cannot be sent at all (dead on
/// arrival).
///
/// Per person (rows with one `customer_id`, claimed as a prefix of the person's queue), in
/// acceptance order:
/// - consecutive attribute updates — not separated by an event of the person — are coalesced
///   into one identify (later value wins per attribute) at the place of the first of them. No
///   write of the person lies between them, so nothing moves across an event: an event always
///   follows every update accepted before it and precedes every update accepted after it;
/// - that identify is split into operations of at most [`MAX_ATTRIBUTES_PER_OP`] attributes
///   and [`MAX_OP_BYTES`] bytes (each attribute once: parts never overlap);
/// - an event is one operation; one too big for a v2 operation becomes a v1 request;
/// - a segment change is one request.
///
/// A person whose operations fit in one batch and who needs no request of its own shares a
/// batch with other people (their operations contiguous, in order; Customer.io applies a
/// batch's operations in order) — one chain per batch. Anyone else gets a chain of their own:
/// their stages in order, a new stage after a v1 event or segment change and after an identify
/// coalesced from several rows when more of the person follows (so that a rejected merge can
/// be re-sent row by row before anything later of the person goes). So a person's writes are
/// never in two requests in flight at once, and a request is only sent once the one before it
/// was answered and needs no retry.
fn plan(rows: &[OutboxRow]) -> (Vec<Chain>, Vec<(i64, String)>) {
    let mut order: Vec<&str> = Vec::new();
    let mut by_person: HashMap<&str, Vec<&OutboxRow>> = HashMap::new();
    for row in rows {
        by_person
            .entry(row.customer_id.as_str())
            .or_insert_with(|| {
                order.push(row.customer_id.as_str());
                Vec::new()
            })
            .push(row);
    }
    let mut invalid = Vec::new();
    let mut chains: Vec<Chain> = Vec::new();
    let mut shared = Packer::default();
    for person in order {
        let rows = by_person.remove(person).unwrap_or_default();
        let mut stages = stages_of(&rows, &mut invalid);
        let shareable = match stages.as_slice() {
            [Stage::Ops(ops)] => batch_len(ops) <= MAX_BATCH_BYTES,
            _ => false,
        };
        if shareable {
            if let Some(Stage::Ops(ops)) = stages.pop() {
                shared.push_group(ops, &mut chains);
            }
            continue;
        }
        let mut chain = Vec::new();
        for stage in stages {
            match stage {
                Stage::Ops(ops) => chain.extend(batches(ops)),
                Stage::Alone(request) => chain.push(request),
            }
        }
        if !chain.is_empty() {
            chains.push(chain);
        }
    }
    shared.finish(&mut chains);
    (chains, invalid)
}

/// One person's rows (in order) as stages (see [`plan`]).
fn stages_of(rows: &[&OutboxRow], invalid: &mut Vec<(i64, String)>) -> Vec<Stage> {
    let mut stages = Vec::new();
    let mut ops: Vec<PlannedOp> = Vec::new();
    let mut run: Option<(Map<String, Value>, Vec<i64>)> = None;
    fn close(ops: &mut Vec<PlannedOp>, stages: &mut Vec<Stage>) {
        if !ops.is_empty() {
            stages.push(Stage::Ops(std::mem::take(ops)));
        }
    }
    let flush = |run: &mut Option<(Map<String, Value>, Vec<i64>)>,
                 ops: &mut Vec<PlannedOp>,
                 stages: &mut Vec<Stage>,
                 invalid: &mut Vec<(i64, String)>,
                 customer_id: &str| {
        let Some((attributes, ids)) = run.take() else {
            return;
        };
        match identify_ops(customer_id, attributes, &ids) {
            Ok(parts) => {
                ops.extend(parts);
                if ids.len() > 1 {
                    close(ops, stages);
                }
            }
            Err(reason) => invalid.extend(ids.into_iter().map(|id| (id, reason.clone()))),
        }
    };
    for row in rows {
        let customer_id = row.customer_id.as_str();
        match row.kind {
            Kind::Identify => {
                let Some(attributes) = row.payload.as_object() else {
                    invalid.push((
                        row.id,
                        "stored update is not an attribute object".to_string(),
                    ));
                    continue;
                };
                match &mut run {
                    Some((merged, ids)) => {
                        merged.extend(attributes.clone());
                        ids.push(row.id);
                    }
                    None => run = Some((attributes.clone(), vec![row.id])),
                }
            }
            Kind::Event => {
                flush(&mut run, &mut ops, &mut stages, invalid, customer_id);
                match event_request(row) {
                    Ok(EventPlan::InBatch(op)) => ops.push(op),
                    Ok(EventPlan::Alone(alone)) => {
                        close(&mut ops, &mut stages);
                        stages.push(Stage::Alone(alone));
                    }
                    Err(reason) => invalid.push((row.id, reason)),
                }
            }
            Kind::SegmentAdd | Kind::SegmentRemove => {
                flush(&mut run, &mut ops, &mut stages, invalid, customer_id);
                close(&mut ops, &mut stages);
                stages.push(Stage::Alone(Planned::Segment {
                    add: row.kind == Kind::SegmentAdd,
                    payload: row.payload.clone(),
                    rows: vec![row.id],
                }));
            }
        }
    }
    if let Some(first) = rows.first() {
        flush(&mut run, &mut ops, &mut stages, invalid, &first.customer_id);
    }
    close(&mut ops, &mut stages);
    stages
}

/// Identify rows sent one by one (each its own operations, in order), packed into batches
/// sent one after the other.
fn one_by_one(rows: &[&OutboxRow]) -> (Vec<Planned>, Vec<(i64, String)>) {
    let mut ops = Vec::new();
    let mut invalid = Vec::new();
    for row in rows {
        let Some(attributes) = row.payload.as_object() else {
            invalid.push((
                row.id,
                "stored update is not an attribute object".to_string(),
            ));
            continue;
        };
        match identify_ops(&row.customer_id, attributes.clone(), &[row.id]) {
            Ok(parts) => ops.extend(parts),
            Err(reason) => invalid.push((row.id, reason)),
        }
    }
    (batches(ops), invalid)
}

/// How an event goes out.
enum EventPlan {
    /// As a v2 operation, in a batch.
    InBatch(PlannedOp),
    /// Through the v1 endpoint, too big for a v2 operation.
    Alone(Planned),
}

/// An event row as a v2 operation or a v1 request, or why it cannot be sent.
fn event_request(row: &OutboxRow) -> Result<EventPlan, String> {
    let name = row
        .payload
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let data = row
        .payload
        .get("data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let timestamp = row.payload.get("timestamp").and_then(Value::as_i64);
    let Some(event_id) = row.event_id.clone() else {
        return Err("stored event has no id".to_string());
    };
    let op = PersonOp::event(
        Identifier::Id(row.customer_id.clone()),
        name.clone(),
        event_id.clone(),
        timestamp,
        data.clone(),
    );
    if op_size(&op) > MAX_OP_BYTES {
        return Ok(EventPlan::Alone(Planned::V1Event {
            customer_id: row.customer_id.clone(),
            event: Event {
                name,
                id: event_id,
                timestamp,
                data,
            },
            rows: vec![row.id],
        }));
    }
    op.encode()
        .map(|op| {
            EventPlan::InBatch(PlannedOp {
                op,
                rows: vec![row.id],
            })
        })
        .map_err(|e| format!("cannot be sent to Customer.io: {e}"))
}

/// One person's (coalesced) attributes as identify operations carrying `rows`.
fn identify_ops(
    customer_id: &str,
    attributes: Map<String, Value>,
    rows: &[i64],
) -> Result<Vec<PlannedOp>, String> {
    split_attributes(customer_id, attributes)
        .into_iter()
        .map(|part| {
            PersonOp::identify(Identifier::Id(customer_id.to_string()), part)
                .encode()
                .map(|op| PlannedOp {
                    op,
                    rows: rows.to_vec(),
                })
                .map_err(|e| format!("cannot be sent to Customer.io: {e}"))
        })
        .collect()
}

/// Bytes of a batch body holding `ops`.
fn batch_len(ops: &[PlannedOp]) -> usize {
    BATCH_ENVELOPE_BYTES
        + ops.iter().map(|o| o.op.len()).sum::<usize>()
        + ops.len().saturating_sub(1)
}

/// `ops` in order, in as few batches under the request limit as they fit.
fn batches(ops: Vec<PlannedOp>) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut current: Vec<PlannedOp> = Vec::new();
    let mut size = BATCH_ENVELOPE_BYTES;
    for op in ops {
        let added = op.op.len() + usize::from(!current.is_empty());
        if !current.is_empty() && size + added > MAX_BATCH_BYTES {
            out.push(Planned::Batch(std::mem::take(&mut current)));
            size = BATCH_ENVELOPE_BYTES;
        }
        size += op.op.len() + usize::from(!current.is_empty());
        current.push(op);
    }
    if !current.is_empty() {
        out.push(Planned::Batch(current));
    }
    out
}

/// Packs groups of operations (one person's each, kept together) into shared batches, each a
/// chain of its own.
#[derive(Default)]
struct Packer {
    current: Vec<PlannedOp>,
    /// `batch_len(&current)` while `current` is not empty.
    size: usize,
}

impl Packer {
    fn push_group(&mut self, ops: Vec<PlannedOp>, chains: &mut Vec<Chain>) {
        // Each operation adds its bytes and a comma (none before the first of a batch).
        let added: usize = ops.iter().map(|o| o.op.len() + 1).sum();
        if !self.current.is_empty() && self.size + added > MAX_BATCH_BYTES {
            chains.push(vec![Planned::Batch(std::mem::take(&mut self.current))]);
        }
        if self.current.is_empty() {
            self.size = BATCH_ENVELOPE_BYTES + added.saturating_sub(1);
        } else {
            self.size += added;
        }
        self.current.extend(ops);
    }

    fn finish(self, chains: &mut Vec<Chain>) {
        if !self.current.is_empty() {
            chains.push(vec![Planned::Batch(self.current)]);
        }
    }
}

fn op_size(op: &PersonOp) -> usize {
    serde_json::to_vec(op)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Splits one person's attributes into identify operations that each hold at most
/// [`MAX_ATTRIBUTES_PER_OP`] attributes and fit in [`MAX_OP_BYTES`] (an attribute value is at
/// most 1000 bytes, so every single attribute fits).
fn split_attributes(customer_id: &str, attributes: Map<String, Value>) -> Vec<Map<String, Value>> {
    let whole = PersonOp::identify(Identifier::Id(customer_id.to_string()), attributes.clone());
    if attributes.len() <= MAX_ATTRIBUTES_PER_OP && op_size(&whole) <= MAX_OP_BYTES {
        return vec![attributes];
    }
    let base = op_size(&PersonOp::identify(
        Identifier::Id(customer_id.to_string()),
        Map::new(),
    ));
    let mut parts = Vec::new();
    let mut part = Map::new();
    let mut size = base;
    for (name, value) in attributes {
        let entry = name.len() + serde_json::to_vec(&value).map(|v| v.len()).unwrap_or(0) + 4;
        if !part.is_empty() && (size + entry > MAX_OP_BYTES || part.len() >= MAX_ATTRIBUTES_PER_OP)
        {
            parts.push(std::mem::take(&mut part));
            size = base;
        }
        size += entry;
        part.insert(name, value);
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

fn describe_failure(reason: Option<&str>, field: Option<&str>, message: &str) -> String {
    let mut text = String::new();
    if let Some(reason) = reason {
        text.push_str(reason);
        text.push_str(": ");
    }
    text.push_str(message);
    if let Some(field) = field {
        text.push_str(&format!(" (field {field})"));
    }
    format!("Customer.io rejected it: {text}")
}

/// A status that says nothing about the rows: a redirect (3xx — a proxy, a moved endpoint, a
/// wrong region) or a request timeout (408, after the client's own retries).
fn not_the_rows_fault(status: u16) -> bool {
    (300..=399).contains(&status) || status == 408
}

fn fate_of_error(error: &CioError) -> OpFate {
    match error {
        CioError::Rejected { status, .. } if not_the_rows_fault(*status) => OpFate::Retry {
            error: error.to_string(),
            retry_after: None,
        },
        CioError::Rejected { .. } | CioError::NotFound { .. } => {
            OpFate::Dead(format!("Customer.io rejected it: {error}"))
        }
        other => OpFate::Retry {
            error: other.to_string(),
            retry_after: other.retry_after(),
        },
    }
}

/// An outbox row as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    pub id: i64,
    /// `identify`, `event`, `segment_add` or `segment_remove`.
    pub kind: &'static str,
    pub customer_id: String,
    pub event_id: Option<String>,
    pub attempts: i32,
    pub error: Option<String>,
    pub created_at: chrono::DateTime<Utc>,
    pub next_attempt_at: chrono::DateTime<Utc>,
}

impl From<OutboxRow> for OutboxItem {
    fn from(row: OutboxRow) -> Self {
        Self {
            id: row.id,
            kind: row.kind.as_str(),
            customer_id: row.customer_id,
            event_id: row.event_id,
            attempts: row.attempts,
            error: row.last_error,
            created_at: row.created_at,
            next_attempt_at: row.next_attempt_at,
        }
    }
}

/// How delivery to Customer.io stands.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncStatus {
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Age of the oldest row not yet delivered nor dead.
    pub oldest_pending_age: Option<Duration>,
    pub last_delivered_at: Option<chrono::DateTime<Utc>>,
    /// Rows waiting for a retry after a failed attempt, latest first.
    pub recent_failures: Vec<OutboxItem>,
    /// Rows given up on, latest first.
    pub dead_letters: Vec<OutboxItem>,
}

/// The outbox's depth, lag, recent failures and dead letters (at most `limit` of each).
pub async fn sync_status(ctx: &AppContext, limit: u64) -> Result<SyncStatus, CoreError> {
    let ws = ctx.workspace_id();
    let stats = outbox::stats(&ctx.db, ws).await?;
    let failures = outbox::recent_failures(&ctx.db, ws, limit).await?;
    let dead = outbox::dead_letters(&ctx.db, ws, limit).await?;
    let now = ctx.now();
    Ok(SyncStatus {
        pending: stats.pending,
        in_flight: stats.in_flight,
        delivered: stats.delivered,
        dead: stats.dead,
        oldest_pending_age: stats
            .oldest_pending_at
            .and_then(|at| (now - at).to_std().ok()),
        last_delivered_at: stats.last_delivered_at,
        recent_failures: failures.into_iter().map(OutboxItem::from).collect(),
        dead_letters: dead.into_iter().map(OutboxItem::from).collect(),
    })
}

/// Re-queues dead letters (all, or those of `ids`, each a positive outbox id) and wakes an
/// in-process worker; answers how many were re-queued.
pub async fn retry_dead_letters(ctx: &AppContext, ids: &[i64]) -> Result<u64, CoreError> {
    if let Some(i) = ids.iter().position(|id| *id <= 0) {
        return Err(CoreError::invalid(
            format!("ids[{i}]"),
            "must be a positive outbox id",
        ));
    }
    let ids = (!ids.is_empty()).then_some(ids);
    let requeued = outbox::requeue_dead(&ctx.db, ctx.workspace_id(), ids, ctx.now()).await?;
    if requeued > 0 {
        ctx.wake_outbox();
    }
    Ok(requeued)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sharpsend_db::outbox::Status;

    use super::*;

    fn row(id: i64, kind: Kind, customer: &str, payload: Value) -> OutboxRow {
        OutboxRow {
            id,
            workspace_id: 1,
            kind,
            customer_id: customer.to_string(),
            event_id: (kind == Kind::Event).then(|| format!("01EVENT{id:019}")),
            payload,
            status: Status::InFlight,
            attempts: 0,
            next_attempt_at: chrono::DateTime::UNIX_EPOCH,
            created_at: chrono::DateTime::UNIX_EPOCH,
            last_error: None,
            idempotency_key: None,
            claimed_by: None,
            claim_expires_at: None,
            last_attempt_at: None,
            delivered_at: None,
        }
    }

    /// The batches of a plan, whatever their chain.
    fn all_batches(chains: &[Chain]) -> Vec<&Vec<PlannedOp>> {
        chains
            .iter()
            .flatten()
            .filter_map(|p| {
                if let Planned::Batch(ops) = p {
                    Some(ops)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Each chain as the rows of its requests, in order.
    fn shape(chains: &[Chain]) -> Vec<Vec<Vec<i64>>> {
        chains
            .iter()
            .map(|c| c.iter().map(Planned::rows).collect())
            .collect()
    }

    fn event(id: i64, customer: &str) -> OutboxRow {
        row(
            id,
            Kind::Event,
            customer,
            json!({"name": "opened", "data": {}, "timestamp": id}),
        )
    }

    #[test]
    fn updates_coalesce_between_a_persons_events_and_each_person_stays_in_order() {
        let rows = vec![
            row(1, Kind::Identify, "a", json!({"plan": "free", "score": 1})),
            row(2, Kind::Identify, "b", json!({"plan": "pro"})),
            row(3, Kind::Identify, "a", json!({"plan": "pro"})),
            event(4, "c"),
        ];
        let (chains, invalid) = plan(&rows);
        assert!(invalid.is_empty());
        // One shared batch: a's coalesced identify, b's, c's event.
        assert_eq!(chains.len(), 1);
        let ops = all_batches(&chains);
        let carried: Vec<Vec<i64>> = ops[0].iter().map(|o| o.rows.clone()).collect();
        assert_eq!(carried, vec![vec![1, 3], vec![2], vec![4]]);
        let merged: Value = serde_json::from_str(ops[0][0].op.as_str()).unwrap_or_default();
        assert_eq!(merged.pointer("/attributes/plan"), Some(&json!("pro")));
        assert_eq!(merged.pointer("/attributes/score"), Some(&json!(1)));

        // Updates are not coalesced across an event of the person: the event sees exactly
        // what was accepted before it. Single-row identifies and events share one batch.
        let rows = vec![
            row(1, Kind::Identify, "a", json!({"plan": "free"})),
            event(2, "a"),
            row(3, Kind::Identify, "a", json!({"plan": "pro"})),
            row(4, Kind::Identify, "b", json!({"plan": "pro"})),
            event(5, "a"),
        ];
        let (chains, _) = plan(&rows);
        assert_eq!(
            shape(&chains),
            vec![vec![vec![1, 2, 3, 4, 5]]],
            "one request, a's writes together"
        );
        let carried: Vec<Vec<i64>> = all_batches(&chains)[0]
            .iter()
            .map(|o| o.rows.clone())
            .collect();
        assert_eq!(carried, vec![vec![1], vec![2], vec![3], vec![5], vec![4]]);
    }

    #[test]
    fn a_coalesced_identify_followed_by_more_of_the_person_ends_a_request() {
        // If Customer.io rejects the merge, its rows are re-sent one by one before the event.
        let rows = vec![
            row(1, Kind::Identify, "a", json!({"plan": "free"})),
            row(2, Kind::Identify, "a", json!({"score": 2})),
            event(3, "a"),
            row(4, Kind::Identify, "b", json!({"plan": "pro"})),
        ];
        let (chains, _) = plan(&rows);
        let mut got = shape(&chains);
        got.sort();
        assert_eq!(got, vec![vec![vec![1, 2], vec![3]], vec![vec![4]]]);
    }

    #[test]
    fn a_persons_v1_event_goes_after_its_earlier_update_in_one_chain() {
        let big = json!({"name": "big", "data": {"blob": "z".repeat(60_000)}});
        let rows = vec![
            row(1, Kind::Identify, "a", json!({"plan": "gold"})),
            row(2, Kind::Event, "a", big),
            row(3, Kind::Identify, "b", json!({"plan": "pro"})),
        ];
        let (chains, _) = plan(&rows);
        let a = chains.iter().find(|c| c.len() == 2).expect("a's chain");
        assert!(matches!(&a[0], Planned::Batch(ops) if ops.len() == 1 && ops[0].rows == vec![1]));
        assert!(matches!(&a[1], Planned::V1Event { rows, .. } if rows == &vec![2]));
        assert_eq!(chains.len(), 2, "b in a batch of its own chain");
    }

    #[test]
    fn coalesced_identifies_are_split_at_300_attributes() {
        let wide = |prefix: &str| {
            Value::Object(
                (0..200)
                    .map(|i| (format!("{prefix}{i}"), json!(i)))
                    .collect(),
            )
        };
        let rows = vec![
            row(1, Kind::Identify, "p", wide("a")),
            row(2, Kind::Identify, "p", wide("b")),
        ];
        let (chains, _) = plan(&rows);
        let parts: Vec<&PlannedOp> = all_batches(&chains).into_iter().flatten().collect();
        assert!(parts.len() >= 2);
        let mut seen = 0;
        for part in parts {
            let op: Value = serde_json::from_str(part.op.as_str()).unwrap_or_default();
            let n = op["attributes"].as_object().map_or(0, |a| a.len());
            assert!(n <= MAX_ATTRIBUTES_PER_OP, "{n} attributes in one identify");
            assert_eq!(part.rows, vec![1, 2]);
            seen += n;
        }
        assert_eq!(seen, 400);
    }

    #[test]
    fn batches_respect_the_request_limit_and_oversized_ops_are_split_or_sent_alone() {
        // 3000 people with ~300-byte updates: several batches, each under the limit.
        let rows: Vec<OutboxRow> = (0..3000)
            .map(|i| {
                row(
                    i,
                    Kind::Identify,
                    &format!("p{i}"),
                    json!({"bio": "x".repeat(300)}),
                )
            })
            .collect();
        let (chains, _) = plan(&rows);
        let ops = all_batches(&chains);
        assert!(ops.len() >= 2, "{} batches", ops.len());
        for batch in &ops {
            let payload: Vec<EncodedOp> = batch.iter().map(|o| o.op.clone()).collect();
            let body = cio_client::batch_body_len(&payload);
            assert!(body <= MAX_BATCH_BYTES, "{body} bytes");
            assert_eq!(body, batch_len(batch));
        }
        assert_eq!(ops.iter().map(|b| b.len()).sum::<usize>(), 3000);

        // One person, 100 attributes of 900 bytes: split into ops under 32 KB carrying the row.
        let big: Map<String, Value> = (0..100)
            .map(|i| (format!("a{i}"), json!("y".repeat(900))))
            .collect();
        let (chains, _) = plan(&[row(1, Kind::Identify, "p", Value::Object(big))]);
        let parts: Vec<&PlannedOp> = all_batches(&chains).into_iter().flatten().collect();
        assert!(parts.len() >= 3);
        assert!(
            parts
                .iter()
                .all(|p| p.op.len() <= MAX_OP_BYTES && p.rows == vec![1])
        );

        // An event with 60 KB of data goes through the v1 endpoint.
        let (chains, _) = plan(&[row(
            9,
            Kind::Event,
            "p",
            json!({"name": "big", "data": {"blob": "z".repeat(60_000)}}),
        )]);
        assert!(
            matches!(chains.as_slice(), [c] if matches!(c.as_slice(), [Planned::V1Event { rows, .. }] if rows == &vec![9]))
        );
    }

    #[test]
    fn a_segments_membership_changes_go_alone_one_after_the_other() {
        let rows = vec![
            row(1, Kind::Identify, "a", json!({"plan": "pro"})),
            row(
                2,
                Kind::SegmentAdd,
                "segment:7",
                json!({"segment_id": 7, "ids": ["a", "b"]}),
            ),
            row(
                3,
                Kind::SegmentRemove,
                "segment:7",
                json!({"segment_id": 7, "ids": ["c"]}),
            ),
        ];
        let (chains, invalid) = plan(&rows);
        assert!(invalid.is_empty());
        let mut got = shape(&chains);
        got.sort();
        assert_eq!(got, vec![vec![vec![1]], vec![vec![2], vec![3]]]);
        let segment = chains.iter().find(|c| c.len() == 2).expect("segment chain");
        assert!(matches!(
            segment.as_slice(),
            [
                Planned::Segment { add: true, .. },
                Planned::Segment { add: false, .. }
            ]
        ));
    }

    #[test]
    fn redirects_and_request_timeouts_are_retried_not_dead_lettered() {
        let rejected = |status| CioError::Rejected {
            api: cio_client::Api::Track,
            status,
            details: Vec::new(),
        };
        for status in [301, 302, 307, 408] {
            assert!(
                matches!(fate_of_error(&rejected(status)), OpFate::Retry { .. }),
                "{status}"
            );
        }
        for status in [400, 413, 422] {
            assert!(
                matches!(fate_of_error(&rejected(status)), OpFate::Dead(_)),
                "{status}"
            );
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = DeliveryConfig {
            retry_base: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            ..Default::default()
        };
        assert!(
            backoff(&config, 1) <= Duration::from_secs(2)
                && backoff(&config, 1) >= Duration::from_secs(1)
        );
        assert!(backoff(&config, 3) >= Duration::from_secs(4));
        assert!(backoff(&config, 30) <= Duration::from_secs(60));
    }

    /// What one of a person's requests does, in plan order: an identify's attributes, or an
    /// event, with the rows it carries.
    #[derive(Debug, Clone)]
    enum Effect {
        Identify(Map<String, Value>, Vec<i64>),
        Event(i64),
    }

    /// Each person's effects in the order Customer.io would apply them (chains in plan order,
    /// requests in chain order, operations in batch order), and the chains each person is in.
    fn effects(chains: &[Chain]) -> HashMap<String, (Vec<Effect>, Vec<usize>)> {
        let mut out: HashMap<String, (Vec<Effect>, Vec<usize>)> = HashMap::new();
        for (c, chain) in chains.iter().enumerate() {
            for request in chain {
                let mut push = |person: String, effect: Effect| {
                    let entry = out.entry(person).or_default();
                    entry.0.push(effect);
                    if entry.1.last() != Some(&c) {
                        entry.1.push(c);
                    }
                };
                match request {
                    Planned::Batch(ops) => {
                        assert!(batch_len(ops) <= MAX_BATCH_BYTES, "batch over 500 KB");
                        for op in ops {
                            assert!(op.op.len() <= MAX_OP_BYTES, "operation over 32 KB");
                            let v: Value = serde_json::from_str(op.op.as_str()).unwrap_or_default();
                            let person = v
                                .pointer("/identifiers/id")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string();
                            match v.get("action").and_then(Value::as_str) {
                                Some("identify") => {
                                    let attributes = v
                                        .get("attributes")
                                        .and_then(Value::as_object)
                                        .cloned()
                                        .unwrap_or_default();
                                    assert!(attributes.len() <= MAX_ATTRIBUTES_PER_OP);
                                    push(person, Effect::Identify(attributes, op.rows.clone()));
                                }
                                _ => push(person, Effect::Event(op.rows[0])),
                            }
                        }
                    }
                    Planned::V1Event {
                        customer_id, rows, ..
                    } => push(customer_id.clone(), Effect::Event(rows[0])),
                    Planned::Segment { .. } => {}
                }
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever is claimed, the plan loses nothing, respects every size limit, keeps each
        /// person in one chain, applies later values over earlier ones, and never moves an
        /// update across an event of the same person.
        #[test]
        fn plans_keep_limits_order_and_later_wins(
            writes in proptest::collection::vec(
                (0usize..4, proptest::option::of(
                    proptest::collection::btree_map(0usize..400, (0usize..60, 0usize..1000), 1..160)
                ), 0usize..40_000),
                1..60,
            )
        ) {
            let people = ["ann", "bob", "cy", "dee"];
            let mut rows = Vec::new();
            for (i, (who, update, event_bytes)) in writes.iter().enumerate() {
                let id = i64::try_from(i).unwrap_or(0) + 1;
                rows.push(match update {
                    Some(attributes) => {
                        let attributes: Map<String, Value> = attributes
                            .iter()
                            .map(|(name, (value, len))| {
                                (format!("attr_{name}"), json!(format!("{value}{}", "v".repeat(*len))))
                            })
                            .collect();
                        row(id, Kind::Identify, people[*who], Value::Object(attributes))
                    }
                    None => row(
                        id,
                        Kind::Event,
                        people[*who],
                        json!({"name": "opened", "data": {"blob": "x".repeat(*event_bytes)}, "timestamp": id}),
                    ),
                });
            }
            let (chains, invalid) = plan(&rows);
            proptest::prop_assert!(invalid.is_empty(), "{invalid:?}");

            // Every row is carried.
            let mut carried: Vec<i64> = chains.iter().flatten().flat_map(Planned::rows).collect();
            carried.sort_unstable();
            carried.dedup();
            proptest::prop_assert_eq!(carried, rows.iter().map(|r| r.id).collect::<Vec<_>>());

            for (person, (effects, in_chains)) in effects(&chains) {
                proptest::prop_assert_eq!(in_chains.len(), 1, "{} is in several chains", person);
                // Applying the plan gives what applying the rows one by one gives.
                let mut expected = Map::new();
                let mut applied = Map::new();
                let mut events_expected = Vec::new();
                let mut events_applied = Vec::new();
                for r in rows.iter().filter(|r| r.customer_id == person) {
                    match r.kind {
                        Kind::Identify => expected.extend(r.payload.as_object().cloned().unwrap_or_default()),
                        _ => events_expected.push((r.id, expected.clone())),
                    }
                }
                let mut newest_update = 0;
                for effect in &effects {
                    match effect {
                        Effect::Identify(attributes, ids) => {
                            applied.extend(attributes.clone());
                            newest_update = newest_update.max(*ids.iter().max().unwrap_or(&0));
                        }
                        Effect::Event(id) => {
                            // An event sees exactly the updates accepted before it.
                            proptest::prop_assert!(newest_update < *id, "an update accepted after event {} went before it", id);
                            events_applied.push((*id, applied.clone()));
                        }
                    }
                }
                proptest::prop_assert_eq!(&applied, &expected, "{}: later values must win", person);
                proptest::prop_assert_eq!(events_applied, events_expected, "{}: events out of order", person);
            }
        }
    }
}
