//! `send_history`: every state change of a send's submissions, with who and why.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "send_history")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub send_id: i64,
    /// `None`: the send as a whole.
    pub segment_id: Option<i64>,
    pub from_state: Option<String>,
    pub to_state: String,
    pub actor: String,
    pub reason: String,
    pub at: DateTimeUtc,
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
