//! Analytics over delivery events (issues #13 §3 and #15), aggregated in SQL.
//!
//! Everything here reads ONE per-delivery view, written once in [`deliveries_cte`] over the
//! per-delivery facts `analytics_deliveries` that ingest keeps ([`fold`], in the transaction
//! storing or attributing the events): the events of a delivery aggregated into what happened
//! to it and when (unix seconds, UTC):
//! `first_at` (its first event: when it was sent, as far as we know), `delivered_at`,
//! `open_at` (human), `click_at` (human), `bounced_at`, `spammed_at`, `unsubscribed_at`,
//! `converted_at`. The counting rule is the engagement scoring's: a webhook's flags win
//! (`prefetched` opens and `machine` clicks are not human; a `synthetic` open, inferred from a
//! click, is human only through a human click), a polled open or click counts only when no
//! webhook reported that metric for the delivery, and a human click implies a human open (at
//! the click's time if earlier). A delivery counts as delivered when it was delivered,
//! opened, clicked or converted; as bounced when it bounced, failed, was dropped or was
//! undeliverable.
//!
//! - [`delivery_rows`]: a person's deliveries, newest first; [`delivery_page`]: a report's
//!   deliveries in id order, a page at a time.
//! - [`bucket_counts`]: per (send, segment, metric, time bucket) counts, with totals and the
//!   people who engaged, in two passes over the facts (GetAssignmentAnalytics).
//! - [`assignment_counts`]: per assignment (and segment) totals over a period
//!   (ListAssignmentPerformance, the deliverability baseline, SuggestSegments).
//!
//! Parameters are bound as `$n` on both backends (SQLite reads `$NNN` as parameter NNN), each
//! used once.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, Statement, Value};

use crate::DbError;

/// Which delivery events a query reads. Deliveries are those whose events match; `sent_from` /
/// `sent_until` bound a delivery's first event (so a delivery sent in a period brings all it
/// did later).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub assignment_id: Option<String>,
    /// Every attributed assignment except this one (the workspace baseline).
    pub other_than_assignment: Option<String>,
    /// Customer.io segment id the send targeted.
    pub segment_id: Option<i64>,
    pub customer_id: Option<String>,
    pub assignment_ids: Option<Vec<String>>,
    /// Only these sends (row ids; an A/B test's arms). Empty: nothing.
    pub send_ids: Option<Vec<i64>>,
    pub sent_from: Option<DateTime<Utc>>,
    pub sent_until: Option<DateTime<Utc>>,
}

/// Statement text and its parameters, built together so numbering cannot drift.
struct Sql {
    backend: DbBackend,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            text: String::new(),
            values: Vec::new(),
        }
    }

    /// Appends a placeholder for `value`.
    fn bind(&mut self, value: impl Into<Value>) -> String {
        self.values.push(value.into());
        format!("${}", self.values.len())
    }

    fn push(&mut self, text: &str) {
        self.text.push_str(text);
    }

    fn statement(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.text, self.values)
    }
}

/// Unix seconds of a timestamp column.
fn epoch(backend: DbBackend, column: &str) -> String {
    match backend {
        DbBackend::Postgres => format!("CAST(FLOOR(EXTRACT(EPOCH FROM {column})) AS BIGINT)"),
        _ => format!("CAST(strftime('%s', {column}) AS INTEGER)"),
    }
}

