//! SegmentService end to end: sync from the simulator, list/get/validate from the mirror.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, ensure};
use cio_sim::{Fault, SegmentKind, SimApi, SimConfig};
use prost_types::value::Kind;
use secrecy::SecretString;
use sharpsend_core::jobs::{Job, JobOutcome};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    CreateSegmentRequest, GetSegmentRequest, JobRun, JobRunOutcome, ListSegmentsRequest, Segment,
    SegmentType, SyncSegmentsRequest, TargetingWarning, ValidateTargetingRequest,
};
use sharpsend_tests::{RUN_WAIT, TestApp, bad_request_fields, wait_for_run};
use tonic::Code;

type Client = sharpsend_proto::v1::segment_service_client::SegmentServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        sharpsend_tests::Bearer,
    >,
>;

/// A number from a run's details.
fn detail(run: &JobRun, key: &str) -> Option<f64> {
    match run.details.as_ref()?.fields.get(key)?.kind {
        Some(Kind::NumberValue(n)) => Some(n),
        _ => None,
    }
}

/// Calls SyncSegments (which answers at once with its run) and follows the run to its end.
async fn start_and_follow(app: &TestApp) -> anyhow::Result<JobRun> {
    let run = app
        .segments()
        .await?
        .sync_segments(SyncSegmentsRequest {})
        .await?
        .into_inner()
        .run
        .context("SyncSegments answered no run")?;
    // The answer is the run as it stands: one that fails at once (a 401) may already be over.
    ensure!(
        run.outcome != JobRunOutcome::Skipped as i32 && run.job == "segment-sync",
        "{run:?}"
    );
    wait_for_run(&mut app.ops().await?, run.id, RUN_WAIT).await
}

async fn list_all(
    client: &mut Client,
    mut request: ListSegmentsRequest,
) -> anyhow::Result<Vec<Segment>> {
    let mut all = Vec::new();
    loop {
        let page = client.list_segments(request.clone()).await?.into_inner();
        all.extend(page.segments);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        request.page_token = page.next_page_token;
    }
}

