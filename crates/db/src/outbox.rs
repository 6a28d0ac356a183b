//! The outbox: writes for Customer.io accepted by SharpSend, durable before they are answered,
//! delivered later by outbox workers (several at once, in several replicas).
//!
//! - Accepting: [`accept_attribute_updates`] (merged into the profiles mirror and queued in one
//!   transaction) and [`accept_events`] (queued once per idempotency key).
//! - Delivering: a worker [`claim_due`]s rows (`pending` → `in_flight`, for a limited time),
//!   sends them, and settles them with [`mark_delivered`], [`mark_retry`], [`mark_dead`] or
//!   [`release`] (given back unsent); [`extend_claim`] renews a claim before a request. Those
//!   only touch rows the worker still holds. A worker that dies leaves its rows `in_flight`;
//!   once the claim expires another worker claims them again. [`next_due_at`] tells an idle
//!   worker how long it may sleep.
//! - Order: rows are claimed per person (per `customer_id`; `segment:<id>` for a managed
//!   segment's membership changes) as a prefix of the person's undelivered rows, and nothing of
//!   a person is claimed while any of its rows is in flight under a live claim or an earlier one
//!   waits for a retry; see [`claim_due`]. On PostgreSQL the transitions that decide what may be
//!   claimed (claims, retries, releases, renewals, re-queues) take their workspace's advisory
//!   lock ([`lock_transitions`]), so a claim never reads one of them half done, and a claim in
//!   one workspace never waits for another workspace's.
//! - Operating: [`stats`], [`dead_letters`], [`recent_failures`], [`requeue_dead`] (re-queues
//!   only attributes no later update of the person sets), [`purge_delivered`], [`get_many`].
//!
//! Row lifecycle: `pending` → `in_flight` → `delivered` | `pending` (retry, `attempts + 1`,
//! later `next_attempt_at`; or released, attempts unchanged, due at once) | `dead`
//! (`attempts + 1`); `dead` → `pending` by [`requeue_dead`] (or `delivered`, unsent, when every
//! attribute it sets was set again later). All times come from the caller (`now`), truncated to
//! microseconds.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, QueryTrait, Statement, TransactionSession,
    TransactionTrait,
};
use serde_json::{Map, Value};

use crate::DbError;
use crate::criteria_sql::SqlBuilder;
use crate::database::{begin_write, query_one_planned_once};
use crate::entities::outbox::{ActiveModel, Column, Entity, Model};
use crate::profiles;
use crate::sql::{id_in, text_in};
use crate::time::{add_span, db_time};

/// Rows per multi-row insert (10 values each): well under both backends' bind-parameter limits
/// (SQLite: 32,766). Lists of ids are bound as one JSON array ([`crate::sql`]).
const CHUNK: usize = 500;
/// `(id, reason)` pairs per [`mark_dead`] statement (three values each); also `(id, payload)`
/// pairs per payload rewrite in [`requeue_dead`].
const DEAD_CHUNK: usize = 300;
/// Rows per page when [`requeue_dead`] reads the later updates of the people it re-queues.
const LATER_PAGE: u64 = 5000;

stored_enum! {
    /// What an outbox row asks Customer.io to do.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Kind {
        /// Set (or remove) attributes of a person.
        Identify = "identify",
        /// Record an event for a person.
        Event = "event",
        /// Add people to a SharpSend-managed (manual) segment: payload `{"segment_id", "ids"}`
        /// (at most 1000 ids); `customer_id` is `segment:<segment id>`.
        SegmentAdd = "segment_add",
        /// Remove people from a SharpSend-managed segment (payload as [`Kind::SegmentAdd`]).
        SegmentRemove = "segment_remove",
    }
}

stored_enum! {
    /// Where an outbox row is in its life.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Status {
        /// Waiting to be claimed (from `next_attempt_at` on).
        Pending = "pending",
        /// Claimed by a worker (`claimed_by`) until `claim_expires_at`.
        InFlight = "in_flight",
        /// Accepted by Customer.io (`delivered_at`).
        Delivered = "delivered",
        /// Given up on (`last_error` says why); [`requeue_dead`] brings it back.
        Dead = "dead",
    }
}

/// An attribute update for one person: each attribute is set, a `null` value removes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAttributeUpdate {
    pub customer_id: String,
    pub attributes: Map<String, Value>,
}

/// An event for one person.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub customer_id: String,
    /// ULID made by the caller; unique within the workspace (Customer.io deduplicates on it).
    pub event_id: String,
    pub name: String,
    pub data: Value,
    /// Unix seconds; `None` means "when accepted".
    pub timestamp: Option<i64>,
    /// At most one event per key and workspace is ever queued.
    pub idempotency_key: Option<String>,
}

/// What [`accept_events`] did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedEvent {
    /// The event's id: the caller's, or for a duplicate that of the event first accepted with
    /// the same idempotency key.
    pub event_id: String,
    /// The idempotency key had already been accepted (earlier, or earlier in the same call);
    /// nothing was queued for this event.
    pub duplicate: bool,
}

/// An outbox row, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// Acceptance order.
    pub id: i64,
    pub workspace_id: i64,
    pub kind: Kind,
    pub customer_id: String,
    /// `identify`: the attribute map as accepted (nulls included); `event`:
    /// `{"name", "data", "timestamp"}`.
    pub payload: Value,
    pub event_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub status: Status,
    /// Delivery attempts finished (delivered, failed, or given up).
    pub attempts: i32,
    /// When the row may be claimed: for a `pending` row when it is due, for an `in_flight` one
    /// when its claim expires (= `claim_expires_at`).
    pub next_attempt_at: DateTime<Utc>,
    /// The worker holding an `in_flight` row; the one that settled a `delivered` or `dead` one.
    pub claimed_by: Option<String>,
    pub claim_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// When the last attempt finished.
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl TryFrom<Model> for OutboxRow {
    type Error = DbErr;

    fn try_from(m: Model) -> Result<Self, DbErr> {
        let kind = m.kind.parse().map_err(DbErr::from)?;
        let status = m.status.parse().map_err(DbErr::from)?;
        Ok(Self {
            id: m.id,
            workspace_id: m.workspace_id,
            kind,
            customer_id: m.customer_id,
            payload: m.payload,
            event_id: m.event_id,
            idempotency_key: m.idempotency_key,
            status,
            attempts: m.attempts,
            next_attempt_at: m.next_attempt_at,
            claimed_by: m.claimed_by,
            claim_expires_at: m.claim_expires_at,
            last_error: m.last_error,
            last_attempt_at: m.last_attempt_at,
            created_at: m.created_at,
            delivered_at: m.delivered_at,
        })
    }
}