/// The `WHERE` of the per-delivery facts a scope reads (bound into `sql`).
fn fact_filter(
    sql: &mut Sql,
    workspace_id: i64,
    scope: &Scope,
    after_delivery: Option<&str>,
) -> String {
    let backend = sql.backend;
    let mut filter = format!("workspace_id = {}", sql.bind(workspace_id));
    if let Some(a) = &scope.assignment_id {
        filter.push_str(&format!(" AND assignment_id = {}", sql.bind(a.clone())));
    }
    if let Some(a) = &scope.other_than_assignment {
        filter.push_str(&format!(" AND assignment_id <> {}", sql.bind(a.clone())));
    }
    if let Some(ids) = &scope.assignment_ids {
        let array = serde_json::Value::from(ids.clone());
        let list = match backend {
            DbBackend::Postgres => {
                format!("SELECT jsonb_array_elements_text({})", sql.bind(array))
            }
            _ => format!("SELECT value FROM json_each({})", sql.bind(array)),
        };
        filter.push_str(&format!(" AND assignment_id IN ({list})"));
    }
    if let Some(ids) = &scope.send_ids {
        // Integers only: safe to inline (an empty list matches nothing).
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        if list.is_empty() {
            filter.push_str(" AND 1 = 0");
        } else {
            filter.push_str(&format!(" AND send_id IN ({list})"));
        }
    }
    if let Some(s) = scope.segment_id {
        filter.push_str(&format!(" AND segment_id = {}", sql.bind(s)));
    }
    if let Some(c) = &scope.customer_id {
        filter.push_str(&format!(" AND customer_id = {}", sql.bind(c.clone())));
    }
    if let Some(from) = scope.sent_from {
        filter.push_str(&format!(" AND first_at >= {}", sql.bind(from.timestamp())));
    }
    if let Some(until) = scope.sent_until {
        filter.push_str(&format!(" AND first_at < {}", sql.bind(until.timestamp())));
    }
    if let Some(after) = after_delivery {
        filter.push_str(&format!(
            " AND delivery_id > {}",
            sql.bind(after.to_string())
        ));
    }
    filter
}

/// `WITH … deliveries AS (…)`: the per-delivery view of the module doc over `scope`, read from
/// the facts ([`fold`]). `after_delivery` / `up_to_delivery` keyset-page by delivery id.
fn deliveries_cte(
    sql: &mut Sql,
    workspace_id: i64,
    scope: &Scope,
    after_delivery: Option<&str>,
    up_to_delivery: Option<&str>,
) {
    let mut filter = fact_filter(sql, workspace_id, scope, after_delivery);
    if let Some(upper) = up_to_delivery {
        filter.push_str(&format!(
            " AND delivery_id <= {}",
            sql.bind(upper.to_string())
        ));
    }
    sql.push(&format!(
        "WITH flagged AS (SELECT delivery_id, customer_id, assignment_id, send_id, \
         NULLIF(segment_id, 0) AS segment_id, first_id, first_at, last_at, delivered_at, \
         COALESCE(wh_open_at, CASE WHEN wh_open = 0 THEN poll_open_at END) AS o_at, \
         COALESCE(wh_click_at, CASE WHEN wh_click = 0 THEN poll_click_at END) AS c_at, \
         bounced_at, spammed_at, unsubscribed_at, converted_at, webhook, poll \
         FROM analytics_deliveries WHERE {filter}), \
         deliveries AS (SELECT delivery_id, customer_id, assignment_id, send_id, segment_id, \
         first_id, first_at, last_at, delivered_at, \
         CASE WHEN o_at IS NULL THEN c_at WHEN c_at IS NULL THEN o_at \
         WHEN c_at < o_at THEN c_at ELSE o_at END AS open_at, \
         c_at AS click_at, bounced_at, spammed_at, unsubscribed_at, converted_at, webhook, poll \
         FROM flagged) "
    ));
}

/// Columns of `analytics_deliveries` (migration 000065) that [`fold`] merges, with how: the
/// smaller (`min`) or the larger (`max`) of the stored value and the events' aggregate; the
/// key columns and `assignment_id` (one per send) are not merged.
const FOLDED: [(&str, &str); 18] = [
    ("customer_id", "min"),
    ("first_id", "min"),
    ("first_at", "min"),
    ("last_at", "max"),
    ("delivered_at", "min"),
    ("wh_open_at", "min"),
    ("wh_open", "max"),
    ("poll_open_at", "min"),
    ("wh_click_at", "min"),
    ("wh_click", "max"),
    ("poll_click_at", "min"),
    ("bounced_at", "min"),
    ("spammed_at", "min"),
    ("unsubscribed_at", "min"),
    ("converted_at", "min"),
    ("webhook", "max"),
    ("poll", "max"),
    ("assignment_id", "keep"),
];

