//! Engagement coming back from Customer.io: delivery events (from reporting webhooks and from
//! the `delivery-poll` job), the webhook quarantine, and the per-delivery facts the
//! engagement scoring reads.
//!
//! - [`insert_events`]: one multi-row insert per call, `ON CONFLICT (workspace_id, event_id) DO
//!   NOTHING` (a redelivered webhook is stored once), each event attributed to the SharpSend
//!   submission whose Customer.io trigger (broadcasts) or newsletter it belongs to (one lookup
//!   per call). Poll events skip a (delivery, metric) already stored by either path.
//! - [`quarantine`] / [`quarantined`]: signed bodies that were not understood.
//! - [`delivery_facts`]: per person and delivery, what happened (delivered, human open, human
//!   click), for a page of people in `customer_id` order (memory bounded by the page).

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, Statement, TransactionSession, TransactionTrait,
};
use serde_json::{Map, Value};

use crate::DbError;
use crate::database::begin_write;
use crate::entities::{profiles, send_submissions, sends};
use crate::time::db_time;

/// Rows per multi-row insert (25 values a row: well under SQLite's bind limit).
const CHUNK: usize = 500;

/// The `delivery_events` table.
pub mod delivery_event {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "delivery_events")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub workspace_id: i64,
        pub event_id: String,
        pub source: String,
        pub metric: String,
        pub object_type: String,
        pub delivery_id: Option<String>,
        pub customer_id: Option<String>,
        pub broadcast_id: Option<i64>,
        pub trigger_id: Option<i64>,
        pub newsletter_id: Option<i64>,
        pub content_id: Option<i64>,
        pub campaign_id: Option<i64>,
        pub action_id: Option<i64>,
        pub link: Option<String>,
        pub prefetched: bool,
        pub machine: bool,
        pub synthetic: bool,
        pub occurred_at: DateTimeUtc,
        pub received_at: DateTimeUtc,
        pub submission_id: Option<i64>,
        pub send_id: Option<i64>,
        pub assignment_id: Option<String>,
        pub segment_id: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The `webhook_quarantine` table.
pub mod quarantine_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_quarantine")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub workspace_id: i64,
        pub reason: String,
        pub body: String,
        pub received_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

use delivery_event::{ActiveModel, Column, Entity};

stored_enum! {
    /// Where a delivery event came from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum EventSource {
        /// A reporting webhook.
        Webhook = "webhook",
        /// The `delivery-poll` job (per-delivery records of the App API).
        Poll = "poll",
    }
}

/// A delivery event to store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewDeliveryEvent {
    pub event_id: String,
    pub metric: String,
    pub object_type: String,
    pub delivery_id: Option<String>,
    pub customer_id: Option<String>,
    pub broadcast_id: Option<i64>,
    pub trigger_id: Option<i64>,
    pub newsletter_id: Option<i64>,
    pub content_id: Option<i64>,
    pub campaign_id: Option<i64>,
    pub action_id: Option<i64>,
    pub link: Option<String>,
    /// An open by a machine or privacy proxy (not a person).
    pub prefetched: bool,
    /// A click by a link scanner (not a person).
    pub machine: bool,
    /// An open inferred from a click.
    pub synthetic: bool,
    pub occurred_at: DateTime<Utc>,
    /// Poll path only: the broadcast submission this delivery belongs to, when the caller
    /// knows it (the App API's messages carry no trigger id).
    pub submission_id: Option<i64>,
}

/// A stored delivery event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryEvent {
    /// Storage order; the cursor of watchers.
    pub id: i64,
    pub event_id: String,
    pub source: EventSource,
    pub metric: String,
    pub object_type: String,
    pub delivery_id: Option<String>,
    pub customer_id: Option<String>,
    pub broadcast_id: Option<i64>,
    pub trigger_id: Option<i64>,
    pub newsletter_id: Option<i64>,
    pub content_id: Option<i64>,
    pub campaign_id: Option<i64>,
    pub action_id: Option<i64>,
    pub link: Option<String>,
    pub prefetched: bool,
    pub machine: bool,
    pub synthetic: bool,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub submission_id: Option<i64>,
    pub send_id: Option<i64>,
    pub assignment_id: Option<String>,
    pub segment_id: Option<i64>,
}

