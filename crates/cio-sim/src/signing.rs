//! HMAC-SHA256 signatures: the simulator's signed download links and Customer.io's reporting
//! webhook signature ([`sign_webhook`], public so tests can play Customer.io's side).

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

/// Lowercase hex HMAC-SHA256 of `message` under `key`.
pub(crate) fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    // HMAC accepts keys of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `given` (hex) is the HMAC-SHA256 of `message` under `key`, compared in constant
/// time.
pub(crate) fn hmac_matches(key: &[u8], message: &[u8], given: &str) -> bool {
    let Ok(given) = hex::decode(given.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return false;
    };
    mac.update(message);
    mac.verify_slice(&given).is_ok()
}

/// The `X-CIO-Signature` Customer.io sends with a reporting webhook: lowercase hex
/// HMAC-SHA256 of `"v0:" + timestamp + ":" + raw body` under the webhook's signing key, where
/// `timestamp` is the `X-CIO-Timestamp` header value (unix seconds).
pub fn sign_webhook(signing_key: &str, timestamp: i64, body: &[u8]) -> String {
    let mut message = format!("v0:{timestamp}:").into_bytes();
    message.extend_from_slice(body);
    hmac_hex(signing_key.as_bytes(), &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_constant_time_check() {
        // RFC 4231 test case 2.
        let mac = hmac_hex(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            mac,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(hmac_matches(b"Jefe", b"what do ya want for nothing?", &mac));
        assert!(!hmac_matches(b"Jefe", b"what do ya want for nothing", &mac));
        assert!(!hmac_matches(b"Jefe", b"x", "not hex"));
        let signed = sign_webhook("key", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(signed, hmac_hex(b"key", br#"v0:1700000000:{"a":1}"#));
    }
}
