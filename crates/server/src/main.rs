//! `sharpsend-server`: parse arguments and config, start logging, then serve, run dev mode, or
//! migrate. Everything else is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sharpsend_core::{
    AppContext,
    config::{self, ProcessEnv},
    context::{Migrations, shutdown_signal},
    sends::SendConfig,
    telemetry::{self, TelemetryConfig},
};
use sharpsend_server::{ServeOptions, config::ServerConfig, dev, serve};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "sharpsend-server",
    version,
    about = "SharpSend ↔ Customer.io gRPC service"
)]
struct Args {
    /// Dev mode: SQLite + built-in Customer.io simulator + in-process scheduler, no credentials.
    #[arg(long)]
    dev: bool,
    /// Log one JSON object per line.
    #[arg(long, env = "SHARPSEND_LOG_JSON")]
    json_logs: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations to DATABASE_URL and exit.
    Migrate,
    /// Ask a running server's gRPC health service; exit 0 when SERVING (for container health checks).
    Health {
        /// Address of the server.
        #[arg(long, default_value = sharpsend_server::config::DEFAULT_LISTEN)]
        addr: std::net::SocketAddr,
    },
}

/// `service.name` of exported telemetry unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "sharpsend-server";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // One-shot commands log only; serving (and dev mode) export over OTLP when configured.
    let telemetry_config = match args.command {
        Some(Command::Health { .. } | Command::Migrate) => {
            Ok(TelemetryConfig::logs_only(SERVICE_NAME, args.json_logs))
        }
        None => TelemetryConfig::from_env(&ProcessEnv, SERVICE_NAME, args.json_logs),
    };
    let _telemetry = match telemetry_config
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok(telemetry::init(c)?))
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "sharpsend-server stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Migrate) = args.command {
        let url = config::database_url(&ProcessEnv);
        let db = sharpsend_db::connect(&url).await?;
        let pending = sharpsend_db::pending_migrations(&db).await?;
        sharpsend_db::migrate(&db).await?;
        println!(
            "applied {} migration(s){}",
            pending.len(),
            if pending.is_empty() {
                String::new()
            } else {
                format!(": {}", pending.join(", "))
            }
        );
        return Ok(());
    }

    if let Some(Command::Health { addr }) = args.command {
        return health_check(addr).await;
    }

    let config = ServerConfig::from_env(&ProcessEnv, args.dev)?;
    if args.dev {
        return dev::run(config, shutdown_signal()).await;
    }
    let cio = config.cio.as_ref().context("Customer.io settings")?;
    let mut ctx = AppContext::bootstrap(&config.database_url, cio, Migrations::RequireCurrent)
        .await
        .context("start-up failed")?;
    ctx.sends = std::sync::Arc::new(SendConfig::from_env(&ProcessEnv)?);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, workspace = %ctx.workspace.cio_site_id, "serving gRPC");
    let options = ServeOptions {
        api_keys: config.api_keys,
        request_timeout: config.request_timeout,
        concurrency_per_connection: config.concurrency_per_connection,
    };
    serve(listener, ctx, options, shutdown_signal()).await?;
    Ok(())
}

async fn health_check(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(3));
    let mut client = HealthClient::new(
        endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?,
    );
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == ServingStatus::Serving as i32,
        "server at {addr} is not serving (status {status})"
    );
    println!("SERVING");
    Ok(())
}
