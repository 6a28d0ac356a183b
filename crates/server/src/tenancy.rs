//! Which workspace a call works in, and so which [`AppContext`] serves it.
//!
//! - A key bound to a workspace works in that workspace only.
//! - An all-workspaces key (a configured `SHARPSEND_API_KEYS` key, or a created admin key with
//!   no workspace) works in the workspace named by the `x-sharpsend-workspace` metadata (a
//!   workspace id, as `AdminService/CreateWorkspace` answers it), or in the default one (the
//!   `CIO_*` workspace) without it.
//! - A bound key naming another workspace gets `NOT_FOUND`, as for an unknown workspace: it
//!   learns nothing of what exists elsewhere. A disabled workspace is `FAILED_PRECONDITION`, a
//!   malformed header `INVALID_ARGUMENT`.

use sharpsend_core::{AppContext, CoreError, tenants::Tenants};
use tonic::{Request, Status};

use crate::{auth, status::OrStatus};

/// The metadata an all-workspaces key names its workspace with.
pub const WORKSPACE_HEADER: &str = "x-sharpsend-workspace";

/// The workspace `request` works in (see the module doc).
pub fn workspace_of<T>(tenants: &Tenants, request: &Request<T>) -> Result<i64, Status> {
    let caller = auth::caller(request)?;
    let asked = match request.metadata().get(WORKSPACE_HEADER) {
        None => None,
        Some(value) => Some(parse_workspace(value.as_bytes()).ok_or_else(|| {
            crate::status::to_status(CoreError::invalid(
                WORKSPACE_HEADER,
                "must be a workspace id (a positive integer)",
            ))
        })?),
    };
    match (caller.all_workspaces(), caller.workspace_id, asked) {
        (true, _, Some(asked)) => Ok(asked),
        (true, _, None) => Ok(tenants.default_context().workspace_id()),
        (false, Some(bound), None) => Ok(bound),
        (false, Some(bound), Some(asked)) if asked == bound => Ok(bound),
        (false, Some(_), Some(asked)) => Err(crate::status::to_status(CoreError::NotFound {
            what: "workspace",
            id: asked.to_string(),
        })),
        // Not bound and not all-workspaces: cannot happen (a key without a workspace is an
        // all-workspaces key).
        (false, None, _) => Err(auth::permission_denied()),
    }
}

/// The workspace id in an `x-sharpsend-workspace` value, if it is one.
fn parse_workspace(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id > 0)
}

/// The workspace an audit event of `caller`'s call names: the one the call works in when it can
/// be known from the headers alone, else the key's.
pub fn audited_workspace(caller: &auth::Caller, headers: &http::HeaderMap) -> Option<i64> {
    match headers.get(WORKSPACE_HEADER) {
        Some(value) if caller.all_workspaces() => {
            parse_workspace(value.as_bytes()).or(caller.workspace_id)
        }
        _ => caller.workspace_id,
    }
}

/// The context serving `request`'s workspace.
pub async fn context<T>(tenants: &Tenants, request: &Request<T>) -> Result<AppContext, Status> {
    let workspace = workspace_of(tenants, request)?;
    tenants.context(workspace).await.or_status()
}
