//! Which workspace a call works in (issue #17, `sharpsend_server::tenancy`): a key bound to a
//! workspace works there only; an all-workspaces key names one with `x-sharpsend-workspace` or
//! works in the default one; unknown and foreign workspaces are `NOT_FOUND` alike, malformed ids
//! `INVALID_ARGUMENT`; two publishers on one deployment read and write only their own; one
//! publisher's backlog does not hold back another's update.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use cio_sim::{Fault, RunningSim, SimApi, SimConfig, Simulator};
use serde_json::json;
use sharpsend_core::{
    jobs::{self, Job},
    outbox,
    tenants::{RECHECK_AFTER, Tenants},
};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient,
    analytics_service_client::AnalyticsServiceClient,
    campaign_service_client::CampaignServiceClient, ops_service_client::OpsServiceClient,
    profile_service_client::ProfileServiceClient, segment_service_client::SegmentServiceClient,
};
use sharpsend_server::{convert::json_to_struct, tenancy::WORKSPACE_HEADER};
use sharpsend_tests::{TEST_API_KEY, TestApp};
use tonic::{Code, Request, transport::Channel};

/// `text` as a metadata value (an invalid one becomes `invalid`, which no check accepts).
fn metadata(text: &str) -> tonic::metadata::AsciiMetadataValue {
    text.parse()
        .unwrap_or_else(|_| tonic::metadata::AsciiMetadataValue::from_static("invalid"))
}

/// `message` as `key`, naming `workspace` (any text, valid or not) when given.
fn request_as<T>(message: T, key: &str, workspace: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", metadata(&format!("Bearer {key}")));
    if let Some(workspace) = workspace {
        request
            .metadata_mut()
            .insert(WORKSPACE_HEADER, metadata(workspace));
    }
    request
}

/// ListSegments as `key`, naming `workspace` when given.
async fn list_segments(
    channel: Channel,
    key: &str,
    workspace: Option<&str>,
) -> Result<pb::ListSegmentsResponse, tonic::Status> {
    SegmentServiceClient::new(channel)
        .list_segments(request_as(
            pb::ListSegmentsRequest::default(),
            key,
            workspace,
        ))
        .await
        .map(tonic::Response::into_inner)
}

db_test!(
    an_all_workspaces_key_names_its_workspace_or_works_in_the_default,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sync_segments().await?;
        let default = app.ctx.workspace_id().to_string();
        let channel = app.channel().await?;

        let without = list_segments(channel.clone(), TEST_API_KEY, None).await?;
        ensure!(
            !without.segments.is_empty(),
            "the default workspace's segments"
        );
        let named = list_segments(channel.clone(), TEST_API_KEY, Some(&default)).await?;
        ensure!(
            named == without,
            "naming the default workspace changes nothing"
        );

        for bad in ["abc", "-1", "0", "1.5", "../1", "99999999999999999999"] {
            let status = list_segments(channel.clone(), TEST_API_KEY, Some(bad))
                .await
                .expect_err(bad);
            ensure!(
                status.code() == Code::InvalidArgument
                    && status.message().contains(WORKSPACE_HEADER),
                "{bad}: {status:?}"
            );
        }
        let status = list_segments(channel.clone(), TEST_API_KEY, Some("424242"))
            .await
            .expect_err("unknown workspace");
        ensure!(status.code() == Code::NotFound, "{status:?}");
        ensure!(status.message().contains("workspace 424242"), "{status:?}");

        // A workspace row without stored credentials (an earlier CIO_SITE_ID of this database)
        // is not served: nothing could reach its Customer.io.
        let old = sharpsend_db::workspaces::ensure(&app.ctx.db, "earlier-site", "us").await?;
        let status = list_segments(channel.clone(), TEST_API_KEY, Some(&old.id.to_string()))
            .await
            .expect_err("workspace without credentials");
        ensure!(status.code() == Code::NotFound, "{status:?}");
        app.stop().await
    }
);

