//! Workspaces as data end to end (issue #17): CreateWorkspace against a second simulator with its
//! own credentials (checked with Customer.io first: a wrong key or an unreachable Customer.io
//! stores nothing), secrets sealed at rest (no plaintext in any column, in any answer's bytes, in
//! the audit record), UpdateWorkspace rotating credentials, DisableWorkspace, who may call what,
//! ALREADY_EXISTS, and master key rotation by the `secrets-rekey` job.

use std::sync::Arc;

use anyhow::{Context as _, ensure};
use cio_sim::{Fault, RunningSim, SimConfig, Simulator};
use prost::Message as _;
use sea_orm::{ConnectionTrait as _, Statement};
use secrecy::ExposeSecret as _;
use sharpsend_core::{
    AppContext, CoreError,
    jobs::{Job, JobOutcome},
    secrets::{MasterKeyring, MasterKeys},
    workspaces,
};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, admin_service_client::AdminServiceClient};
use sharpsend_tests::{Bearer, TEST_MASTER_KEY, TestApp};
use tonic::{Code, transport::Channel};

type Admin = AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

const SITE_B: &str = "site-b";
const TRACK_B: &str = "track-secret-B-5f1c9e";
const APP_B: &str = "app-secret-B-83d2aa";
const HOOK_B: &str = "hook-secret-B-0c6b1d";
const TRACK_C: &str = "track-secret-C-9a7e42";
const APP_C: &str = "app-secret-C-1b5f08";
const SECRETS: [&str; 5] = [TRACK_B, APP_B, HOOK_B, TRACK_C, APP_C];

/// A second Customer.io workspace (empty) with its own site id and keys.
async fn other_sim(track: &str, app: &str) -> anyhow::Result<RunningSim> {
    Ok(Simulator::spawn(SimConfig {
        site_id: SITE_B.into(),
        track_api_key: track.into(),
        app_api_key: app.into(),
        demo_people: 0,
        ..SimConfig::demo()
    })
    .await?)
}

fn create_request(sim: &RunningSim, track: &str, app: &str) -> pb::CreateWorkspaceRequest {
    pb::CreateWorkspaceRequest {
        site_id: SITE_B.into(),
        region: "us".into(),
        track_api_key: track.into(),
        app_api_key: app.into(),
        webhook_signing_key: HOOK_B.into(),
        track_requests_per_sec: 40,
        app_requests_per_sec: 5,
        track_base_url: sim.base_url(),
        app_base_url: sim.base_url(),
        name: "Publisher B".into(),
    }
}

/// Every text column of every workspace row.
async fn stored_text(ctx: &AppContext) -> anyhow::Result<Vec<String>> {
    let backend = ctx.db.get_database_backend();
    let mut out = Vec::new();
    let rows = ctx
        .db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT cio_site_id, region, name, track_api_key_sealed, app_api_key_sealed, \
             webhook_signing_key_sealed, secrets_key_id, track_base_url, app_base_url \
             FROM workspaces",
        ))
        .await?;
    for row in rows {
        for i in 0..9 {
            if let Some(text) = row.try_get_by_index::<Option<String>>(i)? {
                out.push(text);
            }
        }
    }
    Ok(out)
}

/// Every audit record's ids, as text.
async fn audit_text(ctx: &AppContext) -> anyhow::Result<Vec<String>> {
    let rows = ctx
        .db
        .query_all_raw(Statement::from_string(
            ctx.db.get_database_backend(),
            "SELECT CAST(ids AS TEXT) FROM audit_events",
        ))
        .await?;
    let mut out = Vec::new();
    for row in rows {
        if let Some(text) = row.try_get_by_index::<Option<String>>(0)? {
            out.push(text);
        }
    }
    Ok(out)
}

fn assert_no_secret(what: &str, haystack: &[u8]) -> anyhow::Result<()> {
    for secret in SECRETS {
        ensure!(
            !haystack
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "{what} contains a secret"
        );
    }
    Ok(())
}

async fn assert_nothing_stored_in_clear(ctx: &AppContext) -> anyhow::Result<()> {
    for text in stored_text(ctx).await? {
        assert_no_secret("a stored column", text.as_bytes())?;
    }
    let audit = audit_text(ctx).await?;
    ensure!(!audit.is_empty(), "workspace changes are audited");
    for text in audit {
        assert_no_secret("the audit record", text.as_bytes())?;
    }
    Ok(())
}

