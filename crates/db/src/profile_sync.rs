//! Customer.io → SharpSend profile sync: the sync's state (feed cursor, backfill in progress)
//! and the two ways Customer.io's data enters the profiles mirror.
//!
//! - [`load_snapshot`]: rows of a Customer.io export (a backfill), one chunk per transaction.
//! - [`apply_changes`]: `attribute_change` activities from the feed, in feed order, in ONE
//!   transaction with the new cursor (a crash leaves both as they were).
//!
//! Who wins, per attribute (the one rule, [`customer_io_wins`]): Customer.io's value replaces
//! the mirror's unless SharpSend accepted a write of that attribute for that person that is
//! still undelivered (`pending` or `in_flight` in the outbox) and was accepted in the same
//! second as Customer.io's change or later. A Customer.io value that is empty (`""`) removes
//! the attribute (Customer.io stores no empty attributes). A value equal as text to the
//! mirror's typed value (`80` and `"80"`) leaves the mirror's value alone: Customer.io reports
//! every value as text.
//!
//! Rows are locked (PostgreSQL `FOR UPDATE`, in `customer_id` order) before the outbox is read,
//! so a SharpSend write racing with the sync either committed first (and is seen as pending) or
//! merges on top after the sync commits.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, QueryTrait, TransactionSession, TransactionTrait,
};
use serde_json::{Map, Value};

use crate::DbError;
use crate::database::begin_write;
use crate::entities::{outbox, profiles};
use crate::sql::text_in;
use crate::time::db_time;

/// The state table, private to this module.
mod state {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "profile_sync_state")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub workspace_id: i64,
        pub cursor_id: Option<String>,
        pub cursor_at: Option<i64>,
        pub feed_read_at: Option<DateTimeUtc>,
        pub export_id: Option<i64>,
        pub export_requested_at: Option<DateTimeUtc>,
        pub export_top_id: Option<String>,
        pub export_top_at: Option<i64>,
        pub backfill_loaded: i64,
        pub last_backfill_at: Option<DateTimeUtc>,
        pub updated_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Rows per statement and per snapshot chunk bound (a few values a row, far below the
/// bind-parameter limits).
const CHUNK: usize = 1000;

/// A position in the activity feed: an activity's opaque id and its unix time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPosition {
    pub id: String,
    pub at: i64,
}

/// A backfill under way: its export and the feed position it will leave as the cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillInProgress {
    pub export_id: i64,
    pub requested_at: DateTime<Utc>,
    /// The newest activity when the export was requested (`None`: the feed was empty).
    pub top: Option<FeedPosition>,
    /// Rows loaded so far.
    pub loaded: u64,
}

/// Where a workspace's profile sync stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncState {
    /// Newest activity applied (`None`: none yet).
    pub cursor: Option<FeedPosition>,
    /// When the feed was last read down to the cursor, or a backfill finished (`None`: never
    /// synced).
    pub feed_read_at: Option<DateTime<Utc>>,
    pub backfill: Option<BackfillInProgress>,
    pub last_backfill_at: Option<DateTime<Utc>>,
}

fn position(id: Option<String>, at: Option<i64>) -> Option<FeedPosition> {
    Some(FeedPosition { id: id?, at: at? })
}

/// The workspace's sync state (the default when it never synced).
pub async fn state(db: &impl ConnectionTrait, workspace_id: i64) -> Result<SyncState, DbError> {
    let Some(m) = state::Entity::find_by_id(workspace_id).one(db).await? else {
        return Ok(SyncState::default());
    };
    let backfill = match (m.export_id, m.export_requested_at) {
        (Some(export_id), Some(requested_at)) => Some(BackfillInProgress {
            export_id,
            requested_at,
            top: position(m.export_top_id, m.export_top_at),
            loaded: u64::try_from(m.backfill_loaded).unwrap_or(0),
        }),
        _ => None,
    };
    Ok(SyncState {
        cursor: position(m.cursor_id, m.cursor_at),
        feed_read_at: m.feed_read_at,
        backfill,
        last_backfill_at: m.last_backfill_at,
    })
}

