//! API keys created through `AdminService`: each has a public `key_id` (the prefix of the key
//! that finds its row), the SHA-256 of its secret part (never the secret), a [`Role`], and a
//! workspace (or every workspace, for admin keys). Revoking stamps `revoked_at`; rows stay, so
//! the audit record's key ids keep meaning something.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder,
};

use crate::DbError;
use crate::entities::api_keys::{ActiveModel, Column, Entity, Model};
use crate::time::db_time;

stored_enum! {
    /// What a key may do. Roles are ordered: each includes every role before it
    /// (`admin` ⊇ `sender` ⊇ `writer` ⊇ `reader`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Role {
        /// Reads and metrics.
        Reader = "reader",
        /// Profile writes, segment changes.
        Writer = "writer",
        /// Sends, A/B tests, journey events.
        Sender = "sender",
        /// Keys, workspaces, jobs, the audit record.
        Admin = "admin",
    }
}

impl Role {
    /// Whether a key of this role may call what needs `needed`.
    pub fn includes(self, needed: Role) -> bool {
        self >= needed
    }
}

/// A key as listed (no hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key_id: String,
    pub name: String,
    pub role: Role,
    /// `None`: every workspace.
    pub workspace_id: Option<i64>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<&Model> for ApiKey {
    type Error = DbError;

    fn try_from(m: &Model) -> Result<Self, DbError> {
        Ok(Self {
            key_id: m.key_id.clone(),
            name: m.name.clone(),
            role: m.role.parse::<Role>().map_err(sea_orm::DbErr::from)?,
            workspace_id: m.workspace_id,
            created_by: m.created_by.clone(),
            created_at: m.created_at,
            revoked_at: m.revoked_at,
        })
    }
}

/// A key to store.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub key_id: String,
    pub name: String,
    pub role: Role,
    pub workspace_id: Option<i64>,
    /// Lower-case hex SHA-256 of the secret part.
    pub secret_hash: String,
    pub created_by: String,
}

/// Stores a new key.
pub async fn create(
    db: &impl ConnectionTrait,
    key: NewApiKey,
    now: DateTime<Utc>,
) -> Result<ApiKey, DbError> {
    let model = ActiveModel {
        key_id: Set(key.key_id),
        name: Set(key.name),
        role: Set(key.role.as_str().to_owned()),
        workspace_id: Set(key.workspace_id),
        secret_hash: Set(key.secret_hash),
        created_by: Set(key.created_by),
        created_at: Set(db_time(now)),
        revoked_at: Set(None),
        ..Default::default()
    }
    .insert(db)
    .await?;
    ApiKey::try_from(&model)
}

/// The key with this id and its secret hash (revoked keys too: the caller checks).
pub async fn find(
    db: &impl ConnectionTrait,
    key_id: &str,
) -> Result<Option<(ApiKey, String)>, DbError> {
    let Some(model) = Entity::find()
        .filter(Column::KeyId.eq(key_id))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some((ApiKey::try_from(&model)?, model.secret_hash)))
}

/// Keys by creation, oldest first: of `workspace_id` only when given (else all), revoked ones
/// only when asked.
pub async fn list(
    db: &impl ConnectionTrait,
    workspace_id: Option<i64>,
    include_revoked: bool,
) -> Result<Vec<ApiKey>, DbError> {
    let mut query = Entity::find().order_by_asc(Column::Id);
    if let Some(id) = workspace_id {
        query = query.filter(Column::WorkspaceId.eq(id));
    }
    if !include_revoked {
        query = query.filter(Column::RevokedAt.is_null());
    }
    query.all(db).await?.iter().map(ApiKey::try_from).collect()
}

/// Revokes `key_id` (a second revocation keeps the first time); `None` if there is no such key.
pub async fn revoke(
    db: &impl ConnectionTrait,
    key_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<ApiKey>, DbError> {
    let Some(model) = Entity::find()
        .filter(Column::KeyId.eq(key_id))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    if model.revoked_at.is_some() {
        return ApiKey::try_from(&model).map(Some);
    }
    let mut active = model.into_active_model();
    active.revoked_at = Set(Some(db_time(now)));
    let model = active.update(db).await?;
    ApiKey::try_from(&model).map(Some)
}
