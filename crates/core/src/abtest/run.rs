//! Running A/B tests: [`start_test`] (StartTest) and [`evaluate`] (the `abtest-evaluation` job).
//!
//! **Start.** The audience is snapshotted (members of managed segments from SharpSend's own
//! record, other segments read from Customer.io, as journey events do; people without a
//! Customer.io `id` cannot be put in a manual segment and are left out), each person is
//! allocated by [`super::allocation::allocate`] to a variant or the remainder, and the
//! allocation is stored with the move draft → running in one transaction. A second start of a
//! running test answers it and stores nothing.
//!
//! **The job**, for every running test and every decided one it has not finished, one step at a
//! time so that a crash anywhere resumes at the next run:
//! 1. each variant's audience becomes a manual segment in Customer.io
//!    (`segments::create_segment_once`, keyed `abtest:<test>:<arm>`: a crash between Customer.io's
//!    create and the record adopts the orphan instead of creating another) and its members go
//!    to Customer.io through the outbox (`segment_add` rows), recorded once;
//! 2. once every change of that segment has been delivered, the variant is sent through the
//!    send machinery (keyed by (assignment, `abtest:<test>:<arm>`): exactly once however often
//!    this step runs), recorded only while the test still runs (`store::create_arm_send`), and
//!    the send is recorded on the arm;
//! 3. once every variant is sent, each run is one look of the sequential rule
//!    ([`super::stats::SequentialState`], stored with the test and continued by every look) over
//!    the variants' results ([`sharpsend_db::abtests::arm_results`]: delivery events of the
//!    variant's send, attributed by the stored allocation); a winner is decided when the rule
//!    says so, or the no-winner policy when the maximum duration has passed — through the
//!    guarded state change, so an operator's DeclareWinner and the job cannot both win;
//! 4. a decided test's winner goes to the remainder the same way (a segment, its members, a
//!    send keyed `abtest:<test>:remainder`), its members re-checked against the audience's
//!    current membership (people who left are not sent to); then the test is completed.
//!    A cancelled test is never advanced: no remainder send. Cancelling or deciding a test
//!    stops its variant sends that no dispatcher has claimed (`store::decide`).

use std::collections::{BTreeSet, HashMap};

use cio_client::CioError;
use futures::TryStreamExt;
use serde::Serialize;
use sharpsend_db::abtests::{self as store, ArmCounts, REMAINDER, TestRecord};
use sharpsend_db::managed_segments::{self as managed_store, ManualChange};

use super::allocation::{Allocation, allocate};
use super::manage::{
    self, Decision, Metric, NoWinnerPolicy, TestDelivery, TestSpec, TestState, TestView,
    VariantSpec,
};
use super::stats::{Arm, DecisionRule, SequentialState, Verdict};
use crate::managed_segments::{self as managed, NewSegment};
use crate::sends::{self, DeliveryMode, SendRequest, Variation};
use crate::{AppContext, CoreError, FieldViolation, segments};

/// Who the job's decisions and sends name.
pub const ACTOR: &str = "abtest-evaluation";
/// Who decides when the sequential rule finds a winner.
pub const RULE_ACTOR: &str = "sequential-test";
/// The audit record of a decision the evaluation job made (no call, so no key): its key id,
/// role and action, next to the RPCs' (`ListAuditEvents` with this `action` finds them).
pub const AUDIT_KEY_ID: &str = "job:abtest-evaluation";
pub const AUDIT_ROLE: &str = "job";
pub const AUDIT_DECIDE_ACTION: &str = "/jobs/abtest-evaluation/DecideTest";
/// Ids per page read from the database and per membership change.
const PAGE: u64 = 10_000;
/// Members per Customer.io membership page (its maximum).
const CIO_PAGE: u32 = cio_client::MAX_MEMBERSHIP_PAGE;