/// Inserts or updates the workspace's state row with `set` (the columns to change).
async fn save(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    mut row: state::ActiveModel,
    columns: &[state::Column],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    row.workspace_id = Set(workspace_id);
    row.updated_at = Set(db_time(now));
    if row.backfill_loaded.is_not_set() {
        row.backfill_loaded = Set(0);
    }
    let mut update: Vec<state::Column> = columns.to_vec();
    update.push(state::Column::UpdatedAt);
    let stmt = state::Entity::insert(row)
        .on_conflict(
            OnConflict::column(state::Column::WorkspaceId)
                .update_columns(update)
                .to_owned(),
        )
        .into_query();
    db.execute(&stmt).await?;
    Ok(())
}

/// Records that a backfill started: its export and the feed position it will leave.
pub async fn start_backfill(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    export_id: i64,
    top: Option<&FeedPosition>,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let row = state::ActiveModel {
        export_id: Set(Some(export_id)),
        export_requested_at: Set(Some(db_time(now))),
        export_top_id: Set(top.map(|p| p.id.clone())),
        export_top_at: Set(top.map(|p| p.at)),
        backfill_loaded: Set(0),
        ..Default::default()
    };
    use state::Column as C;
    save(
        db,
        workspace_id,
        row,
        &[
            C::ExportId,
            C::ExportRequestedAt,
            C::ExportTopId,
            C::ExportTopAt,
            C::BackfillLoaded,
        ],
        now,
    )
    .await?;
    Ok(())
}

/// Records how many rows of the backfill are loaded (progress).
pub async fn record_backfill_progress(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    loaded: u64,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let row = state::ActiveModel {
        backfill_loaded: Set(i64::try_from(loaded).unwrap_or(i64::MAX)),
        ..Default::default()
    };
    save(db, workspace_id, row, &[state::Column::BackfillLoaded], now).await?;
    Ok(())
}

/// Drops the backfill under way (its export failed or vanished); the next run starts another.
pub async fn abandon_backfill(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    use state::Column as C;
    let row = state::ActiveModel {
        export_id: Set(None),
        export_requested_at: Set(None),
        export_top_id: Set(None),
        export_top_at: Set(None),
        ..Default::default()
    };
    save(
        db,
        workspace_id,
        row,
        &[
            C::ExportId,
            C::ExportRequestedAt,
            C::ExportTopId,
            C::ExportTopAt,
        ],
        now,
    )
    .await?;
    Ok(())
}

/// Ends the backfill: its feed position becomes the cursor (the feed is followed from there),
/// read as of when the export was requested.
pub async fn finish_backfill(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    backfill: &BackfillInProgress,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    use state::Column as C;
    let row = state::ActiveModel {
        cursor_id: Set(backfill.top.as_ref().map(|p| p.id.clone())),
        cursor_at: Set(backfill.top.as_ref().map(|p| p.at)),
        feed_read_at: Set(Some(db_time(backfill.requested_at))),
        export_id: Set(None),
        export_requested_at: Set(None),
        export_top_id: Set(None),
        export_top_at: Set(None),
        last_backfill_at: Set(Some(db_time(now))),
        ..Default::default()
    };
    save(
        db,
        workspace_id,
        row,
        &[
            C::CursorId,
            C::CursorAt,
            C::FeedReadAt,
            C::ExportId,
            C::ExportRequestedAt,
            C::ExportTopId,
            C::ExportTopAt,
            C::LastBackfillAt,
        ],
        now,
    )
    .await?;
    Ok(())
}

/// Whether Customer.io's value of an attribute, changed at `changed_at`, replaces the mirror's,
/// given when SharpSend accepted its newest undelivered write of that attribute (if any).
/// Customer.io's times are whole seconds: a write accepted in the same second counts as newer.
pub fn customer_io_wins(pending_since: Option<DateTime<Utc>>, changed_at: DateTime<Utc>) -> bool {
    match pending_since {
        None => true,
        Some(accepted) => accepted.timestamp() < changed_at.timestamp(),
    }
}

