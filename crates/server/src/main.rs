//! `sharpsend-server`: parse arguments and config, start logging, then serve, run dev mode, or
//! migrate. Everything else is in the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sharpsend_core::{
    AppContext,
    clock::Clock,
    context::{Migrations, shutdown_signal},
    settings::{self, Binary, Mode, ProcessEnv, Settings},
    telemetry,
};
use sharpsend_server::serve;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "sharpsend-server",
    version,
    about = "SharpSend ↔ Customer.io gRPC service",
    after_help = settings::help(Binary::Server)
)]
struct Args {
    /// Dev mode: SQLite + built-in Customer.io simulator + in-process scheduler, no credentials.
    #[arg(long)]
    dev: bool,
    /// Log one JSON object per line (or SHARPSEND_LOG_JSON=true).
    #[arg(long)]
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
        #[arg(long, default_value = settings::DEFAULT_LISTEN)]
        addr: std::net::SocketAddr,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// How `health` reaches a server serving TLS (`SHARPSEND_TLS_CERT`); plaintext without `--tls-ca`.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// Connect over TLS, trusting this PEM CA (the server's certificate must chain to it).
    #[arg(long = "tls-ca")]
    ca: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry.
    #[arg(long = "tls-server-name", default_value = "localhost", requires = "ca")]
    server_name: String,
    /// Client certificate (PEM) for a server requiring mTLS (`SHARPSEND_TLS_CLIENT_CA`).
    #[arg(long = "tls-cert", requires_all = ["ca", "key"])]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "tls-key", requires = "cert")]
    key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match (&args.command, args.dev) {
        (Some(_), _) => Mode::Maintenance,
        (None, true) => Mode::Dev,
        (None, false) => Mode::Production,
    };
    // Every setting is read and checked here, once; a bad one stops start-up naming it.
    let mut settings = match Settings::from_env(&ProcessEnv, Binary::Server, mode) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    settings.telemetry.json_logs |= args.json_logs;
    // One-shot commands log only; serving (and dev mode) export over OTLP when configured.
    let mut telemetry_config = settings.telemetry.clone();
    if mode == Mode::Maintenance {
        telemetry_config.otlp = None;
    }
    let _telemetry = match telemetry::init(telemetry_config) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(args, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "sharpsend-server stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, settings: Settings) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Migrate) => return migrate(&settings.database_url).await,
        Some(Command::Health { addr, tls }) => return health_check(addr, tls).await,
        None => {}
    }
    if args.dev {
        return dev(settings).await;
    }
    let listen = settings.server.listen;
    let ctx = AppContext::bootstrap(settings, Migrations::RequireCurrent, Clock::system())
        .await
        .context("start-up failed")?;
    sharpsend_core::context::check_customer_io(&ctx).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let tenants = sharpsend_core::tenants::Tenants::new(ctx.clone());
    // Reporting webhooks: a listener of their own when configured (the key is required then).
    if let (Some(addr), Some(key)) = (
        ctx.settings.engagement.webhook_listen,
        ctx.settings.engagement.webhook_signing_key.clone(),
    ) {
        let (bound, _task) =
            sharpsend_server::webhooks::spawn(tenants.clone(), addr, key, shutdown_signal())
                .await
                .with_context(|| format!("binding {addr} (SHARPSEND_WEBHOOK_LISTEN)"))?;
        tracing::info!(addr = %bound, path = sharpsend_server::webhooks::WEBHOOK_PATH, "serving Customer.io reporting webhooks");
    }
    tracing::info!(addr = %listener.local_addr()?, workspace = %ctx.workspace.cio_site_id, "serving gRPC");
    serve(listener, tenants, shutdown_signal()).await?;
    Ok(())
}

#[cfg(feature = "dev")]
async fn dev(settings: Settings) -> anyhow::Result<()> {
    sharpsend_server::dev::run(settings, shutdown_signal()).await
}

#[cfg(not(feature = "dev"))]
async fn dev(_settings: Settings) -> anyhow::Result<()> {
    anyhow::bail!("this build has no --dev mode (built without the `dev` feature)")
}

async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let applied = sharpsend_core::context::migrate(database_url).await?;
    println!(
        "applied {} migration(s){}",
        applied.len(),
        if applied.is_empty() {
            String::new()
        } else {
            format!(": {}", applied.join(", "))
        }
    );
    Ok(())
}

async fn health_check(addr: std::net::SocketAddr, tls: TlsArgs) -> anyhow::Result<()> {
    let tls = tls.ca.map(|ca| sharpsend_server::tls::ClientTls {
        ca,
        server_name: tls.server_name,
        identity: tls.cert.zip(tls.key),
    });
    sharpsend_server::app::check_health(addr, tls.as_ref()).await?;
    println!("SERVING");
    Ok(())
}
