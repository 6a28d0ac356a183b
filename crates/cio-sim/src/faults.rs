//! Fault injection (one-shot queue and standing chaos) and per-API rate limiting (a rolling
//! one-second window by default, or a token bucket: [`RateLimitMode`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::{SimApi, SimConfig};

/// A one-shot fault, consumed by the next matching request (see
/// [`crate::Simulator::push_faults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (with the API's error body) without processing the request;
    /// `retry_after_secs` adds a `Retry-After` header.
    Status {
        /// HTTP status code.
        status: u16,
        /// Value of the `Retry-After` header, if any.
        retry_after_secs: Option<u64>,
    },
    /// Wait, then answer normally.
    Delay(Duration),
    /// Close the connection without any HTTP response; the request is not processed.
    Drop,
    /// Process the request fully (state changes happen), then close the connection without
    /// sending the response.
    AcceptThenDrop,
    /// Process the request fully, then wait this long before answering (a caller that gives up
    /// or dies meanwhile never learns the outcome).
    AcceptThenDelay(Duration),
}

/// Standing faults applied to every request of an API (see [`crate::Simulator::set_chaos`]).
/// The default injects nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chaos {
    /// Probability (0..=1) of answering `error_status` instead of processing.
    pub error_rate: f64,
    /// Status used for chaos errors (429 also gets `Retry-After: 1`).
    pub error_status: u16,
    /// Added to every request before it is answered.
    pub latency: Duration,
    /// Probability (0..=1) of closing the connection without a response.
    pub drop_rate: f64,
}

impl Default for Chaos {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            error_status: 500,
            latency: Duration::ZERO,
            drop_rate: 0.0,
        }
    }
}

/// How a per-API rate limit of N requests per second is enforced (see
/// [`crate::Simulator::set_rate_limit_mode`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// At most N requests in any rolling second, counted at arrival ("rate limited to 10
    /// requests per 1s"): no burst above N, even at the start or after an idle period.
    #[default]
    Rolling,
    /// A token bucket of N tokens refilled at N per second, starting full: a burst of N, then
    /// N per second (up to 2N-1 within the first second).
    TokenBucket,
}

/// What the gateway does with one request, decided before it is processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Pass,
    Status {
        status: u16,
        retry_after_secs: Option<u64>,
    },
    Drop,
    AcceptThenDrop,
    AcceptThenDelay(Duration),
}

/// The span of a rolling-window limit: "N requests per 1s".
const WINDOW: Duration = Duration::from_secs(1);

/// One API's rate limit in either [`RateLimitMode`].
struct Bucket {
    per_sec: u32,
    mode: RateLimitMode,
    /// Token bucket: tokens left and when they were counted.
    tokens: f64,
    last: Instant,
    /// Rolling window: arrival times of the accepted requests of the last second.
    arrivals: VecDeque<Instant>,
}

impl Bucket {
    fn new(per_sec: u32, mode: RateLimitMode) -> Self {
        Self {
            per_sec,
            mode,
            tokens: f64::from(per_sec),
            last: Instant::now(),
            arrivals: VecDeque::new(),
        }
    }

    /// Admits one request arriving at `now`; on refusal returns the whole seconds until one
    /// would be admitted (at least 1).
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        if self.per_sec == 0 {
            return Ok(());
        }
        match self.mode {
            RateLimitMode::TokenBucket => {
                let rate = f64::from(self.per_sec);
                let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
                self.tokens = (self.tokens + elapsed * rate).min(rate);
                self.last = now;
                if self.tokens >= 1.0 {
                    self.tokens -= 1.0;
                    Ok(())
                } else {
                    let wait = (1.0 - self.tokens) / rate;
                    Err((wait.ceil() as u64).max(1))
                }
            }
            RateLimitMode::Rolling => {
                while self
                    .arrivals
                    .front()
                    .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
                {
                    self.arrivals.pop_front();
                }
                if self.arrivals.len() < self.per_sec as usize {
                    self.arrivals.push_back(now);
                    return Ok(());
                }
                // Full: the oldest arrival in the window leaves it first.
                let leaves = self.arrivals.front().map_or(WINDOW, |oldest| {
                    WINDOW.saturating_sub(now.saturating_duration_since(*oldest))
                });
                Err(leaves.as_secs_f64().ceil().max(1.0) as u64)
            }
        }
    }
}

