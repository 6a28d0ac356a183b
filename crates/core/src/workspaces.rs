//! Workspaces as data (issue #17): publishers' Customer.io workspaces stored in the database with
//! their credentials sealed at rest ([`crate::secrets`], `SHARPSEND_MASTER_KEY`).
//!
//! - [`create`] / [`update`]: validate field by field, check the credentials with Customer.io
//!   (the Track key by the account/region check, the App key by one cheap authenticated read)
//!   BEFORE anything is stored, then seal them bound to the row and field. Refused credentials
//!   are `FAILED_PRECONDITION` naming the field (never echoing it); Customer.io unreachable is
//!   `Upstream` (`UNAVAILABLE`) and nothing is saved.
//! - [`get`] / [`list`] / [`disable`]: answers carry sealed text at most (the server shows which
//!   secrets are set and the key id, never a secret).
//! - [`access`]: a stored workspace with its credentials opened, what a per-workspace
//!   [`AppContext`] is built from. The env-configured default workspace (`CIO_*`) has no stored
//!   credentials: `None`.
//! - [`rekey`]: the `secrets-rekey` job, re-sealing rows sealed under an older master key.

use std::time::Duration;

use cio_client::{AccountCheckError, CioClient, CioError, Region};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use sharpsend_db::workspaces::{
    self as store, NewWorkspace, SealedCredentials, Workspace, WorkspaceChange, WorkspaceRecord,
};
use url::Url;

use crate::{
    AppContext, CoreError, FieldViolation,
    error::error_chain,
    secrets::{MASTER_KEY_VARIABLE, MasterKeys},
    settings::{CioSettings, declared_default},
};

/// Bytes of a site id.
pub const SITE_ID_BYTES: usize = 64;
/// Characters of a workspace name.
pub const NAME_CHARS: usize = 100;
/// Bytes of one credential.
pub const KEY_BYTES: usize = 512;
/// Bytes of a base URL override.
pub const URL_BYTES: usize = 2048;
/// Largest per-workspace rate limit, requests per second.
pub const MAX_REQUESTS_PER_SEC: i64 = 1000;

/// The field names sealed values are bound to (associated data).
pub mod fields {
    pub const TRACK_API_KEY: &str = "track_api_key";
    pub const APP_API_KEY: &str = "app_api_key";
    pub const WEBHOOK_SIGNING_KEY: &str = "webhook_signing_key";
}

/// A stored workspace with its credentials opened: what a per-workspace AppContext is built from.
pub struct WorkspaceAccess {
    pub workspace: Workspace,
    pub cio: crate::settings::CioSettings,
    pub webhook_signing_key: Option<secrecy::SecretString>,
    pub disabled: bool,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Debug for WorkspaceAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkspaceAccess")
            .field("workspace", &self.workspace)
            .field("cio", &self.cio)
            .field("webhook_signing_key", &self.webhook_signing_key.is_some())
            .field("disabled", &self.disabled)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// A CreateWorkspace request, as received (validated by [`create`]). `Debug` never shows a key.
pub struct NewWorkspaceRequest {
    pub site_id: String,
    /// `us` or `eu` (empty: `us`).
    pub region: String,
    /// Empty: the site id.
    pub name: String,
    pub track_api_key: SecretString,
    pub app_api_key: SecretString,
    /// Empty: none.
    pub webhook_signing_key: SecretString,
    /// 0: the process default.
    pub track_requests_per_sec: i64,
    pub app_requests_per_sec: i64,
    /// Empty: the region's.
    pub track_base_url: String,
    pub app_base_url: String,
}

/// An UpdateWorkspace request: empty / 0 fields stay as they are; the fields named in `clear`
/// go back to their defaults. `Debug` never shows a key.
#[derive(Default)]
pub struct WorkspaceUpdate {
    /// Non-empty: apply only if the workspace is still at this etag (else `ABORTED`).
    pub etag: String,
    pub name: String,
    /// `us` or `eu`; empty: unchanged.
    pub region: String,
    pub track_api_key: SecretString,
    pub app_api_key: SecretString,
    pub webhook_signing_key: SecretString,
    pub track_requests_per_sec: i64,
    pub app_requests_per_sec: i64,
    pub track_base_url: String,
    pub app_base_url: String,
    /// Fields to reset: any of [`CLEARABLE`].
    pub clear: Vec<String>,
}

/// The fields an update can reset to their defaults (`UpdateWorkspaceRequest.clear_fields`).
pub const CLEARABLE: [&str; 5] = [
    fields::WEBHOOK_SIGNING_KEY,
    "track_requests_per_sec",
    "app_requests_per_sec",
    "track_base_url",
    "app_base_url",
];

/// The etag of a workspace as answered (its version).
pub fn etag(record: &WorkspaceRecord) -> String {
    record.version.to_string()
}

/// Concurrent changes an update re-applies itself to before answering `ABORTED`.
const UPDATE_ATTEMPTS: usize = 3;

fn check_site_id(violations: &mut Vec<FieldViolation>, site_id: &str) {
    if site_id.is_empty() {
        violations.push(FieldViolation::new("site_id", "is required"));
    } else if site_id.len() > SITE_ID_BYTES {
        violations.push(FieldViolation::new(
            "site_id",
            format!("is {} bytes; at most {SITE_ID_BYTES}", site_id.len()),
        ));
    } else if !site_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        violations.push(FieldViolation::new(
            "site_id",
            "may hold only A-Z a-z 0-9 - _",
        ));
    }
}

