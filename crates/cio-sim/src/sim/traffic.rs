//! Traffic: per-API rate limits, one-shot faults and standing chaos.

use std::time::Duration;

use super::{Simulator, lock};
use crate::config::SimApi;
use crate::faults::{Action, Chaos, Fault, RateLimitMode};

impl Simulator {
    /// Changes an API's rate limit (requests per second, 0 = unlimited); its window starts
    /// empty (a token bucket: full).
    pub fn set_rate_limit(&self, api: SimApi, per_sec: u32) {
        lock(&self.inner.traffic).set_rate_limit(api, per_sec);
    }

    /// Changes how an API's limit is enforced (rolling window or token bucket); starts afresh.
    pub fn set_rate_limit_mode(&self, api: SimApi, mode: RateLimitMode) {
        lock(&self.inner.traffic).set_rate_limit_mode(api, mode);
    }

    /// How an API's limit is enforced.
    pub fn rate_limit_mode(&self, api: SimApi) -> RateLimitMode {
        lock(&self.inner.traffic).rate_limit_mode(api)
    }

    /// Current rate limit of an API.
    pub fn rate_limit(&self, api: SimApi) -> u32 {
        lock(&self.inner.traffic).rate_limit(api)
    }

    /// Queues one-shot faults for the next requests of `api` (`None`: either API), in order.
    pub fn push_faults(&self, api: Option<SimApi>, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.inner.traffic).push(api, faults);
    }

    /// Sets standing faults for `api` (`None`: both). Queued faults take precedence.
    pub fn set_chaos(&self, api: Option<SimApi>, chaos: Chaos) {
        lock(&self.inner.traffic).set_chaos(api, chaos);
    }

    /// Clears queued faults and chaos (rate limits stay).
    pub fn clear_faults(&self) {
        lock(&self.inner.traffic).clear();
    }

    /// Number of queued one-shot faults not yet consumed.
    pub fn queued_faults(&self) -> usize {
        lock(&self.inner.traffic).queued()
    }

    pub(crate) fn decide(&self, api: SimApi) -> (Duration, Action) {
        lock(&self.inner.traffic).decide(api)
    }

    pub(crate) fn take_token(&self, api: SimApi) -> Result<(), (u32, u64)> {
        lock(&self.inner.traffic).take_token(api)
    }
}
