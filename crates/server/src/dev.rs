//! `sharpsend-server --dev`: one command, no credentials. Starts the Customer.io simulator
//! in-process with its demo audience, a SQLite database (migrated on start), the scheduler's jobs
//! in-process, and the gRPC server; logs how to call it with grpcurl.

use anyhow::Context;
use cio_sim::{SimConfig, Simulator};
use sharpsend_core::{
    AppContext,
    config::{CioSettings, ProcessEnv},
    context::Migrations,
    jobs::{self, Job},
    outbox::DeliveryConfig,
    sends::SendConfig,
};
use tokio::net::TcpListener;

use crate::{ServeOptions, auth::DEV_API_KEY, config::ServerConfig, serve};

/// Dev mode's database unless `DATABASE_URL` is set.
pub const DEFAULT_DEV_DATABASE_URL: &str = "sqlite://sharpsend-dev.db?mode=rwc";

/// Runs dev mode until `shutdown` resolves.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sim = Simulator::spawn(SimConfig::demo())
        .await
        .context("starting the Customer.io simulator")?;
    let sim_config = sim.sim.config().clone();
    let base_url = url::Url::parse(&sim.base_url()).context("simulator URL")?;
    tracing::info!(url = %base_url, people = sim.sim.people_count(), "Customer.io simulator running (demo data)");
    let cio = CioSettings::for_simulator(
        base_url,
        &sim_config.site_id,
        &sim_config.track_api_key,
        &sim_config.app_api_key,
    );

    let mut ctx = AppContext::bootstrap(&config.database_url, &cio, Migrations::Apply)
        .await
        .context("opening the dev database")?;
    ctx.delivery = std::sync::Arc::new(DeliveryConfig::from_env(&ProcessEnv)?);
    ctx.sends = std::sync::Arc::new(SendConfig::from_env(&ProcessEnv)?);
    let holder = jobs::default_holder("server-dev");
    if let Err(e) = jobs::run_job(&ctx, Job::SegmentSync, &holder).await {
        tracing::warn!(error = %jobs::error_chain(&e), "first segment sync failed; the scheduler retries");
    }
    let schedules = sharpsend_scheduler::schedules_from_env(&ProcessEnv)?;
    let scheduler = sharpsend_scheduler::start(ctx.clone(), schedules, holder).await?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let key_hint = if config.api_keys.len() == 1 && is_dev_key(&config) {
        DEV_API_KEY
    } else {
        "<one of SHARPSEND_API_KEYS>"
    };
    tracing::info!(
        %addr,
        database = %config.database_url,
        "dev server ready. Try:\n  grpcurl -plaintext {addr} list\n  grpcurl -plaintext {addr} grpc.health.v1.Health/Check\n  grpcurl -plaintext -H 'authorization: Bearer {key_hint}' {addr} sharpsend.cio.v1.SegmentService/ListSegments\n  grpcurl -plaintext -H 'authorization: Bearer {key_hint}' -d '{{\"segment_ids\":[1,2,999]}}' {addr} sharpsend.cio.v1.SegmentService/ValidateTargeting\n  grpcurl -plaintext -H 'authorization: Bearer {key_hint}' -d '{{\"assignment_id\":\"a-1\",\"title\":\"Q4\",\"subject\":\"Q4 outlook\",\"segment_ids\":[4],\"variations\":[{{\"segment_id\":4,\"body\":\"<p>Q4</p>\"}}],\"broadcast\":{{\"broadcast_id\":3}}}}' {addr} sharpsend.cio.v1.CampaignService/SendAssignment"
    );
    let options = ServeOptions {
        api_keys: config.api_keys,
        request_timeout: config.request_timeout,
        concurrency_per_connection: config.concurrency_per_connection,
    };
    let served = serve(listener, ctx, options, shutdown).await;
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "scheduler shutdown");
    }
    sim.shutdown().await;
    served.context("gRPC server")
}

fn is_dev_key(config: &ServerConfig) -> bool {
    std::env::var("SHARPSEND_API_KEYS")
        .map(|v| v.trim().is_empty())
        .unwrap_or(true)
        && !config.api_keys.is_empty()
}
