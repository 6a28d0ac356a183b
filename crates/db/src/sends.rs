//! Sends of approved assignments: the persisted state machine that makes each submission reach
//! Customer.io exactly once.
//!
//! - [`create`] records a send with its submissions, or finds the send already recorded under
//!   the same (assignment, request id) — race-safe through the unique index.
//! - [`claim`] takes a due `pending` submission for one dispatcher (`submitting`, with a claim
//!   that expires) and, for a broadcast, its trigger window, in one transaction, BEFORE the
//!   request leaves. [`transition`] moves a submission from one state to another only if it is
//!   still in the expected state (and, for `submitting`, still held by the caller), records
//!   the history entry and refreshes the send's aggregate state, in one transaction.
//! - [`cancel`] stops a send's submissions no dispatcher has claimed (`cancelled`), racing the
//!   claim on the same row; claimed ones are marked so they are not queued again.
//! - [`expire_claims`] turns `submitting` submissions whose dispatcher died into `uncertain`:
//!   the request may have left.
//! - Reads: [`get`], [`get_by_key`], [`list`], [`submissions`], [`history`], [`due`],
//!   [`in_state`].
//!
//! All times come from the caller (`now`), truncated to microseconds. The one exception is
//! [`database_now`], which reads the database's own clock so that a process can check how far
//! its clock is from it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionSession, TransactionTrait,
};
use serde_json::Value;

use crate::DbError;
use crate::database::begin_write;
use crate::entities::{broadcast_windows, send_history, send_submissions, sends};
use crate::time::{add_span, db_time};

stored_enum! {
    /// State of a submission (and, aggregated, of a send).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum SendState {
        /// Waiting to be submitted (`next_attempt_at`).
        Pending = "pending",
        /// A dispatcher holds it; the request is (or was) on its way.
        Submitting = "submitting",
        /// Customer.io accepted it.
        Submitted = "submitted",
        /// Customer.io processed it.
        Completed = "completed",
        /// Refused, or settled as not sent and not retried.
        Failed = "failed",
        /// The request may or may not have arrived.
        Uncertain = "uncertain",
        /// Stopped before any dispatcher claimed it ([`cancel`]); never sent.
        Cancelled = "cancelled",
    }
}

impl SendState {
    /// The state of a send whose submissions are in `states`: uncertain if any is; else failed
    /// if any is; else submitting / pending while any is; else cancelled if any is (part of it
    /// never went out); else completed when all are; else submitted.
    pub fn aggregate(states: impl IntoIterator<Item = SendState>) -> SendState {
        let states: Vec<SendState> = states.into_iter().collect();
        let any = |s: SendState| states.contains(&s);
        if any(SendState::Uncertain) {
            SendState::Uncertain
        } else if any(SendState::Failed) {
            SendState::Failed
        } else if any(SendState::Submitting) {
            SendState::Submitting
        } else if any(SendState::Pending) {
            SendState::Pending
        } else if any(SendState::Cancelled) {
            SendState::Cancelled
        } else if !states.is_empty() && states.iter().all(|s| *s == SendState::Completed) {
            SendState::Completed
        } else {
            SendState::Submitted
        }
    }
}

/// How a send reaches Customer.io.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Trigger an API-triggered broadcast once per submission.
    Broadcast { broadcast_id: i64 },
    /// Create a newsletter per submission and send it.
    Newsletter {
        from_id: Option<i64>,
        /// The subscription topic asked for with the send (`None`: the service's setting).
        subscription_topic_id: Option<i64>,
    },
}

/// A send to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSend {
    pub public_id: String,
    pub assignment_id: String,
    pub request_id: String,
    pub title: String,
    pub subject: String,
    pub delivery: Delivery,
    /// The normalised request (compared when the key is reused).
    pub request: Value,
    pub created_by: String,
    /// In target order.
    pub submissions: Vec<NewSubmission>,
}

/// One target segment's part of a [`NewSend`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewSubmission {
    pub segment_id: i64,
    pub subject: String,
    pub body: String,
    pub data: Option<Value>,
    pub recipients: Value,
    pub marker: String,
}

