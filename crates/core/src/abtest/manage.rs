//! Creating, reading, listing, cancelling A/B tests and declaring their winner. A test is
//! validated field by field and planned at creation ([`super::stats::plan`]); its audience is
//! checked against the segment mirror, which also gives the size estimate behind the
//! under-powered warnings. Creation is idempotent on the request id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sharpsend_db::abtests::{self as store, Created, TestRecord};

pub use sharpsend_db::abtests::TestState;

use super::stats::{self, Arm, Plan, PlanError, SequentialState};
use crate::input::{self, limits::ID_BYTES};
use crate::paging::Page;
use crate::segments;
use crate::sends::SendState;
use crate::{AppContext, CoreError, FieldViolation};

const MAX_AUDIENCE_SEGMENTS: usize = 20;
const MIN_VARIANTS: usize = 2;
const MAX_VARIANTS: usize = 8;
const VARIANT_NAME_BYTES: usize = 100;
const TITLE_CHARS: usize = 200;
const SUBJECT_CHARS: usize = 250;
const BODY_BYTES: usize = 100_000;
const DATA_BYTES: usize = 16 * 1024;
const REASON_CHARS: usize = 500;
const DEFAULT_CONFIDENCE: f64 = 0.95;
const DEFAULT_POWER: f64 = 0.8;
const DEFAULT_MAX_HOURS: u32 = 72;
const MAX_HOURS: u32 = 720;

/// What a test optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Human clicks per recipient.
    #[default]
    ClickRate,
    /// Human opens (prefetched opens excluded) per recipient.
    HumanOpenRate,
    /// Conversions per recipient.
    ConversionRate,
}

/// What goes to the remainder when the maximum duration passes without a winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NoWinnerPolicy {
    #[default]
    SendControl,
    SendBestObserved,
    SendNothing,
}

/// How the variants (and the winner) go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestDelivery {
    Broadcast {
        broadcast_id: i64,
    },
    /// `from_id` 0: the workspace's default sender.
    Newsletter {
        from_id: i64,
    },
}

/// One variant's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSpec {
    pub name: String,
    pub subject: String,
    pub body: String,
    /// Extra liquid data (broadcast delivery only).
    pub data: Option<Map<String, Value>>,
}

/// A test's settings, with defaults applied (as stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestSpec {
    pub audience_segment_ids: Vec<i64>,
    pub variants: Vec<VariantSpec>,
    pub test_fraction: f64,
    pub metric: Metric,
    pub delivery: TestDelivery,
    pub confidence: f64,
    pub baseline_rate: f64,
    pub minimum_detectable_effect: f64,
    pub minimum_sample_per_variant: u64,
    pub max_duration_hours: u32,
    pub no_winner_policy: NoWinnerPolicy,
}

/// A CreateTest call. Zero values mean "the default" where the API says so; `data_json` is the
/// variant's data as the caller wrote it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewTest {
    pub assignment_id: String,
    pub request_id: String,
    pub title: String,
    pub audience_segment_ids: Vec<i64>,
    pub variants: Vec<NewVariant>,
    pub test_fraction: f64,
    pub metric: Metric,
    pub delivery: Option<TestDelivery>,
    pub confidence: f64,
    pub baseline_rate: f64,
    pub minimum_detectable_effect: f64,
    pub minimum_sample_per_variant: i64,
    pub max_duration_hours: i32,
    pub no_winner_policy: NoWinnerPolicy,
    /// Caller identity (API key name).
    pub created_by: String,
}

/// A variant as the caller gave it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewVariant {
    pub name: String,
    pub subject: String,
    pub body: String,
    pub data_json: String,
}

/// How a test was decided (or cancelled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The winning variant; `None` when cancelled or when nothing goes to the remainder.
    pub winner: Option<usize>,
    pub reason: String,
    pub actor: String,
    pub decided_at: DateTime<Utc>,
}

/// One variant's results so far.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantResult {
    pub name: String,
    pub recipients: u64,
    pub human_opens: u64,
    pub human_clicks: u64,
    pub conversions: u64,
    /// The test metric's rate and its 95% Wilson interval.
    pub rate: f64,
    pub interval: (f64, f64),
    /// The always-valid p-value against the control (1 for the control and before results).
    pub p_value_vs_control: f64,
    /// People the allocation put in this variant (0 before the start).
    pub allocated: u64,
    /// The variant's manual segment in Customer.io, once created.
    pub segment_id: Option<i64>,
    /// The variant's send (`snd_…`), once recorded.
    pub send_id: Option<String>,
    /// Where that send stands (`None`: none recorded): submitted or completed = it went out;
    /// submitting or uncertain = its request was claimed and may have; cancelled = stopped
    /// before any request left.
    pub send_state: Option<SendState>,
}