db_test!(
    sync_mirrors_segments_with_the_simulators_counts,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        let expected = app.sim.sim.segments();
        ensure!(expected.len() >= 6, "demo data has too few segments");

        let report = app.sync_segments().await?;
        ensure!(
            detail(&report, "created") == Some(expected.len() as f64),
            "created {:?} of {}",
            detail(&report, "created"),
            expected.len()
        );
        ensure!(
            detail(&report, "updated") == Some(0.0) && detail(&report, "removed") == Some(0.0),
            "{report:?}"
        );
        ensure!(report.duration.is_some() && report.finished_at.is_some());

        let listed = list_all(
            &mut client,
            ListSegmentsRequest {
                page_size: 500,
                ..Default::default()
            },
        )
        .await?;
        let got: BTreeMap<i64, (String, i32, Option<i64>)> = listed
            .iter()
            .map(|s| (s.id, (s.name.clone(), s.r#type, s.member_count)))
            .collect();
        let want: BTreeMap<i64, (String, i32, Option<i64>)> = expected
            .iter()
            .map(|s| {
                let kind = match s.kind {
                    SegmentKind::Dynamic => SegmentType::Dynamic,
                    SegmentKind::Manual => SegmentType::Manual,
                };
                (
                    s.id,
                    (s.name.clone(), kind as i32, Some(s.member_count as i64)),
                )
            })
            .collect();
        ensure!(
            got == want,
            "mirror differs from the simulator:\n got {got:?}\nwant {want:?}"
        );
        ensure!(
            listed
                .iter()
                .all(|s| s.counted_at.is_some() && s.synced_at.is_some() && !s.removed)
        );
        ensure!(got.values().any(|(name, _, _)| name == "Growth Investors"));

        // A second sync changes nothing; a changed count is an update.
        let again = app.sync_segments().await?;
        ensure!(
            detail(&again, "created") == Some(0.0)
                && detail(&again, "updated") == Some(0.0)
                && detail(&again, "unchanged") == Some(expected.len() as f64),
            "{again:?}"
        );
        let manual = expected
            .iter()
            .find(|s| s.kind == SegmentKind::Manual)
            .context("a manual segment")?;
        app.sim
            .sim
            .upsert_person("e2e-new-person", serde_json::Map::new());
        app.sim
            .sim
            .add_to_manual_segment(manual.id, &["e2e-new-person"])?;
        let third = app.sync_segments().await?;
        ensure!(detail(&third, "updated") == Some(1.0), "{third:?}");
        let got = client
            .get_segment(GetSegmentRequest {
                segment_id: manual.id,
            })
            .await?
            .into_inner()
            .segment;
        ensure!(got.and_then(|s| s.member_count) == Some(manual.member_count as i64 + 1));
        app.stop().await
    }
);

db_test!(
    a_segment_deleted_in_customer_io_is_gone_after_the_next_sync,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        ensure!(matches!(
            app.run_job(Job::SegmentSync).await,
            Ok(JobOutcome::Succeeded { .. })
        ));
        let victim = app
            .sim
            .sim
            .segments()
            .into_iter()
            .find(|s| s.name == "Dividend Seekers")
            .context("demo segment")?;
        ensure!(app.sim.sim.delete_segment(victim.id));

        let outcome = app.run_job(Job::SegmentSync).await?;
        let JobOutcome::Succeeded { details, .. } = outcome else {
            anyhow::bail!("job skipped")
        };
        ensure!(details["removed"] == 1, "{details}");

        let listed = list_all(&mut client, ListSegmentsRequest::default()).await?;
        ensure!(
            listed.iter().all(|s| s.id != victim.id),
            "removed segment still listed"
        );
        let with_removed = list_all(
            &mut client,
            ListSegmentsRequest {
                include_removed: true,
                ..Default::default()
            },
        )
        .await?;
        ensure!(with_removed.len() == listed.len() + 1);
        let got = client
            .get_segment(GetSegmentRequest {
                segment_id: victim.id,
            })
            .await?
            .into_inner();
        let got = got.segment.context("segment")?;
        ensure!(got.removed && got.removed_at.is_some(), "{got:?}");

        let verdict = client
            .validate_targeting(ValidateTargetingRequest {
                segment_ids: vec![victim.id],
                max_count_age: None,
            })
            .await?
            .into_inner();
        ensure!(!verdict.sendable);
        ensure!(
            verdict.segments[0]
                .warnings
                .contains(&(TargetingWarning::RemovedSegment as i32))
        );
        app.stop().await
    }
);

db_test!(
    sync_completes_under_a_429_storm_and_honours_retry_after,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let storm = (0..5).map(|_| Fault::Status {
            status: 429,
            retry_after_secs: Some(1),
        });
        app.sim.sim.push_faults(Some(SimApi::App), storm);

        let report = app.sync_segments().await?;
        ensure!(
            detail(&report, "created") == Some(app.sim.sim.segments().len() as f64),
            "{report:?}"
        );

        let app_requests: Vec<_> = app
            .sim
            .sim
            .requests()
            .into_iter()
            .filter(|r| r.api == SimApi::App)
            .collect();
        let limited: Vec<_> = app_requests.iter().filter(|r| r.status == 429).collect();
        ensure!(
            limited.len() == 5,
            "expected 5 rate-limited requests, saw {}",
            limited.len()
        );
        // After each 429 with Retry-After: 1, nothing is sent to the App API for a second.
        for hit in &limited {
            let too_soon = app_requests
                .iter()
                .filter(|r| r.at > hit.at && r.at < hit.at + chrono::Duration::milliseconds(900))
                .count();
            ensure!(
                too_soon == 0,
                "{too_soon} request(s) within 900 ms of a 429 at {}",
                hit.at
            );
        }
        app.stop().await
    }
);

db_test!(
    customer_io_rejecting_credentials_is_failed_precondition,
    |db: TestDatabase| async move {
        let wrong = "wrong-app-key-never-shown";
        let app = TestApp::spawn_with(&db, SimConfig::demo(), |s| {
            s.app_api_key = SecretString::from(wrong)
        })
        .await?;
        let mut client = app.segments().await?;
        let run = start_and_follow(&app).await?;
        ensure!(run.outcome == JobRunOutcome::Failed as i32, "{run:?}");
        ensure!(run.error.contains("CIO_APP_API_KEY"), "{}", run.error);
        ensure!(
            !format!("{run:?}").contains(wrong),
            "the key leaked: {run:?}"
        );
        // The failed sync wrote nothing.
        let listed = list_all(
            &mut client,
            ListSegmentsRequest {
                include_removed: true,
                ..Default::default()
            },
        )
        .await?;
        ensure!(listed.is_empty());
        app.stop().await
    }
);