/// A recorded send (without submissions).
#[derive(Debug, Clone, PartialEq)]
pub struct SendRecord {
    pub id: i64,
    pub public_id: String,
    pub assignment_id: String,
    pub request_id: String,
    pub title: String,
    pub subject: String,
    pub delivery: Delivery,
    pub request: Value,
    pub state: SendState,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TryFrom<sends::Model> for SendRecord {
    type Error = DbErr;
    fn try_from(m: sends::Model) -> Result<Self, DbErr> {
        let delivery = match (m.delivery.as_str(), m.broadcast_id) {
            ("broadcast", Some(broadcast_id)) => Delivery::Broadcast { broadcast_id },
            ("newsletter", _) => Delivery::Newsletter {
                from_id: m.from_id,
                subscription_topic_id: m.subscription_topic_id,
            },
            (other, _) => {
                return Err(DbErr::Type(format!(
                    "bad delivery `{other}` for send {}",
                    m.id
                )));
            }
        };
        Ok(Self {
            id: m.id,
            public_id: m.public_id,
            assignment_id: m.assignment_id,
            request_id: m.request_id,
            title: m.title,
            subject: m.subject,
            delivery,
            request: m.request,
            state: m.state.parse()?,
            created_by: m.created_by,
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

/// A recorded submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub id: i64,
    pub send_id: i64,
    pub position: i32,
    pub segment_id: i64,
    pub subject: String,
    pub body: String,
    pub data: Option<Value>,
    pub recipients: Value,
    pub marker: String,
    pub state: SendState,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub claimed_by: Option<String>,
    pub claim_expires_at: Option<DateTime<Utc>>,
    pub attempt_started_at: Option<DateTime<Utc>>,
    /// When the attempt's window closes (see [`claim`] and [`Transition::ends_attempt`]).
    pub attempt_ends_at: Option<DateTime<Utc>>,
    pub cio_trigger_id: Option<i64>,
    pub cio_newsletter_id: Option<i64>,
    pub recipients_count: Option<i64>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// Errors Customer.io reported for the processed trigger (`None`: not read).
    pub trigger_errors: Option<TriggerErrors>,
}

/// What Customer.io reported as a processed trigger's errors, bounded: the first lines and how
/// many there were in all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TriggerErrors {
    pub first: Vec<String>,
    pub count: i64,
}

impl TryFrom<send_submissions::Model> for Submission {
    type Error = DbErr;
    fn try_from(m: send_submissions::Model) -> Result<Self, DbErr> {
        Ok(Self {
            id: m.id,
            send_id: m.send_id,
            position: m.position,
            segment_id: m.segment_id,
            subject: m.subject,
            body: m.body,
            data: m.data,
            recipients: m.recipients,
            marker: m.marker,
            state: m.state.parse()?,
            attempts: m.attempts,
            next_attempt_at: m.next_attempt_at,
            claimed_by: m.claimed_by,
            claim_expires_at: m.claim_expires_at,
            attempt_started_at: m.attempt_started_at,
            attempt_ends_at: m.attempt_ends_at,
            cio_trigger_id: m.cio_trigger_id,
            cio_newsletter_id: m.cio_newsletter_id,
            recipients_count: m.recipients_count,
            submitted_at: m.submitted_at,
            completed_at: m.completed_at,
            error: m.error,
            trigger_errors: m.trigger_error_count.map(|count| TriggerErrors {
                first: m
                    .trigger_errors
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default(),
                count,
            }),
        })
    }
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    /// `None`: the send as a whole.
    pub segment_id: Option<i64>,
    pub from_state: Option<SendState>,
    pub to_state: SendState,
    pub actor: String,
    pub reason: String,
}

/// What [`create`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// Recorded now.
    New(SendRecord),
    /// A send with the same key was already recorded.
    Existing(SendRecord),
}

/// Records `new` with its submissions (`pending`, due at `now`) and a history entry, in one
/// transaction — unless a send with the same (assignment, request id) exists: then that one is
/// answered and nothing is written. Of concurrent calls with one key exactly one records it
/// (unique index + `ON CONFLICT DO NOTHING`; PostgreSQL makes the others wait for its commit).
pub async fn create(
    db: &impl TransactionTrait,
    workspace_id: i64,
    new: &NewSend,
    now: DateTime<Utc>,
) -> Result<Created, DbError> {
    let now = db_time(now);
    let (delivery, broadcast_id, from_id, topic) = match new.delivery {
        Delivery::Broadcast { broadcast_id } => ("broadcast", Some(broadcast_id), None, None),
        Delivery::Newsletter {
            from_id,
            subscription_topic_id,
        } => ("newsletter", None, from_id, subscription_topic_id),
    };
    let txn = begin_write(db).await?;
    let row = sends::ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        public_id: Set(new.public_id.clone()),
        assignment_id: Set(new.assignment_id.clone()),
        request_id: Set(new.request_id.clone()),
        title: Set(new.title.clone()),
        subject: Set(new.subject.clone()),
        delivery: Set(delivery.to_string()),
        broadcast_id: Set(broadcast_id),
        from_id: Set(from_id),
        subscription_topic_id: Set(topic),
        request: Set(new.request.clone()),
        state: Set(SendState::Pending.as_str().to_string()),
        created_by: Set(new.created_by.clone()),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let inserted = sends::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([
                sends::Column::WorkspaceId,
                sends::Column::AssignmentId,
                sends::Column::RequestId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
    let record = find_by_key(&txn, workspace_id, &new.assignment_id, &new.request_id)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("send just recorded".into()))?;
    if inserted == 0 {
        txn.commit().await?;
        return Ok(Created::Existing(record));
    }
    let submissions: Vec<send_submissions::ActiveModel> = new
        .submissions
        .iter()
        .enumerate()
        .map(|(position, s)| send_submissions::ActiveModel {
            id: NotSet,
            workspace_id: Set(workspace_id),
            send_id: Set(record.id),
            position: Set(i32::try_from(position).unwrap_or(i32::MAX)),
            segment_id: Set(s.segment_id),
            subject: Set(s.subject.clone()),
            body: Set(s.body.clone()),
            data: Set(s.data.clone()),
            recipients: Set(s.recipients.clone()),
            marker: Set(s.marker.clone()),
            state: Set(SendState::Pending.as_str().to_string()),
            attempts: Set(0),
            next_attempt_at: Set(now),
            claimed_by: Set(None),
            claim_expires_at: Set(None),
            attempt_started_at: Set(None),
            attempt_ends_at: Set(None),
            cio_trigger_id: Set(None),
            cio_newsletter_id: Set(None),
            recipients_count: Set(None),
            submitted_at: Set(None),
            completed_at: Set(None),
            error: Set(None),
            trigger_errors: Set(None),
            trigger_error_count: Set(None),
            cancel_requested_at: Set(None),
            updated_at: Set(now),
        })
        .collect();
    if !submissions.is_empty() {
        send_submissions::Entity::insert_many(submissions)
            .exec_without_returning(&txn)
            .await?;
    }
    let reason = format!("recorded with {} submission(s)", new.submissions.len());
    record_history(
        &txn,
        record.id,
        None,
        None,
        SendState::Pending,
        &new.created_by,
        &reason,
        now,
    )
    .await?;
    txn.commit().await?;
    Ok(Created::New(record))
}

async fn find_by_key(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    assignment_id: &str,
    request_id: &str,
) -> Result<Option<SendRecord>, DbErr> {
    sends::Entity::find()
        .filter(sends::Column::WorkspaceId.eq(workspace_id))
        .filter(sends::Column::AssignmentId.eq(assignment_id))
        .filter(sends::Column::RequestId.eq(request_id))
        .one(db)
        .await?
        .map(SendRecord::try_from)
        .transpose()
}

#[allow(clippy::too_many_arguments)]
async fn record_history(
    db: &impl ConnectionTrait,
    send_id: i64,
    segment_id: Option<i64>,
    from: Option<SendState>,
    to: SendState,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    send_history::Entity::insert(send_history::ActiveModel {
        id: NotSet,
        send_id: Set(send_id),
        segment_id: Set(segment_id),
        from_state: Set(from.map(|s| s.as_str().to_string())),
        to_state: Set(to.as_str().to_string()),
        actor: Set(actor.to_string()),
        reason: Set(reason.to_string()),
        at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The send with this public id.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    public_id: &str,
) -> Result<Option<SendRecord>, DbError> {
    Ok(sends::Entity::find()
        .filter(sends::Column::WorkspaceId.eq(workspace_id))
        .filter(sends::Column::PublicId.eq(public_id))
        .one(db)
        .await?
        .map(SendRecord::try_from)
        .transpose()?)
}

/// The send with this internal id.
pub async fn get_by_id(db: &impl ConnectionTrait, id: i64) -> Result<Option<SendRecord>, DbError> {
    Ok(sends::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(SendRecord::try_from)
        .transpose()?)
}

/// The send recorded under (assignment, request id).
pub async fn get_by_key(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    assignment_id: &str,
    request_id: &str,
) -> Result<Option<SendRecord>, DbError> {
    Ok(find_by_key(db, workspace_id, assignment_id, request_id).await?)
}

/// Which sends [`list`] answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub assignment_id: Option<String>,
    pub state: Option<SendState>,
    /// Only sends with an id below this (keyset paging, newest first).
    pub before_id: Option<i64>,
}

/// Sends, newest first, at most `limit`.
pub async fn list(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    filter: &ListFilter,
    limit: u64,
) -> Result<Vec<SendRecord>, DbError> {
    let mut query = sends::Entity::find().filter(sends::Column::WorkspaceId.eq(workspace_id));
    if let Some(assignment_id) = &filter.assignment_id {
        query = query.filter(sends::Column::AssignmentId.eq(assignment_id.as_str()));
    }
    if let Some(state) = filter.state {
        query = query.filter(sends::Column::State.eq(state.as_str()));
    }
    if let Some(before) = filter.before_id {
        query = query.filter(sends::Column::Id.lt(before));
    }
    let rows = query
        .order_by_desc(sends::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(SendRecord::try_from)
        .collect::<Result<_, _>>()?)
}

/// The submissions of a send, in target order.
pub async fn submissions(
    db: &impl ConnectionTrait,
    send_id: i64,
) -> Result<Vec<Submission>, DbError> {
    let rows = send_submissions::Entity::find()
        .filter(send_submissions::Column::SendId.eq(send_id))
        .order_by_asc(send_submissions::Column::Position)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(Submission::try_from)
        .collect::<Result<_, _>>()?)
}

/// One submission by id.
pub async fn submission(db: &impl ConnectionTrait, id: i64) -> Result<Option<Submission>, DbError> {
    Ok(send_submissions::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(Submission::try_from)
        .transpose()?)
}

/// The history of a send, oldest first.
pub async fn history(
    db: &impl ConnectionTrait,
    send_id: i64,
) -> Result<Vec<HistoryEntry>, DbError> {
    let rows = send_history::Entity::find()
        .filter(send_history::Column::SendId.eq(send_id))
        .order_by_asc(send_history::Column::Id)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|m| {
            Ok(HistoryEntry {
                at: m.at,
                segment_id: m.segment_id,
                from_state: m.from_state.as_deref().map(str::parse).transpose()?,
                to_state: m.to_state.parse()?,
                actor: m.actor,
                reason: m.reason,
            })
        })
        .collect::<Result<_, DbErr>>()
        .map_err(DbError::from)
}

/// `pending` submissions due at `now` (optionally of one send), earliest first.
pub async fn due(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    send_id: Option<i64>,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<Submission>, DbError> {
    let mut query = send_submissions::Entity::find()
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(send_submissions::Column::State.eq(SendState::Pending.as_str()))
        .filter(send_submissions::Column::NextAttemptAt.lte(db_time(now)));
    if let Some(send_id) = send_id {
        query = query.filter(send_submissions::Column::SendId.eq(send_id));
    }
    let rows = query
        .order_by_asc(send_submissions::Column::NextAttemptAt)
        .order_by_asc(send_submissions::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(Submission::try_from)
        .collect::<Result<_, _>>()?)
}

/// When the next `pending` submission (optionally of one send) is due.
pub async fn next_due_at(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    send_id: Option<i64>,
) -> Result<Option<DateTime<Utc>>, DbError> {
    let mut query = send_submissions::Entity::find()
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(send_submissions::Column::State.eq(SendState::Pending.as_str()));
    if let Some(send_id) = send_id {
        query = query.filter(send_submissions::Column::SendId.eq(send_id));
    }
    let next = query
        .order_by_asc(send_submissions::Column::NextAttemptAt)
        .one(db)
        .await?;
    Ok(next.map(|m| m.next_attempt_at))
}

/// Submissions in `state`, oldest first, at most `limit`.
pub async fn in_state(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    state: SendState,
    limit: u64,
) -> Result<Vec<Submission>, DbError> {
    let rows = send_submissions::Entity::find()
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(send_submissions::Column::State.eq(state.as_str()))
        .order_by_asc(send_submissions::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(Submission::try_from)
        .collect::<Result<_, _>>()?)
}

/// What [`claim`] got.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The submission is now `submitting`, held by the caller until `claim_expires_at`.
    Claimed(Box<Submission>),
    /// The broadcast's trigger window is closed until then; the submission waits (its
    /// `next_attempt_at` moved there).
    WindowClosed(DateTime<Utc>),
    /// It is no longer pending and due (another dispatcher took it, or it was resolved).
    Gone,
}

/// The `broadcast_id` of the one trigger window shared by every broadcast of a workspace (when
/// Customer.io's one-trigger-per-10-s limit is workspace-wide).
pub const WORKSPACE_WINDOW: i64 = 0;

/// The trigger window to take with a claim, and how long it stays closed after this trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The broadcast whose window it is, or [`WORKSPACE_WINDOW`] for the workspace's.
    pub broadcast_id: i64,
    pub spacing: Duration,
}

/// Takes submission `id` for `holder`, in one transaction, before the request leaves: for a
/// broadcast, first its trigger window (open at `now` → closed until `now + spacing`); then
/// `pending` (and due) → `submitting` with `attempts + 1`, `attempt_started_at = now` and a
/// claim until `now + claim_ttl` (also the end of the attempt's window, `attempt_ends_at`,
/// until its dispatcher records the outcome); a history entry; the send's aggregate state.
pub async fn claim(
    db: &impl TransactionTrait,
    workspace_id: i64,
    id: i64,
    holder: &str,
    claim_ttl: Duration,
    window: Option<Window>,
    now: DateTime<Utc>,
) -> Result<Claim, DbError> {
    let now = db_time(now);
    let txn = begin_write(db).await?;
    if let Some(window) = window {
        broadcast_windows::Entity::insert(broadcast_windows::ActiveModel {
            workspace_id: Set(workspace_id),
            broadcast_id: Set(window.broadcast_id),
            next_allowed_at: Set(now),
        })
        .on_conflict(
            OnConflict::columns([
                broadcast_windows::Column::WorkspaceId,
                broadcast_windows::Column::BroadcastId,
            ])
            .do_nothing()
            .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        let taken = broadcast_windows::Entity::update_many()
            .col_expr(
                broadcast_windows::Column::NextAllowedAt,
                Expr::value(add_span(now, window.spacing)),
            )
            .filter(broadcast_windows::Column::WorkspaceId.eq(workspace_id))
            .filter(broadcast_windows::Column::BroadcastId.eq(window.broadcast_id))
            .filter(broadcast_windows::Column::NextAllowedAt.lte(now))
            .exec(&txn)
            .await?
            .rows_affected;
        if taken == 0 {
            let opens = broadcast_windows::Entity::find_by_id((workspace_id, window.broadcast_id))
                .one(&txn)
                .await?
                .map_or(now, |w| w.next_allowed_at);
            send_submissions::Entity::update_many()
                .col_expr(send_submissions::Column::NextAttemptAt, Expr::value(opens))
                .filter(send_submissions::Column::Id.eq(id))
                .filter(send_submissions::Column::State.eq(SendState::Pending.as_str()))
                .exec(&txn)
                .await?;
            txn.commit().await?;
            return Ok(Claim::WindowClosed(opens));
        }
    }
    let claimed = send_submissions::Entity::update_many()
        .col_expr(
            send_submissions::Column::State,
            Expr::value(SendState::Submitting.as_str()),
        )
        .col_expr(send_submissions::Column::ClaimedBy, Expr::value(holder))
        .col_expr(
            send_submissions::Column::ClaimExpiresAt,
            Expr::value(add_span(now, claim_ttl)),
        )
        .col_expr(send_submissions::Column::AttemptStartedAt, Expr::value(now))
        .col_expr(
            send_submissions::Column::AttemptEndsAt,
            Expr::value(add_span(now, claim_ttl)),
        )
        .col_expr(
            send_submissions::Column::Attempts,
            Expr::col(send_submissions::Column::Attempts).add(1),
        )
        .col_expr(send_submissions::Column::UpdatedAt, Expr::value(now))
        .filter(send_submissions::Column::Id.eq(id))
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(send_submissions::Column::State.eq(SendState::Pending.as_str()))
        .filter(send_submissions::Column::NextAttemptAt.lte(now))
        .exec(&txn)
        .await?
        .rows_affected;
    if claimed == 0 {
        // Dropping the transaction rolls back the window taken above: nothing was sent in it.
        txn.rollback().await?;
        return Ok(Claim::Gone);
    }
    let submission = send_submissions::Entity::find_by_id(id)
        .one(&txn)
        .await?
        .map(Submission::try_from)
        .transpose()?
        .ok_or_else(|| DbErr::RecordNotFound(format!("submission {id}")))?;
    let reason = format!("attempt {} started", submission.attempts);
    record_history(
        &txn,
        submission.send_id,
        Some(submission.segment_id),
        Some(SendState::Pending),
        SendState::Submitting,
        holder,
        &reason,
        now,
    )
    .await?;
    refresh_send_state(&txn, submission.send_id, now).await?;
    txn.commit().await?;
    Ok(Claim::Claimed(Box::new(submission)))
}

/// Moves a broadcast's window so that it stays closed until at least `until` (Customer.io
/// answered 429 with a later time).
pub async fn hold_window(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    broadcast_id: i64,
    until: DateTime<Utc>,
) -> Result<(), DbError> {
    let until = db_time(until);
    broadcast_windows::Entity::update_many()
        .col_expr(broadcast_windows::Column::NextAllowedAt, Expr::value(until))
        .filter(broadcast_windows::Column::WorkspaceId.eq(workspace_id))
        .filter(broadcast_windows::Column::BroadcastId.eq(broadcast_id))
        .filter(broadcast_windows::Column::NextAllowedAt.lt(until))
        .exec(db)
        .await?;
    Ok(())
}

/// A state change of one submission, applied by [`transition`] only if the submission is still
/// in `from` (and, when `holder` is given, still claimed by it).
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: SendState,
    pub to: SendState,
    /// Only if claimed by this holder.
    pub holder: Option<String>,
    pub actor: String,
    pub reason: String,
    pub cio_trigger_id: Option<i64>,
    pub cio_newsletter_id: Option<i64>,
    pub recipients_count: Option<i64>,
    /// `pending`: when it is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Replaces the error (`None` clears it).
    pub error: Option<String>,
    /// The attempt provably never reached Customer.io (refused before processing, or never
    /// connected): it does not count.
    pub uncount_attempt: bool,
    /// The dispatcher records its attempt's outcome: the attempt's window ends now
    /// (`attempt_ends_at`), not at its claim's expiry.
    pub ends_attempt: bool,
    /// Errors Customer.io reported for the processed trigger.
    pub trigger_errors: Option<TriggerErrors>,
}

impl Transition {
    pub fn new(
        from: SendState,
        to: SendState,
        actor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            from,
            to,
            holder: None,
            actor: actor.into(),
            reason: reason.into(),
            cio_trigger_id: None,
            cio_newsletter_id: None,
            recipients_count: None,
            next_attempt_at: None,
            error: None,
            uncount_attempt: false,
            ends_attempt: false,
            trigger_errors: None,
        }
    }

