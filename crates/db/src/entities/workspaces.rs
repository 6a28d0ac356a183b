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
    /// Sealed credentials (`v1:<key id>:<base64>`); NULL for the env-configured default.
    pub track_api_key_sealed: Option<String>,
    pub app_api_key_sealed: Option<String>,
    pub webhook_signing_key_sealed: Option<String>,
    /// The master key id sealing the credentials.
    pub secrets_key_id: Option<String>,
    /// NULL: the process defaults.
    pub track_requests_per_sec: Option<i32>,
    pub app_requests_per_sec: Option<i32>,
    /// NULL: the region's base URL.
    pub track_base_url: Option<String>,
    pub app_base_url: Option<String>,
    pub disabled_at: Option<DateTimeUtc>,
    /// NULL: unchanged since created.
    pub updated_at: Option<DateTimeUtc>,
    /// Bumped by every change (the compare-and-set of UpdateWorkspace; its etag).
    pub version: i64,
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
