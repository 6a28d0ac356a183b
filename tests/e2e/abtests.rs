//! ABTestService end to end: planning, creating a test validated field by field and idempotent
//! on its request id, reading and listing it, cancelling it and declaring a winner once; then
//! running tests: StartTest's stored allocation, the `abtest-evaluation` job sending each
//! variant through its own manual segment, finding the best of three variants whose true click
//! rates the simulator is told (its delivery behaviour keyed on the subject), sending the winner
//! to the remainder exactly once, and surviving a crashed job — through a real tonic client
//! against a real server and the simulator over HTTP, on both databases.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use cio_sim::{DeliveryFilter, DeliveryMetric, DeliveryRates, RatesKey, SimDelivery};
use sharpsend_core::AppContext;
use sharpsend_core::abtest::allocation::{Allocation, allocate};
use sharpsend_core::context::Migrations;
use sharpsend_core::jobs::{self, Job};
use sharpsend_core::sends::{self, SendKey};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, TestState};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

/// The demo's API-triggered broadcast "Assignment Alert".
const BROADCAST: i64 = 3;

async fn synced(db: &TestDatabase) -> anyhow::Result<(TestApp, i64)> {
    let app = TestApp::spawn(db).await?;
    app.run_job(Job::SegmentSync).await?;
    let engaged = app.sim_segment_id("High Engagement")?;
    Ok((app, engaged))
}

fn variant(name: &str, subject: &str) -> pb::TestVariant {
    pb::TestVariant {
        name: name.into(),
        subject: subject.into(),
        body: format!("<p>{name}</p>"),
        data_json: String::new(),
    }
}

fn request(request_id: &str, audience: i64) -> pb::CreateTestRequest {
    pb::CreateTestRequest {
        assignment_id: "asg-ab".into(),
        request_id: request_id.into(),
        title: "Q4 outlook subject lines".into(),
        audience_segment_ids: vec![audience],
        variants: vec![
            variant("control", "Your Q4 outlook"),
            variant("urgent", "Read before Monday"),
        ],
        test_fraction: 0.5,
        delivery: Some(pb::create_test_request::Delivery::BroadcastId(BROADCAST)),
        baseline_rate: 0.03,
        minimum_detectable_effect: 0.015,
        minimum_sample_per_variant: 100,
        ..Default::default()
    }
}

db_test!(
    plans_and_refuses_what_cannot_be_planned,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.abtests().await?;
        let plan = client
            .plan_test(pb::PlanTestRequest {
                baseline_rate: 0.03,
                minimum_detectable_effect: 0.015,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            (2_450..=2_520).contains(&plan.fixed_horizon_per_variant),
            "{plan:?}"
        );
        ensure!(
            plan.per_variant > plan.fixed_horizon_per_variant,
            "{plan:?}"
        );
        ensure!(plan.total == plan.per_variant * 2, "{plan:?}");
        let bad = client
            .plan_test(pb::PlanTestRequest {
                baseline_rate: f64::NAN,
                ..Default::default()
            })
            .await
            .expect_err("NaN baseline");
        ensure!(bad.code() == Code::InvalidArgument, "{bad:?}");
        ensure!(bad_request_fields(&bad) == ["baseline_rate"], "{bad:?}");
        app.stop().await
    }
);

