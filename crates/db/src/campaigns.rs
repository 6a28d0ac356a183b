//! The campaign mirror: Customer.io campaigns, API-triggered broadcasts and newsletters of a
//! workspace as last seen, keyed by ([`CampaignKind`], Customer.io id).
//!
//! [`apply_sync`] writes a complete listing (new ones created, changed ones updated, missing
//! ones marked removed, reappearing ones restored); [`upsert_one`] records one item read from
//! Customer.io outside a sync; [`list`] and [`get`] read the mirror.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel,
    QueryFilter, QueryOrder, QuerySelect, TransactionSession, TransactionTrait,
};
use serde_json::Value;

use crate::DbError;
use crate::database::begin_write;
use crate::entities::campaigns::{ActiveModel, Column, Entity, Model};
use crate::entities::workspaces;
use crate::sql::MAX_ROW_LIMIT;
use crate::time::db_time;

/// Ids per `IN (…)` list.
const CHUNK: usize = 500;

stored_enum! {
    /// What kind of Customer.io message source. Campaigns and broadcasts share one id sequence in
    /// Customer.io; newsletters have their own, so an id means nothing without its kind. `ALL`
    /// is in listing order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum CampaignKind {
        Campaign = "campaign",
        Broadcast = "broadcast",
        Newsletter = "newsletter",
    }
}

/// A mirrored campaign, broadcast or newsletter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignRecord {
    pub workspace_id: i64,
    /// The item as Customer.io last listed it.
    pub item: SyncedCampaign,
    /// When the mirror last saw it in Customer.io.
    pub synced_at: DateTime<Utc>,
    /// Set when a sync no longer found it in Customer.io.
    pub removed_at: Option<DateTime<Utc>>,
}

impl TryFrom<Model> for CampaignRecord {
    type Error = DbError;

    fn try_from(m: Model) -> Result<Self, DbError> {
        let kind = m.kind.parse().map_err(sea_orm::DbErr::from)?;
        Ok(Self {
            workspace_id: m.workspace_id,
            item: SyncedCampaign {
                kind,
                cio_id: m.cio_id,
                name: m.name,
                campaign_type: m.campaign_type,
                state: m.state,
                cio_created_at: m.cio_created_at,
                cio_updated_at: m.cio_updated_at,
                sent_at: m.sent_at,
                tags: tags_from_json(&m.tags),
            },
            synced_at: m.synced_at,
            removed_at: m.removed_at,
        })
    }
}

/// One item as Customer.io listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedCampaign {
    pub kind: CampaignKind,
    /// Customer.io's id.
    pub cio_id: i64,
    pub name: String,
    /// Customer.io's `type`, if it gave one.
    pub campaign_type: Option<String>,
    /// Customer.io's `state`; newsletters: `sent` or `draft`.
    pub state: Option<String>,
    pub cio_created_at: Option<DateTime<Utc>>,
    pub cio_updated_at: Option<DateTime<Utc>>,
    /// Newsletters: when it was sent.
    pub sent_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
}

impl SyncedCampaign {
    fn normalised(&self) -> Self {
        Self {
            cio_created_at: self.cio_created_at.map(db_time),
            cio_updated_at: self.cio_updated_at.map(db_time),
            sent_at: self.sent_at.map(db_time),
            ..self.clone()
        }
    }

    fn differs_from(&self, m: &Model) -> bool {
        m.name != self.name
            || m.campaign_type != self.campaign_type
            || m.state != self.state
            || m.cio_created_at != self.cio_created_at
            || m.cio_updated_at != self.cio_updated_at
            || m.sent_at != self.sent_at
            || tags_from_json(&m.tags) != self.tags
    }
}

/// What [`apply_sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncCounts {
    /// Seen for the first time.
    pub created: u32,
    /// Known ones that changed (name, type, state, times, tags) or reappeared after removal.
    pub updated: u32,
    /// Known ones no longer listed, newly marked removed.
    pub removed: u32,
    /// Known ones seen again unchanged.
    pub unchanged: u32,
}