impl TryFrom<delivery_event::Model> for DeliveryEvent {
    type Error = sea_orm::DbErr;
    fn try_from(m: delivery_event::Model) -> Result<Self, Self::Error> {
        Ok(Self {
            id: m.id,
            event_id: m.event_id,
            source: m.source.parse()?,
            metric: m.metric,
            object_type: m.object_type,
            delivery_id: m.delivery_id,
            customer_id: m.customer_id,
            broadcast_id: m.broadcast_id,
            trigger_id: m.trigger_id,
            newsletter_id: m.newsletter_id,
            content_id: m.content_id,
            campaign_id: m.campaign_id,
            action_id: m.action_id,
            link: m.link,
            prefetched: m.prefetched,
            machine: m.machine,
            synthetic: m.synthetic,
            occurred_at: m.occurred_at,
            received_at: m.received_at,
            submission_id: m.submission_id,
            send_id: m.send_id,
            assignment_id: m.assignment_id,
            segment_id: m.segment_id,
        })
    }
}

/// What a submission attributes an event to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attribution {
    submission_id: i64,
    send_id: i64,
    segment_id: i64,
    assignment_id: String,
}

/// The submissions (with their send's assignment) having one of these trigger or newsletter
/// ids, or these submission ids.
async fn attributions(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    trigger_ids: &[i64],
    newsletter_ids: &[i64],
    submission_ids: &[i64],
) -> Result<Vec<(send_submissions::Model, Attribution)>, DbError> {
    if trigger_ids.is_empty() && newsletter_ids.is_empty() && submission_ids.is_empty() {
        return Ok(Vec::new());
    }
    let subs = send_submissions::Entity::find()
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(
            send_submissions::Column::CioTriggerId
                .is_in(trigger_ids.iter().copied())
                .or(send_submissions::Column::CioNewsletterId.is_in(newsletter_ids.iter().copied()))
                .or(send_submissions::Column::Id.is_in(submission_ids.iter().copied())),
        )
        .all(db)
        .await?;
    let send_ids: BTreeSet<i64> = subs.iter().map(|s| s.send_id).collect();
    let assignments: HashMap<i64, String> = sends::Entity::find()
        .select_only()
        .column(sends::Column::Id)
        .column(sends::Column::AssignmentId)
        .filter(sends::Column::Id.is_in(send_ids))
        .into_tuple::<(i64, String)>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    Ok(subs
        .into_iter()
        .filter_map(|s| {
            let assignment_id = assignments.get(&s.send_id)?.clone();
            let a = Attribution {
                submission_id: s.id,
                send_id: s.send_id,
                segment_id: s.segment_id,
                assignment_id,
            };
            Some((s, a))
        })
        .collect())
}

/// Stores `events` (one source), each once per `event_id`; returns the ids of the rows
/// stored now (redeliveries and, for [`EventSource::Poll`], metrics a delivery already has
/// are left out). Events are attributed to SharpSend submissions by trigger id, newsletter id
/// or the given [`NewDeliveryEvent::submission_id`].
pub async fn insert_events(
    db: &impl TransactionTrait,
    workspace_id: i64,
    source: EventSource,
    events: &[NewDeliveryEvent],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, DbError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let txn = begin_write(db).await?;
    let inserted = insert_events_in(&txn, workspace_id, source, events, now).await?;
    crate::analytics::fold(&txn, &inserted).await?;
    txn.commit().await?;
    Ok(inserted)
}

