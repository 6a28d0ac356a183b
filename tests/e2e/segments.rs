//! SegmentService end to end: sync from the simulator, list/get/validate from the mirror.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, ensure};
use cio_sim::{Fault, SegmentKind, SimApi, SimConfig};
use secrecy::SecretString;
use sharpsend_core::jobs::{Job, JobOutcome};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    GetSegmentRequest, ListSegmentsRequest, Segment, SegmentType, SyncSegmentsRequest,
    TargetingWarning, ValidateTargetingRequest,
};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

type Client = sharpsend_proto::v1::segment_service_client::SegmentServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        sharpsend_tests::Bearer,
    >,
>;

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

        let report = client
            .sync_segments(SyncSegmentsRequest {})
            .await?
            .into_inner();
        ensure!(
            report.created as usize == expected.len(),
            "created {} of {}",
            report.created,
            expected.len()
        );
        ensure!(report.updated == 0 && report.removed == 0, "{report:?}");
        ensure!(report.duration.is_some());

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
        let again = client
            .sync_segments(SyncSegmentsRequest {})
            .await?
            .into_inner();
        ensure!(
            again.created == 0 && again.updated == 0 && again.unchanged as usize == expected.len(),
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
        let third = client
            .sync_segments(SyncSegmentsRequest {})
            .await?
            .into_inner();
        ensure!(third.updated == 1, "{third:?}");
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
        let mut client = app.segments().await?;
        let storm = (0..5).map(|_| Fault::Status {
            status: 429,
            retry_after_secs: Some(1),
        });
        app.sim.sim.push_faults(Some(SimApi::App), storm);

        let report = client
            .sync_segments(SyncSegmentsRequest {})
            .await?
            .into_inner();
        ensure!(
            report.created as usize == app.sim.sim.segments().len(),
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
        let status = client
            .sync_segments(SyncSegmentsRequest {})
            .await
            .err()
            .context("sync succeeded")?;
        ensure!(status.code() == Code::FailedPrecondition, "{status:?}");
        ensure!(
            status.message().contains("CIO_APP_API_KEY"),
            "{}",
            status.message()
        );
        ensure!(
            !format!("{status:?}").contains(wrong),
            "the key leaked: {status:?}"
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
        let mut client = app.segments().await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            (0..10).map(|_| Fault::Status {
                status: 503,
                retry_after_secs: None,
            }),
        );
        let status = client
            .sync_segments(SyncSegmentsRequest {})
            .await
            .err()
            .context("sync succeeded")?;
        ensure!(status.code() == Code::Unavailable, "{status:?}");
        app.stop().await
    }
);

db_test!(
    paging_filters_and_bad_arguments,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        client.sync_segments(SyncSegmentsRequest {}).await?;
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
        client.sync_segments(SyncSegmentsRequest {}).await?;
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
        let call = tokio::spawn(async move { client.sync_segments(SyncSegmentsRequest {}).await });
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
