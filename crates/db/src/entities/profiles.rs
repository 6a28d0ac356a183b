//! `profiles`: mirror of a workspace's Customer.io people.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "profiles")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// Customer.io `id` identifier (unique within a workspace, 1 to 150 bytes).
    pub customer_id: String,
    pub email: Option<String>,
    /// `email` lowercased (Unicode) by the application; what email lookup matches against.
    pub email_lower: Option<String>,
    /// Customer.io's own `cio_id`, once an import has seen the person.
    pub cio_id: Option<String>,
    /// JSON object of attributes.
    #[sea_orm(column_type = "JsonBinary")]
    pub attributes: Json,
    /// JSON array of `{"id", "name"}` as last fetched from Customer.io.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub cio_segments: Option<Json>,
    pub updated_at: DateTimeUtc,
    pub fetched_at: Option<DateTimeUtc>,
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