/// Event ids folded per statement (inlined integers).
const FOLD_CHUNK: usize = 1000;

/// Folds the delivery events `event_ids` (those attributed to a send and with a delivery id;
/// others are skipped) into `analytics_deliveries`: per (delivery, send, segment), the
/// aggregate of these events merged into the stored row by MIN / MAX. The merge is commutative
/// and idempotent, so concurrent folds of one delivery (each under the row's lock) and a fold
/// repeated (a retried attribution) give the same row as grouping all its events at once: the
/// read is exact whatever the order events commit in. Call it in the transaction that stores
/// or attributes the events, so facts and events commit together. Rows are written in key
/// order (concurrent folds lock shared rows in one order: no deadlock).
pub async fn fold(db: &impl ConnectionTrait, event_ids: &[i64]) -> Result<(), DbError> {
    let backend = db.get_database_backend();
    let t = epoch(backend, "occurred_at");
    let merge = |how: &str, col: &str| {
        let (old, new) = (
            format!("analytics_deliveries.{col}"),
            format!("excluded.{col}"),
        );
        match (how, backend) {
            ("keep", _) => format!("COALESCE({old}, {new})"),
            ("min", DbBackend::Postgres) => format!("LEAST({old}, {new})"),
            ("max", DbBackend::Postgres) => format!("GREATEST({old}, {new})"),
            // SQLite's scalar MIN/MAX answer NULL when either is NULL.
            (how, _) => format!(
                "COALESCE({}({old}, {new}), {old}, {new})",
                how.to_uppercase()
            ),
        }
    };
    let set = FOLDED
        .iter()
        .map(|(col, how)| format!("{col} = {}", merge(how, col)))
        .collect::<Vec<_>>()
        .join(", ");
    for chunk in event_ids.chunks(FOLD_CHUNK) {
        let ids = chunk
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let text = format!(
            "INSERT INTO analytics_deliveries (workspace_id, delivery_id, send_id, segment_id, \
             assignment_id, customer_id, first_id, first_at, last_at, delivered_at, wh_open_at, \
             wh_open, poll_open_at, wh_click_at, wh_click, poll_click_at, bounced_at, spammed_at, \
             unsubscribed_at, converted_at, webhook, poll) \
             SELECT workspace_id, delivery_id, send_id, COALESCE(segment_id, 0), \
             MIN(assignment_id), MIN(customer_id), MIN(id), MIN({t}), MAX({t}), \
             MIN(CASE WHEN metric IN ('delivered','opened','clicked','converted') THEN {t} END), \
             MIN(CASE WHEN source = 'webhook' AND metric = 'opened' AND NOT prefetched AND NOT synthetic THEN {t} END), \
             MAX(CASE WHEN source = 'webhook' AND metric = 'opened' THEN 1 ELSE 0 END), \
             MIN(CASE WHEN source = 'poll' AND metric = 'opened' THEN {t} END), \
             MIN(CASE WHEN source = 'webhook' AND metric = 'clicked' AND NOT machine THEN {t} END), \
             MAX(CASE WHEN source = 'webhook' AND metric = 'clicked' THEN 1 ELSE 0 END), \
             MIN(CASE WHEN source = 'poll' AND metric = 'clicked' THEN {t} END), \
             MIN(CASE WHEN metric IN ('bounced','failed','dropped','undeliverable') THEN {t} END), \
             MIN(CASE WHEN metric = 'spammed' THEN {t} END), \
             MIN(CASE WHEN metric = 'unsubscribed' THEN {t} END), \
             MIN(CASE WHEN metric = 'converted' THEN {t} END), \
             MAX(CASE WHEN source = 'webhook' THEN 1 ELSE 0 END), \
             MAX(CASE WHEN source = 'poll' THEN 1 ELSE 0 END) \
             FROM delivery_events WHERE id IN ({ids}) AND delivery_id IS NOT NULL \
             AND send_id IS NOT NULL \
             GROUP BY workspace_id, delivery_id, send_id, COALESCE(segment_id, 0) \
             ORDER BY workspace_id, delivery_id, send_id, COALESCE(segment_id, 0) \
             ON CONFLICT (workspace_id, delivery_id, send_id, segment_id) DO UPDATE SET {set}"
        );
        db.execute_unprepared(&text).await?;
    }
    Ok(())
}

