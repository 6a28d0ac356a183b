//! `metric_targets`: campaigns, broadcasts and newsletters whose metrics are polled, with their
//! polling schedule.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "metric_targets")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// `campaign`, `broadcast` or `newsletter`.
    pub kind: String,
    pub cio_id: i64,
    /// The earliest time a delivery of the target can have: where polled series start.
    pub window_start: DateTimeUtc,
    /// Last known send activity; sets the polling cadence.
    pub active_since: DateTimeUtc,
    /// `None`: not polled any more.
    pub next_poll_at: Option<DateTimeUtc>,
    pub last_polled_at: Option<DateTimeUtc>,
    pub last_error: Option<String>,
    /// Failed polls since the last successful one.
    pub failures: i32,
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
    #[sea_orm(has_many = "super::metric_snapshots::Entity")]
    Snapshots,
}

impl Related<super::workspaces::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Workspace.def()
    }
}

impl Related<super::metric_snapshots::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Snapshots.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