async fn workspace_count(ctx: &AppContext) -> anyhow::Result<usize> {
    Ok(sharpsend_db::workspaces::list(&ctx.db).await?.len())
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, tonic::Status>,
    code: Code,
) -> anyhow::Result<tonic::Status> {
    match result {
        Err(status) if status.code() == code => {
            assert_no_secret(what, status.message().as_bytes())?;
            assert_no_secret(what, status.details())?;
            Ok(status)
        }
        other => anyhow::bail!("{what}: expected {code:?}, got {other:?}"),
    }
}

/// A context like `ctx` with its master keys read from `file` (and re-read when it changes).
fn with_key_file(ctx: &AppContext, file: &std::path::Path) -> anyhow::Result<AppContext> {
    let mut settings = (*ctx.settings).clone();
    settings.master_keys = Some(MasterKeyring::from_file(file)?);
    let mut ctx = ctx.clone();
    ctx.settings = Arc::new(settings);
    Ok(ctx)
}

/// Replaces `file` whole with `text` (as an operator's `mv` would).
fn replace_file(file: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

/// A context like `ctx` with other master keys.
fn with_keys(ctx: &AppContext, keys: &str) -> anyhow::Result<AppContext> {
    let mut settings = (*ctx.settings).clone();
    settings.master_keys = Some(MasterKeys::parse(keys)?.into());
    let mut ctx = ctx.clone();
    ctx.settings = Arc::new(settings);
    Ok(ctx)
}

async fn create_b(admin: &mut Admin, sim: &RunningSim) -> anyhow::Result<pb::Workspace> {
    admin
        .create_workspace(create_request(sim, TRACK_B, APP_B))
        .await?
        .into_inner()
        .workspace
        .context("no workspace")
}

db_test!(
    create_checks_credentials_seals_them_and_never_answers_them,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim_b = other_sim(TRACK_B, APP_B).await?;
        let mut admin = app.admin().await?;
        ensure!(workspace_count(&app.ctx).await? == 1);

        // Refused credentials: FAILED_PRECONDITION naming the field, never echoing it; nothing
        // stored.
        let status = expect_code(
            "wrong track key",
            admin
                .create_workspace(create_request(&sim_b, "wrong-track", APP_B))
                .await,
            Code::FailedPrecondition,
        )?;
        ensure!(status.message().contains("track_api_key"), "{status:?}");
        ensure!(!status.message().contains("wrong-track"), "{status:?}");
        let status = expect_code(
            "wrong app key",
            admin
                .create_workspace(create_request(&sim_b, TRACK_B, "wrong-app"))
                .await,
            Code::FailedPrecondition,
        )?;
        ensure!(status.message().contains("app_api_key"), "{status:?}");
        ensure!(!status.message().contains("wrong-app"), "{status:?}");
        // Customer.io unreachable: UNAVAILABLE, nothing stored.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let mut unreachable = create_request(&sim_b, TRACK_B, APP_B);
        unreachable.track_base_url = format!("http://{closed}");
        unreachable.app_base_url = format!("http://{closed}");
        expect_code(
            "unreachable",
            admin.create_workspace(unreachable).await,
            Code::Unavailable,
        )?;
        ensure!(workspace_count(&app.ctx).await? == 1, "nothing stored");
        let by_route = sim_b.sim.request_counts_by_route();
        ensure!(
            by_route.keys().any(|r| r.contains("accounts/region"))
                && by_route.keys().any(|r| r.contains("newsletters")),
            "both keys were checked with Customer.io: {by_route:?}"
        );

        // Accepted.
        let response = admin
            .create_workspace(create_request(&sim_b, TRACK_B, APP_B))
            .await?
            .into_inner();
        assert_no_secret("CreateWorkspace answer", &response.encode_to_vec())?;
        let created = response.workspace.context("no workspace")?;
        ensure!(created.site_id == SITE_B && created.name == "Publisher B");
        ensure!(created.stored_credentials && created.has_track_api_key && created.has_app_api_key);
        ensure!(created.has_webhook_signing_key);
        ensure!(created.secrets_key_id == "e2e-1", "{created:?}");
        ensure!(created.track_requests_per_sec == 40 && created.app_requests_per_sec == 5);
        ensure!(created.track_base_url == sim_b.base_url());
        ensure!(created.disabled_at.is_none());
        assert_nothing_stored_in_clear(&app.ctx).await?;

        // A stored site id (this one, or the env default's): ALREADY_EXISTS.
        expect_code(
            "again",
            admin
                .create_workspace(create_request(&sim_b, TRACK_B, APP_B))
                .await,
            Code::AlreadyExists,
        )?;
        let mut default_site = create_request(&sim_b, TRACK_B, APP_B);
        default_site.site_id = app.ctx.workspace.cio_site_id.clone();
        expect_code(
            "default site",
            admin.create_workspace(default_site).await,
            Code::AlreadyExists,
        )?;
        ensure!(workspace_count(&app.ctx).await? == 2);

        // Get and List never carry a secret.
        let got = admin
            .get_workspace(pb::GetWorkspaceRequest { id: created.id })
            .await?
            .into_inner();
        assert_no_secret("GetWorkspace answer", &got.encode_to_vec())?;
        ensure!(got.workspace.as_ref() == Some(&created), "{got:?}");
        let env = admin
            .get_workspace(pb::GetWorkspaceRequest {
                id: app.ctx.workspace_id(),
            })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        ensure!(
            !env.stored_credentials && env.secrets_key_id.is_empty(),
            "{env:?}"
        );
        let first = admin
            .list_workspaces(pb::ListWorkspacesRequest {
                page_size: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_no_secret("ListWorkspaces answer", &first.encode_to_vec())?;
        ensure!(first.workspaces.len() == 1 && !first.next_page_token.is_empty());
        let second = admin
            .list_workspaces(pb::ListWorkspacesRequest {
                page_size: 1,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(second.workspaces.first().map(|w| w.id) == Some(created.id));
        expect_code(
            "token of other filters",
            admin
                .list_workspaces(pb::ListWorkspacesRequest {
                    page_size: 1,
                    page_token: first.next_page_token,
                    include_disabled: true,
                })
                .await,
            Code::InvalidArgument,
        )?;

        // What the merger builds a workspace's context from: the opened credentials work.
        let access = workspaces::access(&app.ctx, created.id)
            .await?
            .context("stored credentials")?;
        ensure!(access.cio.track_api_key.expose_secret() == TRACK_B);
        ensure!(access.cio.app_api_key.expose_secret() == APP_B);
        ensure!(
            access
                .webhook_signing_key
                .as_ref()
                .map(|k| k.expose_secret().to_owned())
                == Some(HOOK_B.to_owned())
        );
        ensure!(access.cio.track_requests_per_sec == 40 && access.cio.app_requests_per_sec == 5);
        ensure!(!access.disabled);
        let debug = format!("{access:?}");
        assert_no_secret("WorkspaceAccess Debug", debug.as_bytes())?;
        workspaces::check_credentials(&access.cio).await?;
        ensure!(
            workspaces::access(&app.ctx, app.ctx.workspace_id())
                .await?
                .is_none()
        );
        ensure!(workspaces::access(&app.ctx, 999_999).await?.is_none());
        // A sealed value copied to another row does not open there.
        let backend = app.ctx.db.get_database_backend();
        app.ctx
            .db
            .execute_raw(Statement::from_string(
                backend,
                format!(
                    "UPDATE workspaces SET track_api_key_sealed = \
                     (SELECT track_api_key_sealed FROM workspaces WHERE id = {id}), \
                     app_api_key_sealed = (SELECT app_api_key_sealed FROM workspaces WHERE id = {id}), \
                     secrets_key_id = 'e2e-1' WHERE id = {env}",
                    id = created.id,
                    env = app.ctx.workspace_id()
                ),
            ))
            .await?;
        match workspaces::access(&app.ctx, app.ctx.workspace_id()).await {
            Err(CoreError::FailedPrecondition(v)) => {
                ensure!(format!("{v:?}").contains("does not open"), "{v:?}");
            }
            other => anyhow::bail!(
                "a copied sealed value opened: {:?}",
                other.map(|a| a.is_some())
            ),
        }
        app.stop().await
    }
);

db_test!(
    update_rotates_credentials_and_disable_keeps_the_first_time,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim_b = other_sim(TRACK_B, APP_B).await?;
        // The same site behind another endpoint with new keys: a real rotation.
        let sim_c = other_sim(TRACK_C, APP_C).await?;
        let mut admin = app.admin().await?;
        let created = create_b(&mut admin, &sim_b).await?;
        let sealed_before = stored_text(&app.ctx).await?;

        // A new Track key the new endpoint accepts, with the stored App key it refuses: nothing
        // changes.
        let status = expect_code(
            "half rotation",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id: created.id,
                    track_api_key: TRACK_C.into(),
                    track_base_url: sim_c.base_url(),
                    app_base_url: sim_c.base_url(),
                    ..Default::default()
                })
                .await,
            Code::FailedPrecondition,
        )?;
        ensure!(status.message().contains("app_api_key"), "{status:?}");
        let status = expect_code(
            "wrong track key",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id: created.id,
                    track_api_key: "wrong-track".into(),
                    ..Default::default()
                })
                .await,
            Code::FailedPrecondition,
        )?;
        ensure!(status.message().contains("track_api_key"), "{status:?}");
        ensure!(
            stored_text(&app.ctx).await? == sealed_before,
            "nothing changed"
        );

        app.advance(std::time::Duration::from_secs(5));
        let rotated = admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id: created.id,
                name: "Publisher B (rotated)".into(),
                track_api_key: TRACK_C.into(),
                app_api_key: APP_C.into(),
                track_base_url: sim_c.base_url(),
                app_base_url: sim_c.base_url(),
                app_requests_per_sec: 8,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_no_secret("UpdateWorkspace answer", &rotated.encode_to_vec())?;
        let rotated = rotated.workspace.context("no workspace")?;
        ensure!(rotated.name == "Publisher B (rotated)");
        ensure!(rotated.app_requests_per_sec == 8 && rotated.track_requests_per_sec == 40);
        ensure!(rotated.has_webhook_signing_key, "the webhook key is kept");
        let seconds = |w: &pb::Workspace| w.updated_at.as_ref().map_or(0, |t| t.seconds);
        ensure!(seconds(&rotated) > seconds(&created), "{rotated:?}");
        assert_nothing_stored_in_clear(&app.ctx).await?;
        let access = workspaces::access(&app.ctx, created.id)
            .await?
            .context("stored")?;
        ensure!(access.cio.track_api_key.expose_secret() == TRACK_C);
        ensure!(access.cio.app_api_key.expose_secret() == APP_C);
        ensure!(
            access
                .webhook_signing_key
                .map(|k| k.expose_secret().to_owned())
                == Some(HOOK_B.to_owned())
        );
        workspaces::check_credentials(&access.cio).await?;

        // The env default: a name only.
        let env_id = app.ctx.workspace_id();
        let status = expect_code(
            "env default keys",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id: env_id,
                    track_api_key: TRACK_B.into(),
                    ..Default::default()
                })
                .await,
            Code::FailedPrecondition,
        )?;
        ensure!(status.message().contains("CIO_"), "{status:?}");
        let renamed = admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id: env_id,
                name: "Default".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        ensure!(renamed.name == "Default" && !renamed.stored_credentials);
        expect_code(
            "unknown",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id: 999_999,
                    name: "x".into(),
                    ..Default::default()
                })
                .await,
            Code::NotFound,
        )?;

        // Disable: disabled_at set once; listed only when asked.
        let disabled = admin
            .disable_workspace(pb::DisableWorkspaceRequest { id: created.id })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        let at = disabled.disabled_at.context("disabled_at")?;
        app.advance(std::time::Duration::from_secs(5));
        let again = admin
            .disable_workspace(pb::DisableWorkspaceRequest { id: created.id })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        ensure!(again.disabled_at == Some(at), "{again:?}");
        let active = admin
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await?
            .into_inner();
        ensure!(active.workspaces.iter().all(|w| w.id != created.id));
        let all = admin
            .list_workspaces(pb::ListWorkspacesRequest {
                include_disabled: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(all.workspaces.iter().any(|w| w.id == created.id));
        ensure!(
            workspaces::access(&app.ctx, created.id)
                .await?
                .is_some_and(|a| a.disabled)
        );
        expect_code(
            "disable unknown",
            admin
                .disable_workspace(pb::DisableWorkspaceRequest { id: 999_999 })
                .await,
            Code::NotFound,
        )?;
        expect_code(
            "disable the default",
            admin
                .disable_workspace(pb::DisableWorkspaceRequest {
                    id: app.ctx.workspace_id(),
                })
                .await,
            Code::FailedPrecondition,
        )?;
        ensure!(
            workspaces::get(&app.ctx, app.ctx.workspace_id())
                .await?
                .workspace
                .disabled_at
                .is_none()
        );

        // The audit record has the ids, never a key.
        let events = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                action: "AdminService/UpdateWorkspace".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(events.events.len() >= 4, "{events:?}");
        assert_no_secret("audit events", &events.encode_to_vec())?;
        assert_nothing_stored_in_clear(&app.ctx).await?;
        app.stop().await
    }
);

