//! Retry decisions: which failures are retried for which endpoints, jittered exponential
//! backoff, and `Retry-After` parsing.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::RetryConfig;
use crate::endpoint::RetryPolicy;
use crate::error::CioError;

/// A server's `Retry-After` longer than this is not waited out: the call fails with
/// [`CioError::RateLimited`] carrying the delay, and the caller decides.
pub const MAX_HONOURED_RETRY_AFTER: Duration = Duration::from_secs(60);

/// HTTP statuses worth retrying: 408, 429 and every 5xx.
pub(crate) fn is_retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..=599).contains(&status)
}

/// Parses `Retry-After` (RFC 7231 §7.1.3): delay-seconds (possibly fractional, which
/// Customer.io never sends but costs nothing to accept) or an HTTP-date (IMF-fixdate such as
/// `Wed, 21 Oct 2015 07:28:00 GMT`, and the obsolete RFC 850 and asctime forms), measured from
/// now; a date in the past gives zero. Anything else gives `None` (the caller then falls back
/// to its backoff).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, SystemTime::now())
}

/// [`parse_retry_after`] with an explicit "now" for HTTP-dates.
pub fn parse_retry_after_at(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::try_from_secs_f64(secs).ok())
            .flatten();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The uncapped-then-capped exponential step for `attempt` (0 for the first retry):
/// `min(max_delay, base_delay * 2^attempt)`.
pub(crate) fn backoff_ceiling(cfg: &RetryConfig, attempt: u32) -> Duration {
    let factor = 2u32.checked_pow(attempt).unwrap_or(u32::MAX);
    cfg.base_delay.saturating_mul(factor).min(cfg.max_delay)
}

/// Jittered backoff ("equal jitter"): uniformly in `[ceiling / 2, ceiling]`, so retries of many
/// callers spread out but never collapse to zero.
pub(crate) fn backoff_delay(cfg: &RetryConfig, attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(cfg, attempt);
    let half = ceiling / 2;
    let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rng.random_range(0..=spread))
}

/// Shortest wait after a 429, even when its `Retry-After` is zero or a date in the past: the
/// server did refuse, and without a floor such answers would be retried without bound (the
/// throttle budget would never fill up).
pub(crate) const MIN_THROTTLE_WAIT: Duration = Duration::from_secs(1);

/// For a 429 with a `Retry-After` on an idempotent call: how long to wait before trying again
/// without counting a retry (at least [`MIN_THROTTLE_WAIT`]), if the call's 429 waits
/// (`throttled_so_far`) stay within [`RetryConfig::max_throttle_wait`]. `None`: treat the 429 as
/// an ordinary failure.
pub(crate) fn throttle_wait(
    cfg: &RetryConfig,
    policy: RetryPolicy,
    error: &CioError,
    server_hint: Option<Duration>,
    throttled_so_far: Duration,
) -> Option<Duration> {
    let hint = server_hint?.max(MIN_THROTTLE_WAIT);
    let throttled = matches!(error, CioError::RateLimited { .. });
    (throttled
        && policy == RetryPolicy::Idempotent
        && hint <= MAX_HONOURED_RETRY_AFTER
        && throttled_so_far + hint <= cfg.max_throttle_wait)
        .then_some(hint)
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Sleep this long, then try again.
    RetryAfter(Duration),
    /// Return the error.
    GiveUp,
}

