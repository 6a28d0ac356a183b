//! `cio-sim` binary: parse flags/env, start tracing, serve the simulator until SIGINT/SIGTERM.

use std::net::SocketAddr;

use anyhow::Context as _;
use cio_sim::{RateLimitMode, SimConfig, Simulator, TriggerScope};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Stateful Customer.io simulator (Track API under /api, App API under /v1, control under /_sim).
#[derive(Debug, Parser)]
#[command(name = "cio-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "CIO_SIM_LISTEN", default_value = "127.0.0.1:4010")]
    listen: SocketAddr,
    /// Seed of the demo data and chaos decisions.
    #[arg(long, env = "CIO_SIM_SEED", default_value_t = 42)]
    seed: u64,
    /// Number of demo people.
    #[arg(long, env = "CIO_SIM_PEOPLE", default_value_t = cio_sim::config::DEFAULT_DEMO_PEOPLE)]
    people: usize,
    /// Start with an empty workspace (no people, no segments).
    #[arg(long, env = "CIO_SIM_EMPTY")]
    empty: bool,
    /// App API requests per second (0 = unlimited).
    #[arg(long, env = "CIO_SIM_APP_RATE_LIMIT", default_value_t = 10)]
    app_rate_limit: u32,
    /// Track API requests per second (0 = unlimited).
    #[arg(long, env = "CIO_SIM_TRACK_RATE_LIMIT", default_value_t = 1000)]
    track_rate_limit: u32,
    /// Region reported by /api/v1/accounts/region.
    #[arg(long, env = "CIO_SIM_REGION", value_enum, default_value_t = Region::Us)]
    region: Region,
    /// The regional endpoint to play when it differs from the workspace's region (to see a
    /// client configured for the wrong region fail); default: the workspace's.
    #[arg(long, env = "CIO_SIM_ENDPOINT_REGION", value_enum)]
    endpoint_region: Option<Region>,
    /// Track API site id accepted.
    #[arg(long, env = "CIO_SIM_SITE_ID", default_value = cio_sim::config::DEFAULT_SITE_ID)]
    site_id: String,
    /// Track API key accepted.
    #[arg(long, env = "CIO_SIM_TRACK_API_KEY", default_value = cio_sim::config::DEFAULT_TRACK_API_KEY)]
    track_api_key: String,
    /// App API key accepted.
    #[arg(long, env = "CIO_SIM_APP_API_KEY", default_value = cio_sim::config::DEFAULT_APP_API_KEY)]
    app_api_key: String,
    /// How many most recent requests the request log keeps (counters are kept regardless).
    #[arg(long, env = "CIO_SIM_REQUEST_LOG_CAPACITY", default_value_t = cio_sim::config::DEFAULT_REQUEST_LOG_CAPACITY)]
    request_log_capacity: usize,
    /// How the rate limits are enforced: a rolling one-second window or a token bucket.
    #[arg(long, env = "CIO_SIM_RATE_LIMIT_MODE", value_enum, default_value_t = RateLimitModeArg::Rolling)]
    rate_limit_mode: RateLimitModeArg,
    /// Milliseconds a trigger must wait after the previous one in its scope (Customer.io: 10 s).
    #[arg(long, env = "CIO_SIM_TRIGGER_INTERVAL_MS", default_value_t = 10_000)]
    trigger_interval_ms: u64,
    /// What the trigger interval covers: the whole workspace or each broadcast.
    #[arg(long, env = "CIO_SIM_TRIGGER_SCOPE", value_enum, default_value_t = TriggerScopeArg::Workspace)]
    trigger_scope: TriggerScopeArg,
    /// The workspace's subscription center is on: creating a newsletter requires
    /// subscription_topic_id.
    #[arg(long, env = "CIO_SIM_SUBSCRIPTION_CENTER")]
    subscription_center: bool,
    /// How strongly each person's opens and clicks follow their own seeded engagement (0..=1;
    /// 0: independent draws).
    #[arg(long, env = "CIO_SIM_ENGAGEMENT_CORRELATION", default_value_t = cio_sim::config::DEFAULT_ENGAGEMENT_CORRELATION)]
    engagement_correlation: f64,
    /// Milliseconds a customer export takes to complete on the simulator's clock.
    #[arg(long, env = "CIO_SIM_EXPORT_DELAY_MS", default_value_t = 2_000)]
    export_delay_ms: u64,
    /// Base URL of export download links (default: http://{the Host the App request came to}).
    #[arg(long, env = "CIO_SIM_FILES_BASE_URL")]
    files_base_url: Option<String>,
    /// Send reporting webhooks (every delivery event, signed) to this URL.
    #[arg(long, env = "CIO_SIM_WEBHOOK_URL", requires = "webhook_signing_key")]
    webhook_url: Option<String>,
    /// Signing key of the reporting webhooks (X-CIO-Signature).
    #[arg(long, env = "CIO_SIM_WEBHOOK_SIGNING_KEY", hide_env_values = true)]
    webhook_signing_key: Option<String>,
    /// Fraction (0..=1) of reporting webhooks delivered twice.
    #[arg(long, env = "CIO_SIM_WEBHOOK_DUPLICATE_RATE", default_value_t = 0.0)]
    webhook_duplicate_rate: f64,
    /// Milliseconds a reporting webhook may take before it is retried (Customer.io: 4000).
    #[arg(long, env = "CIO_SIM_WEBHOOK_TIMEOUT_MS", default_value_t = 4_000)]
    webhook_timeout_ms: u64,
    /// Log as JSON lines.
    #[arg(long, env = "CIO_SIM_LOG_JSON")]
    log_json: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RateLimitModeArg {
    Rolling,
    TokenBucket,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TriggerScopeArg {
    Workspace,
    PerBroadcast,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Region {
    Us,
    Eu,
}

impl Args {
    fn config(&self) -> SimConfig {
        let region = match self.region {
            Region::Us => "us",
            Region::Eu => "eu",
        };
        SimConfig {
            site_id: self.site_id.clone(),
            track_api_key: self.track_api_key.clone(),
            app_api_key: self.app_api_key.clone(),
            region: region.to_owned(),
            endpoint_region: self.endpoint_region.map(|r| match r {
                Region::Us => "us".to_owned(),
                Region::Eu => "eu".to_owned(),
            }),
            app_rate_limit_per_sec: self.app_rate_limit,
            track_rate_limit_per_sec: self.track_rate_limit,
            rate_limit_mode: match self.rate_limit_mode {
                RateLimitModeArg::Rolling => RateLimitMode::Rolling,
                RateLimitModeArg::TokenBucket => RateLimitMode::TokenBucket,
            },
            seed: self.seed,
            demo_people: if self.empty { 0 } else { self.people },
            request_log_capacity: self.request_log_capacity,
            trigger_interval: std::time::Duration::from_millis(self.trigger_interval_ms),
            trigger_scope: match self.trigger_scope {
                TriggerScopeArg::Workspace => TriggerScope::Workspace,
                TriggerScopeArg::PerBroadcast => TriggerScope::PerBroadcast,
            },
            subscription_center: self.subscription_center,
            engagement_correlation: self.engagement_correlation.clamp(0.0, 1.0),
            export_delay: std::time::Duration::from_millis(self.export_delay_ms),
            files_base_url: self.files_base_url.clone(),
            reporting_webhook: self.webhook_url.as_ref().map(|url| {
                let mut webhook = cio_sim::ReportingWebhook::new(
                    url,
                    self.webhook_signing_key.as_deref().unwrap_or_default(),
                );
                webhook.duplicate_rate = self.webhook_duplicate_rate;
                webhook.timeout = std::time::Duration::from_millis(self.webhook_timeout_ms);
                webhook
            }),
            ..SimConfig::demo()
        }
    }
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_json);
    let config = args.config();
    if let Some(webhook) = &config.reporting_webhook {
        webhook
            .validate()
            .context("--webhook-url / --webhook-signing-key / --webhook-duplicate-rate")?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {} (--listen / CIO_SIM_LISTEN)", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let sim = Simulator::new(config.clone());
    let base_url = format!("http://{addr}");
    // These are fake development credentials: fine to print.
    tracing::info!(
        %base_url,
        site_id = %config.site_id,
        track_api_key = %config.track_api_key,
        app_api_key = %config.app_api_key,
        region = %config.region,
        endpoint_region = sim.endpoint_region(),
        people = sim.people_count(),
        segments = sim.segments().len(),
        campaigns = sim.campaigns().len(),
        newsletters = sim.newsletters().len(),
        trigger_interval_ms = config.trigger_interval.as_millis() as u64,
        trigger_scope = config.trigger_scope.as_str(),
        subscription_center = config.subscription_center,
        app_rate_limit = config.app_rate_limit_per_sec,
        track_rate_limit = config.track_rate_limit_per_sec,
        reporting_webhook = config.reporting_webhook.as_ref().map_or("", |w| w.url.as_str()),
        "cio-sim listening: Track API {base_url}/api, App API {base_url}/v1, control {base_url}/_sim"
    );
    println!("cio-sim base URL: {base_url}");
    println!(
        "  Track API: Basic auth site_id={} api_key={}",
        config.site_id, config.track_api_key
    );
    println!("  App API:   Bearer {}", config.app_api_key);
    sim.serve(listener, shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("cio-sim stopped");
    Ok(())
}
