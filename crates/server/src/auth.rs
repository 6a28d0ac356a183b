//! Authentication, authorization and audit of every business call, in one tower layer
//! ([`AccessLayer`]); health and reflection stay open ([`crate::access::is_open`]).
//!
//! - Who: callers send `authorization: Bearer <key>`; the scheme is case-insensitive (RFC 7235:
//!   `bearer`, `BEARER` are the same) and may be followed by more than one space; the key is
//!   compared exactly. Keys from `SHARPSEND_API_KEYS` (each `key` or `name=key`) are admin keys
//!   of the default workspace, compared in constant time. Keys created by
//!   `AdminService/CreateApiKey` look like `ssk_<key id>_<secret>`: the key id finds the row,
//!   the SHA-256 of the secret is compared in constant time with the stored one (a fast hash is
//!   right for 256 random bits; no one can guess them). Rows are cached for [`KEY_CACHE_TTL`],
//!   so a revocation reaches every replica within it (this server forgets at once). Refusals are
//!   `UNAUTHENTICATED` with a reason (`API_KEY_MISSING`, `API_KEY_MALFORMED`,
//!   `API_KEY_INVALID`); the caller's identity ([`Caller`]) goes into the request's extensions.
//! - May it: the RPC's rule in [`crate::access::RULES`]; an RPC without one, or a role below
//!   it, is `PERMISSION_DENIED` with no details.
//! - Audit: calls whose rule says so, and every refused call of a known RPC, are appended to
//!   `audit_events` with the caller, the RPC, the request's ids ([`crate::audit`]) and the gRPC
//!   outcome, written before the outcome reaches the caller (a call cut off or abandoned is
//!   written as `CANCELLED` in the background).

use std::{
    collections::HashMap,
    fmt,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use secrecy::ExposeSecret;
use sha2::{Digest as _, Sha256};
use sharpsend_core::{
    AppContext,
    settings::{ApiKeySetting, parse_api_keys},
};
use sharpsend_db::{
    DatabaseConnection, DbError,
    api_keys::{self, Role},
    audit::{self, NewAuditEvent},
};
use subtle::ConstantTimeEq;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::{
    access,
    audit::{AuditFields, first_message},
    status::{reasons, unauthenticated},
};

/// How long a created key's row is trusted before it is read again (revocation delay on other
/// replicas).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Cached key rows kept at most (the cache is emptied when full).
const KEY_CACHE_MAX: usize = 10_000;
/// Prefix of created keys.
pub const KEY_PREFIX: &str = "ssk_";
/// Hex characters of a created key's id.
const KEY_ID_CHARS: usize = 16;
/// Largest request body an audited call may have buffered (tonic's default message limit, 4 MiB,
/// plus the frame header); a larger one is refused as tonic would.
const MAX_AUDITED_BODY: usize = 4 * 1024 * 1024 + 5;

/// The accepted configured keys (`SHARPSEND_API_KEYS`). `Debug` shows names only.
#[derive(Clone)]
pub struct ApiKeys(Arc<[ApiKeySetting]>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|k| &k.name))
            .finish()
    }
}

impl ApiKeys {
    pub fn new(keys: &[ApiKeySetting]) -> Self {
        Self(keys.into())
    }

    /// Parses `key,name=key,...` as `SHARPSEND_API_KEYS` is. Errors never echo a key.
    pub fn parse(raw: &str) -> Result<Self, String> {
        parse_api_keys(raw)
            .map(|keys| Self(keys.into()))
            .map_err(|e| e.problem)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of the configured key `presented`, comparing against every key in constant time.
    fn identify(&self, presented: &[u8]) -> Option<String> {
        let mut found = None;
        for key in self.0.iter() {
            if bool::from(key.key.expose_secret().as_bytes().ct_eq(presented)) {
                found = Some(key.name.clone());
            }
        }
        found
    }
}

/// Who is calling; put in the request's extensions by [`AccessLayer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's name (a label for people).
    pub name: String,
    /// The key's id: a created key's id, or `config:<name>` for a configured key.
    pub key_id: String,
    pub role: Role,
    /// The workspace the key is bound to; `None`: every workspace.
    pub workspace_id: Option<i64>,
    /// A key from `SHARPSEND_API_KEYS` (the deployment's own: it may create all-workspace keys).
    pub configured: bool,
}

impl Caller {
    /// Whether the key may work in every workspace: a configured `SHARPSEND_API_KEYS` key (the
    /// deployment's own) or a created key bound to none.
    pub fn all_workspaces(&self) -> bool {
        self.configured || self.workspace_id.is_none()
    }
}

/// The API key name the access layer attached to `request` (`unknown` if none).
pub fn caller_name<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The caller the access layer attached to `request`; `PERMISSION_DENIED` if none (a service
/// served without the layer).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(permission_denied)
}