db_test!(
    a_workspace_bound_key_naming_another_workspace_finds_nothing,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sync_segments().await?;
        let default = app.ctx.workspace_id();
        let created = app
            .admin()
            .await?
            .create_api_key(pb::CreateApiKeyRequest {
                name: "dashboard".into(),
                role: pb::Role::Reader as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        let key = created.secret;
        let channel = app.channel().await?;
        let own = list_segments(channel.clone(), &key, None).await?;
        ensure!(!own.segments.is_empty());
        let named = list_segments(channel.clone(), &key, Some(&default.to_string())).await?;
        ensure!(named == own, "naming its own workspace is allowed");
        let other = sharpsend_db::workspaces::ensure(&app.ctx.db, "another-site", "us").await?;
        for workspace in [other.id.to_string(), "424242".to_string()] {
            let status = list_segments(channel.clone(), &key, Some(&workspace))
                .await
                .expect_err("another workspace");
            // Not found, like a workspace that does not exist: nothing learnt about others.
            ensure!(status.code() == Code::NotFound, "{workspace}: {status:?}");
        }
        let _ = created.key.context("the created key")?;
        app.stop().await
    }
);

/// A second publisher: its own simulator (other site id and keys) stored as a workspace by the
/// test's all-workspaces key; answers (simulator, workspace id, a writer key bound to it).
async fn second_publisher(app: &TestApp) -> anyhow::Result<(RunningSim, i64, String)> {
    let sim = Simulator::spawn(SimConfig {
        site_id: "publisher-b".into(),
        track_api_key: "track-key-of-publisher-b".into(),
        app_api_key: "app-key-of-publisher-b".into(),
        ..SimConfig::demo()
    })
    .await?;
    let mut admin = app.admin().await?;
    let workspace = admin
        .create_workspace(pb::CreateWorkspaceRequest {
            site_id: "publisher-b".into(),
            region: "us".into(),
            track_api_key: "track-key-of-publisher-b".into(),
            app_api_key: "app-key-of-publisher-b".into(),
            track_base_url: sim.base_url(),
            app_base_url: sim.base_url(),
            name: "Publisher B".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workspace
        .context("no workspace")?;
    let key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "publisher-b writer".into(),
            role: pb::Role::Writer as i32,
            workspace_id: workspace.id,
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    Ok((sim, workspace.id, key))
}

/// `message` as `key`, naming workspace `workspace` when given.
fn with_key<T>(message: T, key: &str, workspace: Option<i64>) -> Request<T> {
    request_as(message, key, workspace.map(|w| w.to_string()).as_deref())
}

db_test!(
    two_publishers_on_one_deployment_read_and_write_only_their_own,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sync_segments().await?;
        let (sim_b, b, key_b) = second_publisher(&app).await?;
        let tenants = Tenants::new(app.ctx.clone());
        let ctx_b = tenants.context(b).await?;
        ensure!(ctx_b.workspace_id() == b && ctx_b.workspace_id() != app.ctx.workspace_id());
        // B's Customer.io has a segment A's does not (both simulators hand out the same ids to
        // the same demo data, so ids alone tell nothing).
        let only_b = sim_b.sim.create_manual_segment("Only at publisher B", "");
        ensure!(app.sim.sim.segments().iter().all(|s| s.id != only_b));
        // B's mirror comes from B's Customer.io.
        jobs::run_job(&ctx_b, Job::SegmentSync, "e2e").await?;

        let channel = app.channel().await?;
        let mut segments = SegmentServiceClient::new(channel.clone());
        let list = |key: &str, workspace: Option<i64>| {
            with_key(
                pb::ListSegmentsRequest {
                    page_size: 500,
                    ..Default::default()
                },
                key,
                workspace,
            )
        };
        let names = |segments: &[pb::Segment]| -> HashSet<String> {
            segments
                .iter()
                .map(|s| format!("{}:{}", s.id, s.name))
                .collect()
        };
        let a_list = segments
            .list_segments(list(TEST_API_KEY, None))
            .await?
            .into_inner()
            .segments;
        let b_list = segments
            .list_segments(list(&key_b, None))
            .await?
            .into_inner()
            .segments;
        let expect = |sim: &RunningSim| -> HashSet<String> {
            sim.sim
                .segments()
                .iter()
                .map(|s| format!("{}:{}", s.id, s.name))
                .collect()
        };
        ensure!(
            names(&a_list) == expect(&app.sim),
            "A lists A's Customer.io segments"
        );
        ensure!(
            names(&b_list) == expect(&sim_b),
            "B lists B's Customer.io segments"
        );
        // The all-workspaces key sees B's when it names B.
        let named = segments
            .list_segments(list(TEST_API_KEY, Some(b)))
            .await?
            .into_inner()
            .segments;
        ensure!(named == b_list);

        // B's own segment, read (and cached) as B, is not found as A, before and after.
        let get = |key: &str| with_key(pb::GetSegmentRequest { segment_id: only_b }, key, None);
        for _ in 0..2 {
            segments.get_segment(get(&key_b)).await?;
            let status = segments
                .get_segment(get(TEST_API_KEY))
                .await
                .expect_err("B's segment as A");
            ensure!(status.code() == Code::NotFound, "{status:?}");
        }

        // A write as B reaches B's Customer.io, and only B's.
        let mut profiles = ProfileServiceClient::new(channel.clone());
        profiles
            .update_attributes(with_key(
                update("reader-of-b", json!({"plan": "pro"})),
                &key_b,
                None,
            ))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            outbox::drain(&ctx_b, "e2e-b", &ctx_b.settings.delivery).await?;
            if sim_b.sim.person("reader-of-b").is_some() {
                break;
            }
            ensure!(Instant::now() < deadline, "B's write never reached B");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.deliver_all("e2e-a", Duration::from_secs(10)).await?;
        ensure!(
            app.sim.sim.person("reader-of-b").is_none(),
            "B's write reached A"
        );
        let profile = |key: &str, workspace: Option<i64>| {
            with_key(
                pb::GetProfileRequest {
                    customer: Some(pb::CustomerRef {
                        identifier: Some(pb::customer_ref::Identifier::Id("reader-of-b".into())),
                    }),
                    ..Default::default()
                },
                key,
                workspace,
            )
        };
        profiles.get_profile(profile(&key_b, None)).await?;
        profiles.get_profile(profile(TEST_API_KEY, Some(b))).await?;
        let status = profiles
            .get_profile(profile(TEST_API_KEY, None))
            .await
            .expect_err("B's reader in A");
        ensure!(status.code() == Code::NotFound, "{status:?}");

        // Disabled: B's key stops working within the recheck time; A goes on.
        app.admin()
            .await?
            .disable_workspace(pb::DisableWorkspaceRequest { id: b })
            .await?;
        let deadline = Instant::now() + RECHECK_AFTER + Duration::from_secs(5);
        loop {
            match segments
                .list_segments(with_key(pb::ListSegmentsRequest::default(), &key_b, None))
                .await
            {
                Err(status) if status.code() == Code::FailedPrecondition => break,
                other => ensure!(Instant::now() < deadline, "still served: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        segments
            .list_segments(with_key(
                pb::ListSegmentsRequest::default(),
                TEST_API_KEY,
                None,
            ))
            .await?;
        sim_b.shutdown().await;
        app.stop().await
    }
);

db_test!(
    one_publishers_backlog_does_not_hold_back_anothers_single_update,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (sim_b, b, key_b) = second_publisher(&app).await?;
        // A's Customer.io is slow: every Track request takes five seconds.
        app.sim.sim.push_faults(
            Some(SimApi::Track),
            (0..40).map(|_| Fault::Delay(Duration::from_secs(5))),
        );
        let scheduler =
            sharpsend_scheduler::start(Tenants::new(app.ctx.clone()), "e2e-fair".into()).await?;
        let channel = app.channel().await?;
        let mut profiles = ProfileServiceClient::new(channel.clone());
        let updates = (0..2000)
            .map(|i| update(format!("reader-{}", i % 500), json!({"n": i})))
            .collect::<Vec<_>>();
        for chunk in updates.chunks(500) {
            profiles
                .batch_update_attributes(with_key(
                    pb::BatchUpdateAttributesRequest {
                        updates: chunk.to_vec(),
                    },
                    TEST_API_KEY,
                    None,
                ))
                .await?;
        }
        let started = Instant::now();
        profiles
            .update_attributes(with_key(
                update("reader-of-b", json!({"plan": "pro"})),
                &key_b,
                None,
            ))
            .await?;
        // B's update arrives while A's backlog is still going out.
        while sim_b.sim.person("reader-of-b").is_none() {
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "B's single update waited behind A's backlog"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let waited = started.elapsed();
        let a_left = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(
            a_left.pending + a_left.in_flight > 0,
            "A's backlog was already delivered ({waited:?}): the test proves nothing"
        );
        eprintln!("B's update delivered after {waited:?} with A's backlog at {a_left:?}");
        scheduler.shutdown().await?;
        sim_b.shutdown().await;
        let _ = b;
        app.stop().await
    }
);

/// An UpdateAttributes of `customer_id` with the attributes of the JSON object `attributes`.
fn update(
    customer_id: impl Into<String>,
    attributes: serde_json::Value,
) -> pb::UpdateAttributesRequest {
    pb::UpdateAttributesRequest {
        customer_id: customer_id.into(),
        attributes: attributes.as_object().map(json_to_struct),
    }
}

/// `message` as publisher A (the test's all-workspaces key, default workspace).
fn as_a<T>(message: T) -> Request<T> {
    with_key(message, TEST_API_KEY, None)
}

/// `NOT_FOUND` (the same answer as for an id that exists nowhere), or the call's error.
fn not_found<T: std::fmt::Debug>(
    what: &str,
    answer: Result<T, tonic::Status>,
) -> anyhow::Result<()> {
    match answer {
        Err(status) if status.code() == Code::NotFound => Ok(()),
        other => anyhow::bail!("{what}: {other:?}"),
    }
}

db_test!(
    an_admin_of_one_publisher_finds_nothing_of_another_by_its_ids,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.sync_segments().await?;
        let (sim_b, b, _) = second_publisher(&app).await?;
        let key_b = app
            .admin()
            .await?
            .create_api_key(pb::CreateApiKeyRequest {
                name: "publisher-b admin".into(),
                role: pb::Role::Admin as i32,
                workspace_id: b,
                ..Default::default()
            })
            .await?
            .into_inner()
            .secret;
        let channel = app.channel().await?;
        macro_rules! as_b {
            ($message:expr) => {
                with_key($message, &key_b, None)
            };
        }

        // Things of publisher A.
        let mut segments = SegmentServiceClient::new(channel.clone());
        let managed = segments
            .create_segment(as_a(pb::CreateSegmentRequest {
                name: "Spring cohort of A".into(),
                criteria_json:
                    r#"{"attribute": {"field": "cohort", "operator": "eq", "value": "spring"}}"#
                        .into(),
                ..Default::default()
            }))
            .await?
            .into_inner()
            .segment
            .context("segment")?
            .id;
        let mut profiles = ProfileServiceClient::new(channel.clone());
        profiles
            .update_attributes(as_a(update("reader-of-a", json!({"cohort": "spring"}))))
            .await?;
        let mut campaigns = CampaignServiceClient::new(channel.clone());
        let send = campaigns
            .send_assignment(as_a(pb::SendAssignmentRequest {
                assignment_id: "assignment-of-a".into(),
                title: "A's Q4".into(),
                subject: "A's Q4".into(),
                segment_ids: vec![4],
                variations: vec![pb::ContentVariation {
                    segment_id: 4,
                    body: "<p>A</p>".into(),
                    ..Default::default()
                }],
                delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
                    pb::BroadcastDelivery { broadcast_id: 3 },
                )),
                ..Default::default()
            }))
            .await?
            .into_inner()
            .send
            .context("send")?;
        let mut ops = OpsServiceClient::new(channel.clone());
        let run = segments
            .sync_segments(as_a(pb::SyncSegmentsRequest::default()))
            .await?
            .into_inner()
            .run
            .context("run")?;
        let mut admin = AdminServiceClient::new(channel.clone());
        let a_key = admin
            .create_api_key(as_a(pb::CreateApiKeyRequest {
                name: "A's dashboard".into(),
                role: pb::Role::Reader as i32,
                ..Default::default()
            }))
            .await?
            .into_inner();
        let a_key_id = a_key.key.context("key")?.key_id;
        let default = app.ctx.workspace_id();

        // Publisher B's admin, by A's ids: nothing, and nothing changes.
        not_found(
            "GetSegment",
            segments
                .get_segment(as_b!(pb::GetSegmentRequest {
                    segment_id: managed,
                }))
                .await,
        )?;
        not_found(
            "UpdateSegment",
            segments
                .update_segment(as_b!(pb::UpdateSegmentRequest {
                    segment_id: managed,
                    name: Some("taken".into()),
                    ..Default::default()
                }))
                .await,
        )?;
        not_found(
            "AddSegmentMembers",
            segments
                .add_segment_members(as_b!(pb::AddSegmentMembersRequest {
                    segment_id: managed,
                    customer_ids: vec!["x".into()],
                }))
                .await,
        )?;
        not_found(
            "DeleteSegment",
            segments
                .delete_segment(as_b!(pb::DeleteSegmentRequest {
                    segment_id: managed,
                }))
                .await,
        )?;
        let reader_a = || pb::GetProfileRequest {
            customer: Some(pb::CustomerRef {
                identifier: Some(pb::customer_ref::Identifier::Id("reader-of-a".into())),
            }),
            ..Default::default()
        };
        not_found("GetProfile", profiles.get_profile(as_b!(reader_a())).await)?;
        not_found(
            "GetSend",
            campaigns
                .get_send(as_b!(pb::GetSendRequest {
                    send_id: send.id.clone(),
                    ..Default::default()
                }))
                .await,
        )?;
        not_found(
            "GetSend by assignment",
            campaigns
                .get_send(as_b!(pb::GetSendRequest {
                    assignment_id: "assignment-of-a".into(),
                    ..Default::default()
                }))
                .await,
        )?;
        let b_sends = campaigns
            .list_sends(as_b!(pb::ListSendsRequest::default()))
            .await?
            .into_inner();
        ensure!(b_sends.sends.is_empty(), "B lists A's sends: {b_sends:?}");
        not_found(
            "GetJobRun",
            ops.get_job_run(as_b!(pb::GetJobRunRequest { run_id: run.id }))
                .await,
        )?;
        let b_runs = ops
            .list_job_runs(as_b!(pb::ListJobRunsRequest::default()))
            .await?
            .into_inner();
        ensure!(
            b_runs.runs.iter().all(|r| r.id != run.id),
            "B lists A's runs"
        );
        not_found(
            "RevokeApiKey",
            admin
                .revoke_api_key(as_b!(pb::RevokeApiKeyRequest {
                    key_id: a_key_id.clone(),
                }))
                .await,
        )?;
        not_found(
            "GetWorkspace",
            admin
                .get_workspace(as_b!(pb::GetWorkspaceRequest { id: default }))
                .await,
        )?;
        let b_keys = admin
            .list_api_keys(as_b!(pb::ListApiKeysRequest::default()))
            .await?
            .into_inner();
        ensure!(
            b_keys.keys.iter().all(|k| k.key_id != a_key_id),
            "B lists A's keys"
        );
        not_found(
            "GetAssignmentAnalytics",
            AnalyticsServiceClient::new(channel.clone())
                .get_assignment_analytics(as_b!(pb::GetAssignmentAnalyticsRequest {
                    assignment_id: "assignment-of-a".into(),
                }))
                .await,
        )?;

        // A's things are as they were.
        segments
            .get_segment(as_a(pb::GetSegmentRequest {
                segment_id: managed,
            }))
            .await?;
        profiles.get_profile(as_a(reader_a())).await?;
        campaigns
            .get_send(as_a(pb::GetSendRequest {
                send_id: send.id.clone(),
                ..Default::default()
            }))
            .await?;
        let a_keys = admin
            .list_api_keys(as_a(pb::ListApiKeysRequest::default()))
            .await?
            .into_inner();
        ensure!(
            a_keys
                .keys
                .iter()
                .any(|k| k.key_id == a_key_id && k.revoked_at.is_none()),
            "A's key was touched"
        );
        ensure!(sim_b.sim.segments().iter().all(|s| s.name != "taken"));
        sim_b.shutdown().await;
        app.stop().await
    }
);

db_test!(
    a_disabled_workspace_gets_no_more_deliveries_from_the_scheduler,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (sim_b, b, key_b) = second_publisher(&app).await?;
        let ctx_b = Tenants::new(app.ctx.clone()).context(b).await?;
        let scheduler =
            sharpsend_scheduler::start(Tenants::new(app.ctx.clone()), "e2e-disable".into()).await?;
        let mut profiles = ProfileServiceClient::new(app.channel().await?);
        profiles
            .update_attributes(with_key(update("before", json!({"n": 1})), &key_b, None))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while sim_b.sim.person("before").is_none() {
            ensure!(Instant::now() < deadline, "B's worker never delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.admin()
            .await?
            .disable_workspace(pb::DisableWorkspaceRequest { id: b })
            .await?;
        // Once the supervisor has looked again (and the row's recheck time has passed), B's
        // worker is gone: a write that reached B's outbox anyway stays there.
        tokio::time::sleep(sharpsend_scheduler::WORKSPACE_SCAN + RECHECK_AFTER).await;
        sharpsend_core::profiles::update_attributes(
            &ctx_b,
            vec![sharpsend_core::profiles::AttributeUpdate {
                customer_id: "after".into(),
                attributes: json!({"n": 2}).as_object().cloned().unwrap_or_default(),
            }],
            None,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        ensure!(
            sim_b.sim.person("after").is_none(),
            "delivered to a disabled workspace"
        );
        let left = sharpsend_db::outbox::stats(&app.ctx.db, b).await?;
        ensure!(left.pending == 1, "{left:?}");
        scheduler.shutdown().await?;
        sim_b.shutdown().await;
        app.stop().await
    }
);
