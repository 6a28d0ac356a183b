//! [`AppContext`]: what every operation needs, cheap to clone.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cio_client::CioClient;
use sharpsend_db::{DatabaseConnection, workspaces::Workspace};

use crate::{cache::ReadCache, clock::Clock, settings::Settings};

/// The database, the Customer.io client, the workspace they serve, the settings (read once at
/// start-up) and the clock.
///
/// A context serves one workspace: the process's own (bootstrapped from `CIO_SITE_ID`) or one
/// stored as data ([`crate::tenants`] builds those). Every query filters by its workspace id.
#[derive(Clone)]
pub struct AppContext {
    pub db: DatabaseConnection,
    pub cio: CioClient,
    pub workspace: Arc<Workspace>,
    /// Woken when writes are accepted, so an in-process outbox worker delivers them at once
    /// (workers in other processes notice by polling).
    pub outbox_wakeup: Arc<tokio::sync::Notify>,
    pub settings: Arc<Settings>,
    pub clock: Clock,
    /// Hot reads served from memory while the server runs ([`crate::cache`]).
    pub read_cache: ReadCache,
}

impl AppContext {
    pub fn new(
        db: DatabaseConnection,
        cio: CioClient,
        workspace: Workspace,
        settings: Arc<Settings>,
        clock: Clock,
    ) -> Self {
        Self {
            db,
            cio,
            workspace: Arc::new(workspace),
            outbox_wakeup: Arc::new(tokio::sync::Notify::new()),
            settings,
            clock,
            read_cache: ReadCache::default(),
        }
    }

    pub fn workspace_id(&self) -> i64 {
        self.workspace.id
    }

    /// Tells the in-process outbox worker that writes were accepted. The wake-up is kept until
    /// the worker next waits, so one that is busy or still starting does not miss it.
    pub fn wake_outbox(&self) {
        self.outbox_wakeup.notify_one();
    }

    /// Now, from the context's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// A name for a job runner or worker of this process: `component@host:pid:ulid`.
    pub fn holder(&self, component: &str) -> String {
        crate::jobs::holder_name(component, &self.settings.host)
    }
}

/// Whether start-up may migrate the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrations {
    /// Refuse to start while migrations are pending (server and scheduler in production: one
    /// place migrates, `sharpsend-server migrate`).
    RequireCurrent,
    /// Apply pending migrations first (dev mode and tests, a single process).
    Apply,
}

/// Why start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Database(#[from] sharpsend_db::DbError),
    #[error("could not build the Customer.io client")]
    Client(#[from] cio_client::CioError),
    #[error(transparent)]
    Settings(#[from] crate::settings::ConfigError),
}

impl AppContext {
    /// Connects to `settings.database_url`, checks or applies migrations, bootstraps the
    /// workspace of `settings.cio` (required) and builds the Customer.io client.
    pub async fn bootstrap(
        settings: Settings,
        migrations: Migrations,
        clock: Clock,
    ) -> Result<Self, BootstrapError> {
        let cio = settings.cio()?;
        let db = sharpsend_db::connect(&settings.database_url).await?;
        match migrations {
            Migrations::Apply => sharpsend_db::migrate(&db).await?,
            Migrations::RequireCurrent => sharpsend_db::ensure_migrated(&db).await?,
        }
        let region = match cio.region {
            cio_client::Region::Us => "us",
            cio_client::Region::Eu => "eu",
        };
        crate::sends::check_start_up(&db, &settings, &clock).await?;
        let workspace = sharpsend_db::workspaces::ensure(&db, &cio.site_id, region).await?;
        let client = CioClient::new(cio.client_config())?;
        Ok(Self::new(db, client, workspace, Arc::new(settings), clock))
    }
}

/// Checks the Customer.io credentials and region once at start-up (`GET
/// /api/v1/accounts/region`): a wrong site id or Track key, or a workspace in another region,
/// stops start-up with an error naming the variables (never their values). Customer.io being
/// unreachable only warns: the service starts and retries on its own.
pub async fn check_customer_io(ctx: &AppContext) -> Result<(), crate::settings::ConfigError> {
    use cio_client::AccountCheckError;

    use crate::settings::ConfigError;
    match ctx.cio.check_account().await {
        Ok(account) => {
            tracing::info!(region = ?account.region, "Customer.io credentials and region checked");
            Ok(())
        }
        Err(AccountCheckError::TrackCredentials { status }) => Err(ConfigError::new(
            "CIO_SITE_ID / CIO_TRACK_API_KEY",
            format!("Customer.io refused these credentials (HTTP {status})"),
        )),
        Err(AccountCheckError::WrongRegion {
            configured,
            workspace,
            ..
        }) => Err(ConfigError::new(
            "CIO_REGION",
            format!("the workspace is in the {workspace} region, not {configured}"),
        )),
        Err(AccountCheckError::Unavailable(e)) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "could not check the Customer.io credentials at start-up; going on");
            Ok(())
        }
    }
}

/// Applies pending migrations to `database_url` (`sharpsend-server migrate`); answers their
/// names.
pub async fn migrate(database_url: &str) -> Result<Vec<String>, sharpsend_db::DbError> {
    let db = sharpsend_db::connect(database_url).await?;
    let pending = sharpsend_db::pending_migrations(&db).await?;
    sharpsend_db::migrate(&db).await?;
    Ok(pending)
}

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the process");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
