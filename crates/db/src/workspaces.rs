//! Workspaces: one per Customer.io site SharpSend talks to. Every other row points at one.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{ExprTrait as _, OnConflict};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait,
    IntoActiveModel, QueryFilter, QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
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
    /// Set once disabled (DisableWorkspace).
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The last change (the creation time until changed).
    pub updated_at: DateTime<Utc>,
}

impl Workspace {
    pub fn disabled(&self) -> bool {
        self.disabled_at.is_some()
    }
}

impl From<Model> for Workspace {
    fn from(m: Model) -> Self {
        Self {
            id: m.id,
            cio_site_id: m.cio_site_id,
            region: m.region,
            name: m.name,
            disabled_at: m.disabled_at,
            created_at: m.created_at,
            updated_at: m.updated_at.unwrap_or(m.created_at),
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

/// A workspace's credentials as stored: sealed text (`v1:<key id>:<base64>`), never plaintext.
/// `Debug` shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedCredentials {
    pub track_api_key: String,
    pub app_api_key: String,
    pub webhook_signing_key: Option<String>,
    /// The master key id that sealed them.
    pub key_id: String,
}

impl std::fmt::Debug for SealedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedCredentials")
            .field("key_id", &self.key_id)
            .field("webhook_signing_key", &self.webhook_signing_key.is_some())
            .finish_non_exhaustive()
    }
}

/// A workspace with what is stored for it beyond the basics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    pub workspace: Workspace,
    /// `None`: the env-configured default (credentials in `CIO_*`).
    pub credentials: Option<SealedCredentials>,
    /// `None`: the process defaults.
    pub track_requests_per_sec: Option<u32>,
    pub app_requests_per_sec: Option<u32>,
    /// `None`: the region's base URL.
    pub track_base_url: Option<String>,
    pub app_base_url: Option<String>,
    /// Bumped by every update and disable: what [`update`] compares and sets.
    pub version: i64,
}

impl From<Model> for WorkspaceRecord {
    fn from(m: Model) -> Self {
        let credentials = match (
            &m.track_api_key_sealed,
            &m.app_api_key_sealed,
            &m.secrets_key_id,
        ) {
            (Some(track), Some(app), Some(key_id)) => Some(SealedCredentials {
                track_api_key: track.clone(),
                app_api_key: app.clone(),
                webhook_signing_key: m.webhook_signing_key_sealed.clone(),
                key_id: key_id.clone(),
            }),
            _ => None,
        };
        let rate = |r: Option<i32>| r.and_then(|r| u32::try_from(r).ok());
        Self {
            credentials,
            track_requests_per_sec: rate(m.track_requests_per_sec),
            app_requests_per_sec: rate(m.app_requests_per_sec),
            track_base_url: m.track_base_url.clone(),
            app_base_url: m.app_base_url.clone(),
            version: m.version,
            workspace: m.into(),
        }
    }
}

/// What a new workspace is made of (its credentials come from the sealing function of
/// [`create`], which knows the new id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWorkspace {
    pub cio_site_id: String,
    pub region: String,
    pub name: String,
    pub track_requests_per_sec: Option<u32>,
    pub app_requests_per_sec: Option<u32>,
    pub track_base_url: Option<String>,
    pub app_base_url: Option<String>,
}

fn rate_column(rate: Option<u32>) -> Option<i32> {
    rate.map(|r| i32::try_from(r).unwrap_or(i32::MAX))
}

