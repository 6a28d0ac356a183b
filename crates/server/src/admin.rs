//! `sharpsend.cio.v1.AdminService`: workspaces (create, update, get, list, disable — see
//! [`sharpsend_core::workspaces`]; answers never carry a secret), API keys (create — the secret
//! shown once —, list, revoke) and the audit record. Every RPC needs an admin key ([`crate::access`]). An admin bound to a
//! workspace sees and manages that workspace only: a key of another workspace is `NOT_FOUND`.
//! Keys from `SHARPSEND_API_KEYS` (the deployment's own) and all-workspace admins see everything
//! and are the only ones who may create all-workspace keys, and create, list or disable
//! workspaces; a workspace-bound admin may get and update its own workspace only.

use sharpsend_core::{
    AppContext, CoreError, FieldViolation,
    input::{self, limits::ID_BYTES},
};
use sharpsend_db::{
    api_keys::{self, ApiKey, NewApiKey, Role},
    audit::{self, AuditEvent, AuditQuery},
    workspaces::{self, WorkspaceRecord},
};
use sharpsend_proto::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use crate::{
    auth::{self, Caller, KeyStore},
    convert::{self, json_to_struct, timestamp},
    status::OrStatus,
};

/// Characters in a key's name.
pub const KEY_NAME_CHARS: usize = 100;
/// Audit events per page unless asked otherwise, and the most per page.
pub const DEFAULT_AUDIT_PAGE: u64 = 50;
pub const MAX_AUDIT_PAGE: u64 = 500;
/// Workspaces per page unless asked otherwise, and the most per page.
pub const DEFAULT_WORKSPACE_PAGE: u64 = 50;
pub const MAX_WORKSPACE_PAGE: u64 = 500;

pub struct Admin {
    ctx: AppContext,
    keys: KeyStore,
}

impl Admin {
    /// `keys`: the store the access layer reads, so a revocation here is forgotten at once.
    pub fn new(ctx: AppContext, keys: KeyStore) -> Self {
        Self { ctx, keys }
    }
}

/// The workspace whose keys and events `caller` sees; `None`: all of them.
fn scope(caller: &Caller) -> Option<i64> {
    if caller.all_workspaces() {
        return None;
    }
    caller.workspace_id
}

/// Only an all-workspaces admin may ([`crate::access::ALL_WORKSPACES_ONLY`]): `PERMISSION_DENIED`
/// for one bound to a workspace.
fn require_all_workspaces(caller: &Caller) -> Result<(), Status> {
    match scope(caller) {
        None => Ok(()),
        Some(_) => Err(crate::status::permission_denied()),
    }
}

/// The workspace `id` as `caller` may see it: another workspace than a bound caller's own is
/// `NOT_FOUND`, like one that does not exist.
fn visible_workspace(caller: &Caller, id: i64) -> Result<(), CoreError> {
    match scope(caller) {
        Some(own) if own != id => Err(CoreError::NotFound {
            what: "workspace",
            id: id.to_string(),
        }),
        _ => Ok(()),
    }
}

/// A workspace as answered: which secrets are set and the key id sealing them, never a secret.
fn workspace_to_proto(record: &WorkspaceRecord) -> pb::Workspace {
    let w = &record.workspace;
    let sealed = record.credentials.as_ref();
    pb::Workspace {
        id: w.id,
        site_id: w.cio_site_id.clone(),
        region: w.region.clone(),
        name: w.name.clone(),
        stored_credentials: sealed.is_some(),
        has_track_api_key: sealed.is_some(),
        has_app_api_key: sealed.is_some(),
        has_webhook_signing_key: sealed.is_some_and(|c| c.webhook_signing_key.is_some()),
        secrets_key_id: sealed.map(|c| c.key_id.clone()).unwrap_or_default(),
        track_requests_per_sec: record.track_requests_per_sec.unwrap_or(0),
        app_requests_per_sec: record.app_requests_per_sec.unwrap_or(0),
        track_base_url: record.track_base_url.clone().unwrap_or_default(),
        app_base_url: record.app_base_url.clone().unwrap_or_default(),
        created_at: Some(timestamp(w.created_at)),
        updated_at: Some(timestamp(w.updated_at)),
        disabled_at: w.disabled_at.map(timestamp),
        etag: sharpsend_core::workspaces::etag(record),
    }
}