/// Counts and times of a workspace's outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub pending: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Acceptance time of the oldest row not yet delivered nor dead (`pending` or
    /// `in_flight`): how far delivery lags behind.
    pub oldest_pending_at: Option<DateTime<Utc>>,
    /// Latest `delivered_at` (among rows not yet purged).
    pub last_delivered_at: Option<DateTime<Utc>>,
}

/// Accepts attribute updates, in ONE transaction: merges each into the person's profile
/// (created if missing; later updates win; a `null` value removes the attribute; see
/// [`profiles`]) and queues one `identify` row per update, in order, due at `now`. All or
/// nothing: on error nothing is written. Returns how many rows were queued.
///
/// A handful of statements whatever the size. PostgreSQL: one (see
/// [`pg_accept_attribute_updates`]: the merge happens in the database under the row lock, and
/// the rows are queued by the same statement), binding its rows as JSON so the statement text is
/// the same for any size (prepared once, no planning of thousands of parameters). SQLite: per
/// 500 people a locking upsert and a write-back, per 500 updates one multi-row insert.
pub async fn accept_attribute_updates(
    db: &impl TransactionTrait,
    workspace_id: i64,
    updates: &[NewAttributeUpdate],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if updates.is_empty() {
        return Ok(0);
    }
    let now = db_time(now);
    let pairs: Vec<(&str, &Map<String, Value>)> = updates
        .iter()
        .map(|u| (u.customer_id.as_str(), &u.attributes))
        .collect();
    let txn = begin_write(db).await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        let queued = pg_accept_attribute_updates(&txn, workspace_id, updates, &pairs, now).await?;
        txn.commit().await?;
        tracing::debug!(workspace_id, queued, "attribute updates accepted");
        return Ok(queued);
    }
    let rows: Vec<ActiveModel> = updates
        .iter()
        .map(|u| {
            new_row(
                workspace_id,
                Kind::Identify,
                &u.customer_id,
                Value::Object(u.attributes.clone()),
                None,
                None,
                now,
            )
        })
        .collect();
    profiles::merge_attributes(&txn, workspace_id, &pairs, now).await?;
    let mut queued = 0;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<ActiveModel> = rows.by_ref().take(CHUNK).collect();
        let stmt = Entity::insert_many(chunk).into_query();
        queued += txn.execute(&stmt).await?.rows_affected();
    }
    txn.commit().await?;
    tracing::debug!(workspace_id, queued, "attribute updates accepted");
    Ok(queued)
}

/// One outbox row of [`pg_accept_attribute_updates`]'s `$4`.
#[derive(serde::Serialize)]
struct QueueInput<'a> {
    c: &'a str,
    p: &'a Map<String, Value>,
}

/// PostgreSQL [`accept_attribute_updates`] inside `txn`: ONE statement merges every person
/// ([`profiles::PG_MERGE_CTE`]) and queues every update (in call order: ids follow it), then,
/// only if the call created people with a removal in their patch, one more strips those nulls.
/// Both inputs are bound as the text of a JSON array serialised from the borrowed updates (no
/// copy of the attributes into a `Value` tree), so the statement text never changes.
async fn pg_accept_attribute_updates(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    updates: &[NewAttributeUpdate],
    pairs: &[(&str, &Map<String, Value>)],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    let per_person = profiles::per_person(pairs);
    let merge_input = profiles::pg_merge_input(&per_person)?;
    let queue_input: Vec<QueueInput<'_>> = updates
        .iter()
        .map(|u| QueueInput {
            c: &u.customer_id,
            p: &u.attributes,
        })
        .collect();
    let queue_input =
        serde_json::to_string(&queue_input).map_err(|e| DbErr::Json(e.to_string()))?;
    let row = query_one_planned_once(
        txn,
        Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "WITH {merge}, queued AS (\
                 INSERT INTO outbox (workspace_id, kind, customer_id, payload, status, attempts, \
                 next_attempt_at, created_at) \
                 SELECT $1, $5, r.c, r.p, $6, 0, $2, $2 \
                 FROM ROWS FROM (jsonb_to_recordset($4::text::jsonb) AS (c text, p jsonb)) \
                 WITH ORDINALITY AS r(c, p, n) ORDER BY r.n RETURNING 1) \
                 SELECT (SELECT count(*) FROM merged) AS people, \
                 (SELECT count(*) FROM queued) AS queued, {nulls} AS created_with_nulls",
                merge = profiles::PG_MERGE_CTE,
                nulls = profiles::PG_CREATED_WITH_NULLS,
            ),
            [
                workspace_id.into(),
                now.into(),
                merge_input.into(),
                queue_input.into(),
                Kind::Identify.as_str().into(),
                Status::Pending.as_str().into(),
            ],
        ),
    )
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("accepted attribute updates".into()))?;
    let people: i64 = row.try_get("", "people")?;
    let queued: i64 = row.try_get("", "queued")?;
    if usize::try_from(people).ok() != Some(per_person.len()) {
        return Err(
            DbErr::RecordNotFound(format!("{people} of {} profiles", per_person.len())).into(),
        );
    }
    if let Some(ids) = row.try_get::<Option<Value>>("", "created_with_nulls")? {
        profiles::pg_strip_created_nulls(txn, ids).await?;
    }
    Ok(u64::try_from(queued).unwrap_or_default())
}

