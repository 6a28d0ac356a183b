//! PLACEHOLDER on the tenancy branch; replaced by the workspaces branch at merge.

use crate::{AppContext, CoreError};

/// A stored workspace with its credentials opened: what a per-workspace AppContext is built from.
pub struct WorkspaceAccess {
    pub workspace: sharpsend_db::workspaces::Workspace,
    pub cio: crate::settings::CioSettings,
    pub webhook_signing_key: Option<secrecy::SecretString>,
    pub disabled: bool,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// `Ok(None)`: no such workspace, or one without stored credentials (the env default).
pub async fn access(
    _ctx: &AppContext,
    _workspace_id: i64,
) -> Result<Option<WorkspaceAccess>, CoreError> {
    Ok(None)
}