/// One delivery as the per-delivery view tells it (times in unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct DeliveryRow {
    pub delivery_id: String,
    pub customer_id: Option<String>,
    pub assignment_id: Option<String>,
    pub send_id: i64,
    pub segment_id: Option<i64>,
    /// The id of its first stored event (paging a person's history, newest first).
    pub first_id: i64,
    pub first_at: i64,
    pub last_at: i64,
    pub delivered_at: Option<i64>,
    pub open_at: Option<i64>,
    pub click_at: Option<i64>,
    pub bounced_at: Option<i64>,
    pub spammed_at: Option<i64>,
    pub unsubscribed_at: Option<i64>,
    pub converted_at: Option<i64>,
    /// Some event came from a reporting webhook.
    pub webhook: i32,
    /// Some event came from the delivery poll.
    pub poll: i32,
}

/// Up to `limit` per-delivery rows of `scope`, newest first by first event id, before
/// `before_first_id` (`None`: from the newest). For one person's history (their events only).
pub async fn delivery_rows(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    scope: &Scope,
    before_first_id: Option<i64>,
    limit: u64,
) -> Result<Vec<DeliveryRow>, DbError> {
    let mut sql = Sql::new(db.get_database_backend());
    deliveries_cte(&mut sql, workspace_id, scope, None, None);
    let cut = match before_first_id {
        Some(b) => format!(" WHERE first_id < {}", sql.bind(b)),
        None => String::new(),
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let tail = format!(
        "SELECT * FROM deliveries{cut} ORDER BY first_id DESC LIMIT {}",
        sql.bind(limit)
    );
    sql.push(&tail);
    Ok(DeliveryRow::find_by_statement(sql.statement())
        .all(db)
        .await?)
}

#[derive(Debug, FromQueryResult)]
struct PageBound {
    n: i64,
    upper: Option<String>,
}

/// One page of `scope`'s deliveries in delivery id order after `after`: the next `limit`
/// delivery ids are found first (an ordered index scan that stops there: the
/// `(workspace, assignment_id | segment_id | —, delivery_id)` indexes), then only their events
/// are grouped, so each page costs the same however far into a large report it is. Answers the
/// rows (fewer than `limit` when the period drops some) and where the next page starts
/// (`None`: this was the last).
pub async fn delivery_page(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    scope: &Scope,
    after: Option<&str>,
    limit: u64,
) -> Result<(Vec<DeliveryRow>, Option<String>), DbError> {
    let backend = db.get_database_backend();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut probe = Sql::new(backend);
    let filter = fact_filter(&mut probe, workspace_id, scope, after);
    let bound = probe.bind(limit);
    probe.push(&format!(
        "SELECT COUNT(*) AS n, MAX(delivery_id) AS upper FROM (SELECT DISTINCT delivery_id \
         FROM analytics_deliveries WHERE {filter} ORDER BY delivery_id LIMIT {bound}) p"
    ));
    let Some(page) = PageBound::find_by_statement(probe.statement())
        .one(db)
        .await?
    else {
        return Ok((Vec::new(), None));
    };
    let Some(upper) = page.upper else {
        return Ok((Vec::new(), None));
    };
    let mut sql = Sql::new(backend);
    deliveries_cte(&mut sql, workspace_id, scope, after, Some(&upper));
    sql.push("SELECT * FROM deliveries ORDER BY delivery_id, send_id");
    let rows = DeliveryRow::find_by_statement(sql.statement())
        .all(db)
        .await?;
    Ok((rows, (page.n >= limit).then_some(upper)))
}

/// The metrics [`bucket_counts`] counts, by the per-delivery time that places them.
pub const BUCKET_METRICS: [(&str, &str); 8] = [
    ("sent", "first_at"),
    ("delivered", "delivered_at"),
    ("human_opened", "open_at"),
    ("human_clicked", "click_at"),
    ("bounced", "bounced_at"),
    ("spammed", "spammed_at"),
    ("unsubscribed", "unsubscribed_at"),
    ("converted", "converted_at"),
];

/// Deliveries of one send and target segment reaching `metric` in the bucket starting at
/// `bucket` (unix seconds). `metric` is one of [`BUCKET_METRICS`], or `engaged_people`
/// (distinct people with a human open or click; `bucket` 0) or `last_event_at` (`count` is the
/// newest event's time; `bucket` 0).
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct BucketCount {
    pub send_id: i64,
    pub segment_id: Option<i64>,
    pub metric: String,
    pub bucket: i64,
    pub count: i64,
}

/// Deliveries of one send and segment whose metrics fall in these hours (unix seconds of the
/// hour's start; `None`: the metric did not happen), [`BUCKET_METRICS`] order.
#[derive(Debug, FromQueryResult)]
struct HourCombo {
    send_id: i64,
    segment_id: Option<i64>,
    h0: Option<i64>,
    h1: Option<i64>,
    h2: Option<i64>,
    h3: Option<i64>,
    h4: Option<i64>,
    h5: Option<i64>,
    h6: Option<i64>,
    h7: Option<i64>,
    n: i64,
    last_at: i64,
}

#[derive(Debug, FromQueryResult)]
struct Engaged {
    send_id: i64,
    segment_id: Option<i64>,
    engaged: i64,
}

/// Per (send, segment, metric, bucket) counts of `scope`. Each time is first floored to its
/// hour, where hours start `hour_shift` seconds (0..3600) before a UTC hour would (1,800 for a
/// zone at UTC+5:30), then `bucket_of` maps that hour's start to its bucket's start (the caller
/// owns the time zone and the hourly-then-daily scheme; it is asked once per distinct hour).
/// The facts are read in one pass grouped by the hour of every metric at once (deliveries
/// sharing their hours are one row), then spread over the metrics and buckets here (with the
/// newest event per (send, segment)); a second pass counts the people engaged, over the engaged
/// deliveries only.
pub async fn bucket_counts(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    scope: &Scope,
    hour_shift: i64,
    bucket_of: impl Fn(i64) -> i64,
) -> Result<Vec<BucketCount>, DbError> {
    let hour_shift = hour_shift.rem_euclid(3600);
    let backend = db.get_database_backend();
    let mut sql = Sql::new(backend);
    deliveries_cte(&mut sql, workspace_id, scope, None, None);
    let hours: Vec<String> = BUCKET_METRICS
        .iter()
        .enumerate()
        .map(|(i, (_, column))| format!("{column} - (({column} + {hour_shift}) % 3600) AS h{i}"))
        .collect();
    let keys = (0..BUCKET_METRICS.len())
        .map(|i| format!("h{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    sql.push(&format!(
        "SELECT send_id, segment_id, {keys}, COUNT(*) AS n, MAX(last_at) AS last_at FROM \
         (SELECT send_id, segment_id, last_at, {} FROM deliveries) x \
         GROUP BY send_id, segment_id, {keys}",
        hours.join(", ")
    ));
    let combos = HourCombo::find_by_statement(sql.statement())
        .all(db)
        .await?;
    let mut counts: std::collections::BTreeMap<(i64, Option<i64>, &str, i64), i64> =
        std::collections::BTreeMap::new();
    let mut buckets: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
    for c in &combos {
        let last = counts
            .entry((c.send_id, c.segment_id, "last_event_at", 0))
            .or_insert(c.last_at);
        *last = (*last).max(c.last_at);
        let hours = [c.h0, c.h1, c.h2, c.h3, c.h4, c.h5, c.h6, c.h7];
        for ((metric, _), hour) in BUCKET_METRICS.iter().zip(hours) {
            let Some(h) = hour else { continue };
            let bucket = *buckets.entry(h).or_insert_with(|| bucket_of(h));
            *counts
                .entry((c.send_id, c.segment_id, metric, bucket))
                .or_default() += c.n;
        }
    }
    let mut sql = Sql::new(backend);
    deliveries_cte(&mut sql, workspace_id, scope, None, None);
    sql.push(
        "SELECT send_id, segment_id, COUNT(*) AS engaged FROM (SELECT DISTINCT send_id, \
         segment_id, customer_id FROM deliveries WHERE customer_id IS NOT NULL \
         AND (open_at IS NOT NULL OR click_at IS NOT NULL)) e GROUP BY send_id, segment_id",
    );
    for e in Engaged::find_by_statement(sql.statement()).all(db).await? {
        counts.insert((e.send_id, e.segment_id, "engaged_people", 0), e.engaged);
    }
    let mut out: Vec<BucketCount> = counts
        .into_iter()
        .map(
            |((send_id, segment_id, metric, bucket), count)| BucketCount {
                send_id,
                segment_id,
                metric: metric.to_string(),
                bucket,
                count,
            },
        )
        .collect();
    out.sort_by(|a, b| {
        (a.send_id, a.segment_id, &a.metric, a.bucket).cmp(&(
            b.send_id,
            b.segment_id,
            &b.metric,
            b.bucket,
        ))
    });
    Ok(out)
}

/// Totals of one assignment and target segment (`segment_id` `None` when grouped over
/// segments).
#[derive(Debug, Clone, Default, PartialEq, Eq, FromQueryResult)]
pub struct Totals {
    pub assignment_id: String,
    pub segment_id: Option<i64>,
    pub sent: i64,
    pub delivered: i64,
    pub human_opened: i64,
    pub human_clicked: i64,
    pub bounced: i64,
    pub spammed: i64,
    pub unsubscribed: i64,
    pub converted: i64,
    /// First delivery (unix seconds).
    pub first_at: i64,
    /// Newest event (unix seconds).
    pub last_at: i64,
}

/// Totals of `scope` per assignment, and per target segment too when `per_segment`.
pub async fn assignment_counts(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    scope: &Scope,
    per_segment: bool,
) -> Result<Vec<Totals>, DbError> {
    let mut sql = Sql::new(db.get_database_backend());
    deliveries_cte(&mut sql, workspace_id, scope, None, None);
    let (segment, group) = if per_segment {
        ("segment_id", "assignment_id, segment_id")
    } else {
        ("CAST(NULL AS BIGINT) AS segment_id", "assignment_id")
    };
    sql.push(&format!(
        "SELECT assignment_id, {segment}, COUNT(*) AS sent, COUNT(delivered_at) AS delivered, \
         COUNT(open_at) AS human_opened, COUNT(click_at) AS human_clicked, \
         COUNT(bounced_at) AS bounced, COUNT(spammed_at) AS spammed, \
         COUNT(unsubscribed_at) AS unsubscribed, COUNT(converted_at) AS converted, \
         MIN(first_at) AS first_at, MAX(last_at) AS last_at \
         FROM deliveries WHERE assignment_id IS NOT NULL GROUP BY {group} ORDER BY {group}"
    ));
    Ok(Totals::find_by_statement(sql.statement()).all(db).await?)
}

/// The sends (id, assignment, title, request JSON) of these assignments.
pub async fn sends_of(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    assignment_ids: &[String],
) -> Result<Vec<SendInfo>, DbError> {
    use crate::entities::sends;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
    Ok(sends::Entity::find()
        .filter(sends::Column::WorkspaceId.eq(workspace_id))
        .filter(sends::Column::AssignmentId.is_in(assignment_ids.iter().cloned()))
        .order_by_asc(sends::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(SendInfo::from)
        .collect())
}

/// The public ids (`snd_…`) of these sends, by row id.
pub async fn send_public_ids(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    send_ids: &[i64],
) -> Result<Vec<(i64, String)>, DbError> {
    use crate::entities::sends;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
    Ok(sends::Entity::find()
        .select_only()
        .column(sends::Column::Id)
        .column(sends::Column::PublicId)
        .filter(sends::Column::WorkspaceId.eq(workspace_id))
        .filter(sends::Column::Id.is_in(send_ids.iter().copied()))
        .into_tuple()
        .all(db)
        .await?)
}

/// What analytics needs of a send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendInfo {
    pub id: i64,
    /// `snd_<ULID>`.
    pub public_id: String,
    pub assignment_id: String,
    pub title: String,
    /// The normalised SendAssignment (`content_types`, `segment_ids`, …).
    pub request: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl From<crate::entities::sends::Model> for SendInfo {
    fn from(s: crate::entities::sends::Model) -> Self {
        Self {
            id: s.id,
            public_id: s.public_id,
            assignment_id: s.assignment_id,
            title: s.title,
            request: s.request,
            created_at: s.created_at,
        }
    }
}

/// Every assignment with a send (id, title of its first send), in id order, at most `limit`:
/// the candidates "similar past assignments" are chosen from.
pub async fn assignments_with_sends(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    limit: u64,
) -> Result<Vec<SendInfo>, DbError> {
    use crate::entities::sends;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    Ok(sends::Entity::find()
        .filter(sends::Column::WorkspaceId.eq(workspace_id))
        .order_by_desc(sends::Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(SendInfo::from)
        .collect())
}

/// A segment of the mirror (Customer.io's or SharpSend-managed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Customer.io segment id.
    pub cio_id: i64,
    pub name: String,
    pub member_count: Option<i64>,
    /// `manual` or `dynamic` as Customer.io says.
    pub segment_type: String,
}

/// The segments of the mirror not removed, by Customer.io id.
pub async fn segments(
    db: &impl ConnectionTrait,
    workspace_id: i64,
) -> Result<Vec<SegmentInfo>, DbError> {
    use crate::entities::segments;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
    Ok(segments::Entity::find()
        .filter(segments::Column::WorkspaceId.eq(workspace_id))
        .filter(segments::Column::Removed.eq(false))
        .order_by_asc(segments::Column::CioId)
        .all(db)
        .await?
        .into_iter()
        .map(|s| SegmentInfo {
            cio_id: s.cio_id,
            name: s.name,
            member_count: s.member_count,
            segment_type: s.segment_type,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_in_binding_order() {
        let mut sql = Sql::new(DbBackend::Sqlite);
        let scope = Scope {
            assignment_id: Some("a".into()),
            sent_from: Some(DateTime::from_timestamp(10, 0).unwrap_or_default()),
            ..Default::default()
        };
        deliveries_cte(&mut sql, 1, &scope, Some("d"), None);
        assert_eq!(sql.values.len(), 4);
        for n in 1..=4 {
            assert_eq!(
                sql.text.matches(&format!("${n} ")).count()
                    + sql.text.matches(&format!("${n})")).count(),
                1,
                "${n} in {}",
                sql.text
            );
        }
    }
}