db_test!(
    update_clears_overrides_follows_etags_and_keeps_a_concurrent_rotation,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim_b = other_sim(TRACK_B, APP_B).await?;
        let sim_c = other_sim(TRACK_C, APP_C).await?;
        let mut admin = app.admin().await?;
        let created = create_b(&mut admin, &sim_b).await?;
        let id = created.id;
        ensure!(!created.etag.is_empty(), "{created:?}");
        let get = |mut admin: Admin| async move {
            admin
                .get_workspace(pb::GetWorkspaceRequest { id })
                .await?
                .into_inner()
                .workspace
                .context("no workspace")
        };

        // An etag names the version read: a change made from an older one is ABORTED and
        // changes nothing; a malformed one is refused by field.
        let renamed = admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id,
                name: "B one".into(),
                etag: created.etag.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        ensure!(renamed.etag != created.etag, "{renamed:?}");
        expect_code(
            "stale etag",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id,
                    name: "B lost".into(),
                    etag: created.etag.clone(),
                    ..Default::default()
                })
                .await,
            Code::Aborted,
        )?;
        let status = expect_code(
            "malformed etag",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id,
                    name: "B lost".into(),
                    etag: "../1".into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        )?;
        ensure!(status.message().contains("etag"), "{status:?}");
        ensure!(get(admin.clone()).await?.name == "B one");
        // GetWorkspace answers the etag the last change left.
        ensure!(get(admin.clone()).await?.etag == renamed.etag);

        // Clearing: unknown names and a field both set and cleared are refused by position.
        for (clear, set_url, field) in [
            (vec!["nope"], false, "clear_fields[0]"),
            (
                vec!["track_requests_per_sec", "app_base_url"],
                true,
                "clear_fields[1]",
            ),
        ] {
            let status = expect_code(
                field,
                admin
                    .update_workspace(pb::UpdateWorkspaceRequest {
                        id,
                        clear_fields: clear.into_iter().map(str::to_owned).collect(),
                        app_base_url: if set_url {
                            sim_b.base_url()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    })
                    .await,
                Code::InvalidArgument,
            )?;
            ensure!(status.message().contains(field), "{status:?}");
        }
        let cleared = admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id,
                clear_fields: vec![
                    "webhook_signing_key".into(),
                    "track_requests_per_sec".into(),
                ],
                ..Default::default()
            })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        ensure!(!cleared.has_webhook_signing_key, "{cleared:?}");
        ensure!(cleared.track_requests_per_sec == 0 && cleared.app_requests_per_sec == 5);
        let access = workspaces::access(&app.ctx, id).await?.context("stored")?;
        ensure!(access.webhook_signing_key.is_none());
        ensure!(access.cio.track_api_key.expose_secret() == TRACK_B);
        ensure!(
            access.cio.track_requests_per_sec
                == app
                    .ctx
                    .settings
                    .cio
                    .as_ref()
                    .map_or(100, |c| c.track_requests_per_sec)
        );
        assert_nothing_stored_in_clear(&app.ctx).await?;

        // The region is checked with Customer.io like the keys: this site is in the US.
        let status = expect_code(
            "wrong region",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id,
                    region: "eu".into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        )?;
        ensure!(status.message().contains("region"), "{status:?}");
        ensure!(get(admin.clone()).await?.region == "us");
        let status = expect_code(
            "no region",
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id,
                    region: "mars".into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        )?;
        ensure!(status.message().contains("region"), "{status:?}");
        // The same site served from the EU: region and endpoints move together.
        let sim_eu = Simulator::spawn(SimConfig {
            site_id: SITE_B.into(),
            track_api_key: TRACK_B.into(),
            app_api_key: APP_B.into(),
            demo_people: 0,
            region: "eu".into(),
            ..SimConfig::demo()
        })
        .await?;
        let moved = admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id,
                region: "eu".into(),
                track_base_url: sim_eu.base_url(),
                app_base_url: sim_eu.base_url(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .workspace
            .context("no workspace")?;
        ensure!(moved.region == "eu", "{moved:?}");

        // Two rotations at once, without etags: a new webhook key while the Track and App keys
        // move to another endpoint (its account check held back, so the webhook rotation lands
        // in between). Neither is lost.
        sim_c
            .sim
            .push_faults(None, [Fault::Delay(std::time::Duration::from_millis(400))]);
        let mut admin_keys = admin.clone();
        let keys = tokio::spawn(async move {
            admin_keys
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id,
                    region: "us".into(),
                    track_api_key: TRACK_C.into(),
                    app_api_key: APP_C.into(),
                    track_base_url: sim_c.base_url(),
                    app_base_url: sim_c.base_url(),
                    ..Default::default()
                })
                .await
                .map(|_| sim_c)
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id,
                webhook_signing_key: HOOK_B.into(),
                ..Default::default()
            })
            .await?;
        let _sim_c = keys.await??;
        let access = workspaces::access(&app.ctx, id).await?.context("stored")?;
        ensure!(access.cio.track_api_key.expose_secret() == TRACK_C);
        ensure!(access.cio.app_api_key.expose_secret() == APP_C);
        ensure!(
            access
                .webhook_signing_key
                .map(|k| k.expose_secret().to_owned())
                == Some(HOOK_B.to_owned()),
            "the webhook key rotated meanwhile was lost"
        );
        assert_nothing_stored_in_clear(&app.ctx).await?;
        app.stop().await
    }
);

