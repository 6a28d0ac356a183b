//! SharpSend-managed segments: their definitions, their membership, evaluation, and the mirror
//! of Customer.io memberships that criteria read.
//!
//! - Definitions: [`create`], [`get`], [`get_many`], [`list`], [`update`], [`delete`];
//!   [`due`] lists the segments to evaluate; [`mark_due_for_attributes`], [`mark_all_due`] and
//!   [`mark_due`] flag them after profile changes, never waiting for a running evaluation (a
//!   change committed during one stays in the change log above the watermark it records, so
//!   [`has_changes`] finds it).
//! - Evaluation: [`apply_evaluation`] (one segment) and [`apply_incremental`] (many, from what
//!   changed) compute, inside the database, who now matches a
//!   [`Filter`](crate::criteria_sql::Filter) and who no longer does, and in ONE transaction
//!   records the new membership (`segment_members`), queues the difference in the outbox as
//!   `segment_add` / `segment_remove` rows of at most [`IDS_PER_ROW`] ids, and updates the
//!   counts. Profiles are never loaded into memory: the difference goes from `SELECT` to
//!   `INSERT` in SQL (PostgreSQL: one statement with data-modifying CTEs, so everything reads
//!   one snapshot; SQLite: statements in a write transaction no other writer can interleave
//!   with).
//! - Manual membership: [`add_members`] / [`remove_members`] (segments without criteria), same
//!   transaction rule.
//! - Delivery support: the outbox claims a segment's rows in order (their `customer_id` is
//!   `segment:<id>`, see [`outbox_label`] and `outbox::claim_due`), so two changes of one
//!   segment are never in flight at once; [`members_among`] tells the outbox worker which of a
//!   row's ids are still members, so that a change delivered after newer ones (a re-queued dead
//!   letter) never undoes them: an add is sent only for people still members, a remove only for
//!   people still not members.
//! - Mirrored memberships: [`replace_mirrored_membership`] stores the members of a Customer.io
//!   segment (read by the caller from Customer.io) for criteria that reference it;
//!   [`membership_synced_at`] tells when each was last stored.
//!
//! The membership of a managed segment lives in `segment_members` under its Customer.io id, the
//! same table as mirrored memberships, so a criteria condition "member of segment N" is one
//! `EXISTS` probe whichever kind N is.
//!
//! Split by concern: `definitions` (create / get / list / update / delete, due marks),
//! `evaluation` ([`apply_evaluation`]: the difference in SQL and its per-backend apply),
//! `membership` (manual changes, [`members_among`] / [`members_page`], mirrored memberships).

use chrono::{DateTime, Utc};
use sea_orm::DbErr;
use serde_json::Value;

use crate::entities::managed_segments::Model;

mod definitions;
mod evaluation;
mod membership;

pub use definitions::{
    SegmentUpdate, create, delete, due, get, get_many, list, mark_all_due, mark_due,
    mark_due_for_attributes, update,
};
pub use evaluation::{
    Applied, EvaluationOutcome, Incremental, Scope, apply_evaluation, apply_incremental,
    has_changes, prune_changes, record_evaluation_error,
};
pub use membership::{
    ManualChange, MembershipChange, add_members, members_among, members_page, membership_synced_at,
    remove_members, replace_mirrored_membership,
};

/// Customer.io's limit of ids per `add_customers` / `remove_customers` call, hence per outbox
/// row.
pub const IDS_PER_ROW: usize = 1000;

/// The `customer_id` of a segment outbox row: `segment:<Customer.io segment id>`.
pub fn outbox_label(cio_segment_id: i64) -> String {
    format!("segment:{cio_segment_id}")
}

/// The outcome of the last evaluation of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub evaluated_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub added: i64,
    pub removed: i64,
}

/// A managed segment, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedSegment {
    pub workspace_id: i64,
    /// The manual segment in Customer.io.
    pub cio_segment_id: i64,
    pub name: String,
    pub description: Option<String>,
    /// Criteria in their JSON form (opaque here); `None`: members are set by hand.
    pub criteria: Option<Value>,
    pub referenced_attributes: Vec<String>,
    pub referenced_segments: Vec<i64>,
    /// Bumped whenever the criteria change.
    pub revision: i64,
    /// Members as SharpSend recorded them (changes may still be on their way to Customer.io).
    pub member_count: i64,
    pub evaluation_due: bool,
    pub last_evaluation: Option<Evaluation>,
    /// Why the last attempt to evaluate failed (cleared by a successful evaluation).
    pub last_evaluation_error: Option<String>,
    /// Position in the change log from which the recorded membership may be stale; `None`:
    /// unknown, the next evaluation is a full one.
    pub change_watermark: Option<i64>,
    /// PostgreSQL: the snapshot taken with the watermark.
    pub change_snapshot: Option<String>,
    /// When the last full evaluation ran.
    pub last_full_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TryFrom<Model> for ManagedSegment {
    type Error = DbErr;

    fn try_from(m: Model) -> Result<Self, DbErr> {
        let referenced_attributes: Vec<String> = serde_json::from_value(m.referenced_attributes)
            .map_err(|e| DbErr::Json(e.to_string()))?;
        let referenced_segments: Vec<i64> = serde_json::from_value(m.referenced_segments)
            .map_err(|e| DbErr::Json(e.to_string()))?;
        let last_evaluation = m.last_evaluated_at.map(|evaluated_at| Evaluation {
            evaluated_at,
            duration_ms: m.last_evaluation_ms.unwrap_or(0),
            added: m.last_added.unwrap_or(0),
            removed: m.last_removed.unwrap_or(0),
        });
        Ok(Self {
            workspace_id: m.workspace_id,
            cio_segment_id: m.cio_segment_id,
            name: m.name,
            description: m.description,
            criteria: m.criteria.filter(|c| !c.is_null()),
            referenced_attributes,
            referenced_segments,
            revision: m.revision,
            member_count: m.member_count,
            evaluation_due: m.evaluation_due,
            last_evaluation,
            last_evaluation_error: m.last_evaluation_error,
            change_watermark: m.change_watermark,
            change_snapshot: m.change_snapshot,
            last_full_at: m.last_full_at,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

/// Criteria and what they read.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCriteria {
    /// The criteria's JSON form.
    pub criteria: Value,
    pub referenced_attributes: Vec<String>,
    pub referenced_segments: Vec<i64>,
}

/// A managed segment to record (its Customer.io segment already exists).
#[derive(Debug, Clone, PartialEq)]
pub struct NewManagedSegment {
    pub cio_segment_id: i64,
    pub name: String,
    pub description: Option<String>,
    pub criteria: Option<StoredCriteria>,
    /// The CreateSegment idempotency key this record completes (with `cio_segment_id`), in the
    /// same transaction.
    pub completes: Option<crate::idempotency::KeyRef>,
}