/// Whether `text` (Customer.io's text form of a value) is what `value` holds.
fn same_text(value: &Value, text: &str) -> bool {
    match value {
        Value::String(s) => s == text,
        Value::Null => text.is_empty(),
        // JSON text of a number, boolean, array or object (not `Value == str`, which only
        // matches strings).
        other => serde_json::to_string(other).is_ok_and(|json| json == text),
    }
}

/// Sets (or, for `""`, removes) `key` to Customer.io's `text`; `true` if the map changed.
fn set_text(attributes: &mut Map<String, Value>, key: &str, text: &str) -> bool {
    match attributes.get(key) {
        Some(current) if same_text(current, text) => false,
        None if text.is_empty() => false,
        _ if text.is_empty() => attributes.remove(key).is_some(),
        _ => {
            attributes.insert(key.to_owned(), Value::String(text.to_owned()));
            true
        }
    }
}

/// Per person, per attribute: when the newest undelivered SharpSend write was accepted.
type Pending = HashMap<String, HashMap<String, DateTime<Utc>>>;

/// Undelivered attribute writes (`identify` rows `pending` or `in_flight`) of `customer_ids`.
async fn pending_writes(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    customer_ids: &[&str],
) -> Result<Pending, DbErr> {
    let backend = txn.get_database_backend();
    let rows: Vec<(String, Value, DateTime<Utc>)> = outbox::Entity::find()
        .select_only()
        .column(outbox::Column::CustomerId)
        .column(outbox::Column::Payload)
        .column(outbox::Column::CreatedAt)
        .filter(outbox::Column::WorkspaceId.eq(workspace_id))
        .filter(outbox::Column::Kind.eq(crate::outbox::Kind::Identify.as_str()))
        .filter(outbox::Column::Status.is_in([
            crate::outbox::Status::Pending.as_str(),
            crate::outbox::Status::InFlight.as_str(),
        ]))
        .filter(text_in(backend, outbox::Column::CustomerId, customer_ids))
        .into_tuple()
        .all(txn)
        .await?;
    let mut pending: Pending = HashMap::new();
    for (customer_id, payload, created_at) in rows {
        let Value::Object(attributes) = payload else {
            continue;
        };
        let person = pending.entry(customer_id).or_default();
        for key in attributes.keys() {
            let at = person.entry(key.clone()).or_insert(created_at);
            *at = (*at).max(created_at);
        }
    }
    Ok(pending)
}

/// A person's row as the sync reads and rewrites it.
struct Current {
    email: Option<String>,
    cio_id: Option<String>,
    attributes: Map<String, Value>,
}

/// The existing profiles among `customer_ids` (sorted), locked until commit on PostgreSQL.
async fn lock_profiles(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    customer_ids: &[&str],
) -> Result<HashMap<String, Current>, DbErr> {
    let backend = txn.get_database_backend();
    let mut query = profiles::Entity::find()
        .select_only()
        .column(profiles::Column::CustomerId)
        .column(profiles::Column::Email)
        .column(profiles::Column::CioId)
        .column(profiles::Column::Attributes)
        .filter(profiles::Column::WorkspaceId.eq(workspace_id))
        .filter(text_in(backend, profiles::Column::CustomerId, customer_ids))
        .order_by_asc(profiles::Column::CustomerId);
    if backend == sea_orm::DbBackend::Postgres {
        query = query.lock_exclusive();
    }
    let rows: Vec<(String, Option<String>, Option<String>, Value)> =
        query.into_tuple().all(txn).await?;
    Ok(rows
        .into_iter()
        .map(|(id, email, cio_id, attributes)| {
            let attributes = match attributes {
                Value::Object(map) => map,
                _ => Map::new(),
            };
            (
                id,
                Current {
                    email,
                    cio_id,
                    attributes,
                },
            )
        })
        .collect())
}

/// One row as [`write_back`] sends it: an element of the statement's JSON array.
#[derive(serde::Serialize)]
struct RowOut<'a> {
    customer_id: &'a str,
    email: Option<&'a str>,
    email_lower: Option<String>,
    cio_id: Option<&'a str>,
    attributes: &'a Map<String, Value>,
}

