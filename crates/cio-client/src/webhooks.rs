//! Receiving Customer.io's reporting webhooks (reporting-webhooks.openapi.json): signature
//! verification and typed parsing of the body.
//!
//! Customer.io signs each request: `X-CIO-Timestamp` (unix seconds) and `X-CIO-Signature`,
//! the lowercase hex HMAC-SHA256 under the webhook's signing key of
//! `"v0:" + timestamp + ":" + raw body`. [`verify_signature`] checks it in constant time on the
//! RAW body (before any parsing) and refuses timestamps outside a tolerance either way, so a
//! captured request cannot be replayed later.
//!
//! Delivery is at least once and a later event waits behind one that has not succeeded:
//! deduplicate on [`ReportingEvent::event_id`], and answer a validly signed request with a 2xx
//! even when its body is not understood (keep it aside) — a 4xx holds back every later event
//! for an hour. [`parse_reporting_event`] keeps what it does not know ([`Metric::Other`],
//! [`ObjectType::Other`], [`ReportingData::other`]) so nothing is lost.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit as _, Mac as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::segments::CustomerIdentifiers;
use crate::serde_util;

/// Header carrying the signing time (unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-CIO-Timestamp";
/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-CIO-Signature";
/// A reasonable replay window for [`verify_signature`].
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Why a webhook request or body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// `X-CIO-Timestamp` missing or not unix seconds.
    #[error("X-CIO-Timestamp is missing or not unix seconds")]
    BadTimestamp,
    /// `X-CIO-Signature` missing or not hex.
    #[error("X-CIO-Signature is missing or not a hex HMAC")]
    MalformedSignature,
    /// The signature does not match the body and timestamp under the key.
    #[error("X-CIO-Signature does not match the body")]
    SignatureMismatch,
    /// Signed longer ago than the tolerance.
    #[error("webhook signed {age_secs}s ago, beyond the tolerance")]
    Stale {
        /// Seconds since the signing time.
        age_secs: u64,
    },
    /// Signed in the future beyond the tolerance.
    #[error("webhook signed {ahead_secs}s in the future, beyond the tolerance")]
    FromTheFuture {
        /// Seconds ahead of `now`.
        ahead_secs: u64,
    },
    /// The body is not a reporting webhook (not JSON, or without `event_id`/`metric`).
    #[error("not a reporting webhook body: {0}")]
    Body(String),
}

/// The signature Customer.io computes: lowercase hex HMAC-SHA256 of
/// `"v0:" + timestamp + ":" + raw_body` under `signing_key`.
pub fn signature(signing_key: &str, timestamp: &str, raw_body: &[u8]) -> String {
    mac(signing_key, timestamp, raw_body)
        .map(|mac| hex::encode(mac.finalize().into_bytes()))
        .unwrap_or_default()
}

/// The MAC over the signed string (HMAC accepts keys of any length: never `None` in practice).
fn mac(signing_key: &str, timestamp: &str, raw_body: &[u8]) -> Option<Hmac<Sha256>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(signing_key.as_bytes()).ok()?;
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(raw_body);
    Some(mac)
}

/// Verifies a reporting webhook request: `timestamp_header` and `signature_header` as
/// received, `raw_body` exactly as received (before any parsing), `now` the receiver's clock,
/// `tolerance` how far the signing time may be from `now` either way ([`DEFAULT_TOLERANCE`]).
/// The signature is compared in constant time.
pub fn verify_signature(
    signing_key: &str,
    timestamp_header: &str,
    signature_header: &str,
    raw_body: &[u8],
    now: SystemTime,
    tolerance: Duration,
) -> Result<(), WebhookError> {
    let timestamp = timestamp_header.trim();
    let signed_at: i64 = timestamp.parse().map_err(|_| WebhookError::BadTimestamp)?;
    let given =
        hex::decode(signature_header.trim()).map_err(|_| WebhookError::MalformedSignature)?;
    if given.len() != 32 {
        return Err(WebhookError::MalformedSignature);
    }
    mac(signing_key, timestamp, raw_body)
        .ok_or(WebhookError::SignatureMismatch)?
        .verify_slice(&given)
        .map_err(|_| WebhookError::SignatureMismatch)?;
    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age = now.saturating_sub(signed_at);
    if age > tolerance {
        return Err(WebhookError::Stale {
            age_secs: age.unsigned_abs(),
        });
    }
    if -age > tolerance {
        return Err(WebhookError::FromTheFuture {
            ahead_secs: age.unsigned_abs(),
        });
    }
    Ok(())
}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $wire:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                #[doc = concat!("`", $wire, "`")]
                $variant,
            )*
            /// Any other value, as sent.
            Other(String),
        }

        impl $name {
            /// The wire name.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)*
                    $name::Other(other) => other,
                }
            }

            /// Reads a wire name (unknown ones are kept as `Other`).
            pub fn parse(name: &str) -> Self {
                match name {
                    $($wire => $name::$variant,)*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok($name::parse(&String::deserialize(d)?))
            }
        }
    };
}

