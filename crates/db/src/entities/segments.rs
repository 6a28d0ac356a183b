//! `segments`: mirror of a workspace's Customer.io segments.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "segments")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// Customer.io's segment id (unique within a workspace).
    pub cio_id: i64,
    pub name: String,
    /// `name` lowercased (Unicode) by the application; what name search matches against.
    pub name_lower: String,
    pub description: Option<String>,
    /// `dynamic` or `manual`.
    pub segment_type: String,
    pub member_count: Option<i64>,
    pub counted_at: Option<DateTimeUtc>,
    pub synced_at: DateTimeUtc,
    pub removed: bool,
    pub removed_at: Option<DateTimeUtc>,
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