/// [`insert_events`] inside the caller's transaction (the analytics facts are folded by it).
async fn insert_events_in(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    source: EventSource,
    events: &[NewDeliveryEvent],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, DbError> {
    let now = db_time(now);
    let trigger_ids: Vec<i64> = dedup(events.iter().filter_map(|e| e.trigger_id));
    let newsletter_ids: Vec<i64> = dedup(events.iter().filter_map(|e| e.newsletter_id));
    let submission_ids: Vec<i64> = dedup(events.iter().filter_map(|e| e.submission_id));
    let found = attributions(
        db,
        workspace_id,
        &trigger_ids,
        &newsletter_ids,
        &submission_ids,
    )
    .await?;
    let mut by_trigger = HashMap::new();
    let mut by_newsletter = HashMap::new();
    let mut by_id = HashMap::new();
    for (sub, a) in found {
        if let Some(t) = sub.cio_trigger_id {
            by_trigger.insert(t, a.clone());
        }
        if let Some(n) = sub.cio_newsletter_id {
            by_newsletter.insert(n, a.clone());
        }
        by_id.insert(sub.id, a);
    }
    let known: HashSet<(String, String)> = if source == EventSource::Poll {
        let delivery_ids: Vec<String> = dedup(events.iter().filter_map(|e| e.delivery_id.clone()));
        let mut known = HashSet::new();
        for chunk in delivery_ids.chunks(CHUNK) {
            let rows: Vec<(Option<String>, String)> = Entity::find()
                .select_only()
                .column(Column::DeliveryId)
                .column(Column::Metric)
                .filter(Column::WorkspaceId.eq(workspace_id))
                .filter(Column::DeliveryId.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(db)
                .await?;
            known.extend(rows.into_iter().filter_map(|(d, m)| Some((d?, m))));
        }
        known
    } else {
        HashSet::new()
    };

    let mut seen = HashSet::new();
    let rows: Vec<ActiveModel> = events
        .iter()
        .filter(|e| seen.insert(e.event_id.as_str()))
        .filter(|e| match &e.delivery_id {
            Some(d) => !known.contains(&(d.clone(), e.metric.clone())),
            None => true,
        })
        .map(|e| {
            let a = e
                .submission_id
                .and_then(|id| by_id.get(&id))
                .or_else(|| e.trigger_id.and_then(|t| by_trigger.get(&t)))
                .or_else(|| e.newsletter_id.and_then(|n| by_newsletter.get(&n)));
            ActiveModel {
                id: NotSet,
                workspace_id: Set(workspace_id),
                event_id: Set(e.event_id.clone()),
                source: Set(source.as_str().to_string()),
                metric: Set(e.metric.clone()),
                object_type: Set(e.object_type.clone()),
                delivery_id: Set(e.delivery_id.clone()),
                customer_id: Set(e.customer_id.clone()),
                broadcast_id: Set(e.broadcast_id),
                trigger_id: Set(e.trigger_id),
                newsletter_id: Set(e.newsletter_id),
                content_id: Set(e.content_id),
                campaign_id: Set(e.campaign_id),
                action_id: Set(e.action_id),
                link: Set(e.link.clone()),
                prefetched: Set(e.prefetched),
                machine: Set(e.machine),
                synthetic: Set(e.synthetic),
                occurred_at: Set(db_time(e.occurred_at)),
                received_at: Set(now),
                submission_id: Set(a.map(|a| a.submission_id)),
                send_id: Set(a.map(|a| a.send_id)),
                assignment_id: Set(a.map(|a| a.assignment_id.clone())),
                segment_id: Set(a.map(|a| a.segment_id)),
            }
        })
        .collect();
    let on_conflict = OnConflict::columns([Column::WorkspaceId, Column::EventId])
        .do_nothing()
        .to_owned();
    let mut inserted = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<ActiveModel> = rows.by_ref().take(CHUNK).collect();
        let mut stmt = Entity::insert_many(chunk)
            .on_conflict(on_conflict.clone())
            .into_query();
        stmt.returning_col(Column::Id);
        for row in db.query_all(&stmt).await? {
            inserted.push(row.try_get::<i64>("", "id")?);
        }
    }
    Ok(inserted)
}

fn dedup<T: Ord>(items: impl Iterator<Item = T>) -> Vec<T> {
    items.collect::<BTreeSet<_>>().into_iter().collect()
}

/// Attributes events stored before their submission's trigger or newsletter id was known.
/// Returns how many were attributed.
pub async fn attribute_pending(
    db: &impl TransactionTrait,
    workspace_id: i64,
) -> Result<u64, DbError> {
    let txn = begin_write(db).await?;
    let attributed = attribute_pending_in(&txn, workspace_id).await?;
    txn.commit().await?;
    Ok(attributed)
}

/// [`attribute_pending`] inside the caller's transaction; the events it attributes are folded
/// into the analytics facts (a pending event another run attributed meanwhile is folded
/// twice, which changes nothing).
async fn attribute_pending_in(
    db: &impl ConnectionTrait,
    workspace_id: i64,
) -> Result<u64, DbError> {
    let pending: Vec<(i64, Option<i64>, Option<i64>)> = Entity::find()
        .select_only()
        .column(Column::Id)
        .column(Column::TriggerId)
        .column(Column::NewsletterId)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::SubmissionId.is_null())
        .filter(
            Column::TriggerId
                .is_not_null()
                .or(Column::NewsletterId.is_not_null()),
        )
        .limit(10_000)
        .into_tuple()
        .all(db)
        .await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let triggers = dedup(pending.iter().filter_map(|p| p.1));
    let newsletters = dedup(pending.iter().filter_map(|p| p.2));
    let mut attributed = 0;
    for (sub, a) in attributions(db, workspace_id, &triggers, &newsletters, &[]).await? {
        let parent = match (sub.cio_trigger_id, sub.cio_newsletter_id) {
            (Some(t), _) => Column::TriggerId.eq(t),
            (None, Some(n)) => Column::NewsletterId.eq(n),
            (None, None) => continue,
        };
        attributed += Entity::update_many()
            .col_expr(Column::SubmissionId, Expr::value(a.submission_id))
            .col_expr(Column::SendId, Expr::value(a.send_id))
            .col_expr(Column::AssignmentId, Expr::value(a.assignment_id))
            .col_expr(Column::SegmentId, Expr::value(a.segment_id))
            .filter(Column::WorkspaceId.eq(workspace_id))
            .filter(Column::SubmissionId.is_null())
            .filter(parent)
            .exec(db)
            .await?
            .rows_affected;
    }
    if attributed > 0 {
        let ids: Vec<i64> = pending.iter().map(|p| p.0).collect();
        crate::analytics::fold(db, &ids).await?;
    }
    Ok(attributed)
}

