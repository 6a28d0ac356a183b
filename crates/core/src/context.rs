//! [`AppContext`]: what every operation needs, cheap to clone.

use cio_client::CioClient;
use sharpsend_db::{DatabaseConnection, workspaces::Workspace};

/// The database, the Customer.io client and the workspace they serve.
///
/// The service runs one workspace per process (bootstrapped from `CIO_SITE_ID`); every table row
/// carries its id so that several can share a database.
#[derive(Clone)]
pub struct AppContext {
    pub db: DatabaseConnection,
    pub cio: CioClient,
    pub workspace: std::sync::Arc<Workspace>,
    /// Woken when writes are accepted, so an in-process outbox worker delivers them at once
    /// (workers in other processes notice by polling).
    pub outbox_wakeup: std::sync::Arc<tokio::sync::Notify>,
    /// How outbox workers deliver (binaries read it from the environment).
    pub delivery: std::sync::Arc<crate::outbox::DeliveryConfig>,
    /// How sends are dispatched and reconciled (binaries read it from the environment).
    pub sends: std::sync::Arc<crate::sends::SendConfig>,
}

impl AppContext {
    pub fn new(db: DatabaseConnection, cio: CioClient, workspace: Workspace) -> Self {
        Self {
            db,
            cio,
            workspace: std::sync::Arc::new(workspace),
            outbox_wakeup: std::sync::Arc::new(tokio::sync::Notify::new()),
            delivery: std::sync::Arc::new(crate::outbox::DeliveryConfig::default()),
            sends: std::sync::Arc::new(crate::sends::SendConfig::default()),
        }
    }

    pub fn workspace_id(&self) -> i64 {
        self.workspace.id
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
}

impl AppContext {
    /// Connects to the database, checks or applies migrations, bootstraps the workspace for
    /// `cio.site_id` and builds the Customer.io client.
    pub async fn bootstrap(
        database_url: &str,
        cio: &crate::config::CioSettings,
        migrations: Migrations,
    ) -> Result<Self, BootstrapError> {
        let db = sharpsend_db::connect(database_url).await?;
        match migrations {
            Migrations::Apply => sharpsend_db::migrate(&db).await?,
            Migrations::RequireCurrent => sharpsend_db::ensure_migrated(&db).await?,
        }
        let region = match cio.region {
            cio_client::Region::Us => "us",
            cio_client::Region::Eu => "eu",
        };
        let workspace = sharpsend_db::workspaces::ensure(&db, &cio.site_id, region).await?;
        let client = CioClient::new(cio.client_config())?;
        Ok(Self::new(db, client, workspace))
    }
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