pub use crate::status::permission_denied;

/// A newly made key: the whole key (shown once), its id and the hash to store.
pub struct NewKey {
    pub key_id: String,
    pub secret: String,
    pub secret_hash: String,
}

/// Makes a key: 8 random bytes of id (16 hex characters), 32 random bytes of secret.
pub fn new_key() -> NewKey {
    let id: [u8; 8] = rand::random();
    let secret: [u8; 32] = rand::random();
    let key_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret_part = URL_SAFE_NO_PAD.encode(secret);
    NewKey {
        secret: format!("{KEY_PREFIX}{key_id}_{secret_part}"),
        secret_hash: hash_secret(secret_part.as_bytes()),
        key_id,
    }
}

fn hash_secret(secret: &[u8]) -> String {
    Sha256::digest(secret)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `ssk_<16 hex>_<secret>` split into id and secret.
fn split_created_key(presented: &[u8]) -> Option<(&str, &[u8])> {
    let rest = presented.strip_prefix(KEY_PREFIX.as_bytes())?;
    if rest.len() <= KEY_ID_CHARS + 1 || rest[KEY_ID_CHARS] != b'_' {
        return None;
    }
    let id = std::str::from_utf8(&rest[..KEY_ID_CHARS]).ok()?;
    id.bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        .then_some((id, &rest[KEY_ID_CHARS + 1..]))
}

struct CachedKey {
    fetched: Instant,
    /// `None`: no such key (cached too, so a flood of one unknown id reads once per TTL).
    row: Option<(api_keys::ApiKey, String)>,
}

/// Every key the server accepts: configured ones and created ones (read through a short cache).
#[derive(Clone)]
pub struct KeyStore {
    configured: ApiKeys,
    default_workspace: i64,
    db: DatabaseConnection,
    cache: Arc<Mutex<HashMap<String, CachedKey>>>,
    ttl: Duration,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    pub fn new(ctx: &AppContext) -> Self {
        Self {
            configured: ApiKeys::new(&ctx.settings.server.api_keys),
            default_workspace: ctx.workspace_id(),
            db: ctx.db.clone(),
            cache: Arc::default(),
            ttl: KEY_CACHE_TTL,
        }
    }

    /// Forgets the cached row of `key_id` (after revoking it here).
    pub fn forget(&self, key_id: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(key_id);
        }
    }

    /// The caller holding `presented`, or `None` for no valid key.
    pub async fn identify(&self, presented: &[u8]) -> Result<Option<Caller>, DbError> {
        if let Some(name) = self.configured.identify(presented) {
            return Ok(Some(Caller {
                key_id: format!("config:{name}"),
                name,
                role: Role::Admin,
                workspace_id: Some(self.default_workspace),
                configured: true,
            }));
        }
        let Some((key_id, secret)) = split_created_key(presented) else {
            return Ok(None);
        };
        let Some((key, stored_hash)) = self.row(key_id).await? else {
            return Ok(None);
        };
        let matches: bool = hash_secret(secret)
            .as_bytes()
            .ct_eq(stored_hash.as_bytes())
            .into();
        if !matches || key.revoked_at.is_some() {
            return Ok(None);
        }
        Ok(Some(Caller {
            name: key.name,
            key_id: key.key_id,
            role: key.role,
            workspace_id: key.workspace_id,
            configured: false,
        }))
    }

    async fn row(&self, key_id: &str) -> Result<Option<(api_keys::ApiKey, String)>, DbError> {
        if let Ok(cache) = self.cache.lock()
            && let Some(cached) = cache.get(key_id)
            && cached.fetched.elapsed() < self.ttl
        {
            return Ok(cached.row.clone());
        }
        let row = api_keys::find(&self.db, key_id).await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= KEY_CACHE_MAX {
                cache.clear();
            }
            cache.insert(
                key_id.to_owned(),
                CachedKey {
                    fetched: Instant::now(),
                    row: row.clone(),
                },
            );
        }
        Ok(row)
    }
}

/// The credentials of `authorization: <scheme> <credentials>` when the scheme is `Bearer` in any
/// case, followed by one or more spaces (RFC 7235 `1*SP`).
fn bearer_credentials(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if header.len() <= SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &header[SCHEME.len()..];
    let start = rest.iter().position(|b| *b != b' ')?;
    (start > 0).then(|| &rest[start..])
}