/// Stores a new workspace with credentials sealed by `seal` (given the new row's id, since the
/// sealed values are bound to it), in one transaction. `Ok(None)`: the site id is already stored.
pub async fn create<C, F>(
    db: &C,
    new: NewWorkspace,
    seal: F,
    now: DateTime<Utc>,
) -> Result<Option<WorkspaceRecord>, DbError>
where
    C: TransactionTrait,
    F: FnOnce(i64) -> SealedCredentials,
{
    let txn = db.begin().await?;
    let now = db_time(now);
    let insert = ActiveModel {
        cio_site_id: Set(new.cio_site_id.clone()),
        region: Set(new.region),
        name: Set(new.name),
        created_at: Set(now),
        updated_at: Set(Some(now)),
        track_requests_per_sec: Set(rate_column(new.track_requests_per_sec)),
        app_requests_per_sec: Set(rate_column(new.app_requests_per_sec)),
        track_base_url: Set(new.track_base_url),
        app_base_url: Set(new.app_base_url),
        ..Default::default()
    };
    let inserted = Entity::insert(insert)
        .on_conflict(
            OnConflict::column(Column::CioSiteId)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    if inserted == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    let Some(model) = get_by_site_id(&txn, &new.cio_site_id).await? else {
        txn.rollback().await?;
        return Ok(None);
    };
    let sealed = seal(model.id);
    let mut active = model.into_active_model();
    set_credentials(&mut active, sealed);
    let model = active.update(&txn).await?;
    txn.commit().await?;
    Ok(Some(model.into()))
}

fn set_credentials(active: &mut ActiveModel, sealed: SealedCredentials) {
    active.track_api_key_sealed = Set(Some(sealed.track_api_key));
    active.app_api_key_sealed = Set(Some(sealed.app_api_key));
    active.webhook_signing_key_sealed = Set(sealed.webhook_signing_key);
    active.secrets_key_id = Set(Some(sealed.key_id));
}

/// The workspace with this id and what is stored for it.
pub async fn get_record(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Option<WorkspaceRecord>, DbError> {
    Ok(Entity::find_by_id(id).one(db).await?.map(Into::into))
}

/// Workspaces by id, after `after_id`, at most `limit`; disabled ones only when asked.
pub async fn list_records(
    db: &impl ConnectionTrait,
    after_id: Option<i64>,
    limit: u64,
    include_disabled: bool,
) -> Result<Vec<WorkspaceRecord>, DbError> {
    let mut query = Entity::find().order_by_asc(Column::Id).limit(limit);
    if let Some(after) = after_id {
        query = query.filter(Column::Id.gt(after));
    }
    if !include_disabled {
        query = query.filter(Column::DisabledAt.is_null());
    }
    Ok(query.all(db).await?.into_iter().map(Into::into).collect())
}

/// A change to a stored workspace: `None` fields stay as they are; `Some(None)` resets an
/// override to its default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkspaceChange {
    pub name: Option<String>,
    pub region: Option<String>,
    /// Replaces every sealed credential (sealed for this workspace's id).
    pub credentials: Option<SealedCredentials>,
    pub track_requests_per_sec: Option<Option<u32>>,
    pub app_requests_per_sec: Option<Option<u32>>,
    pub track_base_url: Option<Option<String>>,
    pub app_base_url: Option<Option<String>>,
}

/// What [`update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkspaceUpdated {
    Updated(Box<WorkspaceRecord>),
    NotFound,
    /// The row is no longer at the version the change was made from (someone else changed it).
    Conflict,
}

/// Applies `change` to workspace `id` if it is still at `version` (compare-and-set), bumping
/// the version: a change computed from an older read never overwrites a newer one.
pub async fn update(
    db: &impl ConnectionTrait,
    id: i64,
    version: i64,
    change: WorkspaceChange,
    now: DateTime<Utc>,
) -> Result<WorkspaceUpdated, DbError> {
    use sea_orm::sea_query::Expr;
    let now = db_time(now);
    let mut query = Entity::update_many()
        .col_expr(Column::UpdatedAt, Expr::value(now))
        .col_expr(Column::Version, Expr::col(Column::Version).add(1));
    if let Some(name) = change.name {
        query = query.col_expr(Column::Name, Expr::value(name));
    }
    if let Some(region) = change.region {
        query = query.col_expr(Column::Region, Expr::value(region));
    }
    if let Some(sealed) = change.credentials {
        query = query
            .col_expr(Column::TrackApiKeySealed, Expr::value(sealed.track_api_key))
            .col_expr(Column::AppApiKeySealed, Expr::value(sealed.app_api_key))
            .col_expr(
                Column::WebhookSigningKeySealed,
                Expr::value(sealed.webhook_signing_key),
            )
            .col_expr(Column::SecretsKeyId, Expr::value(sealed.key_id));
    }
    if let Some(rate) = change.track_requests_per_sec {
        query = query.col_expr(Column::TrackRequestsPerSec, Expr::value(rate_column(rate)));
    }
    if let Some(rate) = change.app_requests_per_sec {
        query = query.col_expr(Column::AppRequestsPerSec, Expr::value(rate_column(rate)));
    }
    if let Some(url) = change.track_base_url {
        query = query.col_expr(Column::TrackBaseUrl, Expr::value(url));
    }
    if let Some(url) = change.app_base_url {
        query = query.col_expr(Column::AppBaseUrl, Expr::value(url));
    }
    let result = query
        .filter(Column::Id.eq(id))
        .filter(Column::Version.eq(version))
        .exec(db)
        .await?;
    Ok(match get_record(db, id).await? {
        None => WorkspaceUpdated::NotFound,
        Some(record) if result.rows_affected == 1 => WorkspaceUpdated::Updated(Box::new(record)),
        Some(_) => WorkspaceUpdated::Conflict,
    })
}

