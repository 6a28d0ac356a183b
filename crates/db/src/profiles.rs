//! The profiles mirror: Customer.io people of a workspace, as last imported from Customer.io
//! with every write accepted since merged in.
//!
//! [`upsert_fetched`] writes what Customer.io holds (an import or a fresh read); [`get`] reads a
//! profile by `id`, email (case-insensitive) or `cio_id`. Attribute writes go through
//! [`crate::outbox::accept_attribute_updates`], which merges them here and queues them for
//! delivery in the same transaction.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QueryTrait, Statement, TransactionSession, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::DbError;
use crate::database::begin_write;
use crate::entities::profiles::{ActiveModel, Column, Entity, Model};
use crate::time::db_time;

/// Rows per multi-row statement: at most 10 values a row, well under both backends'
/// bind-parameter limits (SQLite: 32,766).
const CHUNK: usize = 500;

/// The attribute whose value is also kept in the `email` column (for lookup by email).
const EMAIL_ATTRIBUTE: &str = "email";

/// A segment Customer.io reports a person to be in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSegment {
    /// Customer.io's segment id.
    pub id: i64,
    pub name: String,
}

/// A mirrored person, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub workspace_id: i64,
    /// Customer.io `id` identifier.
    pub customer_id: String,
    pub email: Option<String>,
    /// Customer.io's own id of the person, once an import has seen it.
    pub cio_id: Option<String>,
    pub attributes: Map<String, Value>,
    /// Segments as last fetched from Customer.io; `None` if never fetched.
    pub cio_segments: Option<Vec<ProfileSegment>>,
    /// When the row last changed (import or accepted attribute update).
    pub updated_at: DateTime<Utc>,
    /// When the row was last written from Customer.io's data ([`upsert_fetched`]).
    pub fetched_at: Option<DateTime<Utc>>,
}

impl TryFrom<Model> for Profile {
    type Error = DbErr;

    fn try_from(m: Model) -> Result<Self, DbErr> {
        let attributes = match m.attributes {
            Value::Object(map) => map,
            _ => {
                return Err(DbErr::Type(
                    "profile attributes are not a JSON object".into(),
                ));
            }
        };
        let cio_segments = match m.cio_segments {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v).map_err(|e| DbErr::Json(e.to_string()))?),
        };
        Ok(Self {
            workspace_id: m.workspace_id,
            customer_id: m.customer_id,
            email: m.email,
            cio_id: m.cio_id,
            attributes,
            cio_segments,
            updated_at: m.updated_at,
            fetched_at: m.fetched_at,
        })
    }
}

/// How to find a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// By Customer.io `id` identifier (exact).
    Id(&'a str),
    /// By email, case-insensitively (Unicode lowercase).
    Email(&'a str),
    /// By Customer.io's `cio_id` (exact).
    CioId(&'a str),
}

/// One person as read from Customer.io.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchedProfile {
    pub customer_id: String,
    pub email: Option<String>,
    pub cio_id: Option<String>,
    pub attributes: Map<String, Value>,
    pub cio_segments: Option<Vec<ProfileSegment>>,
}

/// The profile of a workspace matching `lookup`, if any. Email and `cio_id` are not unique:
/// if several profiles match, the one with the smallest `customer_id` is returned.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    lookup: Lookup<'_>,
) -> Result<Option<Profile>, DbError> {
    let query = Entity::find().filter(Column::WorkspaceId.eq(workspace_id));
    let query = match lookup {
        Lookup::Id(id) => query.filter(Column::CustomerId.eq(id)),
        Lookup::Email(email) => query.filter(Column::EmailLower.eq(email.to_lowercase())),
        Lookup::CioId(cio_id) => query.filter(Column::CioId.eq(cio_id)),
    };
    let found = query.order_by_asc(Column::CustomerId).one(db).await?;
    Ok(found.map(Profile::try_from).transpose()?)
}

