//! Secrets at rest: workspace credentials sealed with XChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`) under a master key from `SHARPSEND_MASTER_KEY`.
//!
//! - [`MasterKeys`]: `<key id>:<base64 of 32 bytes>,…`; the FIRST key seals, the others still
//!   open (rotation: put the new key first, run the `secrets-rekey` job, then drop the old one).
//!   Its `Debug` shows key ids only.
//! - [`MasterKeyring`]: the keys a process uses, fixed from `SHARPSEND_MASTER_KEY`, or read from
//!   `SHARPSEND_MASTER_KEY_FILE` and read again whenever that file changes, so a new master key
//!   is introduced (and an old one dropped) without a restart.
//! - A sealed value is text: `v1:<key id>:<base64(nonce || ciphertext)>`, a fresh random 24-byte
//!   nonce per seal. The associated data binds it to its row and column (`workspace id`, field
//!   name), so a value copied to another workspace or field does not open.
//! - Errors ([`SecretError`]) name the key id or the variable, never a key or a plaintext.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use rand::RngCore as _;
use secrecy::{ExposeSecret, SecretString};

/// The variable holding the master keys.
pub const MASTER_KEY_VARIABLE: &str = "SHARPSEND_MASTER_KEY";
/// The variable naming a file holding the master keys instead (re-read when it changes).
pub const MASTER_KEY_FILE_VARIABLE: &str = "SHARPSEND_MASTER_KEY_FILE";
/// The version prefix of a sealed value.
const VERSION: &str = "v1";
const NONCE_BYTES: usize = 24;
const KEY_BYTES: usize = 32;
/// Characters of a key id.
pub const KEY_ID_CHARS: usize = 32;

/// One master key: an id (stored next to what it sealed) and 32 secret bytes.
#[derive(Clone)]
struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The master keys: the first seals, all open.
#[derive(Clone)]
pub struct MasterKeys {
    keys: Vec<MasterKey>,
}

impl fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKeys")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// Why sealing or opening failed. Never carries a key or a plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The value is not `v1:<key id>:<base64>`.
    #[error("the sealed value is malformed")]
    Malformed,
    /// Sealed under a key id that is not configured (any more).
    #[error("sealed under master key `{0}`, which is not configured in SHARPSEND_MASTER_KEY")]
    UnknownKey(String),
    /// The key is known but the value does not open: tampered, or copied from another row or
    /// field.
    #[error("the sealed value does not open under master key `{0}` for this workspace and field")]
    Rejected(String),
    /// The opened value is not UTF-8 text.
    #[error("the opened value is not text")]
    NotText,
}

/// A bad `SHARPSEND_MASTER_KEY`: names the variable and the entry, never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration variable SHARPSEND_MASTER_KEY: {0}")]
pub struct MasterKeyError(pub String);

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= KEY_ID_CHARS
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl MasterKeys {
    /// Parses `<key id>:<base64 of 32 bytes>,…` (the first key seals).
    pub fn parse(raw: &str) -> Result<Self, MasterKeyError> {
        let mut keys: Vec<MasterKey> = Vec::new();
        for (i, entry) in raw.split(',').map(str::trim).enumerate() {
            let n = i + 1;
            if entry.is_empty() {
                continue;
            }
            let Some((id, encoded)) = entry.split_once(':') else {
                return Err(MasterKeyError(format!(
                    "entry {n} is not `<key id>:<base64 of 32 bytes>`"
                )));
            };
            let id = id.trim();
            if !valid_key_id(id) {
                return Err(MasterKeyError(format!(
                    "entry {n}: the key id must be 1..={KEY_ID_CHARS} characters of A-Z a-z 0-9 - _ ."
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(MasterKeyError(format!(
                    "entry {n}: key id `{id}` is listed twice"
                )));
            }
            let bytes = B64.decode(encoded.trim()).map_err(|_| {
                MasterKeyError(format!("entry {n} (key id `{id}`): the key is not base64"))
            })?;
            let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| {
                MasterKeyError(format!(
                    "entry {n} (key id `{id}`): the key must be {KEY_BYTES} bytes"
                ))
            })?;
            keys.push(MasterKey::new(id, &bytes));
        }
        if keys.is_empty() {
            return Err(MasterKeyError("lists no keys".into()));
        }
        Ok(Self { keys })
    }

    /// One fresh random key named `id` (`--dev` without a configured key, and tests).
    pub fn generate(id: &str) -> Self {
        let mut bytes = [0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self {
            keys: vec![MasterKey::new(id, &bytes)],
        }
    }

    /// `<id>:<base64>` of a fresh random key: a value for `SHARPSEND_MASTER_KEY`.
    pub fn generate_entry(id: &str) -> SecretString {
        let mut bytes = [0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        SecretString::from(format!("{id}:{}", B64.encode(bytes)))
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        // `parse` and `generate` never build an empty list.
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// Every configured key id, the current one first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `plaintext` under the current key, bound to `(workspace_id, field)`.
    pub fn seal(&self, workspace_id: i64, field: &str, plaintext: &str) -> String {
        let Some(key) = self.keys.first() else {
            return String::new();
        };
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let aad = associated_data(workspace_id, field);
        let nonce_array = XNonce::from(nonce);
        // Encryption into a Vec fails only on lengths far beyond any credential.
        let ciphertext = key
            .cipher
            .encrypt(
                &nonce_array,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .unwrap_or_default();
        let mut body = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&ciphertext);
        format!("{VERSION}:{}:{}", key.id, B64.encode(body))
    }

    /// Opens a value [`seal`](Self::seal)ed for `(workspace_id, field)` under any configured key.
    pub fn open(
        &self,
        workspace_id: i64,
        field: &str,
        sealed: &str,
    ) -> Result<SecretString, SecretError> {
        let (key_id, body) = split(sealed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| SecretError::UnknownKey(key_id.to_owned()))?;
        let body = B64.decode(body).map_err(|_| SecretError::Malformed)?;
        if body.len() < NONCE_BYTES {
            return Err(SecretError::Malformed);
        }
        let (nonce, ciphertext) = body.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| SecretError::Malformed)?;
        let aad = associated_data(workspace_id, field);
        let plain = key
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::Rejected(key_id.to_owned()))?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| SecretError::NotText)
    }

    /// Opens `sealed` and seals it again under the current key (same row and field).
    pub fn reseal(
        &self,
        workspace_id: i64,
        field: &str,
        sealed: &str,
    ) -> Result<String, SecretError> {
        let plain = self.open(workspace_id, field, sealed)?;
        Ok(self.seal(workspace_id, field, plain.expose_secret()))
    }
}

/// The key id a sealed value names (`None` if it is malformed).
pub fn sealed_key_id(sealed: &str) -> Option<&str> {
    split(sealed).ok().map(|(id, _)| id)
}

fn split(sealed: &str) -> Result<(&str, &str), SecretError> {
    let mut parts = sealed.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(VERSION), Some(id), Some(body)) if valid_key_id(id) && !body.is_empty() => {
            Ok((id, body))
        }
        _ => Err(SecretError::Malformed),
    }
}

