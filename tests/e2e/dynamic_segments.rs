//! SharpSend-managed dynamic segments end to end: criteria evaluated over the profile mirror,
//! membership kept in the simulator's manual segment through the outbox.

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use anyhow::{Context, ensure};
use chrono::Utc;
use cio_sim::{Fault, SimApi, SimConfig};
use prost_types::Struct;
use serde_json::{Value, json};
use sharpsend_core::jobs::{Job, JobOutcome};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    self as pb, AddSegmentMembersRequest, BatchUpdateAttributesRequest, CreateSegmentRequest,
    DeleteSegmentRequest, GetSegmentRequest, GetSyncStatusRequest, ImportProfilesRequest,
    ListSegmentsRequest, PreviewSegmentRequest, RemoveSegmentMembersRequest,
    UpdateAttributesRequest, UpdateSegmentRequest,
};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

fn to_struct(value: Value) -> Struct {
    sharpsend_server::convert::json_to_struct(value.as_object().unwrap_or(&serde_json::Map::new()))
}

fn update(id: &str, attrs: Value) -> UpdateAttributesRequest {
    UpdateAttributesRequest {
        customer_id: id.into(),
        attributes: Some(to_struct(attrs)),
    }
}

/// A number, or a string holding one (Customer.io's form).
fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The simulator with the demo audience, App API limits lifted so that importing 5,000 people
/// takes a second, not a minute.
async fn spawn_fast(db: &TestDatabase) -> anyhow::Result<TestApp> {
    let sim = SimConfig {
        app_rate_limit_per_sec: 0,
        ..SimConfig::demo()
    };
    TestApp::spawn_with(db, sim, |settings| settings.app_requests_per_sec = 1000).await
}

/// Ids of the `add_customers` (or `remove_customers`) calls to `segment` in the request log,
/// one list per call, checking each call's size.
fn membership_calls(app: &TestApp, segment: i64, action: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let path = format!("/api/v1/segments/{segment}/{action}");
    let mut calls = Vec::new();
    for r in app
        .sim
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path == path && r.status == 200)
    {
        let ids: Vec<String> =
            serde_json::from_value(r.body.context("body")?.get("ids").cloned().context("ids")?)?;
        ensure!(
            !ids.is_empty() && ids.len() <= 1000,
            "{} ids in one {action} call",
            ids.len()
        );
        calls.push(ids);
    }
    Ok(calls)
}

/// The issue's example, computed by brute force over the simulator's people: members of
/// "Growth Investors" with engagement_score > 80 and sharpsend_assignment_interactions > 5.
fn brute_force(app: &TestApp, growth: i64) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for id in app
        .sim
        .sim
        .segment_members(growth)
        .context("growth segment")?
    {
        let person = app.sim.sim.person(&id).context("person")?;
        let score = number(person.attributes.get("engagement_score"));
        let interactions = number(person.attributes.get("sharpsend_assignment_interactions"));
        if score.is_some_and(|s| s > 80.0) && interactions.is_some_and(|i| i > 5.0) {
            out.insert(id);
        }
    }
    Ok(out)
}

fn members_of(app: &TestApp, segment: i64) -> anyhow::Result<BTreeSet<String>> {
    Ok(app
        .sim
        .sim
        .segment_members(segment)
        .context("segment missing in Customer.io")?
        .into_iter()
        .collect())
}