/// Accepts events, in ONE transaction: queues one `event` row per event (payload
/// `{"name", "data", "timestamp"}`, the timestamp defaulting to `now` in Unix seconds), in
/// order, due at `now`, and creates missing profiles (empty attributes). All or nothing.
///
/// An event whose idempotency key was already accepted in the workspace — earlier, or earlier
/// in this call — is not queued again: its result carries the first event's id and
/// `duplicate = true`. Race-safe: the key is inserted with `ON CONFLICT DO NOTHING` against a
/// unique index, so of concurrent calls with one key exactly one queues it (on PostgreSQL the
/// others wait for it to commit and then see it; SQLite runs write transactions one at a
/// time). A duplicate `event_id` without a matching key fails the call.
///
/// Returns one [`AcceptedEvent`] per event, in order.
pub async fn accept_events(
    db: &impl TransactionTrait,
    workspace_id: i64,
    events: &[NewEvent],
    now: DateTime<Utc>,
) -> Result<Vec<AcceptedEvent>, DbError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let now = db_time(now);

    // Within the call, the first event with a key is the one queued.
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let mut duplicate_of: Vec<Option<usize>> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let first = e
            .idempotency_key
            .as_deref()
            .and_then(|k| match first_with_key.get(k) {
                Some(&first) => Some(first),
                None => {
                    first_with_key.insert(k, i);
                    None
                }
            });
        duplicate_of.push(first);
    }
    // The events to queue, in order.
    let queue: Vec<&NewEvent> = events
        .iter()
        .zip(&duplicate_of)
        .filter(|(_, dup)| dup.is_none())
        .map(|(e, _)| e)
        .collect();
    let timestamp_of = |e: &NewEvent| e.timestamp.unwrap_or_else(|| now.timestamp());
    let customer_ids: Vec<&str> = events
        .iter()
        .map(|e| e.customer_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let on_conflict = OnConflict::columns([Column::WorkspaceId, Column::IdempotencyKey])
        .target_and_where(Expr::col(Column::IdempotencyKey).is_not_null())
        .do_nothing()
        .to_owned();

    let txn = begin_write(db).await?;
    let backend = txn.get_database_backend();
    let mut queued_keys: HashSet<String> = HashSet::new();
    let mut rows: Vec<ActiveModel> = Vec::new();
    if backend == DbBackend::Postgres {
        let input: Vec<QueueEvent<'_>> = queue
            .iter()
            .map(|e| QueueEvent {
                c: &e.customer_id,
                p: EventPayload {
                    name: &e.name,
                    data: &e.data,
                    timestamp: timestamp_of(e),
                },
                e: &e.event_id,
                i: e.idempotency_key.as_deref(),
            })
            .collect();
        let taken = pg_queue_events(&txn, workspace_id, &customer_ids, &input, now).await?;
        queued_keys.extend(
            first_with_key
                .keys()
                .filter(|k| !taken.contains(**k))
                .map(|k| (*k).to_owned()),
        );
    } else {
        profiles::ensure_exist(&txn, workspace_id, &customer_ids, now).await?;
        rows = queue
            .into_iter()
            .map(|e| {
                let payload = serde_json::json!({
                    "name": e.name,
                    "data": e.data,
                    "timestamp": timestamp_of(e),
                });
                new_row(
                    workspace_id,
                    Kind::Event,
                    &e.customer_id,
                    payload,
                    Some(e.event_id.clone()),
                    e.idempotency_key.clone(),
                    now,
                )
            })
            .collect();
    }
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<ActiveModel> = rows.by_ref().take(CHUNK).collect();
        let mut stmt = Entity::insert_many(chunk)
            .on_conflict(on_conflict.clone())
            .into_query();
        stmt.returning_col(Column::IdempotencyKey);
        for row in txn.query_all(&stmt).await? {
            if let Some(key) = row.try_get::<Option<String>>("", "idempotency_key")? {
                queued_keys.insert(key);
            }
        }
    }
    // Keys that hit an existing row: that row's event id.
    let taken: Vec<&str> = first_with_key
        .keys()
        .copied()
        .filter(|k| !queued_keys.contains(*k))
        .collect();
    let mut existing: HashMap<String, String> = HashMap::with_capacity(taken.len());
    if !taken.is_empty() {
        let found: Vec<(Option<String>, Option<String>)> = Entity::find()
            .select_only()
            .column(Column::IdempotencyKey)
            .column(Column::EventId)
            .filter(Column::WorkspaceId.eq(workspace_id))
            // Spelled out so that the partial unique index plainly applies.
            .filter(Column::IdempotencyKey.is_not_null())
            .filter(text_in(backend, Column::IdempotencyKey, &taken))
            .into_tuple()
            .all(&txn)
            .await?;
        existing.extend(
            found
                .into_iter()
                .filter_map(|(key, event_id)| Some((key?, event_id?))),
        );
    }
    txn.commit().await?;

    let mut out: Vec<AcceptedEvent> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let accepted = match (duplicate_of[i], e.idempotency_key.as_deref()) {
            (Some(first), _) => AcceptedEvent {
                event_id: out
                    .get(first)
                    .map(|a| a.event_id.clone())
                    .ok_or_else(|| DbErr::Custom("idempotency bookkeeping".into()))?,
                duplicate: true,
            },
            (None, Some(key)) if !queued_keys.contains(key) => AcceptedEvent {
                event_id: existing.get(key).cloned().ok_or_else(|| {
                    DbErr::RecordNotFound("event of an existing idempotency key".into())
                })?,
                duplicate: true,
            },
            (None, _) => AcceptedEvent {
                event_id: e.event_id.clone(),
                duplicate: false,
            },
        };
        out.push(accepted);
    }
    tracing::debug!(
        workspace_id,
        queued = out.iter().filter(|a| !a.duplicate).count(),
        duplicates = out.iter().filter(|a| a.duplicate).count(),
        "events accepted"
    );
    Ok(out)
}

/// An event row of [`pg_queue_events`]'s input: the payload `{"name", "data", "timestamp"}`
/// with the event id and idempotency key, serialised straight from the borrowed event.
#[derive(serde::Serialize)]
struct QueueEvent<'a> {
    c: &'a str,
    p: EventPayload<'a>,
    e: &'a str,
    i: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct EventPayload<'a> {
    name: &'a str,
    data: &'a Value,
    timestamp: i64,
}