/// Writes changed (or new) rows back, `fetched_at` set when `fetched` (a snapshot's rows).
///
/// Up to [`CHUNK`] rows a statement, bound as ONE JSON array parameter that the database
/// unpacks (`jsonb_to_recordset` / `json_each`): a 1,000-row multi-`VALUES` insert binds
/// 10,000 parameters, and encoding and parsing those cost more than writing the rows.
async fn write_back(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    rows: Vec<(String, Current)>,
    now: DateTime<Utc>,
    fetched: bool,
) -> Result<(), DbErr> {
    let backend = txn.get_database_backend();
    let set_fetched = if fetched {
        ", fetched_at = excluded.fetched_at"
    } else {
        ""
    };
    // PostgreSQL: the proposed row's `numbers` (computed from its attributes by the insert
    // trigger, migration 000096) is the updated row's too; without it the update trigger would
    // compute them a second time. SQLite's triggers run after the write either way.
    let set_numbers = if backend == sea_orm::DbBackend::Postgres {
        ", numbers = excluded.numbers"
    } else {
        ""
    };
    let on_conflict = format!(
        "ON CONFLICT (workspace_id, customer_id) DO UPDATE SET email = excluded.email, \
         email_lower = excluded.email_lower, cio_id = excluded.cio_id, \
         attributes = excluded.attributes, updated_at = excluded.updated_at{set_numbers}{set_fetched}"
    );
    let columns = "INSERT INTO profiles (workspace_id, updated_at, fetched_at, customer_id, \
                   email, email_lower, cio_id, attributes)";
    let sql = match backend {
        sea_orm::DbBackend::Postgres => format!(
            "{columns} SELECT $1, $2, $3, r.customer_id, r.email, r.email_lower, r.cio_id, \
             r.attributes FROM jsonb_to_recordset($4::jsonb) AS r(customer_id text, \
             email text, email_lower text, cio_id text, attributes jsonb) {on_conflict}"
        ),
        // `WHERE true`: without it SQLite would read `ON CONFLICT` as a join constraint.
        _ => format!(
            "{columns} SELECT ?, ?, ?, json_extract(value, '$.customer_id'), \
             json_extract(value, '$.email'), json_extract(value, '$.email_lower'), \
             json_extract(value, '$.cio_id'), json_extract(value, '$.attributes') \
             FROM json_each(?) WHERE true {on_conflict}"
        ),
    };
    for chunk in rows.chunks(CHUNK) {
        let out: Vec<RowOut<'_>> = chunk
            .iter()
            .map(|(customer_id, c)| RowOut {
                customer_id,
                email: c.email.as_deref(),
                email_lower: c.email.as_deref().map(str::to_lowercase),
                cio_id: c.cio_id.as_deref(),
                attributes: &c.attributes,
            })
            .collect();
        let json = serde_json::to_string(&out).map_err(|e| DbErr::Custom(e.to_string()))?;
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            backend,
            sql.as_str(),
            [
                sea_orm::Value::from(workspace_id),
                sea_orm::Value::from(now),
                sea_orm::Value::from(fetched.then_some(now)),
                sea_orm::Value::from(json),
            ],
        ))
        .await?;
    }
    Ok(())
}

/// One person of a Customer.io export: identifiers and the requested attributes as text
/// (`""`: the person has no such attribute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRow {
    pub customer_id: String,
    pub email: Option<String>,
    pub cio_id: Option<String>,
    pub attributes: Vec<(String, String)>,
}

/// What loading rows or changes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadCounts {
    /// Rows (people) or changes read.
    pub read: u64,
    /// Profiles created.
    pub created: u64,
    /// Profiles whose row changed (created ones included).
    pub changed: u64,
    /// Attribute values kept because an undelivered SharpSend write of them is newer.
    pub kept_pending: u64,
    /// Names of the attributes that changed for some profile.
    pub changed_attributes: BTreeSet<String>,
}

impl LoadCounts {
    pub fn absorb(&mut self, other: LoadCounts) {
        self.read += other.read;
        self.created += other.created;
        self.changed += other.changed;
        self.kept_pending += other.kept_pending;
        self.changed_attributes.extend(other.changed_attributes);
    }
}