/// The remainder of a started test.
#[derive(Debug, Clone, PartialEq)]
pub struct RemainderView {
    /// People allocated to it at the start; once the winner is known, those still in the
    /// audience (who get the winner).
    pub allocated: u64,
    pub segment_id: Option<i64>,
    /// The winner's send to the remainder, once recorded.
    pub send_id: Option<String>,
    /// Why it has no send (e.g. nobody left).
    pub note: Option<String>,
    /// Where the winner's send stands, once recorded.
    pub send_state: Option<SendState>,
}

/// A test as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TestView {
    pub id: String,
    pub assignment_id: String,
    pub request_id: String,
    pub title: String,
    pub spec: TestSpec,
    pub state: TestState,
    pub planned_per_variant: u64,
    pub audience_estimate: u64,
    pub results: Vec<VariantResult>,
    pub decision: Option<Decision>,
    pub warnings: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When StartTest started it.
    pub started_at: Option<DateTime<Utc>>,
    /// Looks the sequential rule has taken.
    pub looks: u64,
    /// When the evaluation job finished with it (remainder sent, or nothing to send).
    pub completed_at: Option<DateTime<Utc>>,
    pub remainder: Option<RemainderView>,
}

/// The sample a test needs, from the fields of a PlanTest call (zero: the default).
pub fn plan_test(
    baseline_rate: f64,
    minimum_detectable_effect: f64,
    power: f64,
    confidence: f64,
    variants: i32,
) -> Result<Plan, CoreError> {
    let power = if power == 0.0 { DEFAULT_POWER } else { power };
    let confidence = if confidence == 0.0 {
        DEFAULT_CONFIDENCE
    } else {
        confidence
    };
    let variants = if variants == 0 {
        2
    } else {
        usize::try_from(variants).unwrap_or(0)
    };
    stats::plan(
        baseline_rate,
        minimum_detectable_effect,
        power,
        confidence,
        variants,
    )
    .map_err(plan_violation)
}

fn plan_violation(error: PlanError) -> CoreError {
    let field = match error {
        PlanError::Baseline => "baseline_rate",
        PlanError::Effect | PlanError::TooSmall => "minimum_detectable_effect",
        PlanError::Power => "power",
        PlanError::Confidence => "confidence",
        PlanError::Variants => "variants",
    };
    CoreError::invalid(field, error.to_string())
}

/// Records a test (or answers the one already recorded under its request id). Returns the
/// test and whether this call created it.
pub async fn create_test(ctx: &AppContext, new: NewTest) -> Result<(TestView, bool), CoreError> {
    let spec = validate(&new)?;
    let spec_json = serde_json::to_value(&spec)
        .map_err(|e| CoreError::Internal(format!("test spec not serialisable: {e}")))?;
    let fingerprint = json!({
        "assignment_id": new.assignment_id,
        "title": new.title,
        "spec": spec_json,
    });
    let ws = ctx.workspace_id();
    if let Some(existing) = store::get_by_request(&ctx.db, ws, &new.request_id).await? {
        return answer_existing(existing, &fingerprint);
    }

    let plan = stats::plan(
        spec.baseline_rate,
        spec.minimum_detectable_effect,
        DEFAULT_POWER,
        spec.confidence,
        spec.variants.len(),
    )
    .map_err(plan_violation)?;
    let audience = check_audience(ctx, &spec.audience_segment_ids).await?;
    let warnings = power_warnings(&spec, &plan, audience)?;

    let record = store::NewTest {
        public_id: format!("abt_{}", ulid::Ulid::new()),
        request_id: new.request_id.clone(),
        assignment_id: new.assignment_id.clone(),
        title: new.title.clone(),
        spec: fingerprint.clone(),
        planned_per_variant: i64::try_from(plan.per_variant).unwrap_or(i64::MAX),
        audience_estimate: i64::try_from(audience).unwrap_or(i64::MAX),
        warnings: json!(warnings),
        created_by: new.created_by.clone(),
    };
    match store::create(&ctx.db, ws, &record, ctx.now()).await? {
        Created::New(record) => Ok((view(record)?, true)),
        Created::Existing(existing) => answer_existing(existing, &fingerprint),
    }
}