    pub fn held_by(mut self, holder: &str) -> Self {
        self.holder = Some(holder.to_string());
        self
    }

    pub fn error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }
}

/// Applies `t` to submission `id` in one transaction (the state change and the ids, counts,
/// times and error it carries; the claim is released when leaving `submitting`; a history
/// entry; the send's aggregate state). Returns false, changing nothing, when the submission is
/// no longer in `t.from` or held by `t.holder`.
pub async fn transition(
    db: &impl TransactionTrait,
    id: i64,
    t: &Transition,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    use send_submissions::Column as C;
    let now = db_time(now);
    let txn = begin_write(db).await?;
    // A submission a cancel found claimed or uncertain is not queued again: it is cancelled.
    let to = if t.to == SendState::Pending {
        Expr::cust("CASE WHEN cancel_requested_at IS NULL THEN 'pending' ELSE 'cancelled' END")
    } else {
        Expr::value(t.to.as_str())
    };
    let mut update = send_submissions::Entity::update_many()
        .col_expr(C::State, to)
        .col_expr(C::Error, Expr::value(t.error.clone()))
        .col_expr(C::UpdatedAt, Expr::value(now))
        .filter(C::Id.eq(id))
        .filter(C::State.eq(t.from.as_str()));
    if let Some(holder) = &t.holder {
        update = update.filter(C::ClaimedBy.eq(holder.as_str()));
    }
    if t.to != SendState::Submitting {
        update = update
            .col_expr(C::ClaimedBy, Expr::value(Option::<String>::None))
            .col_expr(
                C::ClaimExpiresAt,
                Expr::value(Option::<DateTime<Utc>>::None),
            );
    }
    if let Some(trigger_id) = t.cio_trigger_id {
        update = update.col_expr(C::CioTriggerId, Expr::value(trigger_id));
    }
    if let Some(newsletter_id) = t.cio_newsletter_id {
        update = update.col_expr(C::CioNewsletterId, Expr::value(newsletter_id));
    }
    if let Some(count) = t.recipients_count {
        update = update.col_expr(C::RecipientsCount, Expr::value(count));
    }
    if let Some(at) = t.next_attempt_at {
        update = update.col_expr(C::NextAttemptAt, Expr::value(db_time(at)));
    }
    if t.to == SendState::Submitted && t.from != SendState::Submitted {
        update = update.col_expr(C::SubmittedAt, Expr::value(now));
    }
    if t.to == SendState::Completed {
        update = update.col_expr(C::CompletedAt, Expr::value(now));
    }
    if t.uncount_attempt {
        update = update.col_expr(C::Attempts, Expr::col(C::Attempts).sub(1));
    }
    if t.ends_attempt {
        update = update.col_expr(C::AttemptEndsAt, Expr::value(now));
    }
    if let Some(errors) = &t.trigger_errors {
        update = update
            .col_expr(
                C::TriggerErrors,
                Expr::value(serde_json::Value::from(errors.first.clone())),
            )
            .col_expr(C::TriggerErrorCount, Expr::value(errors.count));
    }
    if update.exec(&txn).await?.rows_affected == 0 {
        txn.rollback().await?;
        return Ok(false);
    }
    let row = send_submissions::Entity::find_by_id(id)
        .one(&txn)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("submission {id}")))?;
    let (to, reason) = if t.to == SendState::Pending && row.cancel_requested_at.is_some() {
        (
            SendState::Cancelled,
            format!("{}; cancelled instead of queued again", t.reason),
        )
    } else {
        (t.to, t.reason.clone())
    };
    record_history(
        &txn,
        row.send_id,
        Some(row.segment_id),
        Some(t.from),
        to,
        &t.actor,
        &reason,
        now,
    )
    .await?;
    refresh_send_state(&txn, row.send_id, now).await?;
    txn.commit().await?;
    Ok(true)
}