/// PostgreSQL [`accept_events`] inside `txn`, in ONE statement: creates the missing profiles
/// among `customer_ids` (sorted, distinct; a data-modifying CTE runs whether or not it is
/// referenced), queues `events` in order (ids follow it) except
/// those whose idempotency key is already taken (`ON CONFLICT … DO NOTHING` against the unique
/// index: of concurrent calls with one key exactly one queues it), and answers only those taken
/// keys (usually none) instead of every queued row.
async fn pg_queue_events(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    customer_ids: &[&str],
    events: &[QueueEvent<'_>],
    now: DateTime<Utc>,
) -> Result<HashSet<String>, DbError> {
    let input = serde_json::to_string(events).map_err(|e| DbErr::Json(e.to_string()))?;
    let row = query_one_planned_once(
        txn,
        Statement::from_sql_and_values(
            DbBackend::Postgres,
            "WITH created AS (\
             INSERT INTO profiles (workspace_id, customer_id, attributes, numbers, updated_at) \
             SELECT $1, c.id, '{}'::jsonb, '{}'::jsonb, $2 \
             FROM jsonb_array_elements_text($3) WITH ORDINALITY AS c(id, n) ORDER BY c.n \
             ON CONFLICT (workspace_id, customer_id) DO NOTHING), \
             input AS (SELECT * FROM ROWS FROM (jsonb_to_recordset($4::text::jsonb) \
             AS (c text, p jsonb, e text, i text)) WITH ORDINALITY AS r(c, p, e, i, n)), \
             queued AS (\
             INSERT INTO outbox (workspace_id, kind, customer_id, payload, event_id, \
             idempotency_key, status, attempts, next_attempt_at, created_at) \
             SELECT $1, $5, r.c, r.p, r.e, r.i, $6, 0, $2, $2 FROM input r ORDER BY r.n \
             ON CONFLICT (workspace_id, idempotency_key) WHERE idempotency_key IS NOT NULL \
             DO NOTHING RETURNING idempotency_key) \
             SELECT (SELECT jsonb_agg(r.i) FROM input r WHERE r.i IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM queued q WHERE q.idempotency_key = r.i)) AS taken",
            [
                workspace_id.into(),
                now.into(),
                Value::from(customer_ids.to_vec()).into(),
                input.into(),
                Kind::Event.as_str().into(),
                Status::Pending.as_str().into(),
            ],
        ),
    )
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("accepted events".into()))?;
    let taken: Option<Vec<String>> = row
        .try_get::<Option<Value>>("", "taken")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| DbErr::Json(e.to_string()))?;
    Ok(taken.unwrap_or_default().into_iter().collect())
}

/// A new `pending` row due at `now`.
fn new_row(
    workspace_id: i64,
    kind: Kind,
    customer_id: &str,
    payload: Value,
    event_id: Option<String>,
    idempotency_key: Option<String>,
    now: DateTime<Utc>,
) -> ActiveModel {
    ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        kind: Set(kind.as_str().to_owned()),
        customer_id: Set(customer_id.to_owned()),
        payload: Set(payload),
        event_id: Set(event_id),
        idempotency_key: Set(idempotency_key),
        status: Set(Status::Pending.as_str().to_owned()),
        attempts: Set(0),
        next_attempt_at: Set(now),
        claimed_by: NotSet,
        claim_expires_at: NotSet,
        last_error: NotSet,
        last_attempt_at: NotSet,
        created_at: Set(now),
        delivered_at: NotSet,
    }
}