db_test!(
    customer_io_unavailable_is_unavailable,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            (0..10).map(|_| Fault::Status {
                status: 503,
                retry_after_secs: None,
            }),
        );
        let run = start_and_follow(&app).await?;
        ensure!(run.outcome == JobRunOutcome::Failed as i32, "{run:?}");
        ensure!(
            run.error.to_lowercase().contains("unavailable") && !run.error.contains("SELECT"),
            "{}",
            run.error
        );
        app.stop().await
    }
);

db_test!(
    paging_filters_and_bad_arguments,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        app.sync_segments().await?;
        let sim_segments = app.sim.sim.segments();

        // Small pages walk every segment once, in id order.
        let paged = list_all(
            &mut client,
            ListSegmentsRequest {
                page_size: 3,
                ..Default::default()
            },
        )
        .await?;
        let ids: Vec<i64> = paged.iter().map(|s| s.id).collect();
        let mut want: Vec<i64> = sim_segments.iter().map(|s| s.id).collect();
        want.sort();
        ensure!(ids == want, "{ids:?} != {want:?}");
        let first = client
            .list_segments(ListSegmentsRequest {
                page_size: 3,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(first.segments.len() == 3 && !first.next_page_token.is_empty());

        // Name filter: case-insensitive substring.
        let named = list_all(
            &mut client,
            ListSegmentsRequest {
                name_contains: "INVESTOR".into(),
                ..Default::default()
            },
        )
        .await?;
        let want_named = sim_segments
            .iter()
            .filter(|s| s.name.to_lowercase().contains("investor"))
            .count();
        ensure!(
            want_named > 0 && named.len() == want_named,
            "{} vs {want_named}",
            named.len()
        );
        let none = list_all(
            &mut client,
            ListSegmentsRequest {
                name_contains: "%".into(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            none.iter().all(|s| s.name.contains('%')),
            "% must match literally"
        );

        // Type filter.
        let manual = list_all(
            &mut client,
            ListSegmentsRequest {
                r#type: SegmentType::Manual as i32,
                ..Default::default()
            },
        )
        .await?;
        let want_manual = sim_segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Manual)
            .count();
        ensure!(want_manual > 0 && manual.len() == want_manual);
        ensure!(
            manual
                .iter()
                .all(|s| s.r#type == SegmentType::Manual as i32)
        );

        // Oversized pages are capped, not refused.
        let big = client
            .list_segments(ListSegmentsRequest {
                page_size: 100_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(big.segments.len() == sim_segments.len());

        // Bad arguments name their field.
        for (request, field) in [
            (
                ListSegmentsRequest {
                    page_size: -1,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                ListSegmentsRequest {
                    page_token: "not-a-token".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                ListSegmentsRequest {
                    r#type: 42,
                    ..Default::default()
                },
                "type",
            ),
        ] {
            let status = client
                .list_segments(request)
                .await
                .err()
                .context("bad request accepted")?;
            ensure!(status.code() == Code::InvalidArgument, "{status:?}");
            ensure!(
                bad_request_fields(&status) == vec![field.to_string()],
                "{status:?}"
            );
        }
        let status = client
            .get_segment(GetSegmentRequest { segment_id: 0 })
            .await
            .err()
            .context("id 0 accepted")?;
        ensure!(
            status.code() == Code::InvalidArgument
                && bad_request_fields(&status) == vec!["segment_id"]
        );
        let status = client
            .get_segment(GetSegmentRequest {
                segment_id: 987_654,
            })
            .await
            .err()
            .context("unknown id found")?;
        ensure!(status.code() == Code::NotFound, "{status:?}");
        app.stop().await
    }
);

db_test!(
    validate_targeting_reports_each_problem,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        app.sync_segments().await?;
        let segments = app.sim.sim.segments();
        let growth = segments
            .iter()
            .find(|s| s.name == "Growth Investors")
            .context("growth")?;
        let empty = segments
            .iter()
            .find(|s| s.member_count == 0)
            .context("an empty demo segment")?;
        let crypto = segments
            .iter()
            .find(|s| s.name == "Crypto Enthusiasts")
            .context("crypto")?;

        let verdict = client
            .validate_targeting(ValidateTargetingRequest {
                segment_ids: vec![growth.id, empty.id, 424_242, growth.id, crypto.id],
                max_count_age: None,
            })
            .await?
            .into_inner();
        let warnings: Vec<Vec<i32>> = verdict
            .segments
            .iter()
            .map(|s| s.warnings.clone())
            .collect();
        ensure!(!verdict.sendable);
        ensure!(
            warnings[0].is_empty() && verdict.segments[0].sendable && verdict.segments[0].exists
        );
        ensure!(
            warnings[1] == vec![TargetingWarning::EmptySegment as i32],
            "{warnings:?}"
        );
        ensure!(
            warnings[2] == vec![TargetingWarning::UnknownSegment as i32]
                && !verdict.segments[2].exists
        );
        ensure!(
            warnings[3] == vec![TargetingWarning::DuplicateSegment as i32]
                && verdict.segments[3].sendable
        );
        ensure!(verdict.total_member_count == (growth.member_count + crypto.member_count) as i64);

        // A zero maximum age makes every count stale, which warns but does not block.
        let stale = client
            .validate_targeting(ValidateTargetingRequest {
                segment_ids: vec![growth.id],
                max_count_age: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
            })
            .await?
            .into_inner();
        ensure!(
            stale.sendable
                && stale.segments[0].warnings == vec![TargetingWarning::StaleCount as i32],
            "{stale:?}"
        );

        for (ids, field) in [
            (vec![], "segment_ids"),
            (vec![growth.id, -4], "segment_ids[1]"),
            ((1..=101).collect(), "segment_ids"),
        ] {
            let status = client
                .validate_targeting(ValidateTargetingRequest {
                    segment_ids: ids,
                    max_count_age: None,
                })
                .await
                .err()
                .context("bad targeting accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument
                    && bad_request_fields(&status) == vec![field],
                "{status:?}"
            );
        }
        let status = client
            .validate_targeting(ValidateTargetingRequest {
                segment_ids: vec![growth.id],
                max_count_age: Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
            })
            .await
            .err()
            .context("negative age accepted")?;
        ensure!(bad_request_fields(&status) == vec!["max_count_age"]);
        app.stop().await
    }
);

db_test!(
    business_calls_need_a_valid_key_but_health_and_reflection_do_not,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        for key in [None, Some("wrong-key"), Some("")] {
            let mut client = app.segments_with_key(key).await?;
            let status = client
                .list_segments(ListSegmentsRequest::default())
                .await
                .err()
                .context("accepted")?;
            ensure!(
                status.code() == Code::Unauthenticated,
                "{key:?}: {status:?}"
            );
        }

        let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await?);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status;
        ensure!(status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        let named = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "sharpsend.cio.v1.SegmentService".into(),
            })
            .await?
            .into_inner()
            .status;
        ensure!(named == tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(app.channel().await?);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await?
            .into_inner();
        let response = responses.message().await?.context("no reflection answer")?;
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            anyhow::bail!("unexpected reflection answer")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        ensure!(
            names.contains(&"sharpsend.cio.v1.SegmentService".to_string()),
            "{names:?}"
        );
        app.stop().await
    }
);

db_test!(
    shutdown_drains_a_call_in_flight,
    |db: TestDatabase| async move {
        let mut app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::from_millis(800))],
        );
        let before = app.sim.sim.request_count(SimApi::App);
        let call = tokio::spawn(async move {
            client
                .create_segment(CreateSegmentRequest {
                    name: "in flight".into(),
                    ..Default::default()
                })
                .await
        });
        // Shut down once the call is in flight (its Customer.io request has arrived).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.sim.sim.request_count(SimApi::App) == before {
            ensure!(
                std::time::Instant::now() < deadline,
                "the call never reached Customer.io"
            );
            tokio::task::yield_now().await;
        }
        app.begin_shutdown();
        let answer = call.await?;
        ensure!(answer.is_ok(), "in-flight call was cut off: {answer:?}");
        app.stop().await
    }
);

