//! A/B tests: [`create`] records one or finds the one already recorded under the same request
//! id (race-safe through the unique index); [`get`], [`get_by_request`], [`list`] read them; [`decide`] sets the
//! state and decision once, only from an expected state, so that two deciders (the evaluation
//! job and an operator) cannot both win, and stops the variant sends not yet claimed;
//! [`create_arm_send`] records an arm's send only while the test still wants it. The spec, warnings and decision are JSON that core
//! owns; this module stores them as given.
//!
//! Running tests: [`start`] stores the allocation of the audience snapshot and the arms and
//! moves the test from draft to running in ONE transaction (guarded: a second start finds it
//! running and stores nothing). [`arms`], [`arm_members_page`] read them; [`set_arm_segment`],
//! [`set_arm_members`], [`set_arm_send`] record the evaluation job's progress, each only once
//! (a column set when still empty), so two advancers agree; [`record_look`] continues the
//! sequential state; [`arms_of_sends`] tells which arm a send was (analytics);
//! [`arm_audiences`] which of some submissions sent an arm and to whom (the delivery poll);
//! [`arm_results`] counts an arm's delivery events of its send, attributed by
//! the stored allocation; [`active`] lists the tests the job still has work on.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, TransactionSession,
};
use serde_json::Value;

use crate::DbError;
use crate::database::begin_write;
use crate::entities::{ab_test_allocations, ab_test_arms, ab_tests};
use crate::sends;
use crate::time::db_time;

stored_enum! {
    /// Where a test is in its life.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum TestState {
        /// Recorded, not started.
        Draft = "draft",
        /// Variants sent; results watched.
        Running = "running",
        /// A winner found or declared.
        Decided = "decided",
        /// Stopped; no remainder send.
        Cancelled = "cancelled",
    }
}

/// A stored test.
#[derive(Debug, Clone, PartialEq)]
pub struct TestRecord {
    pub id: i64,
    pub public_id: String,
    pub request_id: String,
    pub assignment_id: String,
    pub title: String,
    pub spec: Value,
    pub state: TestState,
    pub planned_per_variant: i64,
    pub audience_estimate: i64,
    pub warnings: Value,
    pub decision: Option<Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub sequential: Option<Value>,
    pub looks: i64,
    pub completed_at: Option<DateTime<Utc>>,
}

impl TryFrom<ab_tests::Model> for TestRecord {
    type Error = DbErr;
    fn try_from(m: ab_tests::Model) -> Result<Self, DbErr> {
        Ok(Self {
            id: m.id,
            public_id: m.public_id,
            request_id: m.request_id,
            assignment_id: m.assignment_id,
            title: m.title,
            spec: m.spec,
            state: m.state.parse()?,
            planned_per_variant: m.planned_per_variant,
            audience_estimate: m.audience_estimate,
            warnings: m.warnings,
            decision: m.decision,
            created_by: m.created_by,
            created_at: m.created_at,
            updated_at: m.updated_at,
            started_at: m.started_at,
            sequential: m.sequential,
            looks: m.looks,
            completed_at: m.completed_at,
        })
    }
}

/// What [`create`] records.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTest {
    pub public_id: String,
    pub request_id: String,
    pub assignment_id: String,
    pub title: String,
    pub spec: Value,
    pub planned_per_variant: i64,
    pub audience_estimate: i64,
    pub warnings: Value,
    pub created_by: String,
}

/// Whether [`create`] recorded the test or found one under the same request id.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    New(TestRecord),
    Existing(TestRecord),
}

