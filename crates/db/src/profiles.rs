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
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QueryTrait, Statement, TransactionSession, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::DbError;
use crate::database::begin_write;
use crate::entities::profiles::{ActiveModel, Column, Entity, Model};
use crate::sql::text_in;
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
        txn.execute_raw(pg_insert_missing(workspace_id, customer_ids, now))
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

/// SQLite: merges attribute updates into the profiles, in order (a later update of the same
/// attribute wins; a `null` value removes the attribute), creating missing profiles. An update
/// that sets `email` also sets the `email` column (to `None` if the value is not a string). Must
/// run in a write transaction (SQLite runs one at a time). PostgreSQL merges in the database
/// instead: [`PG_MERGE_CTE`].
///
/// Two statements per [`CHUNK`] people, in `customer_id` order: the existing rows are read (the
/// write transaction holds SQLite's only write lock, so nothing changes them meanwhile), then
/// the merged rows are written with ONE multi-row upsert — each person's row written once, so
/// the change log (`profile_changes`) gets one row per person, not two.
pub(crate) async fn merge_attributes(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    updates: &[(&str, &Map<String, Value>)],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let per_person = per_person(updates);
    let customer_ids: Vec<&str> = per_person.keys().copied().collect();
    let key = [Column::WorkspaceId, Column::CustomerId];
    let write_back = OnConflict::columns(key)
        .update_columns([
            Column::Email,
            Column::EmailLower,
            Column::Attributes,
            Column::UpdatedAt,
        ])
        .to_owned();

    for chunk in customer_ids.chunks(CHUNK) {
        let mut current: HashMap<String, Model> = HashMap::with_capacity(chunk.len());
        let rows = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace_id))
            .filter(text_in(DbBackend::Sqlite, Column::CustomerId, chunk))
            .all(txn)
            .await?;
        for model in rows {
            current.insert(model.customer_id.clone(), model);
        }

        let mut merged = Vec::with_capacity(chunk.len());
        for customer_id in chunk {
            let (stored, stored_email) = match current.remove(*customer_id) {
                Some(model) => (model.attributes, model.email),
                None => (Value::Object(Map::new()), None),
            };
            let (attributes, email) = merge_one(
                stored,
                stored_email,
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
/// statement text never changes (prepared once per connection, planned trivially).
fn pg_insert_missing(workspace_id: i64, customer_ids: &[&str], now: DateTime<Utc>) -> Statement {
    Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO profiles (workspace_id, customer_id, attributes, numbers, updated_at) \
         SELECT $1, c.id, '{}'::jsonb, '{}'::jsonb, $2 \
         FROM jsonb_array_elements_text($3) WITH ORDINALITY AS c(id, n) ORDER BY c.n \
         ON CONFLICT (workspace_id, customer_id) DO NOTHING",
        [
            workspace_id.into(),
            now.into(),
            Value::from(customer_ids.to_vec()).into(),
        ],
    )
}

/// PostgreSQL, the profile half of accepting attribute updates: a data-modifying CTE named
/// `merged` that merges every person's patch ([`pg_merge_input`], bound as `$3`, text of a JSON
/// array; `$1` the workspace, `$2` now) into the profiles mirror in ONE upsert, in the input's
/// (`customer_id`) order, returning `id`, `inserted` and the new `attributes` of every row.
///
/// The merge happens in the database, on the row version current when the row is locked:
/// `ON CONFLICT DO UPDATE` locks each existing row (waiting for a concurrent merge of the same
/// person to commit, then merging onto ITS result), so concurrent merges lose nothing, and the
/// rows are not first read back into the application and written again (the former
/// read-modify-write took three statements, two row versions per person and a round trip of
/// every row's attributes). Attributes: `stored - <keys whose last value is null> || <the other
/// keys' last values>`; `email` / `email_lower` change only if the patch holds `email`.
/// `numbers` (the shadow, migration 000096) follows from the patch alone: the stored numbers
/// without the patch's keys, plus `sharpsend_numbers` of the patch — computed once, for the
/// proposed row, over a few keys rather than over the whole profile twice.
///
/// A person created by the statement is stored with its patch as is, nulls included (the
/// conflict branch is the only one that sees both the stored row and the patch):
/// [`pg_strip_created_nulls`] removes those top-level nulls afterwards for the rows `merged`
/// reports `inserted` with a null in `attributes` (only calls creating people with a removal).
pub(crate) const PG_MERGE_CTE: &str = "merged AS (\
     INSERT INTO profiles AS p (workspace_id, customer_id, email, email_lower, attributes, numbers, updated_at) \
     SELECT $1, u.c, u.e, u.l, u.a, sharpsend_numbers(u.a), $2 \
     FROM ROWS FROM (jsonb_to_recordset($3::text::jsonb) AS (c text, a jsonb, e text, l text)) \
     WITH ORDINALITY AS u(c, a, e, l, n) ORDER BY u.n \
     ON CONFLICT (workspace_id, customer_id) DO UPDATE SET \
     attributes = CASE WHEN jsonb_path_exists(EXCLUDED.attributes, '$.* ? (@ == null)') \
       THEN (CASE jsonb_typeof(p.attributes) WHEN 'object' THEN p.attributes ELSE '{}'::jsonb END \
             - ARRAY(SELECT x.k FROM jsonb_each(EXCLUDED.attributes) AS x(k, v) \
                     WHERE jsonb_typeof(x.v) = 'null')) \
            || (SELECT coalesce(jsonb_object_agg(x.k, x.v), '{}'::jsonb) \
                FROM jsonb_each(EXCLUDED.attributes) AS x(k, v) WHERE jsonb_typeof(x.v) <> 'null') \
       ELSE CASE jsonb_typeof(p.attributes) WHEN 'object' THEN p.attributes ELSE '{}'::jsonb END \
            || EXCLUDED.attributes END, \
     email = CASE WHEN EXCLUDED.attributes -> 'email' IS NULL THEN p.email ELSE EXCLUDED.email END, \
     email_lower = CASE WHEN EXCLUDED.attributes -> 'email' IS NULL THEN p.email_lower \
       ELSE EXCLUDED.email_lower END, \
     numbers = (p.numbers - ARRAY(SELECT jsonb_object_keys(EXCLUDED.attributes))) || EXCLUDED.numbers, \
     updated_at = EXCLUDED.updated_at \
     RETURNING p.id, p.xmax = 0 AS inserted, p.attributes)";

/// The rows of `merged` ([`PG_MERGE_CTE`]) that [`pg_strip_created_nulls`] must clean, as a
/// JSON array of ids (SQL `NULL` if none).
pub(crate) const PG_CREATED_WITH_NULLS: &str = "(SELECT jsonb_agg(id) FROM merged \
     WHERE inserted AND jsonb_path_exists(attributes, '$.* ? (@ == null)'))";

/// One person's patch for [`PG_MERGE_CTE`]: the keys of its updates in this call, each with its
/// last value (`null`: remove), and the email that patch leaves (`e`, `l`; meaningful only if
/// `a` holds `email`).
#[derive(Serialize)]
struct MergeInput<'a> {
    c: &'a str,
    a: BTreeMap<&'a str, &'a Value>,
    e: Option<&'a str>,
    l: Option<String>,
}

