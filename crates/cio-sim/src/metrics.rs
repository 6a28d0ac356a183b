//! Metrics endpoints (`/v1/campaigns/{id}/metrics`, `/v1/broadcasts/{id}/metrics`,
//! `/v1/newsletters/{id}/metrics` and per newsletter content): query parameters and the series,
//! answered from the delivery ledger (`sends`).
//!
//! - `version=2`: `res` (required: `hours|hourly|days|daily|weeks|weekly|months|monthly`), `tz`
//!   (IANA region name, default `America/New_York`, Customer.io's "EST"), `start`/`end` (unix
//!   seconds; `end` defaults to now, `start` to the default span before `end`: 24 hours, 45 days,
//!   12 weeks or 12 months). 400 for a bad `res`/`tz`, non-integer `start`/`end`,
//!   `start > end`, or more than 10 years between them.
//! - any other `version` (or none): legacy `period` (`hours|days|weeks|months`, default `days`)
//!   and `steps` (default and `0`: the maximum, 24 hours, 45 days, 12 weeks, 120 months; months
//!   default to 12; fewer than 2 become 2; more than the maximum are capped), the last bucket
//!   being the current one, in Eastern time. 400 for a bad `period` or `steps`.
//! - `type` (optional): `email|webhook|twilio|whatsapp|slack|push|in_app|live_notification`
//!   (400 otherwise); every simulated message is an email, so other types answer zeros.
//!
//! Buckets are whole hours/days/weeks (from Sunday)/months of the time zone; the first holds
//! `start`, the last holds `end`; each counts the events inside it that have happened by now
//! (whole buckets, like Customer.io's pre-aggregated rollups: not clipped to `start`/`end`).
//! Answer: `{"metric":{"series":{"sent":[..],"delivered":[..],..}}}`, oldest first, one entry per
//! bucket; no totals. Version 2 has the spec's series keys including `human_opened`,
//! `prefetch_opened`, `human_clicked`, `prefetch_clicked`; version 1 lacks those four. Keys the
//! simulator does not model (`attempted`, `created`, `deferred`, `drafted`, `failed`,
//! `suppressed`, `topic_unsubscribed`, `undeliverable`, and the webhook `2xx`..`5xx` when `type`
//! is absent or `webhook`) are zeros.

use std::collections::HashMap;

use axum::http::StatusCode;
use chrono::{
    DateTime, Datelike, Duration as ChronoDuration, LocalResult, NaiveDateTime, TimeZone, Timelike,
    Utc,
};
use chrono_tz::Tz;
use serde_json::{Map, Value, json};

use crate::error_bodies::ApiError;
use crate::sends::{DeliveryMetric, Scope, SendStore};

/// Resolution of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Res {
    Hours,
    Days,
    Weeks,
    Months,
}

impl Res {
    fn parse_v2(raw: &str) -> Option<Self> {
        match raw {
            "hours" | "hourly" => Some(Res::Hours),
            "days" | "daily" => Some(Res::Days),
            "weeks" | "weekly" => Some(Res::Weeks),
            "months" | "monthly" => Some(Res::Months),
            _ => None,
        }
    }

    fn parse_v1(raw: &str) -> Option<Self> {
        match raw {
            "hours" => Some(Res::Hours),
            "days" => Some(Res::Days),
            "weeks" => Some(Res::Weeks),
            "months" => Some(Res::Months),
            _ => None,
        }
    }

    /// Legacy maximum number of steps.
    fn max_steps(self) -> i64 {
        match self {
            Res::Hours => 24,
            Res::Days => 45,
            Res::Weeks => 12,
            Res::Months => 120,
        }
    }

    /// Buckets of the default span.
    fn default_steps(self) -> i64 {
        match self {
            Res::Months => 12,
            other => other.max_steps(),
        }
    }
}

const TYPES: [&str; 8] = [
    "email",
    "webhook",
    "twilio",
    "whatsapp",
    "slack",
    "push",
    "in_app",
    "live_notification",
];