fn answer_existing(
    existing: TestRecord,
    fingerprint: &Value,
) -> Result<(TestView, bool), CoreError> {
    if existing.spec != *fingerprint {
        return Err(CoreError::AlreadyExists(format!(
            "request_id `{}` was used for test {} with a different request; use a new request_id",
            crate::error::shown(&existing.request_id),
            existing.public_id
        )));
    }
    Ok((view(existing)?, false))
}

/// One test by its id, with its results so far.
pub async fn get_test(ctx: &AppContext, id: &str) -> Result<TestView, CoreError> {
    view_with_results(ctx, find(ctx, id).await?).await
}

pub(crate) async fn find(ctx: &AppContext, id: &str) -> Result<TestRecord, CoreError> {
    if let Some(problem) = input::identifier_problem(id, ID_BYTES, true) {
        return Err(CoreError::invalid("id", problem));
    }
    store::get(&ctx.db, ctx.workspace_id(), id)
        .await?
        .ok_or_else(|| CoreError::NotFound {
            what: "A/B test",
            id: crate::error::shown(id),
        })
}

/// Tests newest first, of one assignment or all; `after` is the previous page's position.
pub async fn list_tests(
    ctx: &AppContext,
    assignment_id: Option<&str>,
    limit: u64,
    after: Option<i64>,
) -> Result<Page<TestView, i64>, CoreError> {
    if let Some(assignment_id) = assignment_id
        && let Some(problem) = input::identifier_problem(assignment_id, ID_BYTES, true)
    {
        return Err(CoreError::invalid("assignment_id", problem));
    }
    let rows = store::list(
        &ctx.db,
        ctx.workspace_id(),
        assignment_id,
        after,
        Page::<(), ()>::fetch(limit),
    )
    .await?;
    let page = Page::cut(rows, limit, |t| t.id);
    let mut items = Vec::with_capacity(page.items.len());
    for record in page.items {
        items.push(view_with_results(ctx, record).await?);
    }
    Ok(Page {
        items,
        next: page.next,
    })
}

/// Stops a test that has not finished; nothing goes to the remainder.
pub async fn cancel_test(
    ctx: &AppContext,
    id: &str,
    reason: &str,
    actor: &str,
) -> Result<TestView, CoreError> {
    let reason = check_reason(reason)?;
    let decision = Decision {
        winner: None,
        reason: format!("cancelled by {actor}: {reason}"),
        actor: actor.to_owned(),
        decided_at: ctx.now(),
    };
    settle(ctx, id, TestState::Cancelled, decision).await
}

/// An operator's override: `variant` (by name) wins.
pub async fn declare_winner(
    ctx: &AppContext,
    id: &str,
    variant: &str,
    reason: &str,
    actor: &str,
) -> Result<TestView, CoreError> {
    let reason = check_reason(reason)?;
    let record = find(ctx, id).await?;
    let current = view(record)?;
    let Some(winner) = current.spec.variants.iter().position(|v| v.name == variant) else {
        let names: Vec<&str> = current
            .spec
            .variants
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        return Err(CoreError::invalid(
            "variant",
            format!(
                "is not a variant of this test (its variants: {})",
                names.join(", ")
            ),
        ));
    };
    let decision = Decision {
        winner: Some(winner),
        reason: format!("declared by {actor}: {reason}"),
        actor: actor.to_owned(),
        decided_at: ctx.now(),
    };
    settle(ctx, id, TestState::Decided, decision).await
}

fn check_reason(reason: &str) -> Result<&str, CoreError> {
    let mut violations = Vec::new();
    if reason.trim().is_empty() {
        violations.push(FieldViolation::new("reason", "is required"));
    }
    input::text(&mut violations, "reason", reason, REASON_CHARS);
    input::finish(violations)?;
    Ok(reason.trim())
}