fn check_name(violations: &mut Vec<FieldViolation>, name: &str) {
    if name.is_empty() {
        return;
    }
    if name.len() > NAME_CHARS * 4 || name.chars().count() > NAME_CHARS {
        violations.push(FieldViolation::new(
            "name",
            format!("is longer than {NAME_CHARS} characters"),
        ));
    } else if name.chars().any(char::is_control) {
        violations.push(FieldViolation::new(
            "name",
            "must not contain control characters",
        ));
    } else if name.trim().is_empty() {
        violations.push(FieldViolation::new("name", "must not be blank"));
    }
}

/// A credential: required or not, bounded, printable, no whitespace. Never echoed.
fn check_key(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    key: &SecretString,
    required: bool,
) {
    let key = key.expose_secret();
    let problem = if key.is_empty() {
        required.then_some("is required".to_owned())
    } else if key.len() > KEY_BYTES {
        Some(format!("is longer than {KEY_BYTES} bytes"))
    } else if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
        Some("must not contain whitespace or control characters".to_owned())
    } else {
        None
    };
    if let Some(problem) = problem {
        violations.push(FieldViolation::new(field, problem));
    }
}

fn check_rate(violations: &mut Vec<FieldViolation>, field: &str, rate: i64) -> Option<u32> {
    match rate {
        0 => None,
        1..=MAX_REQUESTS_PER_SEC => u32::try_from(rate).ok(),
        _ => {
            violations.push(FieldViolation::new(
                field,
                format!("must be 1..={MAX_REQUESTS_PER_SEC} (0: the process default)"),
            ));
            None
        }
    }
}

fn check_url(violations: &mut Vec<FieldViolation>, field: &str, raw: &str) -> Option<String> {
    if raw.is_empty() {
        return None;
    }
    let problem = if raw.len() > URL_BYTES {
        Some(format!("is longer than {URL_BYTES} bytes"))
    } else {
        match Url::parse(raw) {
            Err(_) => Some("is not an absolute URL such as https://host:port".to_owned()),
            Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                Some("must be an http:// or https:// URL".to_owned())
            }
            Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                Some("must not carry credentials (they would be stored unsealed)".to_owned())
            }
            Ok(url) if url.query().is_some() || url.fragment().is_some() => {
                Some("must not have a query or fragment".to_owned())
            }
            Ok(_) => None,
        }
    };
    match problem {
        Some(p) => {
            violations.push(FieldViolation::new(field, p));
            None
        }
        None => Some(raw.to_owned()),
    }
}