/// Series keys the simulator does not model (always zeros).
const UNMODELED: [&str; 8] = [
    "attempted",
    "created",
    "deferred",
    "drafted",
    "failed",
    "suppressed",
    "topic_unsubscribed",
    "undeliverable",
];
const WEBHOOK: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
/// Version 2 only.
const V2_ONLY: [DeliveryMetric; 4] = [
    DeliveryMetric::HumanOpened,
    DeliveryMetric::PrefetchOpened,
    DeliveryMetric::HumanClicked,
    DeliveryMetric::PrefetchClicked,
];

/// Longest `end - start` (10 years).
const MAX_SPAN_SECS: i64 = 10 * 366 * 24 * 3600;

fn bad(parameter: &str, detail: impl Into<String>) -> ApiError {
    ApiError::app(
        StatusCode::BAD_REQUEST,
        detail,
        Some(json!({ "parameter": parameter })),
    )
}

fn default_tz() -> Tz {
    chrono_tz::America::New_York
}

/// The bucket holding `t`, as a local time.
fn floor(res: Res, t: DateTime<Tz>) -> NaiveDateTime {
    let local = t.naive_local();
    let date = local.date();
    let midnight = date.and_hms_opt(0, 0, 0).unwrap_or(local);
    match res {
        Res::Hours => date.and_hms_opt(local.hour(), 0, 0).unwrap_or(local),
        Res::Days => midnight,
        Res::Weeks => {
            midnight - ChronoDuration::days(i64::from(date.weekday().num_days_from_sunday()))
        }
        Res::Months => date
            .with_day(1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .unwrap_or(midnight),
    }
}

/// `n` buckets after (or before, negative) a bucket start.
fn shift(res: Res, local: NaiveDateTime, n: i64) -> Option<NaiveDateTime> {
    match res {
        Res::Hours => local.checked_add_signed(ChronoDuration::hours(n)),
        Res::Days => local.checked_add_signed(ChronoDuration::days(n)),
        Res::Weeks => local.checked_add_signed(ChronoDuration::weeks(n)),
        Res::Months => {
            let months = chrono::Months::new(u32::try_from(n.unsigned_abs()).ok()?);
            if n >= 0 {
                local.checked_add_months(months)
            } else {
                local.checked_sub_months(months)
            }
        }
    }
}

/// A local time as an instant (the earlier one when ambiguous, the first valid one after a gap).
fn instant(tz: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let mut candidate = local;
    for _ in 0..4 {
        match tz.from_local_datetime(&candidate) {
            LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(earlier, _) => return Some(earlier.with_timezone(&Utc)),
            LocalResult::None => candidate += ChronoDuration::minutes(30),
        }
    }
    None
}

/// Bucket boundaries (unix ms, presented time): from the bucket holding `first` for `count`
/// buckets, or up to the bucket holding `end`. The result has one more entry than buckets.
fn bounds(res: Res, tz: Tz, first: NaiveDateTime, count: Option<i64>, end_ms: i64) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::new();
    let mut local = first;
    // 10 years of hours, plus slack.
    for step in 0..100_000_i64 {
        let Some(at) = instant(tz, local).map(|t| t.timestamp_millis()) else {
            break;
        };
        let done = match count {
            Some(n) => step >= n,
            None => at > end_ms,
        };
        if out.last().is_none_or(|prev| at > *prev) {
            out.push(at);
        }
        if done {
            break;
        }
        match shift(res, local, 1) {
            Some(next) => local = next,
            None => break,
        }
    }
    out
}

fn integer(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(raw) => raw.parse::<i64>().map(Some).map_err(|_| {
            bad(
                name,
                format!("{name} must be an integer (unix seconds for start/end)"),
            )
        }),
    }
}

fn to_local(tz: Tz, unix_ms: i64) -> DateTime<Tz> {
    DateTime::from_timestamp_millis(unix_ms)
        .unwrap_or_default()
        .with_timezone(&tz)
}

/// Parsed request: bucket bounds (presented unix ms), version, whether the type is email.
struct Request {
    bounds: Vec<i64>,
    version2: bool,
    email: bool,
    webhook_keys: bool,
}

