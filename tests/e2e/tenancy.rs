//! Which workspace a call works in (issue #17, `sharpsend_server::tenancy`): a key bound to a
//! workspace works there only; an all-workspaces key names one with `x-sharpsend-workspace` or
//! works in the default one; unknown, malformed and foreign workspaces are refused with the
//! right code and nothing else happens.

use anyhow::{Context, ensure};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, segment_service_client::SegmentServiceClient};
use sharpsend_server::tenancy::WORKSPACE_HEADER;
use sharpsend_tests::{TEST_API_KEY, TestApp};
use tonic::{Code, Request, transport::Channel};

/// ListSegments as `key`, naming `workspace` when given.
async fn list_segments(
    channel: Channel,
    key: &str,
    workspace: Option<&str>,
) -> Result<pb::ListSegmentsResponse, tonic::Status> {
    let mut request = Request::new(pb::ListSegmentsRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii key"),
    );
    if let Some(workspace) = workspace {
        request.metadata_mut().insert(
            WORKSPACE_HEADER,
            workspace.parse().expect("ascii workspace"),
        );
    }
    SegmentServiceClient::new(channel)
        .list_segments(request)
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
    a_workspace_bound_key_cannot_name_another_workspace,
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
            ensure!(
                status.code() == Code::PermissionDenied,
                "{workspace}: {status:?}"
            );
        }
        let _ = created.key.context("the created key")?;
        app.stop().await
    }
);