db_test!(who_may_manage_workspaces, |db: TestDatabase| async move {
    let app = TestApp::spawn(&db).await?;
    let sim_b = other_sim(TRACK_B, APP_B).await?;
    let mut root = app.admin().await?;
    let b = create_b(&mut root, &sim_b).await?;
    let env_id = app.ctx.workspace_id();
    let key = |name: &str, role: pb::Role, workspace_id: i64, all: bool| pb::CreateApiKeyRequest {
        name: name.into(),
        role: role as i32,
        workspace_id,
        all_workspaces: all,
    };
    let mut secret_of = async |request| -> anyhow::Result<String> {
        Ok(root.create_api_key(request).await?.into_inner().secret)
    };
    let all_admin = secret_of(key("all", pb::Role::Admin, 0, true)).await?;
    let env_admin = secret_of(key("env", pb::Role::Admin, env_id, false)).await?;
    let b_admin = secret_of(key("b", pb::Role::Admin, b.id, false)).await?;
    let b_sender = secret_of(key("b-sender", pb::Role::Sender, b.id, false)).await?;

    // An all-workspaces admin created by a key: everything.
    let mut all = app.admin_with_key(Some(&all_admin)).await?;
    all.get_workspace(pb::GetWorkspaceRequest { id: b.id })
        .await?;
    all.list_workspaces(pb::ListWorkspacesRequest::default())
        .await?;

    for (label, secret, own, other) in [
        ("env admin", &env_admin, env_id, b.id),
        ("b admin", &b_admin, b.id, env_id),
    ] {
        let mut admin = app.admin_with_key(Some(secret)).await?;
        // Its own workspace: get and update.
        admin
            .get_workspace(pb::GetWorkspaceRequest { id: own })
            .await?;
        admin
            .update_workspace(pb::UpdateWorkspaceRequest {
                id: own,
                name: format!("renamed by {label}"),
                ..Default::default()
            })
            .await?;
        // Another workspace is not found, not forbidden.
        expect_code(
            label,
            admin
                .get_workspace(pb::GetWorkspaceRequest { id: other })
                .await,
            Code::NotFound,
        )?;
        expect_code(
            label,
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id: other,
                    name: "x".into(),
                    ..Default::default()
                })
                .await,
            Code::NotFound,
        )?;
        // Create, list and disable need an all-workspaces admin.
        expect_code(
            label,
            admin
                .create_workspace(create_request(&sim_b, TRACK_B, APP_B))
                .await,
            Code::PermissionDenied,
        )?;
        expect_code(
            label,
            admin
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await,
            Code::PermissionDenied,
        )?;
        expect_code(
            label,
            admin
                .disable_workspace(pb::DisableWorkspaceRequest { id: own })
                .await,
            Code::PermissionDenied,
        )?;
    }
    // Below admin: nothing.
    let mut sender = app.admin_with_key(Some(&b_sender)).await?;
    expect_code(
        "sender",
        sender
            .get_workspace(pb::GetWorkspaceRequest { id: b.id })
            .await,
        Code::PermissionDenied,
    )?;
    ensure!(
        sharpsend_db::workspaces::get(&app.ctx.db, b.id)
            .await?
            .is_some_and(|w| w.disabled_at.is_none() && w.name == "renamed by b admin")
    );
    all.disable_workspace(pb::DisableWorkspaceRequest { id: b.id })
        .await?;
    app.stop().await
});