/// Disables workspace `id` (a disabled one keeps its first `disabled_at`); `Ok(None)` if there
/// is no such workspace.
pub async fn disable(
    db: &impl ConnectionTrait,
    id: i64,
    now: DateTime<Utc>,
) -> Result<Option<WorkspaceRecord>, DbError> {
    let now = db_time(now);
    Entity::update_many()
        .col_expr(Column::DisabledAt, sea_orm::sea_query::Expr::value(now))
        .col_expr(Column::UpdatedAt, sea_orm::sea_query::Expr::value(now))
        .col_expr(
            Column::Version,
            sea_orm::sea_query::Expr::col(Column::Version).add(1),
        )
        .filter(Column::Id.eq(id))
        .filter(Column::DisabledAt.is_null())
        .exec(db)
        .await?;
    get_record(db, id).await
}

/// Workspaces with credentials sealed under another key than `current_key_id`, by id, after
/// `after_id`, at most `limit`.
pub async fn sealed_under_other_keys(
    db: &impl ConnectionTrait,
    current_key_id: &str,
    after_id: Option<i64>,
    limit: u64,
) -> Result<Vec<WorkspaceRecord>, DbError> {
    let mut query = Entity::find()
        .filter(Column::SecretsKeyId.is_not_null())
        .filter(Column::SecretsKeyId.ne(current_key_id))
        .order_by_asc(Column::Id)
        .limit(limit);
    if let Some(after) = after_id {
        query = query.filter(Column::Id.gt(after));
    }
    Ok(query.all(db).await?.into_iter().map(Into::into).collect())
}

/// Replaces the sealed credentials of workspace `id` with `new` only if they are still exactly
/// `old` (compare-and-set: a concurrent change wins). Answers whether the row was replaced.
/// `updated_at` is left alone: re-sealing changes nothing an operator set.
pub async fn replace_sealed(
    db: &impl ConnectionTrait,
    id: i64,
    old: &SealedCredentials,
    new: SealedCredentials,
) -> Result<bool, DbError> {
    use sea_orm::sea_query::Expr;
    let webhook_was = match &old.webhook_signing_key {
        Some(v) => Condition::all().add(Column::WebhookSigningKeySealed.eq(v.clone())),
        None => Condition::all().add(Column::WebhookSigningKeySealed.is_null()),
    };
    let result = Entity::update_many()
        .col_expr(Column::TrackApiKeySealed, Expr::value(new.track_api_key))
        .col_expr(Column::AppApiKeySealed, Expr::value(new.app_api_key))
        .col_expr(
            Column::WebhookSigningKeySealed,
            Expr::value(new.webhook_signing_key),
        )
        .col_expr(Column::SecretsKeyId, Expr::value(new.key_id))
        .filter(Column::Id.eq(id))
        .filter(Column::TrackApiKeySealed.eq(old.track_api_key.clone()))
        .filter(Column::AppApiKeySealed.eq(old.app_api_key.clone()))
        .filter(Column::SecretsKeyId.eq(old.key_id.clone()))
        .filter(webhook_was)
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}
