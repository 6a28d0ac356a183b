//! Workspaces: one per Customer.io site SharpSend talks to. Every other row points at one.

use chrono::Utc;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter,
};

use crate::DbError;
use crate::entities::workspaces::{ActiveModel, Column, Entity, Model};
use crate::time::db_time;

/// A workspace row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub id: i64,
    /// Customer.io site id (unique).
    pub cio_site_id: String,
    /// Customer.io account region, e.g. `us` or `eu`.
    pub region: String,
    /// Display name; the site id until something better is known.
    pub name: String,
}

impl From<Model> for Workspace {
    fn from(m: Model) -> Self {
        Self {
            id: m.id,
            cio_site_id: m.cio_site_id,
            region: m.region,
            name: m.name,
        }
    }
}

/// Returns the workspace for `cio_site_id`, creating it (named after the site id) if it does
/// not exist, and updating its region if it changed. Safe against concurrent callers.
pub async fn ensure(
    db: &impl ConnectionTrait,
    cio_site_id: &str,
    region: &str,
) -> Result<Workspace, DbError> {
    let insert = ActiveModel {
        cio_site_id: Set(cio_site_id.to_owned()),
        region: Set(region.to_owned()),
        name: Set(cio_site_id.to_owned()),
        created_at: Set(db_time(Utc::now())),
        ..Default::default()
    };
    Entity::insert(insert)
        .on_conflict(
            OnConflict::column(Column::CioSiteId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    let found = get_by_site_id(db, cio_site_id)
        .await?
        .ok_or(sea_orm::DbErr::RecordNotFound(
            "workspace just ensured".to_owned(),
        ))?;
    if found.region == region {
        return Ok(found.into());
    }
    let mut active = found.into_active_model();
    active.region = Set(region.to_owned());
    Ok(active.update(db).await?.into())
}

/// The workspace with this database id.
pub async fn get(db: &impl ConnectionTrait, id: i64) -> Result<Option<Workspace>, DbError> {
    Ok(Entity::find_by_id(id).one(db).await?.map(Into::into))
}

/// The workspace for this Customer.io site id.
pub async fn find_by_site_id(
    db: &impl ConnectionTrait,
    cio_site_id: &str,
) -> Result<Option<Workspace>, DbError> {
    Ok(get_by_site_id(db, cio_site_id).await?.map(Into::into))
}

/// Every workspace, by id.
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<Workspace>, DbError> {
    use sea_orm::QueryOrder;
    Ok(Entity::find()
        .order_by_asc(Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

async fn get_by_site_id(
    db: &impl ConnectionTrait,
    cio_site_id: &str,
) -> Result<Option<Model>, sea_orm::DbErr> {
    Entity::find()
        .filter(Column::CioSiteId.eq(cio_site_id))
        .one(db)
        .await
}