db_test!(
    bad_input_names_the_field_and_never_echoes_a_key,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim_b = other_sim(TRACK_B, APP_B).await?;
        let mut admin = app.admin().await?;
        let good = create_request(&sim_b, TRACK_B, APP_B);
        let long = "x".repeat(1 << 20);
        let cases: Vec<(&str, pb::CreateWorkspaceRequest)> = vec![
            (
                "site_id",
                pb::CreateWorkspaceRequest {
                    site_id: String::new(),
                    ..good.clone()
                },
            ),
            (
                "site_id",
                pb::CreateWorkspaceRequest {
                    site_id: "a b".into(),
                    ..good.clone()
                },
            ),
            (
                "site_id",
                pb::CreateWorkspaceRequest {
                    site_id: long.clone(),
                    ..good.clone()
                },
            ),
            (
                "region",
                pb::CreateWorkspaceRequest {
                    region: "mars".into(),
                    ..good.clone()
                },
            ),
            (
                "track_api_key",
                pb::CreateWorkspaceRequest {
                    track_api_key: String::new(),
                    ..good.clone()
                },
            ),
            (
                "track_api_key",
                pb::CreateWorkspaceRequest {
                    track_api_key: format!("{TRACK_B} x"),
                    ..good.clone()
                },
            ),
            (
                "app_api_key",
                pb::CreateWorkspaceRequest {
                    app_api_key: format!("{APP_B}{long}"),
                    ..good.clone()
                },
            ),
            (
                "webhook_signing_key",
                pb::CreateWorkspaceRequest {
                    webhook_signing_key: format!("{HOOK_B}\0"),
                    ..good.clone()
                },
            ),
            (
                "track_requests_per_sec",
                pb::CreateWorkspaceRequest {
                    track_requests_per_sec: 1001,
                    ..good.clone()
                },
            ),
            (
                "app_requests_per_sec",
                pb::CreateWorkspaceRequest {
                    app_requests_per_sec: u32::MAX,
                    ..good.clone()
                },
            ),
            (
                "track_base_url",
                pb::CreateWorkspaceRequest {
                    track_base_url: "ftp://x".into(),
                    ..good.clone()
                },
            ),
            (
                "app_base_url",
                pb::CreateWorkspaceRequest {
                    app_base_url: "http://user:pw@x".into(),
                    ..good.clone()
                },
            ),
            (
                "app_base_url",
                pb::CreateWorkspaceRequest {
                    app_base_url: "not a url".into(),
                    ..good.clone()
                },
            ),
            (
                "name",
                pb::CreateWorkspaceRequest {
                    name: "n".repeat(101),
                    ..good.clone()
                },
            ),
            (
                "name",
                pb::CreateWorkspaceRequest {
                    name: "a\nb".into(),
                    ..good.clone()
                },
            ),
        ];
        for (field, request) in cases {
            let status = expect_code(
                field,
                admin.create_workspace(request).await,
                Code::InvalidArgument,
            )?;
            let fields = sharpsend_tests::bad_request_fields(&status);
            ensure!(fields.contains(&field.to_owned()), "{field}: {fields:?}");
        }
        let sent = |sim: &RunningSim| sim.sim.request_counts_by_route().values().sum::<u64>();
        ensure!(sent(&sim_b) == 0, "bad input never reaches Customer.io");
        for (field, request) in [
            (
                "id",
                pb::UpdateWorkspaceRequest {
                    id: 0,
                    ..Default::default()
                },
            ),
            (
                "track_requests_per_sec",
                pb::UpdateWorkspaceRequest {
                    id: 1,
                    track_requests_per_sec: 5000,
                    ..Default::default()
                },
            ),
            (
                "track_base_url",
                pb::UpdateWorkspaceRequest {
                    id: 1,
                    track_base_url: "x".into(),
                    ..Default::default()
                },
            ),
        ] {
            let status = expect_code(
                field,
                admin.update_workspace(request).await,
                Code::InvalidArgument,
            )?;
            ensure!(sharpsend_tests::bad_request_fields(&status).contains(&field.to_owned()));
        }
        for id in [0, -1] {
            expect_code(
                "get id",
                admin.get_workspace(pb::GetWorkspaceRequest { id }).await,
                Code::InvalidArgument,
            )?;
            expect_code(
                "disable id",
                admin
                    .disable_workspace(pb::DisableWorkspaceRequest { id })
                    .await,
                Code::InvalidArgument,
            )?;
        }
        expect_code(
            "get unknown",
            admin
                .get_workspace(pb::GetWorkspaceRequest { id: 999_999 })
                .await,
            Code::NotFound,
        )?;
        expect_code(
            "page_size",
            admin
                .list_workspaces(pb::ListWorkspacesRequest {
                    page_size: -1,
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
        )?;
        ensure!(workspace_count(&app.ctx).await? == 1);
        app.stop().await
    }
);

db_test!(
    secrets_rekey_moves_every_row_to_the_new_master_key,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim_b = other_sim(TRACK_B, APP_B).await?;
        let mut admin = app.admin().await?;
        let b = create_b(&mut admin, &sim_b).await?;
        ensure!(b.secrets_key_id == "e2e-1");
        let before = stored_text(&app.ctx).await?;

        // With only the current key nothing is to do.
        let outcome = sharpsend_core::jobs::run_job(&app.ctx, Job::SecretsRekey, "test").await?;
        match outcome {
            JobOutcome::Succeeded { details, .. } => {
                ensure!(details["resealed"] == 0, "{details}");
            }
            other => anyhow::bail!("{other:?}"),
        }

        // Rotate: a new key first, the old one second.
        let new_entry = MasterKeys::generate_entry("e2e-2");
        let rotated = with_keys(
            &app.ctx,
            &format!("{},{TEST_MASTER_KEY}", new_entry.expose_secret()),
        )?;
        // Sealed under the old key, opened under the rotated set.
        ensure!(workspaces::access(&rotated, b.id).await?.is_some());
        let outcome = sharpsend_core::jobs::run_job(&rotated, Job::SecretsRekey, "test").await?;
        match outcome {
            JobOutcome::Succeeded { details, .. } => {
                ensure!(details["resealed"] == 1, "{details}");
                ensure!(details["failed"] == 0, "{details}");
                ensure!(details["current_key_id"] == "e2e-2", "{details}");
            }
            other => anyhow::bail!("{other:?}"),
        }
        let record = sharpsend_db::workspaces::get_record(&app.ctx.db, b.id)
            .await?
            .context("stored")?;
        let sealed = record.credentials.context("sealed")?;
        ensure!(sealed.key_id == "e2e-2");
        for value in [&sealed.track_api_key, &sealed.app_api_key] {
            ensure!(value.starts_with("v1:e2e-2:"), "{value}");
        }
        ensure!(
            sealed
                .webhook_signing_key
                .as_deref()
                .is_some_and(|w| w.starts_with("v1:e2e-2:"))
        );
        ensure!(stored_text(&app.ctx).await? != before);
        assert_nothing_stored_in_clear(&app.ctx).await?;
        // A second run finds nothing.
        let outcome = sharpsend_core::jobs::run_job(&rotated, Job::SecretsRekey, "test").await?;
        ensure!(
            matches!(&outcome, JobOutcome::Succeeded { details, .. } if details["resealed"] == 0),
            "{outcome:?}"
        );

        // The old key removed: everything still opens.
        let only_new = with_keys(&app.ctx, new_entry.expose_secret())?;
        let access = workspaces::access(&only_new, b.id)
            .await?
            .context("stored")?;
        ensure!(access.cio.track_api_key.expose_secret() == TRACK_B);
        ensure!(access.cio.app_api_key.expose_secret() == APP_B);
        // And the old key alone no longer opens it: a clean error naming the key id.
        match workspaces::access(&app.ctx, b.id).await {
            Err(CoreError::FailedPrecondition(v)) => {
                let text = format!("{v:?}");
                ensure!(
                    text.contains("e2e-2") && text.contains("SHARPSEND_MASTER_KEY"),
                    "{text}"
                );
            }
            other => anyhow::bail!(
                "expected a clean refusal, got {:?}",
                other.map(|a| a.is_some())
            ),
        }
        app.stop().await
    }
);