/// Moves an open test (draft or running) to `to` with `decision`, once.
async fn settle(
    ctx: &AppContext,
    id: &str,
    to: TestState,
    decision: Decision,
) -> Result<TestView, CoreError> {
    let record = find(ctx, id).await?;
    let decision_json = serde_json::to_value(&decision)
        .map_err(|e| CoreError::Internal(format!("decision not serialisable: {e}")))?;
    let open = [TestState::Draft, TestState::Running];
    let ws = ctx.workspace_id();
    let moved = store::decide(&ctx.db, ws, record.id, &open, to, &decision_json, ctx.now()).await?;
    let now = find(ctx, id).await?;
    if !moved {
        return Err(CoreError::FailedPrecondition(vec![
            FieldViolation::new(
                "id",
                format!("test {} is already {}", now.public_id, now.state.as_str()),
            )
            .because("TEST_FINISHED"),
        ]));
    }
    view_with_results(ctx, now).await
}

fn corrupt(record: &TestRecord, what: &str) -> CoreError {
    CoreError::Internal(format!("test {} has a bad {what}", record.id))
}

/// The stored spec of a test.
pub(crate) fn spec_of(record: &TestRecord) -> Result<TestSpec, CoreError> {
    record
        .spec
        .get("spec")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| corrupt(record, "spec"))
}

/// The stored decision of a test.
pub(crate) fn decision_of(record: &TestRecord) -> Result<Option<Decision>, CoreError> {
    match &record.decision {
        None => Ok(None),
        Some(d) => serde_json::from_value(d.clone())
            .map(Some)
            .map_err(|_| corrupt(record, "decision")),
    }
}

/// The sequential rule's state so far (a fresh one before the first look, or if unreadable).
pub(crate) fn sequential_of(record: &TestRecord, variants: usize) -> SequentialState {
    record
        .sequential
        .clone()
        .and_then(|s| serde_json::from_value::<SequentialState>(s).ok())
        .filter(|s| s.variants() == variants)
        .unwrap_or_else(|| SequentialState::new(variants))
}

/// The view of a test with its results: per variant, what the delivery events of its send show
/// for the people allocated to it, the metric's rate with its 95% Wilson interval, and the
/// always-valid p-value against the control from the looks taken so far.
pub(crate) async fn view_with_results(
    ctx: &AppContext,
    record: TestRecord,
) -> Result<TestView, CoreError> {
    if record.started_at.is_none() {
        return view(record);
    }
    let spec = spec_of(&record)?;
    let counts = super::run::variant_counts(ctx, &record, spec.variants.len()).await?;
    let sequential = sequential_of(&record, spec.variants.len());
    let arms = sharpsend_db::abtests::arms(&ctx.db, record.id).await?;
    // Each arm's send by its key: the arm may not record a send that exists (a run that died
    // between the two), and a cancel stops such a send too.
    let mut sends = std::collections::HashMap::new();
    for arm in &arms {
        let key = sharpsend_db::abtests::send_key(&record.public_id, arm.arm);
        if let Some(send) = sharpsend_db::sends::get_by_key(
            &ctx.db,
            ctx.workspace_id(),
            &record.assignment_id,
            &key,
        )
        .await?
        {
            sends.insert(arm.arm, send);
        }
    }
    let mut view = view(record)?;
    for (index, (result, c)) in view.results.iter_mut().zip(counts).enumerate() {
        let successes = match spec.metric {
            Metric::ClickRate => c.human_clicks,
            Metric::HumanOpenRate => c.human_opens,
            Metric::ConversionRate => c.conversions,
        };
        let arm = Arm::new(
            u64::try_from(c.recipients).unwrap_or(0),
            u64::try_from(successes).unwrap_or(0),
        );
        result.recipients = arm.recipients;
        result.human_opens = u64::try_from(c.human_opens).unwrap_or(0);
        result.human_clicks = u64::try_from(c.human_clicks).unwrap_or(0);
        result.conversions = u64::try_from(c.conversions).unwrap_or(0);
        result.rate = arm.rate();
        result.interval = arm.interval(0.95);
        result.p_value_vs_control = if index == 0 {
            1.0
        } else {
            sequential.pair(index, 0).0
        };
        if let Some(stored) = arms.iter().find(|a| a.arm as usize == index && a.arm >= 0) {
            result.allocated = u64::try_from(stored.members).unwrap_or(0);
            result.segment_id = stored.cio_segment_id;
            result.send_id = stored.send_public_id.clone();
        }
        if let Some(send) = i32::try_from(index).ok().and_then(|arm| sends.get(&arm)) {
            result.send_id = Some(send.public_id.clone());
            result.send_state = Some(send.state);
        }
    }
    if let Some(remainder) = arms
        .iter()
        .find(|a| a.arm == sharpsend_db::abtests::REMAINDER)
    {
        view.remainder = Some(RemainderView {
            allocated: u64::try_from(remainder.members).unwrap_or(0),
            segment_id: remainder.cio_segment_id,
            send_id: remainder.send_public_id.clone(),
            note: remainder.note.clone(),
            send_state: sends
                .get(&sharpsend_db::abtests::REMAINDER)
                .map(|s| s.state),
        });
    }
    Ok(view)
}

