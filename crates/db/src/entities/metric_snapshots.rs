//! `metric_snapshots`: one polled metrics series of a target.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "metric_snapshots")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    pub target_id: i64,
    pub polled_at: DateTimeUtc,
    /// Bucket size asked for: `hours`, `days`, `weeks` or `months`.
    pub res: String,
    /// The requested window.
    pub start_at: DateTimeUtc,
    pub end_at: DateTimeUtc,
    /// Start of the first bucket.
    pub series_start: DateTimeUtc,
    /// JSON object: metric name → array of counts, oldest bucket first.
    #[sea_orm(column_type = "JsonBinary")]
    pub series: Json,
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
    #[sea_orm(
        belongs_to = "super::metric_targets::Entity",
        from = "Column::TargetId",
        to = "super::metric_targets::Column::Id",
        on_delete = "Cascade"
    )]
    Target,
}

impl Related<super::workspaces::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Workspace.def()
    }
}

impl Related<super::metric_targets::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Target.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
