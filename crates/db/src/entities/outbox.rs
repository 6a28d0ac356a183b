//! `outbox`: accepted writes waiting for (or past) delivery to Customer.io.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox")]
pub struct Model {
    /// Acceptance order.
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// `identify`, `event`, `segment_add` or `segment_remove`.
    pub kind: String,
    pub customer_id: String,
    /// `identify`: the attribute map; `event`: `{"name", "data", "timestamp"}`;
    /// `segment_add` / `segment_remove`: `{"segment_id", "ids"}`.
    #[sea_orm(column_type = "JsonBinary")]
    pub payload: Json,
    /// ULID of an event (unique within a workspace).
    pub event_id: Option<String>,
    /// Caller's idempotency key of an event (unique within a workspace).
    pub idempotency_key: Option<String>,
    /// `pending`, `in_flight`, `delivered` or `dead`.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTimeUtc,
    pub claimed_by: Option<String>,
    pub claim_expires_at: Option<DateTimeUtc>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub delivered_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::workspaces::Entity",
        from = "Column::WorkspaceId",
        to = "super::workspaces::Column::Id",
        on_delete = "Cascade"
    )]
    Workspace,
}

impl Related<super::workspaces::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Workspace.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