pub(crate) fn view(record: TestRecord) -> Result<TestView, CoreError> {
    let spec = spec_of(&record)?;
    let warnings: Vec<String> = serde_json::from_value(record.warnings.clone())
        .map_err(|_| corrupt(&record, "warnings"))?;
    let decision = decision_of(&record)?;
    // Before the start (and for a variant not sent yet) there are no results.
    let results = spec
        .variants
        .iter()
        .map(|v| {
            let arm = Arm::default();
            VariantResult {
                name: v.name.clone(),
                recipients: arm.recipients,
                human_opens: 0,
                human_clicks: 0,
                conversions: 0,
                rate: arm.rate(),
                interval: arm.interval(0.95),
                p_value_vs_control: 1.0,
                allocated: 0,
                segment_id: None,
                send_id: None,
                send_state: None,
            }
        })
        .collect();
    Ok(TestView {
        id: record.public_id,
        assignment_id: record.assignment_id,
        request_id: record.request_id,
        title: record.title,
        spec,
        state: record.state,
        planned_per_variant: u64::try_from(record.planned_per_variant).unwrap_or(0),
        audience_estimate: u64::try_from(record.audience_estimate).unwrap_or(0),
        results,
        decision,
        warnings,
        created_by: record.created_by,
        created_at: record.created_at,
        updated_at: record.updated_at,
        started_at: record.started_at,
        looks: u64::try_from(record.looks).unwrap_or(0),
        completed_at: record.completed_at,
        remainder: None,
    })
}

/// The audience must be known to the mirror and sendable; answers its estimated size (the sum
/// of its segments' member counts: an upper bound when they overlap).
async fn check_audience(ctx: &AppContext, segment_ids: &[i64]) -> Result<u64, CoreError> {
    let report =
        segments::validate_targeting(ctx, segment_ids, segments::DEFAULT_MAX_COUNT_AGE, ctx.now())
            .await?;
    report.refuse_unsendable("audience_segment_ids")?;
    Ok(u64::try_from(report.total_member_count).unwrap_or(0))
}

/// Refuses a test whose variants cannot reach the minimum sample even with the whole audience;
/// warns when they get less than the plan asks for.
fn power_warnings(spec: &TestSpec, plan: &Plan, audience: u64) -> Result<Vec<String>, CoreError> {
    let variants = spec.variants.len() as f64;
    let per_variant = (audience as f64 * spec.test_fraction / variants).floor() as u64;
    let whole_audience = (audience as f64 / variants).floor() as u64;
    if whole_audience < spec.minimum_sample_per_variant {
        return Err(CoreError::FailedPrecondition(vec![FieldViolation::new(
            "audience_segment_ids",
            format!(
                "the audience (about {audience} people) cannot give {} variants {} recipients \
                 each (minimum_sample_per_variant)",
                spec.variants.len(),
                spec.minimum_sample_per_variant
            ),
        )]));
    }
    let mut warnings = Vec::new();
    if per_variant < spec.minimum_sample_per_variant {
        warnings.push(format!(
            "each variant gets about {per_variant} recipients, below minimum_sample_per_variant \
             ({}); raise test_fraction",
            spec.minimum_sample_per_variant
        ));
    }
    if per_variant < plan.per_variant {
        warnings.push(format!(
            "each variant gets about {per_variant} of the {} recipients the plan needs to find \
             a lift of {} over {} with 80% power; a winner is less likely",
            plan.per_variant, spec.minimum_detectable_effect, spec.baseline_rate
        ));
    }
    Ok(warnings)
}