/// Claims up to `limit` due rows of the workspace for `worker`, oldest (lowest id) first, in
/// each person's order: `pending` rows with `next_attempt_at <= now`, and `in_flight` rows
/// whose claim expired (their worker died or lost track). They become `in_flight`,
/// `claimed_by = worker`, `claim_expires_at = now + claim_ttl`. Returned ordered by id.
///
/// **Order per person** (per `customer_id`, which for `segment_add` / `segment_remove` rows is
/// `segment:<id>`, so per segment): a row is claimed only if no earlier row of the same
/// `customer_id` is waiting (`pending` and not yet due, e.g. backing off after a failure), and
/// no row of it at all is `in_flight` under a live claim. So a person's claimed rows are always
/// a prefix of the person's undelivered rows, held by one worker, and nothing of the person is
/// claimed while anything of it may be on its way to Customer.io. `dead` rows hold nobody back.
///
/// An `in_flight` row's `next_attempt_at` is its claim's expiry (when it is due again), so one
/// column says when any undelivered row is due. The undelivered rows are one range of
/// `ix_outbox_claim` (`workspace_id, status, next_attempt_at, id`): delivered rows are never
/// read.
///
/// Safe with any number of workers and replicas — no row is handed to two claimers and no
/// person's order is broken: one statement, `UPDATE … WHERE id IN (ids chosen in order, LIMIT
/// n) RETURNING …`. On PostgreSQL it runs under the workspace's outbox transition lock
/// ([`lock_transitions`]): it reads a snapshot in which no other claim, retry, release or
/// renewal is half done, and the row conditions are checked again on each row it updates; on
/// SQLite the statement is its own write transaction and SQLite runs one writer at a time (the
/// others wait, up to the connection's busy timeout). How the held-back people are found
/// differs by backend, each in a form whose cost does not depend on statistics: PostgreSQL
/// takes, per person, a window over the undelivered rows (one sort of them); SQLite joins the
/// due rows to the set of people with a row in flight or waiting (through an automatic index).
pub async fn claim_due(
    db: &impl TransactionTrait,
    workspace_id: i64,
    worker: &str,
    limit: u64,
    claim_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<OutboxRow>, DbError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let now = db_time(now);
    let expires = add_span(now, claim_ttl);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let txn = begin_write(db).await?;
    let backend = txn.get_database_backend();
    lock_transitions(&txn, workspace_id).await?;
    let (pending, in_flight) = (Status::Pending.as_str(), Status::InFlight.as_str());
    let postgres = backend == DbBackend::Postgres;
    let mut b = SqlBuilder::new(backend);
    // Per person, the first row that holds the others back: any in-flight row under a live
    // claim holds back every row of the person (0), a waiting pending row the rows after it.
    if postgres {
        // Read the undelivered rows by a plain index scan, never a bitmap scan: every row that
        // was claimed or delivered leaves index entries in this range until a vacuum, and only
        // an index scan marks the ones it finds dead so that later scans skip them. With bitmap
        // scans every claim walked them all again: 197,202 entries and 5,781 heap pages for
        // 4,000 live rows after 100,000 updates (31 ms a claim, growing with the traffic; 11 ms
        // once marked). docs/benchmarks.md, thirteenth session.
        txn.execute_unprepared("SET LOCAL enable_bitmapscan = off")
            .await?;
        // A window, not a join: one sort of the undelivered rows whatever the planner believes
        // about their number (a join planned from missing or stale statistics became a nested
        // loop, quadratic). The chosen ids are computed once and the rows found by primary key.
        b.sql("UPDATE outbox SET status = ")
            .param(in_flight)
            .sql(", claimed_by = ")
            .param(worker)
            .sql(", claim_expires_at = ")
            .param(expires)
            .sql(", next_attempt_at = ")
            .param(expires)
            .sql(" WHERE id = ANY(ARRAY(SELECT q.id FROM (SELECT id, next_attempt_at, MIN(CASE WHEN next_attempt_at <= ")
            .param(now)
            .sql(" THEN NULL WHEN status = ")
            .param(in_flight)
            .sql(" THEN 0 ELSE id END) OVER (PARTITION BY customer_id) AS held_from FROM outbox WHERE workspace_id = ")
            .param(workspace_id)
            .sql(" AND status IN (")
            .param(pending)
            .sql(", ")
            .param(in_flight)
            .sql(")) q WHERE q.next_attempt_at <= ")
            .param(now)
            .sql(" AND (q.held_from IS NULL OR q.id < q.held_from) ORDER BY q.id LIMIT ")
            .param(limit)
            .sql("))");
    } else {
        // SQLite joins the (usually small) set of held-back people through an automatic index,
        // with no statistics involved: close to the cost of reading the due rows alone.
        b.sql("WITH waiting AS MATERIALIZED (SELECT customer_id, MIN(CASE WHEN status = ")
            .param(in_flight)
            .sql(" THEN 0 ELSE id END) AS held_from FROM outbox WHERE workspace_id = ")
            .param(workspace_id)
            .sql(" AND status IN (")
            .param(pending)
            .sql(", ")
            .param(in_flight)
            .sql(") AND next_attempt_at > ")
            .param(now)
            .sql(" GROUP BY customer_id) UPDATE outbox SET status = ")
            .param(in_flight)
            .sql(", claimed_by = ")
            .param(worker)
            .sql(", claim_expires_at = ")
            .param(expires)
            .sql(", next_attempt_at = ")
            .param(expires)
            .sql(" WHERE id IN (SELECT o.id FROM outbox o LEFT JOIN waiting w ON w.customer_id = o.customer_id WHERE o.workspace_id = ")
            .param(workspace_id)
            .sql(" AND o.status IN (")
            .param(pending)
            .sql(", ")
            .param(in_flight)
            .sql(") AND o.next_attempt_at <= ")
            .param(now)
            .sql(" AND (w.held_from IS NULL OR o.id < w.held_from) ORDER BY o.id LIMIT ")
            .param(limit)
            .sql(")");
    }
    // Checked again on the row itself (PostgreSQL re-reads a row changed meanwhile, e.g. settled
    // by its previous holder after its claim lapsed).
    b.sql(" AND workspace_id = ")
        .param(workspace_id)
        .sql(" AND status IN (")
        .param(pending)
        .sql(", ")
        .param(in_flight)
        .sql(") AND next_attempt_at <= ")
        .param(now)
        .sql(" RETURNING *");
    let mut rows = txn
        .query_all_raw(b.build())
        .await?
        .iter()
        .map(|r| Model::from_query_result(r, "").and_then(OutboxRow::try_from))
        .collect::<Result<Vec<_>, DbErr>>()?;
    txn.commit().await?;
    rows.sort_unstable_by_key(|r| r.id);
    Ok(rows)
}

/// First key of the PostgreSQL advisory locks that serialise the outbox's row transitions which
/// can change whom [`claim_due`] may take — claims, retries, releases, claim renewals and
/// re-queues ("outb" in ASCII, under the two-key form so it never meets the migration lock); the
/// second key is the workspace's ([`workspace_key`]).
const TRANSITION_LOCK: i32 = 0x6f75_7462;

/// Second key of a workspace's advisory locks (the outbox's transitions, the change log): its id, folded into `i32` when larger (two
/// workspaces sharing a key only wait for each other; neither loses its exclusion).
pub(crate) fn workspace_key(workspace_id: i64) -> i32 {
    i32::try_from(workspace_id.rem_euclid(i64::from(i32::MAX))).unwrap_or(0)
}

/// Takes `workspace_id`'s outbox transition lock until the transaction ends (PostgreSQL; on
/// SQLite the write transaction already excludes every other writer). Public so that tests can
/// hold it; the outbox functions take it themselves.
///
/// Why: under READ COMMITTED a claim decides from a snapshot. Without the lock, two claims
/// running at once would both see a person's first row as due and nothing in flight; one takes
/// the first row, the other (its choice made from the same snapshot, and re-checking only the
/// rows it updates) the person's second row — two workers sending one person's writes at once.
/// Or a retry could put the first row back to waiting while a claim takes the second. Claims
/// are one statement, so serialising them costs little; sending (the slow part) still runs in
/// parallel.
///
/// One lock per workspace, not one for the outbox: a person's rows are all in one workspace,
/// so transitions in different workspaces cannot break each other's order. With one lock, a
/// claim in a workspace with a million undelivered rows (its window sorts them all, about a
/// second) made every other workspace's claims wait behind it (issue #17: `bench-fairness`).
pub async fn lock_transitions(txn: &impl ConnectionTrait, workspace_id: i64) -> Result<(), DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1, $2)",
            [TRANSITION_LOCK.into(), workspace_key(workspace_id).into()],
        ))
        .await?;
    }
    Ok(())
}

/// Takes the transition locks of the workspaces of rows `ids` (a row's workspace never
/// changes), in ascending order so that two transactions never wait for each other in a cycle.
async fn lock_transitions_of_rows(txn: &impl ConnectionTrait, ids: &[i64]) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    if backend != DbBackend::Postgres {
        return Ok(());
    }
    let workspaces: Vec<i64> = Entity::find()
        .select_only()
        .column(Column::WorkspaceId)
        .distinct()
        .filter(id_in(backend, Column::Id, ids))
        .order_by_asc(Column::WorkspaceId)
        .into_tuple()
        .all(txn)
        .await?;
    let keys: BTreeSet<i32> = workspaces.into_iter().map(workspace_key).collect();
    for key in keys {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1, $2)",
            [TRANSITION_LOCK.into(), key.into()],
        ))
        .await?;
    }
    Ok(())
}

