//! API-key authentication for the business services (health and reflection stay open).
//!
//! Callers send `authorization: Bearer <key>`; the scheme is case-insensitive (RFC 7235:
//! `bearer`, `BEARER` are the same) and may be followed by more than one space; the key is
//! compared exactly. Keys come from `SHARPSEND_API_KEYS`: comma-separated, each `key` or
//! `name=key` (the name identifies the caller in logs). Every configured key is compared in
//! constant time; the caller's identity goes into the request's extensions. Refusals are
//! `UNAUTHENTICATED` with a reason (`API_KEY_MISSING`, `API_KEY_MALFORMED`, `API_KEY_INVALID`).

use std::{fmt, sync::Arc};

use secrecy::ExposeSecret;
use sharpsend_core::settings::{ApiKeySetting, parse_api_keys};
use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use crate::status::{reasons, unauthenticated};

/// The accepted keys. `Debug` shows names only.
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

    /// The caller holding `presented`, comparing against every key in constant time.
    fn identify(&self, presented: &[u8]) -> Option<Caller> {
        let mut found = None;
        for key in self.0.iter() {
            if bool::from(key.key.expose_secret().as_bytes().ct_eq(presented)) {
                found = Some(Caller {
                    name: key.name.clone(),
                });
            }
        }
        found
    }
}

/// Who is calling; put in the request's extensions by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
}

/// The API key name the interceptor attached to `request` (`unknown` if none).
pub fn caller_name<T>(request: &tonic::Request<T>) -> String {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The interceptor checking `authorization: Bearer <key>`.
#[derive(Clone)]
pub struct Authenticator {
    keys: ApiKeys,
}

impl Authenticator {
    pub fn new(keys: ApiKeys) -> Self {
        Self { keys }
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

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
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
        let caller = self
            .keys
            .identify(presented)
            .ok_or_else(|| unauthenticated(reasons::API_KEY_INVALID, "invalid API key"))?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(keys: &ApiKeys, header: Option<&str>) -> Result<Caller, tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            let value = h.parse().map_err(|_| tonic::Code::Internal)?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut auth = Authenticator::new(keys.clone());
        let request = auth.call(request).map_err(|s| s.code())?;
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(tonic::Code::Internal)
    }

    #[test]
    fn accepts_each_configured_key_and_names_the_caller() {
        let keys =
            ApiKeys::parse("billing=alpha-secret, beta-secret").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            call(&keys, Some("Bearer alpha-secret")),
            Ok(Caller {
                name: "billing".into()
            })
        );
        assert_eq!(
            call(&keys, Some("Bearer beta-secret")),
            Ok(Caller {
                name: "key-2".into()
            })
        );
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
}
