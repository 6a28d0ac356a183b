//! ABTestService end to end (what exists this round): planning, creating a test validated field
//! by field and idempotent on its request id, reading and listing it, cancelling it and
//! declaring a winner once — through a real tonic client against a real server, on both
//! databases, with the audience checked against the segment mirror synced from the simulator.

use anyhow::{Context as _, ensure};
use sharpsend_core::jobs::Job;
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, TestState};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

/// The demo's API-triggered broadcast "Assignment Alert".
const BROADCAST: i64 = 3;

async fn synced(db: &TestDatabase) -> anyhow::Result<(TestApp, i64)> {
    let app = TestApp::spawn(db).await?;
    app.run_job(Job::SegmentSync).await?;
    let engaged = app
        .sim
        .sim
        .segments()
        .iter()
        .find(|s| s.name == "High Engagement")
        .map(|s| s.id)
        .context("no demo segment High Engagement")?;
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