/// Writes one complete listing of a workspace's campaigns, broadcasts and newsletters, in one
/// transaction: creates unseen ones, updates changed ones, refreshes `synced_at` of every seen
/// one, marks every known, not yet removed one missing from `seen` as removed (at `synced_at`),
/// and clears `removed_at` of one that reappears. Returns the counts and the (kind, id) of the
/// newly removed ones.
///
/// If `seen` lists a (kind, id) twice, the last entry wins. Fails with
/// `DbError::Db(DbErr::RecordNotFound)` if the workspace does not exist. Concurrent syncs of one
/// workspace run one after the other.
pub async fn apply_sync<C>(
    db: &C,
    workspace_id: i64,
    seen: &[SyncedCampaign],
    synced_at: DateTime<Utc>,
) -> Result<(SyncCounts, Vec<(CampaignKind, i64)>), DbError>
where
    C: TransactionTrait,
{
    let synced_at = db_time(synced_at);
    let txn = begin_write(db).await?;
    let result = apply_sync_in(&txn, workspace_id, seen, synced_at).await?;
    txn.commit().await?;
    Ok(result)
}

async fn apply_sync_in(
    txn: &impl ConnectionTrait,
    workspace_id: i64,
    seen: &[SyncedCampaign],
    synced_at: DateTime<Utc>,
) -> Result<(SyncCounts, Vec<(CampaignKind, i64)>), DbError> {
    // Serialises syncs of this workspace on PostgreSQL and checks that the workspace exists.
    workspaces::Entity::find_by_id(workspace_id)
        .lock_exclusive()
        .one(txn)
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(format!("workspace {workspace_id}")))?;

    let mut existing: HashMap<(String, i64), Model> = Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .all(txn)
        .await?
        .into_iter()
        .map(|m| ((m.kind.clone(), m.cio_id), m))
        .collect();

    let mut latest: HashMap<(CampaignKind, i64), SyncedCampaign> =
        HashMap::with_capacity(seen.len());
    let mut order = Vec::with_capacity(seen.len());
    for s in seen {
        if latest.insert((s.kind, s.cio_id), s.normalised()).is_none() {
            order.push((s.kind, s.cio_id));
        }
    }

    let mut counts = SyncCounts::default();
    let mut inserts = Vec::new();
    let mut touched = Vec::new();
    for key in order {
        let Some(s) = latest.get(&key) else {
            continue;
        };
        match existing.remove(&(key.0.as_str().to_owned(), key.1)) {
            None => {
                counts.created += 1;
                inserts.push(new_row(workspace_id, s, synced_at));
            }
            Some(m) => {
                let changed = s.differs_from(&m);
                let restored = m.removed_at.is_some();
                if changed || restored {
                    counts.updated += 1;
                    let mut a = m.into_active_model();
                    set_fields(&mut a, s);
                    a.synced_at = Set(synced_at);
                    a.removed_at = Set(None);
                    a.updated_at = Set(synced_at);
                    a.update(txn).await?;
                } else {
                    counts.unchanged += 1;
                    touched.push(m.id);
                }
            }
        }
    }

    for chunk in touched.chunks(CHUNK) {
        Entity::update_many()
            .col_expr(Column::SyncedAt, Expr::value(synced_at))
            .filter(Column::Id.is_in(chunk.iter().copied()))
            .exec(txn)
            .await?;
    }

    // Whatever is left in `existing` was not seen in this listing.
    let vanished: Vec<&Model> = existing
        .values()
        .filter(|m| m.removed_at.is_none())
        .collect();
    let mut removed = Vec::with_capacity(vanished.len());
    for m in &vanished {
        if let Ok(kind) = m.kind.parse::<CampaignKind>() {
            removed.push((kind, m.cio_id));
        }
    }
    let vanished_ids: Vec<i64> = vanished.iter().map(|m| m.id).collect();
    for chunk in vanished_ids.chunks(CHUNK) {
        let res = Entity::update_many()
            .col_expr(Column::RemovedAt, Expr::value(synced_at))
            .col_expr(Column::UpdatedAt, Expr::value(synced_at))
            .filter(Column::Id.is_in(chunk.iter().copied()))
            .exec(txn)
            .await?;
        counts.removed += u32::try_from(res.rows_affected).unwrap_or(u32::MAX);
    }
    removed.sort_unstable();

    for chunk in inserts.chunks(CHUNK / 4) {
        Entity::insert_many(chunk.to_vec())
            .exec_without_returning(txn)
            .await?;
    }

    tracing::debug!(workspace_id, ?counts, "campaign sync applied");
    Ok((counts, removed))
}