db_test!(
    the_issue_example_on_the_demo_audience_matches_brute_force_and_moves_only_who_changed,
    |db: TestDatabase| async move {
        let app = spawn_fast(&db).await?;
        let mut segments = app.segments().await?;
        let mut profiles = app.profiles().await?;
        app.sync_segments().await?;
        let growth = app
            .sim
            .sim
            .segments()
            .into_iter()
            .find(|s| s.name == "Growth Investors")
            .context("demo segment")?
            .id;

        // The demo audience into the mirror (every value a string, as Customer.io returns them).
        let ids: Vec<String> = (1..=app.sim.sim.people_count())
            .map(|n| format!("u{n:05}"))
            .collect();
        let mut stream = profiles
            .import_profiles(ImportProfilesRequest {
                customer_ids: ids.clone(),
                segment_id: 0,
            })
            .await?
            .into_inner();
        let mut last = None;
        while let Some(p) = stream.message().await? {
            last = Some(p);
        }
        ensure!(
            last.is_some_and(|p| p.done && p.imported == ids.len() as u64),
            "import incomplete"
        );
        // SharpSend's own attribute, written as JSON numbers.
        for chunk in ids.chunks(1000) {
            let updates = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    update(
                        id,
                        json!({"sharpsend_assignment_interactions": (i * 7 + id.len()) % 13}),
                    )
                })
                .collect();
            profiles
                .batch_update_attributes(BatchUpdateAttributesRequest { updates })
                .await?;
        }
        app.deliver_all("w", Duration::from_secs(60)).await?;
        let expected = brute_force(&app, growth)?;
        ensure!(
            expected.len() > 20 && expected.len() < 1000,
            "{} expected members",
            expected.len()
        );

        let criteria_json = json!({"and": [
        {"segment": {"id": growth}},
        {"attribute": {"field": "engagement_score", "operator": "gt", "value": 80}},
        {"attribute": {"field": "sharpsend_assignment_interactions", "operator": "gt", "value": 5}},
    ]})
    .to_string();
        let preview = segments
            .preview_segment(PreviewSegmentRequest {
                criteria: None,
                criteria_json: criteria_json.clone(),
                sample_size: 5,
            })
            .await?
            .into_inner();
        ensure!(
            preview.member_count == expected.len() as i64,
            "preview {} vs {}",
            preview.member_count,
            expected.len()
        );
        let sample: Vec<String> = preview
            .sample
            .iter()
            .map(|m| m.customer_id.clone())
            .collect();
        ensure!(
            sample == expected.iter().take(5).cloned().collect::<Vec<_>>(),
            "{sample:?}"
        );

        let created = segments
            .create_segment(CreateSegmentRequest {
                name: "High Engagement Growth Investors".into(),
                description: "growth, engaged, interacting".into(),
                criteria: None,
                criteria_json: criteria_json.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        let managed = created.managed.clone().context("managed")?;
        ensure!(
            managed.member_count == expected.len() as i64
                && created.r#type == pb::SegmentType::Manual as i32,
            "{created:?}"
        );
        ensure!(
            managed
                .last_evaluation
                .as_ref()
                .is_some_and(|e| e.added == expected.len() as i64),
            "{managed:?}"
        );
        ensure!(
            managed.criteria.is_some()
                && serde_json::from_str::<Value>(&managed.criteria_json)?
                    == serde_json::from_str::<Value>(&criteria_json)?
        );
        let segment_id = created.id;
        ensure!(
            members_of(&app, segment_id)?.is_empty(),
            "membership is sent by the outbox, not inline"
        );

        app.deliver_all("w", Duration::from_secs(60)).await?;
        ensure!(
            members_of(&app, segment_id)? == expected,
            "Customer.io membership differs from brute force"
        );
        let calls = membership_calls(&app, segment_id, "add_customers")?;
        ensure!(calls.iter().map(Vec::len).sum::<usize>() == expected.len());

        // One member stops matching, one person starts: exactly they move.
        let leaving = expected.iter().next().cloned().context("member")?;
        let joining = app
            .sim
            .sim
            .segment_members(growth)
            .unwrap_or_default()
            .into_iter()
            .find(|id| {
                let attrs = app
                    .sim
                    .sim
                    .person(id)
                    .map(|p| p.attributes)
                    .unwrap_or_default();
                !expected.contains(id)
                    && number(attrs.get("sharpsend_assignment_interactions"))
                        .is_some_and(|i| i > 5.0)
            })
            .context("a growth investor to join")?;
        profiles
            .update_attributes(update(&leaving, json!({"engagement_score": 10})))
            .await?;
        profiles
            .update_attributes(update(&joining, json!({"engagement_score": 95})))
            .await?;
        let due = segments
            .get_segment(GetSegmentRequest { segment_id })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        ensure!(
            due.managed.is_some_and(|m| m.evaluation_due),
            "an attribute change marks the segment due"
        );
        app.deliver_all("w", Duration::from_secs(60)).await?;
        app.sim.sim.clear_requests();
        let outcome = app.run_job(Job::SegmentEvaluation).await?;
        let JobOutcome::Succeeded { details, .. } = outcome else {
            anyhow::bail!("evaluation skipped");
        };
        ensure!(
            details["evaluated"] == 1 && details["added"] == 1 && details["removed"] == 1,
            "{details}"
        );
        app.deliver_all("w", Duration::from_secs(60)).await?;
        ensure!(
            membership_calls(&app, segment_id, "add_customers")? == vec![vec![joining.clone()]]
        );
        ensure!(
            membership_calls(&app, segment_id, "remove_customers")? == vec![vec![leaving.clone()]]
        );
        let now_expected = brute_force(&app, growth)?;
        ensure!(now_expected.contains(&joining) && !now_expected.contains(&leaving));
        ensure!(members_of(&app, segment_id)? == now_expected);

        // Nothing changed since: the next run evaluates nothing and sends nothing.
        let JobOutcome::Succeeded { details, .. } = app.run_job(Job::SegmentEvaluation).await?
        else {
            anyhow::bail!("evaluation skipped");
        };
        ensure!(details["evaluated"] == 0, "{details}");

        // Listed and got with criteria, last evaluation and member count.
        let listed = segments
            .list_segments(ListSegmentsRequest {
                page_size: 500,
                ..Default::default()
            })
            .await?
            .into_inner()
            .segments;
        let mine = listed
            .iter()
            .find(|s| s.id == segment_id)
            .context("listed")?;
        let info = mine.managed.clone().context("managed info")?;
        ensure!(
            mine.name == "High Engagement Growth Investors"
                && info.member_count == now_expected.len() as i64
        );
        ensure!(
            info.last_evaluation
                .is_some_and(|e| e.added == 1 && e.removed == 1)
                && !info.evaluation_due
        );
        ensure!(
            listed.iter().filter(|s| s.managed.is_some()).count() == 1,
            "only SharpSend's segment is managed"
        );
        app.stop().await
    }
);