/// Records `new` as a draft, unless a test with its request id exists in the workspace: then
/// that one is answered (whatever its spec; the caller compares).
pub async fn create(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    new: &NewTest,
    now: DateTime<Utc>,
) -> Result<Created, DbError> {
    let now = db_time(now);
    let row = ab_tests::ActiveModel {
        id: NotSet,
        workspace_id: Set(workspace_id),
        public_id: Set(new.public_id.clone()),
        request_id: Set(new.request_id.clone()),
        assignment_id: Set(new.assignment_id.clone()),
        title: Set(new.title.clone()),
        spec: Set(new.spec.clone()),
        state: Set(TestState::Draft.as_str().to_owned()),
        planned_per_variant: Set(new.planned_per_variant),
        audience_estimate: Set(new.audience_estimate),
        warnings: Set(new.warnings.clone()),
        decision: Set(None),
        created_by: Set(new.created_by.clone()),
        created_at: Set(now),
        updated_at: Set(now),
        started_at: Set(None),
        sequential: Set(None),
        looks: Set(0),
        completed_at: Set(None),
    };
    let inserted = ab_tests::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([ab_tests::Column::WorkspaceId, ab_tests::Column::RequestId])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    let record = get_by_request(db, workspace_id, &new.request_id)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("test just recorded".into()))?;
    Ok(if inserted == 0 {
        Created::Existing(record)
    } else {
        Created::New(record)
    })
}

/// The test with this public id in the workspace.
pub async fn get(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    public_id: &str,
) -> Result<Option<TestRecord>, DbError> {
    let row = ab_tests::Entity::find()
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::PublicId.eq(public_id))
        .one(db)
        .await?;
    Ok(row.map(TestRecord::try_from).transpose()?)
}

/// The test recorded under this request id in the workspace.
pub async fn get_by_request(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    request_id: &str,
) -> Result<Option<TestRecord>, DbError> {
    let row = ab_tests::Entity::find()
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::RequestId.eq(request_id))
        .one(db)
        .await?;
    Ok(row.map(TestRecord::try_from).transpose()?)
}

/// Tests newest first: of one assignment (or all), with an id below `before_id` (the page
/// position), at most `limit`.
pub async fn list(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    assignment_id: Option<&str>,
    before_id: Option<i64>,
    limit: u64,
) -> Result<Vec<TestRecord>, DbError> {
    let mut query = ab_tests::Entity::find().filter(ab_tests::Column::WorkspaceId.eq(workspace_id));
    if let Some(assignment_id) = assignment_id {
        query = query.filter(ab_tests::Column::AssignmentId.eq(assignment_id));
    }
    if let Some(before) = before_id {
        query = query.filter(ab_tests::Column::Id.lt(before));
    }
    let rows = query
        .order_by_desc(ab_tests::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(TestRecord::try_from)
        .collect::<Result<_, _>>()?)
}

/// Moves test `id` from one of `from` to `to` with `decision`, only if it is still in one of
/// `from`, and — in the same transaction — stops every variant send of the test that no
/// dispatcher has claimed yet ([`sends::cancel`], found by [`send_key`]: the arm may not
/// record its send yet). Returns whether it moved (false: someone else moved it first, and
/// nothing was changed).
///
/// With [`create_arm_send`] (which creates a variant's send only in a transaction that finds
/// the test running, holding its row) this is what makes "no variant goes out after the test
/// was decided or cancelled, unless its request was already claimed" exact: whichever of the
/// two transactions takes the test's row second sees what the first committed.
pub async fn decide(
    db: &impl sea_orm::TransactionTrait,
    workspace_id: i64,
    id: i64,
    from: &[TestState],
    to: TestState,
    decision: &Value,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    decide_with_audit(db, workspace_id, id, from, to, decision, now, None).await
}