db_test!(
    a_master_key_file_rotates_the_master_key_without_a_restart,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim_b = other_sim(TRACK_B, APP_B).await?;
        let mut admin = app.admin().await?;
        let b = create_b(&mut admin, &sim_b).await?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("master.keys");
        replace_file(&file, TEST_MASTER_KEY)?;
        // One context for the whole test: what a running process holds.
        let ctx = with_key_file(&app.ctx, &file)?;
        ensure!(workspaces::access(&ctx, b.id).await?.is_some());

        // A new key put first in the file: sealing uses it and the rekey job moves every row,
        // while the old key still opens what it sealed.
        let new_entry = MasterKeys::generate_entry("e2e-file-2");
        replace_file(
            &file,
            &format!("{},{TEST_MASTER_KEY}\n", new_entry.expose_secret()),
        )?;
        match sharpsend_core::jobs::run_job(&ctx, Job::SecretsRekey, "test").await? {
            JobOutcome::Succeeded { details, .. } => {
                ensure!(details["resealed"] == 1, "{details}");
                ensure!(details["current_key_id"] == "e2e-file-2", "{details}");
            }
            other => anyhow::bail!("{other:?}"),
        }
        // The old key dropped from the file: everything still opens, under the new key only.
        replace_file(&file, new_entry.expose_secret())?;
        let access = workspaces::access(&ctx, b.id).await?.context("stored")?;
        ensure!(access.cio.track_api_key.expose_secret() == TRACK_B);
        ensure!(access.cio.app_api_key.expose_secret() == APP_B);
        // A file that does not parse keeps the keys read before (and its error names no key).
        replace_file(&file, "e2e-file-3:not base64")?;
        ensure!(workspaces::access(&ctx, b.id).await?.is_some());
        match MasterKeyring::from_file(&file) {
            Err(e) => {
                ensure!(e.0.contains("SHARPSEND_MASTER_KEY_FILE"), "{e}");
                assert_no_secret("key file error", e.0.as_bytes())?;
                ensure!(!e.0.contains(new_entry.expose_secret()), "{e}");
            }
            Ok(_) => anyhow::bail!("a malformed key file was accepted"),
        }
        // The server's own context (SHARPSEND_MASTER_KEY, the old key only) no longer opens it.
        ensure!(workspaces::access(&app.ctx, b.id).await.is_err());
        app.stop().await
    }
);