fn role_from_proto(field: &str, value: i32) -> Result<Role, CoreError> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Reader) => Ok(Role::Reader),
        Ok(pb::Role::Writer) => Ok(Role::Writer),
        Ok(pb::Role::Sender) => Ok(Role::Sender),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Unspecified) => Err(CoreError::invalid(
            field,
            "is required: ROLE_READER, ROLE_WRITER, ROLE_SENDER or ROLE_ADMIN",
        )),
        Err(_) => Err(CoreError::invalid(field, format!("{value} is not a Role"))),
    }
}

fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::Reader => pb::Role::Reader,
        Role::Writer => pb::Role::Writer,
        Role::Sender => pb::Role::Sender,
        Role::Admin => pb::Role::Admin,
    }
}

fn key_to_proto(key: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        key_id: key.key_id.clone(),
        name: key.name.clone(),
        role: role_to_proto(key.role) as i32,
        workspace_id: key.workspace_id.unwrap_or(0),
        all_workspaces: key.workspace_id.is_none(),
        created_by: key.created_by.clone(),
        created_at: Some(timestamp(key.created_at)),
        revoked_at: key.revoked_at.map(timestamp),
    }
}

fn event_to_proto(event: &AuditEvent) -> pb::AuditEvent {
    let role = event
        .role
        .parse::<Role>()
        .map_or(pb::Role::Unspecified, role_to_proto);
    pb::AuditEvent {
        id: event.id,
        at: Some(timestamp(event.at)),
        workspace_id: event.workspace_id.unwrap_or(0),
        key_id: event.key_id.clone(),
        key_name: event.key_name.clone(),
        role: role as i32,
        action: event.action.clone(),
        ids: Some(json_to_struct(
            event.ids.as_object().unwrap_or(&serde_json::Map::new()),
        )),
        outcome: event.outcome.clone(),
    }
}

/// The workspace a new key is bound to (`None`: all), checked against what `caller` may grant.
async fn key_workspace(
    ctx: &AppContext,
    caller: &Caller,
    request: &pb::CreateApiKeyRequest,
    role: Role,
) -> Result<Option<i64>, CoreError> {
    if request.all_workspaces {
        if request.workspace_id != 0 {
            return Err(CoreError::invalid(
                "workspace_id",
                "must be 0 with all_workspaces",
            ));
        }
        if role != Role::Admin {
            return Err(CoreError::invalid(
                "all_workspaces",
                "only ROLE_ADMIN keys may be bound to every workspace",
            ));
        }
        if scope(caller).is_some() {
            return Err(CoreError::invalid(
                "all_workspaces",
                "a key bound to one workspace cannot create a key for every workspace",
            ));
        }
        return Ok(None);
    }
    let wanted = match (request.workspace_id, caller.workspace_id) {
        (id, _) if id < 0 => {
            return Err(CoreError::invalid("workspace_id", "must not be negative"));
        }
        (0, Some(own)) => own,
        (0, None) => {
            return Err(CoreError::invalid(
                "workspace_id",
                "is required for a caller bound to every workspace (or set all_workspaces)",
            ));
        }
        (id, _) => id,
    };
    let not_found = || CoreError::NotFound {
        what: "workspace",
        id: wanted.to_string(),
    };
    if scope(caller).is_some_and(|own| own != wanted) {
        return Err(not_found());
    }
    workspaces::get(&ctx.db, wanted)
        .await?
        .ok_or_else(not_found)?;
    Ok(Some(wanted))
}