db_test!(
    a_workspace_with_1000_segments_syncs_and_a_failure_partway_keeps_what_was_committed,
    |db: TestDatabase| async move {
        // 1,000 segments take 1,001 App API requests: 100 s at Customer.io's 10 per second, so
        // the simulator and the client allow 400 per second here (the pacing is the same code).
        let app = TestApp::spawn_with(&db, SimConfig::empty(), |cio| {
            cio.app_requests_per_sec = 400;
        })
        .await?;
        app.sim.sim.set_rate_limit(SimApi::App, 400);
        for i in 0..1000 {
            app.sim
                .sim
                .create_manual_segment(&format!("Segment {i:04}"), "");
        }
        let mut client = app.segments().await?;

        // Customer.io starts refusing the key once about 300 segments have been counted.
        let before = app.sim.sim.request_count(SimApi::App);
        let run = client
            .sync_segments(SyncSegmentsRequest {})
            .await?
            .into_inner()
            .run
            .context("SyncSegments answered no run")?;
        ensure!(run.outcome == JobRunOutcome::Running as i32, "{run:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while app.sim.sim.request_count(SimApi::App) < before + 300 {
            ensure!(
                std::time::Instant::now() < deadline,
                "the sync never got going"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Status {
                status: 401,
                retry_after_secs: None,
            }],
        );
        let failed = wait_for_run(&mut app.ops().await?, run.id, RUN_WAIT).await?;
        ensure!(failed.outcome == JobRunOutcome::Failed as i32, "{failed:?}");
        ensure!(failed.error.contains("CIO_APP_API_KEY"), "{}", failed.error);
        let synced = detail(&failed, "synced").context("no progress recorded")?;
        ensure!(detail(&failed, "listed") == Some(1000.0), "{failed:?}");
        ensure!(
            (250.0..1000.0).contains(&synced),
            "the failed run says it synced {synced}"
        );
        // What was counted before the failure is committed, and nothing was marked removed.
        let kept = list_all(
            &mut client,
            ListSegmentsRequest {
                page_size: 500,
                include_removed: true,
                ..Default::default()
            },
        )
        .await?;
        ensure!(
            kept.len() as f64 == synced,
            "the mirror holds {} segments, the run says {synced}",
            kept.len()
        );
        ensure!(kept.iter().all(|s| !s.removed && s.member_count == Some(0)));

        // The next sync goes over all of them.
        let done = app.sync_segments().await?;
        ensure!(
            detail(&done, "listed") == Some(1000.0)
                && detail(&done, "synced") == Some(1000.0)
                && detail(&done, "created") == Some(1000.0 - synced)
                && detail(&done, "unchanged") == Some(synced)
                && detail(&done, "removed") == Some(0.0),
            "{done:?}"
        );
        let all = list_all(
            &mut client,
            ListSegmentsRequest {
                page_size: 500,
                ..Default::default()
            },
        )
        .await?;
        ensure!(all.len() == 1000, "{} segments mirrored", all.len());
        app.stop().await
    }
);