/// Starts a draft test (see the module doc); a running test is answered as it is.
pub async fn start_test(ctx: &AppContext, id: &str) -> Result<TestView, CoreError> {
    let record = manage::find(ctx, id).await?;
    match record.state {
        TestState::Draft => {}
        TestState::Running => return manage::view_with_results(ctx, record).await,
        TestState::Decided | TestState::Cancelled => {
            return Err(CoreError::FailedPrecondition(vec![
                FieldViolation::new(
                    "id",
                    format!(
                        "test {} is already {}",
                        record.public_id,
                        record.state.as_str()
                    ),
                )
                .because("TEST_FINISHED"),
            ]));
        }
    }
    let spec = manage::spec_of(&record)?;
    let report = segments::validate_targeting(
        ctx,
        &spec.audience_segment_ids,
        segments::DEFAULT_MAX_COUNT_AGE,
        ctx.now(),
    )
    .await?;
    report.refuse_unsendable("audience_segment_ids")?;
    let members = audience_members(ctx, &spec.audience_segment_ids).await?;
    let variants = spec.variants.len();
    let allocations: Vec<(String, i32)> = members
        .into_iter()
        .map(|customer_id| {
            let arm = match allocate(
                &record.public_id,
                &customer_id,
                variants,
                spec.test_fraction,
            ) {
                Allocation::Variant(i) => i32::try_from(i).unwrap_or(REMAINDER),
                Allocation::Remainder => REMAINDER,
            };
            (customer_id, arm)
        })
        .collect();
    let empty: Vec<&str> = spec
        .variants
        .iter()
        .enumerate()
        .filter(|(i, _)| !allocations.iter().any(|(_, arm)| *arm as usize == *i))
        .map(|(_, v)| v.name.as_str())
        .collect();
    if !empty.is_empty() {
        return Err(CoreError::FailedPrecondition(vec![
            FieldViolation::new(
                "audience_segment_ids",
                format!(
                    "the audience ({} people with a Customer.io id) gives nobody to variant(s) {}; \
                     widen the audience or raise test_fraction",
                    allocations.len(),
                    empty.join(", ")
                ),
            )
            .because("AUDIENCE_TOO_SMALL"),
        ]));
    }
    let state = serde_json::to_value(SequentialState::new(variants))
        .map_err(|e| CoreError::Internal(format!("sequential state not serialisable: {e}")))?;
    let started = store::start(
        &ctx.db,
        ctx.workspace_id(),
        record.id,
        variants,
        &allocations,
        &state,
        ctx.now(),
    )
    .await?;
    let now = manage::find(ctx, id).await?;
    if started {
        tracing::info!(test = %now.public_id, people = allocations.len(), "A/B test started");
    } else if now.state != TestState::Running {
        return Err(CoreError::FailedPrecondition(vec![
            FieldViolation::new(
                "id",
                format!("test {} is already {}", now.public_id, now.state.as_str()),
            )
            .because("TEST_FINISHED"),
        ]));
    }
    manage::view_with_results(ctx, now).await
}