/// Only rows among `ids` that are still `in_flight` and claimed by `worker`.
fn held_by(backend: DbBackend, worker: &str, ids: &[i64]) -> Condition {
    Condition::all()
        .add(id_in(backend, Column::Id, ids))
        .add(Column::Status.eq(Status::InFlight.as_str()))
        .add(Column::ClaimedBy.eq(worker))
}

/// Settles rows `worker` delivered: `delivered` at `now`, `attempts + 1`. Rows `worker` no
/// longer holds (settled, or re-claimed by another worker after the claim expired) are left
/// alone. Returns how many rows changed.
pub async fn mark_delivered(
    db: &impl ConnectionTrait,
    worker: &str,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let now = db_time(now);
    Ok(Entity::update_many()
        .col_expr(Column::Status, Expr::value(Status::Delivered.as_str()))
        .col_expr(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .col_expr(Column::DeliveredAt, Expr::value(now))
        .col_expr(Column::LastAttemptAt, Expr::value(now))
        .col_expr(Column::ClaimExpiresAt, Expr::value(None::<DateTime<Utc>>))
        .filter(held_by(db.get_database_backend(), worker, ids))
        .exec(db)
        .await?
        .rows_affected)
}

/// Settles rows whose delivery failed but may succeed later: back to `pending`, due at
/// `next_attempt_at`, `attempts + 1`, `last_error = error`. Only rows `worker` still holds.
/// Returns how many rows changed.
pub async fn mark_retry(
    db: &impl TransactionTrait,
    worker: &str,
    ids: &[i64],
    error: &str,
    next_attempt_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let txn = begin_write(db).await?;
    lock_transitions_of_rows(&txn, ids).await?;
    let changed = Entity::update_many()
        .col_expr(Column::Status, Expr::value(Status::Pending.as_str()))
        .col_expr(Column::Attempts, Expr::col(Column::Attempts).add(1))
        .col_expr(Column::NextAttemptAt, Expr::value(db_time(next_attempt_at)))
        .col_expr(Column::LastError, Expr::value(error))
        .col_expr(Column::LastAttemptAt, Expr::value(db_time(now)))
        .col_expr(Column::ClaimedBy, Expr::value(None::<String>))
        .col_expr(Column::ClaimExpiresAt, Expr::value(None::<DateTime<Utc>>))
        .filter(held_by(txn.get_database_backend(), worker, ids))
        .exec(&txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(changed)
}

/// Gives rows back without an attempt: `pending`, due at `now`, `attempts` unchanged, no
/// longer claimed. For rows a worker claimed but did not send (e.g. a person's later writes
/// held back behind an earlier one that must be retried first). Only rows `worker` still holds.
/// Returns how many rows changed.
pub async fn release(
    db: &impl TransactionTrait,
    worker: &str,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let txn = begin_write(db).await?;
    lock_transitions_of_rows(&txn, ids).await?;
    let changed = Entity::update_many()
        .col_expr(Column::Status, Expr::value(Status::Pending.as_str()))
        .col_expr(Column::NextAttemptAt, Expr::value(db_time(now)))
        .col_expr(Column::ClaimedBy, Expr::value(None::<String>))
        .col_expr(Column::ClaimExpiresAt, Expr::value(None::<DateTime<Utc>>))
        .filter(held_by(txn.get_database_backend(), worker, ids))
        .exec(&txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(changed)
}

/// Renews `worker`'s claim on rows it still holds until `until` (their `claim_expires_at` and
/// `next_attempt_at`). Returns how many it still held: fewer than `ids.len()` means some were
/// settled or, their claim having lapsed, taken by another worker.
pub async fn extend_claim(
    db: &impl TransactionTrait,
    worker: &str,
    ids: &[i64],
    until: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let until = db_time(until);
    let txn = begin_write(db).await?;
    lock_transitions_of_rows(&txn, ids).await?;
    let changed = Entity::update_many()
        .col_expr(Column::ClaimExpiresAt, Expr::value(until))
        .col_expr(Column::NextAttemptAt, Expr::value(until))
        .filter(held_by(txn.get_database_backend(), worker, ids))
        .exec(&txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(changed)
}

/// Gives up on rows (each with its reason, stored as `last_error`): `dead`, `attempts + 1`.
/// Only rows `worker` still holds. Returns how many rows changed.
pub async fn mark_dead(
    db: &impl ConnectionTrait,
    worker: &str,
    dead: &[(i64, String)],
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    let now = db_time(now);
    let mut changed = 0;
    for chunk in dead.chunks(DEAD_CHUNK) {
        let Some(((first_id, first_reason), rest)) = chunk.split_first() else {
            continue;
        };
        let reason = rest.iter().fold(
            Expr::case(Column::Id.eq(*first_id), first_reason.as_str()),
            |case, (id, reason)| case.case(Column::Id.eq(*id), reason.as_str()),
        );
        let ids: Vec<i64> = chunk.iter().map(|(id, _)| *id).collect();
        changed += Entity::update_many()
            .col_expr(Column::Status, Expr::value(Status::Dead.as_str()))
            .col_expr(Column::Attempts, Expr::col(Column::Attempts).add(1))
            .col_expr(
                Column::LastError,
                reason.finally(Expr::col(Column::LastError)).into(),
            )
            .col_expr(Column::LastAttemptAt, Expr::value(now))
            .col_expr(Column::ClaimExpiresAt, Expr::value(None::<DateTime<Utc>>))
            .filter(held_by(db.get_database_backend(), worker, &ids))
            .exec(db)
            .await?
            .rows_affected;
    }
    Ok(changed)
}

/// Why a re-queued dead letter was settled without being sent (its `last_error`).
pub const SUPERSEDED: &str =
    "superseded: every attribute it sets was set again by a later update; not sent";

/// Brings `dead` rows of the workspace back — `pending`, due at `now`, `attempts = 0`,
/// `last_error` cleared — re-queueing only what is still the newest. `ids = None` re-queues
/// every dead row; ids of rows that are not dead (or not in the workspace) are ignored.
/// Returns how many rows were re-queued to be sent.
///
/// An `identify` row loses the attributes that a later `identify` of the same person sets (a
/// later row delivered, pending or in flight, or another dead row re-queued in the same call):
/// Customer.io already has, or will get, the newer value, so re-sending the old one would
/// overwrite it. The stored payload is changed accordingly. A row left with no attribute is
/// settled as `delivered` (at `now`, [`SUPERSEDED`] in `last_error`) without being sent. Events
/// and segment changes are re-queued as they are (Customer.io drops an event it has seen; a
/// segment change sends only the ids whose recorded membership still agrees).
///
/// One transaction under the workspace's transition lock. Reads the re-queued rows and, for the
/// people with re-queued updates, the attribute names of their later updates (a scan of the rows
/// after the oldest re-queued update, in pages).
pub async fn requeue_dead(
    db: &impl TransactionTrait,
    workspace_id: i64,
    ids: Option<&[i64]>,
    now: DateTime<Utc>,
) -> Result<u64, DbError> {
    if ids.is_some_and(<[i64]>::is_empty) {
        return Ok(0);
    }
    let now = db_time(now);
    let txn = begin_write(db).await?;
    lock_transitions(&txn, workspace_id).await?;
    let backend = txn.get_database_backend();
    let mut cond = Condition::all()
        .add(Column::WorkspaceId.eq(workspace_id))
        .add(Column::Status.eq(Status::Dead.as_str()));
    if let Some(ids) = ids {
        cond = cond.add(id_in(backend, Column::Id, ids));
    }
    let dead: Vec<(i64, String, String, Value)> = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::Kind)
        .column(Column::CustomerId)
        .column(Column::Payload)
        .filter(cond)
        .order_by_asc(Column::Id)
        .into_tuple()
        .all(&txn)
        .await?;
    // Per person: (id, attribute names) of the re-queued updates and of the later ones that
    // will be (or were) delivered.
    let mut sets: HashMap<String, Vec<(i64, Vec<String>)>> = HashMap::new();
    for (id, kind, customer_id, payload) in &dead {
        if kind == Kind::Identify.as_str()
            && let Some(map) = payload.as_object()
        {
            sets.entry(customer_id.clone())
                .or_default()
                .push((*id, map.keys().cloned().collect()));
        }
    }
    if let Some(oldest) = sets.values().flatten().map(|(id, _)| *id).min() {
        let people: Vec<String> = sets.keys().cloned().collect();
        let people: Vec<&str> = people.iter().map(String::as_str).collect();
        let mut after = oldest;
        loop {
            let page: Vec<(i64, String, Value)> = Entity::find()
                .select_only()
                .column(Column::Id)
                .column(Column::CustomerId)
                .column(Column::Payload)
                .filter(Column::WorkspaceId.eq(workspace_id))
                .filter(Column::Id.gt(after))
                .filter(Column::Kind.eq(Kind::Identify.as_str()))
                .filter(Column::Status.is_in([
                    Status::Pending.as_str(),
                    Status::InFlight.as_str(),
                    Status::Delivered.as_str(),
                ]))
                .filter(text_in(backend, Column::CustomerId, &people))
                .order_by_asc(Column::Id)
                .limit(LATER_PAGE)
                .into_tuple()
                .all(&txn)
                .await?;
            let Some(last) = page.last().map(|(id, _, _)| *id) else {
                break;
            };
            after = last;
            let full = page.len() as u64 == LATER_PAGE;
            for (id, customer_id, payload) in page {
                if let (Some(list), Some(map)) = (sets.get_mut(&customer_id), payload.as_object()) {
                    list.push((id, map.keys().cloned().collect()));
                }
            }
            if !full {
                break;
            }
        }
    }
    // Newest first per person: each update is paired with what the ones after it set.
    let mut set_later: HashMap<i64, HashSet<String>> = HashMap::new();
    for list in sets.values_mut() {
        list.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
        let mut seen: HashSet<String> = HashSet::new();
        for (id, names) in list.iter() {
            set_later.insert(*id, seen.clone());
            seen.extend(names.iter().cloned());
        }
    }
    let mut requeue: Vec<i64> = Vec::with_capacity(dead.len());
    let mut rewrite: Vec<(i64, Value)> = Vec::new();
    let mut superseded: Vec<i64> = Vec::new();
    for (id, kind, _, payload) in dead {
        let later = set_later.remove(&id).unwrap_or_default();
        match payload {
            Value::Object(map)
                if kind == Kind::Identify.as_str() && map.keys().any(|k| later.contains(k)) =>
            {
                let kept: Map<String, Value> = map
                    .into_iter()
                    .filter(|(k, _)| !later.contains(k))
                    .collect();
                if kept.is_empty() {
                    superseded.push(id);
                } else {
                    requeue.push(id);
                    rewrite.push((id, Value::Object(kept)));
                }
            }
            _ => requeue.push(id),
        }
    }
    for chunk in rewrite.chunks(DEAD_CHUNK) {
        let Some(((first_id, first), rest)) = chunk.split_first() else {
            continue;
        };
        let payload = rest.iter().fold(
            Expr::case(Column::Id.eq(*first_id), Expr::value(first.clone())),
            |case, (id, payload)| case.case(Column::Id.eq(*id), Expr::value(payload.clone())),
        );
        let ids: Vec<i64> = chunk.iter().map(|(id, _)| *id).collect();
        Entity::update_many()
            .col_expr(
                Column::Payload,
                payload.finally(Expr::col(Column::Payload)).into(),
            )
            .filter(id_in(backend, Column::Id, &ids))
            .exec(&txn)
            .await?;
    }
    let mut requeued = 0;
    if !requeue.is_empty() {
        requeued = Entity::update_many()
            .col_expr(Column::Status, Expr::value(Status::Pending.as_str()))
            .col_expr(Column::Attempts, Expr::value(0))
            .col_expr(Column::NextAttemptAt, Expr::value(now))
            .col_expr(Column::LastError, Expr::value(None::<String>))
            .col_expr(Column::ClaimedBy, Expr::value(None::<String>))
            .col_expr(Column::ClaimExpiresAt, Expr::value(None::<DateTime<Utc>>))
            .filter(id_in(backend, Column::Id, &requeue))
            .exec(&txn)
            .await?
            .rows_affected;
    }
    if !superseded.is_empty() {
        Entity::update_many()
            .col_expr(Column::Status, Expr::value(Status::Delivered.as_str()))
            .col_expr(Column::DeliveredAt, Expr::value(now))
            .col_expr(Column::LastError, Expr::value(SUPERSEDED))
            .col_expr(Column::ClaimedBy, Expr::value(None::<String>))
            .col_expr(Column::ClaimExpiresAt, Expr::value(None::<DateTime<Utc>>))
            .filter(id_in(backend, Column::Id, &superseded))
            .exec(&txn)
            .await?;
    }
    txn.commit().await?;
    if !superseded.is_empty() || !rewrite.is_empty() {
        tracing::info!(
            workspace_id,
            requeued,
            trimmed = rewrite.len(),
            superseded = superseded.len(),
            "dead letters re-queued without what later updates set"
        );
    }
    Ok(requeued)
}

/// Row counts per status and the lag indicators of the workspace's outbox (one query).
pub async fn stats(db: &impl ConnectionTrait, workspace_id: i64) -> Result<SyncStats, DbError> {
    /// Status, rows, oldest `created_at`, latest `delivered_at`.
    type Group = (String, i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let groups: Vec<Group> = Entity::find()
        .select_only()
        .column(Column::Status)
        .column_as(Expr::col(Column::Id).count(), "rows")
        .column_as(Expr::col(Column::CreatedAt).min(), "oldest_created_at")
        .column_as(Expr::col(Column::DeliveredAt).max(), "last_delivered_at")
        .filter(Column::WorkspaceId.eq(workspace_id))
        .group_by(Column::Status)
        .into_tuple()
        .all(db)
        .await?;
    let mut stats = SyncStats::default();
    for (status, rows, oldest, last_delivered) in groups {
        let status: Status = status.parse().map_err(DbErr::from)?;
        let rows = u64::try_from(rows).unwrap_or(0);
        match status {
            Status::Pending => stats.pending = rows,
            Status::InFlight => stats.in_flight = rows,
            Status::Delivered => {
                stats.delivered = rows;
                stats.last_delivered_at = last_delivered;
            }
            Status::Dead => stats.dead = rows,
        }
        if matches!(status, Status::Pending | Status::InFlight) {
            stats.oldest_pending_at = match (stats.oldest_pending_at, oldest) {
                (Some(a), Some(b)) => Some(Ord::min(a, b)),
                (a, b) => a.or(b),
            };
        }
    }
    Ok(stats)
}

/// Dead rows of the workspace, most recently given up first, at most `limit`.
pub async fn dead_letters(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    limit: u64,
) -> Result<Vec<OutboxRow>, DbError> {
    latest_attempted(db, workspace_id, Status::Dead, limit).await
}

/// Pending rows of the workspace whose last attempt failed (waiting for a retry), most
/// recently failed first, at most `limit`.
pub async fn recent_failures(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    limit: u64,
) -> Result<Vec<OutboxRow>, DbError> {
    latest_attempted(db, workspace_id, Status::Pending, limit).await
}

/// Rows of `status` with a `last_error`, by `last_attempt_at` (then id) descending.
async fn latest_attempted(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    status: Status,
    limit: u64,
) -> Result<Vec<OutboxRow>, DbError> {
    let rows = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Status.eq(status.as_str()))
        .filter(Column::LastError.is_not_null())
        .filter(Column::LastAttemptAt.is_not_null())
        .order_by_desc(Column::LastAttemptAt)
        .order_by_desc(Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(OutboxRow::try_from)
        .collect::<Result<_, _>>()?)
}

/// The earliest time at which [`claim_due`] will find something to claim in the workspace
/// (possibly in the past: work is due now); `None` when there is nothing left to deliver. For
/// a worker deciding how long to sleep, and for diagnostics.
///
/// Per person, claiming can start when the person's oldest undelivered row is due and no row
/// of the person is held under a live claim: the later of that row's `next_attempt_at` and the
/// latest claim expiry among the person's `in_flight` rows. The earliest of those over all
/// people. One query, grouping the undelivered rows by person.
pub async fn next_due_at(
    db: &impl ConnectionTrait,
    workspace_id: i64,
) -> Result<Option<DateTime<Utc>>, DbError> {
    let mut b = SqlBuilder::new(db.get_database_backend());
    b.sql("WITH people AS (SELECT customer_id, MIN(id) AS first_id, MAX(CASE WHEN status = ")
        .param(Status::InFlight.as_str())
        .sql(" THEN next_attempt_at END) AS held_until FROM outbox WHERE workspace_id = ")
        .param(workspace_id)
        .sql(" AND status IN (")
        .param(Status::Pending.as_str())
        .sql(", ")
        .param(Status::InFlight.as_str())
        .sql(
            ") GROUP BY customer_id) SELECT MIN(CASE WHEN p.held_until > o.next_attempt_at \
             THEN p.held_until ELSE o.next_attempt_at END) AS earliest \
             FROM people p JOIN outbox o ON o.id = p.first_id",
        );
    let Some(row) = db.query_one_raw(b.build()).await? else {
        return Ok(None);
    };
    Ok(row.try_get::<Option<DateTime<Utc>>>("", "earliest")?)
}

/// Deletes the workspace's rows delivered before `older_than`. Returns how many. (Their
/// idempotency keys are forgotten with them.)
pub async fn purge_delivered(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    older_than: DateTime<Utc>,
) -> Result<u64, DbError> {
    Ok(Entity::delete_many()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Status.eq(Status::Delivered.as_str()))
        .filter(Column::DeliveredAt.lt(db_time(older_than)))
        .exec(db)
        .await?
        .rows_affected)
}

/// The rows among `ids` in the workspace, ordered by id (unknown ids are absent, duplicates
/// returned once). For tests and diagnostics.
pub async fn get_many(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    ids: &[i64],
) -> Result<Vec<OutboxRow>, DbError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(id_in(db.get_database_backend(), Column::Id, ids))
        .order_by_asc(Column::Id)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(OutboxRow::try_from)
        .collect::<Result<_, _>>()?)
}