/// What [`cancel`] did to a send's submissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CancelOutcome {
    /// `pending` ones, now `cancelled`: they never go out.
    pub cancelled: u64,
    /// Claimed (`submitting`) or `uncertain` ones: their attempt may have gone out; marked, so
    /// that they are cancelled if it did not and they would be queued again.
    pub marked: u64,
}

/// Stops what of send `send_id` no dispatcher has claimed, in one transaction, per submission
/// by one conditional update of its row — the row [`claim`] updates, so of a claim and a cancel
/// exactly one wins: `pending` → `cancelled`; `submitting` / `uncertain` get
/// `cancel_requested_at` (a later move back to `pending` makes them `cancelled`, see
/// [`transition`]); terminal ones are left alone. Records history and the send's state.
pub async fn cancel(
    db: &impl TransactionTrait,
    send_id: i64,
    actor: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<CancelOutcome, DbError> {
    use send_submissions::Column as C;
    let now = db_time(now);
    let txn = begin_write(db).await?;
    let ids: Vec<i64> = send_submissions::Entity::find()
        .select_only()
        .column(C::Id)
        .filter(C::SendId.eq(send_id))
        .order_by_asc(C::Id)
        .into_tuple()
        .all(&txn)
        .await?;
    let open = [
        SendState::Pending,
        SendState::Submitting,
        SendState::Uncertain,
    ];
    let mut outcome = CancelOutcome::default();
    for id in ids {
        let changed = send_submissions::Entity::update_many()
            .col_expr(
                C::State,
                Expr::cust("CASE WHEN state = 'pending' THEN 'cancelled' ELSE state END"),
            )
            .col_expr(
                C::CancelRequestedAt,
                sea_orm::sea_query::Func::coalesce([
                    Expr::col(C::CancelRequestedAt),
                    Expr::value(now),
                ])
                .into(),
            )
            .col_expr(C::UpdatedAt, Expr::value(now))
            .filter(C::Id.eq(id))
            .filter(C::State.is_in(open.iter().map(|s| s.as_str())))
            .exec(&txn)
            .await?
            .rows_affected;
        if changed == 0 {
            continue;
        }
        let row = send_submissions::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("submission {id}")))?;
        if row.state == SendState::Cancelled.as_str() {
            outcome.cancelled += 1;
            record_history(
                &txn,
                send_id,
                Some(row.segment_id),
                Some(SendState::Pending),
                SendState::Cancelled,
                actor,
                reason,
                now,
            )
            .await?;
        } else {
            outcome.marked += 1;
        }
    }
    if outcome.cancelled > 0 {
        refresh_send_state(&txn, send_id, now).await?;
    }
    txn.commit().await?;
    Ok(outcome)
}