/// Stored events after `after_id` (storage order), of one assignment or all, at most `limit`.
pub async fn events_after(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    after_id: i64,
    assignment_id: Option<&str>,
    limit: u64,
) -> Result<Vec<DeliveryEvent>, DbError> {
    let mut q = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Id.gt(after_id));
    if let Some(a) = assignment_id {
        q = q.filter(Column::AssignmentId.eq(a));
    }
    q.order_by_asc(Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|m| DeliveryEvent::try_from(m).map_err(DbError::from))
        .collect()
}

/// One person's attributed events, newest first, before `before_id` (`None`: from the
/// newest), at most `limit`.
pub async fn events_of_customer(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    customer_id: &str,
    before_id: Option<i64>,
    limit: u64,
) -> Result<Vec<DeliveryEvent>, DbError> {
    let mut q = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CustomerId.eq(customer_id))
        .filter(Column::SubmissionId.is_not_null());
    if let Some(before) = before_id {
        q = q.filter(Column::Id.lt(before));
    }
    q.order_by_desc(Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|m| DeliveryEvent::try_from(m).map_err(DbError::from))
        .collect()
}

/// The newest stored event id (0 when none): where a watcher without a cursor starts.
pub async fn last_event_id(db: &impl ConnectionTrait, workspace_id: i64) -> Result<i64, DbError> {
    let id: Option<Option<i64>> = Entity::find()
        .select_only()
        .column_as(Column::Id.max(), "max_id")
        .filter(Column::WorkspaceId.eq(workspace_id))
        .into_tuple()
        .one(db)
        .await?;
    Ok(id.flatten().unwrap_or(0))
}

/// A body kept aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub id: i64,
    pub reason: String,
    pub body: String,
    pub received_at: DateTime<Utc>,
}

/// Keeps a signed body that was not understood, with why.
pub async fn quarantine(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    reason: &str,
    body: &str,
    now: DateTime<Utc>,
) -> Result<i64, DbError> {
    let row = quarantine_row::ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        reason: Set(reason.to_string()),
        body: Set(body.to_string()),
        received_at: Set(db_time(now)),
    };
    Ok(quarantine_row::Entity::insert(row)
        .exec(db)
        .await?
        .last_insert_id)
}

/// Quarantined bodies after `after_id`, oldest first, at most `limit`.
pub async fn quarantined(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    after_id: i64,
    limit: u64,
) -> Result<Vec<Quarantined>, DbError> {
    Ok(quarantine_row::Entity::find()
        .filter(quarantine_row::Column::WorkspaceId.eq(workspace_id))
        .filter(quarantine_row::Column::Id.gt(after_id))
        .order_by_asc(quarantine_row::Column::Id)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(|m| Quarantined {
            id: m.id,
            reason: m.reason,
            body: m.body,
            received_at: m.received_at,
        })
        .collect())
}

/// What happened to one attributed delivery for one person.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct DeliveryFacts {
    pub customer_id: String,
    pub delivery_id: String,
    pub send_id: i64,
    /// Delivered, or opened/clicked (which implies it).
    pub delivered: bool,
    /// Opened by a person: a webhook open neither prefetched nor synthetic, a polled open no
    /// webhook contradicts, or a human click (a synthetic open is Customer.io inferring an open
    /// from a click, so it is as human as that click: a link scanner's makes no open).
    pub human_open: bool,
    /// Clicked by a person (not a link scanner).
    pub human_click: bool,
    /// Bounced, failed or dropped.
    pub bounced: bool,
    pub unsubscribed: bool,
    /// The first event of the delivery (unix seconds): its age.
    pub first_at: i64,
    /// The last human open or click (unix seconds), if any.
    pub last_interaction_at: Option<i64>,
}