/// Field-by-field validation; defaults applied.
fn validate(new: &NewTest) -> Result<TestSpec, CoreError> {
    let mut v = Vec::new();
    input::identifier(&mut v, "assignment_id", &new.assignment_id, ID_BYTES, true);
    input::identifier(&mut v, "request_id", &new.request_id, ID_BYTES, true);
    if new.title.trim().is_empty() {
        v.push(FieldViolation::new("title", "is required"));
    }
    input::text(&mut v, "title", &new.title, TITLE_CHARS);

    let audience = &new.audience_segment_ids;
    if audience.is_empty() || audience.len() > MAX_AUDIENCE_SEGMENTS {
        v.push(FieldViolation::new(
            "audience_segment_ids",
            format!(
                "must list 1 to {MAX_AUDIENCE_SEGMENTS} segments, got {}",
                audience.len()
            ),
        ));
    }
    for (i, id) in audience.iter().enumerate() {
        if *id <= 0 {
            v.push(FieldViolation::new(
                format!("audience_segment_ids[{i}]"),
                "must be a positive Customer.io segment id",
            ));
        } else if audience[..i].contains(id) {
            v.push(FieldViolation::new(
                format!("audience_segment_ids[{i}]"),
                format!("segment {id} is listed twice"),
            ));
        }
    }

    let delivery = match new.delivery {
        None => {
            v.push(FieldViolation::new(
                "delivery",
                "choose `broadcast_id` or `newsletter_from_id`",
            ));
            None
        }
        Some(TestDelivery::Broadcast { broadcast_id }) if broadcast_id <= 0 => {
            v.push(FieldViolation::new(
                "broadcast_id",
                "must be a positive broadcast id",
            ));
            None
        }
        Some(TestDelivery::Newsletter { from_id }) if from_id < 0 => {
            v.push(FieldViolation::new(
                "newsletter_from_id",
                "must not be negative",
            ));
            None
        }
        Some(delivery) => Some(delivery),
    };

    if new.variants.len() < MIN_VARIANTS || new.variants.len() > MAX_VARIANTS {
        v.push(FieldViolation::new(
            "variants",
            format!(
                "must list {MIN_VARIANTS} to {MAX_VARIANTS} variants, got {}",
                new.variants.len()
            ),
        ));
    }
    let mut variants = Vec::with_capacity(new.variants.len());
    for (i, variant) in new.variants.iter().take(MAX_VARIANTS).enumerate() {
        let field = |name: &str| format!("variants[{i}].{name}");
        input::identifier(
            &mut v,
            &field("name"),
            &variant.name,
            VARIANT_NAME_BYTES,
            true,
        );
        if new.variants[..i]
            .iter()
            .any(|earlier| earlier.name == variant.name)
        {
            v.push(FieldViolation::new(
                field("name"),
                "is used by an earlier variant",
            ));
        }
        if variant.subject.trim().is_empty() {
            v.push(FieldViolation::new(field("subject"), "is required"));
        }
        input::text(&mut v, &field("subject"), &variant.subject, SUBJECT_CHARS);
        if variant.body.trim().is_empty() {
            v.push(FieldViolation::new(field("body"), "is required"));
        } else if variant.body.len() > BODY_BYTES {
            v.push(FieldViolation::new(
                field("body"),
                format!("is {} bytes; at most {BODY_BYTES}", variant.body.len()),
            ));
        } else if variant.body.contains('\0') {
            v.push(FieldViolation::new(
                field("body"),
                "must not contain NUL characters",
            ));
        }
        let data = parse_data(&mut v, &field("data_json"), &variant.data_json);
        // The variant goes out as a send whose trigger data sets these keys itself.
        if let Some(key) = data.as_ref().and_then(|d| {
            d.keys()
                .find(|k| crate::sends::RESERVED_DATA_KEYS.contains(&k.as_str()))
        }) {
            v.push(FieldViolation::new(
                field("data_json"),
                format!("key `{key}` is set by the service"),
            ));
        }
        if data.is_some() && matches!(delivery, Some(TestDelivery::Newsletter { .. })) {
            v.push(FieldViolation::new(
                field("data_json"),
                "is for broadcast delivery only (a newsletter's content is its body)",
            ));
        }
        variants.push(VariantSpec {
            name: variant.name.clone(),
            subject: variant.subject.clone(),
            body: variant.body.clone(),
            data,
        });
    }

    let fraction = new.test_fraction;
    if !(fraction > 0.0 && fraction <= 1.0) {
        v.push(FieldViolation::new(
            "test_fraction",
            "must be above 0 and at most 1",
        ));
    }
    let confidence = if new.confidence == 0.0 {
        DEFAULT_CONFIDENCE
    } else {
        new.confidence
    };
    if !(confidence > 0.5 && confidence < 1.0) {
        v.push(FieldViolation::new(
            "confidence",
            "must be above 0.5 and below 1 (0: 0.95)",
        ));
    }
    if !(new.baseline_rate > 0.0 && new.baseline_rate < 1.0) {
        v.push(FieldViolation::new(
            "baseline_rate",
            "must be above 0 and below 1",
        ));
    }
    let effect = new.minimum_detectable_effect;
    if !(effect > 0.0 && new.baseline_rate + effect < 1.0) {
        v.push(FieldViolation::new(
            "minimum_detectable_effect",
            "must be above 0 and keep baseline_rate + effect below 1",
        ));
    }
    let hours = match new.max_duration_hours {
        0 => DEFAULT_MAX_HOURS,
        h if (1..=MAX_HOURS as i32).contains(&h) => h.unsigned_abs(),
        _ => {
            v.push(FieldViolation::new(
                "max_duration_hours",
                format!("must be 1 to {MAX_HOURS} (0: {DEFAULT_MAX_HOURS})"),
            ));
            DEFAULT_MAX_HOURS
        }
    };
    let minimum = new.minimum_sample_per_variant;
    if minimum != 0 && minimum < stats::MIN_SAMPLE_FLOOR as i64 {
        v.push(FieldViolation::new(
            "minimum_sample_per_variant",
            format!(
                "must be at least {} (0: the plan's sample)",
                stats::MIN_SAMPLE_FLOOR
            ),
        ));
    }
    input::finish(v)?;
    let Some(delivery) = delivery else {
        return Err(CoreError::Internal("delivery checked above".into()));
    };

    let minimum_sample_per_variant = if minimum == 0 {
        stats::plan(
            new.baseline_rate,
            effect,
            DEFAULT_POWER,
            confidence,
            variants.len(),
        )
        .map_err(plan_violation)?
        .per_variant
    } else {
        minimum.unsigned_abs()
    };
    Ok(TestSpec {
        audience_segment_ids: audience.clone(),
        variants,
        test_fraction: fraction,
        metric: new.metric,
        delivery,
        confidence,
        baseline_rate: new.baseline_rate,
        minimum_detectable_effect: effect,
        minimum_sample_per_variant,
        max_duration_hours: hours,
        no_winner_policy: new.no_winner_policy,
    })
}

