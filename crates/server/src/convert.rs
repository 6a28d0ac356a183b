//! Conversions between protobuf well-known types and the domain's JSON and chrono values, each
//! checked by field: a `Struct` holds only finite numbers and no NUL characters, a `Duration`
//! and a `Timestamp` follow protobuf's rules; page tokens are bound to the filters they were
//! issued for.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, value::Kind};
use serde_json::{Map, Number, Value};
use sharpsend_core::{
    CoreError, FieldViolation,
    error::{reasons, shown},
    input::{self, limits::PAGE_TOKEN_BYTES},
};

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A requested page size or list limit: 0 means `default`, more than `max` is served `max`
/// (AIP-158 coerces rather than refuses), a negative value is `InvalidArgument` on `field`.
pub fn limit(field: &str, requested: i64, default: u64, max: u64) -> Result<u64, CoreError> {
    match u64::try_from(requested) {
        Err(_) => Err(CoreError::invalid(field, "must not be negative")),
        Ok(0) => Ok(default),
        Ok(n) => Ok(n.min(max)),
    }
}

/// 32-bit FNV-1a of `text`, as 8 hex digits: the short fingerprint of a listing's filters that
/// a page token carries.
fn filter_hash(filters: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in filters.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

/// An opaque page token for `listing` (e.g. `segments`) under `filters` (the normalised filters
/// of the call, e.g. `name=growth|type=1|removed=false`): the position the next page starts
/// after, as `<listing>.v2:<hash of filters>:<position>` in unpadded base64url (AIP-158: a token
/// is only good with the filters that produced it).
pub fn encode_page_token(listing: &str, filters: &str, position: impl std::fmt::Display) -> String {
    URL_SAFE_NO_PAD.encode(format!("{listing}.v2:{}:{position}", filter_hash(filters)))
}

/// The position in a token [`encode_page_token`] made for `listing` and the same `filters`,
/// read by `parse`; `None` for the empty token (the first page). Anything else is
/// `InvalidArgument` on `page_token` (reason `INVALID_PAGE_TOKEN`), naming `rpc`, the call whose
/// tokens are expected; a token of other filters says so.
pub fn decode_page_token<T>(
    listing: &str,
    rpc: &str,
    filters: &str,
    token: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, CoreError> {
    if token.is_empty() {
        return Ok(None);
    }
    let refuse = |why: String| {
        CoreError::InvalidArgument(vec![
            FieldViolation::new("page_token", why).because(reasons::INVALID_PAGE_TOKEN),
        ])
    };
    let bad = || refuse(format!("is not a page token returned by {rpc}"));
    if token.len() > PAGE_TOKEN_BYTES {
        return Err(refuse(format!(
            "is {} bytes; the tokens {rpc} returns are at most {PAGE_TOKEN_BYTES}",
            token.len()
        )));
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (hash, position) = text
        .strip_prefix(listing)
        .and_then(|rest| rest.strip_prefix(".v2:"))
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(bad)?;
    if hash != filter_hash(filters) {
        return Err(refuse(format!(
            "was returned by {rpc} for other filters; repeat that call's filters to get the next \
             page, or start again without a token"
        )));
    }
    parse(position).map(Some).ok_or_else(bad)
}

/// Protobuf's range of a `Timestamp`: 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
/// Protobuf's range of a `Duration`: ±10,000 years.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
const NANOS_PER_SECOND: i32 = 1_000_000_000;

/// A protobuf timestamp of request field `field` as UTC, checked by protobuf's rules (nanos in
/// [0, 1e9), seconds within 0001-01-01..9999-12-31); otherwise `InvalidArgument` on `field`.
pub fn datetime(field: &str, ts: &Timestamp) -> Result<DateTime<Utc>, CoreError> {
    datetime_problem(ts)
        .map_or_else(
            || {
                u32::try_from(ts.nanos)
                    .ok()
                    .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
                    .ok_or_else(|| "is not a valid timestamp".to_owned())
            },
            Err,
        )
        .map_err(|why| CoreError::invalid(field, why))
}

/// Why `ts` breaks protobuf's rules, if it does.
pub fn datetime_problem(ts: &Timestamp) -> Option<String> {
    if !(0..NANOS_PER_SECOND).contains(&ts.nanos) {
        return Some(format!(
            "nanos must be within 0..=999999999 (got {})",
            ts.nanos
        ));
    }
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&ts.seconds) {
        return Some(format!(
            "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z (seconds {})",
            ts.seconds
        ));
    }
    None
}

/// A protobuf duration of request field `field`, checked by protobuf's rules (|nanos| < 1e9 with
/// the sign of seconds, within ±10,000 years) and not negative; otherwise `InvalidArgument` on
/// `field`.
pub fn duration(field: &str, d: &prost_types::Duration) -> Result<std::time::Duration, CoreError> {
    match duration_problem(d) {
        Some(why) => Err(CoreError::invalid(field, why)),
        None => Ok(std::time::Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )),
    }
}

/// Why `d` breaks protobuf's rules or is negative, if it does.
pub fn duration_problem(d: &prost_types::Duration) -> Option<String> {
    if d.nanos <= -NANOS_PER_SECOND || d.nanos >= NANOS_PER_SECOND {
        return Some(format!(
            "nanos must be within -999999999..=999999999 (got {})",
            d.nanos
        ));
    }
    if (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0) {
        return Some("seconds and nanos must have the same sign".to_owned());
    }
    if d.seconds.abs() > MAX_DURATION_SECONDS {
        return Some("must be within ±10,000 years".to_owned());
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Some("must not be negative".to_owned());
    }
    None
}

/// A `google.protobuf.Struct` of request field `field` as a JSON object. Whole numbers become
/// JSON integers (so `created_at: 1700000000` stays an integer), others floats. NaN and
/// ±Infinity (JSON has no such numbers: they would silently become null, deleting an attribute)
/// and NUL characters (PostgreSQL cannot store them) are `InvalidArgument`, each violation naming
/// its path, e.g. `updates[3].attributes.score` or `data.items[2].price`.
pub fn struct_to_json(field: &str, s: Struct) -> Result<Map<String, Value>, CoreError> {
    let mut violations = Vec::new();
    let map = object_to_json(field, s, &mut violations);
    input::finish(violations).map(|()| map)
}

fn object_to_json(
    path: &str,
    s: Struct,
    violations: &mut Vec<FieldViolation>,
) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| {
            let at = format!("{path}.{}", shown(&k));
            if k.contains('\0') {
                violations.push(FieldViolation::new(
                    &at,
                    "(the key) must not contain NUL characters",
                ));
            }
            let value = value_to_json(&at, v, violations);
            (k, value)
        })
        .collect()
}

