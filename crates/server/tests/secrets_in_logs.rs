//! No API key in any log line, even at TRACE level for every crate (sqlx, h2, tonic, hyper
//! included): a configured key, a created key's secret, a wrong key, all used in real calls,
//! then revoked; and a stored workspace's credentials (issue #17: a refused key, accepted keys,
//! a rotation, a master key rotation with `secrets-rekey`) and the master keys themselves. The
//! log subscriber is per process, so this file is its own test binary with
//! ONE test.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, ensure};
use cio_sim::{SimConfig, Simulator};
use sharpsend_core::testing::{Backend, TestDatabase};
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::Migrations,
    settings::{ApiKeySetting, CioSettings, ServerSettings, Settings},
};
use sharpsend_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient,
    segment_service_client::SegmentServiceClient,
};
use sharpsend_server::serve;
use tokio::net::TcpListener;
use tonic::{Request, transport::Channel};

const CONFIGURED_KEY: &str = "configured-key-never-logged-4d1e";
const WRONG_KEY: &str = "wrong-key-never-logged-77a0";
const MASTER_KEY_B64: &str = "bWFzdGVyLWtleS1uZXZlci1sb2dnZWQtMzJieXRlcyE=";
const NEW_MASTER_KEY_B64: &str = "bmV3LW1hc3Rlci1rZXktbmV2ZXItbG9nZ2VkLTMyYiE=";
const TRACK_B: &str = "track-b-never-logged-61c2";
const APP_B: &str = "app-b-never-logged-9e04";
const HOOK_B: &str = "hook-b-never-logged-3a7d";
const WRONG_TRACK: &str = "wrong-track-never-logged-58f1";

/// Every log line written, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut lines) = self.0.lock() {
            lines.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn with_key<T>(message: T, key: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse()?);
    Ok(request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_api_key_appears_in_trace_logs() -> anyhow::Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let sim = Simulator::spawn(SimConfig::demo()).await?;
    let sim_config = sim.sim.config().clone();
    let db = TestDatabase::create(Backend::Sqlite)
        .await?
        .context("a SQLite test database")?;
    let settings = Settings {
        database_url: db.url.clone(),
        cio: Some(CioSettings::for_simulator(
            url::Url::parse(&sim.base_url())?,
            &sim_config.site_id,
            &sim_config.track_api_key,
            &sim_config.app_api_key,
        )),
        server: ServerSettings {
            api_keys: vec![ApiKeySetting {
                name: "ops".into(),
                key: CONFIGURED_KEY.to_string().into(),
            }],
            ..ServerSettings::default()
        },
        master_keys: Some(
            sharpsend_core::secrets::MasterKeys::parse(&format!("m1:{MASTER_KEY_B64}"))?.into(),
        ),
        ..Settings::default()
    };
    let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::system()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, ctx.clone(), async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;

    let mut admin = AdminServiceClient::new(channel.clone());
    let created = admin
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                name: "logged?".into(),
                role: pb::Role::Writer as i32,
                ..Default::default()
            },
            CONFIGURED_KEY,
        )?)
        .await?
        .into_inner();
    let key_id = created.key.context("no key")?.key_id;
    let mut segments = SegmentServiceClient::new(channel);
    segments
        .create_segment(with_key(
            pb::CreateSegmentRequest {
                name: "logged segment".into(),
                ..Default::default()
            },
            &created.secret,
        )?)
        .await?;
    let wrong = segments
        .list_segments(with_key(pb::ListSegmentsRequest::default(), WRONG_KEY)?)
        .await;
    ensure!(wrong.is_err());
    admin
        .revoke_api_key(with_key(
            pb::RevokeApiKeyRequest { key_id },
            CONFIGURED_KEY,
        )?)
        .await?;
    let revoked = segments
        .list_segments(with_key(
            pb::ListSegmentsRequest::default(),
            &created.secret,
        )?)
        .await;
    ensure!(revoked.is_err());

    // A stored workspace: a refused key, accepted keys, a rotation, a master key rotation.
    let sim_b = Simulator::spawn(SimConfig {
        site_id: "site-b".into(),
        track_api_key: TRACK_B.into(),
        app_api_key: APP_B.into(),
        demo_people: 0,
        ..SimConfig::demo()
    })
    .await?;
    let request = |track: &str| pb::CreateWorkspaceRequest {
        site_id: "site-b".into(),
        track_api_key: track.into(),
        app_api_key: APP_B.into(),
        track_base_url: sim_b.base_url(),
        app_base_url: sim_b.base_url(),
        ..Default::default()
    };
    let refused = admin
        .create_workspace(with_key(request(WRONG_TRACK), CONFIGURED_KEY)?)
        .await;
    ensure!(refused.is_err());
    let workspace = admin
        .create_workspace(with_key(request(TRACK_B), CONFIGURED_KEY)?)
        .await?
        .into_inner()
        .workspace
        .context("no workspace")?;
    admin
        .update_workspace(with_key(
            pb::UpdateWorkspaceRequest {
                id: workspace.id,
                webhook_signing_key: HOOK_B.into(),
                ..Default::default()
            },
            CONFIGURED_KEY,
        )?)
        .await?;
    let mut rotated_settings = (*ctx.settings).clone();
    rotated_settings.master_keys = Some(
        sharpsend_core::secrets::MasterKeys::parse(&format!(
            "m2:{NEW_MASTER_KEY_B64},m1:{MASTER_KEY_B64}"
        ))?
        .into(),
    );
    let mut rotated = ctx.clone();
    rotated.settings = std::sync::Arc::new(rotated_settings);
    sharpsend_core::jobs::run_job(&rotated, sharpsend_core::jobs::Job::SecretsRekey, "logs")
        .await?;
    let opened = sharpsend_core::workspaces::access(&rotated, workspace.id)
        .await?
        .context("stored")?;
    tracing::debug!(?opened, "opened workspace");
    sim_b.shutdown().await;
    let _ = stop.send(());
    server.await??;
    sim.shutdown().await;

    let text = String::from_utf8_lossy(&captured.0.lock().map_err(|_| anyhow::anyhow!("lock"))?)
        .into_owned();
    ensure!(text.len() > 10_000, "hardly anything was logged: {text}");
    ensure!(
        text.contains("workspace created") && text.contains("opened workspace"),
        "the workspace steps were logged"
    );
    // `ssk_<key id>_<secret>`: the secret is URL-safe base64 and may itself hold a `_`.
    let secret_part = created.secret.splitn(3, '_').nth(2).unwrap_or_default();
    ensure!(
        secret_part.len() >= 40,
        "the created key has a {}-character secret",
        secret_part.len()
    );
    for (what, secret) in [
        ("the configured key", CONFIGURED_KEY),
        ("a wrong key", WRONG_KEY),
        ("a created key", created.secret.as_str()),
        ("a created key's secret", secret_part),
        ("a workspace's Track key", TRACK_B),
        ("a workspace's App key", APP_B),
        ("a workspace's webhook signing key", HOOK_B),
        ("a refused Track key", WRONG_TRACK),
        ("the master key", MASTER_KEY_B64),
        ("the new master key", NEW_MASTER_KEY_B64),
    ] {
        ensure!(!text.contains(secret), "{what} appears in the trace log");
    }
    Ok(())
}