/// `submitting` submissions whose claim expired before `now` (their dispatcher stopped while
/// the request may have been out) become `uncertain`. Returns them (as they were).
pub async fn expire_claims(
    db: &(impl TransactionTrait + ConnectionTrait),
    workspace_id: i64,
    now: DateTime<Utc>,
) -> Result<Vec<Submission>, DbError> {
    let stale: Vec<Submission> = send_submissions::Entity::find()
        .filter(send_submissions::Column::WorkspaceId.eq(workspace_id))
        .filter(send_submissions::Column::State.eq(SendState::Submitting.as_str()))
        .filter(send_submissions::Column::ClaimExpiresAt.lt(db_time(now)))
        .all(db)
        .await?
        .into_iter()
        .map(Submission::try_from)
        .collect::<Result<_, _>>()?;
    let mut expired = Vec::new();
    for s in stale {
        let holder = s.claimed_by.clone().unwrap_or_default();
        let t = Transition::new(
            SendState::Submitting,
            SendState::Uncertain,
            "reconciler",
            "the dispatcher stopped before recording the outcome",
        )
        .held_by(&holder)
        .error("the dispatcher stopped while the request may have been on its way");
        if transition(db, s.id, &t, now).await? {
            expired.push(s);
        }
    }
    Ok(expired)
}