/// (customer, delivery, metric, prefetched, synthetic, machine, occurred at) of one event.
type EventTime = (
    Option<String>,
    Option<String>,
    String,
    bool,
    bool,
    bool,
    DateTime<Utc>,
);

#[derive(Debug, FromQueryResult)]
struct FactsRow {
    customer_id: String,
    delivery_id: String,
    send_id: i64,
    delivered: i32,
    webhook_human_open: i32,
    webhook_open: i32,
    poll_open: i32,
    webhook_human_click: i32,
    webhook_click: i32,
    poll_click: i32,
    bounced: i32,
    unsubscribed: i32,
}

/// The attributed deliveries of the next `people` people after `after_customer` (in
/// `customer_id` order), grouped per person and delivery. Two statements per page; memory is
/// bounded by the page, not by the number of events.
pub async fn delivery_facts(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    after_customer: &str,
    people: u64,
) -> Result<Vec<DeliveryFacts>, DbError> {
    let customers: Vec<String> = Entity::find()
        .select_only()
        .column(Column::CustomerId)
        .distinct()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::SendId.is_not_null())
        .filter(Column::CustomerId.gt(after_customer))
        .order_by_asc(Column::CustomerId)
        .limit(people)
        .into_tuple::<Option<String>>()
        .all(db)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let Some(last) = customers.last() else {
        return Ok(Vec::new());
    };
    let backend = db.get_database_backend();
    let (p1, p2, p3) = match backend {
        sea_orm::DbBackend::Postgres => ("$1", "$2", "$3"),
        _ => ("?", "?", "?"),
    };
    // Booleans are compared with `= TRUE`-free forms both backends read the same way.
    let sql = format!(
        "SELECT customer_id, delivery_id, send_id, \
         MAX(CASE WHEN metric IN ('delivered','opened','clicked','converted') THEN 1 ELSE 0 END) AS delivered, \
         MAX(CASE WHEN source = 'webhook' AND metric = 'opened' AND NOT prefetched AND NOT synthetic THEN 1 ELSE 0 END) AS webhook_human_open, \
         MAX(CASE WHEN source = 'webhook' AND metric = 'opened' THEN 1 ELSE 0 END) AS webhook_open, \
         MAX(CASE WHEN source = 'poll' AND metric = 'opened' THEN 1 ELSE 0 END) AS poll_open, \
         MAX(CASE WHEN source = 'webhook' AND metric = 'clicked' AND NOT machine THEN 1 ELSE 0 END) AS webhook_human_click, \
         MAX(CASE WHEN source = 'webhook' AND metric = 'clicked' THEN 1 ELSE 0 END) AS webhook_click, \
         MAX(CASE WHEN source = 'poll' AND metric = 'clicked' THEN 1 ELSE 0 END) AS poll_click, \
         MAX(CASE WHEN metric IN ('bounced','failed','dropped','undeliverable') THEN 1 ELSE 0 END) AS bounced, \
         MAX(CASE WHEN metric = 'unsubscribed' THEN 1 ELSE 0 END) AS unsubscribed \
         FROM delivery_events \
         WHERE workspace_id = {p1} AND customer_id > {p2} AND customer_id <= {p3} \
         AND send_id IS NOT NULL AND delivery_id IS NOT NULL \
         GROUP BY customer_id, delivery_id, send_id ORDER BY customer_id, delivery_id"
    );
    let stmt = Statement::from_sql_and_values(
        backend,
        sql,
        [
            workspace_id.into(),
            after_customer.into(),
            last.as_str().into(),
        ],
    );
    let rows = FactsRow::find_by_statement(stmt).all(db).await?;
    // Times are read per page in a second statement (portable: no aggregate over timestamps,
    // which SQLite keeps as text).
    let times: Vec<EventTime> = Entity::find()
        .select_only()
        .column(Column::CustomerId)
        .column(Column::DeliveryId)
        .column(Column::Metric)
        .column(Column::Prefetched)
        .column(Column::Synthetic)
        .column(Column::Machine)
        .column(Column::OccurredAt)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CustomerId.gt(after_customer))
        .filter(Column::CustomerId.lte(last.as_str()))
        .filter(Column::SendId.is_not_null())
        .into_tuple()
        .all(db)
        .await?;
    let mut first: HashMap<(String, String), i64> = HashMap::new();
    let mut last_human: HashMap<(String, String), i64> = HashMap::new();
    for (c, d, metric, prefetched, synthetic, machine, at) in times {
        let (Some(c), Some(d)) = (c, d) else { continue };
        let at = at.timestamp();
        let key = (c, d);
        let f = first.entry(key.clone()).or_insert(at);
        *f = std::cmp::min(*f, at);
        let human =
            (metric == "opened" && !prefetched && !synthetic) || (metric == "clicked" && !machine);
        if human {
            let l = last_human.entry(key).or_insert(at);
            *l = std::cmp::max(*l, at);
        }
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let key = (r.customer_id.clone(), r.delivery_id.clone());
            // A webhook's flags win; a polled metric (no flags) counts when no webhook told.
            let human_click =
                r.webhook_human_click != 0 || (r.poll_click != 0 && r.webhook_click == 0);
            let human_open = human_click
                || r.webhook_human_open != 0
                || (r.poll_open != 0 && r.webhook_open == 0);
            DeliveryFacts {
                first_at: first.get(&key).copied().unwrap_or(0),
                last_interaction_at: last_human.get(&key).copied(),
                customer_id: r.customer_id,
                delivery_id: r.delivery_id,
                send_id: r.send_id,
                delivered: r.delivered != 0,
                human_open,
                human_click,
                bounced: r.bounced != 0,
                unsubscribed: r.unsubscribed != 0,
            }
        })
        .collect())
}

