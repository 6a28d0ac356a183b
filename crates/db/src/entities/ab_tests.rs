//! `ab_tests`: one A/B test per (workspace, request id).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "ab_tests")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// `abt_<ULID>`: the id callers see.
    pub public_id: String,
    pub request_id: String,
    pub assignment_id: String,
    pub title: String,
    /// The normalised, validated request.
    #[sea_orm(column_type = "JsonBinary")]
    pub spec: Json,
    /// `draft`, `running`, `decided` or `cancelled`.
    pub state: String,
    pub planned_per_variant: i64,
    pub audience_estimate: i64,
    /// A JSON array of strings.
    #[sea_orm(column_type = "JsonBinary")]
    pub warnings: Json,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub decision: Option<Json>,
    pub created_by: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// When StartTest moved it to `running`.
    pub started_at: Option<DateTimeUtc>,
    /// The sequential rule's running state (core's `SequentialState`).
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub sequential: Option<Json>,
    /// Looks the evaluation job has taken.
    pub looks: i64,
    /// When the evaluation job finished with the test (remainder sent, or nothing to send).
    pub completed_at: Option<DateTimeUtc>,
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