fn audit_filters(request: &pb::ListAuditEventsRequest) -> Result<AuditQuery, CoreError> {
    let mut violations: Vec<FieldViolation> = Vec::new();
    input::identifier(&mut violations, "key_id", &request.key_id, ID_BYTES, false);
    input::identifier(&mut violations, "action", &request.action, ID_BYTES, false);
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let since = request
        .since
        .as_ref()
        .map(|t| convert::datetime("since", t))
        .transpose()?;
    let until = request
        .until
        .as_ref()
        .map(|t| convert::datetime("until", t))
        .transpose()?;
    if let (Some(since), Some(until)) = (since, until)
        && since >= until
    {
        return Err(CoreError::invalid("until", "must be after since"));
    }
    let action = match request.action.as_str() {
        "" => None,
        full if full.starts_with('/') => Some(full.to_owned()),
        short => Some(format!("/sharpsend.cio.v1.{short}")),
    };
    Ok(AuditQuery {
        key_id: (!request.key_id.is_empty()).then(|| request.key_id.clone()),
        action,
        since,
        until,
        limit: convert::limit(
            "page_size",
            i64::from(request.page_size),
            DEFAULT_AUDIT_PAGE,
            MAX_AUDIT_PAGE,
        )?,
        ..AuditQuery::default()
    })
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let mut violations = Vec::new();
        input::identifier(&mut violations, "name", &request.name, 400, true);
        if request.name.chars().count() > KEY_NAME_CHARS {
            violations.push(FieldViolation::new(
                "name",
                format!("is longer than {KEY_NAME_CHARS} characters"),
            ));
        }
        if !violations.is_empty() {
            return Err(CoreError::InvalidArgument(violations)).or_status();
        }
        let role = role_from_proto("role", request.role).or_status()?;
        let workspace_id = key_workspace(&self.ctx, &caller, &request, role)
            .await
            .or_status()?;
        let made = auth::new_key();
        let key = api_keys::create(
            &self.ctx.db,
            NewApiKey {
                key_id: made.key_id,
                name: request.name,
                role,
                workspace_id,
                secret_hash: made.secret_hash,
                created_by: caller.key_id,
            },
            self.ctx.now(),
        )
        .await
        .map_err(CoreError::from)
        .or_status()?;
        tracing::info!(key_id = %key.key_id, role = %key.role, "API key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(key_to_proto(&key)),
            secret: made.secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = auth::caller(&request)?;
        let keys = api_keys::list(
            &self.ctx.db,
            scope(&caller),
            request.get_ref().include_revoked,
        )
        .await
        .map_err(CoreError::from)
        .or_status()?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(key_to_proto).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = auth::caller(&request)?;
        let key_id = request.into_inner().key_id;
        if let Some(problem) = input::identifier_problem(&key_id, ID_BYTES, true) {
            return Err(CoreError::invalid("key_id", problem)).or_status();
        }
        let not_found = || CoreError::NotFound {
            what: "API key",
            id: sharpsend_core::error::shown(&key_id),
        };
        let visible = api_keys::find(&self.ctx.db, &key_id)
            .await
            .map_err(CoreError::from)
            .or_status()?
            .filter(|(key, _)| scope(&caller).is_none_or(|own| key.workspace_id == Some(own)));
        if visible.is_none() {
            return Err(not_found()).or_status();
        }
        let key = api_keys::revoke(&self.ctx.db, &key_id, self.ctx.now())
            .await
            .map_err(CoreError::from)
            .or_status()?
            .ok_or_else(not_found)
            .or_status()?;
        self.keys.forget(&key_id);
        tracing::info!(key_id = %key.key_id, "API key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {
            key: Some(key_to_proto(&key)),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = auth::caller(&request)?;
        let request = request.into_inner();
        let mut query = audit_filters(&request).or_status()?;
        query.workspace_id = scope(&caller);
        let filters = format!(
            "key={}|action={}|since={:?}|until={:?}",
            request.key_id, request.action, query.since, query.until
        );
        query.before_id = convert::decode_page_token(
            "audit",
            "ListAuditEvents",
            &filters,
            &request.page_token,
            |p| p.parse::<i64>().ok(),
        )
        .or_status()?;
        let events = audit::list(&self.ctx.db, &query)
            .await
            .map_err(CoreError::from)
            .or_status()?;
        let next_page_token = match events.last() {
            Some(last) if events.len() as u64 == query.limit => {
                convert::encode_page_token("audit", &filters, last.id)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::CreateWorkspaceResponse>, Status> {
        let caller = auth::caller(&request)?;
        require_all_workspaces(&caller)?;
        let r = request.into_inner();
        let record = sharpsend_core::workspaces::create(
            &self.ctx,
            sharpsend_core::workspaces::NewWorkspaceRequest {
                site_id: r.site_id,
                region: r.region,
                name: r.name,
                track_api_key: r.track_api_key.into(),
                app_api_key: r.app_api_key.into(),
                webhook_signing_key: r.webhook_signing_key.into(),
                track_requests_per_sec: i64::from(r.track_requests_per_sec),
                app_requests_per_sec: i64::from(r.app_requests_per_sec),
                track_base_url: r.track_base_url,
                app_base_url: r.app_base_url,
            },
        )
        .await
        .or_status()?;
        Ok(Response::new(pb::CreateWorkspaceResponse {
            workspace: Some(workspace_to_proto(&record)),
        }))
    }

    async fn update_workspace(
        &self,
        request: Request<pb::UpdateWorkspaceRequest>,
    ) -> Result<Response<pb::UpdateWorkspaceResponse>, Status> {
        let caller = auth::caller(&request)?;
        let r = request.into_inner();
        visible_workspace(&caller, r.id).or_status()?;
        let record = sharpsend_core::workspaces::update(
            &self.ctx,
            r.id,
            sharpsend_core::workspaces::WorkspaceUpdate {
                etag: r.etag,
                name: r.name,
                region: r.region,
                track_api_key: r.track_api_key.into(),
                app_api_key: r.app_api_key.into(),
                webhook_signing_key: r.webhook_signing_key.into(),
                track_requests_per_sec: i64::from(r.track_requests_per_sec),
                app_requests_per_sec: i64::from(r.app_requests_per_sec),
                track_base_url: r.track_base_url,
                app_base_url: r.app_base_url,
                clear: r.clear_fields,
            },
        )
        .await
        .or_status()?;
        Ok(Response::new(pb::UpdateWorkspaceResponse {
            workspace: Some(workspace_to_proto(&record)),
        }))
    }

    async fn get_workspace(
        &self,
        request: Request<pb::GetWorkspaceRequest>,
    ) -> Result<Response<pb::GetWorkspaceResponse>, Status> {
        let caller = auth::caller(&request)?;
        let id = request.get_ref().id;
        visible_workspace(&caller, id).or_status()?;
        let record = sharpsend_core::workspaces::get(&self.ctx, id)
            .await
            .or_status()?;
        Ok(Response::new(pb::GetWorkspaceResponse {
            workspace: Some(workspace_to_proto(&record)),
        }))
    }

    async fn list_workspaces(
        &self,
        request: Request<pb::ListWorkspacesRequest>,
    ) -> Result<Response<pb::ListWorkspacesResponse>, Status> {
        let caller = auth::caller(&request)?;
        require_all_workspaces(&caller)?;
        let r = request.into_inner();
        let limit = convert::limit(
            "page_size",
            i64::from(r.page_size),
            DEFAULT_WORKSPACE_PAGE,
            MAX_WORKSPACE_PAGE,
        )
        .or_status()?;
        let filters = format!("disabled={}", r.include_disabled);
        let after = convert::decode_page_token(
            "workspaces",
            "ListWorkspaces",
            &filters,
            &r.page_token,
            |p| p.parse::<i64>().ok(),
        )
        .or_status()?;
        let records = sharpsend_core::workspaces::list(&self.ctx, after, limit, r.include_disabled)
            .await
            .or_status()?;
        let next_page_token = match records.last() {
            Some(last) if records.len() as u64 == limit => {
                convert::encode_page_token("workspaces", &filters, last.workspace.id)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: records.iter().map(workspace_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn disable_workspace(
        &self,
        request: Request<pb::DisableWorkspaceRequest>,
    ) -> Result<Response<pb::DisableWorkspaceResponse>, Status> {
        let caller = auth::caller(&request)?;
        require_all_workspaces(&caller)?;
        let record = sharpsend_core::workspaces::disable(&self.ctx, request.get_ref().id)
            .await
            .or_status()?;
        Ok(Response::new(pb::DisableWorkspaceResponse {
            workspace: Some(workspace_to_proto(&record)),
        }))
    }
}