/// The database's own clock (PostgreSQL `clock_timestamp()`, SQLite `julianday('now')`), to
/// millisecond precision: how a process checks its clock against the one every process shares.
pub async fn database_now(db: &impl ConnectionTrait) -> Result<DateTime<Utc>, DbError> {
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS ms"
        }
        _ => "SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) AS ms",
    };
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(backend, sql))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the database's time".into()))?;
    let ms: i64 = row.try_get("", "ms")?;
    DateTime::from_timestamp_millis(ms).ok_or_else(|| {
        DbError::from(DbErr::Type(format!(
            "database time {ms} ms is out of range"
        )))
    })
}

async fn refresh_send_state(
    db: &impl ConnectionTrait,
    send_id: i64,
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    let states: Vec<String> = send_submissions::Entity::find()
        .select_only()
        .column(send_submissions::Column::State)
        .filter(send_submissions::Column::SendId.eq(send_id))
        .into_tuple()
        .all(db)
        .await?;
    let states = states
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<SendState>, _>>()?;
    sends::Entity::update_many()
        .col_expr(
            sends::Column::State,
            Expr::value(SendState::aggregate(states).as_str()),
        )
        .col_expr(sends::Column::UpdatedAt, Expr::value(now))
        .filter(sends::Column::Id.eq(send_id))
        .exec(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SendState::*;
    use super::*;

    #[test]
    fn aggregate_puts_attention_first() {
        assert_eq!(
            SendState::aggregate([Completed, Uncertain, Failed]),
            Uncertain
        );
        assert_eq!(SendState::aggregate([Completed, Failed, Pending]), Failed);
        assert_eq!(
            SendState::aggregate([Submitted, Submitting, Pending]),
            Submitting
        );
        assert_eq!(SendState::aggregate([Submitted, Pending]), Pending);
        assert_eq!(SendState::aggregate([Completed, Completed]), Completed);
        assert_eq!(SendState::aggregate([Completed, Submitted]), Submitted);
        assert_eq!(SendState::aggregate([Cancelled, Pending]), Pending);
        assert_eq!(SendState::aggregate([Completed, Cancelled]), Cancelled);
        assert_eq!(SendState::aggregate([Cancelled]), Cancelled);
    }

    #[test]
    fn states_round_trip() {
        for state in SendState::ALL {
            assert_eq!(state.as_str().parse::<SendState>().ok(), Some(state));
        }
        assert!("sent".parse::<SendState>().is_err());
    }
}
