//! Membership: manual adds and removes (segments without criteria), the recorded members the
//! outbox worker and readers ask for, and mirrored memberships of Customer.io segments.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait, TransactionSession, TransactionTrait,
};
use serde_json::json;

use super::definitions::{lock, mark_dependents_due};
use super::evaluation::{set_mirror_count, to_i64};
use super::{IDS_PER_ROW, outbox_label};
use crate::DbError;
use crate::criteria_sql::SqlBuilder;
use crate::database::begin_write;
use crate::entities::managed_segments::{Column, Entity};
use crate::entities::{outbox, segment_member_syncs, segment_members};
use crate::outbox::{Kind, Status};
use crate::sql::text_in;
use crate::time::db_time;

/// Rows per multi-row insert into `segment_members` (three values each).
const MEMBER_CHUNK: usize = 1000;

/// What [`add_members`] / [`remove_members`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// People whose recorded membership changed (new members, or members removed).
    pub changed: u64,
    /// Distinct ids queued for Customer.io (all of them: adding a member again is harmless
    /// and repairs a membership Customer.io lost).
    pub queued_ids: u64,
    pub outbox_rows: u64,
    pub member_count: i64,
}

/// What happened to a manual membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManualChange {
    Done(MembershipChange),
    /// No managed segment with this id.
    NotFound,
    /// The segment has criteria: its membership is computed, not set by hand.
    HasCriteria,
}

/// Adds people to a managed segment without criteria, in one transaction: records them as
/// members and queues `segment_add` rows (at most 1000 ids each) for every distinct id given.
pub async fn add_members(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[String],
    now: DateTime<Utc>,
) -> Result<ManualChange, DbError> {
    change_members(db, workspace_id, cio_segment_id, customer_ids, true, now).await
}

/// Removes people from a managed segment without criteria (as [`add_members`], with
/// `segment_remove` rows).
pub async fn remove_members(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[String],
    now: DateTime<Utc>,
) -> Result<ManualChange, DbError> {
    change_members(db, workspace_id, cio_segment_id, customer_ids, false, now).await
}

async fn change_members(
    db: &impl TransactionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[String],
    add: bool,
    now: DateTime<Utc>,
) -> Result<ManualChange, DbError> {
    let now = db_time(now);
    let ids: Vec<&str> = customer_ids
        .iter()
        .map(String::as_str)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let txn = begin_write(db).await?;
    let current = match lock(&txn, workspace_id, cio_segment_id).await? {
        None => return Ok(ManualChange::NotFound),
        Some(m) if m.criteria.as_ref().is_some_and(|c| !c.is_null()) => {
            return Ok(ManualChange::HasCriteria);
        }
        Some(m) => m,
    };
    let backend = txn.get_database_backend();
    let mut changed = 0;
    for chunk in ids.chunks(MEMBER_CHUNK) {
        if add {
            let rows = chunk.iter().map(|id| segment_members::ActiveModel {
                workspace_id: Set(workspace_id),
                segment_id: Set(cio_segment_id),
                customer_id: Set((*id).to_owned()),
            });
            let stmt = segment_members::Entity::insert_many(rows)
                .on_conflict(
                    OnConflict::columns([
                        segment_members::Column::WorkspaceId,
                        segment_members::Column::SegmentId,
                        segment_members::Column::CustomerId,
                    ])
                    .do_nothing()
                    .to_owned(),
                )
                .into_query();
            changed += txn.execute(&stmt).await?.rows_affected();
        } else {
            changed += segment_members::Entity::delete_many()
                .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
                .filter(segment_members::Column::SegmentId.eq(cio_segment_id))
                .filter(text_in(backend, segment_members::Column::CustomerId, chunk))
                .exec(&txn)
                .await?
                .rows_affected;
        }
    }
    let kind = if add {
        Kind::SegmentAdd
    } else {
        Kind::SegmentRemove
    };
    let rows: Vec<outbox::ActiveModel> = ids
        .chunks(IDS_PER_ROW)
        .map(|chunk| outbox_row(workspace_id, cio_segment_id, kind, chunk, now))
        .collect();
    let outbox_rows = rows.len() as u64;
    for chunk in rows.chunks(100) {
        let stmt = outbox::Entity::insert_many(chunk.to_vec()).into_query();
        txn.execute(&stmt).await?;
    }
    let member_count = if add {
        current.member_count + to_i64(changed)
    } else {
        current.member_count - to_i64(changed)
    };
    Entity::update_many()
        .col_expr(Column::MemberCount, Expr::value(member_count))
        .filter(Column::Id.eq(current.id))
        .exec(&txn)
        .await?;
    set_mirror_count(&txn, workspace_id, cio_segment_id, member_count, now).await?;
    if changed > 0 {
        mark_dependents_due(&txn, workspace_id, &[cio_segment_id]).await?;
    }
    txn.commit().await?;
    Ok(ManualChange::Done(MembershipChange {
        changed,
        queued_ids: ids.len() as u64,
        outbox_rows,
        member_count,
    }))
}

fn outbox_row(
    workspace_id: i64,
    cio_segment_id: i64,
    kind: Kind,
    ids: &[&str],
    now: DateTime<Utc>,
) -> outbox::ActiveModel {
    outbox::ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        kind: Set(kind.as_str().to_owned()),
        customer_id: Set(outbox_label(cio_segment_id)),
        payload: Set(json!({ "segment_id": cio_segment_id, "ids": ids })),
        event_id: Set(None),
        idempotency_key: Set(None),
        status: Set(Status::Pending.as_str().to_owned()),
        attempts: Set(0),
        next_attempt_at: Set(now),
        claimed_by: NotSet,
        claim_expires_at: NotSet,
        last_error: NotSet,
        last_attempt_at: NotSet,
        created_at: Set(now),
        delivered_at: NotSet,
    }
}