/// Loads one chunk of an export taken at `taken_at` (when it was requested) into the mirror,
/// in one transaction: the requested attributes (and email, `cio_id`) are set to Customer.io's
/// values under the who-wins rule; attributes not in the export are left alone. Unchanged
/// profiles are not rewritten. A `customer_id` listed twice: the last row wins.
pub async fn load_snapshot(
    db: &impl TransactionTrait,
    workspace_id: i64,
    rows: &[SnapshotRow],
    taken_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<LoadCounts, DbError> {
    let mut counts = LoadCounts {
        read: rows.len() as u64,
        ..LoadCounts::default()
    };
    if rows.is_empty() {
        return Ok(counts);
    }
    let now = db_time(now);
    let latest: BTreeMap<&str, &SnapshotRow> =
        rows.iter().map(|r| (r.customer_id.as_str(), r)).collect();
    let ids: Vec<&str> = latest.keys().copied().collect();
    let txn = begin_write(db).await?;
    let mut current = lock_profiles(&txn, workspace_id, &ids).await?;
    let pending = pending_writes(&txn, workspace_id, &ids).await?;
    let mut changed_rows = Vec::new();
    for (id, row) in latest {
        let mut person = current.remove(id);
        let created = person.is_none();
        let person = person.get_or_insert_with(|| Current {
            email: None,
            cio_id: None,
            attributes: Map::new(),
        });
        let pending_of = pending.get(id);
        let wins =
            |key: &str| customer_io_wins(pending_of.and_then(|p| p.get(key)).copied(), taken_at);
        let mut changed = created;
        if person.cio_id != row.cio_id && row.cio_id.is_some() {
            person.cio_id = row.cio_id.clone();
            changed = true;
        }
        let email = row.email.as_deref().unwrap_or("");
        let values = std::iter::once(("email", email))
            .chain(row.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (key, text) in values {
            if !wins(key) {
                if !person
                    .attributes
                    .get(key)
                    .is_some_and(|v| same_text(v, text))
                {
                    counts.kept_pending += 1;
                }
                continue;
            }
            if set_text(&mut person.attributes, key, text) {
                changed = true;
                counts.changed_attributes.insert(key.to_owned());
                if key == "email" {
                    person.email = row.email.clone();
                }
            }
        }
        if changed {
            counts.changed += 1;
            counts.created += u64::from(created);
            changed_rows.push((id.to_owned(), current_take(person)));
        }
    }
    write_back(&txn, workspace_id, changed_rows, now, true).await?;
    txn.commit().await?;
    Ok(counts)
}

fn current_take(person: &mut Current) -> Current {
    Current {
        email: person.email.take(),
        cio_id: person.cio_id.take(),
        attributes: std::mem::take(&mut person.attributes),
    }
}

/// One `attribute_change` activity: `attribute` of `customer_id` became `value` (text; `""`:
/// removed) at `changed_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedChange {
    pub customer_id: String,
    pub attribute: String,
    pub value: String,
    pub changed_at: DateTime<Utc>,
}

/// Applies feed changes, oldest first, and moves the cursor to `cursor` (read at `now`), all in
/// ONE transaction: after a crash either everything or nothing of it is in the database, so a
/// rerun reads the same changes again and applies them once, in order. Missing profiles are
/// created (new people). `email` also sets the email column; `id` is not an attribute (it is
/// the person's key) and is skipped.
pub async fn apply_changes(
    db: &impl TransactionTrait,
    workspace_id: i64,
    changes: &[FeedChange],
    cursor: Option<&FeedPosition>,
    now: DateTime<Utc>,
) -> Result<LoadCounts, DbError> {
    let now = db_time(now);
    let mut counts = LoadCounts {
        read: changes.len() as u64,
        ..LoadCounts::default()
    };
    let ids: BTreeSet<&str> = changes.iter().map(|c| c.customer_id.as_str()).collect();
    let ids: Vec<&str> = ids.into_iter().collect();
    let txn = begin_write(db).await?;
    let mut people: BTreeMap<String, (bool, bool, Current)> = BTreeMap::new();
    for chunk in ids.chunks(CHUNK) {
        let mut current = lock_profiles(&txn, workspace_id, chunk).await?;
        let pending = pending_writes(&txn, workspace_id, chunk).await?;
        let chunk_changes = changes
            .iter()
            .filter(|c| chunk.binary_search(&c.customer_id.as_str()).is_ok());
        for change in chunk_changes {
            if change.attribute == "id" {
                continue;
            }
            let entry = people.entry(change.customer_id.clone()).or_insert_with(|| {
                match current.remove(&change.customer_id) {
                    Some(c) => (false, false, c),
                    None => (
                        true,
                        true,
                        Current {
                            email: None,
                            cio_id: None,
                            attributes: Map::new(),
                        },
                    ),
                }
            });
            let pending_since = pending
                .get(&change.customer_id)
                .and_then(|p| p.get(&change.attribute))
                .copied();
            if !customer_io_wins(pending_since, change.changed_at) {
                counts.kept_pending += 1;
                continue;
            }
            let (_, changed, person) = entry;
            if set_text(&mut person.attributes, &change.attribute, &change.value) {
                *changed = true;
                counts.changed_attributes.insert(change.attribute.clone());
                if change.attribute == "email" {
                    person.email = (!change.value.is_empty()).then(|| change.value.clone());
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (id, (created, changed, person)) in people {
        if changed {
            counts.changed += 1;
            counts.created += u64::from(created);
            rows.push((id, person));
        }
    }
    write_back(&txn, workspace_id, rows, now, false).await?;
    let row = state::ActiveModel {
        cursor_id: Set(cursor.map(|p| p.id.clone())),
        cursor_at: Set(cursor.map(|p| p.at)),
        feed_read_at: Set(Some(now)),
        ..Default::default()
    };
    let mut columns = vec![state::Column::FeedReadAt];
    if cursor.is_some() {
        columns.extend([state::Column::CursorId, state::Column::CursorAt]);
    }
    save(&txn, workspace_id, row, &columns, now).await?;
    txn.commit().await?;
    Ok(counts)
}

/// Names of the attributes held by the workspace's profiles (for a backfill that was given no
/// attribute list).
pub async fn known_attributes(
    db: &impl ConnectionTrait,
    workspace_id: i64,
) -> Result<Vec<String>, DbError> {
    let sql = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => {
            "SELECT DISTINCT jsonb_object_keys(attributes) AS name FROM profiles \
             WHERE workspace_id = $1 ORDER BY 1"
        }
        _ => {
            "SELECT DISTINCT j.key AS name FROM profiles, json_each(profiles.attributes) AS j \
             WHERE profiles.workspace_id = ? ORDER BY 1"
        }
    };
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [workspace_id.into()],
        ))
        .await?;
    let mut names = Vec::with_capacity(rows.len());
    for row in rows {
        names.push(row.try_get::<String>("", "name")?);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;
    use serde_json::json;

    use super::*;

    #[test]
    fn an_undelivered_write_wins_unless_customer_io_changed_later() {
        let at = |s: i64| Utc.timestamp_opt(s, 0).single().unwrap_or_default();
        let changed = at(1_000);
        assert!(customer_io_wins(None, changed));
        assert!(customer_io_wins(Some(at(999)), changed));
        // Customer.io has whole seconds: the same second counts as older than the write.
        let same_second = at(1_000) + chrono::TimeDelta::milliseconds(300);
        assert!(!customer_io_wins(Some(same_second), changed));
        assert!(!customer_io_wins(Some(at(1_001)), changed));
    }

    #[test]
    fn text_values_keep_typed_equals_and_empty_removes() {
        let mut attributes = Map::new();
        attributes.insert("score".into(), json!(80));
        attributes.insert("plan".into(), json!("pro"));
        assert!(!set_text(&mut attributes, "score", "80"));
        assert_eq!(attributes["score"], json!(80));
        assert!(set_text(&mut attributes, "score", "81"));
        assert_eq!(attributes["score"], json!("81"));
        assert!(set_text(&mut attributes, "plan", ""));
        assert!(!attributes.contains_key("plan"));
        assert!(!set_text(&mut attributes, "absent", ""));
        assert!(set_text(&mut attributes, "flag", "true"));
        assert!(!set_text(&mut attributes, "flag", "true"));
    }
}