/// Who presented `headers`' key, or why not.
async fn authenticate(keys: &KeyStore, headers: &http::HeaderMap) -> Result<Caller, Status> {
    let header = headers.get("authorization").ok_or_else(|| {
        unauthenticated(
            reasons::API_KEY_MISSING,
            "missing `authorization: Bearer <key>` metadata",
        )
    })?;
    let presented = bearer_credentials(header.as_bytes()).ok_or_else(|| {
        unauthenticated(
            reasons::API_KEY_MALFORMED,
            "authorization must be `Bearer <key>`",
        )
    })?;
    keys.identify(presented)
        .await
        .map_err(|e| crate::status::to_status(e.into()))?
        .ok_or_else(|| unauthenticated(reasons::API_KEY_INVALID, "invalid API key"))
}

/// Adds [`Access`] to every service: see the module doc.
#[derive(Clone)]
pub struct AccessLayer {
    keys: KeyStore,
    fields: Arc<AuditFields>,
    ctx: AppContext,
}

impl AccessLayer {
    /// `descriptor_sets`: the encoded descriptor sets of the services served (for the audit's ids).
    pub fn new(ctx: &AppContext, keys: KeyStore, descriptor_sets: &[&[u8]]) -> Self {
        Self {
            keys,
            fields: Arc::new(AuditFields::new(descriptor_sets)),
            ctx: ctx.clone(),
        }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Access {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`AccessLayer`].
#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    layer: AccessLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An audit event waiting for its call's outcome. The event is written before the caller sees
/// the outcome (so the record is never behind what a caller saw); when dropped unfinished (the
/// caller went away, or the deadline cut the call) it is written as `CANCELLED` in the
/// background.
struct PendingAudit {
    event: Option<NewAuditEvent>,
    db: DatabaseConnection,
}

impl PendingAudit {
    /// The write of the event with outcome `code` (`None` if already written).
    fn write(&mut self, code: Code) -> Option<BoxFuture<()>> {
        let mut event = self.event.take()?;
        event.outcome = code_name(code).to_owned();
        let db = self.db.clone();
        Some(Box::pin(async move {
            if let Err(e) = audit::append(&db, event).await {
                tracing::error!(
                    error = %sharpsend_core::error::error_chain(&e),
                    "could not write an audit event"
                );
            }
        }))
    }
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        if let Some(write) = self.write(Code::Cancelled)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(write);
        }
    }
}

/// The canonical upper-case name of a gRPC code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.trim().parse::<i32>().ok().map(Code::from_i32)
}

