//! `managed_segments`: segments SharpSend keeps in Customer.io as manual segments, with the
//! criteria that define their membership.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "managed_segments")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    /// The manual segment in Customer.io (unique within a workspace).
    pub cio_segment_id: i64,
    pub name: String,
    pub description: Option<String>,
    /// Criteria in their JSON form; `None` for a segment whose members are set by hand.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub criteria: Option<Json>,
    /// JSON array of the attribute names the criteria read.
    #[sea_orm(column_type = "JsonBinary")]
    pub referenced_attributes: Json,
    /// JSON array of the Customer.io segment ids the criteria read.
    #[sea_orm(column_type = "JsonBinary")]
    pub referenced_segments: Json,
    /// Bumped whenever the criteria change.
    pub revision: i64,
    /// Members as SharpSend recorded them.
    pub member_count: i64,
    pub evaluation_due: bool,
    pub last_evaluated_at: Option<DateTimeUtc>,
    pub last_evaluation_ms: Option<i64>,
    pub last_added: Option<i64>,
    pub last_removed: Option<i64>,
    pub last_evaluation_error: Option<String>,
    /// Position in `profile_changes` from which the recorded membership may be stale; `None`:
    /// unknown (the next evaluation is a full one).
    pub change_watermark: Option<i64>,
    /// PostgreSQL: the snapshot taken with the watermark (`pg_snapshot` text): changes of the
    /// transactions it shows as committed were seen.
    pub change_snapshot: Option<String>,
    /// When the last full evaluation ran.
    pub last_full_at: Option<DateTimeUtc>,
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