fn value_to_json(
    path: &str,
    value: prost_types::Value,
    violations: &mut Vec<FieldViolation>,
) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => {
            if s.contains('\0') {
                violations.push(FieldViolation::new(path, "must not contain NUL characters"));
            }
            Value::String(s)
        }
        Some(Kind::NumberValue(n)) => {
            if !n.is_finite() {
                violations.push(FieldViolation::new(
                    path,
                    format!("must be a finite number (got {n}): JSON has no NaN or Infinity"),
                ));
                Value::Null
            } else if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(object_to_json(path, s, violations)),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .into_iter()
                .enumerate()
                .map(|(i, v)| value_to_json(&format!("{path}[{i}]"), v, violations))
                .collect(),
        ),
    }
}

/// A JSON object as a `google.protobuf.Struct`.
pub fn json_to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(error: CoreError) -> Vec<String> {
        match error {
            CoreError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn structs_round_trip_and_whole_numbers_stay_integers() {
        let original = json!({"score": 87, "ratio": 0.25, "tags": ["a", true, null], "nested": {"x": "y"}, "none": null});
        let map = original.as_object().cloned().unwrap_or_default();
        let back = struct_to_json("attributes", json_to_struct(&map)).unwrap_or_default();
        assert_eq!(Value::Object(back), original);
    }

    #[test]
    fn non_finite_numbers_and_nul_are_refused_by_path() {
        let number = |n: f64| prost_types::Value {
            kind: Some(Kind::NumberValue(n)),
        };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let s = Struct {
                fields: [("score".to_string(), number(bad))].into(),
            };
            let err = struct_to_json("updates[3].attributes", s).err();
            assert_eq!(
                err.map(fields),
                Some(vec!["updates[3].attributes.score".to_string()])
            );
        }
        let nested = Struct {
            fields: [(
                "prefs".to_string(),
                prost_types::Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: [(
                            "weights".to_string(),
                            prost_types::Value {
                                kind: Some(Kind::ListValue(ListValue {
                                    values: vec![number(1.0), number(f64::NAN)],
                                })),
                            },
                        )]
                        .into(),
                    })),
                },
            )]
            .into(),
        };
        assert_eq!(
            struct_to_json("attributes", nested).err().map(fields),
            Some(vec!["attributes.prefs.weights[1]".to_string()])
        );
        let nul = Struct {
            fields: [(
                "k\0".to_string(),
                prost_types::Value {
                    kind: Some(Kind::StringValue("v\0".into())),
                },
            )]
            .into(),
        };
        assert_eq!(
            struct_to_json("data", nul)
                .err()
                .map(fields)
                .map(|f| f.len()),
            Some(2)
        );
    }

    #[test]
    fn durations_and_timestamps_follow_protobufs_rules() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(
            duration("max_count_age", &d(600, 0)).ok(),
            Some(std::time::Duration::from_secs(600))
        );
        assert_eq!(
            duration("x", &d(0, 5)).ok(),
            Some(std::time::Duration::from_nanos(5))
        );
        for bad in [
            d(1, 2_000_000_000),
            d(1, -1),
            d(-1, 0),
            d(0, -5),
            d(0, 1_000_000_000),
            d(i64::MAX, 0),
        ] {
            assert_eq!(
                duration("max_count_age", &bad).err().map(fields),
                Some(vec!["max_count_age".to_string()]),
                "{bad:?}"
            );
        }
        let t = |seconds, nanos| Timestamp { seconds, nanos };
        assert!(datetime("timestamp", &t(1_700_000_000, 5)).is_ok());
        assert!(datetime("timestamp", &t(MIN_TIMESTAMP_SECONDS, 0)).is_ok());
        assert!(datetime("timestamp", &t(MAX_TIMESTAMP_SECONDS, 999_999_999)).is_ok());
        for bad in [
            t(59, 1_500_000_000),
            t(0, -1),
            t(MAX_TIMESTAMP_SECONDS + 1, 0),
            t(MIN_TIMESTAMP_SECONDS - 1, 0),
        ] {
            assert_eq!(
                datetime("timestamp", &bad).err().map(fields),
                Some(vec!["timestamp".to_string()]),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn page_tokens_are_bound_to_their_listing_and_filters() {
        let parse = |p: &str| p.parse::<i64>().ok();
        let token = encode_page_token("segments", "type=1", 42);
        assert_eq!(
            decode_page_token("segments", "ListSegments", "type=1", &token, parse).ok(),
            Some(Some(42))
        );
        for (listing, filters, token) in [
            ("segments", "type=2", token.clone()),
            ("sends", "type=1", token.clone()),
            ("segments", "type=1", "!!!".to_string()),
            ("segments", "type=1", "x".repeat(10_000)),
            (
                "segments",
                "type=1",
                URL_SAFE_NO_PAD.encode("segments.v1:42"),
            ),
        ] {
            let err = decode_page_token(listing, "ListSegments", filters, &token, parse).err();
            assert_eq!(err.map(fields), Some(vec!["page_token".to_string()]));
        }
    }
}