impl<S, ResBody> Service<http::Request<tonic::body::Body>> for Access<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<AuditedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path().to_owned();
        if access::is_open(&path) {
            let future = self.inner.call(request);
            return Box::pin(async move { Ok(future.await?.map(AuditedBody::plain)) });
        }
        // The service that was polled ready answers this call (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let refuse = |status: Status| Ok(status.into_http::<ResBody>().map(AuditedBody::plain));
            let caller = match authenticate(&layer.keys, request.headers()).await {
                Ok(caller) => caller,
                Err(status) => return refuse(status),
            };
            let rule = access::rule(&path);
            let workspace_id = crate::tenancy::audited_workspace(&caller, request.headers());
            let pending = |ids: serde_json::Value| PendingAudit {
                event: Some(NewAuditEvent {
                    at: layer.ctx.now(),
                    workspace_id,
                    key_id: caller.key_id.clone(),
                    key_name: caller.name.clone(),
                    role: caller.role.as_str().to_owned(),
                    action: path.clone(),
                    ids,
                    outcome: String::new(),
                }),
                db: layer.ctx.db.clone(),
            };
            // The ids of an audited call, read before deciding: a refused attempt names them too.
            let mut ids = serde_json::json!({});
            if rule.is_some_and(|r| r.audit.is_some()) {
                let (parts, body) = request.into_parts();
                let bytes = match http_body_util::Limited::new(body, MAX_AUDITED_BODY)
                    .collect()
                    .await
                {
                    Ok(collected) => collected.to_bytes(),
                    Err(_) => {
                        return refuse(crate::status::request_too_large(MAX_AUDITED_BODY));
                    }
                };
                if let Some(message) = first_message(&bytes) {
                    ids = layer.fields.extract(&path, message);
                }
                request = http::Request::from_parts(
                    parts,
                    tonic::body::Body::new(http_body_util::Full::new(bytes)),
                );
            }
            let Some(rule) = rule.filter(|r| caller.role.includes(r.role)) else {
                if rule.is_some()
                    && let Some(write) = pending(ids).write(Code::PermissionDenied)
                {
                    write.await;
                }
                return refuse(permission_denied());
            };
            let mut audit = rule.audit.is_some().then(|| pending(ids));
            request.extensions_mut().insert(caller);
            let response = inner.call(request).await?;
            // A trailers-only answer (every error) carries its status in the headers.
            if let Some(audit) = audit.as_mut()
                && let Some(code) = grpc_status(response.headers())
                && let Some(write) = audit.write(code)
            {
                write.await;
            }
            Ok(response.map(|body| AuditedBody {
                inner: body,
                audit,
                writing: None,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that writes its call's audit event when the `grpc-status` trailer comes,
    /// before passing the trailer on.
    pub struct AuditedBody<B> {
        #[pin]
        inner: B,
        audit: Option<PendingAudit>,
        writing: Option<(BoxFuture<()>, Frame<Bytes>)>,
    }
}

impl<B> AuditedBody<B> {
    fn plain(inner: B) -> Self {
        Self {
            inner,
            audit: None,
            writing: None,
        }
    }
}

impl<B: Default> Default for AuditedBody<B> {
    fn default() -> Self {
        Self::plain(B::default())
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for AuditedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        loop {
            if let Some((write, _)) = this.writing.as_mut() {
                if write.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let frame = this.writing.take().map(|(_, frame)| frame);
                return Poll::Ready(frame.map(Ok));
            }
            let polled = this.inner.as_mut().poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled
                && let (Some(trailers), Some(audit)) = (frame.trailers_ref(), this.audit.as_mut())
                && let Some(code) = grpc_status(trailers)
                && let Some(write) = audit.write(code)
            {
                if let Poll::Ready(Some(Ok(frame))) = polled {
                    *this.writing = Some((write, frame));
                }
                continue;
            }
            return polled;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.writing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configured key's name for `header`, or the code the layer answers.
    fn call(keys: &ApiKeys, header: Option<&str>) -> Result<String, tonic::Code> {
        let header = header.ok_or(tonic::Code::Unauthenticated)?;
        let presented =
            bearer_credentials(header.as_bytes()).ok_or(tonic::Code::Unauthenticated)?;
        keys.identify(presented).ok_or(tonic::Code::Unauthenticated)
    }

    #[test]
    fn accepts_each_configured_key_and_names_the_caller() {
        let keys =
            ApiKeys::parse("billing=alpha-secret, beta-secret").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            call(&keys, Some("Bearer alpha-secret")),
            Ok("billing".into())
        );
        assert_eq!(call(&keys, Some("Bearer beta-secret")), Ok("key-2".into()));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_the_key_is_not() {
        let keys = ApiKeys::parse("svc=alpha-secret").unwrap_or_else(|e| panic!("{e}"));
        for header in [
            "bearer alpha-secret",
            "BEARER alpha-secret",
            "BeArEr alpha-secret",
            "Bearer   alpha-secret",
        ] {
            assert!(call(&keys, Some(header)).is_ok(), "{header}");
        }
        for header in [
            "bearer ALPHA-SECRET",
            "bearer",
            "bearer ",
            "bearers alpha-secret",
        ] {
            assert_eq!(
                call(&keys, Some(header)),
                Err(tonic::Code::Unauthenticated),
                "{header}"
            );
        }
    }

    #[test]
    fn rejects_missing_wrong_and_malformed() {
        let keys = ApiKeys::parse("alpha-secret").unwrap_or_else(|e| panic!("{e}"));
        for header in [
            None,
            Some("Bearer alpha-secreT"),
            Some("Bearer alpha-secret "),
            Some("alpha-secret"),
            Some("Basic alpha-secret"),
            Some("Bearer "),
        ] {
            assert_eq!(
                call(&keys, header),
                Err(tonic::Code::Unauthenticated),
                "{header:?}"
            );
        }
    }

    #[test]
    fn parse_errors_and_debug_never_show_keys() {
        assert!(ApiKeys::parse(" , ").is_err());
        let err = ApiKeys::parse("ok=topsecret,=x").err().unwrap_or_default();
        assert!(!err.contains("topsecret"), "{err}");
        let keys = ApiKeys::parse("svc=topsecret").unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{keys:?}");
        assert!(
            shown.contains("svc") && !shown.contains("topsecret"),
            "{shown}"
        );
    }

    #[test]
    fn created_keys_split_into_id_and_secret_and_hash_what_is_stored() {
        let key = new_key();
        assert_eq!(key.key_id.len(), KEY_ID_CHARS);
        let (id, secret) =
            split_created_key(key.secret.as_bytes()).unwrap_or_else(|| panic!("{}", key.key_id));
        assert_eq!(id, key.key_id);
        assert_eq!(hash_secret(secret), key.secret_hash);
        assert!(
            !key.secret_hash
                .contains(std::str::from_utf8(secret).unwrap_or("?"))
        );
        assert_ne!(new_key().secret, key.secret);
        for bad in [
            "ssk_",
            "ssk_0123456789abcdef",
            "ssk_0123456789abcdef_",
            "ssk_0123456789ABCDEF_x",
            "ssk_0123456789abcde_xx",
            "sk_0123456789abcdef_x",
        ] {
            assert!(split_created_key(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::PermissionDenied), "PERMISSION_DENIED");
    }
}
