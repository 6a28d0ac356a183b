//! The audit record (`audit_events`): append-only (the table's triggers refuse UPDATE and
//! DELETE), listed newest first with filters and id-based paging.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};

use crate::DbError;
use crate::entities::audit_events::{ActiveModel, Column, Entity, Model};
use crate::time::db_time;

/// One audited call.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub workspace_id: Option<i64>,
    pub key_id: String,
    pub key_name: String,
    pub role: String,
    /// The full gRPC method path.
    pub action: String,
    /// The request's ids by field name (a JSON object).
    pub ids: serde_json::Value,
    /// The gRPC code name the call ended with.
    pub outcome: String,
}

impl From<Model> for AuditEvent {
    fn from(m: Model) -> Self {
        Self {
            id: m.id,
            at: m.at,
            workspace_id: m.workspace_id,
            key_id: m.key_id,
            key_name: m.key_name,
            role: m.role,
            action: m.action,
            ids: m.ids,
            outcome: m.outcome,
        }
    }
}

/// An event to append (the id is assigned).
#[derive(Debug, Clone)]
pub struct NewAuditEvent {
    pub at: DateTime<Utc>,
    pub workspace_id: Option<i64>,
    pub key_id: String,
    pub key_name: String,
    pub role: String,
    pub action: String,
    pub ids: serde_json::Value,
    pub outcome: String,
}

/// Appends one event.
pub async fn append(db: &impl ConnectionTrait, event: NewAuditEvent) -> Result<i64, DbError> {
    let model = ActiveModel {
        at: Set(db_time(event.at)),
        workspace_id: Set(event.workspace_id),
        key_id: Set(event.key_id),
        key_name: Set(event.key_name),
        role: Set(event.role),
        action: Set(event.action),
        ids: Set(event.ids),
        outcome: Set(event.outcome),
        ..Default::default()
    }
    .insert(db)
    .await?;
    Ok(model.id)
}

/// Which events to list. Every filter is optional; `workspace_id` limits to one workspace's
/// events (a workspace-bound caller's view).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub workspace_id: Option<i64>,
    pub key_id: Option<String>,
    pub action: Option<String>,
    /// Events at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Events before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only events with a smaller id (the page token's position).
    pub before_id: Option<i64>,
    pub limit: u64,
}

/// Matching events, newest first, at most `query.limit`.
pub async fn list(
    db: &impl ConnectionTrait,
    query: &AuditQuery,
) -> Result<Vec<AuditEvent>, DbError> {
    let mut select = Entity::find().order_by_desc(Column::Id).limit(query.limit);
    if let Some(id) = query.workspace_id {
        select = select.filter(Column::WorkspaceId.eq(id));
    }
    if let Some(key) = &query.key_id {
        select = select.filter(Column::KeyId.eq(key.as_str()));
    }
    if let Some(action) = &query.action {
        select = select.filter(Column::Action.eq(action.as_str()));
    }
    if let Some(since) = query.since {
        select = select.filter(Column::At.gte(db_time(since)));
    }
    if let Some(until) = query.until {
        select = select.filter(Column::At.lt(db_time(until)));
    }
    if let Some(before) = query.before_id {
        select = select.filter(Column::Id.lt(before));
    }
    Ok(select.all(db).await?.into_iter().map(Into::into).collect())
}
