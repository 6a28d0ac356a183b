//! `ab_test_allocations`: who went where in an A/B test, fixed at its start.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "ab_test_allocations")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub test_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// The variant index, or -1 for the remainder.
    pub arm: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
