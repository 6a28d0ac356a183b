//! `campaigns`: mirror of a workspace's Customer.io campaigns, API-triggered broadcasts and
//! newsletters, keyed by (`kind`, `cio_id`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "campaigns")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// `campaign`, `broadcast` or `newsletter`.
    pub kind: String,
    /// Customer.io's id (campaigns and broadcasts share one sequence, newsletters their own).
    pub cio_id: i64,
    pub name: String,
    /// Customer.io's `type` (e.g. `segment`, `event`, `email`), if it gave one.
    pub campaign_type: Option<String>,
    /// Customer.io's `state` (newsletters: `sent` or `draft`, derived from `sent_at`).
    pub state: Option<String>,
    pub cio_created_at: Option<DateTimeUtc>,
    pub cio_updated_at: Option<DateTimeUtc>,
    /// Newsletters: when it was sent.
    pub sent_at: Option<DateTimeUtc>,
    /// JSON array of strings.
    #[sea_orm(column_type = "JsonBinary")]
    pub tags: Json,
    /// When a sync last saw it in Customer.io.
    pub synced_at: DateTimeUtc,
    /// When a sync first missed it (cleared if it reappears).
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
