//! Lenient deserializers: Customer.io is not always consistent about numbers vs strings, and a
//! `null` where a list is expected should not fail a whole page.

use serde::de::{self, Deserialize, Deserializer};
use serde_json::Value;

/// `Option<String>` from a string, a number, a bool or null.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => return Err(de::Error::custom(format!("expected a string, got {other}"))),
    })
}

/// `String` from a string or a number (ids Customer.io sends either way).
pub(crate) fn i64_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    opt_string(d)?.ok_or_else(|| de::Error::custom("expected a string, got null"))
}

fn value_to_i64<E: de::Error>(value: &Value) -> Result<Option<i64>, E> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| E::custom(format!("expected an integer, got {n}"))),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| E::custom(format!("expected an integer, got {s:?}"))),
        other => Err(E::custom(format!("expected an integer, got {other}"))),
    }
}

/// `i64` from a number or a numeric string.
pub(crate) fn i64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    value_to_i64(&Value::deserialize(d)?)?
        .ok_or_else(|| de::Error::custom("expected an integer, got null"))
}

/// `Option<i64>` from a number, a numeric string or null.
pub(crate) fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    value_to_i64(&Value::deserialize(d)?)
}

/// `u64` from a non-negative number or numeric string.
pub(crate) fn u64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = i64_lenient(d)?;
    u64::try_from(n)
        .map_err(|_| de::Error::custom(format!("expected a non-negative integer, got {n}")))
}

/// `Option<bool>` from a bool, `"true"`/`"false"` (any case), 0/1 or null.
pub(crate) fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::Bool(b) => Some(b),
        Value::String(s) if s.trim().is_empty() => None,
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Some(false),
        Value::Number(n) if n.as_u64() == Some(0) => Some(false),
        Value::Number(n) if n.as_u64() == Some(1) => Some(true),
        other => {
            return Err(de::Error::custom(format!(
                "expected a boolean, got {other}"
            )));
        }
    })
}

/// `T::default()` for null or missing (use with `#[serde(default)]`).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