/// The ids among `customer_ids` that are recorded members of managed segment
/// `cio_segment_id`; `None` when it is not (or no longer) a managed segment.
pub async fn members_among(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
    customer_ids: &[&str],
) -> Result<Option<HashSet<String>>, DbError> {
    let managed = Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::WorkspaceId.eq(workspace_id))
        .filter(Column::CioSegmentId.eq(cio_segment_id))
        .into_tuple::<i64>()
        .one(db)
        .await?;
    if managed.is_none() {
        return Ok(None);
    }
    let backend = db.get_database_backend();
    let mut members = HashSet::new();
    for chunk in customer_ids.chunks(MEMBER_CHUNK) {
        let found: Vec<String> = segment_members::Entity::find()
            .select_only()
            .column(segment_members::Column::CustomerId)
            .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
            .filter(segment_members::Column::SegmentId.eq(cio_segment_id))
            .filter(text_in(backend, segment_members::Column::CustomerId, chunk))
            .into_tuple()
            .all(db)
            .await?;
        members.extend(found);
    }
    Ok(Some(members))
}

/// Members recorded (or mirrored) for a segment, in `customer_id` order, after `after`, at most
/// `limit`.
pub async fn members_page(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    segment_id: i64,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<String>, DbError> {
    let mut query = segment_members::Entity::find()
        .select_only()
        .column(segment_members::Column::CustomerId)
        .filter(segment_members::Column::WorkspaceId.eq(workspace_id))
        .filter(segment_members::Column::SegmentId.eq(segment_id));
    if let Some(after) = after {
        query = query.filter(segment_members::Column::CustomerId.gt(after));
    }
    Ok(query
        .order_by_asc(segment_members::Column::CustomerId)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Replaces the mirrored membership of Customer.io segment `segment_id` with `customer_ids`
/// (as just read from Customer.io), in one transaction, and records when. Refuses (`None`) a
/// managed segment: its membership is SharpSend's own record. Returns the member count.
pub async fn replace_mirrored_membership(
    db: &impl TransactionTrait,
    workspace_id: i64,
    segment_id: i64,
    customer_ids: &[String],
    now: DateTime<Utc>,
) -> Result<Option<u64>, DbError> {
    let now = db_time(now);
    let ids: BTreeSet<&str> = customer_ids
        .iter()
        .map(String::as_str)
        .filter(|id| !id.is_empty())
        .collect();
    let ids: Vec<&str> = ids.into_iter().collect();
    let txn = begin_write(db).await?;
    if lock(&txn, workspace_id, segment_id).await?.is_some() {
        return Ok(None);
    }
    // Only the difference is written: every membership row written lands in the change log,
    // and criteria reading this segment re-check exactly those people (issue #18).
    let list = json!(ids).to_string();
    let mut b = SqlBuilder::new(txn.get_database_backend());
    b.sql("DELETE FROM segment_members WHERE workspace_id = ")
        .param(workspace_id)
        .sql(" AND segment_id = ")
        .param(segment_id)
        .sql(" AND customer_id NOT IN (");
    if b.backend() == DbBackend::Postgres {
        b.sql("SELECT jsonb_array_elements_text(CAST(")
            .param(list)
            .sql(" AS jsonb)))");
    } else {
        b.sql("SELECT value FROM json_each(").param(list).sql("))");
    }
    txn.execute_raw(b.build()).await?;
    for chunk in ids.chunks(MEMBER_CHUNK) {
        let rows = chunk.iter().map(|id| segment_members::ActiveModel {
            workspace_id: Set(workspace_id),
            segment_id: Set(segment_id),
            customer_id: Set((*id).to_owned()),
        });
        let stmt = segment_members::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([
                    segment_members::Column::WorkspaceId,
                    segment_members::Column::SegmentId,
                    segment_members::Column::CustomerId,
                ])
                .do_nothing()
                .to_owned(),
            )
            .into_query();
        txn.execute(&stmt).await?;
    }
    let count = ids.len() as u64;
    let sync = segment_member_syncs::ActiveModel {
        workspace_id: Set(workspace_id),
        segment_id: Set(segment_id),
        synced_at: Set(now),
        member_count: Set(to_i64(count)),
    };
    let stmt = segment_member_syncs::Entity::insert(sync)
        .on_conflict(
            OnConflict::columns([
                segment_member_syncs::Column::WorkspaceId,
                segment_member_syncs::Column::SegmentId,
            ])
            .update_columns([
                segment_member_syncs::Column::SyncedAt,
                segment_member_syncs::Column::MemberCount,
            ])
            .to_owned(),
        )
        .into_query();
    txn.execute(&stmt).await?;
    txn.commit().await?;
    Ok(Some(count))
}

/// When the membership of each of `segment_ids` was last mirrored (absent: never).
pub async fn membership_synced_at(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    segment_ids: &[i64],
) -> Result<HashMap<i64, DateTime<Utc>>, DbError> {
    if segment_ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, DateTime<Utc>)> = segment_member_syncs::Entity::find()
        .select_only()
        .column(segment_member_syncs::Column::SegmentId)
        .column(segment_member_syncs::Column::SyncedAt)
        .filter(segment_member_syncs::Column::WorkspaceId.eq(workspace_id))
        .filter(crate::sql::id_in(
            db.get_database_backend(),
            segment_member_syncs::Column::SegmentId,
            segment_ids,
        ))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows.into_iter().collect())
}