/// Fault queue, chaos settings and rate limiters (one mutex in the simulator).
pub(crate) struct Traffic {
    queue: VecDeque<(Option<SimApi>, Fault)>,
    chaos_app: Chaos,
    chaos_track: Chaos,
    app: Bucket,
    track: Bucket,
    rng: StdRng,
    /// Time [`Traffic::advance`]d: rate limits see `now + skew`.
    skew: Duration,
}

impl Traffic {
    pub(crate) fn new(config: &SimConfig) -> Self {
        Self {
            queue: VecDeque::new(),
            chaos_app: Chaos::default(),
            chaos_track: Chaos::default(),
            app: Bucket::new(config.app_rate_limit_per_sec, config.rate_limit_mode),
            track: Bucket::new(config.track_rate_limit_per_sec, config.rate_limit_mode),
            rng: StdRng::seed_from_u64(config.seed ^ 0x5EED_CA05),
            skew: Duration::ZERO,
        }
    }

    fn bucket(&mut self, api: SimApi) -> &mut Bucket {
        match api {
            SimApi::App => &mut self.app,
            SimApi::Track => &mut self.track,
        }
    }

    pub(crate) fn rate_limit(&self, api: SimApi) -> u32 {
        match api {
            SimApi::App => self.app.per_sec,
            SimApi::Track => self.track.per_sec,
        }
    }

    pub(crate) fn set_rate_limit(&mut self, api: SimApi, per_sec: u32) {
        let bucket = self.bucket(api);
        *bucket = Bucket::new(per_sec, bucket.mode);
    }

    pub(crate) fn rate_limit_mode(&self, api: SimApi) -> RateLimitMode {
        match api {
            SimApi::App => self.app.mode,
            SimApi::Track => self.track.mode,
        }
    }

    pub(crate) fn set_rate_limit_mode(&mut self, api: SimApi, mode: RateLimitMode) {
        let bucket = self.bucket(api);
        *bucket = Bucket::new(bucket.per_sec, mode);
    }

    /// Takes a rate-limit token: `Err((limit, retry_after_secs))` when over the limit.
    pub(crate) fn take_token(&mut self, api: SimApi) -> Result<(), (u32, u64)> {
        let now = Instant::now() + self.skew;
        let bucket = self.bucket(api);
        bucket.take(now).map_err(|wait| (bucket.per_sec, wait))
    }

    /// Makes `by` pass for the rate limits (windows empty, buckets refill), without waiting.
    pub(crate) fn advance(&mut self, by: Duration) {
        self.skew += by;
    }

    pub(crate) fn push(&mut self, api: Option<SimApi>, faults: impl IntoIterator<Item = Fault>) {
        self.queue.extend(faults.into_iter().map(|f| (api, f)));
    }