fn parse(query: &HashMap<String, String>, now_ms: i64) -> Result<Request, ApiError> {
    let kind = query
        .get("type")
        .map(String::as_str)
        .filter(|t| !t.is_empty());
    if let Some(kind) = kind
        && !TYPES.contains(&kind)
    {
        return Err(bad(
            "type",
            format!("type must be one of {}", TYPES.join(", ")),
        ));
    }
    let email = kind.is_none_or(|k| k == "email");
    let webhook_keys = kind.is_none_or(|k| k == "webhook");
    let version2 = query.get("version").map(|v| v.trim()) == Some("2");
    if version2 {
        let res = match query.get("res").map(|r| r.trim()) {
            None | Some("") => return Err(bad("res", "res is required with version=2")),
            Some(raw) => Res::parse_v2(raw).ok_or_else(|| {
                bad(
                    "res",
                    "res must be one of hours, hourly, days, daily, weeks, weekly, months, monthly",
                )
            })?,
        };
        let tz = match query.get("tz").map(|t| t.trim()).filter(|t| !t.is_empty()) {
            None => default_tz(),
            Some(raw) => raw.parse::<Tz>().map_err(|_| {
                bad(
                    "tz",
                    format!(
                        "tz {raw:?} is not a time zone in region format (e.g. America/New_York)"
                    ),
                )
            })?,
        };
        let start = integer(query, "start")?;
        let end = integer(query, "end")?;
        let end_ms = match end {
            Some(e) => e
                .checked_mul(1000)
                .ok_or_else(|| bad("end", "end is out of range"))?,
            None => now_ms,
        };
        let first = match start {
            Some(s) => {
                let start_ms = s
                    .checked_mul(1000)
                    .ok_or_else(|| bad("start", "start is out of range"))?;
                if start_ms > end_ms {
                    return Err(bad("start", "start must not be after end"));
                }
                if (end_ms - start_ms) / 1000 > MAX_SPAN_SECS {
                    return Err(bad("end", "end is limited to 10 years after start"));
                }
                floor(res, to_local(tz, start_ms))
            }
            None => {
                let last = floor(res, to_local(tz, end_ms));
                shift(res, last, 1 - res.default_steps()).unwrap_or(last)
            }
        };
        Ok(Request {
            bounds: bounds(res, tz, first, None, end_ms),
            version2,
            email,
            webhook_keys,
        })
    } else {
        let res = match query
            .get("period")
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
        {
            None => Res::Days,
            Some(raw) => Res::parse_v1(raw)
                .ok_or_else(|| bad("period", "period must be one of hours, days, weeks, months"))?,
        };
        let steps = match integer(query, "steps")? {
            None => res.default_steps(),
            Some(n) if n < 0 => return Err(bad("steps", "steps must not be negative")),
            Some(0) => res.max_steps(),
            Some(n) => n.clamp(2, res.max_steps()),
        };
        let tz = default_tz();
        let last = floor(res, to_local(tz, now_ms));
        let first = shift(res, last, 1 - steps).unwrap_or(last);
        Ok(Request {
            bounds: bounds(res, tz, first, Some(steps), now_ms),
            version2,
            email,
            webhook_keys,
        })
    }
}