fn parse_data(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    raw: &str,
) -> Option<Map<String, Value>> {
    if raw.trim().is_empty() {
        return None;
    }
    if raw.len() > DATA_BYTES {
        violations.push(FieldViolation::new(
            field,
            format!("is {} bytes; at most {DATA_BYTES}", raw.len()),
        ));
        return None;
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(map)) => Some(map),
        Ok(_) => {
            violations.push(FieldViolation::new(field, "must be a JSON object"));
            None
        }
        Err(e) => {
            violations.push(FieldViolation::new(
                field,
                format!("is not JSON (line {}, column {})", e.line(), e.column()),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NewTest {
        NewTest {
            assignment_id: "asg-1".into(),
            request_id: "req-1".into(),
            title: "Subject lines".into(),
            audience_segment_ids: vec![7],
            variants: vec![
                NewVariant {
                    name: "control".into(),
                    subject: "A".into(),
                    body: "<p>a</p>".into(),
                    data_json: String::new(),
                },
                NewVariant {
                    name: "bold".into(),
                    subject: "B".into(),
                    body: "<p>b</p>".into(),
                    data_json: "{\"x\":1}".into(),
                },
            ],
            test_fraction: 0.2,
            delivery: Some(TestDelivery::Broadcast { broadcast_id: 3 }),
            baseline_rate: 0.03,
            minimum_detectable_effect: 0.015,
            created_by: "tests".into(),
            ..NewTest::default()
        }
    }

    fn fields(error: CoreError) -> Vec<String> {
        match error {
            CoreError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_request_gets_its_defaults() {
        let spec = validate(&valid()).expect("valid");
        assert_eq!(spec.confidence, 0.95);
        assert_eq!(spec.max_duration_hours, 72);
        assert_eq!(spec.metric, Metric::ClickRate);
        assert_eq!(spec.no_winner_policy, NoWinnerPolicy::SendControl);
        let planned = stats::plan(0.03, 0.015, 0.8, 0.95, 2)
            .expect("plan")
            .per_variant;
        assert_eq!(spec.minimum_sample_per_variant, planned);
        assert_eq!(
            spec.variants[1].data.as_ref().and_then(|d| d.get("x")),
            Some(&json!(1))
        );
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut bad = valid();
        bad.assignment_id = " a".into();
        bad.request_id = String::new();
        bad.title = "\0".into();
        bad.audience_segment_ids = vec![7, -1, 7];
        bad.variants[1].name = "control".into();
        bad.variants[0].subject = String::new();
        bad.variants[1].body = "x".repeat(BODY_BYTES + 1);
        bad.variants[1].data_json = "[1]".into();
        bad.variants[0].data_json = "{\"subject\":\"x\"}".into();
        bad.test_fraction = f64::NAN;
        bad.confidence = 1.5;
        bad.baseline_rate = f64::INFINITY;
        bad.minimum_detectable_effect = -0.1;
        bad.max_duration_hours = 10_000;
        bad.minimum_sample_per_variant = 5;
        let got = fields(validate(&bad).expect_err("invalid"));
        for field in [
            "assignment_id",
            "request_id",
            "title",
            "audience_segment_ids[1]",
            "audience_segment_ids[2]",
            "variants[1].name",
            "variants[0].subject",
            "variants[1].body",
            "variants[1].data_json",
            "variants[0].data_json",
            "test_fraction",
            "confidence",
            "baseline_rate",
            "minimum_detectable_effect",
            "max_duration_hours",
            "minimum_sample_per_variant",
        ] {
            assert!(
                got.iter().any(|f| f == field),
                "{field} not named in {got:?}"
            );
        }
    }

    #[test]
    fn variant_counts_and_delivery_are_checked() {
        let mut one = valid();
        one.variants.truncate(1);
        assert!(fields(validate(&one).expect_err("one variant")).contains(&"variants".to_owned()));
        let mut nine = valid();
        nine.variants = (0..9)
            .map(|n| NewVariant {
                name: format!("v{n}"),
                subject: "s".into(),
                body: "b".into(),
                data_json: String::new(),
            })
            .collect();
        assert!(fields(validate(&nine).expect_err("nine")).contains(&"variants".to_owned()));
        let mut none = valid();
        none.delivery = None;
        assert!(fields(validate(&none).expect_err("no delivery")).contains(&"delivery".to_owned()));
        let mut newsletter = valid();
        newsletter.delivery = Some(TestDelivery::Newsletter { from_id: 0 });
        assert!(
            fields(validate(&newsletter).expect_err("data on a newsletter"))
                .contains(&"variants[1].data_json".to_owned())
        );
    }

    #[test]
    fn warnings_and_refusals_follow_the_audience() {
        let spec = validate(&valid()).expect("valid");
        let plan = stats::plan(0.03, 0.015, 0.8, 0.95, 2).expect("plan");
        // 20% of 100,000 over two variants: 10,000 each, more than the plan needs.
        assert!(
            power_warnings(&spec, &plan, 100_000)
                .expect("fine")
                .is_empty()
        );
        // 20% of 20,000: 2,000 each, below the plan and the minimum.
        let warnings = power_warnings(&spec, &plan, 20_000).expect("warned");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        // Even the whole audience cannot give each variant its minimum.
        assert!(matches!(
            power_warnings(&spec, &plan, 1_000),
            Err(CoreError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn plans_name_the_field_at_fault() {
        assert!(plan_test(0.03, 0.015, 0.0, 0.0, 0).is_ok());
        assert_eq!(
            fields(plan_test(0.0, 0.015, 0.0, 0.0, 0).expect_err("bad")),
            ["baseline_rate"]
        );
        assert_eq!(
            fields(plan_test(0.03, 0.015, 0.0, 0.0, 9).expect_err("bad")),
            ["variants"]
        );
        assert_eq!(
            fields(plan_test(0.03, 0.015, 0.0, 0.0, -3).expect_err("bad")),
            ["variants"]
        );
        assert_eq!(
            fields(plan_test(0.03, f64::NAN, 0.0, 0.0, 2).expect_err("bad")),
            ["minimum_detectable_effect"]
        );
    }
}