/// The updates of a call grouped per person, in `customer_id` order (the order rows are
/// locked in, so concurrent calls wait for each other instead of deadlocking), each person's
/// updates in call order.
pub(crate) fn per_person<'a>(
    updates: &[(&'a str, &'a Map<String, Value>)],
) -> BTreeMap<&'a str, Vec<&'a Map<String, Value>>> {
    let mut per_person: BTreeMap<&str, Vec<&Map<String, Value>>> = BTreeMap::new();
    for (customer_id, attributes) in updates {
        per_person.entry(customer_id).or_default().push(attributes);
    }
    per_person
}

/// `$3` of [`PG_MERGE_CTE`]: one patch per person (later updates win per attribute, as
/// [`merge_one`] applies them), serialised straight from the borrowed updates.
pub(crate) fn pg_merge_input(
    per_person: &BTreeMap<&str, Vec<&Map<String, Value>>>,
) -> Result<String, DbErr> {
    let rows: Vec<MergeInput<'_>> = per_person
        .iter()
        .map(|(customer_id, updates)| {
            let mut a: BTreeMap<&str, &Value> = BTreeMap::new();
            for update in updates {
                for (key, value) in update.iter() {
                    a.insert(key.as_str(), value);
                }
            }
            let e = a.get(EMAIL_ATTRIBUTE).and_then(|v| v.as_str());
            MergeInput {
                c: customer_id,
                l: e.map(str::to_lowercase),
                e,
                a,
            }
        })
        .collect();
    serde_json::to_string(&rows).map_err(|e| DbErr::Json(e.to_string()))
}

/// Removes the top-level `null` attributes of the profiles `ids` (a JSON array, as
/// [`PG_CREATED_WITH_NULLS`] returns it): people just created by [`PG_MERGE_CTE`] from a
/// patch that removes attributes they never had.
pub(crate) async fn pg_strip_created_nulls(
    txn: &impl ConnectionTrait,
    ids: Value,
) -> Result<(), DbErr> {
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE profiles SET attributes = (SELECT coalesce(jsonb_object_agg(x.k, x.v), '{}'::jsonb) \
         FROM jsonb_each(attributes) AS x(k, v) WHERE jsonb_typeof(x.v) <> 'null') \
         WHERE id IN (SELECT jsonb_array_elements_text($1)::bigint)",
        [ids.into()],
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
