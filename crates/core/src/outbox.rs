//! Outbox delivery: claims due writes, turns them into as few Customer.io requests as the limits
//! allow, sends them, and records each row's fate.
//!
//! - Rows are claimed with `sharpsend_db::outbox::claim_due` (safe with many workers and
//!   replicas; a crashed worker's claim lapses and the rows are claimed again).
//! - Attribute updates to the same person claimed together are coalesced into one identify
//!   (later value wins per attribute, in acceptance order), placed where that person's first
//!   update stood; events are never coalesced or dropped, each carries its ULID so Customer.io
//!   drops a repeat.
//! - Operations are packed into Track API v2 `/api/v2/batch` requests of at most 500 KB, each
//!   operation at most 32 KB: a larger identify is split by attributes; a larger event (its data
//!   may reach 100,000 bytes) goes alone through the v1 event endpoint.
//! - A 207's `batch_index` errors dead-letter exactly their rows with Customer.io's reason; a
//!   whole-request 4xx is bisected to find the bad operation instead of failing its neighbours;
//!   429/5xx/timeouts retry the rows later with backoff (or Retry-After); after
//!   `max_attempts` a row is dead-lettered. Nothing is retried forever and nothing is dropped.
//! - Managed segment membership changes (`segment_add` / `segment_remove` rows, at most 1000 ids
//!   each) go one call each to `add_customers` / `remove_customers` through
//!   `managed_segments::deliver_change`, with the same retry / dead-letter rules.

use std::{collections::HashMap, time::Duration};

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
    /// HTTP requests sent to Customer.io (bisection and v1 fallbacks included).
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