/// Writes people as read from Customer.io (an import, or a fresh read of one person), in one
/// transaction: creates missing profiles; for existing ones replaces email, `cio_id`,
/// attributes and segments with what Customer.io holds. `fetched_at` and `updated_at` become
/// `fetched_at`. Returns how many profiles were written.
///
/// If `fetched` lists a `customer_id` twice, the last entry wins. Multi-row upserts of 500
/// rows: one statement per 500 people.
///
/// Caveat: attribute updates accepted but not yet delivered when Customer.io was read are not
/// in what it returned, so the replace drops them from the mirror (not from the outbox: they
/// are still delivered) until an import made after their delivery.
pub async fn upsert_fetched(
    db: &impl TransactionTrait,
    workspace_id: i64,
    fetched: &[FetchedProfile],
    fetched_at: DateTime<Utc>,
) -> Result<u64, DbError> {
    if fetched.is_empty() {
        return Ok(0);
    }
    let fetched_at = db_time(fetched_at);
    // Last entry per customer_id wins; sorted, so that concurrent writers lock rows in the
    // same order.
    let latest: BTreeMap<&str, &FetchedProfile> = fetched
        .iter()
        .map(|f| (f.customer_id.as_str(), f))
        .collect();
    let rows: Vec<ActiveModel> = latest
        .values()
        .map(|f| ActiveModel {
            id: NotSet,
            workspace_id: Set(workspace_id),
            customer_id: Set(f.customer_id.clone()),
            email: Set(f.email.clone()),
            email_lower: Set(f.email.as_deref().map(str::to_lowercase)),
            cio_id: Set(f.cio_id.clone()),
            attributes: Set(Value::Object(f.attributes.clone())),
            cio_segments: Set(f.cio_segments.as_deref().map(segments_json)),
            updated_at: Set(fetched_at),
            fetched_at: Set(Some(fetched_at)),
        })
        .collect();
    let on_conflict = OnConflict::columns([Column::WorkspaceId, Column::CustomerId])
        .update_columns([
            Column::Email,
            Column::EmailLower,
            Column::CioId,
            Column::Attributes,
            Column::CioSegments,
            Column::UpdatedAt,
            Column::FetchedAt,
        ])
        .to_owned();

    let txn = begin_write(db).await?;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<ActiveModel> = rows.by_ref().take(CHUNK).collect();
        let stmt = Entity::insert_many(chunk)
            .on_conflict(on_conflict.clone())
            .into_query();
        txn.execute(&stmt).await?;
    }
    txn.commit().await?;
    let written = latest.len() as u64;
    tracing::debug!(workspace_id, written, "fetched profiles upserted");
    Ok(written)
}

/// `[{"id": …, "name": …}, …]`.
fn segments_json(segments: &[ProfileSegment]) -> Value {
    Value::Array(
        segments
            .iter()
            .map(|s| serde_json::json!({ "id": s.id, "name": s.name }))
            .collect(),
    )
}

/// Creates the profiles among `customer_ids` that do not exist yet (empty attributes,
/// `updated_at = now`); leaves existing ones untouched. `customer_ids` must be sorted and
/// distinct: concurrent transactions then wait for each other's new rows in the same order.
pub(crate) async fn ensure_exist(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    customer_ids: &[&str],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(pg_insert_missing(workspace_id, customer_ids, now, false))
            .await?;
        return Ok(());
    }
    for chunk in customer_ids.chunks(CHUNK) {
        let rows = chunk.iter().map(|id| new_profile(workspace_id, id, now));
        let stmt = Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([Column::WorkspaceId, Column::CustomerId])
                    .do_nothing()
                    .to_owned(),
            )
            .into_query();
        txn.execute(&stmt).await?;
    }
    Ok(())
}

/// Merges attribute updates into the profiles, in order (a later update of the same attribute
/// wins; a `null` value removes the attribute), creating missing profiles. An update that sets
/// `email` also sets the `email` column (to `None` if the value is not a string). Must run in a
/// write transaction.
///
/// Two statements per [`CHUNK`] people, both multi-row upserts in `customer_id` order:
/// 1. `INSERT … ON CONFLICT DO UPDATE SET updated_at … RETURNING *` creates missing profiles
///    and returns every row current — locked until commit on PostgreSQL (waiting for a
///    concurrent merge of the same person to commit first), so that concurrent merges do not
///    lose each other's attributes; SQLite runs one write transaction at a time anyway;
/// 2. the merged attributes are written back with `ON CONFLICT DO UPDATE`.
pub(crate) async fn merge_attributes(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    updates: &[(&str, &Map<String, Value>)],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let mut per_person: BTreeMap<&str, Vec<&Map<String, Value>>> = BTreeMap::new();
    for (customer_id, attributes) in updates {
        per_person.entry(customer_id).or_default().push(attributes);
    }
    let customer_ids: Vec<&str> = per_person.keys().copied().collect();
    if txn.get_database_backend() == DbBackend::Postgres {
        return pg_merge_attributes(txn, workspace_id, &per_person, &customer_ids, now).await;
    }
    let key = [Column::WorkspaceId, Column::CustomerId];
    let lock = OnConflict::columns(key)
        .update_column(Column::UpdatedAt)
        .to_owned();
    let write_back = OnConflict::columns(key)
        .update_columns([
            Column::Email,
            Column::EmailLower,
            Column::Attributes,
            Column::UpdatedAt,
        ])
        .to_owned();

    for chunk in customer_ids.chunks(CHUNK) {
        let mut stmt =
            Entity::insert_many(chunk.iter().map(|id| new_profile(workspace_id, id, now)))
                .on_conflict(lock.clone())
                .into_query();
        stmt.returning_all();
        let mut current: HashMap<String, Model> = HashMap::with_capacity(chunk.len());
        for row in txn.query_all(&stmt).await? {
            let model = Model::from_query_result(&row, "")?;
            current.insert(model.customer_id.clone(), model);
        }

        let mut merged = Vec::with_capacity(chunk.len());
        for customer_id in chunk {
            let model = current
                .remove(*customer_id)
                .ok_or_else(|| DbErr::RecordNotFound(format!("profile {customer_id}")))?;
            let (attributes, email) = merge_one(
                model.attributes,
                model.email,
                per_person.get(customer_id).into_iter().flatten(),
            );
            merged.push(ActiveModel {
                id: NotSet,
                workspace_id: Set(workspace_id),
                customer_id: Set((*customer_id).to_owned()),
                email_lower: Set(email.as_deref().map(str::to_lowercase)),
                email: Set(email),
                cio_id: NotSet,
                attributes: Set(Value::Object(attributes)),
                cio_segments: NotSet,
                updated_at: Set(now),
                fetched_at: NotSet,
            });
        }
        let stmt = Entity::insert_many(merged)
            .on_conflict(write_back.clone())
            .into_query();
        txn.execute(&stmt).await?;
    }
    Ok(())
}