db_test!(
    create_segment_with_a_request_id_creates_one_segment_in_customer_io,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        let in_cio = |app: &TestApp| app.sim.sim.segments().len();
        let before = in_cio(&app);
        let request = |name: &str, request_id: &str| CreateSegmentRequest {
            name: name.into(),
            description: "idempotent".into(),
            request_id: request_id.into(),
            ..Default::default()
        };

        // A retry answers the first segment and creates nothing.
        let first = client
            .create_segment(request("Retried", "create-1"))
            .await?
            .into_inner()
            .segment
            .context("no segment")?;
        let retry = client
            .create_segment(request("Retried", "create-1"))
            .await?
            .into_inner()
            .segment
            .context("no segment")?;
        ensure!(retry.id == first.id, "{retry:?} vs {first:?}");
        ensure!(in_cio(&app) == before + 1, "a second Customer.io segment");

        // The same request id with another name: ALREADY_EXISTS naming the field.
        let reused = client
            .create_segment(request("Renamed", "create-1"))
            .await
            .err()
            .context("a reused request id was accepted")?;
        ensure!(reused.code() == Code::AlreadyExists, "{reused:?}");
        ensure!(
            reused.message().contains("name")
                && !reused.message().contains("description")
                && reused.message().contains(&format!("segment {}", first.id)),
            "{}",
            reused.message()
        );

        // Concurrent duplicates: one segment, every call answers it.
        let calls = (0..6).map(|_| {
            let mut client = client.clone();
            let request = request("Concurrent", "create-2");
            tokio::spawn(async move { client.create_segment(request).await })
        });
        let mut ids = Vec::new();
        for call in futures::future::join_all(calls).await {
            ids.push(call??.into_inner().segment.context("no segment")?.id);
        }
        ids.dedup();
        ensure!(ids.len() == 1, "several segments: {ids:?}");
        ensure!(in_cio(&app) == before + 2, "duplicates reached Customer.io");

        // A first call that fails (Customer.io down) creates nothing and leaves the key free.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            (0..10).map(|_| Fault::Status {
                status: 503,
                retry_after_secs: None,
            }),
        );
        let down = client
            .create_segment(request("After outage", "create-3"))
            .await;
        ensure!(
            down.as_ref().err().map(|s| s.code()) == Some(Code::Unavailable),
            "{down:?}"
        );
        app.sim.sim.clear_faults();
        let after = client
            .create_segment(request("After outage", "create-3"))
            .await?
            .into_inner()
            .segment
            .context("no segment")?;
        ensure!(in_cio(&app) == before + 3 && after.name == "After outage");

        // Bad request ids name the field and create nothing.
        for bad in ["x".repeat(201), "a\0b".into(), "trailing ".into()] {
            let status = client
                .create_segment(request("Bad id", &bad))
                .await
                .err()
                .context("a bad request id was accepted")?;
            ensure!(status.code() == Code::InvalidArgument, "{status:?}");
            ensure!(bad_request_fields(&status) == ["request_id"], "{status:?}");
        }
        ensure!(in_cio(&app) == before + 3);
        // Without a request id every call creates.
        for _ in 0..2 {
            client
                .create_segment(request("No key", ""))
                .await?
                .into_inner();
        }
        ensure!(in_cio(&app) == before + 5);
        app.stop().await
    }
);

