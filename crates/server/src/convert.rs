//! Conversions between protobuf well-known types and the domain's JSON and chrono values.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, value::Kind};
use serde_json::{Map, Number, Value};
use sharpsend_core::CoreError;

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

/// An opaque page token for `listing` (e.g. `segments`): the position the next page starts
/// after, as `<listing>.v1:<position>` in unpadded base64url.
pub fn encode_page_token(listing: &str, position: impl std::fmt::Display) -> String {
    URL_SAFE_NO_PAD.encode(format!("{listing}.v1:{position}"))
}

/// The position in a token [`encode_page_token`] made for `listing`, read by `parse`; `None`
/// for the empty token (the first page). Anything else is `InvalidArgument` on `page_token`,
/// naming `rpc`, the call whose tokens are expected.
pub fn decode_page_token<T>(
    listing: &str,
    rpc: &str,
    token: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, CoreError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        CoreError::invalid(
            "page_token",
            format!("is not a page token returned by {rpc}"),
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let position = text
        .strip_prefix(listing)
        .and_then(|rest| rest.strip_prefix(".v1:"))
        .ok_or_else(bad)?;
    parse(position).map(Some).ok_or_else(bad)
}

/// A protobuf timestamp as UTC; `None` when out of range.
pub fn datetime(ts: &Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// A `google.protobuf.Struct` as a JSON object. Whole numbers become JSON integers (so
/// `created_at: 1700000000` stays an integer), others floats; NaN and infinities become null.
pub fn struct_to_json(s: Struct) -> Map<String, Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(value: prost_types::Value) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Value::Number(Number::from(n as i64))
            } else {
                Number::from_f64(n)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_to_json).collect()),
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

    #[test]
    fn structs_round_trip_and_whole_numbers_stay_integers() {
        let original = json!({"score": 87, "ratio": 0.25, "tags": ["a", true, null], "nested": {"x": "y"}, "none": null});
        let map = original.as_object().cloned().unwrap_or_default();
        let back = struct_to_json(json_to_struct(&map));
        assert_eq!(Value::Object(back), original);
    }
}