    pub(crate) fn set_chaos(&mut self, api: Option<SimApi>, chaos: Chaos) {
        match api {
            Some(SimApi::App) => self.chaos_app = chaos,
            Some(SimApi::Track) => self.chaos_track = chaos,
            None => {
                self.chaos_app = chaos;
                self.chaos_track = chaos;
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.chaos_app = Chaos::default();
        self.chaos_track = Chaos::default();
    }

    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Decides the fate of a request: the first queued fault for this API if any, otherwise the
    /// API's chaos. Returns the delay to wait first and the action.
    pub(crate) fn decide(&mut self, api: SimApi) -> (Duration, Action) {
        let position = self
            .queue
            .iter()
            .position(|(target, _)| target.is_none_or(|t| t == api));
        if let Some((_, fault)) = position.and_then(|i| self.queue.remove(i)) {
            return match fault {
                Fault::Status {
                    status,
                    retry_after_secs,
                } => (
                    Duration::ZERO,
                    Action::Status {
                        status,
                        retry_after_secs,
                    },
                ),
                Fault::Delay(d) => (d, Action::Pass),
                Fault::Drop => (Duration::ZERO, Action::Drop),
                Fault::AcceptThenDrop => (Duration::ZERO, Action::AcceptThenDrop),
                Fault::AcceptThenDelay(d) => (Duration::ZERO, Action::AcceptThenDelay(d)),
            };
        }
        let chaos = match api {
            SimApi::App => self.chaos_app,
            SimApi::Track => self.chaos_track,
        };
        if chaos.drop_rate > 0.0 && self.rng.random_bool(chaos.drop_rate.clamp(0.0, 1.0)) {
            return (chaos.latency, Action::Drop);
        }
        if chaos.error_rate > 0.0 && self.rng.random_bool(chaos.error_rate.clamp(0.0, 1.0)) {
            let retry_after_secs = (chaos.error_status == 429).then_some(1);
            return (
                chaos.latency,
                Action::Status {
                    status: chaos.error_status,
                    retry_after_secs,
                },
            );
        }
        (chaos.latency, Action::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_window_admits_n_in_any_second() {
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        let mut b = Bucket::new(3, RateLimitMode::Rolling);
        assert!(b.take(ms(0)).is_ok());
        assert!(b.take(ms(10)).is_ok());
        assert!(b.take(ms(500)).is_ok());
        // A 4th within the second of the first is refused until the first leaves.
        assert_eq!(b.take(ms(999)), Err(1));
        assert!(b.take(ms(1000)).is_ok());
        assert_eq!(b.take(ms(1009)), Err(1));
        assert!(b.take(ms(1010)).is_ok());
        // Refusals are not counted: after a quiet second everything is admitted again.
        assert!((0..3).all(|i| b.take(ms(2600 + i)).is_ok()));
        assert!(b.take(ms(2603)).is_err());
        // Unlike a token bucket, idle time never allows more than N at once.
        let mut b = Bucket::new(2, RateLimitMode::Rolling);
        assert!(b.take(ms(5000)).is_ok() && b.take(ms(5000)).is_ok());
        assert!(b.take(ms(5500)).is_err());
        let mut unlimited = Bucket::new(0, RateLimitMode::Rolling);
        assert!((0..10_000).all(|_| unlimited.take(start).is_ok()));
    }

    #[test]
    fn a_full_token_bucket_allows_nearly_two_n_in_the_first_second() {
        let start = Instant::now();
        let mut b = Bucket::new(10, RateLimitMode::TokenBucket);
        let admitted = (0..100)
            .filter(|i| b.take(start + Duration::from_millis(10 * i)).is_ok())
            .count();
        assert_eq!(admitted, 19);
        let mut b = Bucket::new(10, RateLimitMode::Rolling);
        let admitted = (0..100)
            .filter(|i| b.take(start + Duration::from_millis(10 * i)).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn bucket_refuses_after_burst_and_refills() {
        let start = Instant::now();
        let mut b = Bucket::new(2, RateLimitMode::TokenBucket);
        assert!(b.take(start).is_ok());
        assert!(b.take(start).is_ok());
        assert_eq!(b.take(start), Err(1));
        assert!(b.take(start + Duration::from_millis(600)).is_ok());
        let mut unlimited = Bucket::new(0, RateLimitMode::TokenBucket);
        assert!((0..10_000).all(|_| unlimited.take(start).is_ok()));
    }

    #[test]
    fn queue_is_per_api_and_in_order() {
        let mut t = Traffic::new(&SimConfig::empty());
        t.push(Some(SimApi::Track), [Fault::Drop]);
        t.push(None, [Fault::AcceptThenDrop]);
        assert_eq!(t.decide(SimApi::App).1, Action::AcceptThenDrop);
        assert_eq!(t.decide(SimApi::App).1, Action::Pass);
        assert_eq!(t.decide(SimApi::Track).1, Action::Drop);
        assert_eq!(t.queued(), 0);
    }

    #[test]
    fn chaos_error_rate_one_always_fails() {
        let mut t = Traffic::new(&SimConfig::empty());
        t.set_chaos(
            Some(SimApi::App),
            Chaos {
                error_rate: 1.0,
                error_status: 503,
                ..Chaos::default()
            },
        );
        assert!(matches!(
            t.decide(SimApi::App).1,
            Action::Status { status: 503, .. }
        ));
        assert_eq!(t.decide(SimApi::Track).1, Action::Pass);
    }
}