/// Everyone with a Customer.io `id` in any of `segment_ids`, once.
async fn audience_members(
    ctx: &AppContext,
    segment_ids: &[i64],
) -> Result<BTreeSet<String>, CoreError> {
    let managed_ids = managed::get_many(ctx, segment_ids).await?;
    let mut members = BTreeSet::new();
    for &segment_id in segment_ids {
        if managed_ids.contains_key(&segment_id) {
            let mut after: Option<String> = None;
            loop {
                let page = managed_store::members_page(
                    &ctx.db,
                    ctx.workspace_id(),
                    segment_id,
                    after.as_deref(),
                    PAGE,
                )
                .await?;
                let full = page.len() as u64 == PAGE;
                after = page.last().cloned();
                members.extend(page);
                if !full {
                    break;
                }
            }
        } else {
            let mut stream = std::pin::pin!(ctx.cio.segment_membership(segment_id, CIO_PAGE));
            loop {
                match stream.try_next().await {
                    Ok(Some(member)) => members.extend(member.id.filter(|id| !id.is_empty())),
                    Ok(None) => break,
                    Err(CioError::NotFound { .. }) => {
                        return Err(CoreError::NotFound {
                            what: "Customer.io segment",
                            id: segment_id.to_string(),
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(members)
}

/// What one run of the evaluation job did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EvaluationReport {
    /// Tests with work left that were looked at.
    pub tests: u64,
    /// Manual segments created (or adopted) for arms.
    pub segments: u64,
    /// People queued into arm segments.
    pub members_queued: u64,
    /// Variant and remainder sends recorded.
    pub sends: u64,
    /// Arms waiting for their membership to reach Customer.io.
    pub waiting: u64,
    /// Looks taken by the sequential rule.
    pub looks: u64,
    /// Tests decided by the rule or the no-winner policy.
    pub decided: u64,
    /// Tests finished (remainder sent, or nothing to send).
    pub completed: u64,
    /// Tests whose step failed (each is retried on the next run; see the log).
    pub failed: u64,
    /// The first failures, `test: reason`.
    pub errors: Vec<String>,
}

/// The `abtest-evaluation` job: advances every test with work left (see the module doc). A
/// failure of one test (Customer.io unavailable, a refused send) is reported and the others go
/// on; a database failure stops the run.
pub async fn evaluate(ctx: &AppContext) -> Result<EvaluationReport, CoreError> {
    let mut report = EvaluationReport::default();
    for record in store::active(&ctx.db, ctx.workspace_id()).await? {
        report.tests += 1;
        let public_id = record.public_id.clone();
        match advance(ctx, record, &mut report).await {
            Ok(()) => {}
            Err(CoreError::Database(e)) => return Err(CoreError::Database(e)),
            Err(e) => {
                let text = crate::error::error_chain(&e);
                tracing::warn!(test = %public_id, error = %text, "A/B test step failed; retried next run");
                report.failed += 1;
                if report.errors.len() < 10 {
                    report.errors.push(format!("{public_id}: {text}"));
                }
            }
        }
    }
    Ok(report)
}

async fn advance(
    ctx: &AppContext,
    record: TestRecord,
    report: &mut EvaluationReport,
) -> Result<(), CoreError> {
    let spec = manage::spec_of(&record)?;
    if record.started_at.is_none() {
        // Decided before it started (an operator's DeclareWinner on a draft): no allocation, no
        // variant went out, nothing to send to a remainder that was never drawn.
        store::complete(&ctx.db, record.id, ctx.now()).await?;
        report.completed += 1;
        return Ok(());
    }
    match record.state {
        TestState::Running => {
            let mut all_sent = true;
            for (index, variant) in spec.variants.iter().enumerate() {
                let arm = i32::try_from(index).unwrap_or(i32::MAX);
                if !send_arm(ctx, &record, &spec, arm, variant, report).await? {
                    all_sent = false;
                }
            }
            if all_sent {
                look(ctx, &record, &spec, report).await?;
            }
            Ok(())
        }
        TestState::Decided => {
            let decision = manage::decision_of(&record)?;
            let done = match decision.and_then(|d| d.winner) {
                None => true,
                Some(winner) => match spec.variants.get(winner) {
                    Some(variant) => {
                        send_arm(ctx, &record, &spec, REMAINDER, variant, report).await?
                    }
                    None => {
                        return Err(CoreError::Internal(format!(
                            "test {} names winner {winner} of {} variants",
                            record.public_id,
                            spec.variants.len()
                        )));
                    }
                },
            };
            if done {
                store::complete(&ctx.db, record.id, ctx.now()).await?;
                report.completed += 1;
                tracing::info!(test = %record.public_id, "A/B test completed");
            }
            Ok(())
        }
        TestState::Draft | TestState::Cancelled => Ok(()),
    }
}

/// Takes arm `arm` one step towards its send of `variant`; answers whether it is done (its
/// send recorded, or nobody to send to).
async fn send_arm(
    ctx: &AppContext,
    record: &TestRecord,
    spec: &TestSpec,
    arm: i32,
    variant: &VariantSpec,
    report: &mut EvaluationReport,
) -> Result<bool, CoreError> {
    let ws = ctx.workspace_id();
    let Some(state) = store::arms(&ctx.db, record.id)
        .await?
        .into_iter()
        .find(|a| a.arm == arm)
    else {
        return Err(CoreError::Internal(format!(
            "test {} has no arm {arm}",
            record.public_id
        )));
    };
    if state.send_id.is_some() || state.note.is_some() {
        return Ok(true);
    }
    let key = store::send_key(&record.public_id, arm);

    let segment_id = match state.cio_segment_id {
        Some(id) => id,
        None => {
            let label = if arm == REMAINDER {
                "remainder".to_owned()
            } else {
                variant.name.clone()
            };
            let new = NewSegment {
                name: format!("A/B {} {label}", record.public_id),
                description: format!(
                    "SharpSend A/B test {} ({}), {}",
                    record.public_id,
                    record.assignment_id,
                    if arm == REMAINDER {
                        "the remainder (gets the winner)".to_owned()
                    } else {
                        format!("variant {}", variant.name)
                    }
                ),
                criteria: None,
            };
            let (view, _) = segments::create_segment_once(ctx, new, &key).await?;
            report.segments += 1;
            store::set_arm_segment(&ctx.db, record.id, arm, view.segment_id)
                .await?
                .unwrap_or(view.segment_id)
        }
    };

    if state.members_queued_at.is_none() {
        let ids = arm_audience(ctx, record, spec, arm).await?;
        if ids.is_empty() {
            store::set_arm_members(&ctx.db, record.id, arm, 0, ctx.now()).await?;
            store::set_arm_send(
                &ctx.db,
                record.id,
                arm,
                None,
                Some("nobody left to send to"),
            )
            .await?;
            return Ok(true);
        }
        for chunk in ids.chunks(PAGE as usize) {
            match managed_store::add_members(&ctx.db, ws, segment_id, chunk, ctx.now()).await? {
                ManualChange::Done(_) => {}
                ManualChange::NotFound | ManualChange::HasCriteria => {
                    return Err(CoreError::Internal(format!(
                        "segment {segment_id} of test {} is not a managed segment without criteria",
                        record.public_id
                    )));
                }
            }
        }
        ctx.wake_outbox();
        let count = i64::try_from(ids.len()).unwrap_or(i64::MAX);
        store::set_arm_members(&ctx.db, record.id, arm, count, ctx.now()).await?;
        report.members_queued += ids.len() as u64;
    }

    let outstanding = store::segment_changes_outstanding(&ctx.db, ws, segment_id).await?;
    if outstanding > 0 {
        report.waiting += 1;
        return Ok(false);
    }

    // A variant goes out only while the test runs (a cancel or a winner may have come since
    // this run read it); the remainder only once decided. (A cheap early exit: the guard that
    // counts is `store::create_arm_send`'s.)
    let current = manage::find(ctx, &record.public_id).await?;
    let wanted = if arm == REMAINDER {
        TestState::Decided
    } else {
        TestState::Running
    };
    if current.state != wanted {
        return Ok(false);
    }
    let delivery = match spec.delivery {
        TestDelivery::Broadcast { broadcast_id } => DeliveryMode::Broadcast { broadcast_id },
        TestDelivery::Newsletter { from_id } => DeliveryMode::Newsletter {
            from_id,
            subscription_topic_id: None,
        },
    };
    let request = SendRequest {
        assignment_id: record.assignment_id.clone(),
        request_id: key,
        title: record.title.clone(),
        subject: variant.subject.clone(),
        segment_ids: vec![segment_id],
        variations: vec![Variation {
            segment_id,
            subject: variant.subject.clone(),
            body: variant.body.clone(),
            data: variant.data.clone(),
        }],
        delivery: Some(delivery),
        content_types: Vec::new(),
        created_by: ACTOR.to_owned(),
    };
    // Recorded only while the test still wants this arm, in one transaction holding the test's
    // row: a cancel or a decision either came first (nothing is recorded) or comes after and
    // stops the send if no dispatcher has claimed it (see `store::decide`).
    let send = match sends::prepare_send(ctx, &request).await? {
        sends::Prepared::Answered(answer) => answer.0,
        sends::Prepared::New(new) => {
            match store::create_arm_send(&ctx.db, ws, record.id, wanted, &new, ctx.now()).await? {
                Some(created) => sends::finish_send(ctx, created, &new).await?.0,
                None => return Ok(false),
            }
        }
    };
    store::set_arm_send(
        &ctx.db,
        record.id,
        arm,
        Some((send.position, &send.id)),
        None,
    )
    .await?;
    report.sends += 1;
    tracing::info!(test = %record.public_id, arm, send = %send.id, "A/B test arm sent");
    Ok(true)
}

/// Who an arm's segment gets: a variant's stored allocation; for the remainder, its stored
/// allocation and that of every variant whose send never went out (stopped by the decision, or
/// never recorded: those people got nothing), still in the audience now.
async fn arm_audience(
    ctx: &AppContext,
    record: &TestRecord,
    spec: &TestSpec,
    arm: i32,
) -> Result<Vec<String>, CoreError> {
    let (current, arms) = if arm == REMAINDER {
        let mut arms = vec![REMAINDER];
        arms.extend(store::unsent_variant_arms(&ctx.db, ctx.workspace_id(), record.id).await?);
        (
            Some(audience_members(ctx, &spec.audience_segment_ids).await?),
            arms,
        )
    } else {
        (None, vec![arm])
    };
    let mut ids = Vec::new();
    for arm in arms {
        let mut after: Option<String> = None;
        loop {
            let page =
                store::arm_members_page(&ctx.db, record.id, arm, after.as_deref(), PAGE).await?;
            let full = page.len() as u64 == PAGE;
            after = page.last().cloned();
            ids.extend(
                page.into_iter()
                    .filter(|id| current.as_ref().is_none_or(|c| c.contains(id))),
            );
            if !full {
                break;
            }
        }
    }
    Ok(ids)
}

/// The successes a metric counts.
fn successes(metric: Metric, counts: &ArmCounts) -> i64 {
    match metric {
        Metric::ClickRate => counts.human_clicks,
        Metric::HumanOpenRate => counts.human_opens,
        Metric::ConversionRate => counts.conversions,
    }
}

/// The results of every variant of a started test, in variant order (zeros for a variant not
/// sent yet), attributed by the stored allocation (see [`store::arm_results`]).
pub(crate) async fn variant_counts(
    ctx: &AppContext,
    record: &TestRecord,
    variants: usize,
) -> Result<Vec<ArmCounts>, CoreError> {
    let sends: HashMap<i32, i64> = store::arms(&ctx.db, record.id)
        .await?
        .into_iter()
        .filter(|a| a.arm != REMAINDER)
        .filter_map(|a| Some((a.arm, a.send_id?)))
        .collect();
    let send_ids: Vec<i64> = sends.values().copied().collect();
    let mut counts = Vec::with_capacity(variants);
    for index in 0..variants {
        let arm = i32::try_from(index).unwrap_or(i32::MAX);
        counts.push(if sends.contains_key(&arm) {
            store::arm_results(&ctx.db, ctx.workspace_id(), record.id, arm, &send_ids).await?
        } else {
            ArmCounts::default()
        });
    }
    Ok(counts)
}

/// The rule a test is judged by.
pub(crate) fn rule_of(spec: &TestSpec) -> DecisionRule {
    DecisionRule {
        alpha: 1.0 - spec.confidence,
        tau: spec.minimum_detectable_effect,
        min_sample: spec.minimum_sample_per_variant,
    }
}

/// One look of the sequential rule; decides when it says so, or by the no-winner policy once
/// the maximum duration has passed.
async fn look(
    ctx: &AppContext,
    record: &TestRecord,
    spec: &TestSpec,
    report: &mut EvaluationReport,
) -> Result<(), CoreError> {
    let counts = variant_counts(ctx, record, spec.variants.len()).await?;
    let arms: Vec<Arm> = counts
        .iter()
        .map(|c| {
            Arm::new(
                u64::try_from(c.recipients).unwrap_or(0),
                u64::try_from(successes(spec.metric, c)).unwrap_or(0),
            )
        })
        .collect();
    let mut state = manage::sequential_of(record, spec.variants.len());
    let rule = rule_of(spec);
    let verdict = state.observe(&arms, &rule);
    let state_json = serde_json::to_value(&state)
        .map_err(|e| CoreError::Internal(format!("sequential state not serialisable: {e}")))?;
    if !store::record_look(&ctx.db, record.id, &state_json).await? {
        return Ok(()); // decided or cancelled meanwhile
    }
    report.looks += 1;
    let now = ctx.now();
    let decision = match verdict {
        Verdict::Winner { index, p_value } => Some(Decision {
            winner: Some(index),
            reason: format!(
                "{} beat every other variant on {} at always-valid p = {p_value:.4} (threshold \
                 {:.4}: {:.2} over {} pairs), {} looks",
                spec.variants[index].name,
                metric_name(spec.metric),
                rule.alpha / state.pairs().max(1) as f64,
                rule.alpha,
                state.pairs(),
                record.looks + 1
            ),
            actor: RULE_ACTOR.to_owned(),
            decided_at: now,
        }),
        Verdict::NeedsSample | Verdict::Continue => {
            let started = record.started_at.unwrap_or(record.created_at);
            let deadline = started + chrono::Duration::hours(i64::from(spec.max_duration_hours));
            (now >= deadline).then(|| {
                let (winner, what) = match spec.no_winner_policy {
                    NoWinnerPolicy::SendControl => (Some(0), "the control goes to the remainder"),
                    NoWinnerPolicy::SendBestObserved => (
                        best_observed(&arms),
                        "the best observed variant goes to the remainder",
                    ),
                    NoWinnerPolicy::SendNothing => (None, "nothing goes to the remainder"),
                };
                Decision {
                    winner,
                    reason: format!(
                        "no winner within {} h ({}): {what}",
                        spec.max_duration_hours,
                        if matches!(verdict, Verdict::NeedsSample) {
                            "some variant below its minimum sample"
                        } else {
                            "no variant beat all others"
                        }
                    ),
                    actor: RULE_ACTOR.to_owned(),
                    decided_at: now,
                }
            })
        }
    };
    if let Some(decision) = decision {
        let json = serde_json::to_value(&decision)
            .map_err(|e| CoreError::Internal(format!("decision not serialisable: {e}")))?;
        let winner = decision
            .winner
            .and_then(|i| spec.variants.get(i))
            .map(|v| v.name.clone());
        let audit = sharpsend_db::audit::NewAuditEvent {
            at: now,
            workspace_id: Some(ctx.workspace_id()),
            key_id: AUDIT_KEY_ID.to_owned(),
            key_name: crate::jobs::Job::AbTestEvaluation.name().to_owned(),
            role: AUDIT_ROLE.to_owned(),
            action: AUDIT_DECIDE_ACTION.to_owned(),
            ids: serde_json::json!({
                "test_id": record.public_id,
                "assignment_id": record.assignment_id,
                "winner": winner,
            }),
            outcome: "OK".to_owned(),
        };
        let moved = store::decide_with_audit(
            &ctx.db,
            ctx.workspace_id(),
            record.id,
            &[TestState::Running],
            TestState::Decided,
            &json,
            now,
            Some(audit),
        )
        .await?;
        if moved {
            report.decided += 1;
            tracing::info!(test = %record.public_id, reason = %decision.reason, "A/B test decided");
        }
    }
    Ok(())
}

/// The variant with the highest observed rate (the first on a tie).
fn best_observed(arms: &[Arm]) -> Option<usize> {
    arms.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f64)>, (i, arm)| match best {
            Some((_, rate)) if rate >= arm.rate() => best,
            _ => Some((i, arm.rate())),
        })
        .map(|(i, _)| i)
}

fn metric_name(metric: Metric) -> &'static str {
    match metric {
        Metric::ClickRate => "click rate",
        Metric::HumanOpenRate => "human open rate",
        Metric::ConversionRate => "conversion rate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_observed_variant_is_the_first_highest_rate() {
        let arms = [Arm::new(100, 3), Arm::new(100, 9), Arm::new(100, 9)];
        assert_eq!(best_observed(&arms), Some(1));
        assert_eq!(best_observed(&[]), None);
        assert_eq!(
            store::send_key("abt_1", REMAINDER),
            "abtest:abt_1:remainder"
        );
        assert_eq!(store::send_key("abt_1", 2), "abtest:abt_1:v2");
    }
}