/// Decides whether attempt number `attempt` (0-based) that failed with `error` is retried.
/// `server_hint` is the response's `Retry-After`, whatever the status.
pub(crate) fn decide(
    cfg: &RetryConfig,
    policy: RetryPolicy,
    error: &CioError,
    server_hint: Option<Duration>,
    attempt: u32,
) -> Decision {
    if attempt >= cfg.max_retries {
        return Decision::GiveUp;
    }
    let may_retry = match policy {
        RetryPolicy::Idempotent => match error {
            CioError::Rejected { status, .. } => is_retryable_status(*status),
            other => other.is_retryable(),
        },
        // Only when the request provably never left.
        RetryPolicy::NeverRetry => matches!(
            error,
            CioError::Transport {
                maybe_sent: false,
                ..
            }
        ),
    };
    if !may_retry {
        return Decision::GiveUp;
    }
    match server_hint {
        Some(hint) if hint > MAX_HONOURED_RETRY_AFTER => Decision::GiveUp,
        Some(hint) => Decision::RetryAfter(hint),
        None => Decision::RetryAfter(backoff_delay(cfg, attempt, &mut rand::rng())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::Api;

    fn cfg() -> RetryConfig {
        RetryConfig {
            max_retries: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            max_throttle_wait: Duration::from_secs(3),
        }
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after("inf"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // 2015-10-21T07:28:00Z
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let now = date - Duration::from_secs(90);
        let in_90s = Some(Duration::from_secs(90));
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", now),
            in_90s
        );
        // The obsolete forms a recipient must still accept (RFC 7231 §7.1.1.1).
        assert_eq!(
            parse_retry_after_at("Wednesday, 21-Oct-15 07:28:00 GMT", now),
            in_90s
        );
        assert_eq!(
            parse_retry_after_at("Wed Oct 21 07:28:00 2015", now),
            in_90s
        );
        assert_eq!(
            parse_retry_after_at(" Wed, 21 Oct 2015 07:28:00 GMT ", now),
            in_90s
        );
        // Past (and present) dates: no wait.
        let later = date + Duration::from_secs(3600);
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", later),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:28:00 GMT", date),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:01 GMT"),
            Some(Duration::ZERO)
        );
        // A future date against the real clock.
        let ahead = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let wait = parse_retry_after(&ahead).unwrap();
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        for bad in [
            "Wed, 21 Oct 2015 07:28:00",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "2015-10-21T07:28:00Z",
            "tomorrow",
        ] {
            assert_eq!(parse_retry_after_at(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = cfg();
        assert_eq!(backoff_ceiling(&c, 0), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(&c, 1), Duration::from_millis(400));
        assert_eq!(backoff_ceiling(&c, 2), Duration::from_millis(800));
        assert_eq!(backoff_ceiling(&c, 4), Duration::from_secs(2));
        assert_eq!(backoff_ceiling(&c, 40), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let c = cfg();
        let mut rng = rand::rng();
        for attempt in 0..8 {
            let ceiling = backoff_ceiling(&c, attempt);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                let d = backoff_delay(&c, attempt, &mut rng);
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
                seen.insert(d);
            }
            assert!(seen.len() > 10, "no jitter at attempt {attempt}");
        }
    }

    #[test]
    fn zero_base_gives_zero_delay() {
        let c = RetryConfig {
            max_retries: 3,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            max_throttle_wait: Duration::ZERO,
        };
        assert_eq!(backoff_delay(&c, 3, &mut rand::rng()), Duration::ZERO);
    }

    fn server(status: u16) -> CioError {
        CioError::Server {
            api: Api::App,
            status,
        }
    }

    #[test]
    fn idempotent_decisions() {
        let c = cfg();
        let p = RetryPolicy::Idempotent;
        assert!(matches!(
            decide(&c, p, &server(500), None, 0),
            Decision::RetryAfter(_)
        ));
        assert_eq!(decide(&c, p, &server(500), None, 3), Decision::GiveUp);
        let rl = CioError::RateLimited {
            api: Api::App,
            retry_after: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            decide(&c, p, &rl, Some(Duration::from_secs(1)), 0),
            Decision::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&c, p, &rl, Some(Duration::from_secs(3600)), 0),
            Decision::GiveUp
        );
        let r408 = CioError::Rejected {
            api: Api::App,
            status: 408,
            details: vec![],
        };
        assert!(matches!(
            decide(&c, p, &r408, None, 0),
            Decision::RetryAfter(_)
        ));
        for not_retried in [
            CioError::Rejected {
                api: Api::App,
                status: 400,
                details: vec![],
            },
            CioError::Unauthorized {
                api: Api::App,
                status: 401,
            },
            CioError::NotFound {
                api: Api::App,
                endpoint: "/x",
            },
            CioError::Decode {
                api: Api::App,
                endpoint: "/x",
                message: String::new(),
            },
        ] {
            assert_eq!(decide(&c, p, &not_retried, None, 0), Decision::GiveUp);
        }
        let timeout = CioError::Timeout {
            api: Api::App,
            endpoint: "/x",
        };
        assert!(matches!(
            decide(&c, p, &timeout, None, 0),
            Decision::RetryAfter(_)
        ));
    }

    #[test]
    fn never_retry_decisions() {
        let c = cfg();
        let p = RetryPolicy::NeverRetry;
        let timeout = CioError::Timeout {
            api: Api::App,
            endpoint: "/x",
        };
        assert_eq!(decide(&c, p, &timeout, None, 0), Decision::GiveUp);
        assert_eq!(decide(&c, p, &server(503), None, 0), Decision::GiveUp);
        let rl = CioError::RateLimited {
            api: Api::App,
            retry_after: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            decide(&c, p, &rl, Some(Duration::from_secs(1)), 0),
            Decision::GiveUp
        );
        let lost = |maybe_sent| CioError::Transport {
            api: Api::App,
            endpoint: "/x",
            message: String::new(),
            maybe_sent,
        };
        assert_eq!(decide(&c, p, &lost(true), None, 0), Decision::GiveUp);
        assert!(matches!(
            decide(&c, p, &lost(false), None, 0),
            Decision::RetryAfter(_)
        ));
    }

    #[test]
    fn throttling_waits_as_told_within_its_budget_and_only_for_idempotent_calls() {
        let c = cfg(); // budget 3 s
        let rl = CioError::RateLimited {
            api: Api::App,
            retry_after: Some(Duration::from_secs(1)),
        };
        let one = Some(Duration::from_secs(1));
        let p = RetryPolicy::Idempotent;
        assert_eq!(throttle_wait(&c, p, &rl, one, Duration::ZERO), one);
        assert_eq!(throttle_wait(&c, p, &rl, one, Duration::from_secs(2)), one);
        assert_eq!(
            throttle_wait(&c, p, &rl, one, Duration::from_secs(3)),
            None,
            "over budget"
        );
        assert_eq!(
            throttle_wait(&c, p, &rl, None, Duration::ZERO),
            None,
            "no Retry-After: ordinary retry"
        );
        assert_eq!(
            throttle_wait(&c, RetryPolicy::NeverRetry, &rl, one, Duration::ZERO),
            None
        );
        let server = CioError::Server {
            api: Api::App,
            status: 503,
        };
        assert_eq!(
            throttle_wait(&c, p, &server, one, Duration::ZERO),
            None,
            "only 429s are throttling"
        );
        let off = RetryConfig {
            max_throttle_wait: Duration::ZERO,
            ..c
        };
        assert_eq!(throttle_wait(&off, p, &rl, one, Duration::ZERO), None);
        // "Retry-After: 0" (or a past date) still waits, so the budget runs out eventually.
        let zero = Some(Duration::ZERO);
        assert_eq!(
            throttle_wait(&c, p, &rl, zero, Duration::ZERO),
            Some(MIN_THROTTLE_WAIT)
        );
        assert_eq!(
            throttle_wait(&c, p, &rl, zero, Duration::from_secs(3)),
            None
        );
    }
}