/// What a sealed value is bound to: its workspace and field.
fn associated_data(workspace_id: i64, field: &str) -> Vec<u8> {
    format!("sharpsend/{VERSION}/workspace/{workspace_id}/{field}").into_bytes()
}

impl MasterKey {
    fn new(id: &str, bytes: &[u8; KEY_BYTES]) -> Self {
        Self {
            id: id.to_owned(),
            cipher: XChaCha20Poly1305::new(&(*bytes).into()),
        }
    }
}

/// Modification time and size: what tells a rewritten file.
type Stamp = (Option<SystemTime>, u64);

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()))
}

fn read_key_file(path: &Path) -> Result<MasterKeys, MasterKeyError> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        MasterKeyError(format!(
            "{MASTER_KEY_FILE_VARIABLE} {}: {}",
            path.display(),
            e.kind()
        ))
    })?;
    MasterKeys::parse(raw.trim()).map_err(|e| {
        MasterKeyError(format!(
            "{MASTER_KEY_FILE_VARIABLE} {}: {}",
            path.display(),
            e.0
        ))
    })
}

/// Where a process's master keys come from (see the module doc). Cheap to clone; clones share
/// what was read.
#[derive(Clone)]
pub struct MasterKeyring(Arc<Source>);

enum Source {
    Fixed(Arc<MasterKeys>),
    File {
        path: PathBuf,
        read: Mutex<(Stamp, Arc<MasterKeys>)>,
    },
}

impl fmt::Debug for MasterKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Source::Fixed(keys) => f.debug_tuple("Fixed").field(keys).finish(),
            Source::File { path, .. } => f.debug_struct("File").field("path", path).finish(),
        }
    }
}

impl From<MasterKeys> for MasterKeyring {
    fn from(keys: MasterKeys) -> Self {
        Self(Arc::new(Source::Fixed(Arc::new(keys))))
    }
}

impl MasterKeyring {
    /// Reads the keys from `path` now (an error here stops start-up) and again whenever the
    /// file's modification time or size changes.
    pub fn from_file(path: &Path) -> Result<Self, MasterKeyError> {
        let at = stamp(path);
        let keys = read_key_file(path)?;
        Ok(Self(Arc::new(Source::File {
            path: path.to_owned(),
            read: Mutex::new((at, Arc::new(keys))),
        })))
    }

