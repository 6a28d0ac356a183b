//! `sharpsend-server --dev`: one command, no credentials. Starts the Customer.io simulator
//! in-process with its demo audience, a SQLite database (migrated on start), the scheduler's jobs
//! in-process, and the gRPC server; logs how to call it with grpcurl.

use anyhow::Context;
use cio_sim::{SimConfig, Simulator};
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::Migrations,
    error::error_chain,
    jobs::Job,
    settings::{CioSettings, DEV_API_KEY, Settings},
};
use tokio::net::TcpListener;

use crate::serve;

/// Runs dev mode until `shutdown` resolves, against the built-in simulator.
pub async fn run(
    mut settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sim = Simulator::spawn(SimConfig::demo())
        .await
        .context("starting the Customer.io simulator")?;
    let sim_config = sim.sim.config().clone();
    let base_url = url::Url::parse(&sim.base_url()).context("simulator URL")?;
    tracing::info!(url = %base_url, people = sim.sim.people_count(), "Customer.io simulator running (demo data)");
    settings.cio = Some(CioSettings::for_simulator(
        base_url,
        &sim_config.site_id,
        &sim_config.track_api_key,
        &sim_config.app_api_key,
    ));
    if settings.master_keys.is_none() {
        settings.master_keys =
            Some(sharpsend_core::secrets::MasterKeys::generate("dev-ephemeral").into());
        tracing::warn!(
            "SHARPSEND_MASTER_KEY is not set: using an ephemeral master key (`dev-ephemeral`) for this run; workspaces created now cannot be opened after a restart"
        );
    }
    let listen = settings.server.listen;
    let webhook_listen = settings.engagement.webhook_listen;
    let database_url = settings.database_url.clone();
    let key_hint = if settings.server.dev_api_key {
        DEV_API_KEY
    } else {
        "<one of SHARPSEND_API_KEYS>"
    };

    let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::system())
        .await
        .context("opening the dev database")?;
    let holder = ctx.holder("server-dev");
    if let Err(e) = sharpsend_core::jobs::run_job(&ctx, Job::SegmentSync, &holder).await {
        tracing::warn!(error = %error_chain(&e), "first segment sync failed; the scheduler retries");
    }
    // One registry for the scheduler, the webhooks and gRPC: a write in any workspace wakes that
    // workspace's outbox worker at once.
    let tenants = sharpsend_core::tenants::Tenants::new(ctx.clone());
    let scheduler = sharpsend_scheduler::start(tenants.clone(), holder).await?;
    // The loop of issue #13: the simulator sends signed reporting webhooks to our endpoint.
    let webhook_key = secrecy::SecretString::from(format!("dev-webhook-{}", ulid::Ulid::new()));
    let webhook_addr =
        webhook_listen.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let (webhook_addr, _webhooks) = crate::webhooks::spawn(
        tenants.clone(),
        webhook_addr,
        webhook_key.clone(),
        sharpsend_core::context::shutdown_signal(),
    )
    .await
    .with_context(|| format!("binding {webhook_addr} (webhooks)"))?;
    {
        use secrecy::ExposeSecret as _;
        let url = format!("http://{webhook_addr}{}", crate::webhooks::WEBHOOK_PATH);
        sim.sim
            .set_reporting_webhook(Some(cio_sim::ReportingWebhook::new(
                &url,
                webhook_key.expose_secret(),
            )))
            .context("configuring the simulator's reporting webhook")?;
        tracing::info!(%url, "simulator reporting webhooks → this server");
    }

    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        database = %database_url,
        "dev server ready. Try:\n  grpcurl -plaintext {addr} list\n  grpcurl -plaintext {addr} grpc.health.v1.Health/Check\n  grpcurl -plaintext -H 'authorization: Bearer {key_hint}' {addr} sharpsend.cio.v1.SegmentService/ListSegments\n  grpcurl -plaintext -H 'authorization: Bearer {key_hint}' -d '{{\"segment_ids\":[1,2,999]}}' {addr} sharpsend.cio.v1.SegmentService/ValidateTargeting\n  grpcurl -plaintext -H 'authorization: Bearer {key_hint}' -d '{{\"assignment_id\":\"a-1\",\"title\":\"Q4\",\"subject\":\"Q4 outlook\",\"segment_ids\":[4],\"variations\":[{{\"segment_id\":4,\"body\":\"<p>Q4</p>\"}}],\"broadcast\":{{\"broadcast_id\":3}}}}' {addr} sharpsend.cio.v1.CampaignService/SendAssignment"
    );
    let served = serve(listener, tenants, shutdown).await;
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "scheduler shutdown");
    }
    sim.shutdown().await;
    served.context("gRPC server")
}