/// The metrics answer for a scope.
pub(crate) fn answer(
    store: &SendStore,
    scope: Scope,
    query: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let now = store.now_ms();
    let age = store.age_ms();
    let request = parse(query, now - age)?;
    let buckets = request.bounds.len().saturating_sub(1);
    let internal: Vec<i64> = request.bounds.iter().map(|b| b + age).collect();
    let counted = if request.email {
        store.series(scope, &internal, now)
    } else {
        Default::default()
    };
    let zeros = || json!(vec![0_u64; buckets]);
    let mut series = Map::new();
    for metric in DeliveryMetric::ALL {
        if !request.version2 && V2_ONLY.contains(&metric) {
            continue;
        }
        let values = counted.get(&metric).map_or_else(zeros, |v| json!(v));
        series.insert(metric.as_str().to_owned(), values);
    }
    for key in UNMODELED {
        series.insert(key.to_owned(), zeros());
    }
    if request.webhook_keys {
        for key in WEBHOOK {
            series.insert(key.to_owned(), zeros());
        }
    }
    Ok(json!({ "metric": { "series": series } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// 2026-03-10T15:30:00Z (a Tuesday; New York is UTC-4 after 2026-03-08).
    const NOW: i64 = 1_773_156_600_000;

    #[test]
    fn v2_buckets_follow_res_and_tz() -> Result<(), String> {
        let day = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("version", "2"), ("res", "days"), ("tz", "UTC")];
            pairs.extend_from_slice(extra);
            parse(&q(&pairs), NOW)
                .map(|r| r.bounds)
                .map_err(|e| format!("{e:?}"))
        };
        // 2026-03-01T00:00Z .. 2026-03-03T12:00Z: three days.
        let b = day(&[("start", "1772323200"), ("end", "1772539200")])?;
        assert_eq!(
            b,
            vec![
                1_772_323_200_000,
                1_772_409_600_000,
                1_772_496_000_000,
                1_772_582_400_000
            ]
        );
        // Default span: 45 days ending with today.
        assert_eq!(day(&[])?.len(), 46);
        // Hours across New York's spring-forward night: 23 hourly buckets for the local day.
        let r = parse(
            &q(&[
                ("version", "2"),
                ("res", "hourly"),
                ("start", "1772946000"),
                ("end", "1773028799"),
            ]),
            NOW,
        )
        .map_err(|e| format!("{e:?}"))?;
        assert_eq!(r.bounds.len() - 1, 23);
        // Weeks start on Sunday: 2026-03-10 (Tue) falls in the week of 2026-03-08.
        let w = parse(
            &q(&[
                ("version", "2"),
                ("res", "weeks"),
                ("tz", "UTC"),
                ("start", "1773156600"),
                ("end", "1773156600"),
            ]),
            NOW,
        )
        .map_err(|e| format!("{e:?}"))?;
        assert_eq!(w.bounds, vec![1_772_928_000_000, 1_773_532_800_000]);
        // Months.
        let m = parse(
            &q(&[
                ("version", "2"),
                ("res", "monthly"),
                ("tz", "UTC"),
                ("start", "1767225600"),
                ("end", "1773156600"),
            ]),
            NOW,
        )
        .map_err(|e| format!("{e:?}"))?;
        assert_eq!(m.bounds.len() - 1, 3);
        Ok(())
    }

    #[test]
    fn v1_steps_are_clamped() -> Result<(), String> {
        let steps = |extra: &[(&str, &str)]| {
            parse(&q(extra), NOW)
                .map(|r| r.bounds.len() - 1)
                .map_err(|e| format!("{e:?}"))
        };
        assert_eq!(steps(&[])?, 45);
        assert_eq!(steps(&[("period", "hours"), ("steps", "1")])?, 2);
        assert_eq!(steps(&[("period", "hours"), ("steps", "0")])?, 24);
        assert_eq!(steps(&[("period", "weeks"), ("steps", "100")])?, 12);
        assert_eq!(steps(&[("period", "months")])?, 12);
        Ok(())
    }

    #[test]
    fn bad_parameters_name_themselves() {
        for (pairs, parameter) in [
            (vec![("version", "2")], "res"),
            (vec![("version", "2"), ("res", "minutes")], "res"),
            (
                vec![("version", "2"), ("res", "days"), ("tz", "Mars/Olympus")],
                "tz",
            ),
            (
                vec![("version", "2"), ("res", "days"), ("start", "abc")],
                "start",
            ),
            (
                vec![
                    ("version", "2"),
                    ("res", "days"),
                    ("start", "200"),
                    ("end", "100"),
                ],
                "start",
            ),
            (
                vec![
                    ("version", "2"),
                    ("res", "days"),
                    ("start", "0"),
                    ("end", "400000000"),
                ],
                "end",
            ),
            (vec![("period", "fortnights")], "period"),
            (vec![("steps", "-1")], "steps"),
            (vec![("type", "fax")], "type"),
        ] {
            match parse(&q(&pairs), NOW) {
                Err(ApiError::App { status, source, .. }) => {
                    assert_eq!(status, StatusCode::BAD_REQUEST, "{pairs:?}");
                    assert_eq!(source, Some(json!({ "parameter": parameter })), "{pairs:?}");
                }
                other => panic!("{pairs:?}: {:?}", other.map(|r| r.bounds)),
            }
        }
    }
}