    /// The keys now: a changed file is read first; one that does not read or parse is logged
    /// (without any key) and the keys read before stay in use.
    pub fn keys(&self) -> Arc<MasterKeys> {
        match &*self.0 {
            Source::Fixed(keys) => keys.clone(),
            Source::File { path, read } => {
                let mut read = read
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = stamp(path);
                if now != read.0 {
                    match read_key_file(path) {
                        Ok(keys) => {
                            tracing::info!(
                                key_ids = ?keys.key_ids(),
                                "master keys re-read from {MASTER_KEY_FILE_VARIABLE}"
                            );
                            *read = (now, Arc::new(keys));
                        }
                        Err(e) => {
                            // Logged once per change of the file, not at every use.
                            read.0 = now;
                            tracing::warn!(error = %e, "master key file changed but does not read; keeping the keys read before");
                        }
                    }
                }
                read.1.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn entry(id: &str, byte: u8) -> String {
        format!("{id}:{}", B64.encode([byte; KEY_BYTES]))
    }

    #[test]
    fn seal_open_round_trip_with_a_fresh_nonce_each_time() {
        let keys = MasterKeys::parse(&entry("k1", 7)).unwrap();
        let a = keys.seal(3, "track_api_key", "s3cret-track");
        let b = keys.seal(3, "track_api_key", "s3cret-track");
        assert_ne!(a, b, "a fresh nonce per seal");
        assert!(a.starts_with("v1:k1:"), "{a}");
        assert!(!a.contains("s3cret"));
        assert_eq!(sealed_key_id(&a), Some("k1"));
        for sealed in [&a, &b] {
            let open = keys.open(3, "track_api_key", sealed).unwrap();
            assert_eq!(open.expose_secret(), "s3cret-track");
        }
    }

    #[test]
    fn another_row_or_field_tampering_or_unknown_key_fail_cleanly() {
        let keys = MasterKeys::parse(&entry("k1", 7)).unwrap();
        let sealed = keys.seal(3, "track_api_key", "s3cret-track");
        assert_eq!(
            keys.open(4, "track_api_key", &sealed).unwrap_err(),
            SecretError::Rejected("k1".into())
        );
        assert_eq!(
            keys.open(3, "app_api_key", &sealed).unwrap_err(),
            SecretError::Rejected("k1".into())
        );
        // Flip one bit of the ciphertext.
        let (head, body) = sealed.rsplit_once(':').unwrap();
        let mut raw = B64.decode(body).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let tampered = format!("{head}:{}", B64.encode(&raw));
        assert_eq!(
            keys.open(3, "track_api_key", &tampered).unwrap_err(),
            SecretError::Rejected("k1".into())
        );
        // Same id, other key bytes.
        let other = MasterKeys::parse(&entry("k1", 8)).unwrap();
        assert!(other.open(3, "track_api_key", &sealed).is_err());
        let unknown = MasterKeys::parse(&entry("k2", 7)).unwrap();
        assert_eq!(
            unknown.open(3, "track_api_key", &sealed).unwrap_err(),
            SecretError::UnknownKey("k1".into())
        );
        for bad in [
            "",
            "v1:k1",
            "v2:k1:AAAA",
            "v1:k1:!!!",
            "v1:k1:AAAA",
            "plain",
        ] {
            assert_eq!(
                keys.open(3, "track_api_key", bad).unwrap_err(),
                SecretError::Malformed,
                "{bad}"
            );
        }
    }

    #[test]
    fn rotation_seals_with_the_first_and_opens_with_any() {
        let old = MasterKeys::parse(&entry("old", 1)).unwrap();
        let sealed = old.seal(1, "app_api_key", "app-secret");
        let rotated =
            MasterKeys::parse(&format!("{},{}", entry("new", 2), entry("old", 1))).unwrap();
        assert_eq!(rotated.current_id(), "new");
        assert_eq!(rotated.key_ids(), vec!["new", "old"]);
        assert_eq!(
            rotated
                .open(1, "app_api_key", &sealed)
                .unwrap()
                .expose_secret(),
            "app-secret"
        );
        let resealed = rotated.reseal(1, "app_api_key", &sealed).unwrap();
        assert_eq!(sealed_key_id(&resealed), Some("new"));
        let only_new = MasterKeys::parse(&entry("new", 2)).unwrap();
        assert_eq!(
            only_new
                .open(1, "app_api_key", &resealed)
                .unwrap()
                .expose_secret(),
            "app-secret"
        );
        assert!(only_new.open(1, "app_api_key", &sealed).is_err());
    }

    #[test]
    fn parse_errors_name_the_variable_never_the_key_and_debug_shows_ids_only() {
        let secret_b64 = B64.encode([9u8; KEY_BYTES]);
        let keys = MasterKeys::parse(&format!("main:{secret_b64}")).unwrap();
        let debug = format!("{keys:?}");
        assert!(
            debug.contains("main") && !debug.contains(&secret_b64),
            "{debug}"
        );
        let short = B64.encode([9u8; 16]);
        for raw in [
            format!("main:{short}"),
            format!("main:{secret_b64},main:{secret_b64}"),
            secret_b64.clone(),
            format!("bad id:{secret_b64}"),
            "main:not base64!".to_owned(),
            " , ".to_owned(),
        ] {
            let e = MasterKeys::parse(&raw).unwrap_err().to_string();
            assert!(e.contains("SHARPSEND_MASTER_KEY"), "{e}");
            assert!(!e.contains(&secret_b64) && !e.contains(&short), "{e}");
        }
        let generated = MasterKeys::generate_entry("dev");
        let parsed = MasterKeys::parse(generated.expose_secret()).unwrap();
        assert_eq!(parsed.current_id(), "dev");
    }
}