db_test!(
    a_create_segment_that_died_after_customer_io_created_it_is_adopted_by_a_retry,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        // A first call claimed its request id and Customer.io created the segment; then the
        // server died before recording it.
        let request = serde_json::json!({"name": "Survivor", "description": "", "criteria": null});
        let claim = sharpsend_db::idempotency::claim(
            &app.ctx.db,
            app.ctx.workspace_id(),
            sharpsend_core::segments::CREATE_SEGMENT_OPERATION,
            "create-dead",
            &request,
            app.ctx.now(),
        )
        .await?;
        ensure!(claim == sharpsend_db::idempotency::Claim::New);
        let orphan = app.sim.sim.create_manual_segment("Survivor", "");
        let in_cio = app.sim.sim.segments().len();

        // Once the key is stale, the retry takes it over and adopts the orphan.
        app.advance(sharpsend_core::idempotency::STALE_AFTER + Duration::from_secs(1));
        let mut client = app.segments().await?;
        let request = CreateSegmentRequest {
            name: "Survivor".into(),
            request_id: "create-dead".into(),
            ..Default::default()
        };
        let adopted = client
            .create_segment(request.clone())
            .await?
            .into_inner()
            .segment
            .context("no segment")?;
        ensure!(
            adopted.id == orphan,
            "{adopted:?} is not the orphan {orphan}"
        );
        ensure!(adopted.managed.is_some(), "{adopted:?}");
        ensure!(app.sim.sim.segments().len() == in_cio, "a second segment");
        let again = client
            .create_segment(request)
            .await?
            .into_inner()
            .segment
            .context("no segment")?;
        ensure!(again.id == orphan && app.sim.sim.segments().len() == in_cio);
        app.stop().await
    }
);
