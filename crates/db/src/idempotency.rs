//! Idempotency keys: a caller's `request_id` for an operation that creates something
//! (CreateSegment, RunJob), so that a retry answers what the first call created instead of
//! creating it again.
//!
//! A key is [`claim`]ed with the request it came with (atomically: of any number of concurrent
//! claims of one key exactly one is [`Claim::New`]), then [`complete`]d with the id of what was
//! created. A first call that fails [`release`]s its key, so that a retry tries again. A key left
//! without a result by a call that died can be [`take_over`]n once it is stale. Operations whose
//! creation is local do the claim, the creation and the completion in one transaction; one whose
//! creation ends in a local record (CreateSegment: Customer.io's segment, then its record here)
//! completes its [`KeyRef`] in the record's transaction, so that no crash leaves the record
//! without the key's result (a take-over would make a second one).

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

use crate::DbError;
use crate::entities::idempotency_keys::{ActiveModel, Column, Entity, Model};
use crate::time::db_time;

/// One key as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKey {
    pub operation: String,
    pub request_id: String,
    /// The request of the first call.
    pub request: serde_json::Value,
    /// What the first call created; `None` while it is at work (or if it died).
    pub result_id: Option<i64>,
    pub created_at: DateTime<Utc>,
    /// The last claim or take-over.
    pub updated_at: DateTime<Utc>,
}

impl From<Model> for StoredKey {
    fn from(m: Model) -> Self {
        Self {
            operation: m.operation,
            request_id: m.request_id,
            request: m.request,
            result_id: m.result_id,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

/// A claimed key, for the transaction that records what its call created (see [`complete`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub operation: String,
    pub request_id: String,
}

/// What [`claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key is new and now this caller's: go on, then [`complete`] or [`release`] it.
    New,
    /// The key was there already (a retry, a concurrent duplicate, or a reuse).
    Existing(StoredKey),
}

/// Records `request_id` of `operation` with `request` unless the key exists.
pub async fn claim(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    operation: &str,
    request_id: &str,
    request: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<Claim, DbError> {
    let now = db_time(now);
    let row = ActiveModel {
        workspace_id: Set(workspace_id),
        operation: Set(operation.to_owned()),
        request_id: Set(request_id.to_owned()),
        request: Set(request.clone()),
        result_id: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    };
    let inserted = Entity::insert(row)
        .on_conflict(
            OnConflict::columns([Column::WorkspaceId, Column::Operation, Column::RequestId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    if inserted == 1 {
        return Ok(Claim::New);
    }
    let existing = get(db, workspace_id, operation, request_id)
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound("idempotency key just claimed".into()))?;
    Ok(Claim::Existing(existing))
}

/// The key, if any.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    operation: &str,
    request_id: &str,
) -> Result<Option<StoredKey>, DbError> {
    Ok(Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Operation.eq(operation))
        .filter(Column::RequestId.eq(request_id))
        .one(db)
        .await?
        .map(StoredKey::from))
}

/// Records what the key's call created.
pub async fn complete(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    operation: &str,
    request_id: &str,
    result_id: i64,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let res = Entity::update_many()
        .col_expr(Column::ResultId, Expr::value(result_id))
        .col_expr(Column::UpdatedAt, Expr::value(db_time(now)))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Operation.eq(operation))
        .filter(Column::RequestId.eq(request_id))
        .exec(db)
        .await?;
    if res.rows_affected == 0 {
        return Err(sea_orm::DbErr::RecordNotUpdated.into());
    }
    Ok(())
}

/// Forgets a key whose call failed without creating anything (only while it has no result).
pub async fn release(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    operation: &str,
    request_id: &str,
) -> Result<(), DbError> {
    Entity::delete_many()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Operation.eq(operation))
        .filter(Column::RequestId.eq(request_id))
        .filter(Column::ResultId.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Takes over a key without a result last claimed at or before `stale_before` (its call died):
/// answers whether this caller now holds it (of concurrent callers, exactly one does).
pub async fn take_over(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    operation: &str,
    request_id: &str,
    stale_before: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let res = Entity::update_many()
        .col_expr(Column::UpdatedAt, Expr::value(db_time(now)))
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Operation.eq(operation))
        .filter(Column::RequestId.eq(request_id))
        .filter(Column::ResultId.is_null())
        .filter(Column::UpdatedAt.lte(db_time(stale_before)))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}
