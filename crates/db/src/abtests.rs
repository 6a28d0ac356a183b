//! A/B tests: [`create`] records one or finds the one already recorded under the same request
//! id (race-safe through the unique index); [`get`], [`get_by_request`], [`list`] read them; [`decide`] sets the
//! state and decision once, only from an expected state, so that two deciders (the evaluation
//! job and an operator) cannot both win. The spec, warnings and decision are JSON that core
//! owns; this module stores them as given.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde_json::Value;

use crate::DbError;
use crate::entities::ab_tests;
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
/// `from`. Returns whether it moved (false: someone else moved it first).
pub async fn decide(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    id: i64,
    from: &[TestState],
    to: TestState,
    decision: &Value,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let result = ab_tests::Entity::update_many()
        .col_expr(ab_tests::Column::State, Expr::value(to.as_str()))
        .col_expr(ab_tests::Column::Decision, Expr::value(decision.clone()))
        .col_expr(ab_tests::Column::UpdatedAt, Expr::value(db_time(now)))
        .filter(ab_tests::Column::WorkspaceId.eq(workspace_id))
        .filter(ab_tests::Column::Id.eq(id))
        .filter(ab_tests::Column::State.is_in(from.iter().map(|s| s.as_str())))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}
