//! `audit_events`: the append-only record of calls that change something.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub at: DateTimeUtc,
    /// The caller's workspace; NULL for an all-workspaces key.
    pub workspace_id: Option<i64>,
    pub key_id: String,
    pub key_name: String,
    pub role: String,
    /// The full gRPC method path, e.g. `/sharpsend.cio.v1.CampaignService/SendAssignment`.
    pub action: String,
    /// The request's ids by field name (a JSON object).
    #[sea_orm(column_type = "JsonBinary")]
    pub ids: Json,
    /// The gRPC code name the call ended with, e.g. `OK`, `NOT_FOUND`.
    pub outcome: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