db_test!(
    ten_thousand_member_changes_go_out_in_calls_of_at_most_1000_and_a_crash_loses_nothing,
    |db: TestDatabase| async move {
        let app = TestApp::spawn_with(&db, SimConfig::empty(), |_| {}).await?;
        let mut segments = app.segments().await?;
        let mut profiles = app.profiles().await?;
        let ids: Vec<String> = (0..10_000).map(|i| format!("bench-{i:05}")).collect();
        for chunk in ids.chunks(1000) {
            let updates = chunk
                .iter()
                .map(|id| update(id, json!({"cohort": "spring"})))
                .collect();
            profiles
                .batch_update_attributes(BatchUpdateAttributesRequest { updates })
                .await?;
        }
        app.deliver_all("w", Duration::from_secs(120)).await?;
        let created = segments
            .create_segment(CreateSegmentRequest {
                name: "Spring cohort".into(),
                description: String::new(),
                criteria: None,
                criteria_json:
                    r#"{"attribute": {"field": "cohort", "operator": "eq", "value": "spring"}}"#
                        .into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        let segment_id = created.id;
        ensure!(created.managed.is_some_and(|m| m.member_count == 10_000));
        let ctx = &app.ctx;
        let ws = ctx.workspace_id();
        let stats = sharpsend_db::outbox::stats(&ctx.db, ws).await?;
        ensure!(
            stats.pending == 10,
            "10,000 additions are 10 rows of 1000: {stats:?}"
        );

        // A worker delivers three rows.
        let mut three = ctx.settings.delivery.clone();
        three.claim_limit = 3;
        let step = sharpsend_core::outbox::deliver_step(ctx, "w1", &three).await?;
        ensure!(
            step.delivered == 3 && members_of(&app, segment_id)?.len() == 3000,
            "{step:?}"
        );
        // Another claims four, sends two of them, and dies before recording anything.
        let claimed = sharpsend_db::outbox::claim_due(
            &ctx.db,
            ws,
            "crashed",
            4,
            Duration::from_millis(300),
            ctx.now(),
        )
        .await?;
        ensure!(claimed.len() == 4);
        for row in &claimed[..2] {
            sharpsend_core::managed_segments::deliver_change(ctx, true, &row.payload).await?;
        }
        ensure!(members_of(&app, segment_id)?.len() == 5000);
        // Its claim lapses; the next worker finishes the job.
        app.advance(Duration::from_millis(400));
        let rest = app.deliver_all("w2", Duration::from_secs(60)).await?;
        ensure!(rest.delivered == 7 && rest.dead == 0, "{rest:?}");
        let everyone: BTreeSet<String> = ids.iter().cloned().collect();
        ensure!(
            members_of(&app, segment_id)? == everyone,
            "a member was lost"
        );
        let calls = membership_calls(&app, segment_id, "add_customers")?;
        ensure!(
            calls.len() == 12,
            "{} add calls: 10 rows, two of them sent twice after the crash",
            calls.len()
        );
        ensure!(calls.iter().flatten().collect::<HashSet<_>>().len() == 10_000);

        // All 10,000 leave, through a burst of server errors and a rate limit.
        app.sim.sim.push_faults(
            Some(SimApi::Track),
            [
                Fault::Status {
                    status: 503,
                    retry_after_secs: None,
                },
                Fault::Status {
                    status: 503,
                    retry_after_secs: None,
                },
                Fault::Status {
                    status: 503,
                    retry_after_secs: None,
                },
                Fault::Status {
                    status: 503,
                    retry_after_secs: None,
                },
                Fault::Status {
                    status: 429,
                    retry_after_secs: Some(1),
                },
            ],
        );
        let updated = segments
            .update_segment(UpdateSegmentRequest {
                segment_id,
                criteria_json:
                    r#"{"attribute": {"field": "cohort", "operator": "eq", "value": "autumn"}}"#
                        .into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        ensure!(updated.managed.is_some_and(
            |m| m.member_count == 0 && m.last_evaluation.is_some_and(|e| e.removed == 10_000)
        ));
        let report = app.deliver_all("w3", Duration::from_secs(120)).await?;
        ensure!(report.dead == 0 && report.delivered == 10, "{report:?}");
        ensure!(members_of(&app, segment_id)?.is_empty(), "someone stayed");
        let calls = membership_calls(&app, segment_id, "remove_customers")?;
        ensure!(
            calls.len() == 10 && calls.iter().flatten().collect::<HashSet<_>>().len() == 10_000,
            "{} remove calls",
            calls.len()
        );
        app.stop().await
    }
);

db_test!(
    manual_segments_take_members_by_hand_and_a_rejected_change_is_dead_lettered,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut segments = app.segments().await?;
        let created = segments
            .create_segment(CreateSegmentRequest {
                name: "Webinar guests".into(),
                description: String::new(),
                criteria: None,
                criteria_json: String::new(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        let id = created.id;
        ensure!(
            created
                .managed
                .as_ref()
                .is_some_and(|m| m.criteria.is_none() && m.member_count == 0)
        );
        let guests: Vec<String> = (1..=2500).map(|n| format!("u{n:05}")).collect();
        let added = segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: id,
                customer_ids: guests.clone(),
            })
            .await?
            .into_inner();
        ensure!(added.added == 2500 && added.member_count == 2500);
        let again = segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: id,
                customer_ids: guests[..10].to_vec(),
            })
            .await?
            .into_inner();
        ensure!(
            again.added == 0 && again.member_count == 2500,
            "adding a member again is harmless"
        );
        let removed = segments
            .remove_segment_members(RemoveSegmentMembersRequest {
                segment_id: id,
                customer_ids: guests[..500].to_vec(),
            })
            .await?
            .into_inner();
        ensure!(removed.removed == 500 && removed.member_count == 2000);
        app.deliver_all("w", Duration::from_secs(60)).await?;
        let want: BTreeSet<String> = guests[500..].iter().cloned().collect();
        ensure!(members_of(&app, id)? == want);

        // Deleted here and in Customer.io; then it is no longer managed.
        segments
            .delete_segment(DeleteSegmentRequest { segment_id: id })
            .await?;
        ensure!(
            app.sim.sim.segment_members(id).is_none(),
            "still in Customer.io"
        );
        let gone = segments
            .get_segment(GetSegmentRequest { segment_id: id })
            .await?
            .into_inner()
            .segment
            .context("mirror row")?;
        ensure!(gone.removed && gone.managed.is_none());
        let status = segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: id,
                customer_ids: guests[..1].to_vec(),
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(status.code() == Code::NotFound, "{status:?}");

        // A segment deleted in Customer.io behind SharpSend's back: the 400 dead-letters the row with its reason.
        let other = segments
            .create_segment(CreateSegmentRequest {
                name: "Doomed".into(),
                description: String::new(),
                criteria: None,
                criteria_json: String::new(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?
            .id;
        ensure!(app.sim.sim.delete_segment(other));
        segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: other,
                customer_ids: vec!["u00001".into()],
            })
            .await?;
        let report = app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(report.dead == 1, "{report:?}");
        let status = app
            .profiles()
            .await?
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        let dead = status.dead_letters.first().context("dead letter")?;
        ensure!(
            dead.kind == "segment_add" && dead.error.contains("Customer.io rejected"),
            "{dead:?}"
        );
        app.stop().await
    }
);

db_test!(
    preview_counts_without_creating_anything_and_relative_times_follow_the_clock,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut segments = app.segments().await?;
        let mut profiles = app.profiles().await?;
        let now = Utc::now().timestamp();
        let days = |d: i64| now - d * 86_400;
        let updates = vec![
            update("r1", json!({"last_opened_at": days(1), "plan": "pro"})),
            update(
                "r2",
                json!({"last_opened_at": days(10).to_string(), "plan": "pro"}),
            ),
            update("r3", json!({"last_opened_at": days(40), "plan": "free"})),
            update("r4", json!({"plan": "pro"})),
        ];
        profiles
            .batch_update_attributes(BatchUpdateAttributesRequest { updates })
            .await?;
        let segments_before = app.sim.sim.segments().len();
        let preview = |json: Value| PreviewSegmentRequest {
            criteria: None,
            criteria_json: json.to_string(),
            sample_size: 0,
        };
        let recent = segments
        .preview_segment(preview(json!({"attribute": {"field": "last_opened_at", "operator": "gte", "value": {"ago": "30d"}}})))
        .await?
        .into_inner();
        let sample: Vec<String> = recent
            .sample
            .iter()
            .map(|m| m.customer_id.clone())
            .collect();
        ensure!(
            recent.member_count == 2 && sample == ["r1", "r2"],
            "{recent:?}"
        );
        let lapsed = segments
        .preview_segment(preview(json!({"and": [
            {"attribute": {"field": "plan", "operator": "in", "value": ["pro", "free"]}},
            {"not": {"attribute": {"field": "last_opened_at", "operator": "gte", "value": {"ago": "30d"}}}}
        ]})))
        .await?
        .into_inner();
        ensure!(
            lapsed.member_count == 2,
            "r3 (old) and r4 (never opened): {lapsed:?}"
        );

        // The message form works as the JSON one does.
        let message = pb::Criteria {
            criterion: Some(pb::criteria::Criterion::Attribute(pb::AttributeCondition {
                field: "plan".into(),
                operator: pb::AttributeOperator::Eq as i32,
                value: Some(pb::ConditionValue {
                    value: Some(pb::condition_value::Value::StringValue("pro".into())),
                }),
                values: vec![],
            })),
        };
        let pro = segments
            .preview_segment(PreviewSegmentRequest {
                criteria: Some(message),
                criteria_json: String::new(),
                sample_size: 10,
            })
            .await?
            .into_inner();
        ensure!(pro.member_count == 3);
        ensure!(
            app.sim.sim.segments().len() == segments_before,
            "a preview created a segment"
        );
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(
            stats.pending == 4,
            "only the attribute updates are queued: {stats:?}"
        );
        app.stop().await
    }
);

db_test!(
    every_validation_error_is_invalid_argument_naming_the_problem,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut segments = app.segments().await?;
        app.sync_segments().await?;
        let growth = app
            .sim
            .sim
            .segments()
            .into_iter()
            .find(|s| s.name == "Growth Investors")
            .context("demo segment")?
            .id;
        let create = |json: &str| CreateSegmentRequest {
            name: "s".into(),
            description: String::new(),
            criteria: None,
            criteria_json: json.into(),
            ..Default::default()
        };
        let cases: Vec<(CreateSegmentRequest, Vec<&str>)> = vec![
            (create("{not json"), vec!["criteria_json"]),
            (create(r#"{"and": []}"#), vec!["criteria_json.and"]),
            (
                create(
                    r#"{"and": [{"segment": {"id": 1}}, {"segment": {"id": 2}}, {"attribute": {"field": "score", "operator": "between", "value": 1}}]}"#,
                ),
                vec!["criteria_json.and[2].attribute.operator"],
            ),
            (
                create(r#"{"attribute": {"field": "score", "operator": "contains", "value": 80}}"#),
                vec!["criteria_json.attribute.value"],
            ),
            (
                create(r#"{"attribute": {"field": "score", "operator": "in", "value": [1, "2"]}}"#),
                vec!["criteria_json.attribute.value[1]"],
            ),
            (
                create(r#"{"attribute": {"field": "", "operator": "exists"}}"#),
                vec!["criteria_json.attribute.field"],
            ),
            (
                create(r#"{"or": [{"segment": {"id": 99999}}]}"#),
                vec!["criteria_json.or[0].segment.id"],
            ),
            (
                create(
                    r#"{"attribute": {"field": "x", "operator": "gte", "value": {"ago": "a month"}}}"#,
                ),
                vec!["criteria_json.attribute.value"],
            ),
            (
                CreateSegmentRequest {
                    name: "  ".into(),
                    ..create(r#"{"segment": {"id": 1}}"#)
                },
                vec!["name"],
            ),
            (
                CreateSegmentRequest {
                    description: "d".repeat(1001),
                    ..create("")
                },
                vec!["description"],
            ),
            (
                CreateSegmentRequest {
                    criteria: Some(pb::Criteria::default()),
                    ..create(r#"{"segment": {"id": 1}}"#)
                },
                vec!["criteria_json"],
            ),
            (
                CreateSegmentRequest {
                    criteria: Some(pb::Criteria::default()),
                    ..create("")
                },
                vec!["criteria"],
            ),
            (
                CreateSegmentRequest {
                    criteria: Some(pb::Criteria {
                        criterion: Some(pb::criteria::Criterion::AllOf(pb::CriteriaGroup {
                            criteria: vec![pb::Criteria {
                                criterion: Some(pb::criteria::Criterion::Attribute(
                                    pb::AttributeCondition {
                                        field: "plan".into(),
                                        operator: pb::AttributeOperator::In as i32,
                                        value: None,
                                        values: vec![],
                                    },
                                )),
                            }],
                        })),
                    }),
                    ..create("")
                },
                vec!["criteria.all_of[0].attribute.values"],
            ),
        ];
        let segments_before = app.sim.sim.segments().len();
        for (request, want) in cases {
            let status = segments
                .create_segment(request.clone())
                .await
                .err()
                .with_context(|| format!("accepted {request:?}"))?;
            ensure!(
                status.code() == Code::InvalidArgument && bad_request_fields(&status) == want,
                "{want:?}: {status:?}"
            );
            ensure!(status.message().contains(want[0]), "{}", status.message());
        }
        ensure!(
            app.sim.sim.segments().len() == segments_before,
            "a refused request created a segment in Customer.io"
        );

        let status = segments
            .preview_segment(PreviewSegmentRequest::default())
            .await
            .err()
            .context("accepted")?;
        ensure!(
            status.code() == Code::InvalidArgument && bad_request_fields(&status) == ["criteria"]
        );
        let status = segments
            .preview_segment(PreviewSegmentRequest {
                criteria_json: r#"{"segment": 1}"#.into(),
                sample_size: -1,
                criteria: None,
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(bad_request_fields(&status) == ["sample_size"], "{status:?}");

        // Membership rules: computed segments refuse hand edits; reading yourself or a cycle is refused.
        let with_criteria = |name: &str, json: String| CreateSegmentRequest {
            name: name.into(),
            description: String::new(),
            criteria: None,
            criteria_json: json,
            ..Default::default()
        };
        let a = segments
            .create_segment(with_criteria(
                "a",
                json!({"segment": {"id": growth}}).to_string(),
            ))
            .await?
            .into_inner()
            .segment
            .context("a")?
            .id;
        let b = segments
            .create_segment(with_criteria(
                "b",
                json!({"segment": {"id": a}}).to_string(),
            ))
            .await?
            .into_inner()
            .segment
            .context("b")?
            .id;
        let status = segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: a,
                customer_ids: vec!["u00001".into()],
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(
            status.code() == Code::InvalidArgument && bad_request_fields(&status) == ["segment_id"],
            "{status:?}"
        );
        let status = segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: growth,
                customer_ids: vec!["u00001".into()],
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(
            status.code() == Code::NotFound,
            "a Customer.io segment SharpSend does not manage: {status:?}"
        );
        let status = segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: b,
                customer_ids: vec![String::new(), "x".repeat(151)],
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(
            bad_request_fields(&status) == ["customer_ids[0]", "customer_ids[1]"],
            "{status:?}"
        );
        let cycle = UpdateSegmentRequest {
            segment_id: a,
            criteria_json: json!({"segment": {"id": b}}).to_string(),
            ..Default::default()
        };
        let status = segments
            .update_segment(cycle)
            .await
            .err()
            .context("accepted")?;
        ensure!(
            status.code() == Code::InvalidArgument
                && bad_request_fields(&status) == ["criteria_json.segment.id"],
            "{status:?}"
        );
        let itself = UpdateSegmentRequest {
            segment_id: a,
            criteria_json: json!({"not": {"segment": {"id": a}}}).to_string(),
            ..Default::default()
        };
        let status = segments
            .update_segment(itself)
            .await
            .err()
            .context("accepted")?;
        ensure!(
            bad_request_fields(&status) == ["criteria_json.not.segment.id"],
            "{status:?}"
        );
        let status = segments
            .delete_segment(DeleteSegmentRequest { segment_id: a })
            .await
            .err()
            .context("deleted")?;
        ensure!(
            status.code() == Code::InvalidArgument
                && bad_request_fields(&status) == ["segment_id"]
                && status.message().contains(&b.to_string()),
            "{status:?}"
        );
        let status = segments
            .update_segment(UpdateSegmentRequest {
                segment_id: 424_242,
                ..Default::default()
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(status.code() == Code::NotFound, "{status:?}");
        app.stop().await
    }
);

db_test!(
    a_slow_add_and_a_later_remove_never_cross_in_flight,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut segments = app.segments().await?;
        let id = segments
            .create_segment(CreateSegmentRequest {
                name: "Crossing".into(),
                description: String::new(),
                criteria: None,
                criteria_json: String::new(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?
            .id;
        segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: id,
                customer_ids: vec!["u00007".into()],
            })
            .await?;
        // Customer.io is slow to take the add...
        app.sim.sim.push_faults(
            Some(SimApi::Track),
            [Fault::Delay(Duration::from_millis(1500))],
        );
        let a = app.ctx.clone();
        let slow = tokio::spawn(async move {
            sharpsend_core::outbox::drain(&a, "worker-a", &a.settings.delivery).await
        });
        let route = "POST /api/v1/segments/{segment_id}/add_customers";
        let started = std::time::Instant::now();
        while app
            .sim
            .sim
            .request_counts_by_route()
            .get(route)
            .copied()
            .unwrap_or(0)
            == 0
        {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "the add never left"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ...while the person is removed and another replica's worker looks for work.
        segments
            .remove_segment_members(RemoveSegmentMembersRequest {
                segment_id: id,
                customer_ids: vec!["u00007".into()],
            })
            .await?;
        let b = sharpsend_core::AppContext::new(
            db.connect_again().await?,
            app.ctx.cio.clone(),
            (*app.ctx.workspace).clone(),
            app.ctx.settings.clone(),
            app.ctx.clock.clone(),
        );
        let other = sharpsend_core::outbox::drain(&b, "worker-b", &b.settings.delivery).await?;
        ensure!(
            other.delivered == 0,
            "the remove went out while the add was in flight: {other:?}"
        );
        slow.await??;
        app.deliver_all("worker-a", Duration::from_secs(30)).await?;
        ensure!(
            !members_of(&app, id)?.contains("u00007"),
            "Customer.io kept a member SharpSend removed"
        );
        app.stop().await
    }
);
