//! `send_submissions`: one target segment's part of a send, submitted to Customer.io once.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "send_submissions")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub workspace_id: i64,
    pub send_id: i64,
    /// Order of the segment in the request (earlier segments take precedence for people in
    /// several).
    pub position: i32,
    pub segment_id: i64,
    pub subject: String,
    pub body: String,
    /// Extra liquid data of a broadcast variation.
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub data: Option<Json>,
    /// The audience filter sent to Customer.io.
    #[sea_orm(column_type = "JsonBinary")]
    pub recipients: Json,
    /// What Customer.io keeps of this submission (trigger data, newsletter name).
    pub marker: String,
    /// `pending`, `submitting`, `submitted`, `completed`, `failed`, `uncertain` or `cancelled`.
    pub state: String,
    /// Requests started for it.
    pub attempts: i32,
    pub next_attempt_at: DateTimeUtc,
    pub claimed_by: Option<String>,
    pub claim_expires_at: Option<DateTimeUtc>,
    pub attempt_started_at: Option<DateTimeUtc>,
    /// When the attempt's window closes: the claim's expiry, or when its dispatcher recorded the
    /// outcome. The reconciler's grace starts here.
    pub attempt_ends_at: Option<DateTimeUtc>,
    pub cio_trigger_id: Option<i64>,
    pub cio_newsletter_id: Option<i64>,
    pub recipients_count: Option<i64>,
    pub submitted_at: Option<DateTimeUtc>,
    pub completed_at: Option<DateTimeUtc>,
    pub error: Option<String>,
    /// The first errors Customer.io reported for the processed trigger (JSON array of strings).
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub trigger_errors: Option<Json>,
    /// How many errors Customer.io reported in all.
    pub trigger_error_count: Option<i64>,
    /// A cancel found it claimed or uncertain: were it queued again, it is cancelled instead.
    pub cancel_requested_at: Option<DateTimeUtc>,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(
        belongs_to = "super::sends::Entity",
        from = "Column::SendId",
        to = "super::sends::Column::Id",
        on_delete = "Cascade"
    )]
    Send,
}

impl Related<super::sends::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Send.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