/// The mirrored attributes of these people (missing people are left out).
pub async fn profile_attributes(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    customer_ids: &[&str],
) -> Result<HashMap<String, Map<String, Value>>, DbError> {
    let mut out = HashMap::with_capacity(customer_ids.len());
    for chunk in customer_ids.chunks(CHUNK) {
        let rows: Vec<(String, Value)> = profiles::Entity::find()
            .select_only()
            .column(profiles::Column::CustomerId)
            .column(profiles::Column::Attributes)
            .filter(profiles::Column::WorkspaceId.eq(workspace_id))
            .filter(profiles::Column::CustomerId.is_in(chunk.iter().copied()))
            .into_tuple()
            .all(db)
            .await?;
        for (id, attrs) in rows {
            if let Value::Object(map) = attrs {
                out.insert(id, map);
            }
        }
    }
    Ok(out)
}

/// The `request` JSON of these sends (the normalised SendAssignment), by send id.
pub async fn send_requests(
    db: &impl ConnectionTrait,
    send_ids: &[i64],
) -> Result<HashMap<i64, Value>, DbError> {
    Ok(sends::Entity::find()
        .select_only()
        .column(sends::Column::Id)
        .column(sends::Column::Request)
        .filter(sends::Column::Id.is_in(send_ids.iter().copied()))
        .into_tuple::<(i64, Value)>()
        .all(db)
        .await?
        .into_iter()
        .collect())
}

/// Submissions of recent sends that reached Customer.io (submitted or completed since
/// `since`): what the `delivery-poll` job reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolledSubmission {
    pub submission_id: i64,
    pub broadcast_id: Option<i64>,
    pub newsletter_id: Option<i64>,
    pub submitted_at: DateTime<Utc>,
}

/// See [`PolledSubmission`].
pub async fn recent_submissions(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    since: DateTime<Utc>,
) -> Result<Vec<PolledSubmission>, DbError> {
    let subs = send_submissions::Entity::find()
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(send_submissions::Column::SubmittedAt.gte(db_time(since)))
        .filter(send_submissions::Column::State.is_in(["submitted", "completed"]))
        .order_by_asc(send_submissions::Column::SubmittedAt)
        .limit(1000)
        .all(db)
        .await?;
    let send_ids: BTreeSet<i64> = subs.iter().map(|s| s.send_id).collect();
    let broadcasts: HashMap<i64, Option<i64>> = sends::Entity::find()
        .select_only()
        .column(sends::Column::Id)
        .column(sends::Column::BroadcastId)
        .filter(sends::Column::Id.is_in(send_ids))
        .into_tuple::<(i64, Option<i64>)>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    Ok(subs
        .into_iter()
        .filter_map(|s| {
            Some(PolledSubmission {
                submission_id: s.id,
                broadcast_id: if s.cio_trigger_id.is_some() {
                    broadcasts.get(&s.send_id).copied().flatten()
                } else {
                    None
                },
                newsletter_id: s.cio_newsletter_id,
                submitted_at: s.submitted_at?,
            })
        })
        .collect())
}