/// [`decide`], appending `audit` (a decision no call made, such as the evaluation job's) in the
/// same transaction: the record has the decision if and only if the test does.
#[allow(clippy::too_many_arguments)]
pub async fn decide_with_audit(
    db: &impl sea_orm::TransactionTrait,
    workspace_id: i64,
    id: i64,
    from: &[TestState],
    to: TestState,
    decision: &Value,
    now: DateTime<Utc>,
    audit: Option<crate::audit::NewAuditEvent>,
) -> Result<bool, DbError> {
    let txn = begin_write(db).await?;
    let result = ab_tests::Entity::update_many()
        .col_expr(ab_tests::Column::State, Expr::value(to.as_str()))
        .col_expr(ab_tests::Column::Decision, Expr::value(decision.clone()))
        .col_expr(ab_tests::Column::UpdatedAt, Expr::value(db_time(now)))
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::Id.eq(id))
        .filter(ab_tests::Column::State.is_in(from.iter().map(|s| s.as_str())))
        .exec(&txn)
        .await?;
    if result.rows_affected != 1 {
        txn.rollback().await?;
        return Ok(false);
    }
    let test = ab_tests::Entity::find_by_id(id)
        .one(&txn)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("test {id}")))?;
    let reason = format!(
        "A/B test {} {}: a variant not yet claimed does not go out",
        test.public_id,
        to.as_str()
    );
    for arm in arms(&txn, id).await?.into_iter().filter(|a| a.arm >= 0) {
        let key = send_key(&test.public_id, arm.arm);
        if let Some(send) = sends::get_by_key(&txn, workspace_id, &test.assignment_id, &key).await?
        {
            sends::cancel(&txn, send.id, "abtest", &reason, now).await?;
        }
    }
    if let Some(event) = audit {
        crate::audit::append(&txn, event).await?;
    }
    txn.commit().await?;
    Ok(true)
}

/// The send request id of `arm` of test `public_id` (`abtest:<test>:v<n>` or
/// `abtest:<test>:remainder`): the send machinery's key, with the test's assignment id.
pub fn send_key(public_id: &str, arm: i32) -> String {
    if arm == REMAINDER {
        format!("abtest:{public_id}:remainder")
    } else {
        format!("abtest:{public_id}:v{arm}")
    }
}

/// The variants of test `id` whose people got nothing: no send was recorded for them (none can
/// be once the test is decided, see [`create_arm_send`]) or it was cancelled before any request
/// left. Their people join the remainder.
pub async fn unsent_variant_arms(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    id: i64,
) -> Result<Vec<i32>, DbError> {
    let test = ab_tests::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("test {id}")))?;
    let mut unsent = Vec::new();
    for arm in arms(db, id).await?.into_iter().filter(|a| a.arm >= 0) {
        let key = send_key(&test.public_id, arm.arm);
        match sends::get_by_key(db, workspace_id, &test.assignment_id, &key).await? {
            None => unsent.push(arm.arm),
            Some(send) if send.state == sends::SendState::Cancelled => unsent.push(arm.arm),
            Some(_) => {}
        }
    }
    Ok(unsent)
}

