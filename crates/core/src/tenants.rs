//! [`Tenants`]: the [`AppContext`] of each workspace this process serves.
//!
//! The process's own context ([`Tenants::default_context`]) serves the workspace configured by
//! the `CIO_*` variables. Every other workspace is data (`AdminService/CreateWorkspace`, its
//! credentials sealed in the database, [`crate::workspaces`]); its context shares the database,
//! settings, clock and read cache, and has its own Customer.io client, so its own rate limiters:
//! one publisher's traffic never spends another's Customer.io budget. Every query a context runs
//! is scoped by its `workspace_id`, so choosing the context is choosing the tenant.
//!
//! A built context is reused while its row is unchanged; the row is looked at again after
//! [`RECHECK_AFTER`], so a credential rotation or a disable reaches every process within it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use cio_client::CioClient;

use secrecy::SecretString;

use crate::{AppContext, CoreError, FieldViolation, engagement::webhooks::WebhookReceiver};

/// How long a workspace's stored row is trusted before it is read again.
pub const RECHECK_AFTER: Duration = Duration::from_secs(5);

/// The contexts of the workspaces this process serves; cheap to clone (shared).
#[derive(Clone)]
pub struct Tenants {
    base: AppContext,
    built: Arc<Mutex<HashMap<i64, Built>>>,
}

struct Built {
    ctx: AppContext,
    updated_at: DateTime<Utc>,
    checked: Instant,
    webhook_key: Option<SecretString>,
    /// Made on the first webhook for the workspace (it starts insert tasks).
    webhooks: Option<WebhookReceiver>,
}

impl Tenants {
    pub fn new(base: AppContext) -> Self {
        Self {
            base,
            built: Arc::default(),
        }
    }

    /// The context of the workspace configured by `CIO_*` (the process's own).
    pub fn default_context(&self) -> &AppContext {
        &self.base
    }

    /// The context of workspace `workspace_id`: `NotFound` for no such workspace (or one without
    /// stored credentials that is not this process's own), `FailedPrecondition` for a disabled one.
    pub async fn context(&self, workspace_id: i64) -> Result<AppContext, CoreError> {
        if workspace_id == self.base.workspace_id() {
            return Ok(self.base.clone());
        }
        if let Some(ctx) = self.fresh(workspace_id) {
            return Ok(ctx);
        }
        let Some(access) = crate::workspaces::access(&self.base, workspace_id).await? else {
            self.forget(workspace_id);
            return Err(CoreError::NotFound {
                what: "workspace",
                id: workspace_id.to_string(),
            });
        };
        if access.disabled {
            self.forget(workspace_id);
            return Err(CoreError::FailedPrecondition(vec![FieldViolation::new(
                "workspace",
                format!("workspace {workspace_id} is disabled"),
            )]));
        }
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = built.get_mut(&workspace_id)
            && known.updated_at == access.updated_at
        {
            known.checked = Instant::now();
            return Ok(known.ctx.clone());
        }
        let client = CioClient::new(access.cio.client_config())?;
        let mut ctx = AppContext::new(
            self.base.db.clone(),
            client,
            access.workspace,
            self.base.settings.clone(),
            self.base.clock.clone(),
        );
        ctx.read_cache = self.base.read_cache.clone();
        built.insert(
            workspace_id,
            Built {
                ctx: ctx.clone(),
                updated_at: access.updated_at,
                checked: Instant::now(),
                webhook_key: access.webhook_signing_key,
                webhooks: None,
            },
        );
        Ok(ctx)
    }

    /// The receiver of workspace `workspace_id`'s reporting webhooks, checking signatures with
    /// its stored signing key; `Ok(None)` if it has none. Errors as [`Self::context`]. Not for
    /// this process's own workspace, whose key is `CIO_WEBHOOK_SIGNING_KEY`.
    pub async fn webhook_receiver(
        &self,
        workspace_id: i64,
    ) -> Result<Option<WebhookReceiver>, CoreError> {
        if workspace_id == self.base.workspace_id() {
            return Ok(None);
        }
        let ctx = self.context(workspace_id).await?;
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        let Some(known) = built.get_mut(&workspace_id) else {
            return Ok(None);
        };
        let Some(key) = known.webhook_key.clone() else {
            return Ok(None);
        };
        Ok(Some(
            known
                .webhooks
                .get_or_insert_with(|| WebhookReceiver::start(ctx, key))
                .clone(),
        ))
    }

    /// The contexts of every enabled workspace with credentials, this process's own first; a
    /// workspace whose credentials cannot be opened is logged and left out (the others go on).
    pub async fn all(&self) -> Result<Vec<AppContext>, CoreError> {
        let mut contexts = vec![self.base.clone()];
        for workspace in sharpsend_db::workspaces::list(&self.base.db).await? {
            if workspace.id == self.base.workspace_id() {
                continue;
            }
            match self.context(workspace.id).await {
                Ok(ctx) => contexts.push(ctx),
                // The env default of an earlier configuration, or disabled: nothing to run.
                Err(CoreError::NotFound { .. } | CoreError::FailedPrecondition(_)) => {}
                Err(e) => {
                    tracing::error!(workspace = workspace.id, error = %crate::error::error_chain(&e), "workspace skipped: its context could not be built");
                }
            }
        }
        Ok(contexts)
    }

    fn fresh(&self, workspace_id: i64) -> Option<AppContext> {
        let built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built
            .get(&workspace_id)
            .filter(|b| b.checked.elapsed() < RECHECK_AFTER)
            .map(|b| b.ctx.clone())
    }

    fn forget(&self, workspace_id: i64) {
        self.built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&workspace_id);
    }
}

impl From<AppContext> for Tenants {
    fn from(base: AppContext) -> Self {
        Self::new(base)
    }
}
