//! `sends`: one send of an approved assignment per (workspace, assignment, request id).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "sends")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// `snd_<ULID>`: the id callers see.
    pub public_id: String,
    pub assignment_id: String,
    /// The caller's request id; empty when none was given.
    pub request_id: String,
    pub title: String,
    pub subject: String,
    /// `broadcast` or `newsletter`.
    pub delivery: String,
    pub broadcast_id: Option<i64>,
    pub from_id: Option<i64>,
    /// Newsletter delivery: the subscription topic asked for (NULL: the service's setting).
    pub subscription_topic_id: Option<i64>,
    /// The normalised request, to tell a repeat from a conflicting reuse of the key.
    #[sea_orm(column_type = "JsonBinary")]
    pub request: Json,
    /// Aggregate of the submissions' states.
    pub state: String,
    pub created_by: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
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