wire_enum! {
    /// What the event is about (`object_type`).
    ObjectType {
        Customer => "customer",
        Email => "email",
        Sms => "sms",
        Push => "push",
        InApp => "in_app",
        Slack => "slack",
        Webhook => "webhook",
        Whatsapp => "whatsapp",
    }
}

wire_enum! {
    /// What happened (`metric`), the spec's list.
    Metric {
        Drafted => "drafted",
        Attempted => "attempted",
        Sent => "sent",
        Delivered => "delivered",
        Opened => "opened",
        Clicked => "clicked",
        Converted => "converted",
        Unsubscribed => "unsubscribed",
        Subscribed => "subscribed",
        CioSubscriptionPreferencesChanged => "cio_subscription_preferences_changed",
        Bounced => "bounced",
        Dropped => "dropped",
        Spammed => "spammed",
        Failed => "failed",
        Undeliverable => "undeliverable",
        Replied => "replied",
    }
}

/// The `data` of a reporting webhook: every field the spec names for any event (absent ones
/// `None`), and whatever else was sent in [`ReportingData::other`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportingData {
    /// The delivery (the message instance).
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub delivery_id: Option<String>,
    /// The person's id (deprecated by Customer.io; blank when deleted).
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub customer_id: Option<String>,
    /// The person's identifiers.
    #[serde(default)]
    pub identifiers: Option<CustomerIdentifiers>,
    /// Customer events: the person's email.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub email_address: Option<String>,
    /// Campaign and broadcast actions.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub action_id: Option<i64>,
    /// Parent action (splits).
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub parent_action_id: Option<i64>,
    /// API-triggered broadcast.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub broadcast_id: Option<i64>,
    /// The broadcast trigger (the id `POST .../triggers` answered).
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub trigger_id: Option<i64>,
    /// Campaign.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub campaign_id: Option<i64>,
    /// The event that triggered the campaign.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub trigger_event_id: Option<String>,
    /// The path through a campaign or broadcast workflow.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub journey_id: Option<String>,
    /// Newsletter.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub newsletter_id: Option<i64>,
    /// Newsletter variant.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub content_id: Option<i64>,
    /// Transactional message template.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub transactional_message_id: Option<String>,
    /// Recipient address.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub recipient: Option<String>,
    /// Email subject.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub subject: Option<String>,
    /// Clicked: the link.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub href: Option<String>,
    /// Clicked: the tracked link's id.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub link_id: Option<i64>,
    /// Clicked by a machine.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub machine: Option<bool>,
    /// Opened by Gmail, Apple Mail Privacy Protection or a machine.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub prefetched: Option<bool>,
    /// Opened through a proxy hiding the reader.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub proxied: Option<bool>,
    /// An open inferred from a click.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub synthetic: Option<bool>,
    /// Why it failed, bounced or was dropped.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub failure_message: Option<String>,
    /// Sent events with the body-content option: the message body.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub content: Option<String>,
    /// Every other field, as sent.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One reporting webhook body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportingEvent {
    /// Unique per event (a ULID); the same on a redelivery: deduplicate on it.
    #[serde(deserialize_with = "serde_util::i64_or_string")]
    pub event_id: String,
    /// What it is about.
    pub object_type: ObjectType,
    /// What happened.
    pub metric: Metric,
    /// When it happened (unix seconds).
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub timestamp: Option<i64>,
    /// The details.
    #[serde(default)]
    pub data: ReportingData,
}

impl ReportingEvent {
    /// An open by a machine rather than a person: prefetched (Apple Mail Privacy, Gmail, a
    /// bot) or a machine click.
    pub fn is_machine(&self) -> bool {
        self.data.prefetched == Some(true) || self.data.machine == Some(true)
    }

    /// An open Customer.io inferred from a click.
    pub fn is_synthetic(&self) -> bool {
        self.data.synthetic == Some(true)
    }
}

