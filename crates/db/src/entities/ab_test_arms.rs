//! `ab_test_arms`: per arm of an A/B test (a variant, or the remainder as -1), its manual
//! segment in Customer.io, whether its members were queued, and its send.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "ab_test_arms")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub test_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub arm: i32,
    /// People allocated to it (the remainder: as re-checked against current membership once
    /// the winner is known).
    pub members: i64,
    pub cio_segment_id: Option<i64>,
    pub members_queued_at: Option<DateTimeUtc>,
    /// The send (internal id and `snd_…`), once recorded.
    pub send_id: Option<i64>,
    pub send_public_id: Option<String>,
    /// Why the arm has no send (e.g. nobody left in the remainder).
    pub note: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