fn parse_region(violations: &mut Vec<FieldViolation>, region: &str) -> Region {
    match region {
        "" | "us" => Region::Us,
        "eu" => Region::Eu,
        _ => {
            violations.push(FieldViolation::new("region", "must be `us` or `eu`"));
            Region::Us
        }
    }
}

fn region_name(region: Region) -> &'static str {
    match region {
        Region::Us => "us",
        Region::Eu => "eu",
    }
}

fn master_keys(ctx: &AppContext) -> Result<std::sync::Arc<MasterKeys>, CoreError> {
    ctx.settings
        .master_keys
        .as_ref()
        .map(|ring| ring.keys())
        .ok_or_else(|| {
            CoreError::FailedPrecondition(vec![FieldViolation::new(
                MASTER_KEY_VARIABLE,
                "is not set: stored workspace credentials cannot be sealed or opened",
            )])
        })
}

/// The process's Customer.io defaults: the `CIO_*` settings, or the declared defaults.
fn process_defaults(ctx: &AppContext) -> (u32, u32, Duration, String, Option<i64>) {
    if let Some(cio) = &ctx.settings.cio {
        return (
            cio.track_requests_per_sec,
            cio.app_requests_per_sec,
            cio.timeout,
            cio.metrics_tz.clone(),
            cio.subscription_topic_id,
        );
    }
    let number = |name: &str, fallback: u64| {
        declared_default(name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(fallback)
    };
    (
        u32::try_from(number("CIO_TRACK_RATE_LIMIT", 100)).unwrap_or(100),
        u32::try_from(number("CIO_APP_RATE_LIMIT", 10)).unwrap_or(10),
        Duration::from_secs(number("CIO_TIMEOUT_SECS", 10)),
        declared_default("SHARPSEND_METRICS_TZ")
            .unwrap_or(cio_client::ClientConfig::DEFAULT_METRICS_TZ)
            .to_owned(),
        None,
    )
}

/// The Customer.io settings of a workspace: its site, region, keys, limits and URLs; the rest
/// from the process.
#[allow(clippy::too_many_arguments)]
fn cio_settings(
    ctx: &AppContext,
    site_id: &str,
    region: Region,
    track_api_key: SecretString,
    app_api_key: SecretString,
    track_requests_per_sec: Option<u32>,
    app_requests_per_sec: Option<u32>,
    track_base_url: Option<&str>,
    app_base_url: Option<&str>,
) -> CioSettings {
    let (track_rps, app_rps, timeout, metrics_tz, topic) = process_defaults(ctx);
    CioSettings {
        site_id: site_id.to_owned(),
        track_api_key,
        app_api_key,
        region,
        track_base_url: track_base_url.and_then(|u| Url::parse(u).ok()),
        app_base_url: app_base_url.and_then(|u| Url::parse(u).ok()),
        app_requests_per_sec: app_requests_per_sec.unwrap_or(app_rps),
        track_requests_per_sec: track_requests_per_sec.unwrap_or(track_rps),
        timeout,
        metrics_tz,
        subscription_topic_id: topic,
    }
}

/// Checks the credentials of `cio` with Customer.io: the Track key (and site id, region) by the
/// account/region check, the App key by one newsletter page of one. Nothing is echoed.
pub async fn check_credentials(cio: &CioSettings) -> Result<(), CoreError> {
    let client = CioClient::new(cio.client_config())
        .map_err(|e| CoreError::Internal(format!("building a Customer.io client: {e}")))?;
    match client.check_account().await {
        Ok(_) => {}
        Err(AccountCheckError::TrackCredentials { status }) => {
            return Err(CoreError::FailedPrecondition(vec![
                FieldViolation::new(
                    "track_api_key",
                    format!(
                        "Customer.io refused the site id and Track API key (HTTP {status}); nothing was saved"
                    ),
                )
                .because("CUSTOMERIO_CREDENTIALS_REJECTED"),
            ]));
        }
        Err(AccountCheckError::WrongRegion { workspace, .. }) => {
            return Err(CoreError::invalid(
                "region",
                format!(
                    "the Customer.io workspace is in the {} region",
                    region_name(workspace)
                ),
            ));
        }
        Err(AccountCheckError::Unavailable(e)) => return Err(CoreError::Upstream(e)),
    }
    match client.newsletters_page(None, 1, true).await {
        Ok(_) => Ok(()),
        Err(CioError::Unauthorized { status, .. }) => Err(CoreError::FailedPrecondition(vec![
            FieldViolation::new(
                "app_api_key",
                format!("Customer.io refused the App API key (HTTP {status}); nothing was saved"),
            )
            .because("CUSTOMERIO_CREDENTIALS_REJECTED"),
        ])),
        Err(e) => Err(CoreError::Upstream(e)),
    }
}

fn seal_all(
    keys: &MasterKeys,
    workspace_id: i64,
    track: &SecretString,
    app: &SecretString,
    webhook: Option<&SecretString>,
) -> SealedCredentials {
    SealedCredentials {
        track_api_key: keys.seal(workspace_id, fields::TRACK_API_KEY, track.expose_secret()),
        app_api_key: keys.seal(workspace_id, fields::APP_API_KEY, app.expose_secret()),
        webhook_signing_key: webhook
            .map(|w| keys.seal(workspace_id, fields::WEBHOOK_SIGNING_KEY, w.expose_secret())),
        key_id: keys.current_id().to_owned(),
    }
}

fn not_found(id: i64) -> CoreError {
    CoreError::NotFound {
        what: "workspace",
        id: id.to_string(),
    }
}

/// Validates, checks the credentials with Customer.io, and stores a new workspace with its
/// credentials sealed. A site id already stored: `AlreadyExists`.
pub async fn create(
    ctx: &AppContext,
    request: NewWorkspaceRequest,
) -> Result<WorkspaceRecord, CoreError> {
    let mut violations = Vec::new();
    check_site_id(&mut violations, &request.site_id);
    let region = parse_region(&mut violations, &request.region);
    check_name(&mut violations, &request.name);
    check_key(
        &mut violations,
        "track_api_key",
        &request.track_api_key,
        true,
    );
    check_key(&mut violations, "app_api_key", &request.app_api_key, true);
    check_key(
        &mut violations,
        "webhook_signing_key",
        &request.webhook_signing_key,
        false,
    );
    let track_rps = check_rate(
        &mut violations,
        "track_requests_per_sec",
        request.track_requests_per_sec,
    );
    let app_rps = check_rate(
        &mut violations,
        "app_requests_per_sec",
        request.app_requests_per_sec,
    );
    let track_url = check_url(&mut violations, "track_base_url", &request.track_base_url);
    let app_url = check_url(&mut violations, "app_base_url", &request.app_base_url);
    crate::input::finish(violations)?;
    let keys = master_keys(ctx)?;
    if store::find_by_site_id(&ctx.db, &request.site_id)
        .await?
        .is_some()
    {
        return Err(already_exists(&request.site_id));
    }
    let cio = cio_settings(
        ctx,
        &request.site_id,
        region,
        request.track_api_key.clone(),
        request.app_api_key.clone(),
        track_rps,
        app_rps,
        track_url.as_deref(),
        app_url.as_deref(),
    );
    check_credentials(&cio).await?;
    let webhook = (!request.webhook_signing_key.expose_secret().is_empty())
        .then_some(&request.webhook_signing_key);
    let name = if request.name.is_empty() {
        request.site_id.clone()
    } else {
        request.name.clone()
    };
    let record = store::create(
        &ctx.db,
        NewWorkspace {
            cio_site_id: request.site_id.clone(),
            region: region_name(region).to_owned(),
            name,
            track_requests_per_sec: track_rps,
            app_requests_per_sec: app_rps,
            track_base_url: track_url,
            app_base_url: app_url,
        },
        |id| {
            seal_all(
                &keys,
                id,
                &request.track_api_key,
                &request.app_api_key,
                webhook,
            )
        },
        ctx.now(),
    )
    .await?
    .ok_or_else(|| already_exists(&request.site_id))?;
    tracing::info!(
        workspace_id = record.workspace.id,
        key_id = keys.current_id(),
        "workspace created"
    );
    Ok(record)
}

fn already_exists(site_id: &str) -> CoreError {
    CoreError::AlreadyExists(format!(
        "a workspace with site id {} is already stored",
        crate::error::shown(site_id)
    ))
}

/// The stored workspace `id`.
pub async fn get(ctx: &AppContext, id: i64) -> Result<WorkspaceRecord, CoreError> {
    if id <= 0 {
        return Err(CoreError::invalid("id", "must be a positive workspace id"));
    }
    store::get_record(&ctx.db, id)
        .await?
        .ok_or_else(|| not_found(id))
}

/// Workspaces by id after `after_id`, at most `limit`.
pub async fn list(
    ctx: &AppContext,
    after_id: Option<i64>,
    limit: u64,
    include_disabled: bool,
) -> Result<Vec<WorkspaceRecord>, CoreError> {
    Ok(store::list_records(&ctx.db, after_id, limit, include_disabled).await?)
}

/// Disables workspace `id` (again: answered as it is).
pub async fn disable(ctx: &AppContext, id: i64) -> Result<WorkspaceRecord, CoreError> {
    if id <= 0 {
        return Err(CoreError::invalid("id", "must be a positive workspace id"));
    }
    if id == ctx.workspace_id() {
        // Its credentials come from CIO_* and its process serves it whatever a row says.
        return Err(CoreError::FailedPrecondition(vec![FieldViolation::new(
            "id",
            "the default workspace (CIO_* variables) cannot be disabled; change the configuration",
        )]));
    }
    let record = store::disable(&ctx.db, id, ctx.now())
        .await?
        .ok_or_else(|| not_found(id))?;
    tracing::info!(workspace_id = id, "workspace disabled");
    Ok(record)
}

/// Opens the sealed `credentials` of workspace `id`: (track, app, webhook).
fn open_all(
    keys: &MasterKeys,
    id: i64,
    sealed: &SealedCredentials,
) -> Result<(SecretString, SecretString, Option<SecretString>), CoreError> {
    let fail = |e: crate::secrets::SecretError| {
        CoreError::FailedPrecondition(vec![FieldViolation::new(
            MASTER_KEY_VARIABLE,
            format!("workspace {id}: {e}"),
        )])
    };
    let track = keys
        .open(id, fields::TRACK_API_KEY, &sealed.track_api_key)
        .map_err(fail)?;
    let app = keys
        .open(id, fields::APP_API_KEY, &sealed.app_api_key)
        .map_err(fail)?;
    let webhook = sealed
        .webhook_signing_key
        .as_deref()
        .map(|w| keys.open(id, fields::WEBHOOK_SIGNING_KEY, w))
        .transpose()
        .map_err(fail)?;
    Ok((track, app, webhook))
}

/// An update validated: what to set (`Some`) or reset (`Some(None)`); `None` stays.
struct Validated {
    etag: Option<i64>,
    name: Option<String>,
    region: Option<Region>,
    track_api_key: Option<SecretString>,
    app_api_key: Option<SecretString>,
    webhook_signing_key: Option<Option<SecretString>>,
    track_requests_per_sec: Option<Option<u32>>,
    app_requests_per_sec: Option<Option<u32>>,
    track_base_url: Option<Option<String>>,
    app_base_url: Option<Option<String>>,
}

impl Validated {
    /// The fields this update changes, by request field name.
    fn changed(&self) -> Vec<&'static str> {
        [
            ("region", self.region.is_some()),
            ("track_api_key", self.track_api_key.is_some()),
            ("app_api_key", self.app_api_key.is_some()),
            (
                fields::WEBHOOK_SIGNING_KEY,
                self.webhook_signing_key.is_some(),
            ),
            (
                "track_requests_per_sec",
                self.track_requests_per_sec.is_some(),
            ),
            ("app_requests_per_sec", self.app_requests_per_sec.is_some()),
            ("track_base_url", self.track_base_url.is_some()),
            ("app_base_url", self.app_base_url.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect()
    }

    /// Whether Customer.io must be asked again: a key, the region or a base URL changes.
    fn connection_changes(&self) -> bool {
        self.region.is_some()
            || self.track_api_key.is_some()
            || self.app_api_key.is_some()
            || self.track_base_url.is_some()
            || self.app_base_url.is_some()
    }

    fn keys_change(&self) -> bool {
        self.track_api_key.is_some()
            || self.app_api_key.is_some()
            || self.webhook_signing_key.is_some()
    }
}

fn validate_update(id: i64, change: WorkspaceUpdate) -> Result<Validated, CoreError> {
    let mut violations = Vec::new();
    if id <= 0 {
        violations.push(FieldViolation::new("id", "must be a positive workspace id"));
    }
    let etag = match change.etag.as_str() {
        "" => None,
        raw => match raw.parse::<i64>() {
            Ok(v) if v > 0 => Some(v),
            _ => {
                violations.push(FieldViolation::new(
                    "etag",
                    "is not an etag this service answered (GetWorkspace's `etag`)",
                ));
                None
            }
        },
    };
    check_name(&mut violations, &change.name);
    let region = (!change.region.is_empty()).then(|| parse_region(&mut violations, &change.region));
    check_key(
        &mut violations,
        "track_api_key",
        &change.track_api_key,
        false,
    );
    check_key(&mut violations, "app_api_key", &change.app_api_key, false);
    check_key(
        &mut violations,
        fields::WEBHOOK_SIGNING_KEY,
        &change.webhook_signing_key,
        false,
    );
    let track_rps = check_rate(
        &mut violations,
        "track_requests_per_sec",
        change.track_requests_per_sec,
    );
    let app_rps = check_rate(
        &mut violations,
        "app_requests_per_sec",
        change.app_requests_per_sec,
    );
    let track_url = check_url(&mut violations, "track_base_url", &change.track_base_url);
    let app_url = check_url(&mut violations, "app_base_url", &change.app_base_url);
    let given = |s: &SecretString| (!s.expose_secret().is_empty()).then(|| s.clone());
    let webhook = given(&change.webhook_signing_key);
    let mut cleared = Vec::new();
    for (i, name) in change.clear.iter().enumerate() {
        let field = format!("clear_fields[{i}]");
        let Some(known) = CLEARABLE.iter().find(|c| **c == name.as_str()) else {
            violations.push(FieldViolation::new(
                field,
                format!("must be one of {}", CLEARABLE.join(", ")),
            ));
            continue;
        };
        let also_set = match *known {
            fields::WEBHOOK_SIGNING_KEY => webhook.is_some(),
            "track_requests_per_sec" => track_rps.is_some(),
            "app_requests_per_sec" => app_rps.is_some(),
            "track_base_url" => track_url.is_some(),
            _ => app_url.is_some(),
        };
        if also_set {
            violations.push(FieldViolation::new(
                field,
                format!("names {known}, which this request also sets"),
            ));
        }
        cleared.push(*known);
    }
    crate::input::finish(violations)?;
    let set_or_clear = |name: &str, value: Option<u32>| {
        value
            .map(Some)
            .or_else(|| cleared.contains(&name).then_some(None))
    };
    let url_or_clear = |name: &str, value: Option<String>| {
        value
            .map(Some)
            .or_else(|| cleared.contains(&name).then_some(None))
    };
    Ok(Validated {
        etag,
        name: (!change.name.is_empty()).then_some(change.name),
        region,
        track_api_key: given(&change.track_api_key),
        app_api_key: given(&change.app_api_key),
        webhook_signing_key: webhook.map(Some).or_else(|| {
            cleared
                .contains(&fields::WEBHOOK_SIGNING_KEY)
                .then_some(None)
        }),
        track_requests_per_sec: set_or_clear("track_requests_per_sec", track_rps),
        app_requests_per_sec: set_or_clear("app_requests_per_sec", app_rps),
        track_base_url: url_or_clear("track_base_url", track_url),
        app_base_url: url_or_clear("app_base_url", app_url),
    })
}

fn etag_mismatch(id: i64) -> CoreError {
    CoreError::Aborted(format!(
        "workspace {id} changed since the etag given was read: read it again and retry"
    ))
}

/// Applies `change` to workspace `id`. Changed keys, region or URLs are checked with
/// Customer.io (with the rest as stored) before anything is saved; every credential is then
/// sealed again under the current master key. The env default workspace may only be renamed.
///
/// The change is computed from the row as read and stored only if the row is still at that
/// version: with an etag, a newer row is `ABORTED`; without one, the change is made again from
/// the newer row (a concurrent rotation of another key is never lost), up to
/// [`UPDATE_ATTEMPTS`] times.
pub async fn update(
    ctx: &AppContext,
    id: i64,
    change: WorkspaceUpdate,
) -> Result<WorkspaceRecord, CoreError> {
    let change = validate_update(id, change)?;
    for _ in 0..UPDATE_ATTEMPTS {
        let record = store::get_record(&ctx.db, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if change.etag.is_some_and(|etag| etag != record.version) {
            return Err(etag_mismatch(id));
        }
        let db_change = workspace_change(ctx, &record, &change).await?;
        match store::update(&ctx.db, id, record.version, db_change, ctx.now()).await? {
            store::WorkspaceUpdated::Updated(updated) => {
                tracing::info!(
                    workspace_id = id,
                    credentials_rotated = change.keys_change(),
                    "workspace updated"
                );
                return Ok(*updated);
            }
            store::WorkspaceUpdated::NotFound => return Err(not_found(id)),
            store::WorkspaceUpdated::Conflict if change.etag.is_some() => {
                return Err(etag_mismatch(id));
            }
            store::WorkspaceUpdated::Conflict => {}
        }
    }
    Err(CoreError::Aborted(format!(
        "workspace {id} kept changing while this update was applied: retry"
    )))
}

/// What `change` makes of `record` (credentials checked with Customer.io when they, the region
/// or a URL change).
async fn workspace_change(
    ctx: &AppContext,
    record: &WorkspaceRecord,
    change: &Validated,
) -> Result<WorkspaceChange, CoreError> {
    let id = record.workspace.id;
    let Some(sealed) = &record.credentials else {
        if let Some(first) = change.changed().first() {
            return Err(CoreError::FailedPrecondition(vec![FieldViolation::new(
                *first,
                "the env-configured default workspace takes its credentials, region, limits and URLs from the CIO_* variables; only its name can change here",
            )]));
        }
        return Ok(WorkspaceChange {
            name: change.name.clone(),
            ..WorkspaceChange::default()
        });
    };
    let mut db_change = WorkspaceChange {
        name: change.name.clone(),
        region: change.region.map(|r| region_name(r).to_owned()),
        credentials: None,
        track_requests_per_sec: change.track_requests_per_sec,
        app_requests_per_sec: change.app_requests_per_sec,
        track_base_url: change.track_base_url.clone(),
        app_base_url: change.app_base_url.clone(),
    };
    if !change.connection_changes() && !change.keys_change() {
        return Ok(db_change);
    }
    let keys = master_keys(ctx)?;
    let (track, app, webhook) = open_all(&keys, id, sealed)?;
    let track = change.track_api_key.clone().unwrap_or(track);
    let app = change.app_api_key.clone().unwrap_or(app);
    let webhook = match &change.webhook_signing_key {
        Some(new) => new.clone(),
        None => webhook,
    };
    if change.connection_changes() {
        let region = change.region.unwrap_or_else(|| {
            record
                .workspace
                .region
                .parse::<Region>()
                .unwrap_or(Region::Us)
        });
        let pick = |new: &Option<Option<String>>, old: &Option<String>| match new {
            Some(new) => new.clone(),
            None => old.clone(),
        };
        let track_url = pick(&change.track_base_url, &record.track_base_url);
        let app_url = pick(&change.app_base_url, &record.app_base_url);
        let cio = cio_settings(
            ctx,
            &record.workspace.cio_site_id,
            region,
            track.clone(),
            app.clone(),
            change
                .track_requests_per_sec
                .unwrap_or(record.track_requests_per_sec),
            change
                .app_requests_per_sec
                .unwrap_or(record.app_requests_per_sec),
            track_url.as_deref(),
            app_url.as_deref(),
        );
        check_credentials(&cio).await?;
    }
    if change.keys_change() {
        db_change.credentials = Some(seal_all(&keys, id, &track, &app, webhook.as_ref()));
    }
    Ok(db_change)
}

/// `Ok(None)`: no such workspace, or one without stored credentials (the env default).
pub async fn access(
    ctx: &AppContext,
    workspace_id: i64,
) -> Result<Option<WorkspaceAccess>, CoreError> {
    let Some(record) = store::get_record(&ctx.db, workspace_id).await? else {
        return Ok(None);
    };
    let Some(sealed) = &record.credentials else {
        return Ok(None);
    };
    let keys = master_keys(ctx)?;
    let (track, app, webhook) = open_all(&keys, workspace_id, sealed)?;
    let region = record.workspace.region.parse::<Region>().map_err(|_| {
        CoreError::Internal(format!(
            "workspace {workspace_id}: stored region is not us or eu"
        ))
    })?;
    let cio = cio_settings(
        ctx,
        &record.workspace.cio_site_id,
        region,
        track,
        app,
        record.track_requests_per_sec,
        record.app_requests_per_sec,
        record.track_base_url.as_deref(),
        record.app_base_url.as_deref(),
    );
    Ok(Some(WorkspaceAccess {
        disabled: record.workspace.disabled(),
        updated_at: record.workspace.updated_at,
        workspace: record.workspace,
        cio,
        webhook_signing_key: webhook,
    }))
}

/// What one `secrets-rekey` run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RekeyReport {
    /// The key everything is sealed under after the run (none: `SHARPSEND_MASTER_KEY` unset).
    pub current_key_id: Option<String>,
    /// Workspaces re-sealed under the current key.
    pub resealed: u64,
    /// Workspaces changed meanwhile (a concurrent UpdateWorkspace won; already current).
    pub changed_meanwhile: u64,
    /// Workspaces whose credentials do not open under any configured key (logged).
    pub failed: u64,
}

/// Rows looked at per page.
const REKEY_PAGE: u64 = 100;

/// The `secrets-rekey` job: every workspace whose credentials are sealed under another key than
/// the current one is re-sealed under it, one compare-and-set update per row (a concurrent
/// UpdateWorkspace wins). Rows that do not open are counted and logged (by id and key id), and
/// the run goes on.
pub async fn rekey(ctx: &AppContext) -> Result<RekeyReport, CoreError> {
    let Some(keys) = ctx.settings.master_keys.as_ref().map(|ring| ring.keys()) else {
        return Ok(RekeyReport::default());
    };
    let mut report = RekeyReport {
        current_key_id: Some(keys.current_id().to_owned()),
        ..RekeyReport::default()
    };
    let mut after = None;
    loop {
        let page =
            store::sealed_under_other_keys(&ctx.db, keys.current_id(), after, REKEY_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.workspace.id);
        for record in &page {
            let id = record.workspace.id;
            let Some(old) = &record.credentials else {
                continue;
            };
            let resealed = open_all(&keys, id, old)
                .map(|(track, app, webhook)| seal_all(&keys, id, &track, &app, webhook.as_ref()));
            match resealed {
                Ok(new) => {
                    if store::replace_sealed(&ctx.db, id, old, new).await? {
                        report.resealed += 1;
                    } else {
                        report.changed_meanwhile += 1;
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(
                        workspace_id = id,
                        key_id = %old.key_id,
                        error = %error_chain(&e),
                        "stored credentials do not open; not re-sealed"
                    );
                }
            }
        }
        if (page.len() as u64) < REKEY_PAGE {
            break;
        }
    }
    if report.resealed > 0 || report.failed > 0 {
        tracing::info!(
            resealed = report.resealed,
            failed = report.failed,
            key_id = keys.current_id(),
            "workspace credentials re-sealed"
        );
    }
    Ok(report)
}