/// Parses a reporting webhook body (after [`verify_signature`]). Needs `event_id`,
/// `object_type` and `metric`; everything else is optional, unknown values are kept.
pub fn parse_reporting_event(raw_body: &[u8]) -> Result<ReportingEvent, WebhookError> {
    let value: Value =
        serde_json::from_slice(raw_body).map_err(|e| WebhookError::Body(e.to_string()))?;
    // `object_type_type` is how the 2026 spec spells it on subscription-preference events.
    let value = match value {
        Value::Object(mut map) if !map.contains_key("object_type") => {
            let object_type = map
                .remove("object_type_type")
                .unwrap_or_else(|| Value::String("customer".into()));
            map.insert("object_type".into(), object_type);
            Value::Object(map)
        }
        other => other,
    };
    serde_json::from_value(value).map_err(|e| WebhookError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const KEY: &str = "signing-key";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn the_simulators_signature_verifies() {
        let body = br#"{"event_id":"01E4C4CT6YDC7Y5M7FE1GWWPQJ","metric":"sent"}"#;
        let signed = cio_sim::sign_webhook(KEY, 1_700_000_000, body);
        assert_eq!(signed, signature(KEY, "1700000000", body));
        let check = |key: &str, ts: &str, sig: &str, body: &[u8], now: u64| {
            verify_signature(key, ts, sig, body, at(now), DEFAULT_TOLERANCE)
        };
        assert_eq!(
            check(KEY, "1700000000", &signed, body, 1_700_000_010),
            Ok(())
        );
        assert_eq!(
            check(
                KEY,
                " 1700000000 ",
                &signed.to_uppercase(),
                body,
                1_700_000_000
            ),
            Ok(()),
            "hex case and spaces do not matter"
        );
        assert_eq!(
            check("other", "1700000000", &signed, body, 1_700_000_000),
            Err(WebhookError::SignatureMismatch)
        );
        assert_eq!(
            check(KEY, "1700000001", &signed, body, 1_700_000_000),
            Err(WebhookError::SignatureMismatch),
            "the timestamp is signed"
        );
        let mut tampered = body.to_vec();
        tampered[20] ^= 1;
        assert_eq!(
            check(KEY, "1700000000", &signed, &tampered, 1_700_000_000),
            Err(WebhookError::SignatureMismatch)
        );
        assert_eq!(
            check(KEY, "1700000000", &signed, body, 1_700_000_000 + 301),
            Err(WebhookError::Stale { age_secs: 301 })
        );
        assert_eq!(
            check(KEY, "1700000000", &signed, body, 1_700_000_000 - 301),
            Err(WebhookError::FromTheFuture { ahead_secs: 301 })
        );
        assert_eq!(
            check(KEY, "yesterday", &signed, body, 0),
            Err(WebhookError::BadTimestamp)
        );
        assert_eq!(
            check(KEY, "1700000000", "zz", body, 1_700_000_000),
            Err(WebhookError::MalformedSignature)
        );
        assert_eq!(
            check(KEY, "1700000000", &signed[..62], body, 1_700_000_000),
            Err(WebhookError::MalformedSignature)
        );
    }

    #[test]
    fn parses_the_spec_examples_and_keeps_the_unknown() {
        let sent = json!({
            "metric": "sent", "event_id": "01E4C4CT6YDC7Y5M7FE1GWWPQJ", "object_type": "email",
            "timestamp": 1613063089,
            "data": {
                "action_id": 42, "broadcast_id": 9, "customer_id": "0200000001",
                "delivery_id": "RPILAgUBcRhIBqSfeiIwdIYJKxTY",
                "identifiers": {"id": "42", "email": "test@example.com", "cio_id": "d9c106000001"},
                "recipient": "test@example.com"
            }
        });
        let e = parse_reporting_event(sent.to_string().as_bytes()).unwrap();
        assert_eq!(
            (e.object_type.clone(), e.metric.clone()),
            (ObjectType::Email, Metric::Sent)
        );
        assert_eq!(e.data.broadcast_id, Some(9));
        assert_eq!(
            e.data.identifiers.unwrap().cio_id.as_deref(),
            Some("d9c106000001")
        );

        let odd = json!({
            "metric": "read_receipt", "event_id": "x", "object_type": "carrier_pigeon",
            "timestamp": "1613063089",
            "data": {"prefetched": "true", "link_id": "3", "novel": {"a": 1}}
        });
        let e = parse_reporting_event(odd.to_string().as_bytes()).unwrap();
        assert_eq!(e.metric, Metric::Other("read_receipt".into()));
        assert_eq!(e.object_type, ObjectType::Other("carrier_pigeon".into()));
        assert_eq!(e.timestamp, Some(1613063089));
        assert!(e.is_machine());
        assert_eq!(e.data.link_id, Some(3));
        assert_eq!(e.data.other.get("novel"), Some(&json!({"a": 1})));
        assert_eq!(
            serde_json::to_value(&e.metric).unwrap(),
            json!("read_receipt")
        );

        let prefs = json!({
            "metric": "cio_subscription_preferences_changed", "event_id": "y",
            "object_type_type": "email", "timestamp": 1,
            "data": {"customer_id": "1", "email_address": "a@b.io", "identifiers": {"id": "1"}}
        });
        let e = parse_reporting_event(prefs.to_string().as_bytes()).unwrap();
        assert_eq!(e.object_type, ObjectType::Email);
        assert_eq!(e.metric, Metric::CioSubscriptionPreferencesChanged);

        for bad in [&b"not json"[..], br#"{"metric":"sent"}"#, br#"[1]"#] {
            assert!(matches!(
                parse_reporting_event(bad),
                Err(WebhookError::Body(_))
            ));
        }
    }
}