/// One person's merge: `updates` applied in order to the stored attributes and email.
fn merge_one<'a>(
    stored: Value,
    mut email: Option<String>,
    updates: impl Iterator<Item = &'a &'a Map<String, Value>>,
) -> (Map<String, Value>, Option<String>) {
    let mut attributes = match stored {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for update in updates {
        for (key, value) in update.iter() {
            if key == EMAIL_ATTRIBUTE {
                email = value.as_str().map(str::to_owned);
            }
            if value.is_null() {
                attributes.remove(key);
            } else {
                attributes.insert(key.clone(), value.clone());
            }
        }
    }
    (attributes, email)
}

/// PostgreSQL: inserts the missing profiles among `customer_ids` (sorted, distinct) in that
/// order, in ONE statement whatever their number: the ids are bound as one JSON array, so the
/// statement text never changes (prepared once per connection, planned trivially). With
/// `lock`, existing rows are touched (`updated_at`) too, which locks them until commit, and
/// every row's `customer_id`, `email` and `attributes` are returned.
fn pg_insert_missing(
    workspace_id: i64,
    customer_ids: &[&str],
    now: DateTime<Utc>,
    lock: bool,
) -> Statement {
    let conflict = if lock {
        "DO UPDATE SET updated_at = EXCLUDED.updated_at RETURNING customer_id, email, attributes"
    } else {
        "DO NOTHING"
    };
    Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "INSERT INTO profiles (workspace_id, customer_id, attributes, updated_at) \
             SELECT $1, c.id, '{{}}'::jsonb, $2 \
             FROM jsonb_array_elements_text($3) WITH ORDINALITY AS c(id, n) ORDER BY c.n \
             ON CONFLICT (workspace_id, customer_id) {conflict}"
        ),
        [
            workspace_id.into(),
            now.into(),
            Value::from(customer_ids.to_vec()).into(),
        ],
    )
}

/// PostgreSQL [`merge_attributes`]: two statements whatever the number of people (lock and read
/// every row, then write every merged row back), each binding its rows as one JSON array.
async fn pg_merge_attributes(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    per_person: &BTreeMap<&str, Vec<&Map<String, Value>>>,
    customer_ids: &[&str],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let rows = txn
        .query_all_raw(pg_insert_missing(workspace_id, customer_ids, now, true))
        .await?;
    let mut merged = Vec::with_capacity(rows.len());
    for row in rows {
        let customer_id: String = row.try_get("", "customer_id")?;
        let stored: Value = row.try_get("", "attributes")?;
        let email: Option<String> = row.try_get("", "email")?;
        let updates = per_person
            .get(customer_id.as_str())
            .ok_or_else(|| DbErr::RecordNotFound(format!("profile {customer_id}")))?;
        let (attributes, email) = merge_one(stored, email, updates.iter());
        merged.push(serde_json::json!({
            "c": customer_id,
            "e": email,
            "l": email.as_deref().map(str::to_lowercase),
            "a": attributes,
        }));
    }
    if merged.len() != customer_ids.len() {
        return Err(DbErr::RecordNotFound(format!(
            "{} of {} profiles",
            merged.len(),
            customer_ids.len()
        )));
    }
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE profiles AS p SET email = r.v->>'e', email_lower = r.v->>'l', \
         attributes = r.v->'a', updated_at = $2 \
         FROM jsonb_array_elements($3) AS r(v) \
         WHERE p.workspace_id = $1 AND p.customer_id = r.v->>'c'",
        [workspace_id.into(), now.into(), Value::Array(merged).into()],
    ))
    .await?;
    Ok(())
}

/// A profile row with nothing known but its id.
fn new_profile(workspace_id: i64, customer_id: &str, now: DateTime<Utc>) -> ActiveModel {
    ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        customer_id: Set(customer_id.to_owned()),
        email: Set(None),
        email_lower: Set(None),
        cio_id: Set(None),
        attributes: Set(Value::Object(Map::new())),
        cio_segments: Set(None),
        updated_at: Set(now),
        fetched_at: Set(None),
    }
}