fn new_row(workspace_id: i64, s: &SyncedCampaign, at: DateTime<Utc>) -> ActiveModel {
    let mut a = ActiveModel {
        workspace_id: Set(workspace_id),
        kind: Set(s.kind.as_str().to_owned()),
        cio_id: Set(s.cio_id),
        synced_at: Set(at),
        removed_at: Set(None),
        created_at: Set(at),
        updated_at: Set(at),
        ..Default::default()
    };
    set_fields(&mut a, s);
    a
}

fn set_fields(a: &mut ActiveModel, s: &SyncedCampaign) {
    a.name = Set(s.name.clone());
    a.campaign_type = Set(s.campaign_type.clone());
    a.state = Set(s.state.clone());
    a.cio_created_at = Set(s.cio_created_at);
    a.cio_updated_at = Set(s.cio_updated_at);
    a.sent_at = Set(s.sent_at);
    a.tags = Set(Value::from(s.tags.clone()));
}

/// Records one item read from Customer.io outside a full sync (e.g. a newsletter a send just
/// created): inserted, or updated and restored if known. Never marks anything removed.
pub async fn upsert_one(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    item: &SyncedCampaign,
    synced_at: DateTime<Utc>,
) -> Result<(), DbError> {
    let synced_at = db_time(synced_at);
    let row = new_row(workspace_id, &item.normalised(), synced_at);
    Entity::insert(row)
        .on_conflict(
            OnConflict::columns([Column::WorkspaceId, Column::Kind, Column::CioId])
                .update_columns([
                    Column::Name,
                    Column::CampaignType,
                    Column::State,
                    Column::CioCreatedAt,
                    Column::CioUpdatedAt,
                    Column::SentAt,
                    Column::Tags,
                    Column::SyncedAt,
                    Column::RemovedAt,
                    Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Mirrored items not marked removed, ordered by kind (campaigns, broadcasts, newsletters) then
/// Customer.io id; only `kind` when given; at most `limit`, starting after `after` (keyset
/// paging: pass the last (kind, id) of the previous page).
pub async fn list(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    kind: Option<CampaignKind>,
    after: Option<(CampaignKind, i64)>,
    limit: u64,
) -> Result<Vec<CampaignRecord>, DbError> {
    let mut out: Vec<CampaignRecord> = Vec::new();
    for k in CampaignKind::ALL {
        if kind.is_some_and(|want| want != k) || after.is_some_and(|(ak, _)| k < ak) {
            continue;
        }
        let remaining = limit.min(MAX_ROW_LIMIT).saturating_sub(out.len() as u64);
        if remaining == 0 {
            break;
        }
        let mut query = Entity::find()
            .filter(Column::WorkspaceId.eq(workspace_id))
            .filter(Column::Kind.eq(k.as_str()))
            .filter(Column::RemovedAt.is_null());
        if let Some((ak, id)) = after
            && ak == k
        {
            query = query.filter(Column::CioId.gt(id));
        }
        let rows = query
            .order_by_asc(Column::CioId)
            .limit(remaining)
            .all(db)
            .await?;
        for row in rows {
            out.push(row.try_into()?);
        }
    }
    Ok(out)
}

/// One mirrored item, removed or not.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    kind: CampaignKind,
    cio_id: i64,
) -> Result<Option<CampaignRecord>, DbError> {
    Entity::find()
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::Kind.eq(kind.as_str()))
        .filter(Column::CioId.eq(cio_id))
        .one(db)
        .await?
        .map(CampaignRecord::try_from)
        .transpose()
}

fn tags_from_json(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}
