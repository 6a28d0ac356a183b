//! `workspaces`: one row per Customer.io site.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "workspaces")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub cio_site_id: String,
    pub region: String,
    pub name: String,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::segments::Entity")]
    Segments,
    #[sea_orm(has_many = "super::job_runs::Entity")]
    JobRuns,
    #[sea_orm(has_many = "super::job_leases::Entity")]
    JobLeases,
    #[sea_orm(has_many = "super::profiles::Entity")]
    Profiles,
    #[sea_orm(has_many = "super::outbox::Entity")]
    Outbox,
}

impl Related<super::segments::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Segments.def()
    }
}

impl Related<super::job_runs::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::JobRuns.def()
    }
}

impl Related<super::job_leases::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::JobLeases.def()
    }
}

impl Related<super::profiles::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Profiles.def()
    }
}

impl Related<super::outbox::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Outbox.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