/// Delivers until `shutdown`: drains, then sleeps until woken by an in-process write or the poll
/// interval passes. Errors are logged and retried after a pause.
pub async fn run_worker(
    ctx: AppContext,
    worker: String,
    config: DeliveryConfig,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    tracing::info!(worker = %worker, "outbox worker started");
    loop {
        let woken = ctx.outbox_wakeup.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let pause = match drain(&ctx, &worker, &config).await {
            Ok(report) => {
                if report.claimed > 0 {
                    tracing::info!(
                        claimed = report.claimed,
                        delivered = report.delivered,
                        retried = report.retried,
                        dead = report.dead,
                        requests = report.requests,
                        "outbox delivered"
                    );
                }
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
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut woken => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    tracing::info!(worker = %worker, "outbox worker stopped");
}

/// One encoded operation and the outbox rows it carries.
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

/// What one request did: each operation's rows with their fate, and the HTTP requests made.
type Sent = (Vec<(Vec<i64>, OpFate)>, u64);

/// What happened to one operation.
#[derive(Debug, Clone)]
enum OpFate {
    Delivered,
    Dead(String),
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
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

/// Delivers rows this worker claimed and records each row's fate.
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
    let (requests, invalid) = plan(&rows);

    // Send, collecting each row's fates (a row may ride in several ops when split).
    let mut fates: HashMap<i64, Vec<OpFate>> = HashMap::new();
    for (row, reason) in invalid {
        fates.entry(row).or_default().push(OpFate::Dead(reason));
    }
    let results: Vec<Sent> = futures::stream::iter(requests)
        .map(|request| send(ctx, request))
        .buffer_unordered(config.concurrency.max(1))
        .collect()
        .await;
    for (outcomes, requests) in results {
        report.requests += requests;
        for (rows, fate) in outcomes {
            for row in rows {
                fates.entry(row).or_default().push(fate.clone());
            }
        }
    }

    // Fold: dead if any op died, else retry if any must be retried, else delivered.
    let attempts: HashMap<i64, i32> = rows.iter().map(|r| (r.id, r.attempts)).collect();
    let mut delivered = Vec::new();
    let mut dead = Vec::new();
    let mut retry: HashMap<(String, i64), Vec<i64>> = HashMap::new();
    let now = ctx.now();
    for row in &rows {
        let row_fates = fates.remove(&row.id).unwrap_or_default();
        if let Some(reason) = row_fates.iter().find_map(|f| {
            if let OpFate::Dead(r) = f {
                Some(r.clone())
            } else {
                None
            }
        }) {
            dead.push((row.id, reason));
        } else if let Some((error, retry_after)) = row_fates.iter().find_map(|f| match f {
            OpFate::Retry { error, retry_after } => Some((error.clone(), *retry_after)),
            _ => None,
        }) {
            let attempt = attempts.get(&row.id).copied().unwrap_or(0) + 1;
            if attempt >= config.max_attempts {
                dead.push((
                    row.id,
                    format!("gave up after {attempt} attempts; last error: {error}"),
                ));
            } else {
                let delay = retry_after.unwrap_or_else(|| backoff(config, attempt));
                let at = now
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
                retry
                    .entry((error, at.timestamp_millis()))
                    .or_default()
                    .push(row.id);
            }
        } else if row_fates.is_empty() {
            // Not planned (cannot happen) — keep it safe: retry rather than lose it.
            retry
                .entry(("not sent".into(), now.timestamp_millis()))
                .or_default()
                .push(row.id);
        } else {
            delivered.push(row.id);
        }
    }
    if !delivered.is_empty() {
        report.delivered = outbox::mark_delivered(&ctx.db, worker, &delivered, ctx.now()).await?;
        report.delivered_ids = delivered;
    }
    if !dead.is_empty() {
        for (id, reason) in &dead {
            tracing::warn!(outbox_id = id, reason = %reason, "outbox row dead-lettered");
        }
        report.dead = outbox::mark_dead(&ctx.db, worker, &dead, ctx.now()).await?;
    }
    for ((error, at_ms), ids) in retry {
        let at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_else(|| ctx.now());
        report.retried += outbox::mark_retry(&ctx.db, worker, &ids, &error, at, ctx.now()).await?;
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

/// Turns claimed rows into requests, plus rows that cannot be sent at all (dead on arrival).
fn plan(rows: &[OutboxRow]) -> (Vec<Planned>, Vec<(i64, String)>) {
    enum Item {
        Identify {
            customer_id: String,
            attributes: Map<String, Value>,
            rows: Vec<i64>,
        },
        Event(usize),
        Segment(usize),
    }
    let mut items: Vec<Item> = Vec::new();
    let mut identify_at: HashMap<&str, usize> = HashMap::new();
    let mut invalid = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match row.kind {
            Kind::Identify => {
                let Some(attributes) = row.payload.as_object() else {
                    invalid.push((
                        row.id,
                        "stored update is not an attribute object".to_string(),
                    ));
                    continue;
                };
                match identify_at.get(row.customer_id.as_str()) {
                    Some(&at) => {
                        if let Item::Identify {
                            attributes: merged,
                            rows,
                            ..
                        } = &mut items[at]
                        {
                            merged.extend(attributes.clone());
                            rows.push(row.id);
                        }
                    }
                    None => {
                        identify_at.insert(&row.customer_id, items.len());
                        items.push(Item::Identify {
                            customer_id: row.customer_id.clone(),
                            attributes: attributes.clone(),
                            rows: vec![row.id],
                        });
                    }
                }
            }
            Kind::Event => items.push(Item::Event(i)),
            Kind::SegmentAdd | Kind::SegmentRemove => items.push(Item::Segment(i)),
        }
    }

    let mut ops: Vec<PlannedOp> = Vec::new();
    let mut singles: Vec<Planned> = Vec::new();
    for item in items {
        match item {
            Item::Identify {
                customer_id,
                attributes,
                rows,
            } => {
                for part in split_attributes(&customer_id, attributes) {
                    match PersonOp::identify(Identifier::Id(customer_id.clone()), part).encode() {
                        Ok(op) => ops.push(PlannedOp {
                            op,
                            rows: rows.clone(),
                        }),
                        Err(e) => invalid.extend(
                            rows.iter()
                                .map(|&r| (r, format!("cannot be sent to Customer.io: {e}"))),
                        ),
                    }
                }
            }
            Item::Segment(i) => {
                let row = &rows[i];
                singles.push(Planned::Segment {
                    add: row.kind == Kind::SegmentAdd,
                    payload: row.payload.clone(),
                    rows: vec![row.id],
                });
            }
            Item::Event(i) => {
                let row = &rows[i];
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
                    invalid.push((row.id, "stored event has no id".to_string()));
                    continue;
                };
                let op = PersonOp::event(
                    Identifier::Id(row.customer_id.clone()),
                    name.clone(),
                    event_id.clone(),
                    timestamp,
                    data.clone(),
                );
                if op_size(&op) > MAX_OP_BYTES {
                    singles.push(Planned::V1Event {
                        customer_id: row.customer_id.clone(),
                        event: Event {
                            name,
                            id: event_id,
                            timestamp,
                            data,
                        },
                        rows: vec![row.id],
                    });
                    continue;
                }
                match op.encode() {
                    Ok(op) => ops.push(PlannedOp {
                        op,
                        rows: vec![row.id],
                    }),
                    Err(e) => invalid.push((row.id, format!("cannot be sent to Customer.io: {e}"))),
                }
            }
        }
    }

    // Pack in order into batches under the request limit.
    let mut requests = Vec::new();
    let mut current: Vec<PlannedOp> = Vec::new();
    let mut current_size = BATCH_ENVELOPE_BYTES;
    for op in ops {
        let added = op.op.len() + usize::from(!current.is_empty());
        if !current.is_empty() && current_size + added > MAX_BATCH_BYTES {
            requests.push(Planned::Batch(std::mem::take(&mut current)));
            current_size = BATCH_ENVELOPE_BYTES;
        }
        current_size += op.op.len() + usize::from(!current.is_empty());
        current.push(op);
    }
    if !current.is_empty() {
        requests.push(Planned::Batch(current));
    }
    requests.extend(singles);
    (requests, invalid)
}

fn op_size(op: &PersonOp) -> usize {
    serde_json::to_vec(op)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Splits one person's attributes into identify operations that each fit in [`MAX_OP_BYTES`]
/// (an attribute value is at most 1000 bytes, so every single attribute fits).
fn split_attributes(customer_id: &str, attributes: Map<String, Value>) -> Vec<Map<String, Value>> {
    let whole = PersonOp::identify(Identifier::Id(customer_id.to_string()), attributes.clone());
    if op_size(&whole) <= MAX_OP_BYTES {
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
        if !part.is_empty() && size + entry > MAX_OP_BYTES {
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

/// Sends one planned request; returns each op's rows with their fate, and the number of HTTP
/// requests made.
fn send<'a>(ctx: &'a AppContext, request: Planned) -> BoxFuture<'a, Sent> {
    Box::pin(async move {
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
            Planned::Batch(ops) => {
                let payload: Vec<EncodedOp> = ops.iter().map(|o| o.op.clone()).collect();
                match ctx.cio.batch_encoded(&payload).await {
                    Ok(BatchOutcome { failures }) => {
                        let mut fates: Vec<(Vec<i64>, OpFate)> = ops
                            .into_iter()
                            .map(|o| (o.rows, OpFate::Delivered))
                            .collect();
                        for failure in failures {
                            if let Some(slot) = fates.get_mut(failure.batch_index) {
                                slot.1 = OpFate::Dead(describe_failure(
                                    failure.reason.as_deref(),
                                    failure.field.as_deref(),
                                    &failure.message,
                                ));
                            }
                        }
                        (fates, 1)
                    }
                    Err(CioError::Rejected { .. }) if ops.len() > 1 => {
                        // The whole request was refused: find the culprit instead of failing all.
                        let right = ops[ops.len() / 2..].to_vec();
                        let left = ops[..ops.len() / 2].to_vec();
                        let (mut a, ra) = send(ctx, Planned::Batch(left)).await;
                        let (b, rb) = send(ctx, Planned::Batch(right)).await;
                        a.extend(b);
                        (a, 1 + ra + rb)
                    }
                    Err(e) => {
                        let fate = fate_of_error(&e);
                        (ops.into_iter().map(|o| (o.rows, fate.clone())).collect(), 1)
                    }
                }
            }
        }
    })
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

fn fate_of_error(error: &CioError) -> OpFate {
    match error {
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

    fn batches(planned: &[Planned]) -> Vec<&Vec<PlannedOp>> {
        planned
            .iter()
            .filter_map(|p| {
                if let Planned::Batch(ops) = p {
                    Some(ops)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn updates_to_one_person_coalesce_later_wins_events_stay_in_order() {
        let rows = vec![
            row(1, Kind::Identify, "a", json!({"plan": "free", "score": 1})),
            row(
                2,
                Kind::Event,
                "a",
                json!({"name": "opened", "data": {}, "timestamp": 1}),
            ),
            row(3, Kind::Identify, "b", json!({"plan": "pro"})),
            row(4, Kind::Identify, "a", json!({"plan": "pro"})),
            row(
                5,
                Kind::Event,
                "a",
                json!({"name": "opened", "data": {}, "timestamp": 2}),
            ),
        ];
        let (planned, invalid) = plan(&rows);
        assert!(invalid.is_empty());
        let ops = batches(&planned);
        assert_eq!(ops.len(), 1);
        let carried: Vec<Vec<i64>> = ops[0].iter().map(|o| o.rows.clone()).collect();
        assert_eq!(carried, vec![vec![1, 4], vec![2], vec![3], vec![5]]);
        let merged: Value = serde_json::from_str(ops[0][0].op.as_str()).unwrap_or_default();
        assert_eq!(merged.pointer("/attributes/plan"), Some(&json!("pro")));
        assert_eq!(merged.pointer("/attributes/score"), Some(&json!(1)));
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
        let (planned, _) = plan(&rows);
        let ops = batches(&planned);
        assert!(ops.len() >= 2, "{} batches", ops.len());
        for batch in &ops {
            let payload: Vec<EncodedOp> = batch.iter().map(|o| o.op.clone()).collect();
            let body = cio_client::batch_body_len(&payload);
            assert!(body <= MAX_BATCH_BYTES, "{body} bytes");
        }
        assert_eq!(ops.iter().map(|b| b.len()).sum::<usize>(), 3000);

        // One person, 100 attributes of 900 bytes: split into ops under 32 KB carrying the row.
        let big: Map<String, Value> = (0..100)
            .map(|i| (format!("a{i}"), json!("y".repeat(900))))
            .collect();
        let (planned, _) = plan(&[row(1, Kind::Identify, "p", Value::Object(big))]);
        let ops = batches(&planned);
        let parts: Vec<&PlannedOp> = ops.iter().flat_map(|b| b.iter()).collect();
        assert!(parts.len() >= 3);
        assert!(
            parts
                .iter()
                .all(|p| p.op.len() <= MAX_OP_BYTES && p.rows == vec![1])
        );

        // An event with 60 KB of data goes through the v1 endpoint.
        let (planned, _) = plan(&[row(
            9,
            Kind::Event,
            "p",
            json!({"name": "big", "data": {"blob": "z".repeat(60_000)}}),
        )]);
        assert!(matches!(planned.as_slice(), [Planned::V1Event { rows, .. }] if rows == &vec![9]));
    }

    #[test]
    fn segment_membership_rows_go_alone_never_into_a_batch() {
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
        let (planned, invalid) = plan(&rows);
        assert!(invalid.is_empty());
        let batched: Vec<i64> = batches(&planned)
            .iter()
            .flat_map(|b| b.iter().flat_map(|o| o.rows.clone()))
            .collect();
        assert_eq!(batched, vec![1]);
        let segments: Vec<(bool, Vec<i64>)> = planned
            .iter()
            .filter_map(|p| {
                if let Planned::Segment { add, rows, .. } = p {
                    Some((*add, rows.clone()))
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(segments, vec![(true, vec![2]), (false, vec![3])]);
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
}
