//! `api_keys`: keys created by `AdminService/CreateApiKey`, stored as a hash of their secret.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The public prefix of the key that finds its row.
    #[sea_orm(unique)]
    pub key_id: String,
    pub name: String,
    /// `reader`, `writer`, `sender` or `admin`.
    pub role: String,
    /// NULL: every workspace (admin keys only).
    pub workspace_id: Option<i64>,
    /// Lower-case hex SHA-256 of the key's secret part.
    pub secret_hash: String,
    /// The key id (or configured key name) of the admin who created it.
    pub created_by: String,
    pub created_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