db_test!(
    a_test_is_created_once_read_listed_and_decided_once,
    |db: TestDatabase| async move {
        let (app, engaged) = synced(&db).await?;
        let mut client = app.abtests().await?;
        let first = client
            .create_test(request("req-1", engaged))
            .await?
            .into_inner();
        ensure!(first.created, "the first call creates");
        let test = first.test.context("test")?;
        ensure!(test.id.starts_with("abt_"), "{}", test.id);
        ensure!(test.state == TestState::Draft as i32);
        ensure!(
            test.audience_estimate > 0,
            "the mirror's count: {}",
            test.audience_estimate
        );
        ensure!(test.results.len() == 2 && test.results.iter().all(|r| r.recipients == 0));
        ensure!(test.minimum_sample_per_variant == 100 && test.confidence == 0.95);
        ensure!(
            test.planned_per_variant > 2_500,
            "{}",
            test.planned_per_variant
        );
        // The demo audience is far below the plan: the test says so.
        ensure!(
            test.warnings.iter().any(|w| w.contains("the plan needs")),
            "{:?}",
            test.warnings
        );

        // A retry answers the same test and records nothing new.
        let again = client
            .create_test(request("req-1", engaged))
            .await?
            .into_inner();
        ensure!(!again.created && again.test.as_ref().map(|t| &t.id) == Some(&test.id));
        // The same request id with another request is refused.
        let mut other = request("req-1", engaged);
        other.variants[1].subject = "Something else".into();
        let conflict = client
            .create_test(other)
            .await
            .expect_err("conflicting reuse");
        ensure!(conflict.code() == Code::AlreadyExists, "{conflict:?}");

        let got = client
            .get_test(pb::GetTestRequest {
                id: test.id.clone(),
            })
            .await?
            .into_inner();
        ensure!(
            got.test.as_ref() == Some(&test),
            "GetTest answers what CreateTest did"
        );

        let second = client
            .create_test(request("req-2", engaged))
            .await?
            .into_inner();
        let second = second.test.context("second")?;
        let page = client
            .list_tests(pb::ListTestsRequest {
                assignment_id: "asg-ab".into(),
                page_size: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            page.tests.len() == 1 && page.tests[0].id == second.id,
            "newest first"
        );
        let rest = client
            .list_tests(pb::ListTestsRequest {
                assignment_id: "asg-ab".into(),
                page_size: 1,
                page_token: page.next_page_token.clone(),
            })
            .await?
            .into_inner();
        ensure!(
            rest.tests.len() == 1 && rest.tests[0].id == test.id && rest.next_page_token.is_empty()
        );
        let foreign = client
            .list_tests(pb::ListTestsRequest {
                assignment_id: "asg-other".into(),
                page_size: 1,
                page_token: page.next_page_token,
            })
            .await
            .expect_err("a token of other filters");
        ensure!(
            bad_request_fields(&foreign) == ["page_token"],
            "{foreign:?}"
        );

        // An operator declares the winner; a later cancel (or second declaration) is refused.
        let declared = client
            .declare_winner(pb::DeclareWinnerRequest {
                id: test.id.clone(),
                variant: "urgent".into(),
                reason: "matches the brand voice".into(),
            })
            .await?
            .into_inner()
            .test
            .context("declared")?;
        ensure!(declared.state == TestState::Decided as i32);
        let decision = declared.decision.context("decision")?;
        ensure!(decision.winner == 1 && decision.reason.contains("matches the brand voice"));
        let late = client
            .cancel_test(pb::CancelTestRequest {
                id: test.id.clone(),
                reason: "too late".into(),
            })
            .await
            .expect_err("decided already");
        ensure!(late.code() == Code::FailedPrecondition, "{late:?}");

        let cancelled = client
            .cancel_test(pb::CancelTestRequest {
                id: second.id.clone(),
                reason: "wrong audience".into(),
            })
            .await?
            .into_inner()
            .test
            .context("cancelled")?;
        ensure!(cancelled.state == TestState::Cancelled as i32);
        ensure!(cancelled.decision.map(|d| d.winner) == Some(-1));
        app.stop().await
    }
);

db_test!(
    bad_tests_are_refused_by_field,
    |db: TestDatabase| async move {
        let (app, engaged) = synced(&db).await?;
        let mut client = app.abtests().await?;

        let mut bad = request("", engaged);
        bad.variants = vec![variant("only", "One")];
        bad.test_fraction = f64::INFINITY;
        bad.delivery = None;
        let status = client.create_test(bad).await.expect_err("invalid");
        ensure!(status.code() == Code::InvalidArgument, "{status:?}");
        let fields = bad_request_fields(&status);
        for field in ["request_id", "variants", "test_fraction", "delivery"] {
            ensure!(
                fields.iter().any(|f| f == field),
                "{field} not in {fields:?}"
            );
        }

        let unknown = client
            .create_test(request("req-x", 987_654))
            .await
            .expect_err("unknown segment");
        ensure!(unknown.code() == Code::FailedPrecondition, "{unknown:?}");
        ensure!(
            bad_request_fields(&unknown).is_empty(),
            "a precondition, not a bad field"
        );

        let mut huge = request("req-y", engaged);
        huge.minimum_sample_per_variant = 1_000_000;
        let too_small = client
            .create_test(huge)
            .await
            .expect_err("audience too small");
        ensure!(
            too_small.code() == Code::FailedPrecondition,
            "{too_small:?}"
        );

        for id in ["", "..", "a/b c", "abt_missing"] {
            let status = client
                .get_test(pb::GetTestRequest { id: id.into() })
                .await
                .expect_err(id);
            let expected = if id.is_empty() {
                Code::InvalidArgument
            } else {
                Code::NotFound
            };
            ensure!(status.code() == expected, "{id:?}: {status:?}");
        }
        let status = client
            .declare_winner(pb::DeclareWinnerRequest {
                id: "abt_missing".into(),
                variant: "a".into(),
                reason: String::new(),
            })
            .await
            .expect_err("no reason");
        ensure!(bad_request_fields(&status) == ["reason"], "{status:?}");
        ensure!(
            client
                .list_tests(pb::ListTestsRequest::default())
                .await?
                .into_inner()
                .tests
                .is_empty(),
            "nothing refused was recorded"
        );
        app.stop().await
    }
);

/// Three variants with the true click rates (per delivered email) the simulator draws from.
pub(crate) const VARIANTS: [(&str, &str, f64); 3] = [
    ("control", "Your Q4 outlook", 0.04),
    ("teaser", "Three names for Q4", 0.08),
    ("urgent", "Read before Monday's open", 0.30),
];

/// A manual segment in the simulator holding the first `people` demo readers, synced into the
/// mirror; the simulator's delivery behaviour keyed on each variant's subject (every delivery
/// opened by its reader, clicked at the variant's rate, no machine opens or clicks).
pub(crate) async fn audience(app: &TestApp, people: usize) -> anyhow::Result<i64> {
    let sim = &app.sim.sim;
    let id = sim.create_manual_segment("A/B audience", "readers for the e2e A/B test");
    let ids: Vec<String> = (1..=people).map(|n| format!("u{n:05}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    sim.add_to_manual_segment(id, &refs)?;
    for (_, subject, click_rate) in VARIANTS {
        sim.set_rates(
            RatesKey::Subject(subject.into()),
            DeliveryRates {
                bounce_rate: 0.0,
                open_rate: 1.0,
                machine_open_rate: 0.0,
                click_rate,
                machine_click_rate: 0.0,
                ..DeliveryRates::default()
            },
        )?;
    }
    app.run_job(Job::SegmentSync).await?;
    Ok(id)
}

pub(crate) fn three_variants(request_id: &str, audience: i64) -> pb::CreateTestRequest {
    pb::CreateTestRequest {
        assignment_id: format!("asg-{request_id}"),
        request_id: request_id.into(),
        title: "Q4 outlook, three subject lines".into(),
        audience_segment_ids: vec![audience],
        variants: VARIANTS
            .iter()
            .map(|(name, subject, _)| variant(name, subject))
            .collect(),
        test_fraction: 0.3,
        delivery: Some(pb::create_test_request::Delivery::BroadcastId(BROADCAST)),
        baseline_rate: 0.04,
        minimum_detectable_effect: 0.1,
        minimum_sample_per_variant: 100,
        max_duration_hours: 72,
        ..Default::default()
    }
}

/// Test `id` once the sequential rule decided it: every 3 hours of simulated time the delivery
/// poll and the evaluation job run, for at most 48 hours.
async fn decided_by_the_rule(app: &TestApp, id: &str) -> anyhow::Result<pb::AbTest> {
    let mut last = None;
    for _ in 0..16 {
        app.advance(Duration::from_secs(3 * 3600));
        app.run_job(Job::DeliveryPoll).await?;
        app.run_job(Job::AbTestEvaluation).await?;
        let test = get(app, id).await?;
        if test.state == TestState::Decided as i32 {
            return Ok(test);
        }
        last = Some(test);
    }
    anyhow::bail!("no decision within 48 h: {last:?}")
}

async fn get(app: &TestApp, id: &str) -> anyhow::Result<pb::AbTest> {
    app.abtests()
        .await?
        .get_test(pb::GetTestRequest { id: id.into() })
        .await?
        .into_inner()
        .test
        .context("GetTest answered no test")
}

/// The broadcast's triggers so far.
fn triggers(app: &TestApp) -> Vec<cio_sim::SimTrigger> {
    app.sim.sim.triggers(Some(BROADCAST))
}

/// Runs the evaluation job (as `ctx`'s scheduler), delivers the outbox and dispatches sends,
/// moving time a second each round, until `done` holds for the test (at most 60 rounds).
pub(crate) async fn drive(
    app: &TestApp,
    ctx: &AppContext,
    id: &str,
    done: impl Fn(&pb::AbTest) -> bool,
) -> anyhow::Result<pb::AbTest> {
    for _ in 0..60 {
        jobs::run_job(ctx, Job::AbTestEvaluation, "e2e-scheduler").await?;
        app.deliver_all("e2e-outbox", Duration::from_secs(30))
            .await?;
        jobs::run_job(ctx, Job::SendDispatch, "e2e-scheduler").await?;
        let test = get(app, id).await?;
        if done(&test) {
            return Ok(test);
        }
        app.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("test {id} did not get there: {:?}", get(app, id).await?)
}

/// Creates [`three_variants`] with `request_id`, testing `test_fraction` of `audience`, and
/// starts it. Answers the test's id and its assignment id.
pub(crate) async fn start_three_variants(
    app: &TestApp,
    request_id: &str,
    audience: i64,
    test_fraction: f64,
) -> anyhow::Result<(String, String)> {
    let mut client = app.abtests().await?;
    let mut request = three_variants(request_id, audience);
    request.test_fraction = test_fraction;
    let assignment = request.assignment_id.clone();
    let id = client
        .create_test(request)
        .await?
        .into_inner()
        .test
        .context("created")?
        .id;
    client
        .start_test(pb::StartTestRequest { id: id.clone() })
        .await?;
    Ok((id, assignment))
}

/// Dispatches sends (as `ctx`'s scheduler), moving time on, until the broadcast has `n`
/// triggers; then a few more rounds, to see that no more come.
pub(crate) async fn settle_triggers(
    app: &TestApp,
    ctx: &AppContext,
    n: usize,
) -> anyhow::Result<()> {
    for _ in 0..100 {
        if triggers(app).len() >= n {
            break;
        }
        jobs::run_job(ctx, Job::SendDispatch, "e2e-scheduler").await?;
        app.advance(Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each round opens at least one more trigger window, whatever the app's spacing.
    let round = ctx
        .settings
        .sends
        .trigger_spacing
        .max(Duration::from_secs(1));
    for _ in 0..3 {
        jobs::run_job(ctx, Job::AbTestEvaluation, "e2e-scheduler").await?;
        jobs::run_job(ctx, Job::SendDispatch, "e2e-scheduler").await?;
        app.advance(round);
    }
    let got = triggers(app).len();
    ensure!(got == n, "{got} triggers, expected {n}");
    Ok(())
}

pub(crate) fn variants_sent(test: &pb::AbTest) -> bool {
    test.results.iter().all(|r| !r.send_id.is_empty())
}

pub(crate) fn remainder_sent(test: &pb::AbTest) -> bool {
    test.completed_at.is_some()
        && test
            .remainder
            .as_ref()
            .is_some_and(|r| !r.send_id.is_empty())
}

/// The trigger of send `send_id` (its only submission).
pub(crate) async fn trigger_of(app: &TestApp, send_id: &str) -> anyhow::Result<i64> {
    let send = sends::get_send(&app.ctx, &SendKey::Id(send_id.into())).await?;
    send.submissions
        .first()
        .and_then(|s| s.cio_trigger_id)
        .with_context(|| format!("send {send_id} has no trigger yet"))
}

/// Every Customer.io segment the test created (named after it).
fn test_segments(app: &TestApp, id: &str) -> Vec<i64> {
    app.sim
        .sim
        .segments()
        .iter()
        .filter(|s| s.name.starts_with(&format!("A/B {id} ")))
        .map(|s| s.id)
        .collect()
}

db_test!(
    three_variants_find_the_best_and_the_winner_goes_to_the_rest_once,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let people = 3_000;
        let audience = audience(&app, people).await?;
        let mut client = app.abtests().await?;
        let created = client
            .create_test(three_variants("three", audience))
            .await?
            .into_inner()
            .test
            .context("created")?;
        let id = created.id.clone();

        // StartTest: the audience allocated and stored; a second start answers the same.
        let started = client
            .start_test(pb::StartTestRequest { id: id.clone() })
            .await?
            .into_inner()
            .test
            .context("started")?;
        ensure!(started.state == TestState::Running as i32, "{started:?}");
        ensure!(started.started_at.is_some());
        let remainder = started.remainder.clone().context("remainder")?;
        let allocated: i64 = started.results.iter().map(|r| r.allocated).sum();
        ensure!(
            allocated + remainder.allocated == people as i64,
            "everyone is allocated once: {allocated} + {}",
            remainder.allocated
        );
        for r in &started.results {
            // 30% of 3,000 over three variants: about 300 each.
            ensure!((220..=380).contains(&r.allocated), "{r:?}");
        }
        let again = client
            .start_test(pb::StartTestRequest { id: id.clone() })
            .await?
            .into_inner()
            .test
            .context("again")?;
        ensure!(again.started_at == started.started_at && again.results == started.results);

        // The job: segments, their members, then one send per variant.
        let sent = drive(&app, &app.ctx, &id, variants_sent).await?;
        ensure!(sent.state == TestState::Running as i32);
        settle_triggers(&app, &app.ctx, 3).await?;
        ensure!(test_segments(&app, &id).len() == 3);
        for (result, (name, _, _)) in sent.results.iter().zip(VARIANTS) {
            ensure!(result.name == name && result.segment_id > 0);
            let members = app
                .sim
                .sim
                .segment_members(result.segment_id)
                .context("variant segment")?;
            ensure!(
                members.len() as i64 == result.allocated,
                "the variant's segment holds its allocation"
            );
        }

        // Results come back; the job looks every run (here every 3 hours of simulated time).
        let decided = decided_by_the_rule(&app, &id).await?;
        let decision = decided.decision.clone().context("decision")?;
        ensure!(
            decision.winner == 2 && decision.actor == "sequential-test",
            "the best variant wins: {decision:?} {:?}",
            decided.results
        );
        ensure!(decided.looks >= 1, "{}", decided.looks);
        ensure!(
            decided.results[2].p_value_vs_control < 0.05 / 3.0,
            "{:?}",
            decided.results
        );
        let (low, high) = (decided.results[2].rate_low, decided.results[2].rate_high);
        ensure!(low < decided.results[2].rate && decided.results[2].rate < high);
        // The job's decision is in the audit record, with the test and the winner.
        let audit = app
            .admin()
            .await?
            .list_audit_events(pb::ListAuditEventsRequest {
                action: sharpsend_core::abtest::run::AUDIT_DECIDE_ACTION.into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let ids = audit
            .first()
            .and_then(|e| e.ids.clone())
            .context("no audit event of the decision")?;
        let ids = sharpsend_server::convert::struct_to_json("ids", ids)?;
        ensure!(
            audit.len() == 1
                && audit[0].key_id == "job:abtest-evaluation"
                && audit[0].outcome == "OK"
                && ids.get("test_id").and_then(|v| v.as_str()) == Some(id.as_str())
                && ids.get("winner").and_then(|v| v.as_str()) == Some(VARIANTS[2].0),
            "{audit:?}"
        );

        // The winner goes to the remainder, once.
        let done = drive(&app, &app.ctx, &id, remainder_sent).await?;
        settle_triggers(&app, &app.ctx, 4).await?;
        let remainder = done.remainder.clone().context("remainder")?;
        let remainder_trigger = trigger_of(&app, &remainder.send_id).await?;
        let winner_subject = VARIANTS[2].1;
        let remainder_deliveries = app.sim.sim.deliveries(&DeliveryFilter {
            trigger_id: Some(remainder_trigger),
            ..DeliveryFilter::default()
        });
        ensure!(
            !remainder_deliveries.is_empty()
                && remainder_deliveries
                    .iter()
                    .all(|d| d.subject == winner_subject),
            "the remainder got the winner"
        );

        // Per-variant counts equal the simulator's ledger; nobody got two variants.
        app.run_job(Job::DeliveryPoll).await?;
        let last = get(&app, &id).await?;
        let mut seen: HashSet<String> = HashSet::new();
        for result in &last.results {
            let trigger = trigger_of(&app, &result.send_id).await?;
            let deliveries = app.sim.sim.deliveries(&DeliveryFilter {
                trigger_id: Some(trigger),
                ..DeliveryFilter::default()
            });
            matches_the_ledger(result, &deliveries, &mut seen)?;
        }
        nobody_got_a_variant_and_the_remainder(&seen, &remainder_deliveries)?;
        app.stop().await
    }
);

db_test!(
    a_crashed_evaluation_loses_nothing_and_sends_nothing_twice,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let audience = audience(&app, 1_500).await?;
        // The scheduler that takes over after the crash: its own context on the same database
        // and simulator, sharing the clock.
        let restarted = AppContext::bootstrap(
            sharpsend_tests::test_settings(
                &app.database_url,
                sharpsend_tests::sim_settings(&app.sim),
            ),
            Migrations::RequireCurrent,
            app.ctx.clock.clone(),
        )
        .await?;
        let mut client = app.abtests().await?;
        let (id, _) = start_three_variants(&app, "crash", audience, 0.6).await?;

        // The evaluation dies at arbitrary points, again and again (the outbox keeps going). A
        // run that dies inside a segment creation leaves its idempotency key without a result:
        // later runs wait on it until it is stale (2 minutes), then take it over and adopt the
        // segment the dead run created in Customer.io, if it got that far. (Time moves once per
        // crash phase, and by less than the adoption window of 5 minutes: the simulator presents
        // its times on the wall clock while the service's clock runs ahead by every `advance`.)
        for delay_ms in [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233] {
            let ctx = app.ctx.clone();
            let task =
                tokio::spawn(async move { sharpsend_core::abtest::run::evaluate(&ctx).await });
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            task.abort();
            let _ = task.await;
            app.deliver_all("e2e-outbox", Duration::from_secs(30))
                .await?;
        }
        ensure!(triggers(&app).len() <= 3, "no variant sent twice");
        app.advance(Duration::from_secs(130));
        let sent = drive(&app, &restarted, &id, variants_sent).await?;
        settle_triggers(&app, &restarted, 3).await?;
        let segments = test_segments(&app, &id);
        ensure!(segments.len() == 3, "no orphan segment: {segments:?}");
        let recipients: Vec<BTreeSet<String>> = triggers(&app)
            .iter()
            .map(|t| t.recipients.iter().cloned().collect())
            .collect();
        for (i, a) in recipients.iter().enumerate() {
            for b in &recipients[i + 1..] {
                ensure!(a.is_disjoint(b), "nobody gets two variants");
            }
        }
        for result in &sent.results {
            let members = app
                .sim
                .sim
                .segment_members(result.segment_id)
                .context("segment")?;
            ensure!(members.len() as i64 == result.allocated, "{result:?}");
        }

        // An operator's winner goes to the remainder, once, whoever runs the job.
        let declared = client
            .declare_winner(pb::DeclareWinnerRequest {
                id: id.clone(),
                variant: "teaser".into(),
                reason: "the editor prefers it".into(),
            })
            .await?
            .into_inner()
            .test
            .context("declared")?;
        ensure!(declared.state == TestState::Decided as i32);
        let again = client
            .declare_winner(pb::DeclareWinnerRequest {
                id: id.clone(),
                variant: "urgent".into(),
                reason: "second thoughts".into(),
            })
            .await
            .expect_err("decided once");
        ensure!(again.code() == Code::FailedPrecondition, "{again:?}");
        for delay_ms in [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89] {
            let ctx = app.ctx.clone();
            let task =
                tokio::spawn(async move { sharpsend_core::abtest::run::evaluate(&ctx).await });
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            task.abort();
            let _ = task.await;
            app.deliver_all("e2e-outbox", Duration::from_secs(30))
                .await?;
        }
        ensure!(triggers(&app).len() <= 4, "no remainder sent twice");
        app.advance(Duration::from_secs(130));
        let done = drive(&app, &restarted, &id, remainder_sent).await?;
        settle_triggers(&app, &restarted, 4).await?;
        let all = triggers(&app);
        ensure!(test_segments(&app, &id).len() == 4);
        let remainder_trigger =
            trigger_of(&app, &done.remainder.context("remainder")?.send_id).await?;
        let remainder = all
            .iter()
            .find(|t| t.id == remainder_trigger)
            .context("remainder trigger")?;
        ensure!(
            remainder
                .data
                .as_ref()
                .and_then(|d| d.get("subject"))
                .and_then(|s| s.as_str())
                == Some(VARIANTS[1].1),
            "the declared winner went out"
        );
        let variant_people: BTreeSet<&String> = recipients.iter().flat_map(|r| r.iter()).collect();
        ensure!(
            remainder
                .recipients
                .iter()
                .all(|p| !variant_people.contains(p)),
            "the remainder never gets a test variant"
        );
        app.stop().await
    }
);

db_test!(
    a_cancelled_test_sends_nothing_more_and_leavers_get_no_winner,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let audience = audience(&app, 600).await?;
        let mut client = app.abtests().await?;

        // Cancelled after the job created the segments, before any variant went out.
        let (id, _) = start_three_variants(&app, "cancel", audience, 0.9).await?;
        app.run_job(Job::AbTestEvaluation).await?;
        let cancelled = client
            .cancel_test(pb::CancelTestRequest {
                id: id.clone(),
                reason: "wrong assignment".into(),
            })
            .await?
            .into_inner()
            .test
            .context("cancelled")?;
        ensure!(cancelled.state == TestState::Cancelled as i32);
        for _ in 0..3 {
            app.run_job(Job::AbTestEvaluation).await?;
            app.deliver_all("e2e-outbox", Duration::from_secs(30))
                .await?;
            app.run_job(Job::SendDispatch).await?;
        }
        ensure!(triggers(&app).is_empty(), "a cancelled test sends nothing");
        let restart = client
            .start_test(pb::StartTestRequest { id: id.clone() })
            .await
            .expect_err("cancelled");
        ensure!(restart.code() == Code::FailedPrecondition, "{restart:?}");

        // A second test: people who leave the audience before the winner is known do not get it.
        let mut request = three_variants("leavers", audience);
        request.test_fraction = 0.5;
        let created = client
            .create_test(request)
            .await?
            .into_inner()
            .test
            .context("created")?;
        let test = client
            .start_test(pb::StartTestRequest { id: created.id })
            .await?
            .into_inner()
            .test
            .context("started")?;
        let id = test.id.clone();
        drive(&app, &app.ctx, &id, variants_sent).await?;
        settle_triggers(&app, &app.ctx, 3).await?;
        let variant_people: BTreeSet<String> = triggers(&app)
            .iter()
            .flat_map(|t| t.recipients.iter().cloned())
            .collect();
        let leavers: Vec<String> = (1..=600)
            .map(|n| format!("u{n:05}"))
            .filter(|p| allocate(&id, p, 3, 0.5) == Allocation::Remainder)
            .take(40)
            .collect();
        ensure!(leavers.iter().all(|p| !variant_people.contains(p)));
        let refs: Vec<&str> = leavers.iter().map(String::as_str).collect();
        app.sim.sim.remove_from_manual_segment(audience, &refs)?;
        client
            .declare_winner(pb::DeclareWinnerRequest {
                id: id.clone(),
                variant: "control".into(),
                reason: "house style".into(),
            })
            .await?;
        let done = drive(&app, &app.ctx, &id, remainder_sent).await?;
        settle_triggers(&app, &app.ctx, 4).await?;
        let remainder = done.remainder.context("remainder")?;
        let trigger = trigger_of(&app, &remainder.send_id).await?;
        let got: BTreeSet<String> = app
            .sim
            .sim
            .trigger(trigger)
            .context("trigger")?
            .recipients
            .into_iter()
            .collect();
        ensure!(
            leavers.iter().all(|p| !got.contains(p)),
            "people who left the audience get no winner"
        );
        ensure!(
            remainder.allocated == test.remainder.context("at start")?.allocated - 40,
            "the remainder was re-checked: {}",
            remainder.allocated
        );
        app.stop().await
    }
);

/// Runs the job until every variant's send is recorded, without moving time: the broadcast's
/// trigger window lets only the first go out, the other two stay pending.
/// An app whose service spaces a broadcast's triggers 30 s apart (on its adjustable clock): the
/// process that sent the first variant follows the others in the background on the real clock,
/// so with the usual fraction of a second it could claim the second variant before the test's
/// next call on a slow machine. Tests move the clock on to open the window.
async fn spawn_with_a_long_trigger_window(db: &TestDatabase) -> anyhow::Result<TestApp> {
    TestApp::spawn_with_settings(db, cio_sim::SimConfig::demo(), |s| {
        s.sends.trigger_spacing = Duration::from_secs(30);
    })
    .await
}

async fn first_variant_out_others_pending(app: &TestApp, id: &str) -> anyhow::Result<()> {
    for _ in 0..10 {
        app.run_job(Job::AbTestEvaluation).await?;
        app.deliver_all("e2e-outbox", Duration::from_secs(30))
            .await?;
        let test = get(app, id).await?;
        if variants_sent(&test) {
            let states: Vec<pb::SendState> = test.results.iter().map(|r| r.send_state()).collect();
            ensure!(
                states[1..].iter().all(|s| *s == pb::SendState::Pending),
                "{states:?}"
            );
            ensure!(triggers(app).len() == 1, "one trigger per window");
            return Ok(());
        }
    }
    anyhow::bail!("the variants' sends were not recorded")
}

db_test!(
    a_declared_winner_stops_pending_variants_and_their_people_get_the_winner,
    |db: TestDatabase| async move {
        let app = spawn_with_a_long_trigger_window(&db).await?;
        let audience = audience(&app, 600).await?;
        let mut client = app.abtests().await?;
        let (id, _) = start_three_variants(&app, "declare", audience, 0.6).await?;
        first_variant_out_others_pending(&app, &id).await?;
        let first_people: BTreeSet<String> = triggers(&app)[0].recipients.iter().cloned().collect();

        let declared = client
            .declare_winner(pb::DeclareWinnerRequest {
                id: id.clone(),
                variant: "teaser".into(),
                reason: "the editor has seen enough".into(),
            })
            .await?
            .into_inner()
            .test
            .context("declared")?;
        let states: Vec<pb::SendState> = declared.results.iter().map(|r| r.send_state()).collect();
        ensure!(
            states[1..].iter().all(|s| *s == pb::SendState::Cancelled),
            "testing stops: {states:?}"
        );

        // The winner goes to the rest: the remainder and the people of the stopped variants.
        let done = drive(&app, &app.ctx, &id, remainder_sent).await?;
        settle_triggers(&app, &app.ctx, 2).await?;
        let remainder = done.remainder.context("remainder")?;
        let trigger = trigger_of(&app, &remainder.send_id).await?;
        let got = app.sim.sim.trigger(trigger).context("trigger")?;
        ensure!(
            got.data
                .as_ref()
                .and_then(|d| d.get("subject"))
                .and_then(|s| s.as_str())
                == Some(VARIANTS[1].1),
            "the declared winner went out"
        );
        let got: BTreeSet<String> = got.recipients.into_iter().collect();
        let expected: BTreeSet<String> = (1..=600)
            .map(|n| format!("u{n:05}"))
            .filter(|p| allocate(&id, p, 3, 0.6) != Allocation::Variant(0))
            .collect();
        ensure!(
            got.is_disjoint(&first_people),
            "nobody gets a variant and the winner"
        );
        let members: BTreeSet<String> = app
            .sim
            .sim
            .segment_members(remainder.segment_id)
            .context("remainder segment")?
            .into_iter()
            .collect();
        ensure!(
            members == expected && got.is_subset(&members),
            "everyone but the first variant's people: {} members, {} expected, {} got it",
            members.len(),
            expected.len(),
            got.len()
        );
        ensure!(
            remainder.allocated == expected.len() as i64,
            "{remainder:?}"
        );
        app.stop().await
    }
);

db_test!(
    cancel_test_stops_the_variant_sends_not_yet_claimed,
    |db: TestDatabase| async move {
        let app = spawn_with_a_long_trigger_window(&db).await?;
        let audience = audience(&app, 600).await?;
        let mut client = app.abtests().await?;
        let (id, _) = start_three_variants(&app, "stop", audience, 0.6).await?;

        first_variant_out_others_pending(&app, &id).await?;

        let cancelled = client
            .cancel_test(pb::CancelTestRequest {
                id: id.clone(),
                reason: "the offer was withdrawn".into(),
            })
            .await?
            .into_inner()
            .test
            .context("cancelled")?;
        ensure!(cancelled.state == TestState::Cancelled as i32);
        // The answer says which variants went out: the first did, the others never will.
        let states: Vec<pb::SendState> = cancelled.results.iter().map(|r| r.send_state()).collect();
        ensure!(
            matches!(
                states[0],
                pb::SendState::Submitted | pb::SendState::Completed
            ) && states[1..].iter().all(|s| *s == pb::SendState::Cancelled),
            "{states:?}"
        );

        // Nothing more reaches the simulator, whatever runs and however long.
        for _ in 0..5 {
            app.advance(Duration::from_secs(30));
            app.run_job(Job::SendDispatch).await?;
            app.run_job(Job::AbTestEvaluation).await?;
            app.run_job(Job::SendReconcile).await?;
        }
        let sent = triggers(&app);
        ensure!(
            sent.len() == 1,
            "only the claimed variant went out: {}",
            sent.len()
        );
        let first = trigger_of(&app, &cancelled.results[0].send_id).await?;
        ensure!(sent[0].id == first);
        let last = get(&app, &id).await?;
        ensure!(
            last.results[1..]
                .iter()
                .all(|r| r.send_state() == pb::SendState::Cancelled),
            "{:?}",
            last.results
        );
        let remainder = last.remainder.context("remainder")?;
        ensure!(
            remainder.send_id.is_empty() && remainder.send_state() == pb::SendState::Unspecified,
            "no remainder send: {remainder:?}"
        );
        for r in &last.results[1..] {
            let send = sends::get_send(&app.ctx, &SendKey::Id(r.send_id.clone())).await?;
            ensure!(
                send.submissions
                    .iter()
                    .all(|s| s.cio_trigger_id.is_none() && s.attempts == 0),
                "{send:?}"
            );
        }
        app.stop().await
    }
);

/// The newsletter of send `send_id` (its only submission), once created.
async fn newsletter_of(app: &TestApp, send_id: &str) -> anyhow::Result<i64> {
    let send = sends::get_send(&app.ctx, &SendKey::Id(send_id.into())).await?;
    send.submissions
        .first()
        .and_then(|s| s.cio_newsletter_id)
        .with_context(|| format!("send {send_id} has no newsletter yet"))
}

/// The simulator's sent newsletters of the three-variant tests (named after their title; the
/// demo workspace has newsletters of its own).
fn sent_newsletters(app: &TestApp) -> Vec<cio_sim::SimNewsletter> {
    app.sim
        .sim
        .newsletters()
        .into_iter()
        .filter(|n| n.sent_at.is_some() && n.name.starts_with("Q4 outlook, three subject lines "))
        .collect()
}

/// A newsletter's deliveries went to members of its segment, each once, and to nearly all of
/// them (the simulator, like Customer.io, skips people without an email or unsubscribed).
fn reaches_its_segment(
    app: &TestApp,
    deliveries: &[cio_sim::SimDelivery],
    segment_id: i64,
    what: &str,
) -> anyhow::Result<()> {
    let members: HashSet<String> = app
        .sim
        .sim
        .segment_members(segment_id)
        .context("segment")?
        .into_iter()
        .collect();
    let people: HashSet<&String> = deliveries.iter().map(|d| &d.person_id).collect();
    ensure!(
        people.len() == deliveries.len(),
        "{what}: someone got it twice"
    );
    ensure!(
        people.iter().all(|p| members.contains(*p)),
        "{what}: sent beyond its segment"
    );
    ensure!(
        deliveries.len() * 10 >= members.len() * 9,
        "{what}: {} deliveries for {} members",
        deliveries.len(),
        members.len()
    );
    Ok(())
}

db_test!(
    newsletter_variants_find_the_best_and_the_winner_goes_to_the_rest_once,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let people = 3_000;
        let audience = audience(&app, people).await?;
        let mut client = app.abtests().await?;
        let mut request = three_variants("newsletter", audience);
        request.delivery = Some(pb::create_test_request::Delivery::NewsletterFromId(0));
        // The longest title CreateTest takes: a newsletter's name (title and marker) must still
        // fit Customer.io's 190 characters.
        request.title = format!("{} {}", request.title, "ü".repeat(200 - 32));
        ensure!(request.title.chars().count() == 200);
        let created = client
            .create_test(request)
            .await?
            .into_inner()
            .test
            .context("created")?;
        let id = created.id.clone();
        ensure!(
            created.delivery == Some(pb::ab_test::Delivery::NewsletterFromId(0)),
            "{:?}",
            created.delivery
        );
        client
            .start_test(pb::StartTestRequest { id: id.clone() })
            .await?;

        // One newsletter per variant, created with the variant's content and sent; no trigger.
        let sent = drive(&app, &app.ctx, &id, |t| {
            variants_sent(t)
                && t.results
                    .iter()
                    .all(|r| r.send_state() == pb::SendState::Submitted)
        })
        .await?;
        ensure!(
            triggers(&app).is_empty(),
            "newsletter delivery triggers nothing"
        );
        let newsletters = sent_newsletters(&app);
        ensure!(newsletters.len() == 3, "{} newsletters", newsletters.len());
        for (result, (name, subject, _)) in sent.results.iter().zip(VARIANTS) {
            let newsletter_id = newsletter_of(&app, &result.send_id).await?;
            let newsletter = newsletters
                .iter()
                .find(|n| n.id == newsletter_id)
                .with_context(|| format!("{name}'s newsletter was not sent"))?;
            ensure!(
                newsletter.subject == subject && newsletter.body == format!("<p>{name}</p>"),
                "{name}: {newsletter:?}"
            );
            ensure!(
                newsletter.recipient_segment_ids == [result.segment_id],
                "{name} goes to its own segment: {newsletter:?}"
            );
        }

        // Results come back through the delivery poll; the rule decides.
        let decided = decided_by_the_rule(&app, &id).await?;
        let decision = decided.decision.clone().context("decision")?;
        ensure!(
            decision.winner == 2 && decision.actor == "sequential-test",
            "the best variant wins: {decision:?} {:?}",
            decided.results
        );

        // The winner goes to the remainder as one more newsletter, once.
        let done = drive(&app, &app.ctx, &id, |t| {
            remainder_sent(t)
                && t.remainder
                    .as_ref()
                    .is_some_and(|r| r.send_state() == pb::SendState::Submitted)
        })
        .await?;
        for _ in 0..3 {
            app.run_job(Job::AbTestEvaluation).await?;
            app.run_job(Job::SendDispatch).await?;
            app.advance(Duration::from_secs(1));
        }
        let newsletters = sent_newsletters(&app);
        ensure!(
            newsletters.len() == 4,
            "three variants and one remainder: {}",
            newsletters.len()
        );
        let remainder = done.remainder.clone().context("remainder")?;
        let remainder_newsletter = newsletter_of(&app, &remainder.send_id).await?;
        let remainder_deliveries = app.sim.sim.deliveries(&DeliveryFilter {
            newsletter_id: Some(remainder_newsletter),
            ..DeliveryFilter::default()
        });
        ensure!(
            !remainder_deliveries.is_empty()
                && remainder_deliveries
                    .iter()
                    .all(|d| d.subject == VARIANTS[2].1),
            "the remainder got the winner"
        );
        reaches_its_segment(
            &app,
            &remainder_deliveries,
            remainder.segment_id,
            "remainder",
        )?;

        // Per-variant counts equal the simulator's ledger; nobody got two variants.
        app.run_job(Job::DeliveryPoll).await?;
        let last = get(&app, &id).await?;
        let mut seen: HashSet<String> = HashSet::new();
        for result in &last.results {
            let newsletter_id = newsletter_of(&app, &result.send_id).await?;
            let deliveries = app.sim.sim.deliveries(&DeliveryFilter {
                newsletter_id: Some(newsletter_id),
                ..DeliveryFilter::default()
            });
            reaches_its_segment(&app, &deliveries, result.segment_id, &result.name)?;
            matches_the_ledger(result, &deliveries, &mut seen)?;
        }
        nobody_got_a_variant_and_the_remainder(&seen, &remainder_deliveries)?;
        app.stop().await
    }
);

/// A variant's figures equal the simulator's ledger of its `deliveries`, and none of its people
/// is in `seen` (another variant's); adds them to it.
fn matches_the_ledger(
    result: &pb::VariantResult,
    deliveries: &[SimDelivery],
    seen: &mut HashSet<String>,
) -> anyhow::Result<()> {
    let count = |metric: DeliveryMetric| {
        deliveries
            .iter()
            .filter(|d| d.events.contains_key(&metric))
            .count() as i64
    };
    let (delivered, opened, clicked) = (
        count(DeliveryMetric::Delivered),
        count(DeliveryMetric::HumanOpened),
        count(DeliveryMetric::HumanClicked),
    );
    ensure!(
        result.recipients == delivered
            && result.human_clicks == clicked
            && result.human_opens == opened,
        "{} counts {result:?} vs the ledger: {delivered} delivered, {opened} opened, {clicked} clicked",
        result.name
    );
    for d in deliveries {
        ensure!(
            seen.insert(d.person_id.clone()),
            "{} received two variants",
            d.person_id
        );
    }
    Ok(())
}

/// Nobody of the remainder's deliveries got a variant (`seen`).
fn nobody_got_a_variant_and_the_remainder(
    seen: &HashSet<String>,
    remainder: &[SimDelivery],
) -> anyhow::Result<()> {
    for d in remainder {
        ensure!(
            !seen.contains(&d.person_id),
            "{} got a variant and the remainder",
            d.person_id
        );
    }
    Ok(())
}