/// Records `new` (an arm's send, see [`sends::create`]) only while test `id` is in state
/// `wanted` (running for a variant, decided for the remainder), in one transaction that holds
/// the test's row from that check to the commit. Returns `None`, recording nothing, when the
/// test is no longer in `wanted`.
pub async fn create_arm_send(
    db: &impl sea_orm::TransactionTrait,
    workspace_id: i64,
    id: i64,
    wanted: TestState,
    new: &sends::NewSend,
    now: DateTime<Utc>,
) -> Result<Option<sends::Created>, DbError> {
    let txn = begin_write(db).await?;
    // A no-op update takes the row (PostgreSQL) as decide's update does; SQLite's writers are
    // serialised by the transaction itself.
    let held = ab_tests::Entity::update_many()
        .col_expr(
            ab_tests::Column::UpdatedAt,
            Expr::col(ab_tests::Column::UpdatedAt),
        )
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::Id.eq(id))
        .filter(ab_tests::Column::State.eq(wanted.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    if held != 1 {
        txn.rollback().await?;
        return Ok(None);
    }
    let created = sends::create(&txn, workspace_id, new, now).await?;
    txn.commit().await?;
    Ok(Some(created))
}

/// The remainder's arm number.
pub const REMAINDER: i32 = -1;

/// Rows per multi-row insert of allocations (three values each).
const ALLOCATION_CHUNK: usize = 1000;

/// Starts draft test `id`: in one transaction, moves it to running (only from draft), records
/// `sequential` as its rule's initial state, stores every `(customer id, arm)` of `allocations`
/// and one arm row per variant (`0..variants`) and the remainder ([`REMAINDER`]) with its
/// member count. Returns whether this call started it (false: it was no longer a draft, and
/// nothing was stored).
pub async fn start(
    db: &impl sea_orm::TransactionTrait,
    workspace_id: i64,
    id: i64,
    variants: usize,
    allocations: &[(String, i32)],
    sequential: &Value,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let now = db_time(now);
    let txn = begin_write(db).await?;
    let moved = ab_tests::Entity::update_many()
        .col_expr(
            ab_tests::Column::State,
            Expr::value(TestState::Running.as_str()),
        )
        .col_expr(ab_tests::Column::StartedAt, Expr::value(now))
        .col_expr(
            ab_tests::Column::Sequential,
            Expr::value(sequential.clone()),
        )
        .col_expr(ab_tests::Column::UpdatedAt, Expr::value(now))
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::Id.eq(id))
        .filter(ab_tests::Column::State.eq(TestState::Draft.as_str()))
        .exec(&txn)
        .await?
        .rows_affected;
    if moved != 1 {
        txn.rollback().await?;
        return Ok(false);
    }
    for chunk in allocations.chunks(ALLOCATION_CHUNK) {
        let rows = chunk
            .iter()
            .map(|(customer_id, arm)| ab_test_allocations::ActiveModel {
                test_id: Set(id),
                customer_id: Set(customer_id.clone()),
                arm: Set(*arm),
            });
        ab_test_allocations::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([
                    ab_test_allocations::Column::TestId,
                    ab_test_allocations::Column::CustomerId,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
    }
    let arms = (0..variants)
        .filter_map(|v| i32::try_from(v).ok())
        .chain(std::iter::once(REMAINDER))
        .map(|arm| ab_test_arms::ActiveModel {
            test_id: Set(id),
            arm: Set(arm),
            members: Set(allocations.iter().filter(|(_, a)| *a == arm).count() as i64),
            cio_segment_id: Set(None),
            members_queued_at: Set(None),
            send_id: Set(None),
            send_public_id: Set(None),
            note: Set(None),
        });
    ab_test_arms::Entity::insert_many(arms)
        .exec_without_returning(&txn)
        .await?;
    txn.commit().await?;
    Ok(true)
}

/// One arm of a started test.
pub type ArmRecord = ab_test_arms::Model;

/// The arms of test `id` (variants in order, the remainder first as -1).
pub async fn arms(db: &impl ConnectionTrait, id: i64) -> Result<Vec<ArmRecord>, DbError> {
    Ok(ab_test_arms::Entity::find()
        .filter(ab_test_arms::Column::TestId.eq(id))
        .order_by_asc(ab_test_arms::Column::Arm)
        .all(db)
        .await?)
}

/// Customer ids allocated to `arm` of test `id`, in order, after `after`, at most `limit`.
pub async fn arm_members_page(
    db: &impl ConnectionTrait,
    id: i64,
    arm: i32,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<String>, DbError> {
    let mut query = ab_test_allocations::Entity::find()
        .select_only()
        .column(ab_test_allocations::Column::CustomerId)
        .filter(ab_test_allocations::Column::TestId.eq(id))
        .filter(ab_test_allocations::Column::Arm.eq(arm));
    if let Some(after) = after {
        query = query.filter(ab_test_allocations::Column::CustomerId.gt(after));
    }
    Ok(query
        .order_by_asc(ab_test_allocations::Column::CustomerId)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// How many people of test `id` are in each arm (from the allocation; arms without anyone are
/// absent).
pub async fn allocation_counts(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Vec<(i32, i64)>, DbError> {
    Ok(ab_test_allocations::Entity::find()
        .select_only()
        .column(ab_test_allocations::Column::Arm)
        .column_as(
            Expr::col(ab_test_allocations::Column::CustomerId).count(),
            "n",
        )
        .filter(ab_test_allocations::Column::TestId.eq(id))
        .group_by(ab_test_allocations::Column::Arm)
        .into_tuple()
        .all(db)
        .await?)
}

/// The arms whose send is one of `send_ids`, with their test (of the workspace): which
/// variant of which test each of these sends was.
pub async fn arms_of_sends(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    send_ids: &[i64],
) -> Result<Vec<(ArmRecord, TestRecord)>, DbError> {
    let arms = ab_test_arms::Entity::find()
        .filter(ab_test_arms::Column::SendId.is_in(send_ids.iter().copied()))
        .all(db)
        .await?;
    if arms.is_empty() {
        return Ok(Vec::new());
    }
    let tests = ab_tests::Entity::find()
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::Id.is_in(arms.iter().map(|a| a.test_id)))
        .all(db)
        .await?
        .into_iter()
        .map(|t| Ok((t.id, TestRecord::try_from(t)?)))
        .collect::<Result<std::collections::HashMap<i64, TestRecord>, DbErr>>()?;
    Ok(arms
        .into_iter()
        .filter_map(|a| tests.get(&a.test_id).cloned().map(|t| (a, t)))
        .collect())
}

/// What [`arm_audiences`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArmAudiences {
    /// The submissions that sent an A/B test's arm (a variant or the remainder): their
    /// audience is known exactly, the people allocated to that arm.
    pub arm_submissions: std::collections::BTreeSet<i64>,
    /// `(submission, customer id)`: the customer was allocated to that submission's arm.
    pub members: std::collections::HashSet<(i64, String)>,
}

/// Which of the submissions `submission_ids` (of the workspace) sent an A/B test's arm, and
/// which of `customer_ids` each such arm was allocated to (the delivery poll: a broadcast's
/// messages do not say their trigger, the allocation says whose arm a person was).
pub async fn arm_audiences(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    submission_ids: &[i64],
    customer_ids: &[String],
) -> Result<ArmAudiences, DbError> {
    use sea_orm::{Statement, Value as V};
    let mut out = ArmAudiences::default();
    if submission_ids.is_empty() {
        return Ok(out);
    }
    let backend = db.get_database_backend();
    // Integers only: safe to inline.
    let subs = submission_ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    #[derive(FromQueryResult)]
    struct Sub {
        id: i64,
    }
    let arm_subs = Sub::find_by_statement(Statement::from_sql_and_values(
        backend,
        format!(
            "SELECT s.id AS id FROM send_submissions s JOIN ab_test_arms a ON a.send_id = s.send_id \
             WHERE s.workspace_id = $1 AND s.id IN ({subs})"
        ),
        [V::from(workspace_id)],
    ))
    .all(db)
    .await?;
    out.arm_submissions = arm_subs.into_iter().map(|s| s.id).collect();
    if out.arm_submissions.is_empty() {
        return Ok(out);
    }
    #[derive(FromQueryResult)]
    struct Member {
        id: i64,
        customer_id: String,
    }
    for chunk in customer_ids.chunks(500) {
        let mut values = vec![V::from(workspace_id)];
        let mut marks = Vec::with_capacity(chunk.len());
        for c in chunk {
            values.push(V::from(c.clone()));
            marks.push(format!("${}", values.len()));
        }
        let members = Member::find_by_statement(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT s.id AS id, al.customer_id AS customer_id FROM send_submissions s \
                 JOIN ab_test_arms a ON a.send_id = s.send_id \
                 JOIN ab_test_allocations al ON al.test_id = a.test_id AND al.arm = a.arm \
                 WHERE s.workspace_id = $1 AND s.id IN ({subs}) AND al.customer_id IN ({})",
                marks.join(",")
            ),
            values,
        ))
        .all(db)
        .await?;
        out.members
            .extend(members.into_iter().map(|m| (m.id, m.customer_id)));
    }
    Ok(out)
}

/// Records the manual segment of an arm, unless one is recorded. Returns the one recorded.
pub async fn set_arm_segment(
    db: &impl ConnectionTrait,
    id: i64,
    arm: i32,
    cio_segment_id: i64,
) -> Result<Option<i64>, DbError> {
    ab_test_arms::Entity::update_many()
        .col_expr(
            ab_test_arms::Column::CioSegmentId,
            Expr::value(cio_segment_id),
        )
        .filter(ab_test_arms::Column::TestId.eq(id))
        .filter(ab_test_arms::Column::Arm.eq(arm))
        .filter(ab_test_arms::Column::CioSegmentId.is_null())
        .exec(db)
        .await?;
    Ok(arm_of(db, id, arm).await?.and_then(|a| a.cio_segment_id))
}

/// Records that an arm's `members` were queued for its segment (once).
pub async fn set_arm_members(
    db: &impl ConnectionTrait,
    id: i64,
    arm: i32,
    members: i64,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    ab_test_arms::Entity::update_many()
        .col_expr(ab_test_arms::Column::Members, Expr::value(members))
        .col_expr(
            ab_test_arms::Column::MembersQueuedAt,
            Expr::value(db_time(now)),
        )
        .filter(ab_test_arms::Column::TestId.eq(id))
        .filter(ab_test_arms::Column::Arm.eq(arm))
        .filter(ab_test_arms::Column::MembersQueuedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Records an arm's send (or, with `send` `None`, why it has none), unless one is recorded.
pub async fn set_arm_send(
    db: &impl ConnectionTrait,
    id: i64,
    arm: i32,
    send: Option<(i64, &str)>,
    note: Option<&str>,
) -> Result<(), DbError> {
    ab_test_arms::Entity::update_many()
        .col_expr(ab_test_arms::Column::SendId, Expr::value(send.map(|s| s.0)))
        .col_expr(
            ab_test_arms::Column::SendPublicId,
            Expr::value(send.map(|s| s.1.to_owned())),
        )
        .col_expr(
            ab_test_arms::Column::Note,
            Expr::value(note.map(str::to_owned)),
        )
        .filter(ab_test_arms::Column::TestId.eq(id))
        .filter(ab_test_arms::Column::Arm.eq(arm))
        .filter(ab_test_arms::Column::SendId.is_null())
        .filter(ab_test_arms::Column::Note.is_null())
        .exec(db)
        .await?;
    Ok(())
}

async fn arm_of(
    db: &impl ConnectionTrait,
    id: i64,
    arm: i32,
) -> Result<Option<ArmRecord>, DbError> {
    Ok(ab_test_arms::Entity::find()
        .filter(ab_test_arms::Column::TestId.eq(id))
        .filter(ab_test_arms::Column::Arm.eq(arm))
        .one(db)
        .await?)
}

/// Stores the sequential state after a look and counts the look, only while the test runs.
pub async fn record_look(
    db: &impl ConnectionTrait,
    id: i64,
    sequential: &Value,
) -> Result<bool, DbError> {
    let result = ab_tests::Entity::update_many()
        .col_expr(
            ab_tests::Column::Sequential,
            Expr::value(sequential.clone()),
        )
        .col_expr(
            ab_tests::Column::Looks,
            Expr::col(ab_tests::Column::Looks).add(1),
        )
        .filter(ab_tests::Column::Id.eq(id))
        .filter(ab_tests::Column::State.eq(TestState::Running.as_str()))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Marks the job's work on test `id` done.
pub async fn complete(
    db: &impl ConnectionTrait,
    id: i64,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    ab_tests::Entity::update_many()
        .col_expr(ab_tests::Column::CompletedAt, Expr::value(db_time(now)))
        .filter(ab_tests::Column::Id.eq(id))
        .filter(ab_tests::Column::CompletedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Tests the evaluation job still has work on: running ones, and decided ones not completed.
pub async fn active(
    db: &impl ConnectionTrait,
    workspace_id: i64,
) -> Result<Vec<TestRecord>, DbError> {
    let rows = ab_tests::Entity::find()
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(
            ab_tests::Column::State
                .is_in([TestState::Running.as_str(), TestState::Decided.as_str()]),
        )
        .filter(ab_tests::Column::CompletedAt.is_null())
        .order_by_asc(ab_tests::Column::Id)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(TestRecord::try_from)
        .collect::<Result<_, _>>()?)
}

/// What an arm's recipients did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromQueryResult)]
pub struct ArmCounts {
    /// People delivered (or who opened/clicked/converted, which implies it).
    pub recipients: i64,
    /// People who opened (by a person: prefetched opens excluded; a click counts).
    pub human_opens: i64,
    /// People who clicked (by a person: link scanners excluded).
    pub human_clicks: i64,
    pub conversions: i64,
}

/// Counts, per person, what the delivery events of the test's variant sends (`send_ids`) show
/// for the people the stored allocation put in `arm` of test `id` (a person counts once
/// whatever the number of events). Attribution is by the allocation: a person of one arm only
/// ever receives that arm's send, so an event the delivery poll tied to a sibling variant's
/// send (the App API's messages carry no trigger id; two triggers in one second look alike)
/// still counts for the right variant. Webhook flags decide human vs machine; a polled open or
/// click (no flags) counts when no webhook told, as in [`crate::engagement::delivery_facts`].
pub async fn arm_results(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    id: i64,
    arm: i32,
    send_ids: &[i64],
) -> Result<ArmCounts, DbError> {
    if send_ids.is_empty() {
        return Ok(ArmCounts::default());
    }
    // Integers only: safe to inline.
    let sends = send_ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let backend = db.get_database_backend();
    let p: Vec<String> = (1..=3)
        .map(|n| match backend {
            sea_orm::DbBackend::Postgres => format!("${n}"),
            _ => "?".to_owned(),
        })
        .collect();
    let sql = format!(
        "SELECT COUNT(*) AS recipients, \
         COALESCE(SUM(CASE WHEN human_click = 1 OR webhook_human_open = 1 OR (poll_open = 1 AND webhook_open = 0) THEN 1 ELSE 0 END), 0) AS human_opens, \
         COALESCE(SUM(CASE WHEN human_click = 1 THEN 1 ELSE 0 END), 0) AS human_clicks, \
         COALESCE(SUM(converted), 0) AS conversions \
         FROM (SELECT e.customer_id, \
           MAX(CASE WHEN e.metric IN ('delivered','opened','clicked','converted') THEN 1 ELSE 0 END) AS delivered, \
           MAX(CASE WHEN e.source = 'webhook' AND e.metric = 'opened' AND NOT e.prefetched THEN 1 ELSE 0 END) AS webhook_human_open, \
           MAX(CASE WHEN e.source = 'webhook' AND e.metric = 'opened' THEN 1 ELSE 0 END) AS webhook_open, \
           MAX(CASE WHEN e.source = 'poll' AND e.metric = 'opened' THEN 1 ELSE 0 END) AS poll_open, \
           CASE WHEN MAX(CASE WHEN e.source = 'webhook' AND e.metric = 'clicked' AND NOT e.machine THEN 1 ELSE 0 END) = 1 \
             OR (MAX(CASE WHEN e.source = 'poll' AND e.metric = 'clicked' THEN 1 ELSE 0 END) = 1 \
                 AND MAX(CASE WHEN e.source = 'webhook' AND e.metric = 'clicked' THEN 1 ELSE 0 END) = 0) \
             THEN 1 ELSE 0 END AS human_click, \
           MAX(CASE WHEN e.metric = 'converted' THEN 1 ELSE 0 END) AS converted \
           FROM delivery_events e \
           JOIN ab_test_allocations a ON a.customer_id = e.customer_id \
           WHERE e.workspace_id = {} AND e.send_id IN ({sends}) AND a.test_id = {} AND a.arm = {} \
           GROUP BY e.customer_id) per_person \
         WHERE delivered = 1",
        p[0], p[1], p[2]
    );
    let stmt = sea_orm::Statement::from_sql_and_values(
        backend,
        sql,
        [workspace_id.into(), id.into(), arm.into()],
    );
    Ok(ArmCounts::find_by_statement(stmt)
        .one(db)
        .await?
        .unwrap_or_default())
}

/// Membership changes of managed segment `cio_segment_id` not yet delivered to Customer.io
/// (pending, in flight or dead-lettered): the segment's membership has arrived when none is.
pub async fn segment_changes_outstanding(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    cio_segment_id: i64,
) -> Result<u64, DbError> {
    use crate::entities::outbox;
    use sea_orm::PaginatorTrait;
    Ok(outbox::Entity::find()
        .filter(outbox::Column::WorkspaceId.eq(workspace_id))
        .filter(
            outbox::Column::CustomerId.eq(crate::managed_segments::outbox_label(cio_segment_id)),
        )
        .filter(outbox::Column::Status.ne(crate::outbox::Status::Delivered.as_str()))
        .count(db)
        .await?)
}
